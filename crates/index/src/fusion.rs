//! Search modes and reciprocal rank fusion: how vector and lexical result lists become one
//! ranking. Fusion works on ranks alone, so hybrid ranking means the same whichever store
//! produced the lists (their cosine and BM25 scores are not comparable).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How chunks are found for a query.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// Nearest embedding vectors (cosine similarity).
    #[default]
    Vector,
    /// BM25 over the chunk text: exact words, names, codes, option strings.
    Lexical,
    /// Both, fused by reciprocal rank fusion.
    Hybrid,
}

impl SearchMode {
    /// Every mode, in the order help texts list them.
    pub const ALL: [SearchMode; 3] = [SearchMode::Vector, SearchMode::Lexical, SearchMode::Hybrid];

    /// The mode's name (`vector`, `lexical`, `hybrid`).
    pub fn name(self) -> &'static str {
        match self {
            SearchMode::Vector => "vector",
            SearchMode::Lexical => "lexical",
            SearchMode::Hybrid => "hybrid",
        }
    }

    /// Whether the mode needs the query's embedding.
    pub fn uses_vectors(self) -> bool {
        self != SearchMode::Lexical
    }
}

impl fmt::Display for SearchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A search mode name that is none of `vector`, `lexical`, `hybrid`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown search mode {0:?}: expected vector, lexical or hybrid")]
pub struct UnknownSearchMode(pub String);

impl FromStr for SearchMode {
    type Err = UnknownSearchMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SearchMode::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownSearchMode(s.to_string()))
    }
}

/// The rank constant of reciprocal rank fusion (Cormack et al. 2009; also OpenSearch's,
/// Elasticsearch's and Qdrant's default): a hit at rank r (from 1) in a list adds 1 / (60 + r).
pub const RRF_K: f32 = 60.0;

/// How many candidates each list contributes to a hybrid search of `k` results: deep enough
/// that a chunk ranked well by one list and moderately by the other is found by both.
pub fn hybrid_candidates(k: usize) -> usize {
    k.saturating_mul(4).max(50)
}

/// Fuses ranked lists of ids (best first) with reciprocal rank fusion: each id scores the sum
/// of `1 / (k_rrf + rank)` over the lists it appears in. Best first; ties go to the id with the
/// better best rank, then the smaller id, so the order is deterministic.
pub fn reciprocal_rank_fusion(lists: &[Vec<u64>], k_rrf: f32) -> Vec<(u64, f32)> {
    let mut scores: HashMap<u64, (f32, usize)> = HashMap::new();
    for list in lists {
        let mut seen = std::collections::HashSet::new();
        for (i, &id) in list.iter().enumerate() {
            // An id listed twice in one list counts once, at its best rank.
            if !seen.insert(id) {
                continue;
            }
            let entry = scores.entry(id).or_insert((0.0, usize::MAX));
            entry.0 += 1.0 / (k_rrf + (i + 1) as f32);
            entry.1 = entry.1.min(i);
        }
    }
    let mut fused: Vec<(u64, f32, usize)> =
        scores.into_iter().map(|(id, (s, r))| (id, s, r)).collect();
    fused.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)).then(a.0.cmp(&b.0)));
    fused.into_iter().map(|(id, s, _)| (id, s)).collect()
}

/// One result of [`fuse_candidates`]: its fusion score and what each list held for it (at least
/// one of the two).
#[derive(Clone, Debug, PartialEq)]
pub struct Fused<T> {
    /// The reciprocal-rank-fusion score.
    pub score: f32,
    /// The vector list's entry, if it had one.
    pub by_vector: Option<T>,
    /// The lexical list's entry, if it had one.
    pub by_words: Option<T>,
}

/// A hybrid search's two candidate lists (each best first) fused by
/// [`reciprocal_rank_fusion`] with [`RRF_K`], the best `k`: what every store does with its own
/// candidates, so that hybrid ranking means the same on each.
pub fn fuse_candidates<T>(
    by_vector: Vec<T>,
    by_words: Vec<T>,
    id: impl Fn(&T) -> u64,
    k: usize,
) -> Vec<Fused<T>> {
    let lists = [
        by_vector.iter().map(&id).collect::<Vec<_>>(),
        by_words.iter().map(&id).collect::<Vec<_>>(),
    ];
    let mut vector: HashMap<u64, T> = by_vector.into_iter().map(|t| (id(&t), t)).collect();
    let mut words: HashMap<u64, T> = by_words.into_iter().map(|t| (id(&t), t)).collect();
    reciprocal_rank_fusion(&lists, RRF_K)
        .into_iter()
        .take(k)
        .map(|(i, score)| Fused {
            score,
            by_vector: vector.remove(&i),
            by_words: words.remove(&i),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in SearchMode::ALL {
            assert_eq!(m.name().parse::<SearchMode>().unwrap(), m);
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{m}\""));
        }
        assert_eq!("Hybrid".parse::<SearchMode>().unwrap(), SearchMode::Hybrid);
        let e = "bm25".parse::<SearchMode>().unwrap_err();
        assert!(e.to_string().contains("vector, lexical or hybrid"), "{e}");
    }

    #[test]
    fn fusion_rewards_agreement_and_is_deterministic() {
        // 7 is second in both lists: it beats 1 and 9, each first in one list only.
        let fused = reciprocal_rank_fusion(&[vec![1, 7, 3], vec![9, 7, 1]], RRF_K);
        let ids: Vec<u64> = fused.iter().map(|f| f.0).collect();
        assert_eq!(ids, vec![1, 7, 9, 3]);
        let s = |id| fused.iter().find(|f| f.0 == id).unwrap().1;
        assert!((s(1) - (1.0 / 61.0 + 1.0 / 63.0)).abs() < 1e-7);
        assert!((s(7) - 2.0 / 62.0).abs() < 1e-7);
        assert!(s(1) > s(7) && s(7) > s(9) && s(9) > s(3));
        // Equal scores: the better best rank, then the smaller id.
        let tie = reciprocal_rank_fusion(&[vec![5, 2], vec![2, 5]], RRF_K);
        assert_eq!(tie.iter().map(|f| f.0).collect::<Vec<_>>(), vec![2, 5]);
        // Duplicates within a list count once; empty lists are fine.
        let dup = reciprocal_rank_fusion(&[vec![4, 4], vec![]], RRF_K);
        assert_eq!(dup, vec![(4, 1.0 / 61.0)]);
    }
}
