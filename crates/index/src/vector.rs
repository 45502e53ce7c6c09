//! A standalone HNSW index over unit vectors (cosine similarity) on thinkrag's own graph,
//! plus the vector maths (validation, normalisation, dot product) shared with exact search.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::graph::Graph;
use crate::IndexError;

/// Dot product of two equally long slices (extra elements of the longer one are ignored).
///
/// With AVX-512 (checked at run time), four 16-lane accumulators. The portable version below
/// compiled to 128-bit multiplies with shuffles, and it was 48% of an HNSW search's time.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F (checked just above).
        return unsafe { dot_avx512(a, b) };
    }
    dot_portable(a, b)
}

/// [`dot`] with 16-lane fused multiply-adds; the last `len % 16` values through a masked load.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use core::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // SAFETY (every load below): offsets stay below `n`, inside both slices; the masked load
    // reads only the lanes below `n`.
    let at = |p: *const f32, i: usize| unsafe { _mm512_loadu_ps(p.add(i)) };
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (j, s) in acc.iter_mut().enumerate() {
            *s = _mm512_fmadd_ps(at(pa, i + 16 * j), at(pb, i + 16 * j), *s);
        }
        i += 64;
    }
    while i + 16 <= n {
        acc[0] = _mm512_fmadd_ps(at(pa, i), at(pb, i), acc[0]);
        i += 16;
    }
    if i < n {
        let mask: __mmask16 = (1u16 << (n - i)) - 1;
        // SAFETY: as above.
        let (x, y) = unsafe {
            (
                _mm512_maskz_loadu_ps(mask, pa.add(i)),
                _mm512_maskz_loadu_ps(mask, pb.add(i)),
            )
        };
        acc[1] = _mm512_fmadd_ps(x, y, acc[1]);
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(sum)
}

/// [`dot`] without AVX-512: eight independent accumulators let the compiler keep several
/// multiply-adds in flight instead of one serial dependency chain.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    // Cut to one length first: the chunks' remainders must line up.
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0.0f32; 8];
    for (x, y) in ca.zip(cb) {
        for ((s, xi), yi) in acc.iter_mut().zip(x).zip(y) {
            *s += xi * yi;
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Checks that `v` has `dim` finite components and a non-zero norm, and returns it L2-normalised.
///
/// `what` names the vector in the error message ("query", "vector 3 of a.pdf").
pub fn normalized(v: &[f32], dim: usize, what: &str) -> Result<Vec<f32>, IndexError> {
    if v.len() != dim {
        return Err(IndexError::DimensionMismatch {
            what: what.to_string(),
            expected: dim,
            found: v.len(),
        });
    }
    if let Some(pos) = v.iter().position(|x| !x.is_finite()) {
        return Err(IndexError::InvalidVector {
            what: what.to_string(),
            reason: format!("component {pos} is {}", v[pos]),
        });
    }
    // f64 so that huge-but-finite components cannot overflow the sum of squares to infinity.
    let norm = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return Err(IndexError::InvalidVector {
            what: what.to_string(),
            reason: "it has zero length, so it has no direction to compare".to_string(),
        });
    }
    Ok(v.iter().map(|&x| (f64::from(x) / norm) as f32).collect())
}

/// Tuning knobs of the HNSW graph.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct HnswParams {
    /// Maximum neighbours per node and layer (`max_nb_connection`; layer 0 keeps twice as many).
    pub m: usize,
    /// Candidate list size while inserting; larger builds a better graph, slower.
    pub ef_construction: usize,
    /// Minimum candidate list size while searching; the effective value is
    /// `max(ef_search, 4 * k)` (see [`HnswParams::ef_for`]).
    pub ef_search: usize,
}

impl Default for HnswParams {
    /// Chosen on the clustered 100,000 x 384 set of `../shared/reference/ann-bench/` (2 cores;
    /// `cargo run --release -p thinkrag-index --example ann_files`): `m` 16 and
    /// `ef_construction` 200 build it in about 23 s; `ef_search` 160 gives recall@10 0.97 at
    /// about 2,900 queries/s on one thread (128 gave 0.953, too close to 0.95 for graphs that
    /// vary from build to build; 256 gives 0.992 at 2,000 queries/s).
    fn default() -> Self {
        HnswParams {
            m: 16,
            ef_construction: 200,
            ef_search: 160,
        }
    }
}

impl HnswParams {
    /// The search candidate list size used for a query asking for `k` hits.
    pub fn ef_for(&self, k: usize) -> usize {
        self.ef_search.max(k.saturating_mul(4))
    }

    /// Rejects values the graph cannot work with (`m` is kept to 2..=256, as stored indexes
    /// have always had it).
    pub fn validate(&self) -> Result<(), IndexError> {
        if !(2..=256).contains(&self.m) {
            return Err(IndexError::InvalidParams(format!(
                "m = {} must be between 2 and 256",
                self.m
            )));
        }
        if self.ef_construction == 0 || self.ef_search == 0 {
            return Err(IndexError::InvalidParams(
                "ef_construction and ef_search must be at least 1".to_string(),
            ));
        }
        Ok(())
    }
}

/// An HNSW graph over unit vectors, searched by cosine similarity.
///
/// Points are identified by their insertion position `0..len()`.
pub struct VectorIndex {
    graph: Graph,
    dim: usize,
    params: HnswParams,
}

impl std::fmt::Debug for VectorIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorIndex")
            .field("dim", &self.dim)
            .field("len", &self.len())
            .field("params", &self.params)
            .finish()
    }
}

impl VectorIndex {
    /// An empty graph for `dim`-dimensional vectors. `capacity` is a hint only (the graph grows
    /// as points come).
    pub fn new(dim: usize, capacity: usize, params: HnswParams) -> Result<Self, IndexError> {
        let _ = capacity;
        params.validate()?;
        if dim == 0 {
            return Err(IndexError::InvalidParams(
                "vector dimension must be at least 1".to_string(),
            ));
        }
        Ok(VectorIndex {
            graph: Graph::new(dim, params.m, params.ef_construction),
            dim,
            params,
        })
    }

    /// Builds a graph from `vectors` (all of one dimension) with a parallel insert.
    /// The vectors are validated and L2-normalised; point `i` is `vectors[i]`.
    pub fn build(vectors: &[Vec<f32>], params: HnswParams) -> Result<Self, IndexError> {
        let dim = vectors.first().map_or(1, Vec::len);
        let mut flat = Vec::with_capacity(vectors.len() * dim);
        for (i, v) in vectors.iter().enumerate() {
            flat.extend(normalized(v, dim, &format!("vector {i}"))?);
        }
        Self::from_normalized(&flat, dim, params)
    }

    /// Builds a graph from `flat`, `len / dim` vectors of `dim` components laid end to end.
    /// The vectors are validated and L2-normalised; point `i` is `flat[i*dim..(i+1)*dim]`.
    pub fn build_flat(flat: &[f32], dim: usize, params: HnswParams) -> Result<Self, IndexError> {
        if dim == 0 || !flat.len().is_multiple_of(dim) {
            return Err(IndexError::DimensionMismatch {
                what: "flat vector buffer".to_string(),
                expected: dim,
                found: flat.len(),
            });
        }
        let mut norm = Vec::with_capacity(flat.len());
        for (i, v) in flat.chunks_exact(dim).enumerate() {
            norm.extend(normalized(v, dim, &format!("vector {i}"))?);
        }
        Self::from_normalized(&norm, dim, params)
    }

    /// Builds from vectors the caller has already validated and normalised.
    pub(crate) fn from_normalized(
        flat: &[f32],
        dim: usize,
        params: HnswParams,
    ) -> Result<Self, IndexError> {
        let mut index = Self::new(dim, flat.len() / dim.max(1), params)?;
        index.insert_normalized(flat);
        Ok(index)
    }

    /// Appends already validated, normalised vectors as points `len()..`.
    pub(crate) fn insert_normalized(&mut self, flat: &[f32]) {
        self.graph.insert(flat);
    }

    /// Appends `flat` (vectors of `dim()` components laid end to end) as points `len()..`,
    /// validating and normalising them first.
    pub fn insert_flat(&mut self, flat: &[f32]) -> Result<(), IndexError> {
        if !flat.len().is_multiple_of(self.dim) {
            return Err(IndexError::DimensionMismatch {
                what: "flat vector buffer".to_string(),
                expected: self.dim,
                found: flat.len(),
            });
        }
        let mut norm = Vec::with_capacity(flat.len());
        for (i, v) in flat.chunks_exact(self.dim).enumerate() {
            norm.extend(normalized(
                v,
                self.dim,
                &format!("vector {}", self.len() + i),
            )?);
        }
        self.insert_normalized(&norm);
        Ok(())
    }

    /// Approximate `k` nearest points to `query` as `(point, cosine similarity)`, best first.
    /// `ef` is the candidate list size (raised to `k` if smaller).
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
    ) -> Result<Vec<(usize, f32)>, IndexError> {
        let q = normalized(query, self.dim, "query")?;
        Ok(self.search_normalized(&q, k, ef))
    }

    /// Search with an already validated, normalised query.
    pub(crate) fn search_normalized(&self, q: &[f32], k: usize, ef: usize) -> Vec<(usize, f32)> {
        self.graph.search(q, k, ef, None)
    }

    /// [`VectorIndex::search_normalized`] leaving out the points marked in `dead` (removed
    /// chunks whose points stay in the graph until a compaction): the search still walks
    /// through them but never returns them, so `k` live points come back when there are `k`.
    pub(crate) fn search_live(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        dead: &[bool],
        dead_count: usize,
    ) -> Vec<(usize, f32)> {
        let dead = (dead_count > 0).then_some(dead);
        self.graph.search(q, k, ef, dead)
    }

    /// Number of points in the graph.
    pub fn len(&self) -> usize {
        self.graph.len()
    }

    /// Whether the graph has no points.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Dimension of the vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The parameters the graph was built with.
    pub fn params(&self) -> HnswParams {
        self.params
    }

    /// Writes the graph's links into `dir` (which must exist) as the two files of
    /// [`VectorIndex::dump_paths`]; the vectors are not written (the index stores them).
    /// Returns `basename`.
    pub fn dump(&self, dir: &Path, basename: &str) -> Result<String, IndexError> {
        self.graph
            .dump(dir, basename)
            .map_err(|e| IndexError::GraphDump {
                path: dir.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(basename.to_string())
    }

    /// The two files [`VectorIndex::dump`] writes for `basename` in `dir`.
    pub fn dump_paths(dir: &Path, basename: &str) -> (PathBuf, PathBuf) {
        Graph::paths(dir, basename)
    }

    /// Loads a graph written by [`VectorIndex::dump`] over `vectors` (already normalised, `dim`
    /// components each, points `0..n`), checking that it is a graph of exactly those points.
    /// Returns `None` (after logging why) when the dump is missing, unreadable or does not
    /// match, so the caller can rebuild the graph from the vectors instead.
    pub(crate) fn load_checked(
        dir: &Path,
        basename: &str,
        vectors: &[f32],
        dim: usize,
        params: HnswParams,
    ) -> Option<Self> {
        if dim == 0 || vectors.is_empty() {
            return None;
        }
        match Graph::load(
            dir,
            basename,
            vectors,
            dim,
            params.m,
            params.ef_construction,
        ) {
            Ok(graph) => Some(VectorIndex { graph, dim, params }),
            Err(reason) => {
                tracing::warn!(dir = %dir.display(), %reason, "HNSW graph unusable; rebuilding it from the stored vectors");
                None
            }
        }
    }
}

/// Exact top-`k` by dot product of a normalised `query` against normalised `flat` vectors:
/// `(position, cosine)` best first, ties broken by position.
pub(crate) fn exact_top_k(flat: &[f32], dim: usize, query: &[f32], k: usize) -> Vec<(usize, f32)> {
    if k == 0 || dim == 0 {
        return Vec::new();
    }
    let mut scored: Vec<(usize, f32)> = if flat.len() >= 64 * 1024 {
        flat.par_chunks_exact(dim)
            .map(|v| dot(query, v))
            .enumerate()
            .collect()
    } else {
        flat.chunks_exact(dim)
            .map(|v| dot(query, v))
            .enumerate()
            .collect()
    };
    let order = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if scored.len() > k {
        scored.select_nth_unstable_by(k - 1, order);
        scored.truncate(k);
    }
    scored.sort_unstable_by(order);
    scored
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both versions of [`dot`] against an f64 sum, for every length up to 200 (all the tails of
    /// the 64- and 16-lane loops) and the embedders' 384 and 768, slices of unequal length too.
    #[test]
    fn dot_matches_an_f64_sum_for_every_length() {
        let value = |i: usize, salt: f32| ((i as f32 * 0.37 + salt).sin() * 1.7).clamp(-1.5, 1.5);
        for n in (0..=200).chain([384, 768]) {
            let a: Vec<f32> = (0..n).map(|i| value(i, 0.1)).collect();
            let b: Vec<f32> = (0..n + 3).map(|i| value(i, 2.3)).collect();
            let want: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            let scale: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from((x * y).abs()))
                .sum();
            for (name, got) in [("dot", dot(&a, &b)), ("portable", dot_portable(&a, &b))] {
                assert!(
                    (f64::from(got) - want).abs() <= 1e-6 * (1.0 + scale),
                    "{name}, length {n}: {got} vs {want}"
                );
            }
        }
    }
}
