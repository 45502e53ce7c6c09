//! What language models and embedders share before any file is fetched: where a model lives on the
//! hub, the compiled-in manifests looked up by name or repository, and how the model a user names
//! is read (a local path, a built-in name, `owner/name[@revision]`, `owner/name[@revision]/file`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where a model lives on the Hugging Face hub, as a manifest says.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct HubLocation {
    /// `owner/name`.
    pub repo: String,
    /// Branch, tag or commit.
    #[serde(default = "default_revision")]
    pub revision: String,
    /// The files to fetch (for a sharded model, its index names the shards).
    pub files: Vec<String>,
    /// The published precision of the weights (`bf16`, `q4_k_m`...).
    #[serde(default)]
    pub weights_dtype: Option<String>,
    /// Approximate download size in bytes.
    #[serde(default)]
    pub size_bytes: Option<u64>,
}

fn default_revision() -> String {
    "main".into()
}

/// A compiled-in model manifest of either kind.
pub trait Manifest: Clone {
    /// The name users type (`deepseek-r1-distill-llama-8b`, `bge-base-en-v1.5`).
    fn name(&self) -> &str;
    /// Where the model lives.
    fn hub(&self) -> &HubLocation;
}

/// The manifest called `name` (case-insensitive), or whose hub repository is `name`.
pub fn find<M: Manifest>(manifests: impl IntoIterator<Item = M>, name: &str) -> Option<M> {
    manifests
        .into_iter()
        .find(|m| m.name().eq_ignore_ascii_case(name) || m.hub().repo.eq_ignore_ascii_case(name))
}

/// A model as the user named it, before any file is fetched.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSpec<M> {
    /// An existing directory.
    Dir(PathBuf),
    /// An existing single-file model (a GGUF file).
    File(PathBuf),
    /// A built-in model.
    Manifest(M),
    /// A hub repository without a manifest.
    Repo {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
    },
    /// One file of a hub repository (`owner/name[@revision]/file.gguf`).
    RepoFile {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
        /// The file's path in the repository.
        file: String,
    },
}

/// How one kind of model is named: what its single-file format is, if any, and what a directory
/// of it holds (for messages).
#[derive(Debug, Clone, Copy)]
pub struct SpecRules<'a> {
    /// `embedder`, `model`: what the messages call it.
    pub kind: &'a str,
    /// The extension of single-file models (`gguf`), or `None` when only directories are.
    pub file_extension: Option<&'a str>,
    /// What a model directory holds, for the message about a wrong file.
    pub dir_contents: &'a str,
}

/// Why a spec names no model, worded for the user.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{spec}: {message}")]
pub struct SpecError {
    /// What the user typed.
    pub spec: String,
    /// What it is not, and what would work.
    pub message: String,
}

/// Reads `spec` for a model of `rules`' kind among the `builtin` manifests: an existing path is a
/// directory or a single-file model; a built-in name or its repository is a manifest;
/// `owner/name[@revision]/file.ext` is one file of a hub repository; `owner/name[@revision]` is a
/// hub repository.
pub fn parse_spec<M: Manifest>(
    spec: &str,
    builtin: Vec<M>,
    rules: SpecRules,
) -> Result<ModelSpec<M>, SpecError> {
    let fail = |message: String| SpecError {
        spec: spec.into(),
        message,
    };
    let single_file = |s: &str| {
        rules
            .file_extension
            .is_some_and(|ext| s.to_ascii_lowercase().ends_with(&format!(".{ext}")))
    };
    let path = Path::new(spec);
    if path.exists() {
        if path.is_dir() {
            return Ok(ModelSpec::Dir(path.to_path_buf()));
        }
        if single_file(spec) {
            return Ok(ModelSpec::File(path.to_path_buf()));
        }
        let not = match rules.file_extension {
            Some(ext) => format!(
                "is a file but not a .{ext}; give a {} file or",
                ext.to_uppercase()
            ),
            None => "is a file; give".into(),
        };
        return Err(fail(format!(
            "{not} the directory that holds {}",
            rules.dir_contents
        )));
    }
    let names: Vec<String> = builtin.iter().map(|m| m.name().to_string()).collect();
    if let Some(m) = find(builtin, spec) {
        return Ok(ModelSpec::Manifest(m));
    }
    if let Some(ext) = rules.file_extension.filter(|_| single_file(spec)) {
        let mut parts = spec.splitn(3, '/');
        if let (Some(owner), Some(name), Some(file)) = (parts.next(), parts.next(), parts.next()) {
            if let Some((repo, revision)) = crate::parse_repo_spec(&format!("{owner}/{name}")) {
                return Ok(ModelSpec::RepoFile {
                    repo,
                    revision,
                    file: file.to_string(),
                });
            }
        }
        return Err(fail(format!(
            "no such {} file here, and not a hub file (owner/name/file.{ext})",
            ext.to_uppercase()
        )));
    }
    if let Some((repo, revision)) = crate::parse_repo_spec(spec) {
        return Ok(ModelSpec::Repo { repo, revision });
    }
    let file = rules
        .file_extension
        .map(|e| format!(", {} file", e.to_uppercase()))
        .unwrap_or_default();
    Err(fail(format!(
        "no such directory{file}, built-in {} ({}) or hub repository (owner/name)",
        rules.kind,
        names.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct M(HubLocation, &'static str);

    impl Manifest for M {
        fn name(&self) -> &str {
            self.1
        }
        fn hub(&self) -> &HubLocation {
            &self.0
        }
    }

    fn builtin() -> Vec<M> {
        let hub = HubLocation {
            repo: "Org/Model-1B".into(),
            revision: "main".into(),
            files: vec![],
            weights_dtype: None,
            size_bytes: None,
        };
        vec![M(hub, "model-1b")]
    }

    const LM: SpecRules = SpecRules {
        kind: "model",
        file_extension: Some("gguf"),
        dir_contents: "config.json and the weights",
    };
    const EMBEDDER: SpecRules = SpecRules {
        kind: "embedder",
        file_extension: None,
        dir_contents: "config.json, tokenizer.json and model.safetensors",
    };

    #[test]
    fn specs_read_the_same_for_every_kind_of_model() {
        let dir = std::env::temp_dir().join(format!("thinkrag-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let gguf = dir.join("m.gguf");
        std::fs::write(&gguf, b"x").unwrap();
        let txt = dir.join("m.txt");
        std::fs::write(&txt, b"x").unwrap();
        let d = dir.to_str().unwrap();
        for rules in [LM, EMBEDDER] {
            assert_eq!(
                parse_spec(d, builtin(), rules).unwrap(),
                ModelSpec::Dir(dir.clone())
            );
            assert!(matches!(
                parse_spec("MODEL-1B", builtin(), rules),
                Ok(ModelSpec::Manifest(_))
            ));
            assert!(matches!(
                parse_spec("org/model-1b", builtin(), rules),
                Ok(ModelSpec::Manifest(_))
            ));
            assert_eq!(
                parse_spec("a/b@v2", builtin(), rules).unwrap(),
                ModelSpec::Repo {
                    repo: "a/b".into(),
                    revision: "v2".into()
                }
            );
            let e = parse_spec("nothing", builtin(), rules).unwrap_err();
            assert!(
                e.message.contains("model-1b") && e.message.contains(rules.kind),
                "{e}"
            );
            let e = parse_spec(txt.to_str().unwrap(), builtin(), rules).unwrap_err();
            assert!(e.message.contains(rules.dir_contents), "{e}");
        }
        assert_eq!(
            parse_spec(gguf.to_str().unwrap(), builtin(), LM).unwrap(),
            ModelSpec::File(gguf.clone())
        );
        assert!(parse_spec(gguf.to_str().unwrap(), builtin(), EMBEDDER).is_err());
        assert_eq!(
            parse_spec("a/b@v1/sub/f.GGUF", builtin(), LM).unwrap(),
            ModelSpec::RepoFile {
                repo: "a/b".into(),
                revision: "v1".into(),
                file: "sub/f.GGUF".into()
            }
        );
        assert!(parse_spec("f.gguf", builtin(), LM)
            .unwrap_err()
            .message
            .contains("hub file"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
