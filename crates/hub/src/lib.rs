//! thinkrag-hub: fetching a model's files from the Hugging Face hub with hf-hub into the standard
//! cache (`HF_HOME`), and finding them there offline. The language model and the embedders load
//! through it, so both honour the same cache, token and offline switch.

use std::path::PathBuf;

pub mod catalog;
pub use catalog::{find, parse_spec, HubLocation, Manifest, ModelSpec, SpecError, SpecRules};

use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::{Cache, CacheRepo, Repo, RepoType};

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

    /// The cache these options point at.
    pub fn cache(&self) -> Cache {
        match &self.cache_dir {
            Some(dir) => Cache::new(dir.clone()),
            None => Cache::from_env(),
        }
    }
}

/// A hub failure, worded for the user: what is missing and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{repo}: {message}")]
pub struct HubError {
    /// `owner/name`.
    pub repo: String,
    /// What failed and what to do.
    pub message: String,
}

/// One model repository at one revision: files come from the cache when there, else from the
/// network unless offline.
pub struct RepoFiles {
    repo_id: String,
    revision: String,
    repo: Repo,
    cached: CacheRepo,
    cache_root: PathBuf,
    api: Option<Api>,
}

impl RepoFiles {
    /// Opens `repo_id` at `revision` (a branch, tag or commit).
    pub fn new(repo_id: &str, revision: &str, opts: &HubOptions) -> Result<Self, HubError> {
        let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
        let cache = opts.cache();
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
            Some(builder.build().map_err(|e| HubError {
                repo: repo_id.into(),
                message: format!("cannot set up the hub client: {e}"),
            })?)
        };
        Ok(Self {
            repo_id: repo_id.into(),
            revision: revision.into(),
            cached: cache.repo(repo.clone()),
            cache_root: cache.path().clone(),
            repo,
            api,
        })
    }

    /// The local path of `file`, downloading it if needed and allowed. A file that is not
    /// `required` gives `Ok(None)` when it cannot be had; a required one an error that says where
    /// the cache is and how to fill it.
    pub fn get(&self, file: &str, required: bool) -> Result<Option<PathBuf>, HubError> {
        if let Some(p) = self.cached.get(file) {
            return Ok(Some(p));
        }
        let (repo_id, revision) = (&self.repo_id, &self.revision);
        let Some(api) = &self.api else {
            if !required {
                return Ok(None);
            }
            return Err(HubError {
                repo: repo_id.clone(),
                message: format!(
                    "{file} is not in the Hugging Face cache at {} and offline mode is on (--offline or HF_HUB_OFFLINE=1). Download it on a connected machine with `thinkrag download {repo_id}` (or `huggingface-cli download {repo_id} --revision {revision}`) into that cache (or set HF_HOME to where it is), or pass a local model directory",
                    self.cache_root.display()
                ),
            });
        };
        match api.repo(self.repo.clone()).get(file) {
            Ok(p) => Ok(Some(p)),
            Err(_) if !required => Ok(None),
            Err(e) => Err(HubError {
                repo: repo_id.clone(),
                message: format!(
                    "cannot download {file} from the Hugging Face hub ({e}). It is not cached at {}: connect to the network (set HF_TOKEN for gated repos), or copy the model there, or pass a local model directory",
                    self.cache_root.display()
                ),
            }),
        }
    }

    /// Like [`RepoFiles::get`] for a file that must be there.
    pub fn require(&self, file: &str) -> Result<PathBuf, HubError> {
        self.get(file, true)?.ok_or_else(|| HubError {
            repo: self.repo_id.clone(),
            message: format!("{file} could not be found"),
        })
    }

    /// The repository id.
    pub fn repo_id(&self) -> &str {
        &self.repo_id
    }
}

/// Splits `owner/name[@revision]` into repo and revision (default `main`); `None` when `spec` is
/// not shaped like a hub repository.
pub fn parse_repo_spec(spec: &str) -> Option<(String, String)> {
    let (repo, revision) = match spec.split_once('@') {
        Some((r, rev)) => (r, rev),
        None => (spec, "main"),
    };
    let parts: Vec<&str> = repo.split('/').collect();
    (parts.len() == 2
        && parts.iter().all(|p| !p.is_empty())
        && !spec.starts_with('.')
        && !revision.is_empty())
    .then(|| (repo.to_string(), revision.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_specs() {
        assert_eq!(
            parse_repo_spec("BAAI/bge-small-en-v1.5"),
            Some(("BAAI/bge-small-en-v1.5".into(), "main".into()))
        );
        assert_eq!(parse_repo_spec("a/b@v1"), Some(("a/b".into(), "v1".into())));
        assert_eq!(parse_repo_spec("./a/b"), None);
        assert_eq!(parse_repo_spec("a/b/c"), None);
        assert_eq!(parse_repo_spec("a/"), None);
        assert_eq!(parse_repo_spec("a/b@"), None);
    }

    #[test]
    fn offline_missing_file_says_what_to_do() {
        let dir = tempfile_dir();
        let opts = HubOptions {
            offline: true,
            cache_dir: Some(dir.clone()),
            ..HubOptions::default()
        };
        let files = RepoFiles::new("owner/model", "main", &opts).unwrap();
        assert_eq!(files.get("config.json", false).unwrap(), None);
        let err = files.get("config.json", true).unwrap_err().to_string();
        assert!(err.contains("offline"), "{err}");
        assert!(err.contains("thinkrag download owner/model"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("thinkrag-hub-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
