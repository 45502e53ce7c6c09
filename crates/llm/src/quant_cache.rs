//! The CPU default for half-precision weights: the published bf16/f16 safetensors are quantized to
//! Q8_0 once and kept as a GGUF file next to the Hugging Face cache, so later starts load them
//! directly. Run as f32, the same weights take twice the memory of bf16 and decode 2-3x slower.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::ModelConfig;
use crate::device::DTypeChoice;
use crate::error::{Error, Result};
use crate::quant::Quantization;
use crate::source::{HubOptions, WeightFiles};

/// The format half-precision weights are quantized to on a CPU by default.
pub const CPU_DEFAULT: Quantization = Quantization::Q8_0;

/// Whether the default load of `config`'s weights on this device is the cached quantization:
/// a CPU, no dtype or quantization asked for, safetensors published in half precision.
pub fn applies(
    config: &ModelConfig,
    weights: &WeightFiles,
    dtype: DTypeChoice,
    quantize: Option<Quantization>,
    cpu: bool,
) -> bool {
    let half = matches!(
        config.torch_dtype.as_deref(),
        Some("bfloat16" | "float16" | "bf16" | "fp16")
    );
    cpu && dtype == DTypeChoice::Auto
        && quantize.is_none()
        && half
        && matches!(weights, WeightFiles::Safetensors(_))
}

/// Where the quantized copy of `weights` lives: `<hub cache>/../thinkrag/quantized/<model>-<key>/
/// <format>.gguf`, the key a hash of the weight files' paths, sizes and modification times (a hub
/// snapshot's path holds its repo and commit, so a new revision gets its own copy).
pub fn path(weights: &[PathBuf], hub: &HubOptions, q: Quantization) -> Result<PathBuf> {
    let mut hash = Sha256::new();
    for w in weights {
        let canonical = w.canonicalize().map_err(|e| Error::io(w, e))?;
        let meta = std::fs::metadata(&canonical).map_err(|e| Error::io(&canonical, e))?;
        hash.update(canonical.to_string_lossy().as_bytes());
        hash.update(meta.len().to_le_bytes());
        if let Ok(t) = meta.modified() {
            let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            hash.update(since.as_nanos().to_le_bytes());
        }
        hash.update([0]);
    }
    let key: String = hash
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let model = weights
        .first()
        .map(|w| model_label(w))
        .unwrap_or_else(|| "model".into());
    let hub_cache = hub.cache().path().clone();
    let root = hub_cache
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(hub_cache)
        .join("thinkrag")
        .join("quantized");
    Ok(root
        .join(format!("{model}-{key}"))
        .join(format!("{}.gguf", q.name())))
}

/// A readable name for the cache directory: `owner--name` for a hub snapshot
/// (`.../models--owner--name/snapshots/<commit>/model.safetensors`), else the weights' directory.
fn model_label(weights: &Path) -> String {
    let parts: Vec<String> = weights
        .ancestors()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let label = parts
        .iter()
        .find_map(|p| p.strip_prefix("models--").map(str::to_string))
        .or_else(|| parts.get(1).cloned())
        .unwrap_or_else(|| "model".into());
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_snapshots_are_labelled_by_repo_and_files_by_their_directory() {
        assert_eq!(
            model_label(Path::new(
                "/c/hub/models--deepseek-ai--DeepSeek-R1-Distill-Qwen-1.5B/snapshots/ad9f0ae/model.safetensors"
            )),
            "deepseek-ai--DeepSeek-R1-Distill-Qwen-1.5B"
        );
        assert_eq!(
            model_label(Path::new("/home/u/my model/model.safetensors")),
            "my_model"
        );
    }

    #[test]
    fn the_key_follows_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("model.safetensors");
        std::fs::write(&w, b"one").unwrap();
        let hub = HubOptions {
            cache_dir: Some(dir.path().join("hub")),
            ..HubOptions::default()
        };
        let a = path(std::slice::from_ref(&w), &hub, CPU_DEFAULT).unwrap();
        assert_eq!(
            a,
            path(std::slice::from_ref(&w), &hub, CPU_DEFAULT).unwrap()
        );
        assert!(a.starts_with(dir.path().join("thinkrag").join("quantized")));
        assert!(a.ends_with("q8_0.gguf"), "{}", a.display());
        std::fs::write(&w, b"changed").unwrap();
        assert_ne!(a, path(&[w], &hub, CPU_DEFAULT).unwrap());
    }
}
