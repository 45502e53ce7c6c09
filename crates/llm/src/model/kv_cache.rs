//! The key/value cache of a decoder: preallocated per-layer buffers written in place, so a decode
//! step costs the same at position 4,000 as at 100 (apart from attention itself), and a conversation
//! can truncate it to a shared prefix and extend it again. Rows are stored as f32, f16, bf16 or
//! llama.cpp's Q8_0 blocks ([`KvFormat`]).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// What a KV cache stores each key and value row as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvFormat {
    /// 32-bit floats: the reference's numbers exactly.
    F32,
    /// IEEE half precision: half the bytes of f32 (llama.cpp's default cache type).
    F16,
    /// bfloat16.
    Bf16,
    /// llama.cpp's Q8_0 (`-ctk q8_0 -ctv q8_0`): blocks of 32 values as 8-bit integers with a
    /// scale, rounded as llama.cpp rounds them. The scale is kept as f32 rather than Q8_0's f16
    /// (36 bytes for 32 values, 0.56 of f16's bytes rather than 0.53): then the decode
    /// attention's multiply by it takes it straight from memory, where widening an f16 scale
    /// made the kernel compute-bound. Needs a head size that is a multiple of 32.
    Q8_0,
}

impl KvFormat {
    /// The dtype of the cache's buffers: the float type itself, or `U8` for Q8_0's block bytes.
    pub fn storage_dtype(self) -> DType {
        match self {
            KvFormat::F32 => DType::F32,
            KvFormat::F16 => DType::F16,
            KvFormat::Bf16 => DType::BF16,
            KvFormat::Q8_0 => DType::U8,
        }
    }

    /// The float format storing `dtype`, if there is one.
    pub fn of_dtype(dtype: DType) -> Option<KvFormat> {
        match dtype {
            DType::F32 => Some(KvFormat::F32),
            DType::F16 => Some(KvFormat::F16),
            DType::BF16 => Some(KvFormat::Bf16),
            _ => None,
        }
    }

    /// Elements of [`Self::storage_dtype`] one row of `head_dim` values takes.
    pub fn row_width(self, head_dim: usize) -> usize {
        match self {
            KvFormat::Q8_0 => q8_0_row_bytes(head_dim),
            _ => head_dim,
        }
    }

    /// Whether rows of `head_dim` values can be stored in this format.
    pub fn fits_head_dim(self, head_dim: usize) -> bool {
        self != KvFormat::Q8_0 || head_dim.is_multiple_of(Q8_0_BLOCK)
    }

    /// Bytes one position of one KV head takes for its key (or its value).
    pub fn row_bytes(self, head_dim: usize) -> usize {
        self.row_width(head_dim) * self.storage_dtype().size_in_bytes()
    }
}

impl FromStr for KvFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(KvFormat::F32),
            "f16" | "float16" | "half" => Ok(KvFormat::F16),
            "bf16" | "bfloat16" => Ok(KvFormat::Bf16),
            "q8_0" | "q8" => Ok(KvFormat::Q8_0),
            _ => Err(Error::invalid("kv-cache", s, "f32, f16, bf16 or q8_0")),
        }
    }
}

impl fmt::Display for KvFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvFormat::F32 => "f32",
            KvFormat::F16 => "f16",
            KvFormat::Bf16 => "bf16",
            KvFormat::Q8_0 => "q8_0",
        })
    }
}

/// Values per Q8_0 block.
pub(crate) const Q8_0_BLOCK: usize = 32;

/// Bytes per Q8_0 block as the cache stores it: an f32 scale (little-endian), then 32 signed
/// bytes (llama.cpp's `block_q8_0` has an f16 scale).
pub(crate) const Q8_0_BLOCK_BYTES: usize = 36;

/// Bytes of one Q8_0 row of `head_dim` values.
pub(crate) fn q8_0_row_bytes(head_dim: usize) -> usize {
    head_dim / Q8_0_BLOCK * Q8_0_BLOCK_BYTES
}

/// `t` (f32 or any float, `(.., head_dim)` rows) as Q8_0 rows: a `U8` tensor of the same leading
/// dims and [`KvFormat::row_width`] bytes per row. On a GPU the rows round-trip through the CPU.
fn quantize_q8_0(t: &Tensor) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let hd = *dims.last().unwrap_or(&0);
    let values: Vec<f32> = t
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1()?;
    let mut bytes = vec![0u8; values.len() / Q8_0_BLOCK * Q8_0_BLOCK_BYTES];
    for (x, block) in values
        .chunks_exact(Q8_0_BLOCK)
        .zip(bytes.chunks_exact_mut(Q8_0_BLOCK_BYTES))
    {
        quantize_q8_0_block(x, block);
    }
    let shape = with_last_dim(dims, q8_0_row_bytes(hd));
    Ok(Tensor::from_vec(bytes, shape, &Device::Cpu)?.to_device(t.device())?)
}

/// `dims` with its last dimension (the row) replaced by `row`.
fn with_last_dim(mut dims: Vec<usize>, row: usize) -> Vec<usize> {
    if let Some(last) = dims.last_mut() {
        *last = row;
    }
    dims
}

/// 32 values as one block: `d = max|x| / 127`, `q = round(x / d)` (llama.cpp's
/// `quantize_row_q8_0_ref`, whose f16 scale is kept here as f32). Written out because candle's
/// `BlockQ8_0` fixes the scale as f16.
fn quantize_q8_0_block(x: &[f32], block: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    block[..4].copy_from_slice(&d.to_le_bytes());
    for (q, &v) in block[4..].iter_mut().zip(x) {
        *q = ((v * id).round() as i8) as u8;
    }
}

/// Q8_0 blocks (bytes; whole rows) back to f32 values, 32 per block into `out`, `q * d` per
/// value: the same products the decode attention's kernels form.
pub(crate) fn dequantize_q8_0(blocks: &[u8], out: &mut [f32]) {
    for (block, out) in blocks
        .chunks_exact(Q8_0_BLOCK_BYTES)
        .zip(out.chunks_exact_mut(Q8_0_BLOCK))
    {
        let d = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        for (o, &q) in out.iter_mut().zip(&block[4..]) {
            *o = f32::from(q as i8) * d;
        }
    }
}

/// The values of cache rows `t` (a view such as [`KvCache::layer`] returns: floats, or `U8`
/// rows of Q8_0 blocks, the one format stored as bytes) as `dtype`, `(.., head_dim)`: what
/// attention paths that need floats read.
pub fn widen_rows(t: &Tensor, head_dim: usize, dtype: DType) -> Result<Tensor> {
    if t.dtype() != KvFormat::Q8_0.storage_dtype() {
        return Ok(t.to_dtype(dtype)?);
    }
    let bytes: Vec<u8> = t.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?;
    let mut values = vec![0f32; bytes.len() / Q8_0_BLOCK_BYTES * Q8_0_BLOCK];
    dequantize_q8_0(&bytes, &mut values);
    let shape = with_last_dim(t.dims().to_vec(), head_dim);
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?
        .to_device(t.device())?
        .to_dtype(dtype)?)
}

/// Rows are allocated in blocks of this many positions so growth is rare and amortised.
const BLOCK: usize = 256;

/// A zeroed tensor of `shape`. On the CPU its memory is asked to be backed by huge pages (2 MiB
/// on x86-64) where the OS has them: a decode step at a long context streams the whole cache,
/// and with 4 KiB pages that stream crosses a page, and misses the TLB, every 64 cache lines (the
/// attention's criterion bench, 4,000 positions: 10-15% faster with huge pages).
fn zeroed(
    shape: (usize, usize, usize, usize),
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    use half::vec::HalfBitsVecExt;
    if !device.is_cpu() {
        return Tensor::zeros(shape, dtype, device);
    }
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    // Zeros come from the allocator's zeroed allocation (integers for the halves): fresh memory
    // whose pages are not touched yet, so the advice applies when they are first written.
    fn advised<T>(v: Vec<T>) -> Vec<T> {
        crate::device::advise_huge_pages(&v);
        v
    }
    match dtype {
        DType::F32 => Tensor::from_vec(advised(vec![0f32; n]), shape, device),
        DType::F16 => Tensor::from_vec(
            advised(vec![0u16; n]).reinterpret_into::<half::f16>(),
            shape,
            device,
        ),
        DType::BF16 => Tensor::from_vec(
            advised(vec![0u16; n]).reinterpret_into::<half::bf16>(),
            shape,
            device,
        ),
        DType::U8 => Tensor::from_vec(advised(vec![0u8; n]), shape, device),
        _ => Tensor::zeros(shape, dtype, device),
    }
}

/// The cached keys and values of every layer for one sequence.
///
/// Each layer's keys and values are `(1, kv_heads, capacity, head_dim)` views of one buffer for
/// the whole cache; `len` positions are valid. Unlike a
/// cache that concatenates at every step (quadratic copying over a generation), positions are written
/// in place with `slice_set` and read back as a narrowed view, which the CPU matmul accepts without a
/// copy. Growth doubles the capacity, so its copies add up to O(len) over a whole generation.
///
/// Not `Clone`: a cloned tensor shares its storage, so a derived clone would write into the
/// original's buffers (and the original into the clone's) until one of them grows. Copies are
/// explicit and fallible ([`Self::try_clone`], [`Self::copy_prefix`]), since they allocate.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    capacity: usize,
    max_len: usize,
    kv_heads: usize,
    head_dim: usize,
    format: KvFormat,
    device: Device,
}

impl KvCache {
    /// An empty cache for `layers` layers that may hold up to `max_len` positions, storing rows
    /// as `format` (Q8_0 only for head sizes that are a multiple of 32: see
    /// [`KvFormat::fits_head_dim`]; others store f16 instead).
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        max_len: usize,
        format: KvFormat,
        device: &Device,
    ) -> Self {
        let format = if format.fits_head_dim(head_dim) {
            format
        } else {
            KvFormat::F16
        };
        Self {
            layers: vec![None; layers],
            len: 0,
            capacity: 0,
            max_len,
            kv_heads,
            head_dim,
            format,
            device: device.clone(),
        }
    }

    /// Positions currently cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions this cache may hold (the context window).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Positions allocated (at least `len`).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// What the cache stores rows as.
    pub fn format(&self) -> KvFormat {
        self.format
    }

    /// Bytes held by the buffers: keys and values of every layer.
    pub fn allocated_bytes(&self) -> usize {
        2 * self.layers.iter().flatten().count()
            * self.kv_heads
            * self.capacity
            * self.format.row_bytes(self.head_dim)
    }

    /// Views of layer `layer`'s cached keys and values, `(1, kv_heads, len, row)` each, as
    /// attention reads them (`row` is the head size, or a Q8_0 row's bytes: [`widen_rows`] gives
    /// the values); `None` before anything was reserved or past the last layer.
    pub fn layer(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        let (k, v) = self.layers.get(layer)?.as_ref()?;
        Some((
            k.narrow(2, 0, self.len).ok()?,
            v.narrow(2, 0, self.len).ok()?,
        ))
    }

    /// Keeps the first `len` positions (a shared prefix) and forgets the rest; the buffers stay.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Forgets everything; the buffers stay allocated for reuse.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Makes room for `extra` more positions, growing every layer's buffers if needed.
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        if needed > self.max_len {
            return Err(Error::PromptTooLong {
                prompt_tokens: needed,
                context_window: self.max_len,
            });
        }
        if needed <= self.capacity {
            return Ok(());
        }
        let new_capacity =
            (needed.max(self.capacity * 2).div_ceil(BLOCK) * BLOCK).min(self.max_len);
        // One buffer for every layer's keys and values, each a view of it.
        let buffer = zeroed(
            (
                2 * self.layers.len(),
                self.kv_heads,
                new_capacity,
                self.format.row_width(self.head_dim),
            ),
            self.format.storage_dtype(),
            &self.device,
        )?;
        for (i, slot) in self.layers.iter_mut().enumerate() {
            let k = buffer.narrow(0, 2 * i, 1)?;
            let v = buffer.narrow(0, 2 * i + 1, 1)?;
            if let Some((old_k, old_v)) = slot.as_ref() {
                if self.len > 0 {
                    k.slice_set(&old_k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    v.slice_set(&old_v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
            }
            *slot = Some((k, v));
        }
        self.capacity = new_capacity;
        Ok(())
    }

    /// Writes `k`/`v` (`(1, kv_heads, n, head_dim)`) of layer `layer` at the current end and returns
    /// views of all cached keys and values including them. The length advances in [`Self::advance`],
    /// once every layer has written.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        let Some((ck, cv)) = self.layers.get(layer).and_then(|l| l.as_ref()) else {
            return Err(candle_core::Error::Msg(format!(
                "kv cache layer {layer} written before reserve()"
            ))
            .into());
        };
        ck.slice_set(&self.stored(k)?, 2, self.len)?;
        cv.slice_set(&self.stored(v)?, 2, self.len)?;
        let total = self.len + n;
        Ok((ck.narrow(2, 0, total)?, cv.narrow(2, 0, total)?))
    }

    /// Rows `t` `(.., head_dim)` as the cache stores them: a cache may hold a narrower type than
    /// the model computes in (f16, or Q8_0 blocks, on a CPU).
    fn stored(&self, t: &Tensor) -> Result<Tensor> {
        match self.format {
            KvFormat::Q8_0 => quantize_q8_0(t),
            f => Ok(t.to_dtype(f.storage_dtype())?.contiguous()?),
        }
    }

    /// Marks `n` more positions as valid after every layer appended them.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// A copy of the whole cache in buffers of its own: writing to either afterwards never
    /// changes the other.
    pub fn try_clone(&self) -> Result<KvCache> {
        self.copy_prefix(self.len)
    }

    /// A new cache holding a copy of the first `len` positions in buffers of its own: writing to
    /// either afterwards never changes the other.
    pub fn copy_prefix(&self, len: usize) -> Result<KvCache> {
        let len = len.min(self.len);
        let mut copy = KvCache::new(
            self.layers.len(),
            self.kv_heads,
            self.head_dim,
            self.max_len,
            self.format,
            &self.device,
        );
        if len == 0 {
            return Ok(copy);
        }
        copy.reserve(len)?;
        for (dst, src) in copy.layers.iter().zip(&self.layers) {
            if let (Some((dk, dv)), Some((sk, sv))) = (dst, src) {
                dk.slice_set(&sk.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                dv.slice_set(&sv.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
        }
        copy.len = len;
        Ok(copy)
    }

    /// Claims `n` more positions, filled with a constant as if a prompt of that length had been
    /// prefilled. Decode speed does not depend on the cached values, so benchmarks use this to
    /// measure decode at position 4,000 without first spending minutes on a prefill. The values
    /// are written, not left as the zeroed allocation: untouched pages all map the kernel's one
    /// zero page, and reading them costs no memory traffic (decode at 4,000 positions then looked
    /// faster than it is after a real prefill, and the cache used no memory).
    pub fn fill_for_benchmark(&mut self, n: usize) -> Result<()> {
        self.reserve(n)?;
        let shape = (1, self.kv_heads, n, self.head_dim);
        let fill = self.stored(&(Tensor::ones(shape, DType::F32, &self.device)? * 0.01)?)?;
        for (k, v) in self.layers.iter().flatten() {
            k.slice_set(&fill, 2, self.len)?;
            v.slice_set(&fill, 2, self.len)?;
        }
        self.len += n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every layer's keys and values are views of one buffer; writing one layer leaves the others
    /// alone, and growing the buffer keeps what was written, for each format the cache stores.
    #[test]
    fn layers_are_separate_views_that_survive_growth() {
        let dev = Device::Cpu;
        for format in [KvFormat::F32, KvFormat::F16, KvFormat::Bf16, KvFormat::Q8_0] {
            let (layers, heads, hd) = (3, 2, 64);
            let mut cache = KvCache::new(layers, heads, hd, 4 * BLOCK, format, &dev);
            assert_eq!(cache.format(), format);
            cache.reserve(1).unwrap();
            // Powers of two: exact in the float formats; Q8_0 gives back 127 times the f32
            // rounding of x / 127, within 1e-3 of x.
            let tol = |x: f32| {
                if format == KvFormat::Q8_0 {
                    1e-3 * x.abs()
                } else {
                    0.0
                }
            };
            let key = |l: usize| 2f32.powi(l as i32 - 1);
            let value = |l: usize| -(2f32.powi(l as i32 + 2));
            let row = |x: f32| Tensor::full(x, (1, heads, 1, hd), &dev).unwrap();
            for l in 0..layers {
                cache.append(l, &row(key(l)), &row(value(l))).unwrap();
            }
            cache.advance(1);
            // Past the first allocation: the buffer is replaced and the first position copied.
            cache.reserve(2 * BLOCK).unwrap();
            assert!(cache.capacity() > 2 * BLOCK);
            assert_eq!(
                cache.allocated_bytes(),
                2 * layers * heads * cache.capacity() * format.row_bytes(hd)
            );
            for l in 0..layers {
                let (k, v) = cache.layer(l).unwrap();
                assert_eq!(k.dims(), [1, heads, 1, format.row_width(hd)]);
                let values = |t: Tensor| -> Vec<f32> {
                    let t = widen_rows(&t, hd, DType::F32).unwrap();
                    assert_eq!(t.dims(), [1, heads, 1, hd]);
                    t.flatten_all().unwrap().to_vec1().unwrap()
                };
                let (k, v) = (values(k), values(v));
                assert!(
                    k.iter().all(|&x| (x - key(l)).abs() <= tol(key(l))),
                    "{format} layer {l} keys: {k:?}"
                );
                assert!(
                    v.iter().all(|&x| (x - value(l)).abs() <= tol(value(l))),
                    "{format} layer {l} values: {v:?}"
                );
            }
            assert!(cache.layer(layers).is_none());
        }
    }

    /// Q8_0 rows: each value within half a step (the block's largest magnitude / 127 / 2) of the
    /// original, blocks laid out as llama.cpp's `block_q8_0` with an f32 scale, zeros kept, and a
    /// head size that is not a multiple of 32 stores f16 instead.
    #[test]
    fn q8_0_rows_round_trip_within_half_a_step() {
        let dev = Device::Cpu;
        let hd = 128;
        let values: Vec<f32> = (0..3 * hd)
            .map(|i| ((i * 7919) % 1009) as f32 / 97.0 - 5.0 + if i % 37 == 0 { 40.0 } else { 0.0 })
            .collect();
        let t = Tensor::from_vec(values.clone(), (1, 3, hd), &dev).unwrap();
        let q = quantize_q8_0(&t).unwrap();
        assert_eq!(q.dims(), [1, 3, 144]);
        assert_eq!(q.dtype(), DType::U8);
        let back: Vec<f32> = widen_rows(&q, hd, DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (b, (block, got)) in values.chunks(32).zip(back.chunks(32)).enumerate() {
            let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
            let step = amax / 127.0;
            for (x, y) in block.iter().zip(got) {
                assert!(
                    (x - y).abs() <= 0.5 * step + 1e-6 * amax,
                    "block {b}: {x} vs {y}"
                );
            }
        }
        // The first block's bytes: the scale as f32, then the quants; the largest value is 127.
        let bytes: Vec<u8> = q.flatten_all().unwrap().to_vec1().unwrap();
        let amax = values[..32].iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        assert_eq!(d, amax / 127.0);
        assert!(bytes[4..36]
            .iter()
            .any(|&b| (b as i8).unsigned_abs() == 127));
        // Zeros (a block of them has scale 0) stay zeros.
        let zeros = quantize_q8_0(&Tensor::zeros((1, 32), DType::F32, &dev).unwrap()).unwrap();
        let back = widen_rows(&zeros, 32, DType::F32).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0f32; 32]
        );
        let odd = KvCache::new(1, 1, 40, BLOCK, KvFormat::Q8_0, &dev);
        assert_eq!(odd.format(), KvFormat::F16);
    }

    #[test]
    fn formats_parse_and_print_as_llama_cpp_spells_them() {
        for f in [KvFormat::F32, KvFormat::F16, KvFormat::Bf16, KvFormat::Q8_0] {
            assert_eq!(f.to_string().parse::<KvFormat>().unwrap(), f);
        }
        assert_eq!("Q8_0".parse::<KvFormat>().unwrap(), KvFormat::Q8_0);
        let err = "q4_0".parse::<KvFormat>().unwrap_err().to_string();
        assert!(err.contains("q8_0"), "{err}");
    }
}
