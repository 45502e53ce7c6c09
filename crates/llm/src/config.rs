//! The model's published configuration files (`config.json`, `generation_config.json`), read
//! leniently where re-saved copies differ (`sliding_window: null`) and strictly where a wrong value
//! would produce silent garbage (architecture, head sizes).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use crate::model::llama::LlamaConfig;
pub use crate::model::qwen2::Qwen2Config;

/// The architectures this engine runs, as `config.json` names them.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["Qwen2ForCausalLM", "LlamaForCausalLM"];

/// The decoder families of the DeepSeek-R1 distills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Qwen2 (the Qwen 1.5B, 7B, 14B and 32B distills).
    Qwen2,
    /// Llama 3.x (the Llama 8B and 70B distills).
    Llama,
}

impl Architecture {
    /// The name GGUF files use (`general.architecture`) and manifests say.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "qwen2",
            Architecture::Llama => "llama",
        }
    }

    /// The architecture GGUF's `general.architecture` names, if supported.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "qwen2" => Some(Architecture::Qwen2),
            "llama" => Some(Architecture::Llama),
            _ => None,
        }
    }
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

/// Llama 3.1's RoPE scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    /// Divisor of the low frequencies (8 for Llama 3.1 and 3.3).
    pub factor: f64,
    /// Wavelengths above `original / low_freq_factor` are divided by `factor`.
    pub low_freq_factor: f64,
    /// Wavelengths below `original / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context the base model was trained with (8,192).
    pub original_max_position_embeddings: usize,
}

/// How positions rotate queries and keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeConfig {
    /// The base.
    pub theta: f64,
    /// Llama 3's frequency scaling, from config.json.
    pub llama3: Option<Llama3RopeScaling>,
    /// Per-frequency divisors as a GGUF file stores them (`rope_freqs.weight`), which replace
    /// `llama3` when the model comes from such a file.
    pub freq_factors: Option<Vec<f32>>,
}

/// What the engine needs to know about a model, whatever its architecture: shapes, vocabulary,
/// context, special ids and the per-architecture choices the shared decoder makes (biases, RoPE,
/// windows). Built from an architecture's own `config.json` type (`Qwen2Config`, `LlamaConfig`) or
/// from GGUF metadata; serialises back to the published `config.json` it was read from.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The decoder family.
    pub architecture: Architecture,
    /// Width of the logits (may exceed the tokenizer's size).
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
    /// Width of one head.
    pub head_dim: usize,
    /// Longest sequence the model runs.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether `lm_head` shares the token embedding.
    pub tie_word_embeddings: bool,
    /// Whether the query, key and value projections have biases (Qwen2 yes, Llama no).
    pub attention_bias: bool,
    /// Rotary position embedding.
    pub rope: RopeConfig,
    /// Each layer's attention window (`None`: full attention).
    pub layer_windows: Vec<Option<usize>>,
    /// Config's BOS id (generation_config.json's wins where they differ).
    pub bos_token_id: Option<u32>,
    /// Config's EOS id(s).
    pub eos_token_id: Option<TokenIds>,
    /// Dtype the weights were published in (`torch_dtype`, or transformers 5's `dtype`).
    pub torch_dtype: Option<String>,
    /// What was read differently from the published names (transformers 5 fields), for the user.
    pub notes: Vec<String>,
    /// The `config.json` this was read from, written back verbatim by `thinkrag synth`.
    pub published: serde_json::Value,
}

impl ModelConfig {
    /// Reads and validates a `config.json` of any supported architecture.
    pub fn from_file(path: &Path) -> Result<Self> {
        let value: serde_json::Value = read_json(path)?;
        Self::from_value(value, path)
    }

    /// Builds the configuration from `config.json`'s content as transformers 4 or 5 writes it:
    /// transformers 5's `rope_parameters` stand for `rope_theta` and `rope_scaling`, its `dtype`
    /// for `torch_dtype`, and its `layer_types` say which layers are windowed. `path` names the
    /// file in errors.
    pub fn from_value(published: serde_json::Value, path: &Path) -> Result<Self> {
        let mut v = published.clone();
        let Some(obj) = v.as_object_mut() else {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                format: "JSON",
                message: "config.json is not a JSON object".into(),
            });
        };
        let mut notes = Vec::new();
        if let Some(rp) = obj.get("rope_parameters").cloned() {
            // transformers 5: one object (or one per attention kind) instead of rope_theta and
            // rope_scaling.
            let rp = match rp.get("full_attention") {
                Some(full) => full.clone(),
                None => rp,
            };
            if let Some(theta) = rp.get("rope_theta") {
                obj.entry("rope_theta").or_insert(theta.clone());
            }
            let kind = rope_kind(&rp);
            if kind != "default" && obj.get("rope_scaling").is_none_or(|s| s.is_null()) {
                obj.insert("rope_scaling".into(), rp.clone());
            }
            notes.push(format!(
                "RoPE read from rope_parameters (transformers 5): {kind}"
            ));
        }
        if !obj.contains_key("torch_dtype") {
            if let Some(d) = obj.get("dtype").cloned() {
                obj.insert("torch_dtype".into(), d);
            }
        }
        let architectures: Vec<String> = obj
            .get("architectures")
            .and_then(|a| serde_json::from_value(a.clone()).ok())
            .unwrap_or_default();
        let model_type = obj
            .get("model_type")
            .and_then(|t| t.as_str())
            .unwrap_or_default()
            .to_string();
        let bad = |e: serde_json::Error| Error::Parse {
            path: path.to_path_buf(),
            format: "JSON",
            message: e.to_string(),
        };
        let is = |arch: &str, ty: &str| {
            architectures.iter().any(|a| a == arch)
                || (architectures.is_empty() && model_type == ty)
        };
        let mut cfg = if is("Qwen2ForCausalLM", "qwen2") {
            let c: Qwen2Config = serde_json::from_value(v).map_err(bad)?;
            c.to_model_config(path)?
        } else if is("LlamaForCausalLM", "llama") {
            let c: LlamaConfig = serde_json::from_value(v).map_err(bad)?;
            c.to_model_config(path)?
        } else {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                message: format!(
                    "architectures {architectures:?} (model_type {model_type:?}) is not one of {SUPPORTED_ARCHITECTURES:?} (thinkrag runs the DeepSeek-R1 distills: Qwen2 and Llama 3)"
                ),
            });
        };
        cfg.notes = notes;
        cfg.published = published;
        Ok(cfg)
    }

    /// Rejects shapes this engine would run wrongly; used by every architecture's conversion.
    pub fn checked(self, path: &Path) -> Result<Self> {
        let unsupported = |message: String| Error::Unsupported {
            path: path.to_path_buf(),
            message,
        };
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(unsupported(format!("{name} is 0")));
            }
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
        if !self.head_dim.is_multiple_of(2) {
            return Err(unsupported(format!("head dim {} is odd", self.head_dim)));
        }
        if self.architecture == Architecture::Qwen2
            && self.head_dim * self.num_attention_heads != self.hidden_size
        {
            return Err(unsupported(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !(self.rope.theta > 0.0 && self.rope.theta.is_finite()) {
            return Err(unsupported(format!(
                "rope_theta {} is not positive",
                self.rope.theta
            )));
        }
        if let Some(s) = &self.rope.llama3 {
            let ok = s.factor > 0.0
                && s.low_freq_factor > 0.0
                && s.high_freq_factor > s.low_freq_factor
                && s.original_max_position_embeddings > 0;
            if !ok {
                return Err(unsupported(format!(
                    "rope_scaling {s:?}: factor, low_freq_factor and original_max_position_embeddings must be positive and high_freq_factor above low_freq_factor"
                )));
            }
        }
        if let Some(f) = &self.rope.freq_factors {
            if f.len() != self.head_dim / 2 || f.iter().any(|x| !(*x > 0.0 && x.is_finite())) {
                return Err(unsupported(format!(
                    "rope_freqs has {} factors (want {} positive ones)",
                    f.len(),
                    self.head_dim / 2
                )));
            }
        }
        if self.layer_windows.len() != self.num_hidden_layers {
            return Err(unsupported(format!(
                "{} layer attention kinds for {} layers",
                self.layer_windows.len(),
                self.num_hidden_layers
            )));
        }
        Ok(self)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The attention window of layer `layer`, when the config asks for one.
    pub fn window_of_layer(&self, layer: usize) -> Option<usize> {
        self.layer_windows.get(layer).copied().flatten()
    }

    /// The RoPE inverse frequencies of one head (`head_dim / 2` of them), computed in f32 as the
    /// reference does so tables agree to the last bit or two.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let mut f = crate::model::llama::plain_inv_freq(self.rope.theta, self.head_dim);
        // Llama 3's scaling goes through the divisors a GGUF file stores, so a model and its GGUF
        // export rotate by bit-identical angles.
        for (x, d) in f.iter_mut().zip(self.rope_freq_factors().iter().flatten()) {
            *x /= d;
        }
        f
    }

    /// The per-frequency RoPE divisors (`rope_freqs.weight` in a GGUF file): the file's own, or
    /// those of Llama 3's scaling; `None` for plain RoPE.
    pub fn rope_freq_factors(&self) -> Option<Vec<f32>> {
        match (&self.rope.freq_factors, &self.rope.llama3) {
            (Some(factors), _) => Some(factors.clone()),
            (None, Some(s)) => Some(s.freq_factors(self.rope.theta, self.head_dim)),
            (None, None) => None,
        }
    }

    /// Parameters of the model (embedding and lm_head included).
    pub fn parameter_count(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let attn = h * q + 2 * h * kv + q * h + bias;
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

impl Serialize for ModelConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.published.serialize(s)
    }
}

impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        ModelConfig::from_value(v, Path::new("config")).map_err(serde::de::Error::custom)
    }
}

/// The kind of a `rope_scaling` or `rope_parameters` object (`rope_type`, or the older `type`);
/// `default` when it names none.
pub(crate) fn rope_kind(v: &serde_json::Value) -> &str {
    v.get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default")
}

/// Refuses MLP activations other than SiLU, the one every supported architecture uses.
pub(crate) fn check_activation(hidden_act: &str, path: &Path) -> Result<()> {
    if hidden_act == "silu" {
        return Ok(());
    }
    Err(Error::Unsupported {
        path: path.to_path_buf(),
        message: format!("hidden_act {hidden_act:?} (only silu)"),
    })
}

/// `hidden_act` when config.json leaves it out.
pub(crate) fn default_activation() -> String {
    "silu".to_string()
}

/// `rope_theta` when config.json leaves it out (transformers' default).
pub(crate) fn default_rope_theta() -> f64 {
    10000.0
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(v: serde_json::Value) -> ModelConfig {
        let mut c = ModelConfig::from_value(v, Path::new("config.json")).unwrap();
        c.published = serde_json::Value::Null;
        c.notes.clear();
        c
    }

    fn qwen2(extra: serde_json::Value) -> serde_json::Value {
        let mut v = json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 576,
            "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6, "bos_token_id": 448, "eos_token_id": 448,
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    }

    #[test]
    fn transformers_4_and_5_layouts_of_a_qwen2_config_read_the_same() {
        let v4 = read(qwen2(json!({
            "rope_theta": 1000000.0, "torch_dtype": "bfloat16", "sliding_window": 4096,
            "use_sliding_window": false, "max_window_layers": 3,
        })));
        let v5 = read(qwen2(json!({
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "dtype": "bfloat16", "sliding_window": null, "use_sliding_window": false,
            "layer_types": ["full_attention", "full_attention", "full_attention"],
        })));
        assert_eq!(v4, v5);
        assert_eq!(v4.rope.theta, 1e6);
        assert_eq!(v4.torch_dtype.as_deref(), Some("bfloat16"));
        assert!(v4.attention_bias && v4.layer_windows.iter().all(Option::is_none));
        // transformers 5 says per layer which attention is windowed.
        let windowed = read(qwen2(json!({
            "sliding_window": 64, "use_sliding_window": true,
            "layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
        })));
        assert_eq!(windowed.layer_windows, vec![None, Some(64), Some(64)]);
    }

    #[test]
    fn transformers_4_and_5_layouts_of_a_llama3_config_read_the_same() {
        let base = json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
            "tie_word_embeddings": false,
        });
        let scaling = json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"});
        let mut v4 = base.clone();
        v4["rope_theta"] = json!(500000.0);
        v4["rope_scaling"] = scaling.clone();
        v4["torch_dtype"] = json!("bfloat16");
        let mut v5 = base.clone();
        let mut params = scaling.clone();
        params["rope_theta"] = json!(500000.0);
        v5["rope_parameters"] = params;
        v5["dtype"] = json!("bfloat16");
        let (a, b) = (read(v4), read(v5));
        assert_eq!(a, b);
        assert_eq!(a.architecture, Architecture::Llama);
        assert_eq!((a.head_dim, a.attention_bias), (128, false));
        assert_eq!(
            a.eos_token_id.as_ref().unwrap().to_vec(),
            vec![128001, 128008, 128009]
        );
        let inv = a.rope_inv_freq();
        assert_eq!(inv.len(), 64);
        assert!((inv[63] * 8.0 - 500000f32.powf(-126.0 / 128.0)).abs() < 1e-12);
    }

    #[test]
    fn configs_thinkrag_would_run_wrongly_are_refused_with_the_reason() {
        let refused = |v: serde_json::Value, says: &str| {
            let e = ModelConfig::from_value(v, Path::new("config.json")).unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        };
        refused(
            qwen2(json!({"architectures": ["MistralForCausalLM"]})),
            "MistralForCausalLM",
        );
        refused(
            qwen2(json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})),
            "yarn",
        );
        refused(
            qwen2(json!({"num_key_value_heads": 3})),
            "multiple of num_key_value_heads",
        );
        let mut llama =
            qwen2(json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}));
        llama["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
        refused(llama.clone(), "incomplete");
        llama["rope_scaling"] = json!({"rope_type": "dynamic", "factor": 2.0});
        refused(llama.clone(), "dynamic");
        llama["rope_scaling"] = serde_json::Value::Null;
        llama["mlp_bias"] = json!(true);
        refused(llama, "mlp_bias");
        refused(json!([1, 2]), "not a JSON object");
    }
}
