//! Where a model's tensors come from: safetensors (full precision, or quantized while loading) or a
//! GGUF file (quantized as stored). The model asks for tensors by their Hugging Face names; each
//! source maps and converts, so one model implementation serves every format.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::model::linear::Weight;
use crate::quant::Quantization;

/// A source of named tensors for building a model.
pub trait WeightSource {
    /// The dtype activations (and full-precision weights) run in.
    fn dtype(&self) -> DType;
    /// The device the tensors are put on.
    fn device(&self) -> &Device;
    /// A vector (norm weight, bias) of `len` elements, in [`Self::dtype`].
    fn vector(&self, name: &str, len: usize) -> Result<Tensor>;
    /// A matrix `(out, in)` for a projection or an embedding table.
    fn matrix(&self, name: &str, shape: (usize, usize)) -> Result<Weight>;
    /// Whether the source has a tensor of this name.
    fn contains(&self, name: &str) -> bool;
    /// The memory-mapped files whose pages quantized tensors use in place, if any.
    fn mapped_files(&self) -> Vec<Arc<memmap2::Mmap>> {
        Vec::new()
    }
    /// Whether the query and key projections come with each head's rows in llama.cpp's order for
    /// interleaved RoPE (a Llama GGUF) rather than Hugging Face's: the model then moves their
    /// outputs back into Hugging Face's order.
    fn qk_rows_in_gguf_order(&self) -> bool {
        false
    }
}

/// Safetensors with Hugging Face names, optionally quantized as they load.
pub struct SafetensorsWeights<'a> {
    vb: VarBuilder<'a>,
    quantize: Option<Quantization>,
    /// The model's layer count, which a mix's per-layer choices depend on.
    layers: usize,
}

impl<'a> SafetensorsWeights<'a> {
    /// Wraps a var builder; with `quantize`, every matrix is quantized to that format (rows it
    /// cannot split fall back as [`Quantization::for_row_length`] says).
    pub fn new(vb: VarBuilder<'a>, quantize: Option<Quantization>, layers: usize) -> Self {
        Self {
            vb,
            quantize,
            layers,
        }
    }
}

impl WeightSource for SafetensorsWeights<'_> {
    fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    fn device(&self) -> &Device {
        self.vb.device()
    }

    fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        Ok(self.vb.get(len, name)?)
    }

    fn matrix(&self, name: &str, shape: (usize, usize)) -> Result<Weight> {
        let Some(q) = self.quantize else {
            return Ok(Weight::Dense(self.vb.get(shape, name)?));
        };
        let t = self
            .vb
            .get_with_hints_dtype(shape, name, Default::default(), DType::F32)?;
        match q.for_tensor(name, self.layers, shape.1) {
            GgmlDType::F32 => Ok(Weight::Dense(t.to_dtype(self.dtype())?)),
            ggml => {
                // Quantizing runs on the CPU; the blocks then move to the device as they are.
                let t = t.to_device(&Device::Cpu)?;
                let q = QTensor::quantize_onto(&t, ggml, self.device())?;
                Ok(Weight::Quantized(Arc::new(q)))
            }
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }
}

/// Name under which a model asks its weights for RoPE frequency divisors: llama.cpp's tensor for
/// Llama 3.1+ scaling in GGUF files (config.json carries the scaling instead in safetensors models).
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// The GGUF name llama.cpp gives a Qwen2 or Llama tensor with this Hugging Face name.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        ROPE_FREQS => Some(ROPE_FREQS),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{kind}"))
}

/// A GGUF model with its header read (metadata and tensor directory), open for its tensors. The
/// header of a model with a 150k-token vocabulary is large: it is read once per load.
///
/// A model split by llama.cpp's `gguf-split` (`NAME-00001-of-00002.gguf`, ...: large files such
/// as a 70B Q8_0 ship so) is opened from its first part: the others are found beside it, checked
/// (`split.no`, `split.count`, `split.tensors.count`), and their tensors join the directory.
pub struct GgufFile {
    path: PathBuf,
    /// Metadata of the first part, tensor directory of all parts (each tensor's offset is
    /// within its own part).
    content: gguf_file::Content,
    parts: Vec<GgufPart>,
    /// Which part holds a tensor (absent: the first).
    part_of: std::collections::HashMap<String, usize>,
}

/// One file of a (possibly split) GGUF model.
struct GgufPart {
    path: PathBuf,
    tensor_data_offset: u64,
    reader: BufReader<File>,
}

/// An integer metadata value of any width, as llama.cpp writes `split.*` keys (u16, i32).
fn meta_int(c: &gguf_file::Content, key: &str) -> Option<u64> {
    let v = c.metadata.get(key)?;
    v.to_u64()
        .ok()
        .or_else(|| v.to_u32().ok().map(u64::from))
        .or_else(|| v.to_u16().ok().map(u64::from))
        .or_else(|| v.to_i32().ok().and_then(|x| u64::try_from(x).ok()))
        .or_else(|| v.to_i64().ok().and_then(|x| u64::try_from(x).ok()))
}

/// The paths of all `count` parts of a split model, from the first part's path
/// (`PREFIX-00001-of-0000N.gguf`, llama.cpp's naming).
fn split_paths(first: &Path, count: u64) -> std::result::Result<Vec<PathBuf>, String> {
    let name = first
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("the file name is not UTF-8")?;
    let suffix = format!("-00001-of-{count:05}.gguf");
    let prefix = name.strip_suffix(&suffix).ok_or_else(|| {
        format!(
            "a model split in {count} parts is opened from its first part, named PREFIX{suffix}"
        )
    })?;
    Ok((1..=count)
        .map(|i| first.with_file_name(format!("{prefix}-{i:05}-of-{count:05}.gguf")))
        .collect())
}

impl GgufFile {
    /// Opens `path` and reads its header (and those of the other parts of a split model), with
    /// errors that name the file.
    pub fn open(path: &Path) -> Result<Self> {
        let read = |p: &Path| -> Result<(gguf_file::Content, BufReader<File>)> {
            let file = File::open(p).map_err(|e| Error::io(p, e))?;
            let mut reader = BufReader::new(file);
            let content = crate::gguf::read_content(&mut reader, p)?;
            Ok((content, reader))
        };
        let weights_error = |p: &Path, message: String| Error::Weights {
            path: p.to_path_buf(),
            message,
        };
        let (mut content, reader) = read(path)?;
        let mut parts = vec![GgufPart {
            path: path.to_path_buf(),
            tensor_data_offset: content.tensor_data_offset,
            reader,
        }];
        let mut part_of = std::collections::HashMap::new();
        let count = meta_int(&content, "split.count").unwrap_or(1);
        if count > 1 {
            if meta_int(&content, "split.no").unwrap_or(0) != 0 {
                return Err(weights_error(
                    path,
                    format!(
                        "is part {} of a model split in {count}: open the first part",
                        meta_int(&content, "split.no").unwrap_or(0) + 1
                    ),
                ));
            }
            let paths = split_paths(path, count).map_err(|m| weights_error(path, m))?;
            for (no, part_path) in paths.iter().enumerate().skip(1) {
                if !part_path.is_file() {
                    return Err(weights_error(
                        part_path,
                        format!(
                            "is missing: part {} of the {count} parts of {}",
                            no + 1,
                            path.display()
                        ),
                    ));
                }
                let (part, reader) = read(part_path)?;
                if meta_int(&part, "split.no") != Some(no as u64)
                    || meta_int(&part, "split.count") != Some(count)
                {
                    return Err(weights_error(
                        part_path,
                        format!(
                            "is not part {} of {count} (its split.no/split.count say otherwise)",
                            no + 1
                        ),
                    ));
                }
                for (name, info) in part.tensor_infos {
                    if content.tensor_infos.contains_key(&name) {
                        return Err(weights_error(part_path, format!("repeats tensor {name}")));
                    }
                    part_of.insert(name.clone(), no);
                    content.tensor_infos.insert(name, info);
                }
                parts.push(GgufPart {
                    path: part_path.clone(),
                    tensor_data_offset: part.tensor_data_offset,
                    reader,
                });
            }
            if let Some(total) = meta_int(&content, "split.tensors.count") {
                if total != content.tensor_infos.len() as u64 {
                    return Err(weights_error(
                        path,
                        format!(
                            "its {count} parts hold {} tensors, split.tensors.count says {total}",
                            content.tensor_infos.len()
                        ),
                    ));
                }
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            parts,
            part_of,
        })
    }

    /// The file's path (the first part's, for a split model).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header: metadata and tensor directory (of all parts).
    pub fn content(&self) -> &gguf_file::Content {
        &self.content
    }

    /// How many files the model is in (1 unless split).
    pub fn parts(&self) -> usize {
        self.parts.len()
    }
}

/// A GGUF file's tensors. On a CPU the file is memory-mapped and quantized tensors use its pages
/// in place (nothing is read until used, and nothing is copied); on a GPU, or where the file
/// cannot be mapped, each tensor is read on request.
pub struct GgufWeights {
    path: PathBuf,
    content: gguf_file::Content,
    /// Each file's data: where its tensors start, a reader, and its mapping on a CPU.
    parts: Vec<MappedPart>,
    part_of: std::collections::HashMap<String, usize>,
    device: Device,
    dtype: DType,
    /// A Llama file: llama.cpp stores the query and key projections with their rows reordered
    /// for interleaved RoPE. They are used as stored (see [`WeightSource::qk_rows_in_gguf_order`]):
    /// putting them back in Hugging Face order would copy them out of the mapping, a second
    /// resident copy of 300 MB for the 8B model.
    qk_rows_in_gguf_order: bool,
}

/// One file of a [`GgufWeights`].
struct MappedPart {
    path: PathBuf,
    tensor_data_offset: u64,
    reader: Mutex<BufReader<File>>,
    map: Option<Arc<memmap2::Mmap>>,
}

impl GgufWeights {
    /// The tensors of an opened file, put on `device`; vectors and full-precision matrices in
    /// `dtype`.
    pub fn new(file: GgufFile, device: &Device, dtype: DType) -> Self {
        let qk_rows_in_gguf_order = file
            .content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .is_some_and(|a| a == "llama");
        let parts = file
            .parts
            .into_iter()
            .map(|p| {
                // SAFETY: mapped read-only; thinkrag never writes model files while they are
                // loaded, and the docs tell users not to modify a model in use (as for the
                // safetensors mapping).
                let map = device
                    .is_cpu()
                    .then(|| unsafe { memmap2::Mmap::map(p.reader.get_ref()) }.ok())
                    .flatten()
                    .map(Arc::new);
                MappedPart {
                    path: p.path,
                    tensor_data_offset: p.tensor_data_offset,
                    reader: Mutex::new(p.reader),
                    map,
                }
            })
            .collect();
        Self {
            path: file.path,
            content: file.content,
            parts,
            part_of: file.part_of,
            device: device.clone(),
            dtype,
            qk_rows_in_gguf_order,
        }
    }

    fn qtensor(&self, hf: &str) -> Result<QTensor> {
        let name = gguf_name(hf).ok_or_else(|| self.error(format!("no GGUF name for {hf}")))?;
        let info = self.content.tensor_infos.get(&name).ok_or_else(|| {
            self.error(format!(
                "has no tensor {name} (for {hf}): not a GGUF of a model thinkrag runs (qwen2, llama), or an incomplete one"
            ))
        })?;
        let part = &self.parts[self.part_of.get(&name).copied().unwrap_or(0)];
        if let Some(map) = &part.map {
            let dtype = info.ggml_dtype;
            let elems = info.shape.elem_count();
            let start = part
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|s| usize::try_from(s).ok());
            let len = (elems / dtype.block_size()).checked_mul(dtype.type_size());
            let range = start.zip(len).and_then(|(s, l)| Some(s..s.checked_add(l)?));
            if let Some(t) = range
                .and_then(|r| crate::model::mapped::new_tensor(map, r, dtype, info.shape.clone()))
            {
                return Ok(t);
            }
        }
        let mut reader = part
            .reader
            .lock()
            .map_err(|_| self.error("a previous read failed".into()))?;
        info.read(&mut *reader, part.tensor_data_offset, &self.device)
            .map_err(|e| Error::Weights {
                path: part.path.clone(),
                message: format!("tensor {name}: {e}"),
            })
    }

    fn error(&self, message: String) -> Error {
        Error::Weights {
            path: self.path.clone(),
            message,
        }
    }
}

impl WeightSource for GgufWeights {
    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        let t = self.qtensor(name)?.dequantize(&self.device)?;
        if t.elem_count() != len {
            return Err(self.error(format!(
                "{name} has {} elements, the model expects {len}",
                t.elem_count()
            )));
        }
        Ok(t.reshape(len)?.to_dtype(self.dtype)?)
    }

    fn matrix(&self, name: &str, shape: (usize, usize)) -> Result<Weight> {
        let q = self.qtensor(name)?;
        if q.shape().dims() != [shape.0, shape.1] {
            return Err(self.error(format!(
                "{name} is {:?}, the model expects {shape:?}",
                q.shape().dims()
            )));
        }
        Ok(match q.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                Weight::Dense(q.dequantize(&self.device)?.to_dtype(self.dtype)?)
            }
            _ => Weight::Quantized(Arc::new(q)),
        })
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|n| self.content.tensor_infos.contains_key(&n))
    }

    fn mapped_files(&self) -> Vec<Arc<memmap2::Mmap>> {
        self.parts.iter().filter_map(|p| p.map.clone()).collect()
    }

    fn qk_rows_in_gguf_order(&self) -> bool {
        self.qk_rows_in_gguf_order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_names_map_to_llama_cpp_names() {
        let cases = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("lm_head.weight", "output.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("model.layers.0.self_attn.q_proj.bias", "blk.0.attn_q.bias"),
            (
                "model.layers.27.mlp.down_proj.weight",
                "blk.27.ffn_down.weight",
            ),
            (
                "model.layers.3.input_layernorm.weight",
                "blk.3.attn_norm.weight",
            ),
            (
                "model.layers.3.post_attention_layernorm.weight",
                "blk.3.ffn_norm.weight",
            ),
            (
                "model.layers.1.self_attn.o_proj.weight",
                "blk.1.attn_output.weight",
            ),
        ];
        for (hf, gguf) in cases {
            assert_eq!(gguf_name(hf).as_deref(), Some(gguf), "{hf}");
        }
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_name("something.else"), None);
    }
}

#[cfg(test)]
mod mapping_tests {
    use super::*;

    #[test]
    fn quantized_gguf_tensors_on_a_cpu_are_the_files_pages_not_copies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let values: Vec<f32> = (0..64 * 32).map(|i| (i % 17) as f32 - 8.0).collect();
        let t = Tensor::from_vec(values, (64, 32), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let f = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        let mut out = std::fs::File::create(&path).unwrap();
        gguf_file::write(
            &mut out,
            &[],
            &[("token_embd.weight", &q), ("output.weight", &f)],
        )
        .unwrap();
        drop(out);
        let w = GgufWeights::new(GgufFile::open(&path).unwrap(), &Device::Cpu, DType::F32);
        let map = w.parts[0].map.clone().expect("a CPU load maps the file");
        let inside = |p: *const u8| {
            let (lo, hi) = (map.as_ptr() as usize, map.as_ptr() as usize + map.len());
            (lo..hi).contains(&(p as usize))
        };
        let Weight::Quantized(mapped) = w.matrix("model.embed_tokens.weight", (64, 32)).unwrap()
        else {
            panic!("Q8_0 stays quantized")
        };
        assert!(inside(mapped.data().unwrap().as_ptr()), "not a copy");
        // Same numbers as the tensor that was written.
        let back = mapped.dequantize(&Device::Cpu).unwrap();
        let want = q.dequantize(&Device::Cpu).unwrap();
        let diff = (back - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        // A full-precision tensor becomes a dense tensor of the model's dtype.
        assert!(matches!(
            w.matrix("lm_head.weight", (64, 32)).unwrap(),
            Weight::Dense(_)
        ));
    }
}
