//! Model manifests (`models/*.toml`): what thinkrag knows about each supported model (hub repo and
//! revision, files, architecture, special tokens, default sampling, its published config). They are
//! compiled into the binary so a model can be named without any file beside the executable.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::config::{GenerationConfig, ModelConfig};
use crate::error::{Error, Result};

pub use thinkrag_hub::HubLocation;

/// A special token: its id and text.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SpecialToken {
    /// The id.
    pub id: u32,
    /// The text.
    pub text: String,
}

/// The special tokens a manifest pins, checked against the tokenizer at load time.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ManifestSpecialTokens {
    /// Beginning of sequence.
    pub bos: SpecialToken,
    /// End of sequence.
    pub eos: SpecialToken,
    /// Opens reasoning.
    #[serde(default)]
    pub think_open: Option<SpecialToken>,
    /// Closes reasoning.
    #[serde(default)]
    pub think_close: Option<SpecialToken>,
    /// Ids the tokenizer produces.
    pub tokenizer_size: usize,
    /// Any further named tokens.
    #[serde(flatten)]
    pub other: BTreeMap<String, toml::Value>,
}

/// Default sampling of a model.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ManifestSampling {
    /// Temperature.
    pub temperature: f64,
    /// Nucleus mass.
    pub top_p: f64,
    /// Default cap on generated tokens.
    #[serde(default)]
    pub max_tokens: Option<usize>,
}

/// One supported model.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ModelManifest {
    /// The name users type (`deepseek-r1-distill-qwen-1.5b`).
    pub name: String,
    /// The model's published name.
    pub display_name: String,
    /// Architecture family (`qwen2`).
    pub architecture: String,
    /// Size, as published.
    #[serde(default)]
    pub parameters: Option<String>,
    /// Quirks worth knowing.
    #[serde(default)]
    pub notes: String,
    /// Where to download it.
    pub hub: HubLocation,
    /// Pinned special tokens.
    pub special_tokens: ManifestSpecialTokens,
    /// Default sampling.
    pub sampling: ManifestSampling,
    /// The published `config.json`.
    pub config: ModelConfig,
    /// The published `generation_config.json`.
    pub generation_config: GenerationConfig,
    /// The published `tokenizer_config.json` (special tokens and chat template), as JSON text.
    #[serde(skip)]
    pub tokenizer_config_json: Option<String>,
}

/// The Qwen distills' tokenizer_config.json (special tokens and chat template; the same for every size).
const R1_QWEN_TOKENIZER_CONFIG: &str =
    include_str!("../../../models/deepseek-r1-distill-qwen-1.5b.tokenizer_config.json");

/// The Llama distills' tokenizer_config.json (the same chat template; no added-token list).
const R1_LLAMA_TOKENIZER_CONFIG: &str =
    include_str!("../../../models/deepseek-r1-distill-llama.tokenizer_config.json");

/// The manifests shipped in `models/`. A manifest with `base = "<name>"` (the GGUF builds of a
/// model) takes every top-level table it does not set from that manifest.
const BUILTIN: &[(&str, &str)] = &[
    (
        include_str!("../../../models/deepseek-r1-distill-qwen-1.5b.toml"),
        R1_QWEN_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-qwen-1.5b-q4_k_m.toml"),
        R1_QWEN_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-qwen-1.5b-q8_0.toml"),
        R1_QWEN_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-qwen-1.5b-q6_k.toml"),
        R1_QWEN_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-qwen-7b.toml"),
        R1_QWEN_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-qwen-7b-q4_k_m.toml"),
        R1_QWEN_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-qwen-7b-q8_0.toml"),
        R1_QWEN_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-qwen-14b.toml"),
        R1_QWEN_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-qwen-14b-q4_k_m.toml"),
        R1_QWEN_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-qwen-14b-q8_0.toml"),
        R1_QWEN_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-qwen-32b.toml"),
        R1_QWEN_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-qwen-32b-q4_k_m.toml"),
        R1_QWEN_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-qwen-32b-q8_0.toml"),
        R1_QWEN_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-llama-8b.toml"),
        R1_LLAMA_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-llama-8b-q4_k_m.toml"),
        R1_LLAMA_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-llama-8b-q8_0.toml"),
        R1_LLAMA_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-llama-70b.toml"),
        R1_LLAMA_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-llama-70b-q4_k_m.toml"),
        R1_LLAMA_TOKENIZER_CONFIG,
    ),
];

impl thinkrag_hub::Manifest for ModelManifest {
    fn name(&self) -> &str {
        &self.name
    }
    fn hub(&self) -> &HubLocation {
        &self.hub
    }
}

impl ModelManifest {
    /// Parses a manifest.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Parse {
            path: origin.to_path_buf(),
            format: "TOML",
            message: e.to_string(),
        })
    }

    /// Every built-in manifest.
    pub fn builtin() -> Vec<ModelManifest> {
        let tables: Vec<toml::Table> = BUILTIN
            .iter()
            .filter_map(|(text, _)| text.parse::<toml::Table>().ok())
            .collect();
        let named = |name: &str| {
            tables
                .iter()
                .find(|t| t.get("name").and_then(toml::Value::as_str) == Some(name))
        };
        BUILTIN
            .iter()
            .zip(&tables)
            .filter_map(|((_, tok_cfg), table)| {
                let mut table = table.clone();
                if let Some(base) = table
                    .remove("base")
                    .and_then(|b| b.as_str().and_then(named).cloned())
                {
                    for (k, v) in base {
                        table.entry(k).or_insert(v);
                    }
                }
                let mut m: ModelManifest = table.try_into().ok()?;
                m.tokenizer_config_json = Some(tok_cfg.to_string());
                Some(m)
            })
            .collect()
    }

    /// The built-in manifest called `name` (case-insensitive), or whose hub repo is `name`.
    pub fn find(name: &str) -> Option<ModelManifest> {
        thinkrag_hub::find(Self::builtin(), name)
    }

    /// Names of the built-in manifests, for error messages and `--help`.
    pub fn builtin_names() -> Vec<String> {
        Self::builtin().into_iter().map(|m| m.name).collect()
    }

    /// Whether the weights are one GGUF file (quantized as published).
    pub fn is_gguf(&self) -> bool {
        self.hub.files.iter().any(|f| f.ends_with(".gguf"))
    }

    /// Bytes of KV cache per position of context (keys and values of every layer, f32 as the CPU
    /// path keeps them).
    pub fn kv_bytes_per_position(&self) -> u64 {
        let c = &self.config;
        (2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4) as u64
    }

    /// Estimated memory to run the model with `context` positions of KV cache: the weights as
    /// they sit in memory (a GGUF file's size; safetensors converted to f32 on a CPU, or kept in
    /// bf16 with `--dtype bf16`), the cache, and 0.3 GB of activations and runtime.
    pub fn memory_estimate(&self, context: usize, bf16: bool) -> u64 {
        let weights = if self.is_gguf() {
            self.hub.size_bytes.unwrap_or(0)
        } else {
            self.config.parameter_count() as u64 * if bf16 { 2 } else { 4 }
        };
        weights + self.kv_bytes_per_position() * context as u64 + 300_000_000
    }

    /// The default model.
    pub fn default_model() -> &'static str {
        "deepseek-r1-distill-qwen-1.5b"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_manifests_inherit_from_their_base() {
        let base = ModelManifest::find("deepseek-r1-distill-qwen-1.5b").unwrap();
        for q in ["q4_k_m", "q8_0", "q6_k"] {
            let m = ModelManifest::find(&format!("deepseek-r1-distill-qwen-1.5b-{q}")).unwrap();
            assert_eq!(m.hub.files.len(), 1);
            assert!(
                m.hub.files[0].ends_with(&format!("{}.gguf", q.to_uppercase())),
                "{:?}",
                m.hub.files
            );
            assert_eq!(m.special_tokens, base.special_tokens);
            assert_eq!(m.config, base.config);
            assert_eq!(m.sampling, base.sampling);
        }
    }

    #[test]
    fn builtin_manifests_parse_and_match_the_published_config() {
        let all = ModelManifest::builtin();
        assert_eq!(all.len(), BUILTIN.len(), "every built-in manifest parses");
        for m in &all {
            // The published parameter count (`parameters = "8.03B"`) is what the config's shapes
            // give: a typo in a shape would not pass.
            let said: f64 = m
                .parameters
                .as_deref()
                .and_then(|p| p.strip_suffix('B'))
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("{}: parameters", m.name));
            let got = m.config.parameter_count() as f64 / 1e9;
            assert!(
                (got / said - 1.0).abs() < 0.01,
                "{}: config gives {got:.3}B, manifest says {said}B",
                m.name
            );
            assert_eq!(m.config.architecture.name(), m.architecture, "{}", m.name);
            assert!(m.hub.size_bytes.is_some(), "{}: size_bytes", m.name);
            let tc: serde_json::Value =
                serde_json::from_str(m.tokenizer_config_json.as_deref().unwrap()).unwrap();
            assert!(tc["chat_template"]
                .as_str()
                .unwrap()
                .contains("<｜Assistant｜><think>"));
        }
        for name in [
            "deepseek-r1-distill-llama-8b",
            "deepseek-r1-distill-llama-70b",
        ] {
            let m = ModelManifest::find(name).unwrap();
            let c = &m.config;
            assert_eq!(c.architecture, crate::config::Architecture::Llama);
            assert!(!c.attention_bias && !c.tie_word_embeddings);
            assert_eq!(
                (c.vocab_size, c.head_dim, c.num_key_value_heads),
                (128256, 128, 8)
            );
            let s = c.rope.llama3.as_ref().expect("llama3 RoPE scaling");
            assert_eq!((s.factor, s.original_max_position_embeddings), (8.0, 8192));
            assert_eq!(m.special_tokens.bos.id, 128000);
            assert_eq!(m.generation_config.bos_token_id, Some(128000));
        }
        let m = ModelManifest::find("deepseek-r1-distill-qwen-1.5b").unwrap();
        assert_eq!(m.hub.repo, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B");
        assert_eq!(m.config.hidden_size, 1536);
        assert_eq!(m.config.num_hidden_layers, 28);
        assert_eq!(m.config.vocab_size, 151936);
        assert_eq!(m.special_tokens.bos.id, 151646);
        assert_eq!(m.generation_config.bos_token_id, Some(151646));
        assert_eq!(m.special_tokens.tokenizer_size, 151665);
        // About 1.78 B parameters, as published.
        let p = m.config.parameter_count() as f64 / 1e9;
        assert!((1.7..1.85).contains(&p), "{p}");
        assert!(m.tokenizer_config_json.unwrap().contains("chat_template"));
        assert!(ModelManifest::find("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B").is_some());
    }
}
