//! OpenSearch's REST API, the subset its RAG tutorial (and opensearch-py) uses: indices,
//! `_bulk`, documents, `_search` with `neural`, `knn` and `match_all` queries, search pipelines
//! with the `retrieval_augmented_generation` response processor, and ml-commons conversation
//! memory. Each index is a [`thinkrag_docstore`] collection embedded with the server's embedder;
//! answers come from the server's model through the same scheduler as every other request.
//!
//! Routed by hand from the fallback (not axum's router) because index names are free path
//! segments that would shadow the other APIs' routes, and because every miss must answer in
//! OpenSearch's error shape.

mod bulk;
pub mod meta;
mod search;

pub(crate) use search::{context_fields, rag_processor, retrieve};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use thinkrag_docstore::{Collection, DocStore, DocStoreError};

use crate::bedrock::percent_decode;
use crate::error::{ApiError, Flavor, Kind};
use crate::AppState;
use meta::MetaStore;

const F: Flavor = Flavor::OpenSearch;

/// The version `GET /` reports: the OpenSearch API level these routes follow.
pub const COMPATIBLE_VERSION: &str = "2.19.0";

/// The OpenSearch side of the server: the documents, pipelines and memories.
#[derive(Debug)]
pub struct OpenSearch {
    /// The indices.
    pub store: DocStore,
    /// Search pipelines and conversation memories.
    pub meta: MetaStore,
}

impl OpenSearch {
    /// Opens (or starts) the data directory.
    pub fn open(
        dir: &Path,
        embedder: Arc<thinkrag_embed::Embedder>,
    ) -> Result<Self, DocStoreError> {
        Ok(Self {
            store: DocStore::open(dir, embedder)?,
            meta: MetaStore::open(dir)?,
        })
    }
}

/// Index names whose paths the other APIs own (`/v1/...`, `/health`, `/metrics`, Bedrock's
/// `/model/...`).
const RESERVED: &[&str] = &["v1", "health", "metrics", "model"];

/// OpenSearch's index-name rules, plus the names the server's other routes take.
pub(crate) fn check_name(name: &str) -> Result<(), ApiError> {
    thinkrag_docstore::validate_name(name).map_err(|e| store_error(&e))?;
    if RESERVED.contains(&name) {
        return Err(ApiError::opensearch(
            Kind::Invalid,
            "invalid_index_name_exception",
            format!("index name [{name}] is taken by this server's other routes: choose another"),
        )
        .with_index(name));
    }
    Ok(())
}

/// Whether a path belongs to the OpenSearch API: everything but the OpenAI routes, anything
/// under a `/model/` segment (Bedrock's, which may sit under an `endpoint_url` prefix), `/health`
/// and `/metrics`.
pub fn owns(path: &str) -> bool {
    !(path.starts_with("/v1/")
        || path == "/v1"
        || path == "/health"
        || path == "/metrics"
        || path.contains("/model/"))
}

/// The request counter label of a path.
pub fn label(path: &str) -> &'static str {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        [.., "_bulk"] => "opensearch_bulk",
        ["_search", "pipeline", ..] => "opensearch_pipeline",
        [_, "_search"] => "opensearch_search",
        ["_plugins", "_ml", "memory", ..] => "opensearch_memory",
        _ => "opensearch",
    }
}

/// A parsed request.
pub(crate) struct Req {
    pub method: Method,
    pub path: String,
    pub segs: Vec<String>,
    pub query: BTreeMap<String, String>,
    pub body: Body,
}

impl Req {
    /// A query-string parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }
}

fn parse_query(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                percent_decode(&k.replace('+', " ")),
                percent_decode(&v.replace('+', " ")),
            )
        })
        .collect()
}

/// Serves one OpenSearch request.
pub async fn dispatch(state: Arc<AppState>, method: Method, uri: Uri, body: Body) -> Response {
    let req = Req {
        segs: uri
            .path()
            .split('/')
            .filter(|s| !s.is_empty())
            .map(percent_decode)
            .collect(),
        path: uri.path().to_string(),
        query: parse_query(uri.query()),
        method,
        body,
    };
    let head = req.method == Method::HEAD;
    let response = route(state, req)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    if head {
        // HEAD answers with the status alone.
        return response.status().into_response();
    }
    response
}

fn no_handler(req: &Req) -> ApiError {
    ApiError::opensearch(
        Kind::Invalid,
        "illegal_argument_exception",
        format!(
            "no handler found for uri [{}] and method [{}]: thinkrag serves indices, _bulk, \
             _doc, _search, _count, _cat/indices, _search/pipeline and _plugins/_ml/memory",
            req.path, req.method
        ),
    )
}

async fn route(state: Arc<AppState>, req: Req) -> Result<Response, ApiError> {
    let segs: Vec<&str> = req.segs.iter().map(String::as_str).collect();
    let m = req.method.clone();
    if segs.is_empty() && (m == Method::GET || m == Method::HEAD) {
        return Ok(axum::Json(info(&state)).into_response());
    }
    let Some(os) = state.opensearch.clone() else {
        return Err(ApiError::opensearch(
            Kind::Invalid,
            "illegal_argument_exception",
            format!(
                "{} {}: the OpenSearch-compatible routes need an embedder: start `thinkrag \
                 serve` with --embedder (e.g. --embedder bge-base-en-v1.5)",
                req.method, req.path
            ),
        ));
    };
    match (segs.as_slice(), &m) {
        (["_bulk"], &Method::POST | &Method::PUT) => bulk::bulk(&state, &os, None, req).await,
        (["_cat", "indices"], &Method::GET) => Ok(cat_indices(&os, None, &req)),
        (["_cat", "indices", name], &Method::GET) => Ok(cat_indices(&os, Some(name), &req)),
        (["_refresh"], &Method::POST | &Method::GET) => Ok(refreshed()),
        (["_search", "pipeline"], &Method::GET) => {
            Ok(axum::Json(json!(os.meta.pipelines())).into_response())
        }
        (["_search", "pipeline", name], _) => {
            let name = name.to_string();
            search::pipeline(&state, &os, &name, req).await
        }
        (["_search"], _) => Err(ApiError::opensearch(
            Kind::Invalid,
            "illegal_argument_exception",
            "searching every index at once is not supported: name one, /{index}/_search",
        )),
        (["_plugins", "_ml", "memory", rest @ ..], _) => {
            let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            memory(&state, &os, rest, req).await
        }
        ([name, ..], _) if name.starts_with('_') => Err(no_handler(&req)),
        ([name], &Method::PUT) => {
            let name = name.to_string();
            create_index(&state, &os, &name, req).await
        }
        ([name], &Method::GET | &Method::HEAD) => {
            let c = collection(&os, name)?;
            Ok(axum::Json(json!({ c.name(): index_json(&c) })).into_response())
        }
        ([name], &Method::DELETE) => {
            let name = name.to_string();
            delete_index(&os, &name).await
        }
        ([name, "_mapping"], &Method::GET) => {
            let c = collection(&os, name)?;
            Ok(axum::Json(json!({ c.name(): {"mappings": c.meta().mappings} })).into_response())
        }
        ([name, "_settings"], &Method::GET) => {
            let c = collection(&os, name)?;
            Ok(axum::Json(json!({ c.name(): {"settings": settings_json(&c)} })).into_response())
        }
        ([name, "_bulk"], &Method::POST | &Method::PUT) => {
            let name = name.to_string();
            bulk::bulk(&state, &os, Some(name), req).await
        }
        ([name, "_search"], &Method::GET | &Method::POST) => {
            let c = collection(&os, name)?;
            search::search(&state, &os, c, req).await
        }
        ([name, "_count"], &Method::GET | &Method::POST) => {
            let c = collection(&os, name)?;
            search::count(&state, c, req).await
        }
        ([name, "_refresh"], &Method::POST | &Method::GET) => {
            collection(&os, name)?;
            Ok(refreshed())
        }
        ([name, "_doc"], &Method::POST) => {
            let name = name.to_string();
            bulk::put_doc(&state, &os, &name, None, req).await
        }
        ([name, "_doc" | "_create", id], &Method::PUT | &Method::POST) => {
            let (name, id) = (name.to_string(), id.to_string());
            bulk::put_doc(&state, &os, &name, Some(id), req).await
        }
        ([name, "_doc", id], &Method::GET | &Method::HEAD) => {
            let c = collection(&os, name)?;
            Ok(bulk::get_doc(&c, id))
        }
        ([name, "_doc", id], &Method::DELETE) => {
            let (name, id) = (name.to_string(), id.to_string());
            bulk::delete_doc(&os, &name, &id).await
        }
        ([name, "_update", id], &Method::POST) => {
            let (name, id) = (name.to_string(), id.to_string());
            bulk::update_doc(&state, &os, &name, &id, req).await
        }
        _ => Err(no_handler(&req)),
    }
}

/// `GET /`: who this is, as an OpenSearch node answers (clients read `version.number`).
fn info(state: &AppState) -> Value {
    json!({
        "name": "thinkrag",
        "cluster_name": "thinkrag",
        "cluster_uuid": "thinkrag",
        "version": {
            "distribution": "opensearch",
            "number": COMPATIBLE_VERSION,
            "build_type": "thinkrag",
            "build_hash": env!("CARGO_PKG_VERSION"),
            "lucene_version": "9.12.1",
            "minimum_wire_compatibility_version": "7.10.0",
            "minimum_index_compatibility_version": "7.0.0",
        },
        "thinkrag": {"version": env!("CARGO_PKG_VERSION"), "model": state.options.model_id,
                     "embedder": state.embedder_id},
        "tagline": "The OpenSearch Project: https://opensearch.org/",
    })
}

fn refreshed() -> Response {
    // Documents are searchable as soon as a write returns: there is nothing to refresh.
    axum::Json(json!({"_shards": shards()})).into_response()
}

pub(crate) fn shards() -> Value {
    json!({"total": 1, "successful": 1, "failed": 0})
}

/// An error of the document store in OpenSearch's words.
pub(crate) fn store_error(e: &DocStoreError) -> ApiError {
    match e {
        DocStoreError::InvalidName { name, .. } => {
            ApiError::opensearch(Kind::Invalid, "invalid_index_name_exception", e.to_string())
                .with_index(name)
        }
        DocStoreError::AlreadyExists { name } => ApiError::opensearch(
            Kind::Invalid,
            "resource_already_exists_exception",
            format!("index [{name}] already exists"),
        )
        .with_index(name),
        DocStoreError::NotFound { name } => not_found(name),
        DocStoreError::DimensionMismatch { name, .. } => {
            ApiError::opensearch(Kind::Invalid, "mapper_parsing_exception", e.to_string())
                .with_index(name)
        }
        _ => ApiError::opensearch(Kind::Engine, "exception", e.to_string()),
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::opensearch(
        Kind::NotFound,
        "index_not_found_exception",
        format!("no such index [{name}]: create it with PUT /{name}, or write to it with _bulk"),
    )
    .with_index(name)
}

/// A collection by name, or OpenSearch's 404 (or why it could not be opened).
pub(crate) fn collection(os: &OpenSearch, name: &str) -> Result<Arc<Collection>, ApiError> {
    if let Some(c) = os.store.get(name) {
        return Ok(c);
    }
    if let Some(why) = os.store.broken(name) {
        return Err(ApiError::opensearch(
            Kind::Engine,
            "index_closed_exception",
            format!("index [{name}] could not be opened when the server started: {why}"),
        )
        .with_index(name));
    }
    Err(not_found(name))
}

/// Reads a body of at most `limit` bytes (empty is fine).
pub(crate) async fn body_bytes(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let inner = e.into_inner();
        if inner.is::<http_body_util::LengthLimitError>() {
            ApiError::opensearch(
                Kind::TooLarge,
                "content_too_long_exception",
                format!(
                    "the request body is larger than this server accepts ({limit} bytes): send \
                     less per request (or restart the server with a larger --max-body-bytes)"
                ),
            )
        } else {
            ApiError::opensearch(
                Kind::Invalid,
                "parse_exception",
                format!("cannot read the request body: {inner}"),
            )
        }
    })
}

/// Reads an optional JSON object body.
pub(crate) async fn json_body(
    body: Body,
    limit: usize,
) -> Result<Option<Map<String, Value>>, ApiError> {
    let bytes = body_bytes(body, limit).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(other) => Err(parse_error(format!(
            "the request body must be a JSON object, not {}",
            crate::request::type_name(&other)
        ))),
        Err(e) => Err(parse_error(format!("the request body is not JSON: {e}"))),
    }
}

/// A malformed request.
pub(crate) fn parse_error(reason: impl Into<String>) -> ApiError {
    ApiError::opensearch(Kind::Invalid, "parse_exception", reason)
}

/// An invalid value.
pub(crate) fn invalid(reason: impl Into<String>) -> ApiError {
    ApiError::opensearch(Kind::Invalid, "illegal_argument_exception", reason)
}

async fn create_index(
    state: &AppState,
    os: &Arc<OpenSearch>,
    name: &str,
    req: Req,
) -> Result<Response, ApiError> {
    let body = json_body(req.body, state.options.max_body_bytes)
        .await?
        .unwrap_or_default();
    if let Some(k) = body
        .keys()
        .find(|k| !matches!(k.as_str(), "settings" | "mappings" | "aliases"))
    {
        return Err(parse_error(format!(
            "unknown key [{k}] for create index: expected settings, mappings or aliases"
        )));
    }
    let settings = body.get("settings").cloned().unwrap_or(json!({}));
    let mappings = body.get("mappings").cloned().unwrap_or(json!({}));
    for (what, v) in [("settings", &settings), ("mappings", &mappings)] {
        if !v.is_object() {
            return Err(parse_error(format!("[{what}] must be an object")));
        }
    }
    check_name(name)?;
    let os = Arc::clone(os);
    let owned = name.to_string();
    let created = tokio::task::spawn_blocking(move || os.store.create(&owned, settings, mappings))
        .await
        .map_err(|e| ApiError::opensearch(Kind::Engine, "exception", e.to_string()))?;
    created.map_err(|e| store_error(&e))?;
    Ok(
        axum::Json(json!({"acknowledged": true, "shards_acknowledged": true, "index": name}))
            .into_response(),
    )
}

async fn delete_index(os: &Arc<OpenSearch>, name: &str) -> Result<Response, ApiError> {
    collection(os, name)?;
    let os2 = Arc::clone(os);
    let owned = name.to_string();
    let deleted = tokio::task::spawn_blocking(move || os2.store.delete(&owned))
        .await
        .map_err(|e| ApiError::opensearch(Kind::Engine, "exception", e.to_string()))?
        .map_err(|e| store_error(&e))?;
    if !deleted {
        return Err(not_found(name));
    }
    Ok(axum::Json(json!({"acknowledged": true})).into_response())
}

/// An index's settings as OpenSearch reports them: the given ones under `index`, plus its own.
fn settings_json(c: &Collection) -> Value {
    let meta = c.meta();
    let mut index = Map::new();
    if let Some(Value::Object(given)) = meta.settings.as_object().map(|s| {
        let mut flat = Map::new();
        for (k, v) in s {
            match (k.as_str(), v) {
                ("index", Value::Object(inner)) => {
                    flat.extend(inner.iter().map(|(k, v)| (k.clone(), v.clone())))
                }
                (k, v) => {
                    flat.insert(k.strip_prefix("index.").unwrap_or(k).to_string(), v.clone());
                }
            }
        }
        Value::Object(flat)
    }) {
        index = given;
    }
    index.insert("number_of_shards".into(), json!("1"));
    index.insert("number_of_replicas".into(), json!("0"));
    index.insert("uuid".into(), json!(meta.uuid));
    index.insert("creation_date".into(), json!(meta.created_ms.to_string()));
    index.insert("provided_name".into(), json!(meta.name));
    json!({"index": index})
}

fn index_json(c: &Collection) -> Value {
    json!({"aliases": {}, "mappings": c.meta().mappings, "settings": settings_json(c)})
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1}gb", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1}mb", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1}kb", n as f64 / 1024.0),
        n => format!("{n}b"),
    }
}

/// `GET /_cat/indices[/{name}]`: a text table, or JSON with `?format=json`.
fn cat_indices(os: &OpenSearch, name: Option<&str>, req: &Req) -> Response {
    let list: Vec<Arc<Collection>> = match name {
        Some(n) => match collection(os, n) {
            Ok(c) => vec![c],
            Err(e) => return e.into_response(),
        },
        None => os.store.list(),
    };
    let rows: Vec<Value> = list
        .iter()
        .map(|c| {
            let size = human_bytes(c.disk_bytes());
            json!({
                "health": "green", "status": "open", "index": c.name(), "uuid": c.meta().uuid,
                "pri": "1", "rep": "0", "docs.count": c.len().to_string(), "docs.deleted": "0",
                "store.size": size, "pri.store.size": size,
            })
        })
        .collect();
    if req.param("format") == Some("json") {
        return axum::Json(json!(rows)).into_response();
    }
    let columns = [
        "health",
        "status",
        "index",
        "uuid",
        "pri",
        "rep",
        "docs.count",
        "docs.deleted",
        "store.size",
        "pri.store.size",
    ];
    let mut out = String::new();
    if req.param("v").is_some() {
        out.push_str(&columns.join(" "));
        out.push('\n');
    }
    for r in rows {
        let cells: Vec<&str> = columns
            .iter()
            .map(|c| r[c].as_str().unwrap_or(""))
            .collect();
        out.push_str(&cells.join(" "));
        out.push('\n');
    }
    (
        StatusCode::OK,
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=UTF-8",
        )],
        out,
    )
        .into_response()
}

fn memory_not_found(id: &str) -> ApiError {
    ApiError::opensearch(
        Kind::NotFound,
        "resource_not_found_exception",
        format!("memory [{id}] not found: create one with POST /_plugins/_ml/memory"),
    )
}

/// ml-commons' conversation memory API.
async fn memory(
    state: &AppState,
    os: &OpenSearch,
    rest: Vec<String>,
    req: Req,
) -> Result<Response, ApiError> {
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let io = |e: DocStoreError| ApiError::opensearch(Kind::Engine, "exception", e.to_string());
    let limit = state.options.max_body_bytes;
    match (rest.as_slice(), &req.method) {
        ([], &Method::POST) => {
            let body = json_body(req.body, limit).await?.unwrap_or_default();
            let name = match body.get("name") {
                None => "",
                Some(Value::String(s)) => s.as_str(),
                Some(_) => return Err(parse_error("[name] must be a string")),
            };
            let m = os.meta.create_memory(name).map_err(io)?;
            Ok(axum::Json(json!({"memory_id": m.memory_id})).into_response())
        }
        ([], &Method::GET) => {
            let all: Vec<Value> = os.meta.memories().iter().map(|m| m.summary()).collect();
            Ok(axum::Json(json!({"memories": all})).into_response())
        }
        (["message", id], &Method::GET) => match os.meta.interaction(id) {
            Some(i) => Ok(axum::Json(json!(i)).into_response()),
            None => Err(ApiError::opensearch(
                Kind::NotFound,
                "resource_not_found_exception",
                format!("message [{id}] not found"),
            )),
        },
        ([id], &Method::GET) => match os.meta.memory(id) {
            Some(m) => Ok(axum::Json(m.summary()).into_response()),
            None => Err(memory_not_found(id)),
        },
        ([id], &Method::DELETE) => {
            if os.meta.delete_memory(id).map_err(io)? {
                Ok(axum::Json(json!({"success": true})).into_response())
            } else {
                Err(memory_not_found(id))
            }
        }
        ([id, "messages"], &Method::GET) => match os.meta.memory(id) {
            Some(m) => Ok(axum::Json(json!({"messages": m.messages})).into_response()),
            None => Err(memory_not_found(id)),
        },
        ([id, "messages"], &Method::POST) => {
            let body = json_body(req.body, limit).await?.unwrap_or_default();
            let text = |k: &str| -> Result<String, ApiError> {
                match body.get(k) {
                    None | Some(Value::Null) => Ok(String::new()),
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(_) => Err(parse_error(format!("[{k}] must be a string"))),
                }
            };
            let added = os
                .meta
                .add_interaction(
                    id,
                    text("input")?,
                    text("response")?,
                    &text("origin")?,
                    text("prompt_template")?,
                    body.get("additional_info").cloned().unwrap_or(json!({})),
                )
                .map_err(io)?;
            match added {
                Some(i) => Ok(axum::Json(json!({"message_id": i.message_id})).into_response()),
                None => Err(memory_not_found(id)),
            }
        }
        _ => Err(no_handler(&req)),
    }
}
