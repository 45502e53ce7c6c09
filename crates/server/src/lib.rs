//! thinkrag-server: `thinkrag serve`, one local HTTP server that unmodified OpenAI clients
//! (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/models`) and Amazon Bedrock
//! runtime clients (`/model/{id}/invoke`, `/invoke-with-response-stream`, `/converse`,
//! `/converse-stream`) use, with `/health` and Prometheus `/metrics`.
//!
//! Requests become sequences of the engine's batching [`Scheduler`], so concurrent users are
//! decoded together; a client that disconnects cancels its sequence within one step. The wire
//! shapes follow the real clients (see `shared/reference/server-api.md` in the project).

pub mod bedrock;
pub mod error;
pub mod eventstream;
pub mod generation;
pub mod openai;
pub mod opensearch;
pub mod rag;
pub mod request;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;
use thinkrag_embed::Embedder;
use thinkrag_llm::{Engine, Scheduler, SchedulerConfig};

use crate::error::{ApiError, Flavor, Kind};

/// How the server behaves (the engine's limits are in [`SchedulerConfig`]).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The model id `/v1/models` lists (requests may name any model: there is one).
    pub model_id: String,
    /// When set, every route but `/health` needs `Authorization: Bearer KEY` or `x-api-key: KEY`
    /// (Bedrock clients may also use the key as their AWS access key id).
    pub api_key: Option<String>,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// After SIGINT/SIGTERM, how long in-flight requests may take before they are cancelled.
    pub shutdown_grace: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            model_id: "thinkrag".into(),
            api_key: None,
            max_body_bytes: 8 << 20,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Everything the handlers share.
pub struct AppState {
    /// The language model.
    pub engine: Arc<Engine>,
    /// Steps every request's sequence.
    pub scheduler: Scheduler,
    /// The embedding model behind `/v1/embeddings`, when one is loaded.
    pub embedder: Option<Arc<Embedder>>,
    /// The embedder's name in `/v1/models`.
    pub embedder_id: Option<String>,
    /// The OpenSearch-compatible indices, pipelines and memories (needs the embedder).
    pub opensearch: Option<Arc<opensearch::OpenSearch>>,
    /// Chunk stores answered from by name (`thinkrag serve --store`): an index directory or a
    /// PostgreSQL database that `thinkrag ingest` processes fill, searched with `embedder`.
    pub stores: BTreeMap<String, Arc<dyn thinkrag::index::ChunkStore>>,
    /// Server behaviour.
    pub options: ServerOptions,
    /// Unix time the server started (OpenAI's `created`).
    pub created: u64,
    http: Mutex<BTreeMap<(&'static str, u16), u64>>,
}

impl AppState {
    /// The state for `engine` (and optionally an embedder), starting the scheduler thread.
    pub fn new(
        engine: Arc<Engine>,
        embedder: Option<(String, Arc<Embedder>)>,
        scheduler: SchedulerConfig,
        options: ServerOptions,
    ) -> thinkrag_llm::Result<Self> {
        let (embedder_id, embedder) = match embedder {
            Some((id, e)) => (Some(id), Some(e)),
            None => (None, None),
        };
        Ok(Self {
            scheduler: Scheduler::new(Arc::clone(&engine), scheduler)?,
            engine,
            embedder,
            embedder_id,
            opensearch: None,
            stores: BTreeMap::new(),
            options,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            http: Mutex::new(BTreeMap::new()),
        })
    }

    fn count(&self, route: &'static str, status: StatusCode) {
        let mut m = self.http.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((route, status.as_u16())).or_default() += 1;
    }
}

/// The routes, with authentication and request counting.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .fallback(fallback)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authenticate_and_count,
        ))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown` completes; then stops accepting, lets
/// in-flight requests finish for the grace period, cancels what is left and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let draining = Arc::clone(&state);
    let signal = async move {
        shutdown.await;
        // Returning starts axum's graceful shutdown (no new connections, idle ones closed); the
        // scheduler refuses new requests at once and cancels the rest after the grace period,
        // which ends their streams and so their connections.
        tokio::task::spawn_blocking(move || {
            draining.scheduler.drain(draining.options.shutdown_grace)
        });
    };
    let after = Arc::clone(&state);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(signal)
        .await?;
    // Fold the write-ahead logs into index generations, so the next start replays nothing.
    if let Some(os) = after.opensearch.clone() {
        tokio::task::spawn_blocking(move || {
            if let Err(e) = os.store.checkpoint_all() {
                tracing::warn!(error = %e, "checkpoint at shutdown failed (the logs keep every write)");
            }
        })
        .await
        .ok();
    }
    Ok(())
}

/// The API a path belongs to, for its error shape.
pub fn flavor_of(path: &str) -> Flavor {
    if bedrock::parse_path(path).is_some() || path.contains("/model/") {
        Flavor::Bedrock
    } else if opensearch::owns(path) {
        Flavor::OpenSearch
    } else {
        Flavor::OpenAi
    }
}

/// A short label of the route for the request counters.
fn route_label(path: &str) -> &'static str {
    if let Some((_, op)) = bedrock::parse_path(path) {
        return op.label();
    }
    match path {
        "/v1/chat/completions" => "chat_completions",
        "/v1/completions" => "completions",
        "/v1/embeddings" => "embeddings",
        "/health" | "/v1/health" => "health",
        "/metrics" => "metrics",
        p if p.starts_with("/v1/models") => "models",
        p if opensearch::owns(p) => opensearch::label(p),
        _ => "other",
    }
}

/// Checks the API key (all routes but `/health`) and counts every response by route and status.
async fn authenticate_and_count(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_string();
    let label = route_label(&path);
    let response = match &state.options.api_key {
        Some(key) if label != "health" && !authorized(request.headers(), key) => {
            let flavor = flavor_of(&path);
            ApiError::new(
                flavor,
                Kind::Unauthorized,
                match flavor {
                    Flavor::OpenAi => {
                        "invalid or missing API key: send `Authorization: Bearer KEY` \
                                       (the openai client's api_key) or `x-api-key: KEY`"
                    }
                    Flavor::Bedrock => {
                        "invalid or missing API key: use the server's key as the AWS \
                                        access key id (aws_access_key_id=KEY), or send \
                                        `x-api-key: KEY`"
                    }
                    Flavor::OpenSearch => {
                        "invalid or missing API key: send it as the password of HTTP basic \
                         auth (opensearch-py: http_auth=(\"any-user\", KEY)), or as \
                         `Authorization: Bearer KEY` or `x-api-key: KEY`"
                    }
                },
            )
            .into_response()
        }
        _ => next.run(request).await,
    };
    state.count(label, response.status());
    response
}

/// Whether the headers carry `key`: `Authorization: Bearer KEY`, `x-api-key: KEY`, or a SigV4
/// `Authorization` whose access key id is `KEY` (the signature itself is not checked: the key is
/// a shared secret between a local server and its users, not an AWS credential).
fn authorized(headers: &HeaderMap, key: &str) -> bool {
    let get = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if get("x-api-key") == Some(key) {
        return true;
    }
    let Some(auth) = get(header::AUTHORIZATION.as_str()) else {
        return false;
    };
    if let Some(token) = auth.strip_prefix("Bearer ") {
        return token.trim() == key;
    }
    // OpenSearch clients send HTTP basic auth: the key is the password, any user name.
    if let Some(basic) = auth.strip_prefix("Basic ") {
        use base64::Engine as _;
        return base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|pair| pair.split_once(':').map(|(_, pw)| pw == key))
            .unwrap_or(false);
    }
    if auth.starts_with("AWS4-HMAC-SHA256") {
        let akid = auth
            .split("Credential=")
            .nth(1)
            .and_then(|c| c.split('/').next());
        return akid == Some(key);
    }
    false
}

/// `GET /health`: 200 `{"status":"ok"}` while serving (the server listens only once the model is
/// loaded); 503 while shutting down.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.scheduler.is_draining() {
        return ApiError::new(Flavor::OpenAi, Kind::Unavailable, "shutting down").into_response();
    }
    axum::Json(json!({"status": "ok", "model": state.options.model_id})).into_response()
}

/// `GET /metrics`: Prometheus text.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = state.scheduler.metrics();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        out.push_str(&format!(
            "# HELP thinkrag_{name} {help}\n# TYPE thinkrag_{name} {kind}\nthinkrag_{name} {value}\n"
        ));
    };
    metric(
        "requests_total",
        "counter",
        "Generation requests accepted.",
        m.requests_total as f64,
    );
    metric(
        "requests_finished_total",
        "counter",
        "Generation requests finished.",
        m.requests_finished as f64,
    );
    metric(
        "requests_cancelled_total",
        "counter",
        "Generation requests cancelled (client gone or shutdown).",
        m.requests_cancelled as f64,
    );
    metric(
        "requests_rejected_total",
        "counter",
        "Generation requests refused because the queue was full.",
        m.requests_rejected as f64,
    );
    metric(
        "requests_running",
        "gauge",
        "Sequences being generated.",
        m.running as f64,
    );
    metric(
        "requests_waiting",
        "gauge",
        "Requests waiting for a slot.",
        m.waiting as f64,
    );
    metric(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens of admitted requests.",
        m.prompt_tokens_total as f64,
    );
    metric(
        "prompt_tokens_cached_total",
        "counter",
        "Prompt tokens taken from the prefix cache.",
        m.cached_prompt_tokens_total as f64,
    );
    metric(
        "generated_tokens_total",
        "counter",
        "Tokens generated.",
        m.generated_tokens_total as f64,
    );
    metric(
        "decode_steps_total",
        "counter",
        "Batched decode steps.",
        m.decode_steps_total as f64,
    );
    metric(
        "decode_batch_size_sum",
        "counter",
        "Sum of the batch sizes of all decode steps.",
        m.decode_batch_sum as f64,
    );
    let mean = if m.decode_steps_total > 0 {
        m.decode_batch_sum as f64 / m.decode_steps_total as f64
    } else {
        0.0
    };
    metric(
        "decode_batch_size_mean",
        "gauge",
        "Mean sequences per decode step since start.",
        mean,
    );
    metric(
        "kv_cache_bytes",
        "gauge",
        "KV cache bytes held by running sequences.",
        m.kv_cache_bytes as f64,
    );
    metric(
        "prefix_cache_bytes",
        "gauge",
        "KV cache bytes kept for prefix reuse.",
        m.prefix_cache_bytes as f64,
    );
    metric(
        "prefix_cache_entries",
        "gauge",
        "Sequences kept for prefix reuse.",
        m.prefix_cache_entries as f64,
    );
    let cfg = state.scheduler.config();
    metric(
        "max_sequences",
        "gauge",
        "Sequences decoded at once at most.",
        cfg.max_sequences as f64,
    );
    metric(
        "max_queue",
        "gauge",
        "Requests that may wait.",
        cfg.max_queue as f64,
    );
    out.push_str("# HELP thinkrag_http_requests_total HTTP responses by route and status.\n");
    out.push_str("# TYPE thinkrag_http_requests_total counter\n");
    for ((route, status), n) in state.http.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        out.push_str(&format!(
            "thinkrag_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}\n"
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Bedrock's routes (their model ids may hold `%2F`, and `endpoint_url` may add a path prefix, so
/// they are matched on the raw path), else a 404 in the shape of the API the path belongs to.
async fn fallback(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: Body,
) -> Response {
    let path = uri.path();
    if let Some((model, op)) = bedrock::parse_path(path) {
        if method != Method::POST {
            return ApiError::new(
                Flavor::Bedrock,
                Kind::NotFound,
                format!("{method} {path}: Bedrock operations take POST"),
            )
            .into_response();
        }
        return bedrock::handle(state, op, model, headers, body).await;
    }
    if opensearch::owns(path) {
        return opensearch::dispatch(state, method, uri, body).await;
    }
    let flavor = flavor_of(path);
    ApiError::new(
        flavor,
        Kind::NotFound,
        format!(
            "no route {method} {path}: this server has /v1/chat/completions, /v1/completions, \
             /v1/embeddings, /v1/models, /health, /metrics, Bedrock's \
             /model/{{modelId}}/{{invoke,invoke-with-response-stream,converse,converse-stream}} \
             and OpenSearch's /{{index}}, /_bulk, /{{index}}/_search, /_search/pipeline"
        ),
    )
    .into_response()
}
