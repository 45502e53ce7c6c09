//! Quantized CPU tensors that stay in a memory-mapped GGUF file instead of being copied into the
//! heap: a 40 GB file opens in the time it takes to read its header, and resident memory is the
//! pages the model touches. candle reads quantized blocks through its `QuantizedType` trait, which
//! it implements only for owned `Vec`s; this implements it for a slice of the mapping (written by
//! hand because no crate offers a mapped candle tensor).

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::k_quants::{
    self, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1,
    BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType,
};
use candle_core::quantized::{GgmlDType, QStorage, QTensor, QuantizedType};
use candle_core::{CpuStorage, Shape};
use half::{bf16, f16};
use memmap2::Mmap;

/// Blocks of type `T` at `range` (bytes) of a mapped file; turned into an owned copy only if
/// candle ever writes into them (quantizing into an existing tensor, which loading never does).
enum Blocks<T> {
    Mapped { map: Arc<Mmap>, range: Range<usize> },
    Owned(Vec<T>),
}

struct MappedBlocks<T>(Blocks<T>);

impl<T: GgmlType> MappedBlocks<T> {
    fn slice(&self) -> &[T] {
        match &self.0 {
            Blocks::Mapped { map, range } => {
                let bytes = &map[range.clone()];
                // SAFETY: `new_tensor` checked that the range lies in the mapping, starts at an
                // address aligned for `T` and holds a whole number of `T`s; the GGUF block types
                // are plain data (integers and halves) for which every bit pattern is valid.
                unsafe {
                    std::slice::from_raw_parts(
                        bytes.as_ptr().cast::<T>(),
                        bytes.len() / std::mem::size_of::<T>(),
                    )
                }
            }
            Blocks::Owned(v) => v,
        }
    }

    fn owned(&mut self) -> &mut Vec<T> {
        if let Blocks::Mapped { .. } = self.0 {
            self.0 = Blocks::Owned(self.slice().to_vec());
        }
        match &mut self.0 {
            Blocks::Owned(v) => v,
            Blocks::Mapped { .. } => unreachable!("just replaced by an owned copy"),
        }
    }
}

impl<T: GgmlType + 'static> QuantizedType for MappedBlocks<T> {
    fn dtype(&self) -> GgmlDType {
        T::DTYPE
    }

    fn matmul_t(
        &self,
        mkn: (usize, usize, usize),
        lhs: &[f32],
        dst: &mut [f32],
    ) -> candle_core::Result<()> {
        k_quants::matmul(mkn, lhs, self.slice(), dst)
    }

    fn matmul_t_f16(
        &self,
        mkn: (usize, usize, usize),
        lhs: &[f16],
        dst: &mut [f16],
    ) -> candle_core::Result<()> {
        k_quants::matmul_f16(mkn, lhs, self.slice(), dst)
    }

    fn embedding(
        &self,
        ids: &[u32],
        rows: usize,
        hidden: usize,
    ) -> candle_core::Result<CpuStorage> {
        let blocks = self.slice();
        if !hidden.is_multiple_of(T::BLCK_SIZE) || blocks.len() != rows * hidden / T::BLCK_SIZE {
            candle_core::bail!(
                "quantized embedding of {rows} x {hidden} does not match {} blocks of {}",
                blocks.len(),
                T::BLCK_SIZE
            )
        }
        let row_blocks = hidden / T::BLCK_SIZE;
        let mut out = vec![0f32; ids.len() * hidden];
        for (i, &id) in ids.iter().enumerate() {
            let row = id as usize;
            if row >= rows {
                candle_core::bail!("embedding id {row} is out of range for {rows} rows")
            }
            T::to_float(
                &blocks[row * row_blocks..(row + 1) * row_blocks],
                &mut out[i * hidden..(i + 1) * hidden],
            );
        }
        Ok(CpuStorage::F32(out))
    }

    fn dequantize(&self, elem_count: usize) -> candle_core::Result<CpuStorage> {
        let mut ys = vec![0f32; elem_count];
        T::to_float(self.slice(), &mut ys);
        Ok(CpuStorage::F32(ys))
    }

    fn storage_size_in_bytes(&self) -> usize {
        std::mem::size_of_val(self.slice())
    }

    fn as_ptr(&self) -> *const u8 {
        self.slice().as_ptr().cast()
    }

    fn block_size(&self) -> usize {
        T::BLCK_SIZE
    }

    fn from_float(&mut self, xs: &[f32]) {
        T::from_float(xs, self.owned())
    }

    fn from_float_imatrix(&mut self, xs: &[f32], imatrix_weights: &[f32], n_per_row: usize) {
        T::from_float_imatrix(xs, self.owned(), imatrix_weights, n_per_row)
    }

    fn size(&self) -> usize {
        self.storage_size_in_bytes()
    }
}

fn boxed<T: GgmlType + 'static>(
    map: &Arc<Mmap>,
    range: Range<usize>,
) -> Option<Box<dyn QuantizedType>> {
    let size = std::mem::size_of::<T>();
    let aligned = (map.as_ptr() as usize + range.start).is_multiple_of(std::mem::align_of::<T>());
    (aligned && range.end <= map.len() && range.len().is_multiple_of(size)).then(|| {
        Box::new(MappedBlocks::<T>(Blocks::Mapped {
            map: map.clone(),
            range,
        })) as Box<dyn QuantizedType>
    })
}

/// A CPU tensor of `dtype` and `shape` over bytes `range` of `map`, without copying them. `None`
/// when the range does not fit the mapping or is misaligned for the block type (the caller then
/// reads a copy).
pub fn new_tensor(
    map: &Arc<Mmap>,
    range: Range<usize>,
    dtype: GgmlDType,
    shape: Shape,
) -> Option<QTensor> {
    let elems = shape.elem_count();
    if !elems.is_multiple_of(dtype.block_size())
        || range.len() != elems / dtype.block_size() * dtype.type_size()
    {
        return None;
    }
    let storage = match dtype {
        GgmlDType::F32 => boxed::<f32>(map, range),
        GgmlDType::F16 => boxed::<f16>(map, range),
        GgmlDType::BF16 => boxed::<bf16>(map, range),
        GgmlDType::Q4_0 => boxed::<BlockQ4_0>(map, range),
        GgmlDType::Q4_1 => boxed::<BlockQ4_1>(map, range),
        GgmlDType::Q5_0 => boxed::<BlockQ5_0>(map, range),
        GgmlDType::Q5_1 => boxed::<BlockQ5_1>(map, range),
        GgmlDType::Q8_0 => boxed::<BlockQ8_0>(map, range),
        GgmlDType::Q8_1 => boxed::<BlockQ8_1>(map, range),
        GgmlDType::Q2K => boxed::<BlockQ2K>(map, range),
        GgmlDType::Q3K => boxed::<BlockQ3K>(map, range),
        GgmlDType::Q4K => boxed::<BlockQ4K>(map, range),
        GgmlDType::Q5K => boxed::<BlockQ5K>(map, range),
        GgmlDType::Q6K => boxed::<BlockQ6K>(map, range),
        GgmlDType::Q8K => boxed::<BlockQ8K>(map, range),
    }?;
    QTensor::new(QStorage::Cpu(storage), shape).ok()
}
