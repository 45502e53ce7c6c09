//! Llama 3.x, the architecture of DeepSeek-R1-Distill-Llama 8B (Llama 3.1) and 70B (Llama 3.3): its
//! published `config.json`, the `llama3` RoPE frequency scaling, and the row order llama.cpp's
//! converter gives the query and key projections in GGUF files (interleaved RoPE pairs).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{Architecture, Llama3RopeScaling, ModelConfig, RopeConfig, TokenIds};

use crate::error::{Error, Result};

/// `config.json` of a Llama causal language model, as transformers 4 writes it (transformers 5's
/// `rope_parameters` and `dtype` are mapped onto these by [`ModelConfig::from_value`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// `"llama"`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Width of the logits (128,256 for Llama 3).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads; absent means as many as the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head; absent means `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Longest sequence the model runs (131,072 for Llama 3.1 and 3.3).
    pub max_position_embeddings: usize,
    /// RoPE base (500,000 for Llama 3).
    #[serde(default = "crate::config::default_rope_theta")]
    pub rope_theta: f64,
    /// RoPE scaling: `{"rope_type": "llama3", "factor": 8.0, ...}` for Llama 3.1 and later.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Activation of the MLP; only `silu` is supported.
    #[serde(default = "crate::config::default_activation")]
    pub hidden_act: String,
    /// Whether the attention projections have biases (false for Llama 3).
    #[serde(default)]
    pub attention_bias: bool,
    /// Whether the MLP projections have biases (false for Llama 3; not supported).
    #[serde(default)]
    pub mlp_bias: bool,
    /// Whether `lm_head` shares the token embedding (false for the distills, true for Llama 3.2 1B/3B).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Config's BOS id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// Config's EOS id(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Dtype the weights were published in.
    #[serde(default)]
    pub torch_dtype: Option<String>,
}

impl LlamaConfig {
    /// The architecture-independent description the decoder runs from.
    pub fn to_model_config(&self, path: &Path) -> Result<ModelConfig> {
        let unsupported = |message: String| Error::Unsupported {
            path: path.to_path_buf(),
            message,
        };
        crate::config::check_activation(&self.hidden_act, path)?;
        if self.mlp_bias {
            return Err(unsupported(
                "mlp_bias is true (no Llama 3 model has MLP biases)".into(),
            ));
        }
        let llama3 = match &self.rope_scaling {
            None => None,
            Some(v) => match crate::config::rope_kind(v) {
                "default" => None,
                "llama3" => Some(
                    serde_json::from_value::<Llama3RopeScaling>(v.clone()).map_err(|e| {
                        unsupported(format!("rope_scaling of type llama3 is incomplete: {e}"))
                    })?,
                ),
                other => {
                    return Err(unsupported(format!(
                        "rope_scaling of type {other:?} (thinkrag runs default and llama3 RoPE)"
                    )))
                }
            },
        };
        let heads = self.num_attention_heads;
        ModelConfig::checked(
            ModelConfig {
                architecture: Architecture::Llama,
                vocab_size: self.vocab_size,
                hidden_size: self.hidden_size,
                intermediate_size: self.intermediate_size,
                num_hidden_layers: self.num_hidden_layers,
                num_attention_heads: heads,
                num_key_value_heads: self.num_key_value_heads.unwrap_or(heads),
                head_dim: self
                    .head_dim
                    .unwrap_or(self.hidden_size.checked_div(heads).unwrap_or(0)),
                max_position_embeddings: self.max_position_embeddings,
                rms_norm_eps: self.rms_norm_eps,
                tie_word_embeddings: self.tie_word_embeddings,
                attention_bias: self.attention_bias,
                rope: RopeConfig {
                    theta: self.rope_theta,
                    llama3,
                    freq_factors: None,
                },
                layer_windows: vec![None; self.num_hidden_layers],
                bos_token_id: self.bos_token_id,
                eos_token_id: self.eos_token_id.clone(),
                torch_dtype: self.torch_dtype.clone(),
                notes: Vec::new(),
                published: serde_json::Value::Null,
            },
            path,
        )
    }
}

impl Llama3RopeScaling {
    /// Applies the scaling to the plain inverse frequencies, as transformers'
    /// `_compute_llama3_parameters` does (in f32): high frequencies unchanged, low ones divided by
    /// `factor`, the band between blended smoothly.
    pub fn scale(&self, inv_freq: &mut [f32]) {
        let factor = self.factor as f32;
        let (low, high) = (self.low_freq_factor as f32, self.high_freq_factor as f32);
        let old = self.original_max_position_embeddings as f32;
        let low_freq_wavelen = old / low;
        let high_freq_wavelen = old / high;
        for f in inv_freq.iter_mut() {
            let wavelen = 2.0 * std::f32::consts::PI / *f;
            let scaled = if wavelen > low_freq_wavelen {
                *f / factor
            } else {
                *f
            };
            // transformers: ~(wavelen < high) & ~(wavelen > low); NaN never arises from positive inputs.
            let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
            *f = if medium {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 - smooth) * scaled / factor + smooth * scaled
            } else {
                scaled
            };
        }
    }

    /// The per-frequency divisors llama.cpp's converter stores as the `rope_freqs.weight` tensor
    /// of a Llama 3.1+ GGUF file (one per pair of head dimensions).
    pub fn freq_factors(&self, theta: f64, head_dim: usize) -> Vec<f32> {
        let base = plain_inv_freq(theta, head_dim);
        let mut scaled = base.clone();
        self.scale(&mut scaled);
        base.iter().zip(&scaled).map(|(b, s)| b / s).collect()
    }
}

/// RoPE inverse frequencies `theta^(-2i/d)` as the reference computes them (in f32).
pub fn plain_inv_freq(theta: f64, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// The GGUF row that holds each Hugging Face row of a query or key projection with `heads` heads
/// (`result[hf_row] = gguf_row`). llama.cpp's converter permutes each head's rows so that the two
/// halves RoPE rotates together (`rotate_half`) sit side by side for its interleaved RoPE:
/// HF row `t * d/2 + j` of a head is GGUF row `2j + t`.
pub fn gguf_rope_row_order(rows: usize, heads: usize) -> Option<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(heads) {
        return None;
    }
    let d = rows / heads;
    if !d.is_multiple_of(2) {
        return None;
    }
    let half = d / 2;
    Some(
        (0..rows)
            .map(|r| {
                let (h, within) = (r / d, r % d);
                let (t, j) = (within / half, within % half);
                h * d + 2 * j + t
            })
            .collect(),
    )
}

/// The head count whose rows llama.cpp reorders in the Hugging Face tensor `name`: the query
/// weight's heads, the key weight's KV heads; `None` for every other tensor.
pub fn permuted_heads(name: &str, heads: usize, kv_heads: usize) -> Option<usize> {
    if name.ends_with("self_attn.q_proj.weight") {
        Some(heads)
    } else if name.ends_with("self_attn.k_proj.weight") {
        Some(kv_heads)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_frequencies_divides_low_ones_and_blends_between() {
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let base = plain_inv_freq(500000.0, 128);
        let mut scaled = base.clone();
        s.scale(&mut scaled);
        assert_eq!(scaled[0], base[0]);
        let last = base.len() - 1;
        assert_eq!(scaled[last], base[last] / 8.0);
        let blended = (0..base.len())
            .filter(|&i| scaled[i] < base[i] && scaled[i] > base[i] / 8.0)
            .count();
        assert!(blended > 0, "no frequency in the smooth band");
        // llama.cpp's divisors reproduce the scaled frequencies.
        for ((b, f), s) in base.iter().zip(s.freq_factors(500000.0, 128)).zip(&scaled) {
            assert!(((b / f) - s).abs() <= s * 1e-6, "{b} / {f} != {s}");
        }
    }

    #[test]
    fn gguf_row_order_is_llama_cpps_permute() {
        // permute(w, n_head): w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2).reshape(...), so GGUF
        // row (h, j, t) holds HF row (h, t, j).
        let (heads, d) = (2, 8);
        let order = gguf_rope_row_order(heads * d, heads).unwrap();
        let mut gguf_holds = vec![usize::MAX; heads * d];
        for (hf, &g) in order.iter().enumerate() {
            gguf_holds[g] = hf;
        }
        assert_eq!(gguf_holds[..8], [0, 4, 1, 5, 2, 6, 3, 7]);
        assert_eq!(gguf_holds[8..], [8, 12, 9, 13, 10, 14, 11, 15]);
        assert!(gguf_rope_row_order(10, 4).is_none());
    }
}
