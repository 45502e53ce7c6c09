//! The model's published configuration files (`config.json`, `generation_config.json`), read
//! leniently where re-saved copies differ (`sliding_window: null`) and strictly where a wrong value
//! would produce silent garbage (architecture, head sizes).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The architectures this engine runs: the Qwen2 family of the DeepSeek-R1 distills.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["Qwen2ForCausalLM"];

/// `config.json` of a Qwen2 causal language model.
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
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Activation of the MLP; only `silu` is supported.
    #[serde(default = "default_act")]
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

fn default_act() -> String {
    "silu".to_string()
}

/// One token id or several (both occur in published configs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// A list of ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// All ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

impl Qwen2Config {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Rejects configurations this engine would run wrongly.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let unsupported = |message: String| Error::Unsupported {
            path: path.to_path_buf(),
            message,
        };
        if !self
            .architectures
            .iter()
            .any(|a| SUPPORTED_ARCHITECTURES.contains(&a.as_str()))
        {
            return Err(unsupported(format!(
                "architectures {:?} is not one of {:?} (thinkrag runs the Qwen2-based DeepSeek-R1 distills)",
                self.architectures, SUPPORTED_ARCHITECTURES
            )));
        }
        if self.hidden_act != "silu" {
            return Err(unsupported(format!(
                "hidden_act {:?} (only silu)",
                self.hidden_act
            )));
        }
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(unsupported(format!("{name} is 0")));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(unsupported(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(unsupported(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(unsupported(format!("head dim {} is odd", self.head_dim())));
        }
        if self.use_sliding_window && self.sliding_window.is_none() {
            return Err(unsupported(
                "use_sliding_window is true but sliding_window is null".into(),
            ));
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The attention window of layer `layer`, when the config asks for one.
    pub fn window_of_layer(&self, layer: usize) -> Option<usize> {
        if !self.use_sliding_window {
            return None;
        }
        match self.max_window_layers {
            Some(m) if layer < m => None,
            _ => self.sliding_window,
        }
    }

    /// Parameters of the model (embedding and lm_head included).
    pub fn parameter_count(&self) -> usize {
        let h = self.hidden_size;
        let kv = self.num_key_value_heads * self.head_dim();
        let attn = h * h + h + 2 * (h * kv + kv) + h * h;
        let mlp = 3 * h * self.intermediate_size;
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * layer + h + head
    }
}

/// `generation_config.json`: the real BOS id and the default sampling.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// The BOS id the model was trained with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// Whether the published default samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_sample: Option<bool>,
    /// Default temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Default nucleus mass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Default top-k.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Default repetition penalty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
}

impl GenerationConfig {
    /// Reads a `generation_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        read_json(path)
    }
}

/// Reads a JSON file into `T`, with errors that name the file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        format: "JSON",
        message: e.to_string(),
    })
}
