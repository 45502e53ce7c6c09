//! End-to-end tests of `thinkrag serve` on loopback, with the committed tiny model and the real
//! MiniLM embedder: the real `openai` and `boto3` clients (installed from PyPI into .work/venv by
//! scripts/setup-test-clients.sh), and raw HTTP for every kind of bad input, concurrency,
//! disconnects, a full queue, authentication and shutdown.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::{root, Server};

fn run_script(script: &str) {
    let status = Command::new("bash")
        .arg(root().join(script))
        .status()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(status.success(), "{script} failed");
}

/// The Python with the real clients, installed once.
fn client_python() -> PathBuf {
    static ONCE: OnceLock<PathBuf> = OnceLock::new();
    ONCE.get_or_init(|| {
        run_script("scripts/setup-test-clients.sh");
        root().join(".work/venv/bin/python")
    })
    .clone()
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, _, text) = get(&self.url("/metrics"));
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("thinkrag_{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} in {text}"))
    }

    fn wait_metric(&self, name: &str, want: f64) {
        let start = Instant::now();
        while self.metric(name) != want {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{name} never became {want}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and returns the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        sigterm(self.child.id());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the server did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn sigterm(pid: u32) {
    // SAFETY: kill(2) with a child's pid and a valid signal number has no memory effects.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill -TERM {pid}");
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

/// (status, headers as "name: value" lines lowercased names, body).
fn response(r: Result<ureq::Response, ureq::Error>) -> (u16, Vec<(String, String)>, String) {
    let r = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = r.status();
    let headers = r
        .headers_names()
        .into_iter()
        .map(|n| {
            (
                n.to_ascii_lowercase(),
                r.header(&n).unwrap_or("").to_string(),
            )
        })
        .collect();
    (status, headers, r.into_string().unwrap())
}

fn get(url: &str) -> (u16, Vec<(String, String)>, String) {
    response(agent().get(url).call())
}

fn post(url: &str, body: &str) -> (u16, Vec<(String, String)>, String) {
    response(
        agent()
            .post(url)
            .set("Content-Type", "application/json")
            .send_string(body),
    )
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn run_client(script: &str, args: &[&str]) {
    let out = Command::new(client_python())
        .arg(root().join("tests/clients").join(script))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script}:\n{stdout}\n{stderr}");
    assert!(stdout.contains("checks passed"), "{stdout}");
    println!("{stdout}");
}

#[test]
fn the_openai_client_works_unmodified() {
    let server = Server::start(&["--prefix-cache-mib", "0"]);
    run_client("openai_client.py", &[&server.base]);
}

#[test]
fn the_boto3_bedrock_runtime_client_works_unmodified() {
    let server = Server::start(&["--prefix-cache-mib", "0", "--shutdown-grace", "0"]);
    let pid = server.pid().to_string();
    run_client("bedrock_client.py", &[&server.base, &pid]);
    // The client's last check sent SIGTERM mid-stream: the server exits cleanly.
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
}

/// A chat request body with a seed.
fn chat(question: &str, seed: u64, max_tokens: usize) -> String {
    json!({"model": "m", "messages": [{"role": "user", "content": question}],
           "seed": seed, "temperature": 0.8, "max_tokens": max_tokens})
    .to_string()
}

#[test]
fn parallel_requests_get_the_tokens_a_solo_request_gets() {
    let server = Server::start(&["--prefix-cache-mib", "0", "--max-sequences", "4"]);
    let questions = [
        "How many people live in Seattle?",
        "What is the population of Austin?",
        "Compare Miami with New York City.",
        "Which city grew fastest?",
    ];
    let url = server.url("/v1/chat/completions");
    let solo: Vec<Value> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| json_of(&post(&url, &chat(q, i as u64, 40)).2))
        .collect();
    let parallel: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = questions
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let url = url.clone();
                s.spawn(move || json_of(&post(&url, &chat(q, i as u64, 40)).2))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, b) in solo.iter().zip(&parallel) {
        assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
        assert_eq!(a["usage"], b["usage"]);
    }
    let mean_batch = server.metric("decode_batch_size_mean");
    assert!(mean_batch > 1.0, "decode steps were batched: {mean_batch}");
}

#[test]
fn a_client_that_disconnects_frees_its_slot_and_a_full_queue_answers_429() {
    let server = Server::start(&["--max-sequences", "1", "--max-queue", "1"]);
    let endless = |stream: bool| {
        json!({"model": "m", "messages": [{"role": "user", "content": "Tell me about Chicago."}],
               "max_tokens": 4000, "ignore_eos": true, "stream": stream})
        .to_string()
    };
    // A streaming client reads a little, then goes away.
    let r = agent()
        .post(&server.url("/v1/chat/completions"))
        .send_string(&endless(true))
        .unwrap();
    let mut reader = r.into_reader();
    let mut buf = [0u8; 256];
    reader.read_exact(&mut buf).unwrap();
    server.wait_metric("requests_running", 1.0);
    // One slot busy: one request may wait, the next is refused with 429 in both shapes.
    let waiting = {
        let url = server.url("/v1/chat/completions");
        let body = chat("Hi", 1, 4);
        std::thread::spawn(move || post(&url, &body))
    };
    server.wait_metric("requests_waiting", 1.0);
    let (status, headers, body) = post(&server.url("/v1/chat/completions"), &endless(false));
    assert_eq!(status, 429, "{body}");
    assert_eq!(json_of(&body)["error"]["type"], "rate_limit_error");
    assert_eq!(header(&headers, "x-should-retry"), Some("true"));
    let (status, headers, _) = post(
        &server.url("/model/m/invoke"),
        &json!({"prompt": "Hi", "max_tokens": 4}).to_string(),
    );
    assert_eq!(status, 429);
    assert!(header(&headers, "x-amzn-errortype")
        .unwrap()
        .starts_with("ThrottlingException"));
    drop(reader);
    // The abandoned sequence is cancelled within a step; the waiting request then runs.
    server.wait_metric("requests_cancelled_total", 1.0);
    let (status, _, body) = waiting.join().unwrap();
    assert_eq!(status, 200, "{body}");
    server.wait_metric("requests_running", 0.0);
    assert_eq!(server.metric("kv_cache_bytes"), 0.0);
    assert!(server.metric("generated_tokens_total") < 4000.0);
    // A non-streaming client that gives up is cancelled too.
    let r = ureq::AgentBuilder::new()
        .timeout(Duration::from_millis(300))
        .build()
        .post(&server.url("/v1/chat/completions"))
        .send_string(&endless(false));
    assert!(r.is_err(), "it times out");
    server.wait_metric("requests_cancelled_total", 2.0);
}

#[test]
fn bad_input_gets_a_clear_4xx_and_never_disturbs_the_server() {
    let server = Server::start(&["--max-body-bytes", "20000"]);
    let chat_url = server.url("/v1/chat/completions");
    let invoke_url = server.url("/model/us.deepseek.r1-v1%3A0/invoke");
    let openai_error = |body: &str, status: u16, want: &str| {
        let (s, _, text) = post(&chat_url, body);
        assert_eq!(s, status, "{body} -> {text}");
        let v = json_of(&text);
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(want), "{body}: {message:?} lacks {want:?}");
        v
    };
    openai_error("{not json", 400, "not valid JSON");
    openai_error("[1,2]", 400, "must be a JSON object");
    openai_error("", 400, "empty");
    openai_error(r#"{"model":"m"}"#, 400, "messages");
    openai_error(r#"{"model":"m","messages":"hi"}"#, 400, "expected an array");
    openai_error(r#"{"model":"m","messages":[]}"#, 400, "at least one");
    openai_error(
        r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
        400,
        "wizard",
    );
    openai_error(
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#,
        400,
        "text only",
    );
    let v = openai_error(
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_p":"high"}"#,
        400,
        "expected a number",
    );
    assert_eq!(v["error"]["param"], "top_p");
    openai_error(
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
        400,
        "1..=32768",
    );
    openai_error(
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":1.5}"#,
        400,
        "integer",
    );
    openai_error(
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e","f","g","h","i","j","k"]}"#,
        400,
        "at most 10",
    );
    openai_error(
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"reasoning_effort":"extreme"}"#,
        400,
        "none, minimal",
    );
    let long =
        json!({"model": "m", "messages": [{"role": "user", "content": "word ".repeat(3900)}]});
    let v = openai_error(&long.to_string(), 400, "context window is 4096");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let huge = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(30000)}]});
    let (s, _, text) = post(&chat_url, &huge.to_string());
    assert_eq!(s, 413, "{text}");
    assert!(json_of(&text)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-body-bytes"));
    // Bedrock's shape: the exception name in x-amzn-ErrorType, the message naming the field.
    let bedrock_error = |url: &str, body: &str, status: u16, ty: &str, want: &str| {
        let (s, headers, text) = post(url, body);
        assert_eq!(s, status, "{body} -> {text}");
        let et = header(&headers, "x-amzn-errortype").unwrap();
        assert!(et.starts_with(ty), "{et}");
        assert!(header(&headers, "x-amzn-requestid").is_some());
        let message = json_of(&text)["message"].as_str().unwrap().to_string();
        assert!(message.contains(want), "{message:?} lacks {want:?}");
    };
    bedrock_error(
        &invoke_url,
        "{",
        400,
        "ValidationException",
        "not valid JSON",
    );
    bedrock_error(
        &invoke_url,
        r#"{"max_tokens":5}"#,
        400,
        "ValidationException",
        "prompt",
    );
    bedrock_error(
        &invoke_url,
        r#"{"prompt":"x","top_p":1.5}"#,
        400,
        "ValidationException",
        "#/top_p: 1.5 is not in the range 0..=1",
    );
    bedrock_error(
        &invoke_url,
        r#"{"prompt":"x","max_tokens":40000}"#,
        400,
        "ValidationException",
        "1..=32768",
    );
    bedrock_error(
        &server.url("/model/m/converse"),
        r#"{"messages":[{"role":"user","content":[{"image":{}}]}]}"#,
        400,
        "ValidationException",
        "text only",
    );
    bedrock_error(
        &server.url("/model/m/converse"),
        &json!({"messages": [{"role": "user", "content": [{"text": "word ".repeat(3900)}]}]})
            .to_string(),
        400,
        "ValidationException",
        "context window",
    );
    // Unknown routes: 404 in the API's shape.
    let (s, _, text) = get(&server.url("/v1/nothing"));
    assert_eq!(s, 404);
    assert_eq!(json_of(&text)["error"]["type"], "not_found_error");
    let (s, headers, _) = post(&server.url("/model/m/invoke-sideways"), "{}");
    assert_eq!(s, 404);
    assert!(header(&headers, "x-amzn-errortype")
        .unwrap()
        .starts_with("ResourceNotFoundException"));
    // A raw socket sending garbage does not hurt anyone.
    {
        use std::io::Write;
        let addr = server.base.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
        let _ = s.read(&mut [0u8; 64]);
    }
    // After all that the server still answers, and counted the 4xx.
    let (s, _, text) = post(&chat_url, &chat("Hi", 1, 4));
    assert_eq!(s, 200, "{text}");
    let (_, _, metrics) = get(&server.url("/metrics"));
    assert!(
        metrics.contains("thinkrag_http_requests_total{route=\"chat_completions\",status=\"400\"}"),
        "{metrics}"
    );
}

#[test]
fn an_api_key_guards_every_route_but_health() {
    let server = Server::start(&["--api-key", "s3cret"]);
    let body = chat("Hi", 1, 2);
    let (s, headers, text) = post(&server.url("/v1/chat/completions"), &body);
    assert_eq!(s, 401, "{text}");
    assert_eq!(json_of(&text)["error"]["type"], "authentication_error");
    assert_eq!(header(&headers, "x-should-retry"), Some("false"));
    let with = |name: &str, value: &str| {
        response(
            agent()
                .post(&server.url("/v1/chat/completions"))
                .set(name, value)
                .send_string(&body),
        )
        .0
    };
    assert_eq!(with("Authorization", "Bearer s3cret"), 200);
    assert_eq!(with("x-api-key", "s3cret"), 200);
    assert_eq!(with("Authorization", "Bearer wrong"), 401);
    // Bedrock: the key as the AWS access key id of a SigV4 signature; else AccessDenied (403).
    let invoke = |auth: &str| {
        response(
            agent()
                .post(&server.url("/model/m/invoke"))
                .set("Authorization", auth)
                .send_string(&json!({"prompt": "Hi", "max_tokens": 2}).to_string()),
        )
    };
    let sig = |akid: &str| {
        format!(
            "AWS4-HMAC-SHA256 Credential={akid}/20261129/us-east-1/bedrock/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature=00"
        )
    };
    assert_eq!(invoke(&sig("s3cret")).0, 200);
    let (s, headers, _) = invoke(&sig("AKIDEXAMPLE"));
    assert_eq!(s, 403);
    assert!(header(&headers, "x-amzn-errortype")
        .unwrap()
        .starts_with("AccessDeniedException"));
    assert_eq!(get(&server.url("/health")).0, 200);
    assert_eq!(get(&server.url("/metrics")).0, 401);
    // OpenSearch clients send the key as the basic-auth password.
    let (s, _, body) = get(&server.url("/_cat/indices?format=json"));
    assert_eq!(s, 401);
    assert_eq!(
        json_of(&body)["error"]["type"],
        "security_exception",
        "{body}"
    );
    let cat = |auth: &str| {
        response(
            agent()
                .get(&server.url("/_cat/indices?format=json"))
                .set("Authorization", auth)
                .call(),
        )
        .0
    };
    assert_eq!(cat("Basic YWRtaW46czNjcmV0"), 200, "admin:s3cret");
    assert_eq!(cat("Basic YWRtaW46d3Jvbmc="), 401, "admin:wrong");
}

#[test]
fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let server = Server::start(&["--shutdown-grace", "30"]);
    let url = server.url("/v1/chat/completions");
    let in_flight = std::thread::spawn(move || post(&url, &chat("Tell me about Chicago.", 3, 300)));
    server.wait_metric("requests_running", 1.0);
    let base = server.base.clone();
    let status = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    let (s, _, text) = in_flight.join().unwrap();
    assert_eq!(s, 200, "the in-flight request finished: {text}");
    assert!(
        json_of(&text)["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    // Nothing listens any more.
    assert!(agent().get(&format!("{base}/health")).call().is_err());
}

#[test]
fn serve_refuses_a_taken_port_and_a_bad_model_clearly() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_thinkrag"))
        .args(["serve", "--device", "cpu", "--port", &port, "--model"])
        .arg(root().join("tests/fixtures/tiny-qwen2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot listen") && err.contains("--port"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_thinkrag"))
        .args(["serve", "--device", "cpu", "--port", "0", "--model"])
        .arg(Path::new("/nonexistent/model"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/model") && !err.contains("panicked"),
        "{err}"
    );
}

fn put(url: &str, body: &str) -> (u16, Vec<(String, String)>, String) {
    response(
        agent()
            .put(url)
            .set("Content-Type", "application/json")
            .send_string(body),
    )
}

fn tutorial(file: &str) -> String {
    std::fs::read_to_string(root().join("tests/fixtures/opensearch-tutorial").join(file)).unwrap()
}

#[test]
fn opensearch_py_sends_the_seed_tutorial_and_every_route_works() {
    let server = Server::start(&["--prefix-cache-mib", "0"]);
    run_client("opensearch_client.py", &[&server.base]);
}

#[test]
fn the_langchain_example_runs_against_the_server() {
    let server = Server::start(&[]);
    let out = Command::new(client_python())
        .arg(root().join("examples/langchain_rag.py"))
        .args(["--base-url", &server.url("/v1"), "--max-tokens", "32"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("Retrieved 3 of 4 chunks"), "{stdout}");
    // MiniLM through /v1/embeddings ranks the chunk about intestinal pH first.
    let first = stdout.lines().nth(1).unwrap_or_default();
    assert!(first.contains("dietary fibre"), "{stdout}");
    assert!(stdout.contains("\nAnswer:"), "{stdout}");
    // Both the embeddings and the chat went through this server.
    assert!(server.metric("http_requests_total{route=\"embeddings\",status=\"200\"}") >= 2.0);
    assert!(server.metric("http_requests_total{route=\"chat_completions\",status=\"200\"}") >= 1.0);
}

/// The ids of a search's hits.
fn hit_ids(body: &str) -> Vec<String> {
    json_of(body)["hits"]["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn acknowledged_writes_survive_a_kill_and_everything_survives_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let d = data.path().to_str().unwrap();
    let question = r#"{"query":{"neural":{"passage_embedding":{"query_text":"What's the population increase of New York City from 2021 to 2023? How is the trending comparing with Miami?","k":2}}}}"#;

    let server = Server::start(&["--data-dir", d]);
    let pipeline = "/_search/pipeline/my-conversation-search-pipeline-deepseek";
    assert_eq!(
        put(
            &server.url(pipeline),
            &tutorial("step-5.1-search-pipeline.json")
        )
        .0,
        200
    );
    let (status, _, body) = post(&server.url("/_bulk"), &tutorial("step-5.2-bulk.ndjson"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body)["errors"], false, "{body}");
    let (_, _, body) = post(&server.url("/_plugins/_ml/memory"), r#"{"name":"m"}"#);
    let memory = json_of(&body)["memory_id"].as_str().unwrap().to_string();
    let (status, _, _) = post(
        &server.url(&format!("/_plugins/_ml/memory/{memory}/messages")),
        r#"{"input":"q","response":"a","origin":"test"}"#,
    );
    assert_eq!(status, 200);
    let before = hit_ids(&post(&server.url("/my-nlp-index/_search"), question).2);
    assert_eq!(before, ["4", "2"]);
    // SIGKILL: no shutdown, no checkpoint; the bulk lives only in the write-ahead log.
    drop(server);
    let wal = data.path().join("indices/my-nlp-index/wal.jsonl");
    assert!(
        std::fs::metadata(&wal).unwrap().len() > 0,
        "the log holds the bulk"
    );

    let server = Server::start(&["--data-dir", d]);
    let (_, _, cat) = get(&server.url("/_cat/indices?format=json"));
    assert_eq!(json_of(&cat)[0]["docs.count"], "6", "{cat}");
    let (status, _, doc) = get(&server.url("/my-nlp-index/_doc/4"));
    assert_eq!(status, 200);
    assert!(json_of(&doc)["_source"]["text"]
        .as_str()
        .unwrap()
        .contains("Miami"));
    assert_eq!(
        hit_ids(&post(&server.url("/my-nlp-index/_search"), question).2),
        before
    );
    assert_eq!(get(&server.url(pipeline)).0, 200, "the pipeline survived");
    let (_, _, msgs) = get(&server.url(&format!("/_plugins/_ml/memory/{memory}/messages")));
    assert_eq!(json_of(&msgs)["messages"][0]["response"], "a", "{msgs}");
    // Replayed into a generation on open: the log starts empty.
    assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);

    // A delete, then a clean stop: the shutdown checkpoint leaves nothing to replay.
    let (status, _, body) = post(
        &server.url("/my-nlp-index/_bulk?refresh=true"),
        "{\"delete\":{\"_id\":\"1\"}}\n",
    );
    assert_eq!(status, 200, "{body}");
    assert!(std::fs::metadata(&wal).unwrap().len() > 0);
    assert!(server.terminate().success());
    assert_eq!(
        std::fs::metadata(&wal).unwrap().len(),
        0,
        "checkpointed at shutdown"
    );
    let server = Server::start(&["--data-dir", d]);
    let (_, _, count) = get(&server.url("/my-nlp-index/_count"));
    assert_eq!(json_of(&count)["count"], 5, "{count}");
    assert_eq!(get(&server.url("/my-nlp-index/_doc/1")).0, 404);
}

#[test]
fn opensearch_routes_answer_bad_requests_in_opensearch_shape() {
    let server = Server::start(&[]);
    let shape = |status: u16, body: &str, want: u16, ty: &str| {
        assert_eq!(status, want, "{body}");
        let v = json_of(body);
        assert_eq!(v["status"], want, "{body}");
        assert_eq!(v["error"]["type"], ty, "{body}");
        assert_eq!(v["error"]["root_cause"][0]["type"], ty, "{body}");
    };
    let (s, _, b) = post(&server.url("/x/_search"), "{not json");
    shape(s, &b, 404, "index_not_found_exception");
    assert_eq!(put(&server.url("/x"), "").0, 200);
    let (s, _, b) = post(&server.url("/x/_search"), "{not json");
    shape(s, &b, 400, "parse_exception");
    let (s, _, b) = post(
        &server.url("/x/_search"),
        r#"{"query":{"neural":{"f":{"query_text":"q","k":10001}}}}"#,
    );
    shape(s, &b, 400, "illegal_argument_exception");
    let (s, _, b) = post(&server.url("/x/_search"), r#"{"size":-1}"#);
    shape(s, &b, 400, "illegal_argument_exception");
    let (s, _, b) = post(&server.url("/x/_search"), r#"{"frm":1}"#);
    shape(s, &b, 400, "parse_exception");
    let (s, _, b) = post(&server.url("/_bulk"), "");
    shape(s, &b, 400, "action_request_validation_exception");
    let (s, _, b) = post(
        &server.url("/_bulk"),
        "{\"index\":{\"_id\":\"1\"}}\n{\"a\":\"b\"}\n",
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        json_of(&b)["items"][0]["index"]["status"],
        400,
        "no index named: {b}"
    );
    let (s, _, b) = get(&server.url("/_nothing_here"));
    shape(s, &b, 400, "illegal_argument_exception");
    let (s, _, b) = put(&server.url("/UPPER"), "{}");
    shape(s, &b, 400, "invalid_index_name_exception");
    let (s, _, b) = put(
        &server.url("/y"),
        r#"{"mappings":{"properties":{"v":{"type":"knn_vector","dimension":768}}}}"#,
    );
    shape(s, &b, 400, "mapper_parsing_exception");
    assert!(b.contains("768") && b.contains("384"), "{b}");
    // The other APIs keep their own shapes beside these routes.
    let (s, _, b) = get(&server.url("/v1/nothing"));
    assert_eq!(s, 404);
    assert!(json_of(&b)["error"]["message"].is_string(), "{b}");
    assert_eq!(get(&server.url("/health")).0, 200);
}
