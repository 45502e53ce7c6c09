//! Retrieval quality against labeled questions: recall@k, mean reciprocal rank and nDCG@10 of
//! the hits a search returns, judged by the documents (and pages) a question's answer is on.
//! What `thinkrag eval` reports for vector, lexical and hybrid search.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::retrieval::SearchHit;

/// Hits nDCG is computed over.
pub const NDCG_DEPTH: usize = 10;

/// One labeled question (a line of the JSONL question file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalQuestion {
    /// Its identifier, for reports.
    #[serde(default)]
    pub id: String,
    /// The question as a user would ask it.
    pub question: String,
    /// Where the answer is: any one of these places answers it.
    pub relevant: Vec<Relevant>,
    /// A free label to break results down by (e.g. `exact`, `concept`).
    #[serde(default)]
    pub kind: Option<String>,
}

/// A place that answers a question: a document (by file name or path suffix) and, for
/// paginated documents, its pages (1-based); without pages any chunk of the document counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Relevant {
    /// The document: its file name, or a path suffix of the ingested source.
    pub source: String,
    /// The pages that answer it (each one a relevant unit), or none for the whole document.
    #[serde(default)]
    pub pages: Option<Vec<u32>>,
}

/// Reads a JSONL question file (blank lines and lines starting with `#` skipped).
pub fn load_questions(path: &Path) -> Result<Vec<EvalQuestion>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let q: EvalQuestion = serde_json::from_str(line).map_err(|e| Error::InvalidParameter {
            name: "questions",
            value: format!("{}:{}", path.display(), n + 1),
            expected: format!("a JSON object with question and relevant: {e}"),
        })?;
        if q.relevant.is_empty() || q.question.trim().is_empty() {
            return Err(Error::InvalidParameter {
                name: "questions",
                value: format!("{}:{}", path.display(), n + 1),
                expected: "a non-empty question and at least one relevant document".into(),
            });
        }
        out.push(q);
    }
    Ok(out)
}

/// Whether `source` (an ingested path) is the document `wanted` names.
fn same_document(source: &str, wanted: &str) -> bool {
    let source = source.replace('\\', "/");
    let wanted = wanted.replace('\\', "/");
    source == wanted || source.ends_with(&format!("/{}", wanted.trim_start_matches('/')))
}

/// The relevant units of a question: (index into `relevant`, page) pairs, page `None` for a
/// whole document.
fn units(relevant: &[Relevant]) -> Vec<(usize, Option<u32>)> {
    let mut out = Vec::new();
    for (i, r) in relevant.iter().enumerate() {
        match &r.pages {
            Some(pages) if !pages.is_empty() => {
                let mut pages = pages.clone();
                pages.sort_unstable();
                pages.dedup();
                out.extend(pages.into_iter().map(|p| (i, Some(p))));
            }
            _ => out.push((i, None)),
        }
    }
    out
}

/// Which relevant unit each hit matches (`None`: not relevant).
pub fn judge(hits: &[SearchHit], relevant: &[Relevant]) -> Vec<Option<usize>> {
    let units = units(relevant);
    hits.iter()
        .map(|h| {
            units.iter().position(|&(r, page)| {
                same_document(&h.source, &relevant[r].source)
                    && page.is_none_or(|p| h.page == Some(p))
            })
        })
        .collect()
}

/// One question's scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct QuestionScores {
    /// Share of the relevant units found among the first `k` hits.
    pub recall: f64,
    /// 1 / the rank of the first relevant hit (0 when none is in the hits).
    pub reciprocal_rank: f64,
    /// Normalised discounted cumulative gain of the first [`NDCG_DEPTH`] hits, binary gains; a
    /// unit found again by a later chunk adds nothing (several chunks share a page).
    pub ndcg: f64,
}

/// Scores `hits` (best first, at least `k` and [`NDCG_DEPTH`] of them when there are that
/// many) against `relevant`.
pub fn score(hits: &[SearchHit], relevant: &[Relevant], k: usize) -> QuestionScores {
    let total = units(relevant).len();
    let judged = judge(hits, relevant);
    let mut found = std::collections::HashSet::new();
    for u in judged.iter().take(k).flatten() {
        found.insert(*u);
    }
    let recall = if total == 0 {
        0.0
    } else {
        found.len() as f64 / total as f64
    };
    let reciprocal_rank = judged
        .iter()
        .position(Option::is_some)
        .map_or(0.0, |i| 1.0 / (i + 1) as f64);
    let mut seen = std::collections::HashSet::new();
    let dcg: f64 = judged
        .iter()
        .take(NDCG_DEPTH)
        .enumerate()
        .filter(|(_, u)| u.is_some_and(|u| seen.insert(u)))
        .map(|(i, _)| 1.0 / ((i + 2) as f64).log2())
        .sum();
    let ideal: f64 = (0..total.min(NDCG_DEPTH))
        .map(|i| 1.0 / ((i + 2) as f64).log2())
        .sum();
    QuestionScores {
        recall,
        reciprocal_rank,
        ndcg: if ideal > 0.0 { dcg / ideal } else { 0.0 },
    }
}

/// Mean scores over a set of questions.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct MeanScores {
    /// How many questions.
    pub questions: usize,
    /// Mean recall@k.
    pub recall: f64,
    /// Mean reciprocal rank.
    pub mrr: f64,
    /// Mean nDCG@10.
    pub ndcg: f64,
}

impl MeanScores {
    /// The means of `scores`.
    pub fn of<'a>(scores: impl IntoIterator<Item = &'a QuestionScores>) -> Self {
        let mut m = MeanScores::default();
        for s in scores {
            m.questions += 1;
            m.recall += s.recall;
            m.mrr += s.reciprocal_rank;
            m.ndcg += s.ndcg;
        }
        if m.questions > 0 {
            let n = m.questions as f64;
            m.recall /= n;
            m.mrr /= n;
            m.ndcg /= n;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(source: &str, page: Option<u32>) -> SearchHit {
        SearchHit {
            source: source.to_string(),
            page,
            ..SearchHit::default()
        }
    }

    fn rel(source: &str, pages: Option<Vec<u32>>) -> Relevant {
        Relevant {
            source: source.to_string(),
            pages,
        }
    }

    #[test]
    fn scores_match_hand_computed_values() {
        let relevant = [rel("faq.pdf", Some(vec![7, 9]))];
        let hits = [
            hit("/docs/ref.pdf", Some(7)), // other document
            hit("/docs/faq.pdf", Some(9)), // unit 2 at rank 2
            hit("/docs/faq.pdf", Some(9)), // same unit again: no gain
            hit("/docs/faq.pdf", Some(8)), // other page
            hit("/docs/faq.pdf", Some(7)), // unit 1 at rank 5
        ];
        assert_eq!(
            judge(&hits, &relevant),
            vec![None, Some(1), Some(1), None, Some(0)]
        );
        let s = score(&hits, &relevant, 3);
        assert_eq!(s.recall, 0.5);
        assert_eq!(s.reciprocal_rank, 0.5);
        let dcg = 1.0 / 3f64.log2() + 1.0 / 6f64.log2();
        let ideal = 1.0 + 1.0 / 3f64.log2();
        assert!((s.ndcg - dcg / ideal).abs() < 1e-12);
        assert_eq!(score(&hits, &relevant, 5).recall, 1.0);
        // Nothing relevant: all zero.
        let none = score(&hits[..1], &relevant, 5);
        assert_eq!(
            (none.recall, none.reciprocal_rank, none.ndcg),
            (0.0, 0.0, 0.0)
        );
        // A perfect ranking scores 1.
        let perfect = score(
            &[hit("a/faq.pdf", Some(7)), hit("a/faq.pdf", Some(9))],
            &relevant,
            2,
        );
        assert_eq!((perfect.recall, perfect.reciprocal_rank), (1.0, 1.0));
        assert!((perfect.ndcg - 1.0).abs() < 1e-12);
    }

    #[test]
    fn documents_match_by_name_or_path_suffix_and_whole_documents_count_once() {
        assert!(same_document("/home/u/docs/faq.pdf", "faq.pdf"));
        assert!(same_document("/home/u/docs/faq.pdf", "docs/faq.pdf"));
        assert!(!same_document("/home/u/docs/myfaq.pdf", "faq.pdf"));
        let relevant = [rel("notes.md", None)];
        let hits = [hit("/x/notes.md", None), hit("/x/notes.md", Some(3))];
        let s = score(&hits, &relevant, 10);
        assert_eq!((s.recall, s.reciprocal_rank, s.ndcg), (1.0, 1.0, 1.0));
        let mean = MeanScores::of(&[s, score(&hits[..0], &relevant, 10)]);
        assert_eq!((mean.questions, mean.recall, mean.mrr), (2, 0.5, 0.5));
    }

    #[test]
    fn question_files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.jsonl");
        std::fs::write(
            &path,
            "# comment\n{\"id\":\"q1\",\"question\":\"How?\",\"relevant\":[{\"source\":\"a.pdf\",\"pages\":[3]}],\"kind\":\"exact\",\"key\":\"x\"}\n\n",
        )
        .unwrap();
        let qs = load_questions(&path).unwrap();
        assert_eq!(qs.len(), 1);
        assert_eq!(qs[0].relevant[0].pages, Some(vec![3]));
        std::fs::write(&path, "{\"question\":\"How?\",\"relevant\":[]}\n").unwrap();
        let e = load_questions(&path).unwrap_err().to_string();
        assert!(e.contains("q.jsonl:1"), "{e}");
        std::fs::write(&path, "not json\n").unwrap();
        assert!(load_questions(&path).is_err());
    }
}
