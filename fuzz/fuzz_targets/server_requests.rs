//! The server's request parsers, driven through the real router in process: OpenAI and Bedrock
//! JSON bodies, OpenSearch NDJSON `_bulk`, searches, pipelines and memory, with the tiny fixture
//! model and the MiniLM embedder. The first input byte picks the route, the rest is the body.
//! A panic anywhere, or a 500 (the server's own fault, never the client's), is a finding.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use thinkrag_embed::{Embedder, EmbedderOptions, EmbedderSource};
use thinkrag_llm::{DTypeChoice, Engine, LoadOptions, ModelFiles, SchedulerConfig};
use thinkrag_server::{router, AppState, ServerOptions};
use tower::ServiceExt;

const ROUTES: &[(Method, &str)] = &[
    (Method::POST, "/v1/chat/completions"),
    (Method::POST, "/v1/completions"),
    (Method::POST, "/v1/embeddings"),
    (Method::POST, "/model/thinkrag/invoke"),
    (Method::POST, "/model/thinkrag/invoke-with-response-stream"),
    (Method::POST, "/model/thinkrag/converse"),
    (Method::POST, "/model/thinkrag/converse-stream"),
    (Method::POST, "/_bulk"),
    (Method::POST, "/fuzz-idx/_bulk"),
    (Method::POST, "/fuzz-idx/_search"),
    (Method::POST, "/fuzz-idx/_search?search_pipeline=rag"),
    (Method::POST, "/fuzz-idx/_count"),
    (Method::PUT, "/fuzz-new"),
    (Method::PUT, "/fuzz-idx/_doc/7"),
    (Method::POST, "/fuzz-idx/_update/1"),
    (Method::PUT, "/_search/pipeline/p2"),
    (Method::POST, "/_plugins/_ml/memory"),
    (Method::POST, "/_plugins/_ml/memory/_search"),
    (Method::GET, "/fuzz-idx/_doc/1"),
    (Method::DELETE, "/fuzz-new"),
];

struct Fixture {
    runtime: tokio::runtime::Runtime,
    app: Router,
    _data: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let files = ModelFiles::from_dir(&root.join("tests/fixtures/tiny-qwen2")).unwrap();
        let opts = LoadOptions {
            dtype: DTypeChoice::F32,
            // A small window bounds what one request can generate, so runs stay fast.
            context_window: Some(384),
            ..LoadOptions::default()
        };
        let engine = Arc::new(Engine::from_files(files, "tiny".into(), None, &opts, &mut |_| {}).unwrap());
        let minilm = std::env::var("THINKRAG_TEST_MINILM")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join(".work/models/all-minilm-l6-v2"));
        let source = EmbedderSource::parse(minilm.to_str().unwrap()).unwrap();
        let embedder = Arc::new(Embedder::load(&source, &EmbedderOptions::default()).unwrap());
        let data = tempfile::tempdir().unwrap();
        let mut state = AppState::new(
            engine,
            Some(("minilm".into(), Arc::clone(&embedder))),
            SchedulerConfig::default(),
            ServerOptions::default(),
        )
        .unwrap();
        state.opensearch = Some(Arc::new(
            thinkrag_server::opensearch::OpenSearch::open(data.path(), embedder).unwrap(),
        ));
        let app = router(Arc::new(state));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let tutorial = root.join("tests/fixtures/opensearch-tutorial");
        let setup = [
            (Method::PUT, "/_search/pipeline/rag", std::fs::read(tutorial.join("step-5.1-search-pipeline.json")).unwrap()),
            (Method::POST, "/_bulk?refresh=true", std::fs::read(tutorial.join("step-5.2-bulk.ndjson")).unwrap()),
        ];
        for (method, path, body) in setup {
            let (status, text) = runtime.block_on(call(&app, method, path, body));
            assert!(status.is_success(), "{path}: {status} {text}");
        }
        // The tutorial's index is my-nlp-index; the routes above use fuzz-idx, so make it too.
        let body = br#"{"index":{"_index":"fuzz-idx","_id":"1"}}
{"text":"Chicago's population fell slightly in 2023."}
{"index":{"_index":"fuzz-idx","_id":"2"}}
{"text":"Miami grew quickly."}
"#;
        let (status, text) = runtime.block_on(call(&app, Method::POST, "/_bulk?refresh=true", body.to_vec()));
        assert!(status.is_success(), "{status} {text}");
        Fixture { runtime, app, _data: data }
    })
}

async fn call(app: &Router, method: Method, path: &str, body: Vec<u8>) -> (StatusCode, String) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let response = app.clone().oneshot(req).await.unwrap();
    let status = response.status();
    // Streams are read to the end: errors inside them must be well-formed too.
    let bytes = tokio::time::timeout(Duration::from_secs(60), response.into_body().collect())
        .await
        .expect("response finishes")
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    let f = fixture();
    let (method, path) = &ROUTES[usize::from(which) % ROUTES.len()];
    let (status, text) = f.runtime.block_on(call(&f.app, method.clone(), path, body.to_vec()));
    assert!(
        status != StatusCode::INTERNAL_SERVER_ERROR,
        "{method} {path} -> {status}: {text}\nbody: {}",
        String::from_utf8_lossy(body)
    );
});
