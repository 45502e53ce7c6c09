//! Random weights of a model's exact shape (`thinkrag synth`). Speed does not depend on weight
//! values, so benchmarks of the 1.5B shape run on these where the real weights cannot be
//! downloaded; with the real tokenizer beside them, token counts are realistic too.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;
use safetensors::tensor::{Dtype, View};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::manifest::ModelManifest;

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
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        message: format!("cannot write: {e}"),
    })
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
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let write_json = |name: &str, v: &dyn erased_json::Json| -> Result<()> {
        let p = out.join(name);
        std::fs::write(&p, v.to_pretty()).map_err(|e| Error::io(&p, e))
    };
    write_json("config.json", &manifest.config)?;
    write_json("generation_config.json", &manifest.generation_config)?;
    if let Some(tc) = &manifest.tokenizer_config_json {
        let p = out.join("tokenizer_config.json");
        std::fs::write(&p, tc).map_err(|e| Error::io(&p, e))?;
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
