//! Random weights of a model's exact shape (`thinkrag synth`). Speed does not depend on weight
//! values, so benchmarks of the 1.5B shape run on these where the real weights cannot be
//! downloaded; with the real tokenizer beside them, token counts are realistic too.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;
use safetensors::tensor::{Dtype, View};

use candle_core::quantized::GgmlDType;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::TensorEntry;
use crate::manifest::ModelManifest;
use crate::model::weights::{gguf_name, ROPE_FREQS};
use crate::quant::Quantization;
use crate::tokenizer::TextTokenizer;

/// Precision of synthesized weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthDType {
    /// bfloat16, as the DeepSeek distills are published (half the disk of f32).
    Bf16,
    /// 32-bit floats.
    F32,
}

/// A tensor whose bytes are generated when the writer asks for them, so that at most one tensor
/// (the 467 MB embedding, in bf16) is in memory at a time.
struct RandomTensor {
    shape: Vec<usize>,
    dtype: SynthDType,
    kind: Init,
    seed: u64,
}

#[derive(Clone, Copy)]
enum Init {
    /// Uniform with standard deviation 0.02 (the models' initializer_range).
    Weight,
    /// RMSNorm scales: 1.
    Ones,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl RandomTensor {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn value(&self, i: usize) -> f32 {
        match self.kind {
            Init::Ones => 1.0,
            Init::Weight => {
                let r = splitmix(self.seed ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407));
                // Uniform in [-a, a] has standard deviation a / sqrt(3): a = 0.02 * sqrt(3).
                let u = (r >> 40) as f32 / (1u64 << 24) as f32;
                (u * 2.0 - 1.0) * 0.034_641
            }
        }
    }
}

impl View for &RandomTensor {
    fn dtype(&self) -> Dtype {
        match self.dtype {
            SynthDType::Bf16 => Dtype::BF16,
            SynthDType::F32 => Dtype::F32,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let n = self.numel();
        let width = self.data_len() / n.max(1);
        let mut bytes = vec![0u8; self.data_len()];
        bytes
            .par_chunks_mut(width * 4096)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (j, out) in chunk.chunks_mut(width).enumerate() {
                    let v = self.value(c * 4096 + j);
                    match self.dtype {
                        SynthDType::Bf16 => {
                            out.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes())
                        }
                        SynthDType::F32 => out.copy_from_slice(&v.to_le_bytes()),
                    }
                }
            });
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.numel()
            * match self.dtype {
                SynthDType::Bf16 => 2,
                SynthDType::F32 => 4,
            }
    }
}

/// The Hugging Face tensor names and shapes of a model of this configuration (Qwen2 or Llama).
pub fn tensor_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.num_key_value_heads * cfg.head_dim();
    let i = cfg.intermediate_size;
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        t.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
        ]);
        if cfg.attention_bias {
            t.extend([
                (format!("{p}.self_attn.q_proj.bias"), vec![q]),
                (format!("{p}.self_attn.k_proj.bias"), vec![kv]),
                (format!("{p}.self_attn.v_proj.bias"), vec![kv]),
            ]);
        }
        t.extend([
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
    }
    t.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        t.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    t
}

/// Writes `model.safetensors` with random weights of `cfg`'s shape.
pub fn write_random_weights(
    cfg: &ModelConfig,
    path: &Path,
    dtype: SynthDType,
    seed: u64,
) -> Result<()> {
    let tensors: Vec<(String, RandomTensor)> = tensor_shapes(cfg)
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let kind = if name.ends_with("norm.weight") {
                Init::Ones
            } else {
                Init::Weight
            };
            let t = RandomTensor {
                shape,
                dtype,
                kind,
                seed: splitmix(seed ^ (k as u64 + 1)),
            };
            (name, t)
        })
        .collect();
    let views: Vec<(&str, &RandomTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(
        "thinkrag".to_string(),
        "random weights (thinkrag synth)".to_string(),
    );
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| Error::write(path, std::io::Error::other(e)))
}

/// Writes a model directory of `manifest`'s exact shape: config.json, generation_config.json,
/// tokenizer_config.json (chat template) and random `model.safetensors`. `tokenizer`, if given, is
/// copied in as tokenizer.json (without one the directory serves `thinkrag bench`, not `generate`).
pub fn write_random_model(
    manifest: &ModelManifest,
    out: &Path,
    dtype: SynthDType,
    seed: u64,
    tokenizer: Option<&Path>,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::write(out, e))?;
    let write_json = |name: &str, v: &dyn erased_json::Json| -> Result<()> {
        let p = out.join(name);
        std::fs::write(&p, v.to_pretty()).map_err(|e| Error::write(&p, e))
    };
    write_json("config.json", &manifest.config)?;
    write_json("generation_config.json", &manifest.generation_config)?;
    if let Some(tc) = &manifest.tokenizer_config_json {
        let p = out.join("tokenizer_config.json");
        std::fs::write(&p, tc).map_err(|e| Error::write(&p, e))?;
    }
    if let Some(src) = tokenizer {
        let p = out.join("tokenizer.json");
        std::fs::copy(src, &p).map_err(|e| Error::io(src, e))?;
    }
    write_random_weights(
        &manifest.config,
        &out.join("model.safetensors"),
        dtype,
        seed,
    )
}

/// Serialises any of the config types without making the closure above generic.
mod erased_json {
    pub trait Json {
        fn to_pretty(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_pretty(&self) -> String {
            serde_json::to_string_pretty(self).unwrap_or_default()
        }
    }
}

/// The half-precision scale fields of a block type (byte offset in the block, value), chosen so
/// that random quants make weights of roughly the initializer's spread (0.02): finite
/// activations through every layer, which is all speed and memory measurements need.
fn block_scales(t: GgmlDType) -> Option<&'static [(usize, f32)]> {
    Some(match t {
        GgmlDType::Q4_0 => &[(0, 4e-3)],
        GgmlDType::Q4_1 => &[(0, 4e-3), (2, -0.03)],
        GgmlDType::Q5_0 => &[(0, 2e-3)],
        GgmlDType::Q5_1 => &[(0, 2e-3), (2, -0.032)],
        GgmlDType::Q8_0 => &[(0, 2.7e-4)],
        GgmlDType::Q2K => &[(80, 1e-3), (82, 1.5e-3)],
        GgmlDType::Q3K => &[(108, 1e-3)],
        GgmlDType::Q4K => &[(0, 1.4e-4), (2, 1e-3)],
        GgmlDType::Q5K => &[(0, 7e-5), (2, 1.1e-3)],
        GgmlDType::Q6K => &[(208, 1.5e-5)],
        _ => return None,
    })
}

/// Writes `n_blocks` random blocks of `size` bytes (random quants and scale indices, then the
/// half-precision `scales` of [`block_scales`] at their offsets) to `w`, a few megabytes at a time.
fn write_random_blocks(
    w: &mut dyn std::io::Write,
    size: usize,
    scales: &[(usize, f32)],
    n_blocks: usize,
    seed: u64,
) -> std::io::Result<()> {
    let per_chunk = (4 << 20) / size;
    let mut buf = vec![0u8; per_chunk * size];
    for first in (0..n_blocks).step_by(per_chunk) {
        let n = per_chunk.min(n_blocks - first);
        let bytes = &mut buf[..n * size];
        bytes
            .par_chunks_mut(size)
            .enumerate()
            .for_each(|(i, block)| {
                let key = seed ^ ((first + i) as u64).wrapping_mul(0xA24B_AED4_963E_E407);
                for (j, word) in block.chunks_mut(8).enumerate() {
                    let r = splitmix(key ^ (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    word.copy_from_slice(&r.to_le_bytes()[..word.len()]);
                }
                for &(at, v) in scales {
                    block[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
                }
            });
        w.write_all(bytes)?;
    }
    Ok(())
}

/// What a tensor of a random GGUF file holds.
enum Fill {
    /// Random values of this kind (norms: ones), in f32 or as random blocks.
    Random(Init),
    /// These values (the RoPE frequency divisors), in f32.
    Values(Vec<f32>),
}

/// Writes a GGUF file of `cfg`'s exact shape with random blocks in `quant`'s types (llama.cpp's
/// mix for Q4_K_M and Q5_K_M, as `thinkrag quantize` writes them), `tokenizer`'s vocabulary and
/// chat template in its metadata. It streams: one chunk of blocks is in memory at a time, so a
/// 70B Q4_K_M (40 GB) is written on a machine with far less memory, where a bf16 `synth` of it
/// (140 GB) followed by `quantize` would not fit.
pub fn write_random_gguf_with(
    cfg: &ModelConfig,
    tokenizer: &TextTokenizer,
    quant: Quantization,
    name: &str,
    path: &Path,
    seed: u64,
) -> Result<()> {
    let metadata = crate::gguf::model_metadata(cfg, tokenizer, name)?;
    let mut tensors = Vec::new();
    let mut fills = Vec::new();
    for (hf, dims) in tensor_shapes(cfg) {
        let gguf = gguf_name(&hf).ok_or_else(|| Error::Weights {
            path: path.to_path_buf(),
            message: format!("no GGUF name for {hf}"),
        })?;
        let dtype = match dims.as_slice() {
            [_, k] => quant.for_tensor(&hf, cfg.num_hidden_layers, *k),
            _ => GgmlDType::F32,
        };
        fills.push(Fill::Random(if hf.ends_with("norm.weight") {
            Init::Ones
        } else {
            Init::Weight
        }));
        tensors.push(TensorEntry {
            name: gguf,
            dims,
            dtype,
        });
    }
    if let Some(f) = crate::gguf::gguf_rope_freqs(cfg) {
        tensors.push(TensorEntry {
            name: ROPE_FREQS.into(),
            dims: vec![f.len()],
            dtype: GgmlDType::F32,
        });
        fills.push(Fill::Values(f));
    }
    crate::gguf::write_streaming(path, &metadata, &tensors, |i, w| {
        let t = &tensors[i];
        let io = |e| Error::write(path, e);
        let tensor_seed = splitmix(seed ^ (i as u64 + 1));
        match (&fills[i], t.dtype) {
            (Fill::Values(f), _) => {
                let bytes: Vec<u8> = f.iter().flat_map(|x| x.to_le_bytes()).collect();
                w.write_all(&bytes).map_err(io)
            }
            (&Fill::Random(kind), GgmlDType::F32) => {
                let r = RandomTensor {
                    shape: t.dims.clone(),
                    dtype: SynthDType::F32,
                    kind,
                    seed: tensor_seed,
                };
                w.write_all(&(&r).data()).map_err(io)
            }
            (Fill::Random(_), dtype) => {
                let scales = block_scales(dtype).ok_or_else(|| Error::Weights {
                    path: path.to_path_buf(),
                    message: format!("random {dtype:?} blocks are not supported"),
                })?;
                let blocks = t.dims.iter().product::<usize>() / dtype.block_size();
                write_random_blocks(w, dtype.type_size(), scales, blocks, tensor_seed).map_err(io)
            }
        }
    })
}

/// [`write_random_gguf_with`] for a built-in model: `tokenizer_json` is bound to the manifest's
/// configs (special tokens, chat template) as a model directory would bind it. Returns the
/// tokenizer's notes (where its files disagree).
pub fn write_random_gguf(
    manifest: &ModelManifest,
    quant: Quantization,
    tokenizer_json: &Path,
    path: &Path,
    seed: u64,
) -> Result<Vec<String>> {
    let inner = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| Error::Tokenizer {
        path: tokenizer_json.to_path_buf(),
        message: format!("cannot load: {e}"),
    })?;
    let tok_cfg: serde_json::Value = match &manifest.tokenizer_config_json {
        Some(t) => serde_json::from_str(t).map_err(|e| Error::Tokenizer {
            path: tokenizer_json.to_path_buf(),
            message: format!(
                "the built-in tokenizer_config.json of {}: {e}",
                manifest.name
            ),
        })?,
        None => serde_json::Value::Null,
    };
    // A stand-in tokenizer (a tiny test vocabulary with the model's special tokens) lacks the
    // published special ids: those it does not have are dropped, and the special tokens it names
    // (tokenizer_config.json's bos_token and eos_token) are used.
    let size = inner.get_vocab(true).values().max().map_or(0, |&m| m + 1);
    let mut generation = manifest.generation_config.clone();
    let mut config = manifest.config.clone();
    let mut notes = Vec::new();
    for (eos, bos) in [
        (&mut generation.eos_token_id, &mut generation.bos_token_id),
        (&mut config.eos_token_id, &mut config.bos_token_id),
    ] {
        if let Some(ids) = eos.as_ref() {
            let (kept, dropped): (Vec<u32>, Vec<u32>) =
                ids.to_vec().into_iter().partition(|&id| id < size);
            if !dropped.is_empty() {
                notes.push(format!(
                    "this tokenizer has {size} ids: EOS ids {dropped:?} are left out, its eos_token is used"
                ));
                *eos = (!kept.is_empty()).then_some(crate::config::TokenIds::Many(kept));
            }
        }
        if bos.is_some_and(|id| id >= size) {
            *bos = None;
        }
    }
    notes.dedup();
    let tokenizer =
        TextTokenizer::from_parts(inner, &tok_cfg, &generation, &config, tokenizer_json)?;
    let name = format!("{}-{quant}-random", manifest.name);
    write_random_gguf_with(&manifest.config, &tokenizer, quant, &name, path, seed)?;
    notes.extend(tokenizer.notes().iter().cloned());
    Ok(notes)
}
