//! Q4_K, Q6_K and Q8_0 weight products on x86 CPUs with AVX-512 VNNI or AVX2, for every row count
//! (a decode step of one sequence, a batched step of several, a prefill chunk), over weights
//! re-laid in tiles of 16 weight rows by 256 values.
//!
//! Written by hand because no library has what a batched decode step needs here: candle 0.11's
//! tiled kernels (`repack_x86`, crate-private) store each tile with f32 scales and 8-bit Q6_K
//! values (1.33x and 1.52x the GGUF bytes, read on every step), quantize Q8_0 products' activations
//! with one scale per 256 values (ggml uses one per 32) and issue no prefetches, so with four
//! sequences the weight stream stalls while the tile is multiplied: four rows cost 2.6-2.8x one.
//! These tiles keep the GGUF's sizes (Q4_K: the same 2,304 bytes per tile, its 6-bit scales and
//! mins packed and its f16 scales kept as f16; Q6_K: 3,392 against 3,360, its f16 scales widened
//! to f32 in what would otherwise be alignment padding; Q8_0: the same 4,352), prefetch the tile
//! after the one being multiplied, spread over its steps, and keep sums in integers as far as
//! they are exact.

use std::mem::MaybeUninit;

use candle_core::quantized::{GgmlDType, QTensor};

use crate::model::linear::OutPtr;
use crate::model::tile_arena::TileVec;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// Weight rows per tile: one `vpdpbusd` multiplies four values of 16 rows.
pub(crate) const TILE_ROWS: usize = 16;
/// Values per K-quant superblock.
const QK: usize = 256;

/// A quantized weight laid out for the kernels below, or `None` where they do not apply (another
/// CPU or format, a shape that does not split into tiles).
pub(crate) struct KTiles {
    n: usize,
    k: usize,
    isa: Isa,
    tiles: Tiles,
}

/// The instruction sets the kernels come in, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F/BW with VNNI and VBMI: `vpdpbusd` on 16 rows at once.
    Avx512Vnni,
    /// AVX2 with FMA and F16C: `vpmaddubsw` and `vpmaddwd` on 8 rows at once.
    Avx2,
}

impl Isa {
    /// Every instruction set, best first.
    pub(crate) const ALL: [Isa; 2] = [Isa::Avx512Vnni, Isa::Avx2];

    /// The best one this CPU runs, if any.
    pub(crate) fn detect() -> Option<Isa> {
        Self::ALL.into_iter().find(|isa| isa.available())
    }

    /// Whether this CPU runs these kernels.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Avx512Vnni => {
                    std::is_x86_feature_detected!("avx512f")
                        && std::is_x86_feature_detected!("avx512bw")
                        && std::is_x86_feature_detected!("avx512vnni")
                        && std::is_x86_feature_detected!("avx512vbmi")
                }
                Isa::Avx2 => {
                    std::is_x86_feature_detected!("avx2")
                        && std::is_x86_feature_detected!("fma")
                        && std::is_x86_feature_detected!("f16c")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }
}

enum Tiles {
    Q4K(TileVec<TileQ4K>),
    Q6K(TileVec<TileQ6K>),
    Q80(TileVec<TileQ80>),
}

impl std::fmt::Debug for KTiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let format = match self.tiles {
            Tiles::Q4K(_) => "q4k",
            Tiles::Q6K(_) => "q6k",
            Tiles::Q80(_) => "q8_0",
        };
        write!(f, "KTiles({format}, {}x{}, {:?})", self.n, self.k, self.isa)
    }
}

/// One Q4_K superblock of 16 weight rows: 2,304 bytes, the GGUF blocks' own size, since a decode
/// step reads every byte of it from memory.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct TileQ4K {
    /// `[k8 group (32)][row (16)][4 bytes]`: byte `j` of a group `g` holds the values
    /// `8g + j` (low nibble) and `8g + j + 4` (high nibble).
    qs: [u8; QK / 2 * TILE_ROWS],
    /// The 6-bit scales and mins of the eight 32-value sub-blocks, packed as
    /// [`ScalesMins::pack`] lays them out.
    scales_mins: [u8; 192],
    /// The superblocks' scales and minimums' scales, f16 bits as the GGUF stores them: half the
    /// bytes of f32, read on every step, for one conversion a tile.
    d: [u16; TILE_ROWS],
    dmin: [u16; TILE_ROWS],
}
const _: () = assert!(std::mem::size_of::<TileQ4K>() == 2304);

/// A Q4_K tile's scales and mins unpacked to bytes, as its kernels take them.
///
/// Unpacked, they are 256 bytes a tile; the tile keeps them in 192 ([`Self::pack`]), which the
/// kernels unpack with a dozen vector instructions a tile: 64 bytes fewer to read from memory
/// for every 2,304, where a decode step waits on memory rather than on arithmetic.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq)]
struct ScalesMins {
    /// `[sub][row]`.
    scales: [[u8; TILE_ROWS]; 8],
    /// `[sub pair][row][2]`: a row's sub-blocks `2p` and `2p + 1` side by side, as `vpdpwssd`
    /// takes them once widened to 16 bits.
    mins: [[u8; 2 * TILE_ROWS]; 4],
}
const _: () = assert!(std::mem::size_of::<ScalesMins>() == 256);

impl ScalesMins {
    /// Packs the 256 six-bit values in 192 bytes, so that 64-byte vectors unpack them: viewing
    /// `scales` as two 64-byte halves `s0`, `s1` and `mins` as `m0`, `m1`, byte `i` of the first
    /// 64 holds the low four bits of `s0[i]` and `s1[i]` (low and high nibble), of the next 64
    /// those of `m0[i]` and `m1[i]`, and of the last 64 the top two bits of `s0[i]`, `s1[i]`,
    /// `m0[i]` and `m1[i]` (bits 0-1, 2-3, 4-5, 6-7).
    fn pack(&self) -> [u8; 192] {
        let s = self.scales.as_flattened();
        let m = self.mins.as_flattened();
        let mut out = [0u8; 192];
        for i in 0..64 {
            let six = [s[i], s[64 + i], m[i], m[64 + i]];
            out[i] = (six[0] & 0x0F) | (six[1] & 0x0F) << 4;
            out[64 + i] = (six[2] & 0x0F) | (six[3] & 0x0F) << 4;
            out[128 + i] = (0..4).fold(0, |b, j| b | (six[j] >> 4 & 3) << (2 * j));
        }
        out
    }

    /// The inverse of [`Self::pack`], one value at a time (the kernels' unpacking is checked
    /// against it).
    #[cfg(test)]
    fn unpack(p: &[u8; 192]) -> Self {
        let mut flat = [0u8; 256];
        for i in 0..64 {
            let (ls, lm, h) = (p[i], p[64 + i], p[128 + i]);
            flat[i] = ls & 0x0F | (h & 3) << 4;
            flat[64 + i] = ls >> 4 | (h >> 2 & 3) << 4;
            flat[128 + i] = lm & 0x0F | (h >> 4 & 3) << 4;
            flat[192 + i] = lm >> 4 | (h >> 6) << 4;
        }
        let mut out = ScalesMins {
            scales: [[0; TILE_ROWS]; 8],
            mins: [[0; 2 * TILE_ROWS]; 4],
        };
        out.scales.as_flattened_mut().copy_from_slice(&flat[..128]);
        out.mins.as_flattened_mut().copy_from_slice(&flat[128..]);
        out
    }
}

/// One Q6_K superblock of 16 weight rows; a value is `(low | high << 4) - 32`.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct TileQ6K {
    /// Low four bits, laid out as [`TileQ4K::qs`].
    ql: [u8; QK / 2 * TILE_ROWS],
    /// High two bits, `[k16 group (16)][row (16)][4 bytes]`: bits `2s..2s+2` of byte `j` of a
    /// group `G` belong to the value `16G + 4s + j`.
    qh: [u8; QK / 4 * TILE_ROWS],
    /// The signed scales of the sixteen 16-value sub-blocks, `[sub][row]`.
    scales: [[i8; TILE_ROWS]; 16],
    d: [f32; TILE_ROWS],
}
const _: () = assert!(std::mem::size_of::<TileQ6K>() == 3392);

/// Eight Q8_0 blocks (256 values) of 16 weight rows, each value stored as `q + 128`: unsigned, as
/// `vpdpbusd` takes its first operand.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct TileQ80 {
    /// `[k4 group (64)][row (16)][4 bytes]`: byte `j` of group `g` holds value `4g + j`.
    qs: [u8; QK * TILE_ROWS],
    /// The blocks' scales, f16 bits as the GGUF stores them, `[block][row]`.
    d: [[u16; TILE_ROWS]; 8],
}
const _: () = assert!(std::mem::size_of::<TileQ80>() == 4352);

/// 256 activations quantized as eight ggml Q8_0 blocks, for Q8_0 weights.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct ActQ80 {
    qs: [i8; QK],
    /// The blocks' scales, rounded to f16 as ggml stores them.
    d: [f32; 8],
    /// `-128` times each block's sum of quants: where the integer sums start, which takes the
    /// weights' `+ 128` back out exactly.
    start: [i32; 8],
}

/// One activation superblock quantized as ggml's Q8_K (by candle, so the numbers are ggml's),
/// with the sums the kernels need as f32.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct ActQ8K {
    qs: [i8; QK],
    d: f32,
    /// Sums of the 32-value sub-blocks' quants (for Q4_K's mins; at most 32 * 128).
    bsum32: [i16; 8],
    /// `-32` times the sums of the 16-value sub-blocks' quants: where Q6_K's integer sums start,
    /// so they come out as sums over the values `q - 32` with no correction afterwards.
    q6k_start: [i32; 16],
}

/// How far ahead of the tile being multiplied the kernels prefetch (in tiles). One tile (2.4-4.3
/// KB) is a few hundred nanoseconds of work, more than memory's latency; prefetches further
/// ahead hold the core's line-fill buffers longer for nothing (the 1.5B's up projection streamed
/// from memory at 0.66-0.74 of the read rate four tiles ahead, 0.76-0.81 one tile ahead). A
/// `prefetcht1` further ahead, into L2 only, is no way around that on AMD before Zen 4, which
/// fills L1 for every hint (`_MM_HINT_T1` streamed no differently, twice measured).
const PREFETCH_TILES: usize = 1;
/// How far ahead the AVX-512 Q6_K kernel also prefetches each line into L2 alone (`prefetcht1`,
/// which Zen 4 and Intel's cores keep out of L1), so that its prefetch one tile ahead finds the
/// line in L2 and holds one of the core's few L1 fill buffers for an L2 hit, not a trip to memory.
/// On a 2-core Zen 4 (`weight_stream`, binaries alternating, 2026-12-03) its three Q6_K shapes
/// streamed 0.93 of the read probe with it against 0.82 without where the probe read under
/// 42 GB/s, and 0.74 against 0.58-0.61 where it read 55-57. The Q4_K kernel leaves it out: its
/// 8960 x 1536 product fell from 1.01 to 0.93 of the probe with it, the others stayed level. So
/// does Q8_0's, which it left level (the 1.5B Q8_0 decode, twelve `thinkrag bench` pairs: 0.87-0.91
/// of the probe with it and 0.79-0.89 without in slow rounds, 0.69-0.79 and 0.75-0.77 in fast
/// ones), and so do the AVX2 kernels: the cores they are chosen for (AMD before Zen 4) fill L1 for
/// every hint, which then only holds those buffers longer.
const L2_PREFETCH_TILES: usize = 8;
/// Activation rows one kernel call multiplies against a tile while it is in L1.
const MAX_ROWS_PER_PASS: usize = 4;

impl KTiles {
    /// Lays `w` out in tiles when this CPU and `w`'s format and shape take these kernels (the
    /// best of them this CPU runs).
    pub(crate) fn new(w: &QTensor) -> Option<Self> {
        Self::with_isa(w, Isa::detect()?)
    }

    /// [`KTiles::new`] for the kernels of `isa`, where this CPU runs them.
    pub(crate) fn with_isa(w: &QTensor, isa: Isa) -> Option<Self> {
        if !isa.available() || !w.device().is_cpu() {
            return None;
        }
        let (n, k) = w.shape().dims2().ok()?;
        if n == 0 || k == 0 || !n.is_multiple_of(TILE_ROWS) || !k.is_multiple_of(QK) {
            return None;
        }
        let data = w.data().ok()?;
        let tiles = match w.dtype() {
            GgmlDType::Q4K => Tiles::Q4K(pack_q4k(&data, n, k)?),
            GgmlDType::Q6K => Tiles::Q6K(pack_q6k(&data, n, k)?),
            GgmlDType::Q8_0 => Tiles::Q80(pack_q80(&data, n, k)?),
            _ => return None,
        };
        Some(Self { n, k, isa, tiles })
    }

    /// The instruction set whose kernels run the products.
    #[cfg(test)]
    pub(crate) fn isa(&self) -> Isa {
        self.isa
    }

    /// `(n, k)`: the weight's output and input sizes.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// `y = x W^T` for the `x.len() / k` rows of `x`, `y` laid out `[row][n]`. The rows are
    /// independent: a row's result is bit-identical whatever rows come with it.
    #[cfg(test)]
    pub(crate) fn matmul(&self, x: &[f32], y: &mut [f32]) {
        // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and only initialized values are written.
        let y = unsafe { &mut *(y as *mut [f32] as *mut [MaybeUninit<f32>]) };
        Self::matmul_many(&mut [(self, y)], x);
    }

    /// [`KTiles::matmul`] of one input by several weights with the same `k` (a layer's query, key
    /// and value projections): the input is quantized once and all products share one parallel
    /// region, one wait for the threads instead of one per weight. Writes every element of each
    /// output, so they may come uninitialized: zeroing them first cost a decode step more than
    /// its activations' quantization (the outputs are cold after a layer's weights went by).
    pub(crate) fn matmul_many(parts: &mut [(&KTiles, &mut [MaybeUninit<f32>])], x: &[f32]) {
        let Some(k) = parts.first().map(|(t, _)| t.k) else {
            return;
        };
        let m = x.len() / k;
        for (t, y) in parts.iter() {
            assert!(
                t.k == k && x.len() == m * k && y.len() == m * t.n,
                "KTiles::matmul_many: shapes"
            );
        }
        // Q8_0 weights take Q8_0 activations; the K-quants take Q8_K ones.
        let is_q80 = |t: &KTiles| matches!(t.tiles, Tiles::Q80(_));
        let acts = if parts.iter().all(|(t, _)| is_q80(t)) {
            Vec::new()
        } else {
            quantize_rows::<ActQ8K>(x, k)
        };
        let acts80 = if parts.iter().any(|(t, _)| is_q80(t)) {
            quantize_rows::<ActQ80>(x, k)
        } else {
            Vec::new()
        };
        #[cfg(target_arch = "x86_64")]
        {
            let kb = k / QK;
            let passes = m.div_ceil(MAX_ROWS_PER_PASS);
            // (tiles, output, first unit): units ordered weight by weight, tile column first, so
            // a thread's consecutive units reuse a column from L2 for the next rows and its
            // prefetches run ahead along one stream.
            let mut jobs = Vec::with_capacity(parts.len());
            let mut units = 0;
            for (t, y) in parts.iter_mut() {
                jobs.push((*t, OutPtr(y.as_mut_ptr().cast::<f32>()), units));
                units += t.n / TILE_ROWS * passes;
            }
            // Unit `(col, pass)` of weight `t`: its tile column against the pass's rows.
            let multiply = |t: &KTiles, out: OutPtr, col: usize, pass: usize| {
                let r0 = pass * MAX_ROWS_PER_PASS;
                let rows = (m - r0).min(MAX_ROWS_PER_PASS);
                let span = r0 * kb..(r0 + rows) * kb;
                let n = t.n;
                let isa = t.isa;
                // A column's first pass of rows streams it from memory, with prefetches; later
                // passes find it in L2 and run the kernels' instances that issue none.
                let stream = pass == 0;
                // SAFETY: the CPU has the kernels' features (`with_isa` checked them); each unit
                // writes the 16 columns of its tile column for its own rows of its own weight's
                // output only.
                unsafe {
                    match &t.tiles {
                        Tiles::Q4K(t) => {
                            let column = &t[col * kb..(col + 1) * kb];
                            let args = (column, tiles_end(t), &acts[span]);
                            by_isa!(isa, q4k, rows, stream, args, (kb, out, r0, n, col))
                        }
                        Tiles::Q6K(t) => {
                            let column = &t[col * kb..(col + 1) * kb];
                            let args = (column, tiles_end(t), &acts[span]);
                            by_isa!(isa, q6k, rows, stream, args, (kb, out, r0, n, col))
                        }
                        Tiles::Q80(t) => {
                            let column = &t[col * kb..(col + 1) * kb];
                            let args = (column, tiles_end(t), &acts80[span]);
                            by_isa!(isa, q80, rows, stream, args, (kb, out, r0, n, col))
                        }
                    }
                }
            };
            execute_fine(units, |range| {
                // One weight's units at a time, so finding the weight and splitting the unit into
                // column and pass happen once per run of units, not once per unit (a unit can be
                // under a microsecond of work, and a 1.5B step has some 50,000).
                let mut unit = range.start;
                while unit < range.end {
                    let Some(&(t, out, first)) = jobs.iter().rev().find(|j| unit >= j.2) else {
                        break;
                    };
                    let stop = range.end.min(first + t.n / TILE_ROWS * passes);
                    let (mut col, mut pass) = ((unit - first) / passes, (unit - first) % passes);
                    for _ in unit..stop {
                        multiply(t, out, col, pass);
                        pass += 1;
                        if pass == passes {
                            (col, pass) = (col + 1, 0);
                        }
                    }
                    unit = stop;
                }
            });
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (acts, acts80);
            unreachable!("KTiles::new returns None off x86-64");
        }
    }
}

/// Calls a kernel instance for the row count (1 to [`MAX_ROWS_PER_PASS`]), so each instance keeps
/// its accumulators in registers, and for whether it streams its tiles from memory (issues
/// prefetches) or finds them in L2, so neither carries a branch per step.
#[cfg(target_arch = "x86_64")]
macro_rules! by_rows {
    ($($kernel:ident)::+, $rows:expr, $stream:expr, ($($arg:expr),*)) => {
        match ($rows, $stream) {
            (1, true) => $($kernel)::+::<1, true>($($arg),*),
            (2, true) => $($kernel)::+::<2, true>($($arg),*),
            (3, true) => $($kernel)::+::<3, true>($($arg),*),
            (_, true) => $($kernel)::+::<4, true>($($arg),*),
            (1, false) => $($kernel)::+::<1, false>($($arg),*),
            (2, false) => $($kernel)::+::<2, false>($($arg),*),
            (3, false) => $($kernel)::+::<3, false>($($arg),*),
            (_, false) => $($kernel)::+::<4, false>($($arg),*),
        }
    };
}
#[cfg(target_arch = "x86_64")]
use by_rows;

/// Calls kernel `$kernel` of the instruction set `$isa` for the row count and `$stream`; `$args`
/// the column, the end of the weight's tiles and the activations, `$rest` the other arguments.
#[cfg(target_arch = "x86_64")]
macro_rules! by_isa {
    ($isa:expr, $kernel:ident, $rows:expr, $stream:expr, $args:expr, ($($rest:expr),*)) => {{
        let (column, end, acts) = $args;
        let stream = $stream;
        match $isa {
            Isa::Avx512Vnni => {
                by_rows!(x86::$kernel, $rows, stream, (column, end, acts, $($rest),*))
            }
            Isa::Avx2 => by_rows!(avx2::$kernel, $rows, stream, (column, end, acts, $($rest),*)),
        }
    }};
}
#[cfg(target_arch = "x86_64")]
use by_isa;

/// Runs `f` over `0..units` on candle's barrier pool (the calling thread works too). Each thread
/// owns a contiguous share and takes it front to back in chunks of about 1/64 of the units
/// (smaller near its end, down to one unit: see [`Share::take`]), so its weights come as one
/// stream that its prefetches run ahead along (a shared cursor handed each thread every other
/// chunk, and each chunk began with a tile nobody had prefetched); a thread done with its share
/// takes chunks from the back of the others', so none waits long for a slow one (candle's
/// `execute_chunked` hands out sixteenths, and a step's hundred-odd products each ended with one
/// thread waiting up to a sixteenth of the product for the other).
fn execute_fine(units: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let pool = candle_core::utils::barrier_pool();
    let threads = pool.n_workers() + 1;
    let chunk = units.div_ceil(64).max(1);
    let shares: Vec<Share> = (0..threads)
        .map(|t| Share::new(t * units / threads, (t + 1) * units / threads))
        .collect();
    pool.execute(|tid| {
        let own = tid % threads;
        while let Some(r) = shares[own].take(chunk, true) {
            f(r);
        }
        for other in (1..threads).map(|d| &shares[(own + d) % threads]) {
            while let Some(r) = other.take(chunk, false) {
                f(r);
            }
        }
    });
}

/// A share's pieces are at most this fraction of what is left of it.
const TAPER: u64 = 4;

/// A range of units that its owner takes from the front and others from the back: both ends in
/// one atomic word (front in the low 32 bits), so a take is one compare-and-swap.
#[repr(align(64))] // one cache line per share: the threads take from their own without contention
struct Share(std::sync::atomic::AtomicU64);

impl Share {
    fn new(front: usize, back: usize) -> Self {
        let word = |v: usize| u64::try_from(v).ok().filter(|&v| v <= u64::from(u32::MAX));
        let (front, back) = (word(front), word(back));
        let (front, back) = front.zip(back).expect("fewer than 2^32 units of work");
        Share(std::sync::atomic::AtomicU64::new(front | back << 32))
    }

    /// Up to `chunk` units off the front (the owner) or the back (the others), and no more than
    /// a [`TAPER`]th of what is left; `None` once the range is empty.
    fn take(&self, chunk: usize, from_front: bool) -> Option<std::ops::Range<usize>> {
        use std::sync::atomic::Ordering;
        let mut word = self.0.load(Ordering::Relaxed);
        loop {
            let (front, back) = (word & 0xFFFF_FFFF, word >> 32);
            if front >= back {
                return None;
            }
            // Pieces shrink to a single unit as the range runs out, so that when one thread finds
            // nothing left, the other is at most a unit from done.
            let chunk = (chunk as u64).min(((back - front) / TAPER).max(1));
            let (taken, new) = if from_front {
                let end = (front + chunk).min(back);
                (front..end, end | back << 32)
            } else {
                let start = back.saturating_sub(chunk).max(front);
                (start..back, front | start << 32)
            };
            match self
                .0
                .compare_exchange_weak(word, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(taken.start as usize..taken.end as usize),
                Err(now) => word = now,
            }
        }
    }
}

/// Where the kernels' prefetches stop: the end of a weight's tiles.
fn tiles_end<T>(tiles: &[T]) -> *const u8 {
    tiles.as_ptr_range().end.cast()
}

/// ggml's unpacking of a Q4_K sub-block's 6-bit scale and min.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Tiles from `n` rows of `k / 256` ggml blocks of `block` bytes each (as a GGUF stores them),
/// column of 16 rows by column, superblock by superblock: each tile starts as `empty` and
/// `fill(tile, r, bytes)` lays in its row `r`, rows in order. `None` when `data` is not that size.
fn pack_tiles<T: Copy>(
    data: &[u8],
    n: usize,
    k: usize,
    block: usize,
    empty: T,
    mut fill: impl FnMut(&mut T, usize, &[u8]),
) -> Option<TileVec<T>> {
    let kb = k / QK;
    if data.len() != n * kb * block {
        return None;
    }
    // Memory the OS cannot map is the same answer as a shape the kernels do not take: the
    // weight stays in candle's layout.
    let mut out = TileVec::with_capacity(n / TILE_ROWS * kb).ok()?;
    for col in 0..n / TILE_ROWS {
        for b in 0..kb {
            let mut tile = empty;
            for r in 0..TILE_ROWS {
                let at = ((col * TILE_ROWS + r) * kb + b) * block;
                fill(&mut tile, r, &data[at..at + block]);
            }
            out.push(tile);
        }
    }
    Some(out)
}

/// Row `r`'s 256 values (their low four bits) into a `[k8 group][row][4 bytes]` array of nibbles:
/// byte `j` of group `g` holds values `8g + j` (low nibble) and `8g + j + 4` (high).
fn put_nibbles(dst: &mut [u8; QK / 2 * TILE_ROWS], r: usize, vals: &[u8; QK]) {
    for g in 0..QK / 8 {
        for j in 0..4 {
            dst[(g * TILE_ROWS + r) * 4 + j] =
                (vals[g * 8 + j] & 0x0F) | ((vals[g * 8 + j + 4] & 0x0F) << 4);
        }
    }
}

/// Q4_K blocks (ggml's layout: `d`, `dmin` as f16, 12 bytes of scales, 128 of nibbles) to tiles.
fn pack_q4k(data: &[u8], n: usize, k: usize) -> Option<TileVec<TileQ4K>> {
    let empty = TileQ4K {
        qs: [0; QK / 2 * TILE_ROWS],
        scales_mins: [0; 192],
        d: [0; TILE_ROWS],
        dmin: [0; TILE_ROWS],
    };
    // A packed byte holds the values of several rows, so a tile's scales and mins are gathered
    // unpacked, row by row, and packed once its last row is in.
    let mut sm = ScalesMins {
        scales: [[0; TILE_ROWS]; 8],
        mins: [[0; 2 * TILE_ROWS]; 4],
    };
    pack_tiles(data, n, k, 144, empty, |tile, r, blk| {
        tile.d[r] = u16::from_le_bytes([blk[0], blk[1]]);
        tile.dmin[r] = u16::from_le_bytes([blk[2], blk[3]]);
        for sub in 0..8 {
            let (sc, mn) = scale_min_k4(sub, &blk[4..16]);
            sm.scales[sub][r] = sc;
            sm.mins[sub / 2][2 * r + sub % 2] = mn;
        }
        if r == TILE_ROWS - 1 {
            tile.scales_mins = sm.pack();
        }
        // 32-byte chunk c holds values [64c, 64c + 32) low and [64c + 32, 64c + 64) high.
        let qs = &blk[16..];
        let mut vals = [0u8; QK];
        for c in 0..4 {
            for j in 0..32 {
                vals[c * 64 + j] = qs[c * 32 + j] & 0x0F;
                vals[c * 64 + 32 + j] = qs[c * 32 + j] >> 4;
            }
        }
        put_nibbles(&mut tile.qs, r, &vals);
    })
}

/// Q6_K blocks (ggml's layout: 128 bytes of low nibbles, 64 of high bit pairs, 16 signed scales,
/// `d` as f16) to tiles.
fn pack_q6k(data: &[u8], n: usize, k: usize) -> Option<TileVec<TileQ6K>> {
    let empty = TileQ6K {
        ql: [0; QK / 2 * TILE_ROWS],
        qh: [0; QK / 4 * TILE_ROWS],
        scales: [[0; TILE_ROWS]; 16],
        d: [0.0; TILE_ROWS],
    };
    pack_tiles(data, n, k, 210, empty, |tile, r, blk| {
        for sub in 0..16 {
            tile.scales[sub][r] = blk[192 + sub] as i8;
        }
        tile.d[r] = f16_at(blk, 208);
        let mut vals = [0u8; QK];
        for h in 0..2 {
            let (ql, qh) = (&blk[h * 64..128], &blk[128 + h * 32..192]);
            for j in 0..32 {
                vals[h * 128 + j] = (ql[j] & 0x0F) | ((qh[j] & 3) << 4);
                vals[h * 128 + j + 32] = (ql[j + 32] & 0x0F) | (((qh[j] >> 2) & 3) << 4);
                vals[h * 128 + j + 64] = (ql[j] >> 4) | (((qh[j] >> 4) & 3) << 4);
                vals[h * 128 + j + 96] = (ql[j + 32] >> 4) | (((qh[j] >> 6) & 3) << 4);
            }
        }
        put_nibbles(&mut tile.ql, r, &vals);
        for g in 0..QK / 16 {
            for j in 0..4 {
                let mut byte = 0u8;
                for s in 0..4 {
                    byte |= (vals[g * 16 + 4 * s + j] >> 4) << (2 * s);
                }
                tile.qh[(g * TILE_ROWS + r) * 4 + j] = byte;
            }
        }
    })
}

/// Q8_0 blocks (ggml's layout: `d` as f16, 32 signed bytes) to tiles.
fn pack_q80(data: &[u8], n: usize, k: usize) -> Option<TileVec<TileQ80>> {
    let empty = TileQ80 {
        qs: [0; QK * TILE_ROWS],
        d: [[0; TILE_ROWS]; 8],
    };
    pack_tiles(data, n, k, 8 * 34, empty, |tile, r, blocks| {
        for (b, blk) in blocks.chunks_exact(34).enumerate() {
            tile.d[b][r] = u16::from_le_bytes([blk[0], blk[1]]);
            for (i, &q) in blk[2..].iter().enumerate() {
                let v = 32 * b + i;
                tile.qs[((v / 4) * TILE_ROWS + r) * 4 + v % 4] = (q as i8 as i16 + 128) as u8;
            }
        }
    })
}

/// Activation blocks of 256 values: an all-zero value to allocate them, and their quantizers.
trait ActBlock: Copy + Send + Sync {
    const EMPTY: Self;
    /// 256 values into one block with AVX-512, to the bit what [`ActBlock::reference`] gives.
    /// Unsafe: the CPU must have AVX-512 F and BW.
    #[cfg(target_arch = "x86_64")]
    unsafe fn quantize_avx512(x: &[f32], a: &mut Self);
    /// The same with AVX2, the same bits. Unsafe: the CPU must have AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    unsafe fn quantize_avx2(x: &[f32], a: &mut Self);
    /// 256 values per block of `out` through candle (ggml's numbers; other CPUs).
    fn reference(x: &[f32], out: &mut [Self]);
}
impl ActQ8K {
    /// The block of an all-zero input: ggml's zeros.
    fn clear(&mut self) {
        *self = <Self as ActBlock>::EMPTY;
    }

    /// The end of the vectorized quantizers, once `qs` and `q6k_start` hold the quants and their
    /// sums of 16: the sums of 32 and the scale of the quantizer's `iscale`.
    fn finish(&mut self, iscale: f32) {
        for (j, s) in self.bsum32.iter_mut().enumerate() {
            *s = ((self.q6k_start[2 * j] + self.q6k_start[2 * j + 1]) / -32) as i16;
        }
        self.d = 1.0 / iscale;
    }
}

impl ActBlock for ActQ8K {
    const EMPTY: Self = Self {
        qs: [0; QK],
        d: 0.0,
        bsum32: [0; 8],
        q6k_start: [0; 16],
    };
    #[cfg(target_arch = "x86_64")]
    unsafe fn quantize_avx512(x: &[f32], a: &mut Self) {
        // SAFETY: as the caller promises.
        unsafe { x86::quantize_q8k(x, a) }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn quantize_avx2(x: &[f32], a: &mut Self) {
        // SAFETY: as the caller promises.
        unsafe { avx2::quantize_q8k(x, a) }
    }
    fn reference(x: &[f32], out: &mut [Self]) {
        quantize_blocks_candle(x, out)
    }
}
impl ActBlock for ActQ80 {
    const EMPTY: Self = Self {
        qs: [0; QK],
        d: [0.0; 8],
        start: [0; 8],
    };
    #[cfg(target_arch = "x86_64")]
    unsafe fn quantize_avx512(x: &[f32], a: &mut Self) {
        // SAFETY: as the caller promises.
        unsafe { x86::quantize_q80(x, a) }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn quantize_avx2(x: &[f32], a: &mut Self) {
        // SAFETY: as the caller promises.
        unsafe { avx2::quantize_q80(x, a) }
    }
    fn reference(x: &[f32], out: &mut [Self]) {
        quantize_blocks_q80_candle(x, out)
    }
}

/// The rows of `x` (`k` values each) quantized by `quantize` 256 values at a time,
/// `[row][superblock]`.
fn quantize_rows<A: ActBlock>(x: &[f32], k: usize) -> Vec<A> {
    let kb = k / QK;
    let m = x.len() / k;
    let mut out = vec![A::EMPTY; m * kb];
    // A few rows quantize in less time than the threads take to wake.
    if m <= 2 * MAX_ROWS_PER_PASS {
        quantize_blocks(x, &mut out);
    } else {
        let ptr = OutPtr(out.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(m, |rows| {
            for r in rows {
                // SAFETY: each row `r` owns the disjoint range `r * kb .. (r + 1) * kb` of `out`,
                // which outlives the call.
                let dst = unsafe { ptr.slice(r * kb, kb) };
                quantize_blocks(&x[r * k..(r + 1) * k], dst);
            }
        });
    }
    out
}

/// Eight Q8_0 blocks per block of `out` by candle's `BlockQ8_0::from_float` (the reference, and
/// other CPUs).
fn quantize_blocks_q80_candle(x: &[f32], out: &mut [ActQ80]) {
    use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
    /// candle's `BlockQ8_0`, whose fields are crate-private; the layout is ggml's and checked.
    #[repr(C)]
    struct Q80Fields {
        d: half::f16,
        qs: [i8; 32],
    }
    const _: () = assert!(std::mem::size_of::<Q80Fields>() == std::mem::size_of::<BlockQ8_0>());
    let mut blocks = vec![BlockQ8_0::zeros(); out.len() * 8];
    BlockQ8_0::from_float(x, &mut blocks);
    for (b8, a) in blocks.chunks_exact(8).zip(out) {
        for (j, b) in b8.iter().enumerate() {
            // SAFETY: `BlockQ8_0` is `#[repr(C)]` with exactly these fields (size asserted above).
            let b = unsafe { &*(b as *const BlockQ8_0).cast::<Q80Fields>() };
            a.qs[32 * j..32 * (j + 1)].copy_from_slice(&b.qs);
            a.d[j] = b.d.to_f32();
            a.start[j] = -128 * b.qs.iter().map(|&q| i32::from(q)).sum::<i32>();
        }
    }
}

/// `x` (256 values per block of `out`) quantized: with AVX-512 or AVX2, to the bit what ggml's
/// and candle's scalar quantizers give, in a fraction of their time (Q8_K's was 6% of a
/// four-sequence decode step); otherwise by those scalar quantizers.
fn quantize_blocks<A: ActBlock>(x: &[f32], out: &mut [A]) {
    quantize_blocks_with(Isa::detect(), x, out)
}

/// [`quantize_blocks`] with the kernels of `isa` (which the CPU must run), or the scalar
/// quantizers for `None`.
fn quantize_blocks_with<A: ActBlock>(isa: Option<Isa>, x: &[f32], out: &mut [A]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(isa) = isa.filter(|i| i.available()) {
        for (block, a) in x.chunks_exact(QK).zip(out) {
            // SAFETY: the CPU has the instruction set's features (checked above); `block` holds
            // 256 values.
            unsafe {
                match isa {
                    Isa::Avx512Vnni => A::quantize_avx512(block, a),
                    Isa::Avx2 => A::quantize_avx2(block, a),
                }
            }
        }
        return;
    }
    let _ = isa;
    A::reference(x, out);
}

/// Q8_K blocks by candle's `BlockQ8K::from_float` (the reference, and other CPUs).
fn quantize_blocks_candle(x: &[f32], out: &mut [ActQ8K]) {
    use candle_core::quantized::k_quants::{BlockQ8K, GgmlType};
    /// candle's `BlockQ8K`, whose fields are crate-private; the layout is ggml's and checked.
    #[repr(C)]
    struct Q8KFields {
        d: f32,
        qs: [i8; QK],
        bsums: [i16; QK / 16],
    }
    const _: () = assert!(std::mem::size_of::<Q8KFields>() == std::mem::size_of::<BlockQ8K>());
    let mut blocks = vec![BlockQ8K::zeros(); out.len()];
    BlockQ8K::from_float(x, &mut blocks);
    for (b, a) in blocks.iter().zip(out) {
        // SAFETY: `BlockQ8K` is `#[repr(C)]` with exactly these fields (size asserted above).
        let f = unsafe { &*(b as *const BlockQ8K).cast::<Q8KFields>() };
        a.qs = f.qs;
        a.d = f.d;
        for (s, v) in a.q6k_start.iter_mut().enumerate() {
            *v = -32 * i32::from(f.bsums[s]);
        }
        for (s, v) in a.bsum32.iter_mut().enumerate() {
            *v = f.bsums[2 * s] + f.bsums[2 * s + 1];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::OutPtr;
    use super::{
        ActQ80, ActQ8K, ScalesMins, TileQ4K, TileQ6K, TileQ80, L2_PREFETCH_TILES, PREFETCH_TILES,
        QK, TILE_ROWS,
    };
    use core::arch::x86_64::*;

    /// A Q4_K tile's scales and mins unpacked ([`ScalesMins::pack`]'s inverse), four 64-byte
    /// vectors: each is its low four bits from one nibble of a byte of the first or second 64,
    /// and its top two (moved to bits 4-5) from the last 64.
    #[inline(always)]
    pub(super) unsafe fn unpack_scales_mins(p: &[u8; 192]) -> ScalesMins {
        let low4 = _mm512_set1_epi8(0x0F);
        let bits45 = _mm512_set1_epi8(0x30);
        // SAFETY: 192 readable bytes; `ScalesMins` is 256 bytes, 64-aligned.
        unsafe {
            let ls = _mm512_loadu_si512(p.as_ptr().cast());
            let lm = _mm512_loadu_si512(p.as_ptr().add(64).cast());
            let h = _mm512_loadu_si512(p.as_ptr().add(128).cast());
            // `a | (b & c)`: the low four bits with the top two put in above them. The 16-bit
            // shifts move no bit across a byte that survives the masks.
            let join = |a, b| _mm512_ternarylogic_epi32::<0xF8>(a, b, bits45);
            let parts = [
                join(_mm512_and_si512(ls, low4), _mm512_slli_epi16::<4>(h)),
                join(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ls), low4),
                    _mm512_slli_epi16::<2>(h),
                ),
                join(_mm512_and_si512(lm, low4), h),
                join(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(lm), low4),
                    _mm512_srli_epi16::<2>(h),
                ),
            ];
            std::mem::transmute::<[__m512i; 4], ScalesMins>(parts)
        }
    }

    /// [`unpack_scales_mins`] on its own, for tests.
    #[cfg(test)]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn unpack_scales_mins_alone(p: &[u8; 192]) -> ScalesMins {
        // SAFETY: the features it needs are enabled here.
        unsafe { unpack_scales_mins(p) }
    }

    /// The four quants at `at` of an activation superblock (Q8_K or Q8_0), in every 32-bit lane.
    #[inline(always)]
    unsafe fn quads(qs: &[i8; QK], at: usize) -> __m512i {
        // SAFETY: the caller keeps `at + 4 <= 256`.
        unsafe { _mm512_set1_epi32(std::ptr::read_unaligned(qs.as_ptr().add(at).cast::<i32>())) }
    }

    /// 16 bytes as 16 f32 lanes.
    #[inline(always)]
    unsafe fn u8_lanes(p: &[u8; TILE_ROWS]) -> __m512 {
        // SAFETY: 16 readable bytes.
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p.as_ptr().cast()))) }
    }

    #[inline(always)]
    unsafe fn i8_lanes(p: &[i8; TILE_ROWS]) -> __m512 {
        // SAFETY: 16 readable bytes.
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.as_ptr().cast()))) }
    }

    /// One Q8_K block: ggml's `quantize_row_q8_K` (scale by `-127 / x`, `x` the first value of
    /// largest magnitude; round half away from zero; clamp to i8), sums of 16 and 32 quants.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_q8k(x: &[f32], a: &mut ActQ8K) {
        debug_assert_eq!(x.len(), 256);
        let p = x.as_ptr();
        // SAFETY: `x` holds 16 vectors of 16 values.
        let v = |i: usize| unsafe { _mm512_loadu_ps(p.add(16 * i)) };
        let mut largest = _mm512_setzero_ps();
        for i in 0..16 {
            largest = _mm512_max_ps(largest, _mm512_abs_ps(v(i)));
        }
        let amax = _mm512_reduce_max_ps(largest);
        // (NaNs aside: a block ggml would quantize from its non-NaN values comes out as zeros.)
        let first = (amax > 0.0)
            .then(|| {
                (0..16).find_map(|i| {
                    let at = _mm512_cmpeq_ps_mask(_mm512_abs_ps(v(i)), _mm512_set1_ps(amax));
                    (at != 0).then(|| x[16 * i + at.trailing_zeros() as usize])
                })
            })
            .flatten();
        let Some(max) = first else {
            a.clear();
            return;
        };
        let iscale = -127f32 / max;
        let scale = _mm512_set1_ps(iscale);
        for i in 0..16 {
            // SAFETY: the CPU has AVX-512 F/BW, as for this function.
            let sum = unsafe { store_rounded(_mm512_mul_ps(scale, v(i)), &mut a.qs[16 * i..]) };
            a.q6k_start[i] = -32 * sum;
        }
        a.finish(iscale);
    }

    /// `y` rounded as `f32::round` does (half away from zero) and clamped to i8, into the first
    /// 16 bytes of `dst`; returns their sum. Unsafe: the CPU must have AVX-512 F and BW.
    #[inline(always)]
    unsafe fn store_rounded(y: __m512, dst: &mut [i8]) -> i32 {
        assert!(dst.len() >= 16);
        // The integer part, plus one away from zero from a half up.
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
        let half = _mm512_set1_ps(0.5);
        let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(y, t)), half);
        let away = _mm512_or_ps(_mm512_and_ps(y, _mm512_set1_ps(-0.0)), _mm512_set1_ps(1.0));
        let r = _mm512_mask_add_ps(t, up, t, away);
        let r = _mm512_min_ps(
            _mm512_max_ps(r, _mm512_set1_ps(-128.0)),
            _mm512_set1_ps(127.0),
        );
        let q = _mm512_cvtps_epi32(r);
        // SAFETY: `dst` holds 16 bytes (asserted).
        unsafe { _mm_storeu_si128(dst.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(q)) };
        _mm512_reduce_add_epi32(q)
    }

    /// Eight Q8_0 blocks: candle's `BlockQ8_0::from_float` (scale `d = max |x| / 127`, stored as
    /// f16; quants `round(x / d)` computed with the f32 `1 / d`, half away from zero).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_q80(x: &[f32], a: &mut ActQ80) {
        debug_assert_eq!(x.len(), 256);
        let p = x.as_ptr();
        for b in 0..8 {
            // SAFETY: `x` holds 256 values.
            let (v0, v1) = unsafe {
                (
                    _mm512_loadu_ps(p.add(32 * b)),
                    _mm512_loadu_ps(p.add(32 * b + 16)),
                )
            };
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let scale = _mm512_set1_ps(id);
            let mut sum = 0;
            for (i, v) in [v0, v1].into_iter().enumerate() {
                let at = 32 * b + 16 * i;
                // SAFETY: the CPU has AVX-512 F/BW, as for this function.
                sum += unsafe { store_rounded(_mm512_mul_ps(v, scale), &mut a.qs[at..]) };
            }
            a.d[b] = half::f16::from_f32(d).to_f32();
            a.start[b] = -128 * sum;
        }
    }

    /// `vpmultishiftqb` controls that take, into each byte, the eight bits from `offset` bits
    /// into the same byte of the source (wrapping within its 64-bit lane): a shift by byte, right
    /// or left, in one instruction on port 5. (`vpsrlw`/`vpsllw` with the masks that follow would
    /// give the same bytes; the last stop's reason, keeping port 0 free for `vpdpbusd`, does not
    /// hold on this CPU, which issues `vpdpbusd` on two ports.)
    #[inline(always)]
    fn bit_offsets(offset: i8) -> __m512i {
        let bytes: [u8; 8] = std::array::from_fn(|j| (8 * j as i8 + offset).rem_euclid(64) as u8);
        // SAFETY: no memory access; AVX-512 F is present where the kernels run.
        unsafe { _mm512_set1_epi64(i64::from_le_bytes(bytes)) }
    }

    /// The tile [`PREFETCH_TILES`] tiles after `tile` (of `T`), the one its steps prefetch,
    /// where it lies before `end`; otherwise (a weight's last tiles) `tile` itself, whose lines
    /// the kernel reads anyway. Chosen once per tile (a conditional move), so the steps'
    /// prefetches carry no branch: with a null check in each step, LLVM threaded the steps'
    /// identical checks into one and issued a pair's or a quad's prefetches in one burst ahead
    /// of their loads (12 at a time in the AVX-512 Q4_K kernel, 16 in Q6_K), the overrun
    /// described at [`prefetch_step`].
    #[inline(always)]
    pub(super) fn prefetch_target<T>(tile: &T, end: *const u8) -> *const u8 {
        let bytes = size_of::<T>();
        let here = (tile as *const T).cast::<u8>();
        let ahead = here.wrapping_add(PREFETCH_TILES * bytes);
        if ahead.wrapping_add(bytes) <= end {
            ahead
        } else {
            here
        }
    }

    /// Prefetches step `step`'s share of the `LINES` cache lines at `ahead` for a tile
    /// multiplied in `STEPS` steps (nothing where the tiles are not `STREAM`ed from memory): the
    /// same number of consecutive lines each step, clamped to the last. The kernels spread a
    /// tile's prefetches over its steps: all at once, they overran the core's line-fill
    /// buffers, and the prefetches left waiting held up retirement until the multiplication of
    /// the tile stalled behind them (four sequences ran at 64 tokens/s rather than 70; on a Zen 4
    /// the one-row AVX-512 kernels, whose compiled prefetches came 12-72 at a time, streamed
    /// Q6_K at 0.81 of plain reads against 0.88 once spread, `weight_stream`, 2026-12-03). A
    /// fixed count per step keeps this free of loops whose trip count varies from step to step,
    /// which the branch predictor missed (each miss throwing away the loads in flight behind
    /// it). Kernels take the steps in ascending order, so the lines go out in address order: an
    /// AVX2 Q4_K kernel that took steps `s` and `s + 8` together streamed the 1.5B's up and down
    /// projections at 0.51-0.66 of the read probe against 0.82-0.85 in order (`weight_stream`,
    /// 2-core Zen 3, 2026-12-02). Without these prefetches the hardware prefetchers alone kept
    /// these kernels at 0.56-0.60 of the probe, and a variant taking both halves of each group
    /// at once (steps in order) at 0.34-0.56. With `L2`, each line also goes into L2 alone
    /// [`L2_PREFETCH_TILES`] tiles ahead (where that is, see there).
    #[inline(always)]
    pub(super) unsafe fn prefetch_step<
        const LINES: usize,
        const STEPS: usize,
        const STREAM: bool,
        const L2: bool,
    >(
        ahead: *const u8,
        step: usize,
    ) {
        if !STREAM {
            return;
        }
        let per = LINES.div_ceil(STEPS);
        let far = (L2_PREFETCH_TILES - PREFETCH_TILES) * LINES * 64;
        for j in 0..per {
            let line = (per * step + j).min(LINES - 1);
            // SAFETY: prefetches never fault, whatever the address (the far one may lie past a
            // weight's last tile). Written as `asm!`, which the compiler keeps in its place among
            // the loads: `_mm_prefetch`, which has no order against loads, LLVM gathered at the
            // top of a block (the one-row AVX-512 Q8_0 kernel issued all 72 of a tile's at once,
            // and Q6_K's 7 of a quad's 16).
            unsafe {
                std::arch::asm!(
                    "prefetcht0 [{p}]",
                    p = in(reg) ahead.wrapping_add(line * 64),
                    options(nostack, preserves_flags, readonly)
                );
                if L2 {
                    std::arch::asm!(
                        "prefetcht1 [{q}]",
                        q = in(reg) ahead.wrapping_add(far + line * 64),
                        options(nostack, preserves_flags, readonly)
                    );
                }
            }
        }
    }

    /// `M` activation rows against one column of Q4_K tiles (16 outputs per row).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
    pub(super) unsafe fn q4k<const M: usize, const STREAM: bool>(
        column: &[TileQ4K],
        end: *const u8,
        acts: &[ActQ8K],
        kb: usize,
        out: OutPtr,
        r0: usize,
        n: usize,
        col: usize,
    ) {
        let nib = _mm512_set1_epi8(0x0F);
        let high_nibble = bit_offsets(4);
        let mut acc = [_mm512_setzero_ps(); M];
        for (b, t) in column.iter().enumerate() {
            let a: [&ActQ8K; M] = std::array::from_fn(|m| &acts[m * kb + b]);
            let ahead = prefetch_target(t, end);
            // SAFETY: AVX-512 F/BW, enabled on this function.
            let sm = unsafe { unpack_scales_mins(&t.scales_mins) };
            let mut scaled = [_mm512_setzero_ps(); M];
            // Sub-blocks in pairs; for one or two rows, low and high nibbles apart too (four
            // chains of `vpdpbusd` per row), so few rows are not bound by the instruction's
            // latency; more rows have chains enough. Integer sums: the order changes no bit.
            let h = usize::from(M <= 2);
            for pair in 0..4 {
                let zero = _mm512_setzero_si512();
                let mut sa = [[zero; 2]; M];
                let mut sb = [[zero; 2]; M];
                for g4 in 0..4 {
                    let (ga, gb) = (8 * pair + g4, 8 * pair + 4 + g4);
                    // SAFETY: prefetches only.
                    unsafe { prefetch_step::<Q4K_LINES, 16, STREAM, false>(ahead, 4 * pair + g4) };
                    // SAFETY: groups < 32, inside `qs`.
                    let (wa, wb) = unsafe {
                        (
                            _mm512_loadu_si512(t.qs.as_ptr().add(ga * 64).cast()),
                            _mm512_loadu_si512(t.qs.as_ptr().add(gb * 64).cast()),
                        )
                    };
                    let lo_a = _mm512_and_si512(wa, nib);
                    let hi_a = _mm512_and_si512(_mm512_multishift_epi64_epi8(high_nibble, wa), nib);
                    let lo_b = _mm512_and_si512(wb, nib);
                    let hi_b = _mm512_and_si512(_mm512_multishift_epi64_epi8(high_nibble, wb), nib);
                    for m in 0..M {
                        // SAFETY: offsets < 256.
                        unsafe {
                            sa[m][0] = _mm512_dpbusd_epi32(sa[m][0], lo_a, quads(&a[m].qs, ga * 8));
                            sa[m][h] =
                                _mm512_dpbusd_epi32(sa[m][h], hi_a, quads(&a[m].qs, ga * 8 + 4));
                            sb[m][0] = _mm512_dpbusd_epi32(sb[m][0], lo_b, quads(&a[m].qs, gb * 8));
                            sb[m][h] =
                                _mm512_dpbusd_epi32(sb[m][h], hi_b, quads(&a[m].qs, gb * 8 + 4));
                        }
                    }
                }
                // SAFETY: sub-blocks < 8.
                let (sc_a, sc_b) = unsafe {
                    (
                        u8_lanes(&sm.scales[2 * pair]),
                        u8_lanes(&sm.scales[2 * pair + 1]),
                    )
                };
                for m in 0..M {
                    let fa = _mm512_cvtepi32_ps(_mm512_add_epi32(sa[m][0], sa[m][1]));
                    let fb = _mm512_cvtepi32_ps(_mm512_add_epi32(sb[m][0], sb[m][1]));
                    scaled[m] = _mm512_fmadd_ps(fa, sc_a, scaled[m]);
                    scaled[m] = _mm512_fmadd_ps(fb, sc_b, scaled[m]);
                }
            }
            // The mins' sums, in integers (below 8 * 63 * 4096): two sub-blocks per `vpdpwssd`.
            let mut mins = [_mm512_setzero_si512(); M];
            for pair in 0..4 {
                // SAFETY: 32 bytes; the activations' two i16 sums at `2 pair` < 8.
                unsafe {
                    let mn =
                        _mm512_cvtepu8_epi16(_mm256_loadu_si256(sm.mins[pair].as_ptr().cast()));
                    for m in 0..M {
                        let sums = std::ptr::read_unaligned(
                            a[m].bsum32.as_ptr().add(2 * pair).cast::<i32>(),
                        );
                        mins[m] = _mm512_dpwssd_epi32(mins[m], mn, _mm512_set1_epi32(sums));
                    }
                }
            }
            // SAFETY: 16 f16 each.
            let (d, dmin) = unsafe {
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(t.d.as_ptr().cast())),
                    _mm512_cvtph_ps(_mm256_loadu_si256(t.dmin.as_ptr().cast())),
                )
            };
            for m in 0..M {
                let v = _mm512_mul_ps(scaled[m], d);
                let v = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mins[m]), dmin, v);
                acc[m] = _mm512_fmadd_ps(v, _mm512_set1_ps(a[m].d), acc[m]);
            }
        }
        for (m, v) in acc.iter().enumerate() {
            // SAFETY: row `r0 + m` and columns `16 col .. 16 col + 16` are this unit's own.
            unsafe { _mm512_storeu_ps(out.0.add((r0 + m) * n + col * TILE_ROWS), *v) };
        }
    }

    // Indexed loops over accumulator arrays: the kernel's register layout reads plainest so.
    #[allow(clippy::needless_range_loop)]
    /// `M` activation rows against one column of Q6_K tiles. The 6-bit values go into
    /// `vpdpbusd` unsigned; each sub-block's sum starts at `-32` times the activations' sum
    /// ([`ActQ8K::q6k_start`]), which makes it the sum over the values `q - 32`, exactly.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
    pub(super) unsafe fn q6k<const M: usize, const STREAM: bool>(
        column: &[TileQ6K],
        end: *const u8,
        acts: &[ActQ8K],
        kb: usize,
        out: OutPtr,
        r0: usize,
        n: usize,
        col: usize,
    ) {
        let nib = _mm512_set1_epi8(0x0F);
        let top = _mm512_set1_epi8(0x30);
        let (high_nibble, pair0, pair1, pair3) = (
            bit_offsets(4),
            bit_offsets(-4),
            bit_offsets(-2),
            bit_offsets(2),
        );
        // `(low & 0x0F) | high` in one instruction: `vpternlogd`'s table for `(A & C) | B`.
        let join = |low, high| _mm512_ternarylogic_epi32::<0xEC>(low, high, nib);
        let mut acc = [_mm512_setzero_ps(); M];
        for (b, t) in column.iter().enumerate() {
            let a: [&ActQ8K; M] = std::array::from_fn(|m| &acts[m * kb + b]);
            let ahead = prefetch_target(t, end);
            let mut scaled = [_mm512_setzero_ps(); M];
            // Four 16-value sub-blocks at a time: four independent chains per row.
            for quad in 0..4 {
                let mut s: [[__m512i; 4]; M] = std::array::from_fn(|m| {
                    std::array::from_fn(|u| _mm512_set1_epi32(a[m].q6k_start[4 * quad + u]))
                });
                for u in 0..4 {
                    let g = 4 * quad + u;
                    // SAFETY: prefetches only.
                    unsafe { prefetch_step::<Q6K_LINES, 16, STREAM, true>(ahead, g) };
                    // SAFETY: group g < 16 of `qh`, groups 2g, 2g + 1 < 32 of `ql`.
                    let (h, l0, l1) = unsafe {
                        (
                            _mm512_loadu_si512(t.qh.as_ptr().add(g * 64).cast()),
                            _mm512_loadu_si512(t.ql.as_ptr().add(2 * g * 64).cast()),
                            _mm512_loadu_si512(t.ql.as_ptr().add((2 * g + 1) * 64).cast()),
                        )
                    };
                    // Values 16g + j, + 4, + 8, + 12 (j < 4): high bit pairs 0, 1, 2, 3 of `h`.
                    let bits =
                        |ctrl, v| _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, v), top);
                    let v0 = join(l0, bits(pair0, h));
                    let v1 = join(
                        _mm512_multishift_epi64_epi8(high_nibble, l0),
                        bits(pair1, h),
                    );
                    let v2 = join(l1, _mm512_and_si512(h, top));
                    let v3 = join(
                        _mm512_multishift_epi64_epi8(high_nibble, l1),
                        bits(pair3, h),
                    );
                    for m in 0..M {
                        // SAFETY: offsets < 256.
                        unsafe {
                            let q = 16 * g;
                            s[m][u] = _mm512_dpbusd_epi32(s[m][u], v0, quads(&a[m].qs, q));
                            s[m][u] = _mm512_dpbusd_epi32(s[m][u], v1, quads(&a[m].qs, q + 4));
                            s[m][u] = _mm512_dpbusd_epi32(s[m][u], v2, quads(&a[m].qs, q + 8));
                            s[m][u] = _mm512_dpbusd_epi32(s[m][u], v3, quads(&a[m].qs, q + 12));
                        }
                    }
                }
                for u in 0..4 {
                    // SAFETY: sub-blocks < 16.
                    let sc = unsafe { i8_lanes(&t.scales[4 * quad + u]) };
                    for m in 0..M {
                        scaled[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[m][u]), sc, scaled[m]);
                    }
                }
            }
            // SAFETY: 16 f32.
            let d = unsafe { _mm512_loadu_ps(t.d.as_ptr()) };
            for m in 0..M {
                let da = _mm512_set1_ps(a[m].d);
                acc[m] = _mm512_fmadd_ps(scaled[m], _mm512_mul_ps(d, da), acc[m]);
            }
        }
        for (m, v) in acc.iter().enumerate() {
            // SAFETY: row `r0 + m` and columns `16 col .. 16 col + 16` are this unit's own.
            unsafe { _mm512_storeu_ps(out.0.add((r0 + m) * n + col * TILE_ROWS), *v) };
        }
    }

    /// `M` activation rows against one column of Q8_0 tiles. The weights go into `vpdpbusd` as
    /// `q + 128`; each block's sum starts at [`ActQ80::start`], which takes the `128` back out, so
    /// the integer sums are exact.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi,f16c")]
    pub(super) unsafe fn q80<const M: usize, const STREAM: bool>(
        column: &[TileQ80],
        end: *const u8,
        acts: &[ActQ80],
        kb: usize,
        out: OutPtr,
        r0: usize,
        n: usize,
        col: usize,
    ) {
        let mut acc = [_mm512_setzero_ps(); M];
        for (b, t) in column.iter().enumerate() {
            let a: [&ActQ80; M] = std::array::from_fn(|m| &acts[m * kb + b]);
            let ahead = prefetch_target(t, end);
            for blk in 0..8 {
                // SAFETY: prefetches only.
                unsafe { prefetch_step::<Q80_LINES, 8, STREAM, false>(ahead, blk) };
                // Two chains per row, so one row is not bound by `vpdpbusd`'s latency.
                let mut s: [[__m512i; 2]; M] = std::array::from_fn(|m| {
                    [_mm512_set1_epi32(a[m].start[blk]), _mm512_setzero_si512()]
                });
                for j in 0..8 {
                    let g = 8 * blk + j;
                    // SAFETY: group g < 64, inside `qs`; offsets < 256.
                    unsafe {
                        let w = _mm512_loadu_si512(t.qs.as_ptr().add(g * 64).cast());
                        for m in 0..M {
                            s[m][j % 2] =
                                _mm512_dpbusd_epi32(s[m][j % 2], w, quads(&a[m].qs, 4 * g));
                        }
                    }
                }
                // SAFETY: 16 f16 scales.
                let dw = unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(t.d[blk].as_ptr().cast())) };
                for m in 0..M {
                    let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(s[m][0], s[m][1]));
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(a[m].d[blk]));
                    acc[m] = _mm512_fmadd_ps(sum, scale, acc[m]);
                }
            }
        }
        for (m, v) in acc.iter().enumerate() {
            // SAFETY: row `r0 + m` and columns `16 col .. 16 col + 16` are this unit's own.
            unsafe { _mm512_storeu_ps(out.0.add((r0 + m) * n + col * TILE_ROWS), *v) };
        }
    }

    const _: () = assert!(TILE_ROWS == 16);
    /// Cache lines per tile, for the prefetches.
    pub(super) const Q4K_LINES: usize = size_of::<TileQ4K>() / 64;
    pub(super) const Q6K_LINES: usize = size_of::<TileQ6K>() / 64;
    pub(super) const Q80_LINES: usize = size_of::<TileQ80>() / 64;
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Every unit runs exactly once, whatever the count (none, fewer than the threads, not a
    /// multiple of the chunk) and however the threads' shares end up taken.
    #[test]
    fn execute_fine_runs_every_unit_once() {
        for units in [0, 1, 2, 3, 63, 64, 65, 127, 1000, 4097] {
            let runs: Vec<AtomicU32> = (0..units).map(|_| AtomicU32::new(0)).collect();
            execute_fine(units, |range| {
                for u in range {
                    runs[u].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(
                runs.iter().all(|r| r.load(Ordering::Relaxed) == 1),
                "{units} units"
            );
        }
    }

    /// A share taken from both ends at once (its owner at the front, two others at the back)
    /// hands out each unit once, in chunks no larger than asked.
    #[test]
    fn a_share_taken_from_both_ends_covers_its_range_once() {
        let share = Share::new(10, 10_010);
        let runs: Vec<AtomicU32> = (0..10_010).map(|_| AtomicU32::new(0)).collect();
        std::thread::scope(|s| {
            for from_front in [true, false, false] {
                let (share, runs) = (&share, &runs);
                s.spawn(move || {
                    while let Some(r) = share.take(7, from_front) {
                        assert!(!r.is_empty() && r.len() <= 7);
                        for u in r {
                            runs[u].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        for (u, r) in runs.iter().enumerate() {
            assert_eq!(r.load(Ordering::Relaxed), u32::from(u >= 10), "unit {u}");
        }
        assert_eq!(share.take(7, true), None);
    }

    /// The vectorized Q8_K quantization against candle's (ggml's) scalar one, to the bit: random
    /// blocks, halves exactly between integers, ties for the largest magnitude, a zero block.
    #[test]
    fn q8k_quantization_matches_ggml_to_the_bit() {
        let dev = Device::Cpu;
        let mut x: Vec<f32> = Tensor::randn(0f32, 3.0, 8 * QK, &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        // Block 1: scale 1 (largest -127), every other value k + 0.5.
        for (j, v) in x[QK..2 * QK].iter_mut().enumerate() {
            *v = ((j % 200) as f32 - 100.0) + 0.5;
        }
        x[QK + 7] = -127.0;
        // Block 2: +5 and -5 both largest; the first one sets the sign.
        x[2 * QK + 3] = -5.0;
        x[2 * QK + 9] = 5.0;
        for v in &mut x[2 * QK..3 * QK] {
            *v = v.clamp(-5.0, 5.0);
        }
        // Block 3: zeros.
        x[3 * QK..4 * QK].fill(0.0);
        let empty = ActQ8K {
            qs: [0; QK],
            d: 0.0,
            bsum32: [0; 8],
            q6k_start: [0; 16],
        };
        let mut reference = vec![empty; 8];
        quantize_blocks_candle(&x, &mut reference);
        for isa in isas() {
            let mut fast = vec![empty; 8];
            quantize_blocks_with(Some(isa), &x, &mut fast);
            for (b, (f, r)) in fast.iter().zip(&reference).enumerate() {
                assert_eq!(f.qs, r.qs, "{isa:?} block {b}");
                assert_eq!(f.d.to_bits(), r.d.to_bits(), "{isa:?} block {b}");
                assert_eq!(f.q6k_start, r.q6k_start, "{isa:?} block {b}");
                assert_eq!(f.bsum32, r.bsum32, "{isa:?} block {b}");
            }
        }
    }

    /// The vectorized Q8_0 quantization of activations against candle's (ggml's), to the bit.
    #[test]
    fn q80_quantization_matches_ggml_to_the_bit() {
        let mut x: Vec<f32> = Tensor::randn(0f32, 3.0, 4 * QK, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        // A block of halves between integers (scale 1), and a block of zeros.
        for (j, v) in x[..32].iter_mut().enumerate() {
            *v = j as f32 - 15.5;
        }
        x[5] = 127.0;
        x[64..96].fill(0.0);
        let mut reference = vec![ActQ80::EMPTY; 4];
        quantize_blocks_q80_candle(&x, &mut reference);
        for isa in isas() {
            let mut fast = vec![ActQ80::EMPTY; 4];
            quantize_blocks_with(Some(isa), &x, &mut fast);
            for (b, (f, r)) in fast.iter().zip(&reference).enumerate() {
                assert_eq!(f.qs, r.qs, "{isa:?} superblock {b}");
                assert_eq!(
                    f.d.map(f32::to_bits),
                    r.d.map(f32::to_bits),
                    "{isa:?} superblock {b}"
                );
                assert_eq!(f.start, r.start, "{isa:?} superblock {b}");
            }
        }
    }

    /// `x W^T` in f64 over the dequantized Q8_0 weights `w` and `x` as ggml's Q8_0 activations:
    /// what the Q8_0 tiles compute, as llama.cpp does. (candle's own Q8_0 matmul takes Q8_K
    /// activations, with one scale per 256 values, so it rounds the activations differently.)
    fn q80_reference(w: &[f32], x: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut acts = vec![ActQ80::EMPTY; x.len() / QK];
        quantize_blocks_q80_candle(x, &mut acts);
        let xq: Vec<f64> = (0..x.len())
            .map(|i| {
                let a = &acts[i / QK];
                f64::from(a.qs[i % QK]) * f64::from(a.d[i % QK / 32])
            })
            .collect();
        let mut y = Vec::with_capacity(x.len() / k * n);
        for row in xq.chunks_exact(k) {
            for wr in w.chunks_exact(k) {
                let dot: f64 = row.iter().zip(wr).map(|(a, b)| a * f64::from(*b)).sum();
                y.push(dot as f32);
            }
        }
        y
    }

    /// The instruction sets this CPU runs the kernels in (each is tested where it runs).
    fn isas() -> Vec<Isa> {
        let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
        if isas.is_empty() {
            eprintln!("skipped: this CPU runs none of the tile kernels");
        }
        isas
    }

    /// `x W^T` for `w` quantized to `dtype`, by the reference: candle's own quantized matmul (the
    /// same Q8_K activations, a different order of float sums) or, for Q8_0, [`q80_reference`].
    fn reference_product(w: &Tensor, dtype: GgmlDType, x: &[f32], k: usize) -> Vec<f32> {
        let q = QTensor::quantize(w, dtype).unwrap();
        let n = q.shape().dims2().unwrap().0;
        if dtype == GgmlDType::Q8_0 {
            return q80_reference(&dequantized(&q), x, n, k);
        }
        let xt = Tensor::from_slice(x, (x.len() / k, k), &Device::Cpu).unwrap();
        let qm = candle_core::quantized::QMatMul::from_qtensor(q).unwrap();
        candle_core::Module::forward(&qm, &xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn dequantized(q: &QTensor) -> Vec<f32> {
        q.dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// The tiles' product against the reference for 1 to 9 rows, and rows independent of their
    /// company, in every instruction set this CPU runs.
    #[test]
    fn tiles_match_candle_and_rows_are_independent() {
        let dev = Device::Cpu;
        for isa in isas() {
            for dtype in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q8_0] {
                let (n, k) = (48, 512);
                let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let tiles = KTiles::with_isa(&q, isa).expect("tiles");
                let x = Tensor::randn(0f32, 1.0, (9, k), &dev).unwrap();
                let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                // NaN to start with: `matmul_many` must write every element.
                let mut all = vec![f32::NAN; 9 * n];
                tiles.matmul(&xv, &mut all);
                for rows in 1..=9 {
                    let want = reference_product(&w, dtype, &xv[..rows * k], k);
                    let mut got = vec![f32::NAN; rows * n];
                    tiles.matmul(&xv[..rows * k], &mut got);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{isa:?} {dtype:?} {rows} rows [{i}]: {g} vs {w}"
                        );
                    }
                    assert_eq!(
                        got,
                        all[..rows * n],
                        "{isa:?} {dtype:?}: rows depend on their company"
                    );
                }
            }
        }
    }

    /// Every 6-bit value in every place of a Q4_K tile's scales and mins comes back from its
    /// packed form as it went in, unpacked one by one and by each instruction set's vectors.
    #[test]
    fn packed_scales_and_mins_unpack_to_what_went_in() {
        for shift in 0..64 {
            let mut sm = ScalesMins {
                scales: [[0; TILE_ROWS]; 8],
                mins: [[0; 2 * TILE_ROWS]; 4],
            };
            for (i, v) in sm.scales.as_flattened_mut().iter_mut().enumerate() {
                *v = ((i * 37 + shift) % 64) as u8;
            }
            for (i, v) in sm.mins.as_flattened_mut().iter_mut().enumerate() {
                *v = ((i * 11 + 3 * shift) % 64) as u8;
            }
            let packed = sm.pack();
            assert_eq!(ScalesMins::unpack(&packed), sm, "scalar, shift {shift}");
            for isa in isas() {
                // SAFETY: `isas` lists only what this CPU runs.
                let got = unsafe {
                    match isa {
                        Isa::Avx512Vnni => x86::unpack_scales_mins_alone(&packed),
                        Isa::Avx2 => avx2::unpack_scales_mins_alone(&packed),
                    }
                };
                assert_eq!(got, sm, "{isa:?}, shift {shift}");
            }
        }
    }

    /// Weights and activations at the ends of their ranges, with signs that make every product
    /// add up: the largest sums the kernels' 16-bit and 32-bit integers meet (AVX2's
    /// `vpmaddubsw` saturates silently past 32,767). Each weight row is a multiple of one
    /// pattern of signs, the activations are that pattern (or its negation) at full scale.
    #[test]
    fn sums_at_the_ends_of_the_ranges_do_not_saturate() {
        let dev = Device::Cpu;
        let (n, k) = (32, 512);
        let sign = |j: usize| if (j * 7 + j / 3) % 5 < 2 { -1f32 } else { 1.0 };
        // Rows of one magnitude (every quant at its end) and rows with one large value per
        // sub-block (the others small), which push the scales and the quants apart.
        let w: Vec<f32> = (0..n * k)
            .map(|i| {
                let (r, j) = (i / k, i % k);
                let magnitude = if r % 2 == 0 {
                    1.0 + r as f32 * 0.1
                } else if j % 16 == 0 {
                    4.0
                } else {
                    0.5
                };
                sign(j) * magnitude
            })
            .collect();
        let w = Tensor::from_vec(w, (n, k), &dev).unwrap();
        let x: Vec<f32> = (0..3 * k)
            .map(|i| {
                let (r, j) = (i / k, i % k);
                match r {
                    0 => sign(j) * 3.0,
                    1 => -sign(j) * 3.0,
                    _ => 3.0,
                }
            })
            .collect();
        for isa in isas() {
            for dtype in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q8_0] {
                let q = QTensor::quantize(&w, dtype).unwrap();
                let tiles = KTiles::with_isa(&q, isa).expect("tiles");
                let want = reference_product(&w, dtype, &x, k);
                let mut got = vec![f32::NAN; 3 * n];
                tiles.matmul(&x, &mut got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{isa:?} {dtype:?} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }
}
