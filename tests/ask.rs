//! End-to-end tests of `thinkrag ask` and `thinkrag chat` on the committed tiny random-weight
//! Qwen2 and the real all-MiniLM-L6-v2 over the sample corpus: the JSON and JSON-lines shapes,
//! the prompt holding the retrieved chunks in rank order, budgets said out loud, clear errors
//! without an index, with an empty one or another embedder, and a three-turn chat from a script
//! on stdin that reuses the KV cache.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use assert_cmd::Command;
use serde_json::Value;
use thinkrag::embed::test_models::minilm_dir;

const QUESTION: &str = "What's the population increase of New York City from 2021 to 2023? \
How is the trending comparing with Miami?";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `thinkrag SUB...` offline, with the test embedder and the tiny model.
fn thinkrag(args: &[&str]) -> Command {
    let mut c = Command::cargo_bin("thinkrag").unwrap();
    c.env_remove("THINKRAG_INDEX")
        .env_remove("HF_TOKEN")
        .env("HF_HUB_OFFLINE", "1")
        .env("THINKRAG_EMBEDDER", minilm_dir())
        .env("THINKRAG_MODEL", root().join("tests/fixtures/tiny-qwen2"))
        .env("RAYON_NUM_THREADS", "2")
        .args(args);
    c
}

/// Generation flags that keep the tiny model short and deterministic.
const GEN: &[&str] = &[
    "--device",
    "cpu",
    "--dtype",
    "f32",
    "--threads",
    "2",
    "--temperature",
    "0",
    "--max-tokens",
    "16",
    "--max-thinking-tokens",
    "6",
];

/// The sample corpus indexed once for all tests (they only read it).
fn index() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = thinkrag(&["ingest", "--device", "cpu", "--index"])
            .arg(dir.path())
            .arg(root().join("samples/population"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .path()
}

fn ask(extra: &[&str]) -> std::process::Output {
    thinkrag(&["ask", QUESTION, "--index"])
        .arg(index())
        .args(GEN)
        .args(extra)
        .output()
        .unwrap()
}

fn ok_stdout(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}: {stderr}",
        out.status.code()
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn failure(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "fails: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn ask_json_has_the_hits_the_generation_and_its_accounting() {
    let v: Value = serde_json::from_str(&ok_stdout(&ask(&["--json"]))).unwrap();
    let hits = v["hits"]["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 4);
    for h in hits {
        assert!(h["_id"].is_string() && h["_score"].is_f64());
        assert!(h["_source"]["text"].as_str().unwrap().len() > 20);
        assert!(h["_source"]["source"].as_str().unwrap().ends_with(".txt"));
    }
    let top2: Vec<&str> = hits[..2]
        .iter()
        .map(|h| h["_source"]["source"].as_str().unwrap())
        .collect();
    assert!(
        top2.iter().any(|s| s.ends_with("miami.txt"))
            && top2.iter().any(|s| s.ends_with("new-york-city.txt")),
        "{top2:?}"
    );
    let sources = v["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 4);
    for (i, s) in sources.iter().enumerate() {
        assert_eq!(s["number"], i + 1);
        assert_eq!(s["_id"], hits[i]["_id"]);
        assert!(s["cited"].is_boolean());
    }
    assert!(!v["reasoning"].as_str().unwrap().is_empty());
    assert!(v["answer"].is_string());
    assert!(v["citations"].is_array());
    assert!(["eos", "length", "stop"].contains(&v["stop_reason"].as_str().unwrap()));
    let usage = &v["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 200);
    assert!(usage["completion_tokens"].as_u64().unwrap() <= 16);
    let t = &v["timings"];
    for key in [
        "retrieval_ms",
        "prefill_ms",
        "time_to_first_token_ms",
        "total_ms",
    ] {
        assert!(t[key].as_f64().unwrap() > 0.0, "{key}: {t}");
    }
}

#[test]
fn ask_jsonl_streams_events_and_shows_the_prompt_in_rank_order() {
    let out = ok_stdout(&ask(&["--jsonl", "--show-prompt"]));
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(&types[..2], ["retrieved", "prompt"]);
    assert_eq!(types.last(), Some(&"done"));
    assert!(types.contains(&"reasoning"));
    let first_answer = types.iter().position(|t| *t == "answer");
    let last_reasoning = types.iter().rposition(|t| *t == "reasoning");
    if let (Some(a), Some(r)) = (first_answer, last_reasoning) {
        assert!(r < a, "reasoning streams before the answer");
    }
    let prompt = events[1]["prompt"].as_str().unwrap();
    assert!(
        prompt.starts_with("<｜begin▁of▁sentence｜><｜User｜>"),
        "{prompt}"
    );
    assert!(prompt.ends_with("<｜Assistant｜><think>\n"), "{prompt}");
    let mut last = 0;
    for h in events[0]["hits"]["hits"].as_array().unwrap() {
        let text = h["_source"]["text"].as_str().unwrap().trim();
        let at = prompt.find(text).expect("each hit is in the prompt");
        assert!(at > last, "in rank order");
        last = at;
    }
    assert!(prompt.contains(&format!("Question: {QUESTION}")));
    let done = events.last().unwrap();
    let streamed: String = events
        .iter()
        .filter(|e| e["type"] == "reasoning")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(done["reasoning"].as_str().unwrap(), streamed);
}

#[test]
fn plain_output_ends_with_the_sources_and_says_what_was_left_out() {
    let out = ask(&["--max-context-tokens", "300"]);
    let stdout = ok_stdout(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.starts_with("## Reasoning"), "{stdout}");
    assert!(stdout.contains("\nSources:\n  [1] "), "{stdout}");
    assert!(stdout.contains("(left out: hit 4 "), "{stdout}");
    assert!(
        stderr.contains("[left out of the prompt: hit 4 ")
            && stderr.contains("did not fit the context budget of 300 tokens"),
        "{stderr}"
    );
}

#[test]
fn user_templates_and_no_retrieval() {
    let tmpl = "Context:\n{context}\n\nQ: {question}";
    let out = ok_stdout(&ask(&["--jsonl", "--show-prompt", "--template", tmpl]));
    let prompt: Value = serde_json::from_str(out.lines().nth(1).unwrap()).unwrap();
    let text = prompt["prompt"].as_str().unwrap();
    assert!(text.contains("<｜User｜>Context:\n[1] "), "{text}");
    assert!(
        text.contains(&format!("\n\nQ: {QUESTION}<｜Assistant｜>")),
        "{text}"
    );

    let err = failure(&ask(&["--template", "no placeholders"]));
    assert!(err.contains("{context}"), "{err}");

    // No index needed without retrieval.
    let out = thinkrag(&["ask", "What is 2+2?", "--no-retrieval", "--json", "--index"])
        .arg(root().join("no-such-index"))
        .args(GEN)
        .output()
        .unwrap();
    let v: Value = serde_json::from_str(&ok_stdout(&out)).unwrap();
    assert_eq!(v["sources"].as_array().unwrap().len(), 0);
    assert_eq!(v["hits"]["hits"].as_array().unwrap().len(), 0);
}

#[test]
fn clear_errors_say_what_to_run() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("none");
    let err = failure(
        &thinkrag(&["ask", "Why?", "--index"])
            .arg(&missing)
            .args(GEN)
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("no index at") && err.contains("thinkrag ingest"),
        "{err}"
    );

    let empty_docs = tmp.path().join("docs");
    std::fs::create_dir(&empty_docs).unwrap();
    let empty = tmp.path().join("empty");
    thinkrag(&["ingest", "--device", "cpu", "--index"])
        .arg(&empty)
        .arg(&empty_docs)
        .output()
        .unwrap();
    let err = failure(
        &thinkrag(&["ask", "Why?", "--index"])
            .arg(&empty)
            .args(GEN)
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("empty") && err.contains("thinkrag ingest"),
        "{err}"
    );

    let err = failure(&ask(&["--pooling", "cls"]));
    assert!(
        err.contains("built with embedder") && err.contains("--embedder"),
        "{err}"
    );

    let err = failure(&ask(&["--context-window", "64"]));
    assert!(err.contains("shorten the question"), "{err}");
}

#[test]
fn chat_from_a_script_reuses_the_cache_and_keeps_its_session() {
    let script = format!(
        "{QUESTION}\n/sources\nAnd how did Chicago change?\n/thinking\n/bogus\nWhich city grew fastest?\n/quit\n"
    );
    let out = thinkrag(&["chat", "--max-context-tokens", "600", "--index"])
        .arg(index())
        .args(GEN)
        .write_stdin(script)
        .output()
        .unwrap();
    let stdout = ok_stdout(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/help for commands"), "{stderr}");
    assert!(stderr.contains("[reasoning hidden]"), "{stderr}");
    assert!(stderr.contains("[unknown command /bogus"), "{stderr}");
    // Three answers with their sources, and the sources once more on request.
    assert_eq!(stdout.matches("\nSources:\n").count(), 4, "{stdout}");
    assert_eq!(
        stdout.matches("## Reasoning").count(),
        2,
        "hidden for the third turn"
    );

    let turns: Vec<(u64, u64, u64)> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("[turn "))
        .map(|l| {
            let n: Vec<u64> = l
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .take(4)
                .map(|s| s.parse().unwrap())
                .collect();
            (n[1], n[2], n[3])
        })
        .collect();
    assert_eq!(turns.len(), 3, "{stderr}");
    assert_eq!(turns[0].1, 0, "nothing cached on the first turn");
    for i in 1..3 {
        let (prompt, cached, computed) = turns[i];
        // Checked against the previous turn's own figures, not against the sum the CLI prints:
        // this turn computes only its new part, and reuses at least the previous prompt.
        assert!(
            computed > 0 && computed < (prompt + 3).saturating_sub(turns[i - 1].0),
            "{turns:?}"
        );
        assert!(
            cached + 3 >= turns[i - 1].0,
            "turn {} reuses the previous prompt: {turns:?}",
            i + 1
        );
    }
}
