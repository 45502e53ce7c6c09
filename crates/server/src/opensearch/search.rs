//! `_search` (neural, knn, match/match_phrase (BM25), hybrid and match_all queries, `size`/`from`, `_source` filtering, `min_score`),
//! `_count`, search pipelines, and the `retrieval_augmented_generation` response processor, which
//! answers over the hits with the server's model as ml-commons' processor does (OpenSearch's
//! response shape, answer only in `answer`) and adds thinkrag's reasoning, citations, usage and
//! timings beside it.

use std::sync::Arc;
use std::time::Instant;

use axum::http::Method;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use thinkrag_docstore::{Collection, DocHit, HybridVector, SearchMode, StoredDoc};
use thinkrag_llm::Message;

use super::{invalid, json_body, parse_error, OpenSearch, Req, F};
use crate::error::{ApiError, Kind};
use crate::rag::{self, RagRequest, RagSource};
use crate::AppState;

/// OpenSearch's `index.max_result_window` and the k-NN plugin's largest k.
const MAX_WINDOW: i64 = 10_000;

/// The keys a RAG processor's configuration may hold.
const RAG_KEYS: &[&str] = &[
    "model_id",
    "context_field_list",
    "system_prompt",
    "user_instructions",
    "llm_model",
    "llm_response_field",
    "tag",
    "description",
    "ignore_failure",
];

/// The keys `ext.generative_qa_parameters` may hold.
const QA_KEYS: &[&str] = &[
    "llm_model",
    "llm_question",
    "memory_id",
    "context_size",
    "message_size",
    "timeout",
    "system_prompt",
    "user_instructions",
    "llm_response_field",
    "llm_messages",
];

/// What a query asks for.
enum Query {
    All,
    Text {
        field: String,
        text: String,
        k: usize,
    },
    Vector {
        field: String,
        vector: Vec<f32>,
        k: usize,
    },
    /// `match`/`match_phrase`: BM25 over the documents' text; as many as the page needs.
    Lexical {
        text: String,
    },
    /// `hybrid`: one lexical and one vector query, fused by reciprocal rank.
    Hybrid {
        text: String,
        vector: VectorHalf,
        k: usize,
    },
}

/// The vector query of a `hybrid` query.
enum VectorHalf {
    Text(String),
    Vector(Vec<f32>),
}

fn int_in(v: &Value, what: &str, lo: i64, hi: i64) -> Result<i64, ApiError> {
    match v.as_i64() {
        Some(n) if (lo..=hi).contains(&n) => Ok(n),
        Some(n) => Err(invalid(format!(
            "[{what}] is {n}: it must be between {lo} and {hi}"
        ))),
        None => Err(parse_error(format!("[{what}] must be an integer, got {v}"))),
    }
}

/// The one entry of an object like `{"field": {...}}`.
fn single<'a>(v: &'a Value, what: &str) -> Result<(&'a String, &'a Map<String, Value>), ApiError> {
    let obj = v
        .as_object()
        .ok_or_else(|| parse_error(format!("[{what}] must be an object")))?;
    match obj.iter().next() {
        Some((k, Value::Object(inner))) if obj.len() == 1 => Ok((k, inner)),
        _ => Err(parse_error(format!(
            "[{what}] must name exactly one field: {{\"{what}\": {{\"FIELD\": {{...}}}}}}"
        ))),
    }
}

fn only(obj: &Map<String, Value>, what: &str, known: &[&str]) -> Result<(), ApiError> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(parse_error(format!(
            "[{what}] does not support [{k}] (supported: {})",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

/// `{"match": {"FIELD": "text"}}` or `{"match": {"FIELD": {"query": "text", ...}}}`.
fn parse_match(kind: &str, body: &Value, c: &Collection) -> Result<Query, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| parse_error(format!("[{kind}] must be an object")))?;
    let (field, spec) = match obj.iter().next() {
        Some((f, spec)) if obj.len() == 1 => (f, spec),
        _ => {
            return Err(parse_error(format!(
                "[{kind}] must name exactly one field: {{\"{kind}\": {{\"FIELD\": \"TEXT\"}}}}"
            )))
        }
    };
    let text = match spec {
        Value::String(s) => s.clone(),
        Value::Object(inner) => {
            only(inner, kind, &["query", "boost", "operator"])?;
            if let Some(op) = inner.get("operator").and_then(Value::as_str) {
                if !op.eq_ignore_ascii_case("or") {
                    return Err(invalid(format!(
                        "[{kind}.operator] {op} is not supported: thinkrag's BM25 ranks documents with any of the words (operator or), the exact sequence first"
                    )));
                }
            }
            match inner.get("query") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => return Err(parse_error(format!("[{kind}] needs a string [query]"))),
            }
        }
        Value::Number(n) => n.to_string(),
        _ => {
            return Err(parse_error(format!(
                "[{kind}.{field}] must be a string or an object with [query]"
            )))
        }
    };
    if text.trim().is_empty() {
        return Err(invalid(format!("[{kind}.{field}] is empty")));
    }
    // All text fields of a document go into one lexical index: a match on one of them is a
    // match on the document's text. A field that is not text at all is refused.
    if let Some(fields) = c.meta().text_fields() {
        if !fields.iter().any(|f| f == field) {
            return Err(invalid(format!(
                "field [{field}] is not a text field of index [{}]: its text fields are {fields:?}",
                c.name()
            )));
        }
    }
    Ok(Query::Lexical { text })
}

/// `{"hybrid": {"queries": [LEXICAL, VECTOR]}}`: one match/match_phrase and one neural/knn query.
fn parse_hybrid(body: &Value, c: &Collection, dim: usize) -> Result<Query, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| parse_error("[hybrid] must be an object"))?;
    only(obj, "hybrid", &["queries", "pagination_depth", "filter"])?;
    if obj.contains_key("filter") {
        return Err(invalid("[hybrid.filter] is not supported"));
    }
    let queries = obj
        .get("queries")
        .and_then(Value::as_array)
        .ok_or_else(|| parse_error("[hybrid] needs a [queries] array"))?;
    let mut text = None;
    let mut vector = None;
    for q in queries {
        match parse_query(Some(q), c, dim)? {
            Query::Lexical { text: t } if text.is_none() => text = Some(t),
            Query::Text { text: t, k, .. } if vector.is_none() => {
                vector = Some((VectorHalf::Text(t), k))
            }
            Query::Vector { vector: v, k, .. } if vector.is_none() => {
                vector = Some((VectorHalf::Vector(v), k))
            }
            _ => {
                return Err(invalid(
                    "[hybrid.queries] must hold one match (or match_phrase) query and one neural (or knn) query: thinkrag fuses BM25 and vector results by reciprocal rank",
                ))
            }
        }
    }
    match (text, vector) {
        (Some(text), Some((vector, k))) => Ok(Query::Hybrid { text, vector, k }),
        _ => Err(invalid(
            "[hybrid.queries] must hold one match (or match_phrase) query and one neural (or knn) query",
        )),
    }
}

fn parse_query(q: Option<&Value>, c: &Collection, dim: usize) -> Result<Query, ApiError> {
    let Some(q) = q else { return Ok(Query::All) };
    let obj = q
        .as_object()
        .ok_or_else(|| parse_error("[query] must be an object"))?;
    let Some((kind, body)) = obj.iter().next().filter(|_| obj.len() == 1) else {
        return Err(parse_error(
            "[query] must hold exactly one query (neural, knn, match, match_phrase, hybrid or match_all)",
        ));
    };
    let check_field = |field: &str| -> Result<(), ApiError> {
        let declared = c.meta().vector_fields();
        if !declared.is_empty() && !declared.iter().any(|f| f.name == field) {
            let names: Vec<&str> = declared.iter().map(|f| f.name.as_str()).collect();
            return Err(invalid(format!(
                "field [{field}] is not a knn_vector field of index [{}]: its vector fields are {names:?}",
                c.name()
            )));
        }
        Ok(())
    };
    let k_of = |inner: &Map<String, Value>, what: &str| -> Result<usize, ApiError> {
        match inner.get("k") {
            Some(v) => Ok(int_in(v, &format!("{what}.k"), 1, MAX_WINDOW)? as usize),
            None => Ok(10),
        }
    };
    match kind.as_str() {
        "match_all" => Ok(Query::All),
        "neural" => {
            let (field, inner) = single(body, "neural")?;
            only(inner, "neural", &["query_text", "k", "model_id", "boost"])?;
            check_field(field)?;
            let text = match inner.get("query_text") {
                Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
                Some(Value::String(_)) => return Err(invalid("[neural.query_text] is empty")),
                _ => {
                    return Err(parse_error(
                        "[neural] needs a string [query_text] (query_image is not supported: the embedder reads text)",
                    ))
                }
            };
            Ok(Query::Text { field: field.clone(), text, k: k_of(inner, "neural")? })
        }
        "knn" => {
            let (field, inner) = single(body, "knn")?;
            only(inner, "knn", &["vector", "k", "boost"])?;
            check_field(field)?;
            let vector: Vec<f32> = inner
                .get("vector")
                .and_then(Value::as_array)
                .ok_or_else(|| parse_error("[knn] needs a [vector] array of numbers"))?
                .iter()
                .map(|v| v.as_f64().map(|x| x as f32))
                .collect::<Option<_>>()
                .ok_or_else(|| parse_error("[knn.vector] must hold numbers only"))?;
            if vector.iter().all(|x| *x == 0.0) || vector.iter().any(|x| !x.is_finite()) {
                return Err(invalid("[knn.vector] must be finite and not all zeros"));
            }
            if vector.len() != dim {
                return Err(invalid(format!(
                    "[knn.vector] has dimension {}, but index [{}] holds vectors of dimension {dim} (the server's embedder)",
                    vector.len(),
                    c.name()
                )));
            }
            Ok(Query::Vector { field: field.clone(), vector, k: k_of(inner, "knn")? })
        }
        "match" | "match_phrase" => parse_match(kind, body, c),
        "hybrid" => parse_hybrid(body, c, dim),
        "multi_match" | "query_string" | "simple_query_string" | "term" | "terms" | "bool" => {
            Err(invalid(format!(
                "[{kind}] queries are not supported: for BM25 use match ({{\"match\": {{\"FIELD\": \"words\"}}}}), \
                 for vectors neural, for both hybrid"
            )))
        }
        other => Err(parse_error(format!(
            "unknown query [{other}]: thinkrag supports neural, knn, match, match_phrase, hybrid and match_all"
        ))),
    }
}

/// OpenSearch's score for a cosine similarity, by the field's space type (unit vectors:
/// squared L2 distance is 2 - 2 cos).
fn score(space: Option<&str>, cosine: f32) -> f32 {
    match space {
        Some("cosinesimil") => (1.0 + cosine) / 2.0,
        Some("innerproduct") if cosine >= 0.0 => 1.0 + cosine,
        Some("innerproduct") => 1.0 / (1.0 - cosine),
        // l2, OpenSearch's default.
        _ => 1.0 / (1.0 + (2.0 - 2.0 * cosine).max(0.0)),
    }
}

/// `_source` filtering: `true`/`false`, a field, a list of fields, or `{includes, excludes}`,
/// with `*` wildcards.
#[derive(Clone)]
struct SourceFilter {
    enabled: bool,
    includes: Vec<String>,
    excludes: Vec<String>,
}

fn strings(v: &Value, what: &str) -> Result<Vec<String>, ApiError> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| parse_error(format!("[{what}] must hold strings"))),
        _ => Err(parse_error(format!(
            "[{what}] must be a string or an array of strings"
        ))),
    }
}

impl SourceFilter {
    fn parse(v: Option<&Value>) -> Result<Self, ApiError> {
        let mut f = SourceFilter {
            enabled: true,
            includes: Vec::new(),
            excludes: Vec::new(),
        };
        match v {
            None => {}
            Some(Value::Bool(b)) => f.enabled = *b,
            Some(Value::Object(o)) => {
                only(
                    o,
                    "_source",
                    &["includes", "excludes", "include", "exclude"],
                )?;
                for (k, v) in o {
                    if k.starts_with("include") {
                        f.includes = strings(v, "_source.includes")?;
                    } else {
                        f.excludes = strings(v, "_source.excludes")?;
                    }
                }
            }
            Some(other) => f.includes = strings(other, "_source")?,
        }
        Ok(f)
    }

    fn apply(&self, source: &Value) -> Option<Value> {
        if !self.enabled {
            return None;
        }
        let Value::Object(obj) = source else {
            return Some(source.clone());
        };
        let matches = |pat: &str, key: &str| match pat.split_once('*') {
            None => pat == key,
            Some((pre, post)) => key.starts_with(pre) && key[pre.len()..].ends_with(post),
        };
        let kept: Map<String, Value> = obj
            .iter()
            .filter(|(k, _)| {
                self.includes.is_empty() || self.includes.iter().any(|p| matches(p, k))
            })
            .filter(|(k, _)| !self.excludes.iter().any(|p| matches(p, k)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Some(Value::Object(kept))
    }
}

/// A hit as it goes into the response.
struct OutHit {
    id: String,
    score: f32,
    source: Option<Value>,
}

/// The RAG processor's settings, merged with the request's `generative_qa_parameters`.
struct RagSettings {
    context_fields: Vec<String>,
    system_prompt: Option<String>,
    user_instructions: Option<String>,
    question: String,
    context_size: Option<usize>,
    memory_id: Option<String>,
    message_size: usize,
}

fn opt_string(o: &Map<String, Value>, key: &str, what: &str) -> Result<Option<String>, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(parse_error(format!("[{what}.{key}] must be a string"))),
    }
}

/// The RAG processor of a pipeline body, checked (`None` when it has none).
pub(crate) fn rag_processor(body: &Value) -> Option<Map<String, Value>> {
    let mut found = None;
    for p in body
        .get("response_processors")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(cfg) = p
            .get("retrieval_augmented_generation")
            .and_then(Value::as_object)
        {
            found = Some(cfg.clone());
        }
    }
    found
}

/// A RAG processor's `context_field_list`.
pub(crate) fn context_fields(cfg: &Map<String, Value>) -> Option<Vec<String>> {
    let list = cfg.get("context_field_list")?.as_array()?;
    Some(
        list.iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
    )
}

/// Checks a `phase_results_processors` entry. thinkrag fuses hybrid queries by reciprocal rank
/// with rank constant 60, which is OpenSearch's `score-ranker-processor` with `rrf`: that one is
/// accepted (so clients that create it before a hybrid search work); min-max or L2 score
/// normalization would rank differently, so `normalization-processor` is refused, not ignored.
fn validate_fusion_processor(p: &Value) -> Result<(), ApiError> {
    let obj = p.as_object().filter(|o| o.len() == 1).ok_or_else(|| {
        parse_error("a phase_results_processors entry must be an object naming one processor")
    })?;
    let (kind, cfg) = obj.iter().next().expect("one key");
    match kind.as_str() {
        "score-ranker-processor" => {
            let cfg = cfg
                .as_object()
                .ok_or_else(|| parse_error("[score-ranker-processor] must be an object"))?;
            only(cfg, "score-ranker-processor", &["combination", "tag", "description", "ignore_failure"])?;
            let combination = cfg
                .get("combination")
                .and_then(Value::as_object)
                .ok_or_else(|| parse_error("[score-ranker-processor] needs a [combination] object"))?;
            only(combination, "combination", &["technique", "rank_constant"])?;
            if combination.get("technique").and_then(Value::as_str) != Some("rrf") {
                return Err(invalid("[score-ranker-processor.combination.technique] must be rrf"));
            }
            match combination.get("rank_constant") {
                None => Ok(()),
                Some(v) if v.as_f64() == Some(f64::from(thinkrag_docstore::RRF_K)) => Ok(()),
                Some(v) => Err(invalid(format!(
                    "[rank_constant] {v} is not supported: thinkrag fuses with rank constant {} (reciprocal rank fusion's standard)",
                    thinkrag_docstore::RRF_K
                ))),
            }
        }
        "normalization-processor" => Err(invalid(
            "[normalization-processor] is not supported: thinkrag fuses hybrid queries by reciprocal rank; \
             use {\"score-ranker-processor\": {\"combination\": {\"technique\": \"rrf\"}}} or no pipeline",
        )),
        other => Err(invalid(format!(
            "phase results processor [{other}] is not supported: thinkrag implements score-ranker-processor (rrf)"
        ))),
    }
}

/// Checks a pipeline body: the RAG response processor and the rrf score ranker are implemented,
/// and an unknown processor is refused rather than silently skipped.
fn validate_pipeline(body: &Map<String, Value>) -> Result<(), ApiError> {
    only(
        body,
        "pipeline",
        &[
            "description",
            "version",
            "request_processors",
            "response_processors",
            "phase_results_processors",
        ],
    )?;
    if let Some(list) = body.get("phase_results_processors") {
        let list = list
            .as_array()
            .ok_or_else(|| parse_error("[phase_results_processors] must be an array"))?;
        for p in list {
            validate_fusion_processor(p)?;
        }
    }
    for key in ["request_processors"] {
        match body.get(key) {
            None => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(Value::Array(a)) => {
                let names: Vec<String> = a
                    .iter()
                    .filter_map(|p| p.as_object()?.keys().next().cloned())
                    .collect();
                return Err(invalid(format!(
                    "{key} {names:?} are not supported: thinkrag implements the \
                     retrieval_augmented_generation response processor only"
                )));
            }
            Some(_) => return Err(parse_error(format!("[{key}] must be an array"))),
        }
    }
    let Some(list) = body.get("response_processors") else {
        return Ok(());
    };
    let list = list
        .as_array()
        .ok_or_else(|| parse_error("[response_processors] must be an array"))?;
    for (i, p) in list.iter().enumerate() {
        let obj = p.as_object().filter(|o| o.len() == 1).ok_or_else(|| {
            parse_error(format!(
                "response_processors[{i}] must be an object naming one processor"
            ))
        })?;
        let (kind, cfg) = obj.iter().next().expect("one key");
        if kind != "retrieval_augmented_generation" {
            return Err(invalid(format!(
                "response processor [{kind}] is not supported: thinkrag implements \
                 retrieval_augmented_generation only"
            )));
        }
        let cfg = cfg
            .as_object()
            .ok_or_else(|| parse_error("[retrieval_augmented_generation] must be an object"))?;
        only(cfg, "retrieval_augmented_generation", RAG_KEYS)?;
        if !matches!(cfg.get("model_id"), Some(Value::String(s)) if !s.is_empty()) {
            return Err(parse_error(
                "[retrieval_augmented_generation] needs [model_id] (any id: the server's model answers)",
            ));
        }
        match cfg.get("context_field_list") {
            Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_string) => {}
            _ => {
                return Err(parse_error(
                    "[retrieval_augmented_generation] needs [context_field_list], a non-empty array of field names",
                ))
            }
        }
        for key in [
            "system_prompt",
            "user_instructions",
            "llm_model",
            "tag",
            "description",
            "llm_response_field",
        ] {
            opt_string(cfg, key, "retrieval_augmented_generation")?;
        }
    }
    Ok(())
}

/// `PUT`, `GET`, `DELETE /_search/pipeline/{name}`.
pub(super) async fn pipeline(
    state: &AppState,
    os: &OpenSearch,
    name: &str,
    req: Req,
) -> Result<Response, ApiError> {
    let missing = || {
        ApiError::opensearch(
            Kind::NotFound,
            "resource_not_found_exception",
            format!("search pipeline [{name}] not found"),
        )
    };
    match req.method {
        Method::PUT | Method::POST => {
            let body = json_body(req.body, state.options.max_body_bytes)
                .await?
                .ok_or_else(|| parse_error("the pipeline body is missing"))?;
            validate_pipeline(&body)?;
            os.meta
                .put_pipeline(name, Value::Object(body))
                .map_err(|e| ApiError::opensearch(Kind::Engine, "exception", e.to_string()))?;
            Ok(axum::Json(json!({"acknowledged": true})).into_response())
        }
        Method::GET | Method::HEAD => match os.meta.pipeline(name) {
            Some(p) => Ok(axum::Json(json!({ name: p })).into_response()),
            None => Err(missing()),
        },
        Method::DELETE => {
            let deleted = os
                .meta
                .delete_pipeline(name)
                .map_err(|e| ApiError::opensearch(Kind::Engine, "exception", e.to_string()))?;
            if deleted {
                Ok(axum::Json(json!({"acknowledged": true})).into_response())
            } else {
                Err(missing())
            }
        }
        _ => Err(super::no_handler(&req)),
    }
}

/// `/{index}/_count`: the number of documents (match_all only).
pub(super) async fn count(
    state: &AppState,
    c: Arc<Collection>,
    req: Req,
) -> Result<Response, ApiError> {
    let body = json_body(req.body, state.options.max_body_bytes)
        .await?
        .unwrap_or_default();
    if body
        .get("query")
        .is_some_and(|q| q.get("match_all").is_none())
    {
        return Err(invalid(
            "_count supports match_all only: count a neural query's hits with _search",
        ));
    }
    Ok(axum::Json(json!({"count": c.len(), "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0}}))
        .into_response())
}

/// Runs a query: the documents, their scores and the total.
fn run_query(
    os: &OpenSearch,
    c: &Collection,
    q: &Query,
    from: usize,
    size: usize,
) -> Result<(usize, Vec<(StoredDoc, f32)>), ApiError> {
    let space = |field: &str| {
        c.meta()
            .vector_fields()
            .into_iter()
            .find(|f| f.name == field)
            .and_then(|f| f.space_type)
    };
    // Vector scores as OpenSearch reports them for the field's space type; BM25 and fusion
    // scores as they are (OpenSearch's match scores are BM25 too).
    let ranked = |hits: Vec<DocHit>, field: Option<&str>| {
        let space = field.and_then(space);
        let total = hits.len();
        let docs = hits
            .into_iter()
            .skip(from)
            .take(size)
            .map(|h| {
                let s = match (field, h.cosine) {
                    (Some(_), Some(cosine)) => score(space.as_deref(), cosine),
                    _ => h.score,
                };
                (h.doc, s)
            })
            .collect();
        (total, docs)
    };
    let window = (from + size).max(1);
    let e = |e: thinkrag_docstore::DocStoreError| super::store_error(&e);
    Ok(match q {
        Query::All => {
            let (total, docs) = c.scan(from, size);
            (total, docs.into_iter().map(|d| (d, 1.0)).collect())
        }
        Query::Text { field, text, k } => {
            ranked(os.store.search_text(c, text, *k).map_err(e)?, Some(field))
        }
        Query::Vector { field, vector, k } => {
            ranked(c.search_vector(vector, *k).map_err(e)?, Some(field))
        }
        Query::Lexical { text } => ranked(
            os.store
                .search_mode(c, SearchMode::Lexical, text, window)
                .map_err(e)?,
            None,
        ),
        Query::Hybrid { text, vector, k } => {
            let half = match vector {
                VectorHalf::Text(t) => HybridVector::Text(t),
                VectorHalf::Vector(v) => HybridVector::Vector(v),
            };
            ranked(
                os.store
                    .search_hybrid(c, text, half, (*k).max(window))
                    .map_err(e)?,
                None,
            )
        }
    })
}

/// `GET|POST /{index}/_search`.
pub(super) async fn search(
    state: &Arc<AppState>,
    os: &Arc<OpenSearch>,
    c: Arc<Collection>,
    req: Req,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let pipeline_param = req.param("search_pipeline").map(str::to_string);
    let body = json_body(req.body, state.options.max_body_bytes)
        .await?
        .unwrap_or_default();
    only(
        &body,
        "search",
        &[
            "query",
            "size",
            "from",
            "_source",
            "ext",
            "track_total_hits",
            "timeout",
            "min_score",
        ],
    )?;
    let dim = os.store.embedder_info().dim;
    let query = parse_query(body.get("query"), &c, dim)?;
    let size = match body.get("size") {
        Some(v) => int_in(v, "size", 0, MAX_WINDOW)? as usize,
        None => 10,
    };
    let from = match body.get("from") {
        Some(v) => int_in(v, "from", 0, MAX_WINDOW)? as usize,
        None => 0,
    };
    if from + size > MAX_WINDOW as usize {
        return Err(invalid(format!(
            "Result window is too large, from + size must be less than or equal to: [{MAX_WINDOW}] but was [{}]",
            from + size
        )));
    }
    let min_score = match body.get("min_score") {
        Some(v) => Some(
            v.as_f64()
                .ok_or_else(|| parse_error("[min_score] must be a number"))? as f32,
        ),
        None => None,
    };
    let filter = SourceFilter::parse(body.get("_source"))?;

    // The pipeline: named in the request, else the index's default; `_none` turns it off.
    let pipeline_name = pipeline_param.or_else(|| {
        c.meta()
            .setting("index.search.default_pipeline")
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    let pipeline = match pipeline_name.as_deref() {
        None | Some("_none") => None,
        Some(name) => Some((
            name.to_string(),
            os.meta.pipeline(name).ok_or_else(|| {
                invalid(format!(
                    "search pipeline [{name}] is not defined: create it with PUT /_search/pipeline/{name}"
                ))
            })?,
        )),
    };
    let ext = body
        .get("ext")
        .map(|e| {
            e.as_object()
                .ok_or_else(|| parse_error("[ext] must be an object"))
        })
        .transpose()?;
    let qa = match ext.and_then(|e| e.get("generative_qa_parameters")) {
        Some(Value::Object(o)) => {
            only(o, "generative_qa_parameters", QA_KEYS)?;
            Some(o.clone())
        }
        Some(_) => {
            return Err(parse_error(
                "[ext.generative_qa_parameters] must be an object",
            ))
        }
        None => None,
    };
    let rag_cfg = match &pipeline {
        Some((_, body)) => rag_processor(body),
        None => None,
    };
    let rag = match (&rag_cfg, &qa) {
        (Some(cfg), qa) => Some(rag_settings(
            cfg,
            qa.as_ref(),
            pipeline.as_ref().map_or("", |p| &p.0),
        )?),
        (None, Some(_)) => {
            return Err(invalid(
                "ext.generative_qa_parameters needs a search pipeline with a \
                 retrieval_augmented_generation processor: add ?search_pipeline=NAME",
            ))
        }
        (None, None) => None,
    };
    if let Some(r) = &rag {
        if let Some(id) = &r.memory_id {
            if os.meta.memory(id).is_none() {
                return Err(super::memory_not_found(id));
            }
        }
    }

    let (os2, c2) = (Arc::clone(os), Arc::clone(&c));
    let (total, docs) =
        tokio::task::spawn_blocking(move || run_query(&os2, &c2, &query, from, size))
            .await
            .map_err(|e| ApiError::opensearch(Kind::Engine, "exception", e.to_string()))??;
    let hits: Vec<OutHit> = docs
        .into_iter()
        .filter(|(_, s)| min_score.is_none_or(|m| *s >= m))
        .map(|(d, s)| OutHit {
            id: d.id.clone(),
            score: s,
            source: filter.apply(&d.source),
        })
        .collect();

    let ext_out = match rag {
        None => None,
        Some(r) => {
            let value = answer(state, os, &c, &hits, r).await?;
            Some(json!({"retrieval_augmented_generation": value}))
        }
    };
    let max_score = hits.first().map(|h| json!(h.score)).unwrap_or(Value::Null);
    let rendered: Vec<Value> = hits
        .iter()
        .map(|h| {
            let mut v = json!({"_index": c.name(), "_id": h.id, "_score": h.score});
            if let Some(s) = &h.source {
                v["_source"] = s.clone();
            }
            v
        })
        .collect();
    let mut out = json!({
        "took": started.elapsed().as_millis() as u64,
        "timed_out": false,
        "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
        "hits": {"total": {"value": total, "relation": "eq"}, "max_score": max_score, "hits": rendered},
    });
    if let Some(e) = ext_out {
        out["ext"] = e;
    }
    Ok(axum::Json(out).into_response())
}

fn rag_settings(
    cfg: &Map<String, Value>,
    qa: Option<&Map<String, Value>>,
    pipeline: &str,
) -> Result<RagSettings, ApiError> {
    let Some(qa) = qa else {
        return Err(invalid(format!(
            "search pipeline [{pipeline}] answers questions: add ext.generative_qa_parameters \
             with llm_question"
        )));
    };
    let w = "generative_qa_parameters";
    let question =
        match opt_string(qa, "llm_question", w)? {
            Some(q) if !q.trim().is_empty() => q,
            _ => return Err(invalid(
                "ext.generative_qa_parameters.llm_question is required (the question to answer)",
            )),
        };
    if qa.get("llm_messages").is_some_and(|m| !m.is_null()) {
        return Err(invalid(
            "ext.generative_qa_parameters.llm_messages is not supported: use llm_question",
        ));
    }
    let pick = |key: &str| -> Result<Option<String>, ApiError> {
        Ok(opt_string(qa, key, w)?.or(opt_string(cfg, key, "retrieval_augmented_generation")?))
    };
    let context_size = match qa.get("context_size") {
        None | Some(Value::Null) => None,
        Some(v) => {
            Some(int_in(v, "generative_qa_parameters.context_size", 1, MAX_WINDOW)? as usize)
        }
    };
    let message_size = match qa.get("message_size") {
        None | Some(Value::Null) => 10,
        Some(v) => int_in(v, "generative_qa_parameters.message_size", 1, 10_000)? as usize,
    };
    if let Some(v) = qa.get("timeout").filter(|v| !v.is_null()) {
        int_in(v, "generative_qa_parameters.timeout", 1, 86_400)?;
    }
    Ok(RagSettings {
        context_fields: context_fields(cfg).unwrap_or_default(),
        system_prompt: pick("system_prompt")?,
        user_instructions: pick("user_instructions")?,
        question,
        context_size,
        memory_id: opt_string(qa, "memory_id", w)?,
        message_size,
    })
}

/// The text of a context field.
fn field_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Runs the RAG processor over `hits`: the `retrieval_augmented_generation` object. Bad settings
/// are errors; a failed generation is reported in the object's `error`, as OpenSearch does.
async fn answer(
    state: &Arc<AppState>,
    os: &OpenSearch,
    c: &Collection,
    hits: &[OutHit],
    r: RagSettings,
) -> Result<Value, ApiError> {
    let take = r.context_size.unwrap_or(hits.len()).min(hits.len());
    let mut sources = Vec::with_capacity(take);
    for h in &hits[..take] {
        let mut parts = Vec::new();
        for f in &r.context_fields {
            match h.source.as_ref().and_then(|s| s.get(f)) {
                Some(v) => parts.push(field_text(v)),
                None => {
                    return Err(invalid(format!(
                        "Context {f} not found in search hit {} of index [{}]: every field of the \
                         pipeline's context_field_list must be in the hits' _source (check the \
                         search's _source filter)",
                        h.id,
                        c.name()
                    )))
                }
            }
        }
        sources.push(RagSource {
            index: c.name().to_string(),
            id: h.id.clone(),
            score: h.score,
            text: parts.join("\n"),
        });
    }
    let history: Vec<Message> = match &r.memory_id {
        Some(id) => {
            let m = os
                .meta
                .memory(id)
                .ok_or_else(|| super::memory_not_found(id))?;
            let skip = m.messages.len().saturating_sub(r.message_size);
            m.messages[skip..]
                .iter()
                .flat_map(|i| {
                    [
                        Message::user(i.input.clone()),
                        Message::assistant(i.response.clone()),
                    ]
                })
                .collect()
        }
        None => Vec::new(),
    };
    let request = RagRequest {
        question: r.question.clone(),
        sources,
        system: r.system_prompt.clone(),
        instructions: r.user_instructions.clone(),
        context_size: None,
        history,
    };
    let error = |message: String| Ok(json!({"error": message}));
    let prepared = match rag::prepare(state, F, request) {
        Ok(p) => p,
        Err(e) => return error(e.message),
    };
    // OpenSearch's API has no field for it, so the reasoning is closed at three quarters of
    // max_tokens: an answer always comes, where an unbounded R1 can think until the limit.
    let mut params = prepared.params.clone();
    if params.max_thinking_tokens.is_none() {
        params.max_thinking_tokens = Some(params.max_tokens * 3 / 4);
    }
    let job = match state.start(F, prepared.prompt.clone(), params) {
        Ok(j) => j,
        Err(e) => return error(e.message),
    };
    // `timeout` is validated but, as in OpenSearch (ml-commons reads it and never applies it),
    // not enforced: the tutorial's 15 s would cut off a CPU answer that OpenSearch would return.
    let g = match job.finish(F).await {
        Ok(g) => g,
        Err(e) => return error(e.message),
    };
    let answer = g.text.trim().to_string();
    let citations = prepared.citations_json(&answer);
    let mut out = json!({
        "answer": answer,
        "reasoning": g.reasoning,
        "citations": citations,
        "sources": prepared.sources_json(),
        "left_out": prepared.left_out_json(),
        "usage": rag::usage_json(&g),
        "timings": crate::openai::timings(&g),
    });
    if let Some(id) = &r.memory_id {
        let template = format!(
            "{}\n{}",
            r.system_prompt.as_deref().unwrap_or(""),
            r.user_instructions.as_deref().unwrap_or("")
        );
        let stored = os
            .meta
            .add_interaction(
                id,
                r.question.clone(),
                answer.clone(),
                "retrieval_augmented_generation",
                template.trim().to_string(),
                json!({"reasoning": g.reasoning, "citations": citations, "index": c.name()}),
            )
            .map_err(|e| ApiError::opensearch(Kind::Engine, "exception", e.to_string()))?;
        if let Some(i) = stored {
            out["message_id"] = json!(i.message_id);
        }
    }
    Ok(out)
}

/// The `k` documents of `index` that best match `question` in `mode`, as RAG sources: the
/// `fields` of each joined (by default the index's text fields, or every string field). For RAG
/// through the OpenAI API.
pub(crate) fn retrieve(
    os: &OpenSearch,
    index: &str,
    question: &str,
    k: usize,
    mode: SearchMode,
    fields: Option<&[String]>,
) -> Result<Vec<RagSource>, ApiError> {
    let c = super::collection(os, index)?;
    let hits = os
        .store
        .search_mode(&c, mode, question, k)
        .map_err(|e| super::store_error(&e))?;
    let fields: Option<Vec<String>> = fields
        .map(<[String]>::to_vec)
        .or_else(|| c.meta().text_fields());
    Ok(hits
        .into_iter()
        .map(|h| {
            let text = match (&fields, h.doc.source.as_object()) {
                (Some(fs), Some(obj)) => fs
                    .iter()
                    .filter_map(|f| obj.get(f).map(field_text))
                    .collect::<Vec<_>>()
                    .join("\n"),
                (None, Some(obj)) => obj
                    .values()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("\n"),
                _ => h.chunk_text.clone(),
            };
            RagSource {
                index: c.name().to_string(),
                id: h.doc.id,
                score: h.score,
                text,
            }
        })
        .collect())
}
