//! The key/value cache of a decoder: preallocated per-layer buffers written in place, so a decode
//! step costs the same at position 4,000 as at 100 (apart from attention itself), and a conversation
//! can truncate it to a shared prefix and extend it again.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

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
    dtype: DType,
    device: Device,
}

impl KvCache {
    /// An empty cache for `layers` layers that may hold up to `max_len` positions.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        max_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            layers: vec![None; layers],
            len: 0,
            capacity: 0,
            max_len,
            kv_heads,
            head_dim,
            dtype,
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

    /// The element type the cache stores.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes held by the buffers.
    pub fn allocated_bytes(&self) -> usize {
        self.layers.iter().flatten().count()
            * self.kv_heads
            * self.capacity
            * self.head_dim
            * self.dtype.size_in_bytes()
    }

    /// Views of layer `layer`'s cached keys and values, `(1, kv_heads, len, head_dim)` each, as
    /// attention reads them; `None` before anything was reserved or past the last layer.
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
                self.head_dim,
            ),
            self.dtype,
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
        // A cache may hold a narrower type than the model computes in (f16 on a CPU).
        let stored = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(self.dtype)?.contiguous()?) };
        ck.slice_set(&stored(k)?, 2, self.len)?;
        cv.slice_set(&stored(v)?, 2, self.len)?;
        let total = self.len + n;
        Ok((ck.narrow(2, 0, total)?, cv.narrow(2, 0, total)?))
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
            self.dtype,
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
        let fill = (Tensor::ones(shape, DType::F32, &self.device)? * 0.01)?.to_dtype(self.dtype)?;
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
    /// alone, and growing the buffer keeps what was written, for each dtype the cache stores.
    #[test]
    fn layers_are_separate_views_that_survive_growth() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let (layers, heads, hd) = (3, 2, 4);
            let mut cache = KvCache::new(layers, heads, hd, 4 * BLOCK, dtype, &dev);
            cache.reserve(1).unwrap();
            let row = |x: f32| Tensor::full(x, (1, heads, 1, hd), &dev).unwrap();
            for l in 0..layers {
                cache
                    .append(l, &row(l as f32), &row(10.0 + l as f32))
                    .unwrap();
            }
            cache.advance(1);
            // Past the first allocation: the buffer is replaced and the first position copied.
            cache.reserve(2 * BLOCK).unwrap();
            assert!(cache.capacity() > 2 * BLOCK);
            for l in 0..layers {
                let (k, v) = cache.layer(l).unwrap();
                assert_eq!(k.dims(), [1, heads, 1, hd]);
                let values = |t: Tensor| -> Vec<f32> {
                    let t = t.to_dtype(DType::F32).unwrap();
                    t.flatten_all().unwrap().to_vec1().unwrap()
                };
                let (k, v) = (values(k), values(v));
                assert!(
                    k.iter().all(|&x| x == l as f32),
                    "{dtype:?} layer {l} keys: {k:?}"
                );
                assert!(
                    v.iter().all(|&x| x == 10.0 + l as f32),
                    "{dtype:?} layer {l} values"
                );
            }
            assert!(cache.layer(layers).is_none());
        }
    }
}
