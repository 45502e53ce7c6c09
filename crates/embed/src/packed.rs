//! The BERT encoder on the CPU over the batch's tokens packed end to end (no padding, so no mask),
//! written as whole passes instead of candle's op-by-op graph, whose transposes, scale and mask
//! passes over the attention scores and separate bias adds took half of embedding time. Each
//! projection runs either on Intel AMX tiles (Sapphire Rapids and later) as bf16 x bf16 -> f32
//! tile products (`tdpbf16ps`), or in f32 on the gemm crate's kernels; bias, residual and GELU
//! are applied as results are stored; attention, softmax and the layer norms are f32.
//!
//! The tile kernel is written by hand because nothing else runs these instructions from Rust:
//! candle's and the gemm crate's CPU kernels stop at AVX-512 f32 FMAs (the tiles reach about ten
//! times their rate on one core), Rust's AMX intrinsics are unstable (so the tile instructions
//! are inline assembly), and AVX-512 BF16's `vdpbf16ps` measured at half the f32 FMA rate on these
//! CPUs. Rounding the projections' inputs to bf16 keeps embeddings within cosine 0.9999 of
//! sentence-transformers' f32 (the parity tests run this path wherever the CPU has AMX).

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
use std::sync::OnceLock;

use rayon::prelude::*;

/// Asks Linux to let this process use the AMX tile registers (`arch_prctl(ARCH_REQ_XCOMP_PERM)`,
/// as oneDNN does), so that embedders loaded afterwards run their projections on the tiles (see
/// [`crate::EmbedderPrecision::Auto`]). An explicit process set-up call for binaries, like
/// `thinkrag_llm::device::keep_tensor_memory`: the permission is process-wide (every thread may then
/// use the tiles, and signal frames grow by 8 KiB), so the library never asks for it itself and
/// embeds in f32 without it. Returns whether tiles are usable now; false on CPUs without AMX,
/// on kernels older than Linux 5.16, and off Linux or x86_64.
pub fn request_amx_tiles() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if cpu_has_amx() {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        // SAFETY: arch_prctl with these arguments only changes which XSAVE features the process
        // may use; a refusal leaves everything as it was.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
    }
    available()
}

/// Whether this process can run AMX bf16 tiles: the CPU has them and the process was granted the
/// tile state ([`request_amx_tiles`]).
pub fn available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if cpu_has_amx() {
        const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
        let mut permitted: u64 = 0;
        // SAFETY: arch_prctl(ARCH_GET_XCOMP_PERM) writes the permitted feature mask to the u64.
        let ok = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_GET_XCOMP_PERM,
                &mut permitted as *mut u64,
            )
        };
        return ok == 0 && permitted & (1 << XFEATURE_XTILEDATA) != 0;
    }
    false
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const XFEATURE_XTILEDATA: libc::c_long = 18;

/// CPUID: AMX-BF16 and AMX-TILE (leaf 7, EDX bits 22 and 24), and AVX-512F.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn cpu_has_amx() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        leaf7.edx & (1 << 22) != 0
            && leaf7.edx & (1 << 24) != 0
            && std::arch::is_x86_feature_detected!("avx512f")
    })
}

/// f32 -> bf16, rounding to nearest even (inputs are finite activations and weights).
#[inline(always)]
fn bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// Rows of a tile block: two 16-row A tiles.
const BLOCK_ROWS: usize = 32;
/// Columns of a tile block: two 16-column B tiles.
const BLOCK_COLS: usize = 32;
/// k per tile: 16 rows of 64 bytes hold 32 bf16 per row of A, 16 pairs per row of B.
const TILE_K: usize = 32;
/// bf16 elements in one tile (1 KiB).
const TILE_ELEMS: usize = 512;

/// A linear layer `y = x W^T + b`.
pub(crate) struct PackedLinear {
    outputs: usize,
    inputs: usize,
    weights: Weights,
    bias: Vec<f32>,
}

enum Weights {
    /// W as AMX B tiles: for each block of 16 outputs and each 32 of the inputs, a 16 x 64-byte
    /// tile whose row r holds, for each of the 16 outputs, the bf16 weights of inputs 2r and
    /// 2r + 1 (the pair layout `tdpbf16ps` multiplies).
    Tiles(Vec<u16>),
    /// W as given (`outputs x inputs`, row-major), f32.
    F32(Vec<f32>),
}

/// What a projection adds to its product before storing it.
#[derive(Clone, Copy)]
pub(crate) enum Epilogue<'a> {
    /// The bias.
    Bias,
    /// The bias and this residual (rows x outputs).
    BiasResidual(&'a [f32]),
    /// The bias, then GELU (erf form).
    BiasGelu,
}

impl Epilogue<'_> {
    /// Finishes `values`, the products of outputs `col0..` of row `row` (`n` outputs a row), in
    /// place.
    #[inline(always)]
    fn apply(self, values: &mut [f32], bias: &[f32], row: usize, col0: usize, n: usize) {
        match self {
            Epilogue::Bias => {
                for (v, b) in values.iter_mut().zip(bias) {
                    *v += b;
                }
            }
            Epilogue::BiasResidual(res) => {
                let res = &res[row * n + col0..][..values.len()];
                for ((v, b), x) in values.iter_mut().zip(bias).zip(res) {
                    *v = *v + b + x;
                }
            }
            Epilogue::BiasGelu => {
                for (v, b) in values.iter_mut().zip(bias) {
                    *v = crate::bert::gelu(*v + b);
                }
            }
        }
    }
}

impl PackedLinear {
    /// `weight` (`outputs x inputs`, row-major) and `bias`, laid out as AMX tiles when `tiles` is
    /// asked and the shape fills whole tile blocks, else kept in f32.
    pub fn new(
        weight: Vec<f32>,
        bias: Vec<f32>,
        outputs: usize,
        inputs: usize,
        tiles: bool,
    ) -> Self {
        assert_eq!(weight.len(), outputs * inputs, "weight shape");
        assert_eq!(bias.len(), outputs, "bias shape");
        let fits = outputs.is_multiple_of(BLOCK_COLS) && inputs.is_multiple_of(TILE_K);
        let weights = if tiles && fits && available() {
            Weights::Tiles(to_tiles(&weight, outputs, inputs))
        } else {
            Weights::F32(weight)
        };
        Self {
            outputs,
            inputs,
            weights,
            bias,
        }
    }

    /// Whether this projection runs on AMX tiles.
    pub fn uses_tiles(&self) -> bool {
        matches!(self.weights, Weights::Tiles(_))
    }

    /// `out` (`rows x outputs`) = `x` (`rows x inputs`) times the weights, plus the epilogue;
    /// `scratch` holds the bf16 copy of `x` the tiles read.
    fn forward(
        &self,
        x: &[f32],
        rows: usize,
        scratch: &mut Vec<u16>,
        epilogue: Epilogue<'_>,
        out: &mut [f32],
    ) {
        match &self.weights {
            Weights::Tiles(tiles) => {
                to_bf16_rows(x, rows, self.inputs, scratch);
                self.tiled_forward(tiles, scratch, rows, epilogue, out);
            }
            Weights::F32(w) => self.f32_forward(w, x, rows, epilogue, out),
        }
    }

    fn f32_forward(
        &self,
        w: &[f32],
        x: &[f32],
        rows: usize,
        epilogue: Epilogue<'_>,
        out: &mut [f32],
    ) {
        let (n, k) = (self.outputs, self.inputs);
        let out = &mut out[..rows * n];
        // SAFETY: out is rows x n (row stride n), x rows x k (row stride k), and W^T's element
        // (i, j) is w[j * k + i]; out overlaps neither.
        unsafe {
            product(
                (rows, n, k),
                (out.as_mut_ptr(), n as isize),
                (x.as_ptr(), k as isize),
                (w.as_ptr(), 1, k as isize),
                gemm::Parallelism::Rayon(0),
            )
        };
        out.par_chunks_mut(64 * n)
            .enumerate()
            .for_each(|(chunk, dst)| {
                for (r, row) in dst.chunks_exact_mut(n).enumerate() {
                    epilogue.apply(row, &self.bias, chunk * 64 + r, 0, n);
                }
            });
    }

    /// `out` (`rows x outputs`) = `a` (bf16 rows of `inputs`, at least `rows` rounded up to 32
    /// rows, the extra rows zero) times the tiles, plus the epilogue.
    fn tiled_forward(
        &self,
        tiles: &[u16],
        a: &[u16],
        rows: usize,
        epilogue: Epilogue<'_>,
        out: &mut [f32],
    ) {
        let (n, k) = (self.outputs, self.inputs);
        let k_tiles = k / TILE_K;
        debug_assert!(a.len() >= rows.div_ceil(BLOCK_ROWS) * BLOCK_ROWS * k);
        out[..rows * n]
            .par_chunks_mut(BLOCK_ROWS * n)
            .enumerate()
            .for_each(|(rb, out_rows)| {
                let valid = out_rows.len() / n;
                let mut block = [0f32; BLOCK_ROWS * BLOCK_COLS];
                let a_block = &a[rb * BLOCK_ROWS * k..][..BLOCK_ROWS * k];
                let _tiles = TileSession::start();
                for cb in 0..n / BLOCK_COLS {
                    let b0 = &tiles[2 * cb * k_tiles * TILE_ELEMS..][..k_tiles * TILE_ELEMS];
                    let b1 = &tiles[(2 * cb + 1) * k_tiles * TILE_ELEMS..][..k_tiles * TILE_ELEMS];
                    // SAFETY: the tile configuration is loaded (TileSession), a_block holds 32
                    // rows of k, b0 and b1 k_tiles tiles each, block 32 x 32 floats.
                    unsafe { tile_product(a_block, k, b0, b1, k_tiles, &mut block) };
                    let col0 = cb * BLOCK_COLS;
                    let bias = &self.bias[col0..col0 + BLOCK_COLS];
                    for r in 0..valid {
                        let dst = &mut out_rows[r * n + col0..][..BLOCK_COLS];
                        dst.copy_from_slice(&block[r * BLOCK_COLS..][..BLOCK_COLS]);
                        epilogue.apply(dst, bias, rb * BLOCK_ROWS + r, col0, n);
                    }
                }
            });
    }
}

/// `weight` (`outputs x inputs`, row-major; whole tile blocks) in the layout of [`Weights::Tiles`].
fn to_tiles(weight: &[f32], outputs: usize, inputs: usize) -> Vec<u16> {
    let k_tiles = inputs / TILE_K;
    let mut tiles = vec![0u16; outputs * inputs];
    for nb in 0..outputs / 16 {
        for kb in 0..k_tiles {
            let tile = &mut tiles[(nb * k_tiles + kb) * TILE_ELEMS..][..TILE_ELEMS];
            for r in 0..16 {
                for j in 0..16 {
                    let pair = &weight[(nb * 16 + j) * inputs + kb * TILE_K + 2 * r..][..2];
                    tile[r * 32 + 2 * j] = bf16(pair[0]);
                    tile[r * 32 + 2 * j + 1] = bf16(pair[1]);
                }
            }
        }
    }
    tiles
}

/// The tile configuration of this thread, loaded for the lifetime of the value and released after
/// (tile state is per thread, and a thread holding it makes context switches dearer).
struct TileSession;

#[repr(C, align(64))]
struct TileConfig([u8; 64]);

/// Palette 1, tmm0-7 each 16 rows of 64 bytes.
const TILE_CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    TileConfig(c)
};

impl TileSession {
    fn start() -> Self {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: only reached when `available()` said the CPU and kernel allow tiles.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) TILE_CONFIG.0.as_ptr(), options(nostack, readonly));
        }
        Self
    }
}

impl Drop for TileSession {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: tiles were configured by `start`.
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    }
}

/// `c` (32 x 32 f32) = `a` (32 rows of `a_stride` bf16, the first `k_tiles * 32` used) x the B
/// tiles `b0` (outputs 0-15) and `b1` (16-31), with tmm0-3 as accumulators.
///
/// # Safety
/// A [`TileSession`] must be live on this thread; the slices must hold what is described.
#[cfg(target_arch = "x86_64")]
unsafe fn tile_product(
    a: &[u16],
    a_stride: usize,
    b0: &[u16],
    b1: &[u16],
    k_tiles: usize,
    c: &mut [f32; BLOCK_ROWS * BLOCK_COLS],
) {
    use std::arch::asm;
    let a_bytes = a_stride * 2;
    let a0 = a.as_ptr();
    let a1 = a.as_ptr().add(16 * a_stride);
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
    for kb in 0..k_tiles {
        asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0.add(kb * TILE_K),
            a1 = in(reg) a1.add(kb * TILE_K),
            sa = in(reg) a_bytes,
            b0 = in(reg) b0.as_ptr().add(kb * TILE_ELEMS),
            b1 = in(reg) b1.as_ptr().add(kb * TILE_ELEMS),
            sb = in(reg) 64usize,
            options(nostack, readonly)
        );
    }
    let p = c.as_mut_ptr();
    asm!(
        "tilestored [{c0} + {s}*1], tmm0",
        "tilestored [{c1} + {s}*1], tmm1",
        "tilestored [{c2} + {s}*1], tmm2",
        "tilestored [{c3} + {s}*1], tmm3",
        c0 = in(reg) p,
        c1 = in(reg) p.add(16),
        c2 = in(reg) p.add(16 * BLOCK_COLS),
        c3 = in(reg) p.add(16 * BLOCK_COLS + 16),
        s = in(reg) BLOCK_COLS * 4,
        options(nostack)
    );
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_product(
    _: &[u16],
    _: usize,
    _: &[u16],
    _: &[u16],
    _: usize,
    _: &mut [f32; BLOCK_ROWS * BLOCK_COLS],
) {
    unreachable!("AMX is x86_64 only and `available()` is false elsewhere")
}

/// `x` (`rows x k` f32) as bf16 rows in `buf`, padded with zero rows to whole tile blocks.
fn to_bf16_rows(x: &[f32], rows: usize, k: usize, buf: &mut Vec<u16>) {
    let padded = rows.div_ceil(BLOCK_ROWS) * BLOCK_ROWS;
    buf.clear();
    buf.resize(padded * k, 0);
    buf[..rows * k]
        .par_chunks_mut(64 * k)
        .zip(x[..rows * k].par_chunks(64 * k))
        .for_each(|(dst, src)| {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = bf16(s);
            }
        });
}

/// e^x for the softmax (x <= 0 there): Cephes' polynomial on [-ln2/2, ln2/2] times 2^n, relative
/// error about 2e-7, branch-free so that loops over rows vectorise (libm's `expf` does not).
#[inline(always)]
#[allow(clippy::excessive_precision)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_375 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Layer norm of each `h`-wide row of `x`, in place.
fn layer_norm(x: &mut [f32], h: usize, gamma: &[f32], beta: &[f32], eps: f32) {
    x.par_chunks_mut(64 * h).for_each(|rows| {
        for row in rows.chunks_exact_mut(h) {
            let mean = row.iter().sum::<f32>() / h as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                *v = (*v - mean) * rstd * g + b;
            }
        }
    });
}

/// Self-attention over packed sequences: `qkv` rows are `[q | k | v]` (`3h` wide, queries already
/// scaled by 1/sqrt(head size)), `lens` the sequences' lengths in order; writes each token's
/// context (`h` wide, heads side by side) to `out`.
fn attention(qkv: &[f32], lens: &[usize], h: usize, heads: usize, out: &mut [f32]) {
    let d = h / heads;
    let mut parts = Vec::with_capacity(lens.len());
    let mut rest = out;
    let mut offset = 0;
    for &len in lens {
        let (part, tail) = rest.split_at_mut(len * h);
        parts.push((offset, part));
        rest = tail;
        offset += len;
    }
    parts.into_par_iter().for_each(|(offset, ctx)| {
        let len = ctx.len() / h;
        let base = &qkv[offset * 3 * h..(offset + len) * 3 * h];
        let mut scores = vec![0f32; len * len];
        for head in 0..heads {
            let q = base[head * d..].as_ptr();
            let k = base[h + head * d..].as_ptr();
            let v = base[2 * h + head * d..].as_ptr();
            let stride = 3 * h as isize;
            // SAFETY: q, k and v address len rows of d values at row stride 3h inside `base`;
            // scores holds len x len.
            unsafe {
                // scores = Q K^T: Q's rows at stride 3h; K^T's column j is key row j.
                product(
                    (len, len, d),
                    (scores.as_mut_ptr(), len as isize),
                    (q, stride),
                    (k, 1, stride),
                    gemm::Parallelism::None,
                )
            };
            for row in scores.chunks_exact_mut(len) {
                let max = max(row);
                for s in row.iter_mut() {
                    *s = exp(*s - max);
                }
                let inv = 1.0 / sum(row);
                for s in row.iter_mut() {
                    *s *= inv;
                }
            }
            // SAFETY: as above; ctx holds len rows of h, this head's d columns written.
            unsafe {
                // context = P V, into this head's columns of ctx (row stride h).
                let dst = ctx[head * d..].as_mut_ptr();
                product(
                    (len, d, len),
                    (dst, h as isize),
                    (scores.as_ptr(), len as isize),
                    (v, stride, 1),
                    gemm::Parallelism::None,
                )
            };
        }
    });
}

/// `dst` (m x n: pointer, row stride) = `lhs` (m x k: pointer, row stride) x `rhs` (k x n:
/// pointer, row stride, column stride), columns of dst and lhs contiguous, in f32 on the gemm
/// crate's kernels.
///
/// # Safety
/// The pointers must address matrices of these shapes and strides, dst not overlapping the others.
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, isize),
    (lhs, lhs_rs): (*const f32, isize),
    (rhs, rhs_rs, rhs_cs): (*const f32, isize, isize),
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        false,
        lhs,
        1,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        0.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    )
}

/// The largest of `xs` (not NaN), in 16 lanes: a fold with `f32::max` stays a scalar
/// compare-and-move loop (it showed in the softmax's profile).
fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let mut tail = f32::NEG_INFINITY;
    for &x in chunks.remainder() {
        if x > tail {
            tail = x;
        }
    }
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            if x > *l {
                *l = x;
            }
        }
    }
    lanes.iter().fold(tail, |m, &l| if l > m { l } else { m })
}

/// A sum in 16 lanes (vectorises, unlike a sequential float fold).
fn sum(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// One encoder layer's weights.
pub(crate) struct PackedLayer {
    pub qkv: PackedLinear,
    pub attention_out: PackedLinear,
    pub attention_norm: (Vec<f32>, Vec<f32>),
    pub intermediate: PackedLinear,
    pub output: PackedLinear,
    pub output_norm: (Vec<f32>, Vec<f32>),
}

/// A BERT encoder over packed tokens.
pub(crate) struct PackedBert {
    pub word: Vec<f32>,
    pub position: Vec<f32>,
    pub token_type: Vec<f32>,
    pub norm: (Vec<f32>, Vec<f32>),
    pub layers: Vec<PackedLayer>,
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub eps: f32,
}

impl PackedBert {
    /// Whether its projections run on AMX tiles.
    pub fn uses_tiles(&self) -> bool {
        self.layers.iter().any(|l| {
            [&l.qkv, &l.attention_out, &l.intermediate, &l.output]
                .iter()
                .any(|p| p.uses_tiles())
        })
    }

    /// The last layer's states of each sequence of token ids, packed (`sum of lengths x hidden`).
    /// Ids must be below the vocabulary size and sequences within the position table (the
    /// tokenizer truncates to it).
    pub fn forward(&self, seqs: &[&[u32]]) -> Vec<f32> {
        let h = self.hidden;
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let rows: usize = lens.iter().sum();
        let mut x = vec![0f32; rows * h];
        let mut offset = 0;
        for seq in seqs {
            for (p, &id) in seq.iter().enumerate() {
                let dst = &mut x[(offset + p) * h..][..h];
                let word = &self.word[id as usize * h..][..h];
                let pos = &self.position[p * h..][..h];
                for (((d, w), q), t) in dst.iter_mut().zip(word).zip(pos).zip(&self.token_type[..h])
                {
                    *d = w + q + t;
                }
            }
            offset += seq.len();
        }
        layer_norm(&mut x, h, &self.norm.0, &self.norm.1, self.eps);
        let mut a = Vec::new();
        let mut qkv = vec![0f32; rows * 3 * h];
        let mut ctx = vec![0f32; rows * h];
        let mut y = vec![0f32; rows * h];
        let mut inner = vec![0f32; rows * self.intermediate];
        for layer in &self.layers {
            layer
                .qkv
                .forward(&x, rows, &mut a, Epilogue::Bias, &mut qkv);
            attention(&qkv, &lens, h, self.heads, &mut ctx);
            layer
                .attention_out
                .forward(&ctx, rows, &mut a, Epilogue::BiasResidual(&x), &mut y);
            let (g, b) = &layer.attention_norm;
            layer_norm(&mut y, h, g, b, self.eps);
            layer
                .intermediate
                .forward(&y, rows, &mut a, Epilogue::BiasGelu, &mut inner);
            layer
                .output
                .forward(&inner, rows, &mut a, Epilogue::BiasResidual(&y), &mut x);
            let (g, b) = &layer.output_norm;
            layer_norm(&mut x, h, g, b, self.eps);
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_max_and_sum_match_sequential_folds() {
        for len in [1usize, 15, 16, 17, 40, 255] {
            let xs: Vec<f32> = (0..len)
                .map(|i| -((i * 37 % 101) as f32) / 7.0 - 1.0)
                .collect();
            let want = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&xs), want, "len {len}");
            let total: f64 = xs.iter().map(|&x| x as f64).sum();
            assert!((sum(&xs) as f64 - total).abs() < 1e-3, "len {len}");
        }
    }

    #[test]
    fn exp_is_within_a_few_ulp() {
        let mut worst = 0f64;
        // Down to where e^x leaves the normal floats (the softmax needs no more).
        for i in 0..=174_000 {
            let x = -(i as f32) / 2_000.0;
            let exact = (x as f64).exp();
            worst = worst.max(((exp(x) as f64) - exact).abs() / exact);
        }
        assert!(worst < 5e-7, "relative error {worst}");
    }

    /// Packed attention against the textbook formula, per sequence and head (head sizes of
    /// MiniLM/BGE-small, 32, and BGE-base, 64).
    #[test]
    fn packed_attention_matches_naive_attention() {
        for (h, heads) in [(64, 2), (128, 2)] {
            let d = h / heads;
            let lens = [5usize, 1, 17];
            let rows: usize = lens.iter().sum();
            let qkv: Vec<f32> = (0..rows * 3 * h)
                .map(|i| ((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let mut out = vec![0f32; rows * h];
            attention(&qkv, &lens, h, heads, &mut out);
            let mut offset = 0;
            for &len in &lens {
                for head in 0..heads {
                    let at = |r: usize, part: usize, c: usize| {
                        qkv[(offset + r) * 3 * h + part * h + head * d + c]
                    };
                    for i in 0..len {
                        let scores: Vec<f64> = (0..len)
                            .map(|j| {
                                (0..d)
                                    .map(|c| at(i, 0, c) as f64 * at(j, 1, c) as f64)
                                    .sum()
                            })
                            .collect();
                        let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                        let total: f64 = e.iter().sum();
                        for c in 0..d {
                            let want: f64 =
                                (0..len).map(|j| e[j] / total * at(j, 2, c) as f64).sum();
                            let got = out[(offset + i) * h + head * d + c] as f64;
                            assert!((got - want).abs() < 1e-5, "h {h} seq at {offset} head {head} row {i} col {c}: {got} vs {want}");
                        }
                    }
                }
                offset += len;
            }
        }
    }

    /// Both kinds of projection against a plain f64 product (of the bf16-rounded operands for
    /// the tiles), with each epilogue.
    #[test]
    fn projections_match_a_plain_product() {
        request_amx_tiles();
        let (rows, n, k) = (45, 64, 96);
        let val = |i: usize, m: usize| ((i * 7919 + m) % 97) as f32 / 48.0 - 1.0;
        let w: Vec<f32> = (0..n * k).map(|i| val(i, 3)).collect();
        let bias: Vec<f32> = (0..n).map(|i| val(i, 5)).collect();
        let x: Vec<f32> = (0..rows * k).map(|i| val(i, 11)).collect();
        let res: Vec<f32> = (0..rows * n).map(|i| val(i, 13)).collect();
        let round = |v: f32| f32::from_bits((bf16(v) as u32) << 16);
        for tiles in [false, true] {
            let lin = PackedLinear::new(w.clone(), bias.clone(), n, k, tiles);
            if tiles && !lin.uses_tiles() {
                eprintln!("no AMX on this CPU: the tiled product is not run");
                continue;
            }
            let operand = |v: f32| if tiles { round(v) } else { v };
            let mut scratch = Vec::new();
            for epilogue in [Epilogue::BiasResidual(&res), Epilogue::BiasGelu] {
                let mut out = vec![0f32; rows * n];
                lin.forward(&x, rows, &mut scratch, epilogue, &mut out);
                for r in 0..rows {
                    for c in 0..n {
                        let dot: f64 = (0..k)
                            .map(|i| operand(x[r * k + i]) as f64 * operand(w[c * k + i]) as f64)
                            .sum();
                        let want = match epilogue {
                            Epilogue::BiasResidual(_) => {
                                (dot + bias[c] as f64 + res[r * n + c] as f64) as f32
                            }
                            _ => crate::bert::gelu((dot + bias[c] as f64) as f32),
                        };
                        let got = out[r * n + c];
                        assert!(
                            (got - want).abs() < 1e-4,
                            "tiles {tiles}, row {r} col {c}: {got} vs {want}"
                        );
                    }
                }
            }
        }
        // 48 outputs do not fill 32-wide tile blocks: f32 instead.
        assert!(
            !PackedLinear::new(w[..48 * k].to_vec(), bias[..48].to_vec(), 48, k, true).uses_tiles()
        );
    }
}
