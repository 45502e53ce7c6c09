//! End-to-end tests of the `thinkrag` binary on the committed tiny model: both output modes, the
//! flags, loading from a Hugging Face cache offline, and clear errors for bad input.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use serde_json::Value;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen2")
}

fn thinkrag() -> Command {
    let mut c = Command::cargo_bin("thinkrag").unwrap();
    c.env_remove("THINKRAG_MODEL")
        .env_remove("HF_TOKEN")
        .env("HF_HUB_OFFLINE", "1")
        .env("RAYON_NUM_THREADS", "2");
    c
}

fn generate(extra: &[&str]) -> Command {
    let mut c = thinkrag();
    c.arg("generate")
        .arg("What is the population of Miami?")
        .arg("--model")
        .arg(fixture())
        .args([
            "--device",
            "cpu",
            "--threads",
            "2",
            "--seed",
            "7",
            "--max-tokens",
            "24",
        ])
        .args(extra);
    c
}

fn stdout_of(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "thinkrag failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn stderr_of_failure(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(!out.status.success(), "expected a failure");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!err.contains("panicked"), "no panics: {err}");
    err
}

#[test]
fn json_output_has_reasoning_text_stop_reason_usage_and_timings() {
    let out = stdout_of(&mut generate(&["--json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["reasoning"].is_string());
    assert!(v["text"].is_string());
    let reason = v["stop_reason"].as_str().unwrap();
    assert!(reason == "stop" || reason == "length", "{reason}");
    let u = &v["usage"];
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert!((1..=24).contains(&completion));
    assert_eq!(
        completion,
        u["reasoning_tokens"].as_u64().unwrap() + u["answer_tokens"].as_u64().unwrap()
    );
    assert!(u["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(v["timings"]["time_to_first_token_ms"].as_f64().unwrap() > 0.0);
    assert!(v["timings"]["decode_tokens_per_s"].is_number());
}

#[test]
fn same_seed_same_output_and_greedy_is_deterministic() {
    let a = stdout_of(&mut generate(&["--json", "--temperature", "1.0"]));
    let b = stdout_of(&mut generate(&["--json", "--temperature", "1.0"]));
    let text = |s: &str| {
        let v: Value = serde_json::from_str(s).unwrap();
        (
            v["reasoning"].as_str().unwrap().to_string(),
            v["text"].as_str().unwrap().to_string(),
        )
    };
    assert_eq!(text(&a), text(&b));
}

#[test]
fn jsonl_streams_events_and_ends_with_done() {
    let out = stdout_of(&mut generate(&["--jsonl", "--max-thinking-tokens", "3"]));
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events.len() >= 2, "{out}");
    let last = events.last().unwrap();
    assert_eq!(last["type"], "done");
    assert!(
        last["usage"]["reasoning_tokens"].as_u64().unwrap() <= 4,
        "budget of 3 + </think>"
    );
    let mut reasoning = String::new();
    let mut answer = String::new();
    for e in &events[..events.len() - 1] {
        match e["type"].as_str().unwrap() {
            "reasoning" => reasoning.push_str(e["text"].as_str().unwrap()),
            "answer" => answer.push_str(e["text"].as_str().unwrap()),
            other => panic!("unexpected event {other}"),
        }
    }
    assert_eq!(reasoning, last["reasoning"].as_str().unwrap());
    assert_eq!(answer, last["text"].as_str().unwrap());
}

#[test]
fn plain_output_sets_the_reasoning_apart() {
    let out = stdout_of(&mut generate(&["--max-thinking-tokens", "4"]));
    assert!(out.contains("## Reasoning"), "{out}");
    let hidden = stdout_of(&mut generate(&[
        "--max-thinking-tokens",
        "4",
        "--hide-thinking",
    ]));
    assert!(!hidden.contains("## Reasoning"), "{hidden}");
}

#[test]
fn out_of_range_parameters_are_rejected_with_the_range() {
    for (flag, value, range) in [
        ("--temperature", "3", "0.0..=2.0"),
        ("--top-p", "0", "at most 1.0"),
        ("--max-tokens", "0", "1..=32768"),
        ("--max-tokens", "40000", "1..=32768"),
        ("--min-p", "1.5", "excluding 1.0"),
    ] {
        let err = stderr_of_failure(&mut generate(&[flag, value]));
        assert!(err.contains(range), "{flag} {value}: {err}");
    }
    let mut many = Vec::new();
    for i in 0..11 {
        many.push("--stop".to_string());
        many.push(format!("s{i}"));
    }
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let err = stderr_of_failure(&mut generate(&many));
    assert!(err.contains("at most 10"), "{err}");
}

#[test]
fn a_prompt_longer_than_the_context_is_a_clear_error() {
    let err = stderr_of_failure(&mut generate(&["--context-window", "8"]));
    assert!(err.contains("context window is 8"), "{err}");
}

fn copy_fixture(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(fixture().join(f), to.join(f)).unwrap();
    }
}

#[test]
fn truncated_or_corrupt_weights_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    let w = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let mut c = thinkrag();
    c.args(["generate", "hi", "--device", "cpu", "--model"])
        .arg(dir.path());
    let err = stderr_of_failure(&mut c);
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    std::fs::write(&w, b"not a safetensors file at all").unwrap();
    let err = stderr_of_failure(&mut c);
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn unsupported_architecture_and_missing_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    let cfg_path = dir.path().join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["MambaForCausalLM"]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut c = thinkrag();
    c.args(["generate", "hi", "--device", "cpu", "--model"])
        .arg(dir.path());
    let err = stderr_of_failure(&mut c);
    assert!(
        err.contains("MambaForCausalLM") && err.contains("Qwen2ForCausalLM"),
        "{err}"
    );

    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = stderr_of_failure(&mut c);
    assert!(err.contains("tokenizer.json"), "{err}");

    let mut c = thinkrag();
    c.args(["generate", "hi", "--model", "./no/such/dir"]);
    let err = stderr_of_failure(&mut c);
    assert!(err.contains("no such directory"), "{err}");
}

#[test]
fn a_tokenizer_of_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    let cfg_path = dir.path().join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["vocab_size"] = serde_json::json!(64);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut c = thinkrag();
    c.args(["generate", "hi", "--device", "cpu", "--model"])
        .arg(dir.path());
    let err = stderr_of_failure(&mut c);
    assert!(err.contains("does not belong to this model"), "{err}");
}

/// An empty snapshot laid out as hf-hub caches a download of `repo`:
/// models--OWNER--NAME/{refs/main,snapshots/REV}. Returns the snapshot directory.
fn hf_cache_snapshot(home: &Path, repo: &str) -> PathBuf {
    let folder = format!("models--{}", repo.replace('/', "--"));
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let root = home.join("hub").join(folder);
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), rev).unwrap();
    let snapshot = root.join("snapshots").join(rev);
    std::fs::create_dir_all(&snapshot).unwrap();
    snapshot
}

/// `model`, found only in the Hugging Face cache at `home`, generates 3 tokens offline.
fn assert_generates_offline(home: &Path, model: &str) {
    let mut c = thinkrag();
    c.env("HF_HOME", home)
        .args([
            "generate",
            "hi",
            "--device",
            "cpu",
            "--max-tokens",
            "3",
            "--json",
        ])
        .args(["--model", model]);
    let v: Value = serde_json::from_str(&stdout_of(&mut c)).unwrap();
    assert_eq!(v["usage"]["completion_tokens"].as_u64().unwrap(), 3);
}

/// The fixture as a cached download of `repo`.
fn hf_cache_with_fixture(home: &Path, repo: &str) {
    copy_fixture(&hf_cache_snapshot(home, repo));
}

#[test]
fn a_cached_hub_model_loads_offline_and_a_missing_one_says_what_to_download() {
    let home = tempfile::tempdir().unwrap();
    hf_cache_with_fixture(home.path(), "thinkrag-tests/tiny-qwen2");
    assert_generates_offline(home.path(), "thinkrag-tests/tiny-qwen2");

    // The default model is not cached here, and HF_HUB_OFFLINE forbids the network.
    let mut c = thinkrag();
    c.env("HF_HOME", home.path()).args(["generate", "hi"]);
    let err = stderr_of_failure(&mut c);
    assert!(
        err.contains("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
            && err.contains("HF_HUB_OFFLINE")
            && err.contains("thinkrag download"),
        "{err}"
    );
}

#[test]
fn models_lists_the_manifests() {
    let out = stdout_of(thinkrag().arg("models"));
    assert!(out.contains("deepseek-r1-distill-qwen-1.5b"), "{out}");
}

#[test]
fn quantize_writes_a_gguf_that_generate_bench_and_the_hub_cache_load() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny-q8_0.gguf");
    let mut c = thinkrag();
    c.args(["quantize", "--model"])
        .arg(fixture())
        .args(["--to", "q8_0", "--threads", "2", "--out"])
        .arg(&gguf);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("q8_0"));

    // Greedy output of the GGUF equals quantizing at load (same blocks, same kernels).
    let greedy = ["--temperature", "0", "--json"];
    let from_file: Value =
        serde_json::from_str(&stdout_of(generate(&greedy).arg("--model").arg(&gguf))).unwrap();
    let at_load: Value =
        serde_json::from_str(&stdout_of(generate(&greedy).args(["--quantize", "q8_0"]))).unwrap();
    assert_eq!(from_file["reasoning"], at_load["reasoning"]);
    assert_eq!(from_file["usage"], at_load["usage"]);

    let mut c = thinkrag();
    c.args(["bench", "--model"]).arg(&gguf).args([
        "--device",
        "cpu",
        "--threads",
        "2",
        "-p",
        "16",
        "-n",
        "4",
        "--positions",
        "8",
        "-r",
        "1",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&stdout_of(&mut c)).unwrap();
    assert_eq!(v["weights"], "q8_0");
    assert_eq!(v["dtype"], "f32");
    let tests: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["test"].as_str().unwrap())
        .collect();
    assert_eq!(tests, ["pp16", "tg4@8"]);
    // The KV cache as llama.cpp's 8-bit blocks, and generation over it.
    c.args(["--kv-cache", "q8_0"]);
    let v: Value = serde_json::from_str(&stdout_of(&mut c)).unwrap();
    assert_eq!(v["kv_cache"], "q8_0");
    let q8: Value = serde_json::from_str(&stdout_of(
        generate(&greedy)
            .arg("--model")
            .arg(&gguf)
            .args(["--kv-cache", "q8_0"]),
    ))
    .unwrap();
    assert!(
        q8["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{q8}"
    );

    // One GGUF file of a hub repo, from the Hugging Face cache, with nothing beside it.
    let home = tempfile::tempdir().unwrap();
    let snapshot = hf_cache_snapshot(home.path(), "thinkrag-tests/tiny-GGUF");
    std::fs::copy(&gguf, snapshot.join("tiny-q8_0.gguf")).unwrap();
    assert_generates_offline(home.path(), "thinkrag-tests/tiny-GGUF/tiny-q8_0.gguf");
}

#[test]
fn bad_quantization_requests_are_clear_errors() {
    let err = stderr_of_failure(&mut generate(&["--quantize", "q7"]));
    assert!(err.contains("q7") && err.contains("q4k"), "{err}");
    let err = stderr_of_failure(&mut generate(&["--quantize", "q8_0", "--dtype", "bf16"]));
    assert!(err.contains("f32"), "{err}");
    let err = stderr_of_failure(&mut generate(&["--kv-cache", "q4_0"]));
    assert!(err.contains("q4_0") && err.contains("q8_0"), "{err}");
    let mut c = thinkrag();
    c.args(["quantize", "--model"]).arg(fixture()).args([
        "--to",
        "q4k",
        "--out",
        "/nonexistent-dir/x.gguf",
    ]);
    let err = stderr_of_failure(&mut c);
    assert!(err.contains("/nonexistent-dir/x.gguf"), "{err}");
}
