//! Embedding-model manifests (`models/*.toml` with `kind = "embedding"`): what thinkrag knows about
//! each supported embedder (hub repo, dimensions, pooling, token limit, query instruction). They are
//! compiled in, so `--embedder bge-small-en-v1.5` works with nothing beside the binary.

use std::path::Path;

use serde::Deserialize;

use crate::error::{EmbedError, Result};
use crate::pooling::Pooling;

/// Where an embedder lives on the Hugging Face hub: the same type as the language models'.
pub type EmbedderHub = thinkrag_hub::HubLocation;

/// One supported embedding model.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct EmbedderManifest {
    /// The name users type (`bge-base-en-v1.5`).
    pub name: String,
    /// The published name (`BAAI/bge-base-en-v1.5`).
    pub display_name: String,
    /// Always `embedding`.
    pub kind: String,
    /// Architecture family (`bert`).
    pub architecture: String,
    /// Output dimensions.
    pub dim: usize,
    /// How token states become one vector.
    pub pooling: Pooling,
    /// Whether vectors are L2-normalised.
    pub normalize: bool,
    /// Longest input in tokens, special tokens included.
    pub max_tokens: usize,
    /// Prefix for queries (never passages), if the model was trained with one.
    #[serde(default)]
    pub query_instruction: Option<String>,
    /// Where to download it.
    pub hub: EmbedderHub,
}

const BUILTIN: &[&str] = &[
    include_str!("../../../models/bge-base-en-v1.5.toml"),
    include_str!("../../../models/bge-small-en-v1.5.toml"),
    include_str!("../../../models/all-minilm-l6-v2.toml"),
];

impl thinkrag_hub::Manifest for EmbedderManifest {
    fn name(&self) -> &str {
        &self.name
    }
    fn hub(&self) -> &EmbedderHub {
        &self.hub
    }
}

impl EmbedderManifest {
    /// Parses a manifest.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let m: Self = toml::from_str(text).map_err(|e| EmbedError::Parse {
            path: origin.to_path_buf(),
            format: "TOML",
            message: e.to_string(),
        })?;
        if m.kind != "embedding" {
            return Err(EmbedError::Parse {
                path: origin.to_path_buf(),
                format: "TOML",
                message: format!("kind is {:?}, not \"embedding\"", m.kind),
            });
        }
        Ok(m)
    }

    /// Every built-in embedder.
    pub fn builtin() -> Vec<Self> {
        BUILTIN
            .iter()
            .filter_map(|t| Self::parse(t, Path::new("models/")).ok())
            .collect()
    }

    /// The built-in embedder called `name` (case-insensitive), or whose hub repo is `name`.
    pub fn find(name: &str) -> Option<Self> {
        thinkrag_hub::find(Self::builtin(), name)
    }

    /// The built-in embedder a local path or hub snapshot belongs to, judged by its name
    /// (`.../bge-small-en-v1.5` or the cache's `models--BAAI--bge-small-en-v1.5/...`).
    pub fn recognise(path: &Path) -> Option<Self> {
        let text = path.to_string_lossy().to_ascii_lowercase();
        Self::builtin().into_iter().find(|m| {
            let cache_name =
                format!("models--{}", m.hub.repo.replace('/', "--")).to_ascii_lowercase();
            text.contains(&cache_name)
                || path.components().any(|c| {
                    c.as_os_str()
                        .to_string_lossy()
                        .eq_ignore_ascii_case(&m.name)
                })
        })
    }

    /// The default embedder.
    pub fn default_name() -> &'static str {
        "bge-base-en-v1.5"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_embedders_parse() {
        let all = EmbedderManifest::builtin();
        assert_eq!(all.len(), BUILTIN.len());
        let bge = EmbedderManifest::find("BAAI/bge-base-en-v1.5").unwrap();
        assert_eq!(
            (bge.dim, bge.pooling, bge.max_tokens),
            (768, Pooling::Cls, 512)
        );
        assert!(bge.query_instruction.is_some());
        let mini = EmbedderManifest::find("all-minilm-l6-v2").unwrap();
        assert_eq!(
            (mini.dim, mini.pooling, mini.max_tokens),
            (384, Pooling::Mean, 256)
        );
        assert!(mini.query_instruction.is_none());
        assert!(EmbedderManifest::find(EmbedderManifest::default_name()).is_some());
        let snap = Path::new("/c/hub/models--BAAI--bge-small-en-v1.5/snapshots/abc");
        assert_eq!(
            EmbedderManifest::recognise(snap).unwrap().name,
            "bge-small-en-v1.5"
        );
        assert!(EmbedderManifest::recognise(Path::new("/tmp/x")).is_none());
    }
}
