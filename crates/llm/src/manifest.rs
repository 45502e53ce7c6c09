//! Model manifests (`models/*.toml`): what thinkrag knows about each supported model (hub repo and
//! revision, files, architecture, special tokens, default sampling, its published config). They are
//! compiled into the binary so a model can be named without any file beside the executable.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::config::{GenerationConfig, ModelConfig};
use crate::error::{Error, Result};

/// Where a model lives on the Hugging Face hub.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct HubLocation {
    /// `owner/name`.
    pub repo: String,
    /// Branch, tag or commit.
    #[serde(default = "default_revision")]
    pub revision: String,
    /// Files to fetch.
    pub files: Vec<String>,
    /// Dtype of the published weights.
    #[serde(default)]
    pub weights_dtype: Option<String>,
}

fn default_revision() -> String {
    "main".into()
}

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

const R1_QWEN_1_5B_TOKENIZER_CONFIG: &str =
    include_str!("../../../models/deepseek-r1-distill-qwen-1.5b.tokenizer_config.json");

/// The manifests shipped in `models/`. A manifest with `base = "<name>"` (the GGUF builds of a
/// model) takes every top-level table it does not set from that manifest.
const BUILTIN: &[(&str, &str)] = &[
    (
        include_str!("../../../models/deepseek-r1-distill-qwen-1.5b.toml"),
        R1_QWEN_1_5B_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-qwen-1.5b-q4_k_m.toml"),
        R1_QWEN_1_5B_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-qwen-1.5b-q8_0.toml"),
        R1_QWEN_1_5B_TOKENIZER_CONFIG,
    ),
    (
        include_str!("../../../models/deepseek-r1-distill-qwen-1.5b-q6_k.toml"),
        R1_QWEN_1_5B_TOKENIZER_CONFIG,
    ),
];

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
        Self::builtin()
            .into_iter()
            .find(|m| m.name.eq_ignore_ascii_case(name) || m.hub.repo.eq_ignore_ascii_case(name))
    }

    /// Names of the built-in manifests, for error messages and `--help`.
    pub fn builtin_names() -> Vec<String> {
        Self::builtin().into_iter().map(|m| m.name).collect()
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
