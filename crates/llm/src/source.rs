//! Finding a model's files: a local directory, or a hub repository named directly or through a
//! manifest, fetched with hf-hub into the standard Hugging Face cache (`HF_HOME`), used offline once
//! cached (`HF_HUB_OFFLINE=1` never touches the network).

use std::path::{Path, PathBuf};

pub use thinkrag_hub::HubOptions;
use thinkrag_hub::{HubError, RepoFiles};

use crate::error::{Error, Result};
use crate::manifest::ModelManifest;

/// What the user named as the model.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A directory with config.json, tokenizer.json, safetensors...
    Dir(PathBuf),
    /// A local GGUF file (tokenizer and chat template from its metadata, or from a tokenizer.json
    /// beside it).
    Gguf(PathBuf),
    /// One GGUF file of a hub repository (`owner/name/file.gguf`).
    RepoGguf {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
        /// The file's path in the repository.
        file: String,
    },
    /// A built-in model.
    Manifest(Box<ModelManifest>),
    /// A hub repository without a manifest.
    Repo {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
    },
}

impl ModelSource {
    /// Interprets `spec`: an existing path is a directory or a GGUF file; a built-in name or its
    /// repo is a manifest; `owner/name[@revision]/file.gguf` is one GGUF file of a hub repo;
    /// `owner/name[@revision]` is a hub repo.
    pub fn parse(spec: &str) -> Result<Self> {
        use thinkrag_hub::ModelSpec;
        let rules = thinkrag_hub::SpecRules {
            kind: "model",
            file_extension: Some("gguf"),
            dir_contents: "config.json, tokenizer.json and the safetensors",
        };
        let parsed =
            thinkrag_hub::parse_spec(spec, ModelManifest::builtin(), rules).map_err(|e| {
                Error::Hub {
                    model: e.spec,
                    message: e.message,
                }
            })?;
        Ok(match parsed {
            ModelSpec::Dir(p) => Self::Dir(p),
            ModelSpec::File(p) => Self::Gguf(p),
            ModelSpec::Manifest(m) => Self::Manifest(Box::new(m)),
            ModelSpec::Repo { repo, revision } => Self::Repo { repo, revision },
            ModelSpec::RepoFile {
                repo,
                revision,
                file,
            } => Self::RepoGguf {
                repo,
                revision,
                file,
            },
        })
    }

    /// A short name for messages.
    pub fn name(&self) -> String {
        match self {
            Self::Dir(p) | Self::Gguf(p) => p.display().to_string(),
            Self::Manifest(m) => m.name.clone(),
            Self::Repo { repo, .. } => repo.clone(),
            Self::RepoGguf { repo, file, .. } => format!("{repo}/{file}"),
        }
    }
}

fn is_gguf(spec: &str) -> bool {
    spec.to_ascii_lowercase().ends_with(".gguf")
}

/// A model's weight files.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightFiles {
    /// One or more safetensors files (with config.json beside them).
    Safetensors(Vec<PathBuf>),
    /// One GGUF file: configuration, weights and usually the tokenizer.
    Gguf(PathBuf),
}

impl WeightFiles {
    /// The first weight file, for messages.
    pub fn first(&self) -> PathBuf {
        match self {
            Self::Safetensors(v) => v.first().cloned().unwrap_or_default(),
            Self::Gguf(p) => p.clone(),
        }
    }
}

/// The files of a model, all local.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The directory (or hub snapshot) they came from.
    pub dir: PathBuf,
    /// `config.json` (`None` for GGUF: its metadata has the configuration).
    pub config: Option<PathBuf>,
    /// `generation_config.json`, if the model has one.
    pub generation_config: Option<PathBuf>,
    /// `tokenizer.json` (`None` for a GGUF file without one beside it: the metadata has it).
    pub tokenizer: Option<PathBuf>,
    /// `tokenizer_config.json`, if present.
    pub tokenizer_config: Option<PathBuf>,
    /// The weights.
    pub weights: WeightFiles,
}

const INDEX: &str = "model.safetensors.index.json";

impl ModelFiles {
    /// The files of a local model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let need = |file: &str, hint: &str| -> Result<PathBuf> {
            let p = dir.join(file);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::MissingFile {
                    dir: dir.to_path_buf(),
                    file: file.into(),
                    hint: hint.into(),
                })
            }
        };
        let optional = |file: &str| Some(dir.join(file)).filter(|p| p.is_file());
        let config = need(
            "config.json",
            "a model directory needs the model's config.json",
        )?;
        let tokenizer = need(
            "tokenizer.json",
            "copy the model's tokenizer.json beside config.json",
        )?;
        let weights = if let Some(index) = optional(INDEX) {
            shard_paths(&index, dir)?
        } else if dir.join("model.safetensors").is_file() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(Error::MissingFile {
                    dir: dir.to_path_buf(),
                    file: "model.safetensors".into(),
                    hint: "no *.safetensors weights found (thinkrag reads safetensors, not .bin or .pth)".into(),
                });
            }
            found
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config: Some(config),
            generation_config: optional("generation_config.json"),
            tokenizer: Some(tokenizer),
            tokenizer_config: optional("tokenizer_config.json"),
            weights: WeightFiles::Safetensors(weights),
        })
    }

    /// A GGUF file, with any tokenizer.json, tokenizer_config.json and generation_config.json
    /// beside it (they take precedence over the GGUF metadata).
    pub fn from_gguf(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
                file: path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into(),
                hint: "no such GGUF file".into(),
            });
        }
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let optional = |file: &str| Some(dir.join(file)).filter(|p| p.is_file());
        Ok(Self {
            config: None,
            generation_config: optional("generation_config.json"),
            tokenizer: optional("tokenizer.json"),
            tokenizer_config: optional("tokenizer_config.json"),
            weights: WeightFiles::Gguf(path.to_path_buf()),
            dir,
        })
    }

    /// Resolves `source` to local files, downloading into the HF cache when allowed and needed.
    pub fn fetch(source: &ModelSource, hub: &HubOptions) -> Result<Self> {
        match source {
            ModelSource::Dir(dir) => Self::from_dir(dir),
            ModelSource::Gguf(path) => Self::from_gguf(path),
            ModelSource::Manifest(m) => match m.hub.files.iter().find(|f| is_gguf(f)) {
                Some(file) => fetch_gguf(&m.hub.repo, &m.hub.revision, file, hub),
                None => fetch_repo(&m.hub.repo, &m.hub.revision, Some(&m.hub.files), hub),
            },
            ModelSource::Repo { repo, revision } => fetch_repo(repo, revision, None, hub),
            ModelSource::RepoGguf {
                repo,
                revision,
                file,
            } => fetch_gguf(repo, revision, file, hub),
        }
    }
}

/// The shard file names an index's `weight_map` lists, sorted and deduplicated.
fn weight_map_files(index: &Path) -> Result<Vec<String>> {
    let v: serde_json::Value = crate::config::read_json(index)?;
    let mut files: Vec<String> = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(Error::Parse {
            path: index.to_path_buf(),
            format: "JSON",
            message: "no weight_map".into(),
        });
    }
    Ok(files)
}

/// The shard files of a local sharded model, checked to exist.
fn shard_paths(index: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = weight_map_files(index)?
        .iter()
        .map(|f| dir.join(f))
        .collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        return Err(Error::MissingFile {
            dir: dir.to_path_buf(),
            file: missing
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into(),
            hint: format!("{INDEX} names it but it is not there"),
        });
    }
    Ok(paths)
}

fn fetch_repo(
    repo_id: &str,
    revision: &str,
    files: Option<&[String]>,
    opts: &HubOptions,
) -> Result<ModelFiles> {
    let hub = RepoFiles::new(repo_id, revision, opts).map_err(hub_error)?;
    let get = |file: &str, required: bool| hub.get(file, required).map_err(hub_error);
    let required = |f: &str| files.is_none_or(|fs| fs.iter().any(|x| x == f));
    let config = get("config.json", true)?.unwrap_or_default();
    let tokenizer = get("tokenizer.json", true)?.unwrap_or_default();
    let tokenizer_config = get(
        "tokenizer_config.json",
        required("tokenizer_config.json") && files.is_some(),
    )?;
    let generation_config = get(
        "generation_config.json",
        required("generation_config.json") && files.is_some(),
    )?;
    let weight_files: Vec<String> = match files {
        Some(fs) => fs
            .iter()
            .filter(|f| f.ends_with(".safetensors"))
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    let weights = if !weight_files.is_empty() {
        weight_files
            .iter()
            .map(|f| get(f, true).map(Option::unwrap_or_default))
            .collect::<Result<Vec<_>>>()?
    } else if let Some(index) = get(INDEX, false)? {
        weight_map_files(&index)?
            .iter()
            .map(|f| get(f, true).map(Option::unwrap_or_default))
            .collect::<Result<Vec<_>>>()?
    } else {
        vec![get("model.safetensors", true)?.unwrap_or_default()]
    };
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(ModelFiles {
        dir,
        config: Some(config),
        generation_config,
        tokenizer: Some(tokenizer),
        tokenizer_config,
        weights: WeightFiles::Safetensors(weights),
    })
}

/// Downloads one GGUF file of a repo (the tokenizer comes from its metadata).
fn fetch_gguf(repo_id: &str, revision: &str, file: &str, opts: &HubOptions) -> Result<ModelFiles> {
    let hub = RepoFiles::new(repo_id, revision, opts).map_err(hub_error)?;
    let path = hub.get(file, true).map_err(hub_error)?.unwrap_or_default();
    ModelFiles::from_gguf(&path)
}

fn hub_error(e: HubError) -> Error {
    Error::Hub {
        model: e.repo,
        message: e.message,
    }
}
