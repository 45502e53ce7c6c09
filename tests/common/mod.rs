//! What the CLI's end-to-end tests share: `thinkrag` run with the test embedder and offline, its
//! JSON output read, the file names of search hits, and a `thinkrag serve` child on loopback that
//! is killed when dropped (even when the test fails).
#![allow(dead_code)] // each test file uses its own part

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use assert_cmd::Command;
use serde_json::Value;
use thinkrag::embed::test_models::minilm_dir;

/// The repository.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The sample corpus.
pub fn corpus() -> PathBuf {
    root().join("samples/population")
}

/// `count` documents `dir/doc-NNN.txt`, each the sample corpus's Chicago text with an appendix of
/// `repeat` more copies: a batch big enough that a kill lands while it is embedded or saved.
pub fn write_reports(dir: &Path, count: usize, repeat: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let base = std::fs::read_to_string(corpus().join("chicago.txt")).unwrap();
    for i in 0..count {
        std::fs::write(
            dir.join(format!("doc-{i:03}.txt")),
            format!(
                "Report {i}. {}\n\nAppendix {i}: {}",
                base,
                base.repeat(repeat)
            ),
        )
        .unwrap();
    }
}

/// `thinkrag SUB FLAG LOCATION REST...` (FLAG `--index` or `--store`) with the test embedder,
/// offline, with none of the user's defaults.
pub fn cmd(sub: &[&str], flag: &str, location: impl AsRef<OsStr>, rest: &[&str]) -> Command {
    let mut c = Command::cargo_bin("thinkrag").unwrap();
    c.env_remove("THINKRAG_INDEX")
        .env_remove("HF_TOKEN")
        .env_remove("PGPASSWORD")
        .env("HF_HUB_OFFLINE", "1")
        .env("THINKRAG_EMBEDDER", minilm_dir())
        .env("RAYON_NUM_THREADS", "2")
        .args(sub)
        .arg(flag)
        .arg(location)
        .args(rest);
    c
}

/// Runs `c`, expects exit status `want_code` and no panic, and parses its stdout as JSON.
pub fn run_json(c: &mut Command, want_code: i32) -> Value {
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(want_code),
        "exit status; stderr: {stderr}; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!stderr.contains("panicked"), "no panics: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The file names of a `search --json` response's hits, in rank order.
pub fn hit_sources(v: &Value) -> Vec<String> {
    v["hits"]["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            Path::new(h["_source"]["source"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// A running `thinkrag serve` (the tiny model, MiniLM, a port of its own), killed when dropped.
pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The data directory (a fresh one unless the test names its own with --data-dir).
    _data: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts it with `extra` flags and waits for the URL it prints.
    pub fn start(extra: &[&str]) -> Self {
        let data = (!extra.contains(&"--data-dir")).then(|| tempfile::tempdir().unwrap());
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_thinkrag"));
        command.args(["serve", "--port", "0", "--device", "cpu", "--threads", "2"]);
        if let Some(d) = &data {
            command.arg("--data-dir").arg(d.path());
        }
        let mut child = command
            .arg("--model")
            .arg(root().join("tests/fixtures/tiny-qwen2"))
            .arg("--embedder")
            .arg(minilm_dir())
            .args(extra)
            .env_remove("THINKRAG_API_KEY")
            .env_remove("THINKRAG_MODEL")
            .env_remove("THINKRAG_DATA_DIR")
            .env_remove("THINKRAG_EMBEDDER")
            .env("HF_HUB_OFFLINE", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("thinkrag serve starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server prints its URL");
        let base = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .expect("a URL on the first line")
            .to_string();
        Server {
            child,
            base,
            _data: data,
        }
    }

    /// The URL of `path` on it.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
