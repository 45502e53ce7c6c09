//! The projection layers of the model: full-precision weights through candle's matmul (plus a CPU
//! fast path for a single row), or quantized weights through candle's quantized matmul (plus a
//! batched CPU path for prefill).
//!
//! Decoding multiplies one activation row by every weight matrix, so its speed is the memory
//! bandwidth at which the weights stream through. candle's CPU matmul (the `gemm` crate) reaches
//! about 10 GB/s for a (1 x 1536) x (1536 x 8960) f32 product on the 2-core reference machine, well
//! short of what the memory delivers; a row-parallel dot-product kernel over the (out, in) weight
//! rows, which are contiguous, streams each weight once at close to full bandwidth.
//!
//! Quantized prefill is the opposite problem: candle's generic quantized CPU matmul computes one
//! activation row at a time against the whole weight matrix, so a 1,500-token prompt reads the
//! weights 1,500 times and runs at decode speed. Q4_K, Q6_K and Q8_0 weights on x86 CPUs with
//! AVX-512 VNNI and VBMI, or with AVX2, FMA and F16C, go through thinkrag's own tiles ([`KTiles`])
//! for every row count; otherwise candle 0.11's tiled, repacked kernels reuse each weight tile
//! across many rows where candle has them; for the other formats and CPUs, a multi-row product
//! dequantizes the weight once and runs one f32 GEMM, which is compute-bound like a full-precision
//! prefill.

use std::sync::{Arc, OnceLock};

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor};
use rayon::prelude::*;

use super::ktiles::{Isa, KTiles};

/// Rows from which a quantized CPU matmul without a tiled candle kernel dequantizes its weight and
/// runs a GEMM instead of one pass over the weights per row: dequantizing a matrix costs about as
/// much as streaming it eight times.
const DEQUANTIZED_GEMM_ROWS: usize = 8;

/// A linear layer `y = x W^T + b` with weights `(out, in)` as published.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    /// How a quantized weight's products run, settled on its first product (or by
    /// [`Linear::keep_in_place`]); shared by clones.
    layout: Arc<OnceLock<Layout>>,
}

/// How a quantized weight's products run.
#[derive(Debug)]
enum Layout {
    /// Laid out for [`KTiles`]' kernels.
    Tiles(KTiles),
    /// candle's kernels (which may keep a repacked copy of their own) and the block products.
    Candle,
    /// The blocks read where they lie, in a memory-mapped file, and no copy made.
    InPlace,
}

/// A projection's weight matrix `(out, in)`.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Full precision, in the activation dtype.
    Dense(Tensor),
    /// GGML blocks, kept quantized in memory.
    Quantized(Arc<QTensor>),
}

impl Weight {
    /// `(out, in)`.
    pub fn dims2(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Self::Dense(t) => t.dims2(),
            Self::Quantized(q) => q.shape().dims2(),
        }
    }

    /// Bytes the weight occupies in memory.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Quantized(q) => q.storage_size_in_bytes(),
        }
    }
}

impl Linear {
    /// Wraps a weight `(out, in)` and an optional bias `(out,)`.
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            layout: Arc::default(),
        }
    }

    /// A quantized weight's layer whose products run the tiled kernels of `isa`, where this CPU
    /// runs them and the weight's format and shape take them: for benchmarks that compare the
    /// instruction sets on one CPU ([`crate::bench::TileKernels`]).
    pub fn with_tile_kernels(weight: Arc<QTensor>, isa: Isa) -> Option<Self> {
        let tiles = KTiles::with_isa(&weight, isa)?;
        let layer = Self::new(Weight::Quantized(weight), None);
        let _ = layer.layout.set(Layout::Tiles(tiles));
        Some(layer)
    }

    /// Wraps a full-precision weight `(out, in)` and an optional bias.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::new(Weight::Dense(weight), bias)
    }

    /// The weight `(out, in)`.
    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The weight in [`KTiles`]' layout (made on first use) when this CPU and its format take
    /// those kernels: then every product with it, of any row count, runs there.
    fn ktiles(&self) -> Option<&KTiles> {
        let Weight::Quantized(q) = &self.weight else {
            return None;
        };
        let layout = self
            .layout
            .get_or_init(|| KTiles::new(q).map_or(Layout::Candle, Layout::Tiles));
        match layout {
            Layout::Tiles(t) => Some(t),
            Layout::Candle | Layout::InPlace => None,
        }
    }

    /// Makes every product read the quantized blocks where they lie (a memory-mapped file, which
    /// the OS pages in and out as it needs) instead of laying them out for the tiled kernels,
    /// which copies them: for a model larger than the memory available. Slower (block by block
    /// dot products). No effect on a full-precision weight, nor on one a product has already laid
    /// out ([`Linear::runs_in_place`] tells).
    pub fn keep_in_place(&self) {
        if matches!(self.weight, Weight::Quantized(_)) {
            let _ = self.layout.set(Layout::InPlace);
        }
    }

    /// Whether the products read the blocks where they lie ([`Linear::keep_in_place`]).
    pub fn runs_in_place(&self) -> bool {
        matches!(self.layout.get(), Some(Layout::InPlace))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            Weight::Dense(w) => {
                if let Some(y) = single_row_f32(x, w, self.bias.as_ref())? {
                    return Ok(y);
                }
                candle_nn::Linear::new(w.clone(), None).forward(x)?
            }
            Weight::Quantized(q) if self.runs_in_place() => in_place_matmul(x, q)?,
            Weight::Quantized(q) => match self.ktiles() {
                Some(tiles) => return tiles_matmul(x, tiles, self.bias.as_ref()),
                None => quantized_matmul(x, q)?,
            },
        };
        self.add_bias(y)
    }
}

/// Most rows [`Linear::forward_rows`] multiplies with its small-batch kernels: a decode step of
/// that many sequences. Beyond it the rows go through the prefill kernels.
pub const MAX_SMALL_BATCH: usize = 64;

impl Linear {
    /// [`Linear::forward_rows`] of one input through several layers (a layer's query, key and
    /// value projections; its gate and up projections): where all of them take [`KTiles`]' kernels
    /// the input is quantized once and the products share one parallel region.
    pub fn forward_rows_many<const N: usize>(
        layers: [&Linear; N],
        x: &Tensor,
    ) -> candle_core::Result<[Tensor; N]> {
        let tiles: Option<Vec<&KTiles>> = layers.iter().map(|l| l.ktiles()).collect();
        let small = x.dims().last().is_some_and(|&k| {
            x.elem_count() / k.max(1) <= MAX_SMALL_BATCH && matches!(x.device(), Device::Cpu)
        });
        let ys: Vec<Tensor> = match tiles {
            Some(tiles) if small && N > 1 => {
                let biases: Vec<Option<&Tensor>> = layers.iter().map(|l| l.bias.as_ref()).collect();
                tiles_matmul_many(x, &tiles, &biases)?
            }
            _ => layers
                .iter()
                .map(|l| l.forward_rows(x))
                .collect::<candle_core::Result<_>>()?,
        };
        ys.try_into().map_err(|ys: Vec<Tensor>| {
            candle_core::Error::Msg(format!("{} products for {N} layers", ys.len()))
        })
    }

    /// `y + b` where the layer has a bias.
    fn add_bias(&self, y: Tensor) -> candle_core::Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// `x W^T + b` for the few rows of a batched decode step (one row per sequence), reading each
    /// weight once for all rows: [`KTiles`] or candle's tiled kernels where they apply, else every
    /// weight row multiplied by each activation row while it is in the L1 cache. Each row's result
    /// does not depend on the others (see `KTiles::matmul_many` and `small_batch_tiles`; the block
    /// dot product and the f32 dot run on the same inputs either way), so a sequence decoded in a batch gets bit-identical logits to
    /// the same sequence decoded alone. Falls back to [`Module::forward`] off the CPU, for other
    /// dtypes and above [`MAX_SMALL_BATCH`] rows.
    pub fn forward_rows(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            Weight::Dense(w) => small_batch_f32(x, w)?,
            Weight::Quantized(q) if self.runs_in_place() => Some(in_place_matmul(x, q)?),
            Weight::Quantized(q) => match self.ktiles() {
                Some(tiles) => return tiles_matmul(x, tiles, self.bias.as_ref()),
                None => small_batch_quantized(x, q)?,
            },
        };
        let Some(y) = y else {
            return self.forward(x);
        };
        self.add_bias(y)
    }
}

/// The rows of `x` (any leading shape, last dim `k`) as one contiguous f32 slice, or `None` when
/// the small-batch kernels do not apply.
fn small_batch_input(x: &Tensor, k: usize) -> candle_core::Result<Option<(Tensor, usize)>> {
    if !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 || x.dims().last() != Some(&k)
    {
        return Ok(None);
    }
    let rows = x.elem_count() / k.max(1);
    if rows == 0 || rows > MAX_SMALL_BATCH {
        return Ok(None);
    }
    Ok(Some((x.contiguous()?, rows)))
}

fn output_shape(x: &Tensor, n: usize) -> Vec<usize> {
    let mut shape = x.dims().to_vec();
    shape.pop();
    shape.push(n);
    shape
}

/// Small-batch `x W^T` for a dense f32 weight: see [`Linear::forward_rows`].
fn small_batch_f32(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if w.dtype() != DType::F32 || !w.is_contiguous() || !matches!(w.device(), Device::Cpu) {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    let Some((x, _)) = small_batch_input(x, k)? else {
        return Ok(None);
    };
    let Some(y) = with_cpu_f32_pair(&x, w, |xv, wv| dense_rows(xv, wv, n, k)) else {
        return Ok(None);
    };
    Ok(Some(Tensor::from_vec(y, output_shape(&x, n), x.device())?))
}

/// `x W^T` for the `x.len() / k` rows of `x` and the `n` rows of `w`, laid out `[row][n]`.
fn dense_rows(xv: &[f32], wv: &[f32], n: usize, k: usize) -> Vec<f32> {
    let rows = xv.len() / k;
    let mut y = vec![0f32; rows * n];
    if rows == 1 {
        matvec(wv, xv, &mut y);
    } else {
        let dot = dot_fn();
        let out = OutPtr(y.as_mut_ptr());
        let threads = rayon::current_num_threads().max(1);
        let rows_per_block = (n / (threads * 8)).clamp(16, 1024);
        (0..n.div_ceil(rows_per_block))
            .into_par_iter()
            .for_each(|block| {
                for r in block * rows_per_block..((block + 1) * rows_per_block).min(n) {
                    let wrow = &wv[r * k..(r + 1) * k];
                    for j in 0..rows {
                        let v = dot(wrow, &xv[j * k..(j + 1) * k]);
                        // SAFETY: blocks cover disjoint weight rows `r`, so each `j * n + r` is
                        // written by one thread only, and `y` outlives the parallel loop.
                        unsafe { out.write(j * n + r, v) };
                    }
                }
            });
    }
    y
}

/// Small-batch `x W^T` for a quantized weight: see [`Linear::forward_rows`].
fn small_batch_quantized(x: &Tensor, w: &Arc<QTensor>) -> candle_core::Result<Option<Tensor>> {
    if !matches!(w.device(), Device::Cpu) {
        return Ok(None);
    }
    let (n, k) = w.shape().dims2()?;
    let Some((x, rows)) = small_batch_input(x, k)? else {
        return Ok(None);
    };
    if candle_tiles_rows(w.dtype(), n, k) {
        return small_batch_tiles(&x, w, rows, n, k).map(Some);
    }
    let Some(y) = with_cpu_f32(&x, |xv| block_products(w, n, k, xv)).transpose()? else {
        return Ok(None);
    };
    y.map(|y| Tensor::from_vec(y, output_shape(&x, n), x.device()))
        .transpose()
}

/// Small-batch `x W^T` through candle's tiled, repacked kernels (Q4_K, Q6_K, and Q8_0 with VNNI):
/// they unpack each weight tile once for all rows and multiply with `vpdpbusd`, which measured
/// 2.6x faster than one block dot product per (weight row, activation row) at 4 rows on the
/// Sapphire Rapids development machine (and 1.5x at one row). A row's result does not depend on
/// the other rows, and one row alone takes the same kernel, except for Q6_K: candle keeps a single
/// Q6_K row on its compact-weight GEMV, whose rounding differs, so a lone Q6_K row is paired with a
/// copy of itself. A sequence decoded alone and in a batch then gets bit-identical logits. (On the
/// AMD Zen 5 machine of an earlier session, streaming Q4_K blocks through `gemm_small` decoded one
/// sequence faster than candle's 1-row tile path, 23 against 18 tokens/s; on this Intel machine
/// the tiles win, 17.4 against 11.2: measure before changing the choice.)
fn small_batch_tiles(
    x: &Tensor,
    w: &Arc<QTensor>,
    rows: usize,
    n: usize,
    k: usize,
) -> candle_core::Result<Tensor> {
    let flat = x.reshape((rows, k))?;
    let pad = rows == 1 && w.dtype() == GgmlDType::Q6K;
    let input = if pad {
        Tensor::cat(&[&flat, &flat], 0)?
    } else {
        flat
    };
    let y = QMatMul::from_arc(w.clone())?.forward(&input)?;
    let y = if pad { y.narrow(0, 0, 1)? } else { y };
    y.reshape(output_shape(x, n))
}

/// `x W^T` for the rows of `x` (`k` values each) over `w`'s blocks as stored, dispatched on the
/// block type (`gemm_small`); `None` for types without a kernel here.
fn block_products(
    w: &QTensor,
    n: usize,
    k: usize,
    x: &[f32],
) -> candle_core::Result<Option<Vec<f32>>> {
    let data = w.data()?;
    Ok(match w.dtype() {
        GgmlDType::Q8_0 => gemm_small::<BlockQ8_0>(&data, n, k, x),
        GgmlDType::Q4_0 => gemm_small::<BlockQ4_0>(&data, n, k, x),
        GgmlDType::Q4_1 => gemm_small::<BlockQ4_1>(&data, n, k, x),
        GgmlDType::Q5_0 => gemm_small::<BlockQ5_0>(&data, n, k, x),
        GgmlDType::Q5_1 => gemm_small::<BlockQ5_1>(&data, n, k, x),
        GgmlDType::Q2K => gemm_small::<BlockQ2K>(&data, n, k, x),
        GgmlDType::Q3K => gemm_small::<BlockQ3K>(&data, n, k, x),
        GgmlDType::Q4K => gemm_small::<BlockQ4K>(&data, n, k, x),
        GgmlDType::Q5K => gemm_small::<BlockQ5K>(&data, n, k, x),
        GgmlDType::Q6K => gemm_small::<BlockQ6K>(&data, n, k, x),
        _ => None,
    })
}

/// `y[j] = W x[j]` for the `x.len() / k` rows of `x` over a weight of `n` rows of blocks `T`: the
/// weight's blocks stream from memory as stored, once, each weight row meeting every activation row
/// (each quantized once, to the dot product's block type) while it is in L1. `None` when the bytes
/// are not such blocks (wrong length or alignment) or `k` does not split into the activation's
/// blocks.
///
/// An AVX-512 VNNI Q4_K dot product written for one row was no faster than candle's AVX2 one on the
/// AMD machine of an earlier session: there the single-row step is bound by memory.
fn gemm_small<T: GgmlType>(bytes: &[u8], n: usize, k: usize, x: &[f32]) -> Option<Vec<f32>> {
    let vk = T::VecDotType::BLCK_SIZE;
    if k == 0
        || !k.is_multiple_of(T::BLCK_SIZE)
        || !k.is_multiple_of(vk)
        || !x.len().is_multiple_of(k)
    {
        return None;
    }
    let rows = x.len() / k;
    let kb = k / T::BLCK_SIZE;
    let len = n * kb;
    if bytes.len() != len * std::mem::size_of::<T>()
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return None;
    }
    // SAFETY: candle keeps a CPU QTensor's blocks in a `Vec<T>` whose bytes these are; length and
    // alignment are checked above, and the blocks are plain integers and f16s.
    let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), len) };
    let xq: Vec<Vec<T::VecDotType>> = x
        .chunks_exact(k)
        .map(|row| {
            let mut q = vec![T::VecDotType::zeros(); k / vk];
            T::VecDotType::from_float(row, &mut q);
            q
        })
        .collect();
    let mut y = vec![0f32; rows * n];
    parallel_units(n, rows, &mut y, |r, j| {
        T::vec_dot(k, &blocks[r * kb..(r + 1) * kb], &xq[j])
    });
    Some(y)
}

/// `y[j * n + r] = cell(r, j)` for every weight row `r < n` and activation row `j < rows`, the
/// weight rows split across candle's barrier pool (the calling thread works too, and the same
/// workers run candle's own quantized kernels, so no third thread competes for two cores), each
/// weight row visiting every activation row before the next weight row.
fn parallel_units(n: usize, rows: usize, y: &mut [f32], cell: impl Fn(usize, usize) -> f32 + Sync) {
    const ROWS_PER_UNIT: usize = 16;
    debug_assert_eq!(y.len(), n * rows);
    let out = OutPtr(y.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(ROWS_PER_UNIT), |units| {
        for r in units.start * ROWS_PER_UNIT..(units.end * ROWS_PER_UNIT).min(n) {
            for j in 0..rows {
                let v = cell(r, j);
                // SAFETY: units are disjoint ranges of weight rows, so each `j * n + r` is
                // written by exactly one thread, and `y` outlives the call.
                unsafe { out.write(j * n + r, v) };
            }
        }
    });
}

/// `x W^T + b` through [`KTiles`], in `x`'s dtype.
fn tiles_matmul(x: &Tensor, tiles: &KTiles, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let mut ys = tiles_matmul_many(x, &[tiles], &[bias])?;
    Ok(ys.remove(0))
}

/// `x W^T + b` for several [`KTiles`] weights with the same input size and their biases
/// (`biases[i]` for `tiles[i]`, `None` for none), in `x`'s dtype. An f32 bias is added to the f32
/// products in place, the same sums `broadcast_add` makes (a Qwen2 layer's query, key and value
/// biases took three tensor ops and 0.5-0.7% of a 1.5B decode step that way); any other is added
/// by candle afterwards.
fn tiles_matmul_many(
    x: &Tensor,
    tiles: &[&KTiles],
    biases: &[Option<&Tensor>],
) -> candle_core::Result<Vec<Tensor>> {
    let Some(k) = tiles.first().map(|t| t.dims().1) else {
        return Ok(Vec::new());
    };
    if x.dims().last() != Some(&k) || tiles.iter().any(|t| t.dims().1 != k) {
        candle_core::bail!(
            "a product with ({k})-wide weights got an input of shape {:?}",
            x.dims()
        );
    }
    let dtype = x.dtype();
    let x = x
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let rows = x.elem_count() / k;
    let lens: Vec<usize> = tiles.iter().map(|t| rows * t.dims().0).collect();
    let mut ys: Vec<Vec<f32>> = lens.iter().map(|&len| Vec::with_capacity(len)).collect();
    {
        let mut parts: Vec<(&KTiles, &mut [std::mem::MaybeUninit<f32>])> = tiles
            .iter()
            .zip(ys.iter_mut().zip(&lens))
            .map(|(t, (y, &len))| (*t, &mut y.spare_capacity_mut()[..len]))
            .collect();
        with_cpu_f32(&x, |xv| KTiles::matmul_many(&mut parts, &xv[..rows * k])).ok_or_else(
            || candle_core::Error::Msg("a tiled product needs f32 input on the CPU".into()),
        )?;
    }
    for (y, &len) in ys.iter_mut().zip(&lens) {
        // SAFETY: `KTiles::matmul_many` wrote every one of the first `len` (`rows * n`) elements.
        unsafe { y.set_len(len) };
    }
    tiles
        .iter()
        .zip(ys)
        .enumerate()
        .map(|(i, (t, mut y))| {
            let n = t.dims().0;
            let bias = biases.get(i).copied().flatten();
            // Where the output stays f32, `y + b` here is bit-identical to candle's.
            let added = bias
                .filter(|b| dtype == DType::F32 && b.dims() == [n])
                .and_then(|b| with_cpu_f32(b, |b| add_to_rows(&mut y, b)))
                .is_some();
            let y = Tensor::from_vec(y, output_shape(&x, n), x.device())?.to_dtype(dtype)?;
            match bias {
                Some(b) if !added => y.broadcast_add(b),
                _ => Ok(y),
            }
        })
        .collect()
}

/// `x W^T` for a quantized `W`, in `x`'s dtype.
fn quantized_matmul(x: &Tensor, w: &Arc<QTensor>) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (n, k) = w.shape().dims2()?;
    let rows = x.elem_count() / k.max(1);
    // One row (a one-token prompt chunk) takes the decode step's kernels: the same numbers as a
    // decode step, and candle's tiles where they apply.
    if rows == 1 {
        if let Some(y) = small_batch_quantized(&x, w)? {
            return y.to_dtype(dtype);
        }
    }
    let y = if matches!(x.device(), Device::Cpu)
        && rows >= DEQUANTIZED_GEMM_ROWS
        && !candle_tiles_rows(w.dtype(), n, k)
    {
        let dense = w.dequantize(&Device::Cpu)?;
        x.broadcast_matmul(&dense.t()?)?
    } else {
        QMatMul::from_arc(w.clone())?.forward(&x)?
    };
    y.to_dtype(dtype)
}

/// `x W^T` reading `w`'s blocks where they lie: [`block_products`] for any number of rows (each
/// weight row streams once per call, however many rows meet it), or candle's product for formats
/// it does not take.
fn in_place_matmul(x: &Tensor, w: &Arc<QTensor>) -> candle_core::Result<Tensor> {
    let (n, k) = w.shape().dims2()?;
    if matches!(x.device(), Device::Cpu) && x.dims().last() == Some(&k) && k > 0 {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let rows = x.elem_count() / k;
        let y = with_cpu_f32(&x, |xv| block_products(w, n, k, &xv[..rows * k]))
            .transpose()?
            .flatten();
        if let Some(y) = y {
            return Tensor::from_vec(y, output_shape(&x, n), x.device())?.to_dtype(dtype);
        }
    }
    quantized_matmul(x, w)
}

/// `b` added to each row of `y` (rows of `b.len()`).
fn add_to_rows(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        for (v, &b) in row.iter_mut().zip(b) {
            *v += b;
        }
    }
}

/// `f` of a tensor's values where they are f32 in one contiguous span of CPU memory, in order;
/// `None` for another dtype, device or layout. The storage stays read-locked while `f` runs.
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(values)) = &*storage else {
        return None;
    };
    if !layout.is_contiguous() {
        return None;
    }
    let start = layout.start_offset();
    values.get(start..start + t.elem_count()).map(f)
}

/// [`with_cpu_f32`] of two tensors at once: `None` unless both qualify.
pub(crate) fn with_cpu_f32_pair<R>(
    a: &Tensor,
    b: &Tensor,
    f: impl FnOnce(&[f32], &[f32]) -> R,
) -> Option<R> {
    with_cpu_f32(a, |a| with_cpu_f32(b, |b| f(a, b))).flatten()
}

/// The output of a parallel computation (f32 products, or other elements), shared by the threads
/// that each write their own elements.
pub(crate) struct OutPtr<T = f32>(pub(crate) *mut T);
impl<T> Clone for OutPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for OutPtr<T> {}
impl<T> OutPtr<T> {
    /// # Safety
    /// `i` is in bounds of the buffer, and no other thread writes or reads element `i` meanwhile.
    pub(crate) unsafe fn write(&self, i: usize, v: T) {
        // SAFETY: as the caller promises.
        unsafe { self.0.add(i).write(v) }
    }

    /// Elements `start..start + len`, to fill.
    ///
    /// # Safety
    /// The range is in bounds of the buffer, initialized, and no other thread touches it while the
    /// slice lives.
    #[allow(clippy::mut_from_ref)] // disjoint ranges per thread, as the caller promises
    pub(crate) unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        // SAFETY: as the caller promises.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

// SAFETY: only used to write disjoint elements from the pool threads (see `parallel_units`).
unsafe impl<T: Send> Send for OutPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for OutPtr<T> {}

/// Whether candle 0.11 multiplies many rows by this weight with its tiled, repacked x86 kernels
/// (the conditions of its `repack_x86::select` for more than one row): one weight pass for all rows.
fn candle_tiles_rows(dtype: GgmlDType, n: usize, k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let vnni = std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vnni")
            || std::is_x86_feature_detected!("avxvnni");
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        if !(vnni || avx2) || k == 0 || !n.is_multiple_of(16) || !k.is_multiple_of(256) {
            return false;
        }
        match dtype {
            GgmlDType::Q4K | GgmlDType::Q6K => true,
            GgmlDType::Q8_0 => vnni,
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dtype, n, k);
        false
    }
}

/// `x W^T + b` for an `x` of one row on the CPU in f32; `None` when the fast path does not apply.
fn single_row_f32(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    if !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return Ok(None);
    }
    let dims = x.dims();
    let Some((&k, lead)) = dims.split_last() else {
        return Ok(None);
    };
    if lead.iter().product::<usize>() != 1 || !w.is_contiguous() {
        return Ok(None);
    }
    let (out_dim, in_dim) = w.dims2()?;
    if in_dim != k {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let y = with_cpu_f32_pair(&x, w, |xv, wv| {
        let mut y = vec![0f32; out_dim];
        matvec(wv, xv, &mut y);
        y
    });
    let Some(y) = y else {
        return Ok(None);
    };
    let mut out_shape = lead.to_vec();
    out_shape.push(out_dim);
    let y = Tensor::from_vec(y, out_shape, x.device())?;
    Ok(Some(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    }))
}

/// `y[r] = w[r, :] . x` for all rows, the rows split across rayon's threads. (rayon, not candle's
/// barrier pool as for quantized weights: measured 6.8 against 5.4 tokens/s for an f32 decode of
/// the 1.5B model on 2 cores.)
pub fn matvec(w: &[f32], x: &[f32], y: &mut [f32]) {
    let k = x.len();
    // Enough blocks to balance the threads, each big enough to amortise scheduling (>= 64 KiB).
    let threads = rayon::current_num_threads().max(1);
    let rows_per_block = (y.len() / (threads * 8)).clamp(16, 1024);
    let dot = dot_fn();
    y.par_chunks_mut(rows_per_block)
        .enumerate()
        .for_each(|(block, out)| {
            let first = block * rows_per_block;
            for (i, yi) in out.iter_mut().enumerate() {
                let row = &w[(first + i) * k..(first + i + 1) * k];
                *yi = dot(row, x);
            }
        });
}

/// Sixteen independent lanes: written so that LLVM vectorises it without reassociating floats.
#[inline(always)]
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (a16, a_rest) = a.as_chunks::<16>();
    let (b16, _) = b.as_chunks::<16>();
    for (ca, cb) in a16.iter().zip(b16) {
        for l in 0..16 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let tail = a.len() - a_rest.len();
    let mut s: f32 = acc.iter().sum();
    for (i, v) in a_rest.iter().enumerate() {
        s += v * b[tail + i];
    }
    s
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_impl(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: only selected by `dot_fn` after the CPU reported AVX2 and FMA.
    unsafe { dot_avx2_impl(a, b) }
}

/// The widest dot product this CPU runs (checked once per call of `matvec`, which is cheap).
pub(crate) fn dot_fn() -> fn(&[f32], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return dot_avx2;
        }
    }
    dot_portable
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer made for one instruction set's tile kernels runs them, and agrees with the layer
    /// thinkrag makes by itself; where the CPU lacks them (or the shape does not tile), none.
    #[test]
    fn a_layer_for_chosen_tile_kernels_agrees_with_the_default() {
        let w = Tensor::randn(0f32, 0.05, (32, 512), &Device::Cpu).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4K).unwrap());
        let x = Tensor::randn(0f32, 1.0, (1, 1, 512), &Device::Cpu).unwrap();
        let product = |l: &Linear| -> Vec<f32> {
            l.forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let want = product(&Linear::new(Weight::Quantized(Arc::clone(&q)), None));
        for isa in Isa::ALL {
            let Some(layer) = Linear::with_tile_kernels(Arc::clone(&q), isa) else {
                assert!(!isa.available(), "{isa:?} runs here but made no layer");
                continue;
            };
            assert!(layer.ktiles().is_some_and(|t| t.isa() == isa));
            for (g, w) in product(&layer).iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{isa:?}: {g} vs {w}"
                );
            }
        }
        let odd = Arc::new(
            QTensor::quantize(
                &Tensor::zeros((8, 256), DType::F32, &Device::Cpu).unwrap(),
                GgmlDType::Q4K,
            )
            .unwrap(),
        );
        assert!(Isa::ALL
            .into_iter()
            .all(|isa| Linear::with_tile_kernels(Arc::clone(&odd), isa).is_none()));
    }

    #[test]
    fn single_row_path_matches_candle_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (37, 53), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 37, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 1, 53), &dev).unwrap();
        let fast = Linear::dense(w.clone(), Some(b.clone()))
            .forward(&x)
            .unwrap();
        let reference = candle_nn::Linear::new(w, Some(b)).forward(&x).unwrap();
        assert_eq!(fast.dims(), reference.dims());
        let d = max_abs(&(fast - reference).unwrap());
        assert!(d < 1e-4, "{d}");
    }

    /// Each row of a small batch equals that row multiplied alone, to the bit (the property that
    /// lets a sequence decode identically in a batch and alone), for dense and quantized weights.
    #[test]
    fn small_batch_rows_equal_single_rows_bit_for_bit() {
        let dev = Device::Cpu;
        let (n, k) = (48, 512);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let mut layers = vec![Linear::dense(w.clone(), Some(b))];
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::Q4_0,
        ] {
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            layers.push(Linear::new(Weight::Quantized(q), None));
        }
        for rows in [1, 2, 5, 8] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, k), &dev).unwrap();
            for layer in &layers {
                let batch = layer.forward_rows(&x).unwrap();
                assert_eq!(batch.dims(), &[1, rows, n]);
                let batch = batch.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
                for (j, got) in batch.iter().enumerate() {
                    let one = layer.forward_rows(&x.narrow(1, j, 1).unwrap()).unwrap();
                    let one = one.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert_eq!(got, &one, "row {j} of {rows}");
                }
                // And close to the general path.
                let reference = layer.forward(&x).unwrap().squeeze(0).unwrap();
                let d = (Tensor::new(batch.clone(), &dev).unwrap() - &reference).unwrap();
                let rel = max_abs(&d) / max_abs(&reference);
                assert!(rel < 0.02, "{rel}");
            }
        }
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// `x W^T` against the dequantized weight: what is left is the activations' 8-bit rounding.
    fn quantized_vs_dequantized(dtype: GgmlDType, rows: usize, n: usize, k: usize) -> f32 {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, rows, k), &dev).unwrap();
        let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
        let exact = x
            .broadcast_matmul(&q.dequantize(&dev).unwrap().t().unwrap())
            .unwrap();
        let got = Linear::new(Weight::Quantized(q), None).forward(&x).unwrap();
        max_abs(&(got - &exact).unwrap()) / max_abs(&exact)
    }

    #[test]
    fn quantized_rows_match_the_dequantized_weight() {
        // One row (decode), a few rows, and a prefill-sized block, through every path: candle's
        // tiled kernels (Q4_K, Q8_0 with VNNI), its row-at-a-time kernel and our dequantized GEMM
        // (Q4_0, Q5_K).
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::Q4_0,
            GgmlDType::Q5K,
        ] {
            for rows in [1, 3, 40] {
                let rel = quantized_vs_dequantized(dtype, rows, 96, 512);
                assert!(rel < 0.02, "{dtype:?} x {rows} rows: relative error {rel}");
            }
        }
    }

    /// Projections sharing an input (query, key and value; gate and up), run together, give each
    /// layer's own result to the bit, biases included, whatever their formats and sizes.
    #[test]
    fn layers_sharing_an_input_match_each_alone() {
        let dev = Device::Cpu;
        let k = 512;
        let layer = |n: usize, dtype: GgmlDType, bias: bool| {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            let b = bias.then(|| Tensor::randn(0f32, 1.0, n, &dev).unwrap());
            Linear::new(Weight::Quantized(q), b)
        };
        let layers = [
            layer(96, GgmlDType::Q4K, true),
            layer(32, GgmlDType::Q4K, true),
            layer(32, GgmlDType::Q6K, false),
        ];
        let refs = [&layers[0], &layers[1], &layers[2]];
        for rows in [1, 4, 7] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, k), &dev).unwrap();
            let together = Linear::forward_rows_many(refs, &x).unwrap();
            assert_eq!(together.len(), layers.len());
            for (l, got) in layers.iter().zip(&together) {
                let alone = l.forward_rows(&x).unwrap();
                assert_eq!(got.dims(), alone.dims());
                let (got, alone) = (
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                assert_eq!(got, alone, "{rows} rows");
            }
        }
    }

    #[test]
    fn several_rows_go_through_candle() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 16), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 3, 16), &dev).unwrap();
        assert!(single_row_f32(&x, &w, None).unwrap().is_none());
        let y = Linear::dense(w, None).forward(&x).unwrap();
        assert_eq!(y.dims(), &[1, 3, 8]);
    }
}
