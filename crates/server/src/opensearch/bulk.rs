//! Writes: `_bulk` (NDJSON `index`, `create`, `update`, `delete` actions, a failed line failing
//! only its item) and the single-document routes, all through the document store, which makes a
//! write durable and searchable before it is acknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use thinkrag_docstore::{Collection, DocOp, OpOutcome};

use super::{
    body_bytes, check_name, collection, json_body, parse_error, shards, store_error, OpenSearch,
    Req,
};
use crate::error::{ApiError, Kind};
use crate::AppState;

/// Bulk bodies may be far larger than other requests (OpenSearch accepts 100 MB by default).
const BULK_MIN_LIMIT: usize = 100 << 20;

/// One parsed action.
struct Item {
    action: &'static str,
    index: String,
    id: Option<String>,
    op: Result<DocOp, (u16, &'static str, String)>,
}

fn action_name(k: &str) -> Option<&'static str> {
    Some(match k {
        "index" => "index",
        "create" => "create",
        "update" => "update",
        "delete" => "delete",
        _ => return None,
    })
}

/// Whether a line is an action line: an object with one key naming an action.
fn looks_like_action(v: &Value) -> bool {
    v.as_object()
        .is_some_and(|o| o.len() == 1 && o.keys().all(|k| action_name(k).is_some()))
}

/// After a bad action line: skips the next line too when it is a document, not an action.
fn skip_source_line<'a>(
    lines: &mut std::iter::Peekable<impl Iterator<Item = &'a str>>,
    number: &mut usize,
) {
    let is_document = lines
        .peek()
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .is_some_and(|v| !looks_like_action(&v));
    if is_document {
        lines.next();
        *number += 1;
    }
}

/// Parses the NDJSON body into items; a malformed line fails its item only.
fn parse_items(text: &str, default_index: Option<&str>) -> Vec<Item> {
    let mut lines = text
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .peekable();
    let mut items = Vec::new();
    let mut number = 0usize;
    while let Some(line) = lines.next() {
        number += 1;
        let fail = |action, index: String, id, reason: String| Item {
            action,
            index,
            id,
            op: Err((400, "illegal_argument_exception", reason)),
        };
        let parsed: Result<Value, _> = serde_json::from_str(line);
        let (action, meta) = match &parsed {
            Ok(Value::Object(o)) if o.len() == 1 => {
                let (k, v) = o.iter().next().expect("one key");
                match (action_name(k), v) {
                    (Some(a), Value::Object(meta)) => (a, meta.clone()),
                    (Some(a), _) => {
                        items.push(fail(
                            a,
                            String::new(),
                            None,
                            format!("action line {number}: the [{k}] metadata must be an object"),
                        ));
                        continue;
                    }
                    (None, _) => {
                        items.push(fail("index", String::new(), None, format!(
                            "action line {number}: unknown action [{k}]: expected index, create, update or delete"
                        )));
                        // Its source line (if any) is not an action: skip it too.
                        skip_source_line(&mut lines, &mut number);
                        continue;
                    }
                }
            }
            Ok(_) | Err(_) => {
                let reason = match parsed {
                    Err(e) => format!("action line {number} is not JSON ({e})"),
                    Ok(_) => format!("action line {number} must be an object with one action"),
                };
                items.push(fail("index", String::new(), None, reason));
                skip_source_line(&mut lines, &mut number);
                continue;
            }
        };
        let index = match meta.get("_index") {
            Some(Value::String(s)) => s.clone(),
            _ => default_index.unwrap_or("").to_string(),
        };
        let id = match meta.get("_id") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        if index.is_empty() {
            // Still consume the source line.
            if action != "delete" {
                lines.next();
                number += 1;
            }
            items.push(fail(action, index, id, format!(
                "action line {number}: no index: give _index in the action or POST to /{{index}}/_bulk"
            )));
            continue;
        }
        if action == "delete" {
            let op = match &id {
                Some(id) => Ok(DocOp::Delete { id: id.clone() }),
                None => Err((
                    400,
                    "action_request_validation_exception",
                    "delete needs an _id".to_string(),
                )),
            };
            items.push(Item {
                action,
                index,
                id,
                op,
            });
            continue;
        }
        let Some(source_line) = lines.next() else {
            items.push(fail(
                action,
                index,
                id,
                format!("action line {number} ({action}) has no document line after it"),
            ));
            break;
        };
        number += 1;
        let source = match serde_json::from_str::<Value>(source_line) {
            Ok(v @ Value::Object(_)) => v,
            Ok(other) => {
                items.push(Item {
                    action,
                    index,
                    id,
                    op: Err((
                        400,
                        "mapper_parsing_exception",
                        format!(
                            "document line {number} must be a JSON object, not {}",
                            crate::request::type_name(&other)
                        ),
                    )),
                });
                continue;
            }
            Err(e) => {
                items.push(Item {
                    action,
                    index,
                    id,
                    op: Err((
                        400,
                        "mapper_parsing_exception",
                        format!("document line {number} is not JSON: {e}"),
                    )),
                });
                continue;
            }
        };
        let op = match action {
            "index" => Ok(DocOp::Index {
                id: id.clone(),
                source,
            }),
            "create" => Ok(DocOp::Create {
                id: id.clone(),
                source,
            }),
            _ => match (&id, source.get("doc")) {
                (None, _) => Err((
                    400,
                    "action_request_validation_exception",
                    "update needs an _id".to_string(),
                )),
                (Some(_), None) if source.get("script").is_some() => Err((
                    400,
                    "illegal_argument_exception",
                    "scripted updates are not supported: send a partial `doc`".to_string(),
                )),
                (Some(_), None) => Err((
                    400,
                    "action_request_validation_exception",
                    "update needs a `doc` object".to_string(),
                )),
                (Some(i), Some(doc)) => Ok(DocOp::Update {
                    id: i.clone(),
                    doc: doc.clone(),
                    doc_as_upsert: source
                        .get("doc_as_upsert")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    upsert: source.get("upsert").cloned(),
                }),
            },
        };
        items.push(Item {
            action,
            index,
            id,
            op,
        });
    }
    items
}

/// One item of a bulk response.
fn item_json(action: &str, index: &str, o: &OpOutcome) -> Value {
    let body = match &o.error {
        Some((ty, reason)) => json!({
            "_index": index, "_id": o.id, "status": o.status,
            "error": {"type": ty, "reason": reason, "index": index},
        }),
        None => json!({
            "_index": index, "_id": o.id, "_version": o.version, "result": o.result,
            "_shards": shards(), "_seq_no": o.seq_no, "_primary_term": 1, "status": o.status,
        }),
    };
    json!({ action: body })
}

fn failed(id: Option<String>, (status, ty, reason): (u16, &'static str, String)) -> OpOutcome {
    OpOutcome {
        id: id.unwrap_or_default(),
        status,
        result: "",
        version: 0,
        seq_no: 0,
        error: Some((ty, reason)),
    }
}

/// Runs `ops` on the collection `name` (created if missing when `auto_create`).
async fn run_ops(
    os: &Arc<OpenSearch>,
    name: &str,
    ops: Vec<DocOp>,
    auto_create: bool,
) -> Result<Vec<OpOutcome>, ApiError> {
    let os = Arc::clone(os);
    let name = name.to_string();
    tokio::task::spawn_blocking(move || {
        let c = if auto_create {
            os.store.get_or_create(&name).map_err(|e| store_error(&e))?
        } else {
            collection(&os, &name)?
        };
        os.store.bulk(&c, ops).map_err(|e| store_error(&e))
    })
    .await
    .map_err(|e| ApiError::opensearch(Kind::Engine, "exception", e.to_string()))?
}

/// `POST [/{index}]/_bulk`.
pub(super) async fn bulk(
    state: &AppState,
    os: &Arc<OpenSearch>,
    default_index: Option<String>,
    req: Req,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    if let Some(name) = &default_index {
        check_name(name)?;
    }
    let limit = state.options.max_body_bytes.max(BULK_MIN_LIMIT);
    let bytes = body_bytes(req.body, limit).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| parse_error(format!("the bulk body is not UTF-8: {e}")))?;
    if text.trim().is_empty() {
        return Err(ApiError::opensearch(
            Kind::Invalid,
            "action_request_validation_exception",
            "Validation Failed: 1: no requests added: send NDJSON action and document lines",
        ));
    }
    let items = parse_items(text, default_index.as_deref());
    let mut outcomes: Vec<Option<OpOutcome>> = vec![None; items.len()];
    // Group by index, keeping each index's ops in order.
    let mut groups: BTreeMap<String, Vec<(usize, DocOp)>> = BTreeMap::new();
    for (pos, item) in items.iter().enumerate() {
        match &item.op {
            Err(e) => outcomes[pos] = Some(failed(item.id.clone(), e.clone())),
            Ok(op) => {
                if let Err(err) = check_name(&item.index) {
                    outcomes[pos] = Some(failed(
                        item.id.clone(),
                        (400, "invalid_index_name_exception", err.message),
                    ));
                } else {
                    groups
                        .entry(item.index.clone())
                        .or_default()
                        .push((pos, op.clone()));
                }
            }
        }
    }
    for (name, ops) in groups {
        let (positions, ops): (Vec<usize>, Vec<DocOp>) = ops.into_iter().unzip();
        match run_ops(os, &name, ops, true).await {
            Ok(results) => {
                for (pos, o) in positions.into_iter().zip(results) {
                    outcomes[pos] = Some(o);
                }
            }
            // The embedder or the log failed: nothing of this index's ops was kept.
            Err(e) => {
                for pos in positions {
                    outcomes[pos] = Some(failed(
                        items[pos].id.clone(),
                        (500, e.opensearch_type(), e.message.clone()),
                    ));
                }
            }
        }
    }
    let mut errors = false;
    let rendered: Vec<Value> = items
        .iter()
        .zip(outcomes)
        .map(|(item, o)| {
            let o = o.expect("every item has an outcome");
            errors |= o.error.is_some();
            item_json(item.action, &item.index, &o)
        })
        .collect();
    Ok(axum::Json(json!({
        "took": started.elapsed().as_millis() as u64,
        "errors": errors,
        "items": rendered,
    }))
    .into_response())
}

/// The response of a single-document write.
fn doc_response(index: &str, o: OpOutcome) -> Result<Response, ApiError> {
    if let Some((ty, reason)) = o.error {
        let kind = match o.status {
            404 => Kind::NotFound,
            409 => Kind::Invalid,
            500 => Kind::Engine,
            _ => Kind::Invalid,
        };
        let e = ApiError::opensearch(kind, ty, reason).with_index(index);
        if o.status == 409 {
            // OpenSearch answers a version conflict with 409, a status no other API here uses.
            let mut body = e.opensearch_body();
            body["status"] = json!(409);
            return Ok((StatusCode::CONFLICT, axum::Json(body)).into_response());
        }
        return Err(e);
    }
    let status = StatusCode::from_u16(o.status).unwrap_or(StatusCode::OK);
    Ok((
        status,
        axum::Json(json!({
            "_index": index, "_id": o.id, "_version": o.version, "result": o.result,
            "_shards": shards(), "_seq_no": o.seq_no, "_primary_term": 1,
        })),
    )
        .into_response())
}

/// `PUT|POST /{index}/_doc[/{id}]`, `PUT /{index}/_create/{id}`.
pub(super) async fn put_doc(
    state: &AppState,
    os: &Arc<OpenSearch>,
    index: &str,
    id: Option<String>,
    req: Req,
) -> Result<Response, ApiError> {
    check_name(index)?;
    let create = req.segs.get(1).map(String::as_str) == Some("_create")
        || req.param("op_type") == Some("create");
    let source = json_body(req.body, state.options.max_body_bytes)
        .await?
        .ok_or_else(|| parse_error("the document is missing: send a JSON object"))?;
    let source = Value::Object(source);
    let op = if create {
        DocOp::Create { id, source }
    } else {
        DocOp::Index { id, source }
    };
    let mut out = run_ops(os, index, vec![op], true).await?;
    doc_response(index, out.remove(0))
}

/// `POST /{index}/_update/{id}` with `{"doc": {...}}`.
pub(super) async fn update_doc(
    state: &AppState,
    os: &Arc<OpenSearch>,
    index: &str,
    id: &str,
    req: Req,
) -> Result<Response, ApiError> {
    let body: Map<String, Value> = json_body(req.body, state.options.max_body_bytes)
        .await?
        .unwrap_or_default();
    let Some(doc) = body.get("doc") else {
        return Err(parse_error("an update needs a `doc` object"));
    };
    let op = DocOp::Update {
        id: id.to_string(),
        doc: doc.clone(),
        doc_as_upsert: body
            .get("doc_as_upsert")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        upsert: body.get("upsert").cloned(),
    };
    let mut out = run_ops(os, index, vec![op], false).await?;
    doc_response(index, out.remove(0))
}

/// `DELETE /{index}/_doc/{id}`.
pub(super) async fn delete_doc(
    os: &Arc<OpenSearch>,
    index: &str,
    id: &str,
) -> Result<Response, ApiError> {
    let mut out = run_ops(os, index, vec![DocOp::Delete { id: id.to_string() }], false).await?;
    let o = out.remove(0);
    let status = StatusCode::from_u16(o.status).unwrap_or(StatusCode::OK);
    Ok((
        status,
        axum::Json(json!({
            "_index": index, "_id": o.id, "_version": o.version, "result": o.result,
            "_shards": shards(), "_seq_no": o.seq_no, "_primary_term": 1,
        })),
    )
        .into_response())
}

/// `GET /{index}/_doc/{id}`.
pub(super) fn get_doc(c: &Collection, id: &str) -> Response {
    match c.get(id) {
        Some(d) => axum::Json(json!({
            "_index": c.name(), "_id": d.id, "_version": d.version, "_seq_no": d.seq_no,
            "_primary_term": 1, "found": true, "_source": d.source,
        }))
        .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"_index": c.name(), "_id": id, "found": false})),
        )
            .into_response(),
    }
}
