//! Finding a model's files: a local directory, or a hub repository named directly or through a
//! manifest, fetched with hf-hub into the standard Hugging Face cache (`HF_HOME`), used offline once
//! cached (`HF_HUB_OFFLINE=1` never touches the network).

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};
use crate::manifest::ModelManifest;

/// What the user named as the model.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A directory with config.json, tokenizer.json, safetensors...
    Dir(PathBuf),
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
    /// Interprets `spec`: an existing path is a directory; a built-in name or its repo is a
    /// manifest; `owner/name[@revision]` is a hub repo.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.exists() {
            if !path.is_dir() {
                return Err(Error::Hub {
                    model: spec.into(),
                    message: "is a file; give the directory that holds config.json, tokenizer.json and the safetensors".into(),
                });
            }
            return Ok(Self::Dir(path.to_path_buf()));
        }
        if let Some(m) = ModelManifest::find(spec) {
            return Ok(Self::Manifest(Box::new(m)));
        }
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) => (r, rev),
            None => (spec, "main"),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() == 2 && parts.iter().all(|p| !p.is_empty()) && !spec.starts_with('.') {
            return Ok(Self::Repo {
                repo: repo.into(),
                revision: revision.into(),
            });
        }
        Err(Error::Hub {
            model: spec.into(),
            message: format!(
                "no such directory, built-in model ({}) or hub repository (owner/name)",
                ModelManifest::builtin_names().join(", ")
            ),
        })
    }

    /// A short name for messages.
    pub fn name(&self) -> String {
        match self {
            Self::Dir(p) => p.display().to_string(),
            Self::Manifest(m) => m.name.clone(),
            Self::Repo { repo, .. } => repo.clone(),
        }
    }
}

/// How to reach the hub.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Access token (gated repos); otherwise `HF_TOKEN` or the cache's token file.
    pub token: Option<String>,
    /// Never use the network (also set by `HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Cache directory instead of `$HF_HOME/hub` (default `~/.cache/huggingface/hub`).
    pub cache_dir: Option<PathBuf>,
    /// Show download progress bars.
    pub progress: bool,
}

impl HubOptions {
    /// Options from the environment: `HF_HUB_OFFLINE`, `HF_TOKEN`.
    pub fn from_env() -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
            .unwrap_or(false);
        Self {
            token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
            offline,
            cache_dir: None,
            progress: false,
        }
    }

    fn cache(&self) -> Cache {
        match &self.cache_dir {
            Some(dir) => Cache::new(dir.clone()),
            None => Cache::from_env(),
        }
    }
}

/// The files of a model, all local.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The directory (or hub snapshot) they came from.
    pub dir: PathBuf,
    /// `config.json`.
    pub config: PathBuf,
    /// `generation_config.json`, if the model has one.
    pub generation_config: Option<PathBuf>,
    /// `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// `tokenizer_config.json`, if present.
    pub tokenizer_config: Option<PathBuf>,
    /// One or more safetensors files.
    pub weights: Vec<PathBuf>,
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
            config,
            generation_config: optional("generation_config.json"),
            tokenizer,
            tokenizer_config: optional("tokenizer_config.json"),
            weights,
        })
    }

    /// Resolves `source` to local files, downloading into the HF cache when allowed and needed.
    pub fn fetch(source: &ModelSource, hub: &HubOptions) -> Result<Self> {
        match source {
            ModelSource::Dir(dir) => Self::from_dir(dir),
            ModelSource::Manifest(m) => {
                fetch_repo(&m.hub.repo, &m.hub.revision, Some(&m.hub.files), hub)
            }
            ModelSource::Repo { repo, revision } => fetch_repo(repo, revision, None, hub),
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
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let cache = opts.cache();
    let cached = cache.repo(repo.clone());
    let api = if opts.offline {
        None
    } else {
        let mut builder = ApiBuilder::from_cache(cache.clone())
            .with_progress(opts.progress)
            .with_retries(1);
        if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
            builder = builder.with_endpoint(endpoint);
        }
        if opts.token.is_some() {
            builder = builder.with_token(opts.token.clone());
        }
        Some(builder.build().map_err(|e| Error::Hub {
            model: repo_id.into(),
            message: format!("cannot set up the hub client: {e}"),
        })?)
    };
    let cache_root = cache.path().clone();
    let get = |file: &str, required: bool| -> Result<Option<PathBuf>> {
        if let Some(p) = cached.get(file) {
            return Ok(Some(p));
        }
        let Some(api) = &api else {
            if !required {
                return Ok(None);
            }
            return Err(Error::Hub {
                model: repo_id.into(),
                message: format!(
                    "{file} is not in the Hugging Face cache at {} and offline mode is on (--offline or HF_HUB_OFFLINE=1). Download it on a connected machine with `thinkrag download {repo_id}` (or `huggingface-cli download {repo_id} --revision {revision}`) into that cache (or set HF_HOME to where it is), or pass a local model directory",
                    cache_root.display()
                ),
            });
        };
        match api.repo(repo.clone()).get(file) {
            Ok(p) => Ok(Some(p)),
            Err(_) if !required => Ok(None),
            Err(e) => Err(Error::Hub {
                model: repo_id.into(),
                message: format!(
                    "cannot download {file} from the Hugging Face hub ({e}). It is not cached at {}: connect to the network (set HF_TOKEN for gated repos), or copy the model there, or pass a local model directory",
                    cache_root.display()
                ),
            }),
        }
    };
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
        config,
        generation_config,
        tokenizer,
        tokenizer_config,
        weights,
    })
}
