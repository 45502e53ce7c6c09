//! Qwen2, the architecture of DeepSeek-R1-Distill-Qwen 1.5B, 7B, 14B and 32B: its published
//! `config.json` and what sets it apart in the shared decoder (biases on the query, key and value
//! projections, plain RoPE, an optional sliding window that the distills leave off).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{Architecture, ModelConfig, RopeConfig, TokenIds};
use crate::error::{Error, Result};

/// `config.json` of a Qwen2 causal language model, as transformers 4 writes it (transformers 5's
/// names are mapped onto these by [`ModelConfig::from_value`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    /// `["Qwen2ForCausalLM"]` for the supported models.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// `"qwen2"`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Width of the logits (151,936 for the real model: wider than the tokenizer).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Longest sequence the model was trained for.
    pub max_position_embeddings: usize,
    /// RoPE base.
    #[serde(default = "crate::config::default_rope_theta")]
    pub rope_theta: f64,
    /// RoPE scaling; the distills have none.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Activation of the MLP; only `silu` is supported.
    #[serde(default = "crate::config::default_activation")]
    pub hidden_act: String,
    /// Whether `lm_head` shares the token embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether attention is windowed; false for every DeepSeek-R1 distill.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// The window, if any. Re-saved configs sometimes write `null`.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Layers from this index on use the window (when `use_sliding_window`).
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// transformers 5's per-layer attention kinds (`full_attention`, `sliding_attention`).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Config's BOS id. Wrong for DeepSeek-R1 distills: generation_config.json has the real one.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// Config's EOS id.
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Dtype the weights were published in.
    #[serde(default)]
    pub torch_dtype: Option<String>,
}

impl Qwen2Config {
    /// The architecture-independent description the decoder runs from.
    pub fn to_model_config(&self, path: &Path) -> Result<ModelConfig> {
        let unsupported = |message: String| Error::Unsupported {
            path: path.to_path_buf(),
            message,
        };
        crate::config::check_activation(&self.hidden_act, path)?;
        if let Some(scaling) = &self.rope_scaling {
            let kind = crate::config::rope_kind(scaling);
            if kind != "default" {
                return Err(unsupported(format!(
                    "rope_scaling of type {kind:?} on a Qwen2 model (the DeepSeek-R1 distills have none)"
                )));
            }
        }
        if self.use_sliding_window && self.sliding_window.is_none() {
            return Err(unsupported(
                "use_sliding_window is true but sliding_window is null".into(),
            ));
        }
        let windows = (0..self.num_hidden_layers)
            .map(|layer| self.window_of_layer(layer))
            .collect();
        ModelConfig::checked(
            ModelConfig {
                architecture: Architecture::Qwen2,
                vocab_size: self.vocab_size,
                hidden_size: self.hidden_size,
                intermediate_size: self.intermediate_size,
                num_hidden_layers: self.num_hidden_layers,
                num_attention_heads: self.num_attention_heads,
                num_key_value_heads: self.num_key_value_heads,
                head_dim: self
                    .hidden_size
                    .checked_div(self.num_attention_heads)
                    .unwrap_or(0),
                max_position_embeddings: self.max_position_embeddings,
                rms_norm_eps: self.rms_norm_eps,
                tie_word_embeddings: self.tie_word_embeddings,
                attention_bias: true,
                rope: RopeConfig {
                    theta: self.rope_theta,
                    llama3: None,
                    freq_factors: None,
                },
                layer_windows: windows,
                bos_token_id: self.bos_token_id,
                eos_token_id: self.eos_token_id.clone(),
                torch_dtype: self.torch_dtype.clone(),
                notes: Vec::new(),
                published: serde_json::Value::Null,
            },
            path,
        )
    }

    /// The attention window of layer `layer`, when the config asks for one.
    fn window_of_layer(&self, layer: usize) -> Option<usize> {
        if let Some(types) = &self.layer_types {
            return match types.get(layer).map(String::as_str) {
                Some("sliding_attention") => self.sliding_window,
                _ => None,
            };
        }
        if !self.use_sliding_window {
            return None;
        }
        match self.max_window_layers {
            Some(m) if layer < m => None,
            _ => self.sliding_window,
        }
    }
}
