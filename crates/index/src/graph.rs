//! thinkrag's HNSW graph (Malkov and Yashunin, as hnswlib lays it out): vectors in one array,
//! neighbour lists in flat arrays of ids, a visited-tag array reused across searches, a parallel
//! insert with one lock per node, and a file format of its own.
//!
//! Written by hand because the crate it replaces could not reach the speed the index needs. With
//! hnsw_rs (0.3.5) and an AVX-512 `dot`, half of a query's time on the clustered 100k set was its
//! own bookkeeping (a hash set of visited points, `Arc`-counted points behind `RwLock`ed neighbour
//! lists), so it answered 655 queries/s at recall 0.976 against hnswlib's 2,618 at 0.957, and built
//! in 92 s against 24 s: with a free distance it would still have been 2x short.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::vector::dot;

/// Levels above 0 a point may get; the chance of reaching it is `m^-16`.
pub(crate) const MAX_LEVEL: usize = 16;

/// File names of a graph dump, `<basename>.<ext>`: the level-0 lists, and the header with
/// levels and upper-level lists.
const LINKS_EXT: &str = "links0";
const UPPER_EXT: &str = "upper";
const LINKS_MAGIC: &[u8; 8] = b"TRHNSWL0";
const UPPER_MAGIC: &[u8; 8] = b"TRHNSWUP";
const FORMAT_VERSION: u32 = 1;

/// A point and its distance (`1 - cosine`) to the point being searched for.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Near {
    dist: f32,
    id: u32,
}

impl Eq for Near {}

impl Ord for Near {
    fn cmp(&self, other: &Self) -> Ordering {
        self.dist
            .total_cmp(&other.dist)
            .then(self.id.cmp(&other.id))
    }
}

impl PartialOrd for Near {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// What one search needs besides the graph, kept between searches so a query allocates nothing.
struct Scratch {
    /// `tags[i] == tag`: point `i` was visited by the current search.
    tags: Vec<u16>,
    tag: u16,
    neighbours: Vec<u32>,
    fresh: Vec<u32>,
    /// The query padded with zeros to the f16 rows' length.
    padded: Vec<f32>,
    candidates: BinaryHeap<Reverse<Near>>,
    results: BinaryHeap<Near>,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            tags: Vec::new(),
            tag: 0,
            neighbours: Vec::new(),
            fresh: Vec::new(),
            padded: Vec::new(),
            candidates: BinaryHeap::new(),
            results: BinaryHeap::new(),
        }
    }

    /// Starts a search over `n` points: nothing visited.
    fn begin(&mut self, n: usize) {
        if self.tags.len() < n {
            self.tags.resize(n, 0);
        }
        self.tag = self.tag.wrapping_add(1);
        if self.tag == 0 {
            self.tags.fill(0);
            self.tag = 1;
        }
        self.candidates.clear();
        self.results.clear();
    }

    /// Marks `id` visited; false if it already was.
    #[inline]
    fn visit(&mut self, id: u32) -> bool {
        let t = &mut self.tags[id as usize];
        if *t == self.tag {
            return false;
        }
        *t = self.tag;
        true
    }
}

/// Cache lines of a vector asked for ahead of its distance.
const PREFETCH_LINES: usize = 2;

/// Asks the memory system for the first lines of `v` ahead of use (a vector of 384 f32 is 24
/// cache lines at a random place).
#[inline]
fn prefetch<T>(v: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = v.as_ptr().cast::<i8>();
        for line in (0..std::mem::size_of_val(v))
            .step_by(64)
            .take(PREFETCH_LINES)
        {
            // SAFETY: a prefetch is only a hint and never faults; the address lies inside `v`.
            unsafe { _mm_prefetch(p.add(line), _MM_HINT_T0) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// Whether queries walk the graph on f16 copies of the vectors: where AVX-512 F converts them
/// in one instruction per 16 values.
fn walks_on_f16() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `q . h` for an f32 `q` and f16 `h` of one length, a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dot_f16_avx512(q: &[f32], h: &[u16]) -> f32 {
    use core::arch::x86_64::*;
    let n = q.len().min(h.len()) / 16 * 16;
    let (pq, ph) = (q.as_ptr(), h.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (every load): offsets stay below `n`, inside both slices.
    let step = |i: usize, acc: __m512| unsafe {
        let x = _mm512_cvtph_ps(_mm256_loadu_si256(ph.add(i).cast()));
        _mm512_fmadd_ps(_mm512_loadu_ps(pq.add(i)), x, acc)
    };
    while i + 64 <= n {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = step(i + 16 * j, *a);
        }
        i += 64;
    }
    while i < n {
        acc[0] = step(i, acc[0]);
        i += 16;
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(sum)
}

/// The level a point gets: `floor(-ln(u) / ln(m))` for a uniform `u` drawn from the point's
/// number, so a graph's shape does not depend on insertion order or threads.
fn draw_level(id: usize, m: usize) -> usize {
    // splitmix64 of the point number.
    let mut z = (id as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // Uniform in (0, 1].
    let u = ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let level = -u.ln() / (m.max(2) as f64).ln();
    (level as usize).min(MAX_LEVEL)
}

/// One level's search: what to look for and how.
#[derive(Clone, Copy)]
struct LayerSearch<'a> {
    /// The normalised vector searched for.
    q: &'a [f32],
    /// Candidate list size.
    ef: usize,
    level: usize,
    /// Per-point locks while inserting (lists change under the search); none for queries.
    locks: Option<&'a [Mutex<()>]>,
    /// The point being inserted: neither walked nor returned.
    skip: Option<u32>,
    /// Points marked here (or lying beyond it) are walked through but never returned.
    dead: Option<&'a [bool]>,
}

/// An HNSW graph over unit vectors, distance `1 - dot`.
pub(crate) struct Graph {
    dim: usize,
    /// Links per point on levels above 0; level 0 keeps up to `2 m`.
    m: usize,
    ef_construction: usize,
    /// Point `i` is `vectors[i * dim..(i + 1) * dim]`.
    vectors: Vec<f32>,
    /// With AVX-512: the vectors again as f16, each padded with zeros to `half_stride`
    /// components. Queries walk the graph on these (half the bytes per distance: a search is
    /// bound by fetching vectors) and score their final candidates on `vectors`.
    half: Vec<u16>,
    /// Components per row of `half`; 0 when queries walk on `vectors`.
    half_stride: usize,
    levels: Vec<u8>,
    /// Level-0 lists, `1 + 2 m` slots per point: the count, then the ids. Atomics so that the
    /// parallel insert can read and write through `&self`; relaxed loads cost what plain ones do.
    links0: Vec<AtomicU32>,
    /// Where each point's level-1 list starts in `upper` (its level-`l` list is `l - 1` lists
    /// further); unused for points of level 0.
    upper_start: Vec<usize>,
    /// Lists of levels above 0, `1 + m` slots each.
    upper: Vec<AtomicU32>,
    entry: u32,
    max_level: usize,
    /// Search scratch, reused across queries (one per concurrent query).
    scratch: Mutex<Vec<Scratch>>,
}

impl Graph {
    /// An empty graph.
    pub(crate) fn new(dim: usize, m: usize, ef_construction: usize) -> Self {
        Graph {
            dim,
            m,
            ef_construction,
            vectors: Vec::new(),
            half: Vec::new(),
            half_stride: if walks_on_f16() {
                dim.next_multiple_of(16)
            } else {
                0
            },
            levels: Vec::new(),
            links0: Vec::new(),
            upper_start: Vec::new(),
            upper: Vec::new(),
            entry: 0,
            max_level: 0,
            scratch: Mutex::new(Vec::new()),
        }
    }

    /// Appends the f16 rows of `flat` (normalised vectors) to `half`, when queries walk on it.
    fn extend_half(&mut self, flat: &[f32]) {
        if self.half_stride == 0 {
            return;
        }
        for v in flat.chunks_exact(self.dim) {
            self.half
                .extend(v.iter().map(|&x| half::f16::from_f32(x).to_bits()));
            self.half
                .extend(std::iter::repeat_n(0, self.half_stride - self.dim));
        }
    }

    /// Number of points.
    pub(crate) fn len(&self) -> usize {
        self.levels.len()
    }

    fn stride0(&self) -> usize {
        1 + 2 * self.m
    }

    fn stride_upper(&self) -> usize {
        1 + self.m
    }

    /// Most links a point keeps on `level`.
    fn cap(&self, level: usize) -> usize {
        if level == 0 {
            2 * self.m
        } else {
            self.m
        }
    }

    #[inline]
    fn vector(&self, id: u32) -> &[f32] {
        let at = id as usize * self.dim;
        &self.vectors[at..at + self.dim]
    }

    #[inline]
    fn dist(&self, q: &[f32], id: u32) -> f32 {
        1.0 - dot(q, self.vector(id))
    }

    /// The count-and-ids slots of `id`'s list on `level` (which must be at most its level).
    #[inline]
    fn list(&self, id: u32, level: usize) -> &[AtomicU32] {
        if level == 0 {
            let s = self.stride0();
            &self.links0[id as usize * s..(id as usize + 1) * s]
        } else {
            let s = self.stride_upper();
            let at = self.upper_start[id as usize] + (level - 1) * s;
            &self.upper[at..at + s]
        }
    }

    /// Copies `id`'s neighbours on `level` into `out`.
    #[inline]
    fn neighbours(&self, id: u32, level: usize, out: &mut Vec<u32>) {
        let list = self.list(id, level);
        let n = (list[0].load(Relaxed) as usize).min(list.len() - 1);
        out.clear();
        out.extend(list[1..=n].iter().map(|a| a.load(Relaxed)));
    }

    fn set_neighbours(&self, id: u32, level: usize, ids: impl ExactSizeIterator<Item = u32>) {
        let list = self.list(id, level);
        let n = ids.len().min(list.len() - 1);
        for (slot, v) in list[1..].iter().zip(ids) {
            slot.store(v, Relaxed);
        }
        list[0].store(n as u32, Relaxed);
    }

    /// Appends already normalised vectors (`dim` components each) as points `len()..` and links
    /// them in: in parallel for large batches (an empty graph takes its first point alone).
    pub(crate) fn insert(&mut self, flat: &[f32]) {
        let first = self.len();
        let added = flat.len() / self.dim;
        if added == 0 {
            return;
        }
        self.vectors.extend_from_slice(&flat[..added * self.dim]);
        self.extend_half(&flat[..added * self.dim]);
        let s0 = self.stride0();
        let su = self.stride_upper();
        self.links0
            .extend((0..added * s0).map(|_| AtomicU32::new(0)));
        for id in first..first + added {
            let level = draw_level(id, self.m);
            self.levels.push(level as u8);
            self.upper_start.push(self.upper.len());
            self.upper
                .extend((0..level * su).map(|_| AtomicU32::new(0)));
        }
        let mut next = first;
        if first == 0 {
            self.entry = 0;
            self.max_level = self.levels[0] as usize;
            next = 1;
        }
        let entry = Mutex::new((self.entry, self.max_level));
        let locks: Vec<Mutex<()>> = (0..self.len()).map(|_| Mutex::new(())).collect();
        let this = &*self;
        let insert = |scratch: &mut Scratch, id: usize| {
            this.link_in(id as u32, scratch, &locks, &entry);
        };
        // Parallel insertion gains nothing for a handful of points, and serial is reproducible.
        if first + added - next < 64 {
            let mut scratch = Scratch::new();
            (next..first + added).for_each(|id| insert(&mut scratch, id));
        } else {
            (next..first + added)
                .into_par_iter()
                .for_each_init(Scratch::new, insert);
        }
        let (e, l) = entry.into_inner().unwrap_or_else(|p| p.into_inner());
        self.entry = e;
        self.max_level = l;
        self.relink_unreachable();
    }

    /// Links every point that a walk of level 0 from the entry cannot reach, so that no point
    /// is lost to searches. Two points inserted at once can miss each other, and a neighbour's
    /// pruning may then drop one as "reachable through the other", a link that does not exist:
    /// on 20,000 random 384-dimensional vectors, 2 points ended with no link to them in a
    /// parallel build (none in a serial one), and points linked only from one another were seen
    /// too. Each unreachable point is linked from the nearest point a search finds that has
    /// room (else that point gives up its farthest link to a point others also link). One walk
    /// of the lists, plus a search per unreachable point.
    fn relink_unreachable(&mut self) {
        let n = self.len();
        if n < 2 {
            return;
        }
        let mut incoming = vec![0u32; n];
        let mut buf = Vec::new();
        for id in 0..n as u32 {
            self.neighbours(id, 0, &mut buf);
            for &t in &buf {
                incoming[t as usize] += 1;
            }
        }
        let mut reached = vec![false; n];
        let mut stack = Vec::new();
        self.mark_reachable(self.entry, &mut reached, &mut stack, &mut buf);
        let cap = self.cap(0);
        let mut list = Vec::new();
        for p in 0..n as u32 {
            if reached[p as usize] {
                continue;
            }
            // The search walks only reachable points, so whatever it returns can link `p` in.
            let v = self.vector(p).to_vec();
            let near: Vec<u32> = self
                .search(&v, 8, self.ef_construction, None)
                .into_iter()
                .map(|(t, _)| t as u32)
                .filter(|&t| t != p)
                .collect();
            let with_room = near.iter().copied().find(|&t| {
                self.neighbours(t, 0, &mut list);
                list.len() < cap
            });
            let linked = if let Some(t) = with_room {
                self.neighbours(t, 0, &mut list);
                list.push(p);
                self.set_neighbours(t, 0, list.iter().copied());
                true
            } else if let Some(&t) = near.first() {
                self.neighbours(t, 0, &mut list);
                let base = self.vector(t);
                let farthest = list
                    .iter()
                    .enumerate()
                    .filter(|(_, &f)| incoming[f as usize] > 1)
                    .max_by(|a, b| self.dist(base, *a.1).total_cmp(&self.dist(base, *b.1)))
                    .map(|(i, _)| i);
                if let Some(i) = farthest {
                    incoming[list[i] as usize] -= 1;
                    list[i] = p;
                    self.set_neighbours(t, 0, list.iter().copied());
                }
                farthest.is_some()
            } else {
                false
            };
            if linked {
                incoming[p as usize] += 1;
                self.mark_reachable(p, &mut reached, &mut stack, &mut buf);
            }
        }
    }

    /// Marks in `reached` every point a walk of level 0 reaches from `from`.
    fn mark_reachable(
        &self,
        from: u32,
        reached: &mut [bool],
        stack: &mut Vec<u32>,
        buf: &mut Vec<u32>,
    ) {
        if std::mem::replace(&mut reached[from as usize], true) {
            return;
        }
        stack.push(from);
        while let Some(id) = stack.pop() {
            self.neighbours(id, 0, buf);
            for &t in buf.iter() {
                if !std::mem::replace(&mut reached[t as usize], true) {
                    stack.push(t);
                }
            }
        }
    }

    /// Links point `p` (already in the arrays) into the graph: hnswlib's `addPoint`.
    fn link_in(
        &self,
        p: u32,
        scratch: &mut Scratch,
        locks: &[Mutex<()>],
        entry: &Mutex<(u32, usize)>,
    ) {
        let level = self.levels[p as usize] as usize;
        let guard = entry.lock().unwrap_or_else(|e| e.into_inner());
        let (ep, top) = *guard;
        // A point above the current top holds the entry lock until it becomes the entry, so no
        // other insert starts from an entry that is about to be outranked.
        let _held = if level > top {
            Some(guard)
        } else {
            drop(guard);
            None
        };
        let q = self.vector(p);
        let mut cur = Near {
            dist: self.dist(q, ep),
            id: ep,
        };
        for l in (level + 1..=top).rev() {
            cur = self.greedy(q, cur, l, &mut scratch.neighbours, Some(locks));
        }
        let mut entries = vec![cur];
        let mut found = Vec::new();
        for l in (0..=level.min(top)).rev() {
            let search = LayerSearch {
                q,
                ef: self.ef_construction,
                level: l,
                locks: Some(locks),
                skip: Some(p),
                dead: None,
            };
            self.search_layer(&search, &entries, scratch, false);
            found.clear();
            found.extend(scratch.results.drain());
            found.sort_unstable();
            let chosen = self.select(&found, self.m);
            self.set_own_links(p, l, &chosen, locks, &mut scratch.neighbours);
            for n in &chosen {
                self.add_link(n.id, p, n.dist, l, locks, &mut scratch.neighbours);
            }
            // The next level's search starts from everything this one found: a single start
            // could be a point still being inserted, whose lower list is empty so far.
            std::mem::swap(&mut entries, &mut found);
        }
        if let Some(mut held) = _held {
            *held = (p, level);
        }
    }

    /// Writes `p`'s own list on `level`: `chosen`, merged with links other inserts gave `p`
    /// meanwhile (they can find it on this level through a level above, where it is already
    /// linked), pruned by the heuristic when together they pass the cap. Overwriting those
    /// links would leave their points unreachable.
    fn set_own_links(
        &self,
        p: u32,
        level: usize,
        chosen: &[Near],
        locks: &[Mutex<()>],
        buf: &mut Vec<u32>,
    ) {
        let _lock = locks[p as usize].lock().unwrap_or_else(|e| e.into_inner());
        self.neighbours(p, level, buf);
        if buf.is_empty() {
            self.set_neighbours(p, level, chosen.iter().map(|n| n.id));
            return;
        }
        let others = buf
            .iter()
            .copied()
            .filter(|&id| chosen.iter().all(|n| n.id != id));
        let mut all = self.by_distance(p, others);
        all.extend_from_slice(chosen);
        all.sort_unstable();
        let kept = self.select(&all, self.cap(level));
        self.set_neighbours(p, level, kept.iter().map(|n| n.id));
    }

    /// Gives `to` a link to `from` on `level` (`dist` apart), pruning `to`'s list by the
    /// heuristic when it is full.
    fn add_link(
        &self,
        to: u32,
        from: u32,
        dist: f32,
        level: usize,
        locks: &[Mutex<()>],
        buf: &mut Vec<u32>,
    ) {
        let _lock = locks[to as usize].lock().unwrap_or_else(|e| e.into_inner());
        self.neighbours(to, level, buf);
        if buf.contains(&from) {
            return;
        }
        let cap = self.cap(level);
        if buf.len() < cap {
            buf.push(from);
            self.set_neighbours(to, level, buf.iter().copied());
            return;
        }
        let mut candidates = self.by_distance(to, buf.iter().copied());
        let at = candidates.partition_point(|n| n.dist < dist);
        candidates.insert(at, Near { dist, id: from });
        let kept = self.select(&candidates, cap);
        self.set_neighbours(to, level, kept.iter().map(|n| n.id));
    }

    /// `ids` with their distances to point `base`, nearest first.
    fn by_distance(&self, base: u32, ids: impl Iterator<Item = u32>) -> Vec<Near> {
        let v = self.vector(base);
        let mut out: Vec<Near> = ids
            .map(|id| Near {
                dist: self.dist(v, id),
                id,
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// hnswlib's neighbour heuristic: walking `sorted` (nearest first), keeps a candidate only if
    /// it is nearer to the base point than to every candidate kept so far, up to `m`.
    fn select(&self, sorted: &[Near], m: usize) -> Vec<Near> {
        if sorted.len() <= m {
            return sorted.to_vec();
        }
        let mut kept: Vec<Near> = Vec::with_capacity(m);
        for c in sorted {
            if kept.len() >= m {
                break;
            }
            let v = self.vector(c.id);
            if kept.iter().all(|k| self.dist(v, k.id) >= c.dist) {
                kept.push(*c);
            }
        }
        kept
    }

    /// Moves from `cur` to ever nearer neighbours on `level` until none is nearer.
    fn greedy(
        &self,
        q: &[f32],
        mut cur: Near,
        level: usize,
        buf: &mut Vec<u32>,
        locks: Option<&[Mutex<()>]>,
    ) -> Near {
        loop {
            match locks {
                Some(locks) => {
                    let _lock = locks[cur.id as usize]
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    self.neighbours(cur.id, level, buf);
                }
                None => self.neighbours(cur.id, level, buf),
            }
            let mut moved = false;
            for &id in buf.iter() {
                let d = self.dist(q, id);
                if d < cur.dist {
                    cur = Near { dist: d, id };
                    moved = true;
                }
            }
            if !moved {
                return cur;
            }
        }
    }

    /// The best-first search of one level (hnswlib's `searchBaseLayer`): leaves the up to `ef`
    /// nearest points found in `scratch.results`. `on_f16`: distances from the f16 rows to
    /// `scratch.padded` (the query padded to `half_stride`), for queries where those exist.
    fn search_layer(
        &self,
        s: &LayerSearch<'_>,
        entries: &[Near],
        scratch: &mut Scratch,
        on_f16: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 F (checked just above).
            return unsafe { self.search_layer_avx512(s, entries, scratch, on_f16) };
        }
        let _ = on_f16;
        let dist = |id: u32| 1.0 - dot(s.q, self.vector(id));
        let fetch = |id: u32| prefetch(self.vector(id));
        self.search_layer_with(dist, fetch, s, entries, scratch);
    }

    /// [`Graph::search_layer`] compiled for AVX-512, so that the distance inlines into the loop
    /// (a `target_feature` function cannot inline into one without it).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn search_layer_avx512(
        &self,
        s: &LayerSearch<'_>,
        entries: &[Near],
        scratch: &mut Scratch,
        on_f16: bool,
    ) {
        if on_f16 && self.half_stride > 0 {
            let padded = std::mem::take(&mut scratch.padded);
            let w = self.half_stride;
            let row = |id: u32| &self.half[id as usize * w..(id as usize + 1) * w];
            // SAFETY: this function only runs where the CPU has AVX-512 F.
            let dist = |id: u32| 1.0 - unsafe { dot_f16_avx512(&padded, row(id)) };
            let fetch = |id: u32| prefetch(row(id));
            self.search_layer_with(dist, fetch, s, entries, scratch);
            scratch.padded = padded;
        } else {
            // SAFETY: as above.
            let dist = |id: u32| 1.0 - unsafe { crate::vector::dot_avx512(s.q, self.vector(id)) };
            let fetch = |id: u32| prefetch(self.vector(id));
            self.search_layer_with(dist, fetch, s, entries, scratch);
        }
    }

    #[inline(always)]
    fn search_layer_with(
        &self,
        dist: impl Fn(u32) -> f32,
        fetch: impl Fn(u32),
        s: &LayerSearch<'_>,
        entries: &[Near],
        scratch: &mut Scratch,
    ) {
        let LayerSearch {
            q: _,
            ef,
            level,
            locks,
            skip,
            dead,
        } = *s;
        let live = |id: u32| dead.is_none_or(|d| !d.get(id as usize).copied().unwrap_or(true));
        scratch.begin(self.len());
        if let Some(s) = skip {
            scratch.visit(s);
        }
        for &e in entries {
            if scratch.visit(e.id) {
                scratch.candidates.push(Reverse(e));
                if live(e.id) {
                    scratch.results.push(e);
                    if scratch.results.len() > ef {
                        scratch.results.pop();
                    }
                }
            }
        }
        let mut bound = scratch.results.peek().map_or(f32::INFINITY, |n| n.dist);
        while let Some(Reverse(c)) = scratch.candidates.pop() {
            // With a filter the search goes on until it holds `ef` live points.
            if c.dist > bound && (scratch.results.len() >= ef || dead.is_none()) {
                break;
            }
            match locks {
                Some(locks) => {
                    let _lock = locks[c.id as usize]
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    self.neighbours(c.id, level, &mut scratch.neighbours);
                }
                None => self.neighbours(c.id, level, &mut scratch.neighbours),
            }
            // Mark and prefetch every unvisited neighbour before computing any distance, so
            // their vectors arrive while the first distances run.
            scratch.fresh.clear();
            for i in 0..scratch.neighbours.len() {
                let id = scratch.neighbours[i];
                if scratch.visit(id) {
                    fetch(id);
                    scratch.fresh.push(id);
                }
            }
            for i in 0..scratch.fresh.len() {
                let id = scratch.fresh[i];
                let dist = dist(id);
                if scratch.results.len() < ef || dist < bound {
                    let n = Near { dist, id };
                    scratch.candidates.push(Reverse(n));
                    if live(id) {
                        scratch.results.push(n);
                        if scratch.results.len() > ef {
                            scratch.results.pop();
                        }
                    }
                    if let Some(worst) = scratch.results.peek() {
                        bound = worst.dist;
                    }
                }
            }
        }
    }

    /// The `k` nearest live points to the normalised `q` as `(point, 1 - distance)`, nearest
    /// first, searching level 0 with a candidate list of `max(ef, k)`.
    pub(crate) fn search(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        dead: Option<&[bool]>,
    ) -> Vec<(usize, f32)> {
        if k == 0 || self.len() == 0 {
            return Vec::new();
        }
        let mut scratch = self
            .scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_else(Scratch::new);
        let mut cur = Near {
            dist: self.dist(q, self.entry),
            id: self.entry,
        };
        for l in (1..=self.max_level).rev() {
            cur = self.greedy(q, cur, l, &mut scratch.neighbours, None);
        }
        let search = LayerSearch {
            q,
            ef: ef.max(k),
            level: 0,
            locks: None,
            skip: None,
            dead,
        };
        let on_f16 = self.half_stride > 0;
        if on_f16 {
            scratch.padded.clear();
            scratch.padded.extend_from_slice(q);
            scratch.padded.resize(self.half_stride, 0.0);
        }
        self.search_layer(&search, &[cur], &mut scratch, on_f16);
        let mut found: Vec<Near> = scratch.results.drain().collect();
        if on_f16 {
            // The walk ranked by f16 distances; the answer is ranked and scored exactly.
            for n in &mut found {
                n.dist = self.dist(q, n.id);
            }
        }
        found.sort_unstable();
        found.truncate(k);
        self.scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(scratch);
        found
            .into_iter()
            .map(|n| (n.id as usize, 1.0 - n.dist))
            .collect()
    }

    /// The two files of a dump named `basename` in `dir`.
    pub(crate) fn paths(dir: &Path, basename: &str) -> (PathBuf, PathBuf) {
        (
            dir.join(format!("{basename}.{LINKS_EXT}")),
            dir.join(format!("{basename}.{UPPER_EXT}")),
        )
    }

    /// Writes the graph's links (not its vectors, which the index stores itself) as the two
    /// files of [`Graph::paths`]. Files already there are replaced, never written through: they
    /// may be hard links shared with an older generation.
    pub(crate) fn dump(&self, dir: &Path, basename: &str) -> std::io::Result<()> {
        let (links_path, upper_path) = Self::paths(dir, basename);
        let u32s = |w: &mut BufWriter<File>, v: &[AtomicU32]| -> std::io::Result<()> {
            for a in v {
                w.write_all(&a.load(Relaxed).to_le_bytes())?;
            }
            Ok(())
        };
        let create = |path: &Path| -> std::io::Result<BufWriter<File>> {
            match fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            Ok(BufWriter::with_capacity(1 << 20, File::create(path)?))
        };
        let mut w = create(&links_path)?;
        w.write_all(LINKS_MAGIC)?;
        w.write_all(&(self.len() as u64).to_le_bytes())?;
        w.write_all(&(self.stride0() as u32).to_le_bytes())?;
        u32s(&mut w, &self.links0)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;

        let mut w = create(&upper_path)?;
        w.write_all(UPPER_MAGIC)?;
        for v in [
            FORMAT_VERSION,
            self.dim as u32,
            self.m as u32,
            self.entry,
            self.max_level as u32,
        ] {
            w.write_all(&v.to_le_bytes())?;
        }
        w.write_all(&(self.len() as u64).to_le_bytes())?;
        w.write_all(&self.levels)?;
        w.write_all(&(self.upper.len() as u64).to_le_bytes())?;
        u32s(&mut w, &self.upper)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    }

    /// Reads a dump written by [`Graph::dump`] for exactly the points `vectors` (already
    /// normalised, `dim` components each, `m` as the graph was built with), checking every
    /// count, id and level, so that a search can never leave the arrays. `Err` says what is
    /// wrong; the caller rebuilds the graph then.
    pub(crate) fn load(
        dir: &Path,
        basename: &str,
        vectors: &[f32],
        dim: usize,
        m: usize,
        ef_construction: usize,
    ) -> Result<Self, String> {
        let (links_path, upper_path) = Self::paths(dir, basename);
        let read = |p: &Path| fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let links = read(&links_path)?;
        let upper = read(&upper_path)?;
        let n = vectors.len() / dim.max(1);
        let mut g = Graph::new(dim, m, ef_construction);

        let mut r = Reader::new(&upper, &upper_path);
        r.magic(UPPER_MAGIC)?;
        let header = [r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?];
        let [version, file_dim, file_m, entry, max_level] = header;
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version}, this build reads {FORMAT_VERSION}"
            ));
        }
        if (file_dim as usize, file_m as usize) != (dim, m) {
            return Err(format!(
                "written for dimension {file_dim} and m {file_m}, the index has {dim} and {m}"
            ));
        }
        let count = r.u64()? as usize;
        if count != n {
            return Err(format!("{count} points, the index has {n} vectors"));
        }
        g.levels = r.bytes(n)?.to_vec();
        let upper_len = r.u64()? as usize;
        let su = g.stride_upper();
        let mut at = 0usize;
        for &l in &g.levels {
            if l as usize > MAX_LEVEL {
                return Err(format!("a point of level {l}, above {MAX_LEVEL}"));
            }
            g.upper_start.push(at);
            at += l as usize * su;
        }
        if at != upper_len {
            return Err(format!(
                "{upper_len} upper-level slots, the levels need {at}"
            ));
        }
        g.upper = r.u32s(upper_len)?;
        r.end()?;

        let mut r = Reader::new(&links, &links_path);
        r.magic(LINKS_MAGIC)?;
        let (count, stride) = (r.u64()? as usize, r.u32()? as usize);
        if count != n || stride != g.stride0() {
            return Err(format!(
                "{count} points of {stride} slots, expected {n} of {}",
                g.stride0()
            ));
        }
        g.links0 = r.u32s(n * stride)?;
        r.end()?;

        if n > 0 && (entry as usize >= n || g.levels[entry as usize] as u32 != max_level) {
            return Err(format!(
                "entry point {entry} is not a point of the top level {max_level}"
            ));
        }
        g.entry = entry;
        g.max_level = max_level as usize;
        for id in 0..n as u32 {
            for l in 0..=g.levels[id as usize] as usize {
                let list = g.list(id, l);
                let c = list[0].load(Relaxed) as usize;
                if c > list.len() - 1 {
                    return Err(format!("point {id} has {c} links on level {l}"));
                }
                for a in &list[1..=c] {
                    let to = a.load(Relaxed) as usize;
                    if to >= n || (g.levels[to] as usize) < l {
                        return Err(format!("point {id} links to {to} on level {l}"));
                    }
                }
            }
        }
        g.vectors = vectors[..n * dim].to_vec();
        g.extend_half(&vectors[..n * dim]);
        Ok(g)
    }
}

/// Little-endian fields read off a byte slice, naming the file in errors.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], path: &'a Path) -> Self {
        Reader { bytes, at: 0, path }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("{} is truncated", self.path.display()))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn magic(&mut self, want: &[u8; 8]) -> Result<(), String> {
        if self.bytes(8)? != want {
            return Err(format!(
                "{} is not a thinkrag graph file",
                self.path.display()
            ));
        }
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn u32s(&mut self, n: usize) -> Result<Vec<AtomicU32>, String> {
        let len = n
            .checked_mul(4)
            .ok_or_else(|| format!("{} is truncated", self.path.display()))?;
        Ok(self
            .bytes(len)?
            .chunks_exact(4)
            .map(|b| AtomicU32::new(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect())
    }

    fn end(&self) -> Result<(), String> {
        if self.at != self.bytes.len() {
            return Err(format!(
                "{} has {} bytes after its end",
                self.path.display(),
                self.bytes.len() - self.at
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut out = Vec::with_capacity(n * dim);
        for _ in 0..n {
            let v: Vec<f32> = (0..dim)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
                })
                .collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            out.extend(v.iter().map(|x| x / norm));
        }
        out
    }

    /// Every list respects its cap, links only to points of at least its level, never to itself.
    #[test]
    fn lists_are_well_formed_after_a_parallel_insert() {
        let (n, dim) = (3000, 16);
        let mut g = Graph::new(dim, 8, 64);
        let v = unit(n, dim, 1);
        g.insert(&v[..dim * 10]);
        g.insert(&v[dim * 10..]);
        assert_eq!(g.len(), n);
        let mut buf = Vec::new();
        for id in 0..n as u32 {
            for l in 0..=g.levels[id as usize] as usize {
                g.neighbours(id, l, &mut buf);
                assert!(buf.len() <= g.cap(l));
                assert!(
                    l > 0 || !buf.is_empty() || n == 1,
                    "point {id} has no links"
                );
                for &to in &buf {
                    assert_ne!(to, id);
                    assert!(g.levels[to as usize] as usize >= l);
                }
            }
        }
        assert_eq!(g.levels[g.entry as usize] as usize, g.max_level);
        assert_eq!(
            g.max_level,
            *g.levels.iter().max().unwrap() as usize,
            "the entry is on the top level"
        );
    }

    /// Parallel builds (whose order varies from run to run) leave no point unreachable: a walk
    /// of level 0 from the entry reaches every point, and all but at most 2 of 500 are found
    /// first by their own vectors.
    /// Inserts racing on a point that was still being linked used to overwrite links to it,
    /// orphaning about one point in 500 in half the builds; under the load of the whole test
    /// suite, a point linked only from points that were themselves cut off was seen too.
    #[test]
    fn every_point_stays_reachable_after_parallel_builds() {
        let (n, dim) = (500, 32);
        for round in 0..12 {
            let v = unit(n, dim, 70 + round);
            let mut g = Graph::new(dim, 16, 100);
            g.insert(&v);
            let (mut reached, mut stack, mut buf) = (vec![false; n], Vec::new(), Vec::new());
            g.mark_reachable(g.entry, &mut reached, &mut stack, &mut buf);
            let cut_off: Vec<usize> = (0..n).filter(|&i| !reached[i]).collect();
            assert!(
                cut_off.is_empty(),
                "round {round}: level 0 does not reach {cut_off:?}"
            );
            // Reachable is not always found: when the load on the machine interleaves the
            // inserts more, a point now and then sits where a search at ef 64 does not get to
            // it (seen: 1 or 2 of 500 in about one build in eight with three builds at once on
            // 2 cores; a broken graph misses dozens).
            let lost: Vec<usize> = (0..n)
                .filter(|&i| g.search(&v[i * dim..(i + 1) * dim], 1, 64, None)[0].0 != i)
                .collect();
            assert!(
                lost.len() <= 2,
                "round {round}: points not found first: {lost:?}"
            );
        }
    }

    /// A dump reloads to the same answers; a truncated or foreign file is refused with a reason.
    #[test]
    fn a_dump_reloads_and_damage_is_refused() {
        let (n, dim) = (2000, 24);
        let v = unit(n, dim, 2);
        let mut g = Graph::new(dim, 6, 40);
        g.insert(&v);
        let dir = tempfile::tempdir().unwrap();
        g.dump(dir.path(), "g").unwrap();
        let h = Graph::load(dir.path(), "g", &v, dim, 6, 40).unwrap();
        for q in v.chunks_exact(dim).step_by(97) {
            assert_eq!(g.search(q, 5, 32, None), h.search(q, 5, 32, None));
        }
        let wrong_m = Graph::load(dir.path(), "g", &v, dim, 8, 40).err().unwrap();
        assert!(wrong_m.contains("m 6"), "{wrong_m}");
        let fewer = Graph::load(dir.path(), "g", &v[..dim * 10], dim, 6, 40)
            .err()
            .unwrap();
        assert!(fewer.contains("2000 points"), "{fewer}");
        let (links, upper) = Graph::paths(dir.path(), "g");
        let bytes = fs::read(&links).unwrap();
        fs::write(&links, &bytes[..bytes.len() - 3]).unwrap();
        let cut = Graph::load(dir.path(), "g", &v, dim, 6, 40).err().unwrap();
        assert!(cut.contains("truncated"), "{cut}");
        // A link pointing past the last point.
        let mut bad = bytes.clone();
        let first_link = 8 + 8 + 4 + 4;
        bad[first_link..first_link + 4].copy_from_slice(&(n as u32 + 5).to_le_bytes());
        fs::write(&links, &bad).unwrap();
        let out = Graph::load(dir.path(), "g", &v, dim, 6, 40).err().unwrap();
        assert!(out.contains("links to"), "{out}");
        fs::write(&upper, b"something else entirely").unwrap();
        let foreign = Graph::load(dir.path(), "g", &v, dim, 6, 40).err().unwrap();
        assert!(foreign.contains("not a thinkrag graph"), "{foreign}");
    }

    /// Dead points are walked through but never returned, and `k` live ones still come back.
    #[test]
    fn dead_points_are_never_returned() {
        let (n, dim) = (1500, 12);
        let v = unit(n, dim, 3);
        let mut g = Graph::new(dim, 8, 64);
        g.insert(&v);
        let dead: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
        for q in v.chunks_exact(dim).step_by(50) {
            let hits = g.search(q, 10, 50, Some(&dead));
            assert_eq!(hits.len(), 10);
            assert!(hits.iter().all(|(id, _)| !dead[*id]));
        }
    }
}
