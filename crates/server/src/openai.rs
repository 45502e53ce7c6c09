//! OpenAI-compatible routes: `/v1/chat/completions` (streamed and not), `/v1/completions`,
//! `/v1/embeddings` (float and base64) and `/v1/models`. Reasoning goes in both
//! `reasoning_content` (DeepSeek, llama.cpp) and `reasoning` (vLLM, Ollama); `content` is never
//! null; usage carries reasoning and cached prompt tokens.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Map, Value};
use thinkrag_llm::generate::{MAX_STOP_STRINGS, MAX_TOKENS_LIMIT};
use thinkrag_llm::{Generation, GenerationParams, Message, OwnedEvent, StopReason};

use crate::error::{ApiError, Flavor, Kind};
use crate::generation::{effort_budget, finished, relay, Job};
use crate::rag;
use crate::request::{self, Fields};
use crate::AppState;

const F: Flavor = Flavor::OpenAi;

/// `GET /v1/models`: the language model, and the embedder when one is loaded.
pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    let mut data = vec![model_object(&state, &state.options.model_id)];
    if let Some(id) = &state.embedder_id {
        data.push(model_object(&state, id));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{id}`.
pub async fn model(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let known = id == state.options.model_id || state.embedder_id.as_deref() == Some(id.as_str());
    if !known {
        return ApiError::new(
            F,
            Kind::NotFound,
            format!(
                "no model {id:?}: this server runs {:?} (any model name in a request maps to it)",
                state.options.model_id
            ),
        )
        .into_response();
    }
    axum::Json(model_object(&state, &id)).into_response()
}

fn model_object(state: &AppState, id: &str) -> Value {
    json!({"id": id, "object": "model", "created": state.created, "owned_by": "thinkrag"})
}

/// What an OpenAI request asks of the generation, beyond the prompt.
struct Options {
    params: GenerationParams,
    requested_max: Option<i64>,
    max_field: &'static str,
    stream: bool,
    include_usage: bool,
    include_reasoning: bool,
    model: String,
}

/// Reads the sampling and control fields shared by chat and completions.
fn options(f: &Fields, state: &AppState, chat: bool) -> Result<Options, ApiError> {
    let mut params = state.engine.default_params();
    let model = f
        .string("model")?
        .ok_or_else(|| {
            f.bad(
                "model",
                "required: name the model (any name maps to the loaded one)",
            )
        })?
        .to_string();
    if let Some(t) = f.f64_in("temperature", 0.0, 2.0)? {
        params.sampling.temperature = t;
    }
    if let Some(p) = f.f64_in("top_p", 0.0, 1.0)? {
        if p == 0.0 {
            return Err(f.bad(
                "top_p",
                "0 is not in the range (0, 1]: use temperature 0 for greedy decoding",
            ));
        }
        params.sampling.top_p = p;
    }
    // vLLM's -1 means off, as 0 does here.
    if let Some(k) = f.int_in("top_k", -1, 1_000_000)? {
        params.sampling.top_k = k.max(0) as usize;
    }
    if let Some(m) = f.f64_in("min_p", 0.0, 0.999_999)? {
        params.sampling.min_p = m;
    }
    if let Some(r) = f.f64_in("repetition_penalty", 0.1, 10.0)? {
        params.sampling.repetition_penalty = r;
    }
    for key in ["presence_penalty", "frequency_penalty"] {
        if let Some(p) = f.f64_in(key, -2.0, 2.0)? {
            if p != 0.0 {
                return Err(f.bad(
                    key,
                    format!("{p} is not supported (only 0): use repetition_penalty (0.1..=10, 1 = off) instead"),
                ));
            }
        }
    }
    if let Some(seed) = f.int_in("seed", i64::MIN, i64::MAX)? {
        params.sampling.seed = Some(seed as u64);
    }
    params.stop = f.stops("stop", MAX_STOP_STRINGS)?;
    if let Some(n) = f.int_in("n", 1, 128)? {
        if n != 1 {
            return Err(f.bad("n", format!("{n} choices are not supported: only n = 1")));
        }
    }
    if f.boolean("logprobs")? == Some(true) || f.get("top_logprobs").is_some_and(|v| v != 0) {
        return Err(f.bad("logprobs", "log probabilities are not supported"));
    }
    if chat {
        for key in ["tools", "functions"] {
            if f.array(key)?.is_some_and(|a| !a.is_empty()) {
                return Err(f.bad(
                    key,
                    "tool calling is not supported by the DeepSeek-R1 distills",
                ));
            }
        }
        if let Some(rf) = f.object("response_format")? {
            let ty = rf.get("type").and_then(Value::as_str).unwrap_or("text");
            if ty != "text" {
                return Err(f.bad(
                    "response_format",
                    format!("{ty:?} is not supported: only \"text\""),
                ));
            }
        }
    }
    if f.boolean("echo")? == Some(true) {
        return Err(f.bad("echo", "echoing the prompt is not supported"));
    }
    // The reasoning budget: reasoning_effort (OpenAI), reasoning.effort (Ollama), or a token count
    // under the names vLLM and llama.cpp use.
    let effort = match f.object("reasoning")? {
        Some(r) => Fields::new(r, F, "reasoning.").string("effort")?,
        None => None,
    };
    if let Some(e) = f.string("reasoning_effort")?.or(effort) {
        params.max_thinking_tokens = effort_budget(e).ok_or_else(|| {
            f.bad(
                "reasoning_effort",
                format!("{e:?} is not one of none, minimal, low, medium, high, xhigh, max"),
            )
        })?;
    }
    for key in [
        "thinking_budget_tokens",
        "thinking_token_budget",
        "max_thinking_tokens",
    ] {
        if let Some(b) = f.int_in(key, 0, MAX_TOKENS_LIMIT as i64)? {
            params.max_thinking_tokens = Some(b as usize);
        }
    }
    if let Some(b) = f.boolean("ignore_eos")? {
        params.ignore_eos = b;
    }
    let (requested_max, max_field) =
        match f.int_in("max_completion_tokens", 1, MAX_TOKENS_LIMIT as i64)? {
            Some(n) => (Some(n), "max_completion_tokens"),
            None => (
                f.int_in("max_tokens", 1, MAX_TOKENS_LIMIT as i64)?,
                "max_tokens",
            ),
        };
    let stream = f.boolean("stream")?.unwrap_or(false);
    let include_usage = match f.object("stream_options")? {
        Some(o) => Fields::new(o, F, "stream_options.")
            .boolean("include_usage")?
            .unwrap_or(false),
        None => false,
    };
    Ok(Options {
        params,
        requested_max,
        max_field,
        stream,
        include_usage,
        include_reasoning: f.boolean("include_reasoning")?.unwrap_or(true),
        model,
    })
}

/// The text of a message's `content`: a string, or an array of `{"type":"text","text":..}`
/// parts (OpenSearch always sends parts), joined.
fn content_text(v: Option<&Value>, field: &str) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (i, part) in parts.iter().enumerate() {
                let ty = part.get("type").and_then(Value::as_str).unwrap_or("text");
                match (ty, part.get("text")) {
                    ("text", Some(Value::String(t))) => out.push_str(t),
                    ("text", _) => {
                        return Err(request::bad(
                            F,
                            &format!("{field}[{i}].text"),
                            "a text part needs a string `text`",
                        ))
                    }
                    (other, _) => {
                        return Err(request::bad(
                            F,
                            &format!("{field}[{i}].type"),
                            format!(
                                "{other:?} parts are not supported: this model reads text only"
                            ),
                        ))
                    }
                }
            }
            Ok(out)
        }
        Some(other) => Err(request::bad(
            F,
            field,
            format!(
                "expected a string or an array of text parts, got {}",
                request::type_name(other)
            ),
        )),
    }
}

/// The conversation: system/developer, user and assistant turns. Reasoning echoed back in
/// assistant messages (`reasoning_content`, `reasoning`, or `<think>` in `content`) is dropped,
/// as the R1 chat template drops it.
fn messages(obj: &Map<String, Value>) -> Result<Vec<Message>, ApiError> {
    let f = Fields::new(obj, F, "");
    let list = f
        .array("messages")?
        .ok_or_else(|| f.bad("messages", "required: an array of messages"))?;
    if list.is_empty() {
        return Err(f.bad("messages", "must hold at least one message"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let field = format!("messages[{i}]");
        let Value::Object(m) = m else {
            return Err(request::bad(
                F,
                &field,
                "expected an object with `role` and `content`",
            ));
        };
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let text = content_text(m.get("content"), &format!("{field}.content"))?;
        out.push(match role {
            "system" | "developer" => Message::system(text),
            "user" => Message::user(text),
            "assistant" => {
                let answer = match text.rfind("</think>") {
                    Some(at) => text[at + "</think>".len()..].trim_start().to_string(),
                    None => text,
                };
                Message::assistant(answer)
            }
            other => {
                return Err(request::bad(
                    F,
                    &format!("{field}.role"),
                    format!("{other:?} is not supported: use system, developer, user or assistant"),
                ))
            }
        });
    }
    Ok(out)
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:024x}", rand::random::<u128>() >> 32)
}

fn finish_reason(g: &Generation) -> &'static str {
    match g.stop_reason {
        Some(StopReason::Length) => "length",
        _ => "stop",
    }
}

fn usage(g: &Generation) -> Value {
    let u = &g.usage;
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    })
}

/// llama.cpp's `timings` object.
pub(crate) fn timings(g: &Generation) -> Value {
    let (u, t) = (&g.usage, &g.timings);
    let computed = u.prompt_tokens - u.cached_prompt_tokens;
    json!({
        "cache_n": u.cached_prompt_tokens,
        "prompt_n": computed,
        "prompt_ms": t.prefill_ms,
        "prompt_per_second": t.prefill_tokens_per_s,
        "predicted_n": u.completion_tokens,
        "predicted_ms": t.decode_ms,
        "predicted_per_second": t.decode_tokens_per_s,
        "time_to_first_token_ms": t.time_to_first_token_ms,
    })
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// A job's events as an SSE response through `render`, after `first`, with a keep-alive comment
/// while nothing arrives (as DeepSeek's API sends while a request waits).
fn sse_stream(
    job: Job,
    render: impl FnMut(OwnedEvent, &Job) -> Vec<Bytes> + Send + 'static,
    first: Vec<Bytes>,
) -> Response {
    let body = relay(
        job,
        render,
        first,
        Some(Bytes::from_static(b": keep-alive\n\n")),
    );
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(state): State<Arc<AppState>>, body: Body) -> Response {
    chat_inner(state, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn chat_inner(state: Arc<AppState>, body: Body) -> Result<Response, ApiError> {
    let obj = request::json_object(body, state.options.max_body_bytes, F).await?;
    let f = Fields::new(&obj, F, "");
    let mut opts = options(&f, &state, true)?;
    let msgs = messages(&obj)?;
    let rag = rag_for_chat(&state, &obj, &opts.model, &msgs).await?;
    let prompt = match &rag {
        Some(p) => p.prompt.clone(),
        None => state
            .engine
            .encode_messages(&msgs)
            .map_err(|e| ApiError::from_engine(F, &e))?,
    };
    opts.params.max_tokens =
        state.max_tokens(F, prompt.len(), opts.requested_max, opts.max_field)?;
    let job = state.start(F, prompt, opts.params.clone())?;
    let id = new_id("chatcmpl");
    let created = now();
    if !opts.stream {
        let g = job.finish(F).await?;
        let mut message = json!({"role": "assistant", "content": g.text});
        if opts.include_reasoning {
            message["reasoning_content"] = json!(g.reasoning);
            message["reasoning"] = json!(g.reasoning);
        }
        let mut extra = json!({});
        if let Some(p) = &rag {
            let mut r = rag_sources(p);
            r["citations"] = p.citations_json(&g.text);
            extra["rag"] = r;
        }
        return Ok(axum::Json(merge(extra, json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": opts.model,
            "system_fingerprint": fingerprint(),
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(&g), "logprobs": null}],
            "usage": usage(&g),
            "timings": timings(&g),
        })))
        .into_response());
    }
    let chunk = {
        let (id, model) = (id.clone(), opts.model.clone());
        move |choices: Value| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "system_fingerprint": fingerprint(), "choices": choices})
        }
    };
    let mut opening = chunk(
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": null, "logprobs": null}]),
    );
    if let Some(p) = &rag {
        // The sources come first, before any token: the client knows what the answer rests on.
        opening["rag"] = rag_sources(p);
    }
    let first = vec![sse(&opening)];
    let mut answer_text = String::new();
    let (include_reasoning, include_usage) = (opts.include_reasoning, opts.include_usage);
    let render = move |ev: OwnedEvent, _: &Job| -> Vec<Bytes> {
        let delta = |d: Value| {
            sse(&chunk(
                json!([{"index": 0, "delta": d, "finish_reason": null, "logprobs": null}]),
            ))
        };
        match ev {
            OwnedEvent::Reasoning(t) if include_reasoning => {
                vec![delta(json!({"reasoning_content": t, "reasoning": t}))]
            }
            OwnedEvent::Reasoning(_) => Vec::new(),
            OwnedEvent::Answer(t) => {
                if rag.is_some() {
                    answer_text.push_str(&t);
                }
                vec![delta(json!({"content": t}))]
            }
            OwnedEvent::Done(g) => match finished(F, *g) {
                Ok(g) => {
                    let mut last = chunk(
                        json!([{"index": 0, "delta": {}, "finish_reason": finish_reason(&g), "logprobs": null}]),
                    );
                    last["timings"] = timings(&g);
                    if let Some(p) = &rag {
                        last["rag"] = json!({"citations": p.citations_json(&answer_text)});
                    }
                    let mut out = vec![sse(&last)];
                    if include_usage {
                        let mut u = chunk(json!([]));
                        u["usage"] = usage(&g);
                        out.push(sse(&u));
                    }
                    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
                    out
                }
                Err(e) => vec![sse(&e.openai_body())],
            },
            OwnedEvent::Failed(message) => {
                vec![sse(&ApiError::new(F, Kind::Engine, message).openai_body())]
            }
        }
    };
    Ok(sse_stream(job, render, first))
}

/// `a` with `b`'s keys added.
fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        for (k, v) in b {
            a.entry(k).or_insert(v);
        }
    }
    a
}

/// The `rag` extra of a response: the index, the numbered sources (with their text) and those
/// left out.
fn rag_sources(p: &rag::Prepared) -> Value {
    let mut sources = p.sources_json();
    if let Some(list) = sources.as_array_mut() {
        for (s, used) in list.iter_mut().zip(&p.built.sources) {
            s["text"] = json!(p.offered[used.rank - 1].text);
        }
    }
    json!({
        "index": p.offered.first().map(|o| o.index.clone()),
        "sources": sources,
        "left_out": p.left_out_json(),
    })
}

/// RAG through the chat API: asked for with `"rag": {"index": NAME, ...}` in the body (the
/// openai client's `extra_body`) or a model named `rag/NAME`. The last user message is the
/// question and the search query; earlier turns are the history. `None` for a plain chat.
async fn rag_for_chat(
    state: &Arc<AppState>,
    obj: &Map<String, Value>,
    model: &str,
    msgs: &[Message],
) -> Result<Option<rag::Prepared>, ApiError> {
    let from_model = model.strip_prefix("rag/").filter(|s| !s.is_empty());
    let cfg = match obj.get("rag") {
        None | Some(Value::Null) if from_model.is_none() => return Ok(None),
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(other) => {
            return Err(request::bad(
                F,
                "rag",
                format!(
                    "expected an object like {{\"index\": \"docs\", \"k\": 4}}, got {}",
                    request::type_name(other)
                ),
            ))
        }
    };
    let f = Fields::new(&cfg, F, "rag.");
    f.only(&[
        "index",
        "k",
        "fields",
        "search_pipeline",
        "context_size",
        "mode",
    ])?;
    let index = match (f.string("index")?, from_model) {
        (Some(i), _) => i.to_string(),
        (None, Some(m)) => m.to_string(),
        (None, None) => {
            return Err(f.bad(
                "index",
                "required: the index to answer from (or use the model name rag/INDEX)",
            ))
        }
    };
    let k = f.int_in("k", 1, 100)?.unwrap_or(4) as usize;
    let mode: thinkrag_docstore::SearchMode = match f.string("mode")? {
        Some(m) => m.parse().map_err(|e| f.bad("mode", e))?,
        None => thinkrag_docstore::SearchMode::Vector,
    };
    let context_size = f.int_in("context_size", 1, 100)?.map(|n| n as usize);
    let mut fields: Option<Vec<String>> = match f.array("fields")? {
        Some(a) => Some(
            a.iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| f.bad("fields", "expected an array of field names"))?,
        ),
        None => None,
    };
    let mounted = state.stores.get(&index).cloned();
    let os =
        match (state.opensearch.clone(), &mounted) {
            (Some(os), _) => Some(os),
            (None, Some(_)) => None,
            (None, None) => return Err(ApiError::new(
                F,
                Kind::Invalid,
                "RAG needs the server's indices: start `thinkrag serve` with --embedder or --store",
            )),
        };
    let (mut system, mut instructions) = (None, None);
    if let Some(name) = f.string("search_pipeline")? {
        let body = os
            .as_ref()
            .ok_or_else(|| f.bad("search_pipeline", "this server keeps no search pipelines"))?
            .meta
            .pipeline(name)
            .ok_or_else(|| f.bad("search_pipeline", format!("no search pipeline {name:?}")))?;
        if let Some(cfg) = crate::opensearch::rag_processor(&body) {
            system = cfg
                .get("system_prompt")
                .and_then(Value::as_str)
                .map(str::to_string);
            instructions = cfg
                .get("user_instructions")
                .and_then(Value::as_str)
                .map(str::to_string);
            if fields.is_none() {
                fields = crate::opensearch::context_fields(&cfg);
            }
        }
    }
    let Some((last, history)) = msgs.split_last() else {
        return Err(request::bad(
            F,
            "messages",
            "must hold at least one message",
        ));
    };
    if last.role != thinkrag_llm::Role::User || last.content.trim().is_empty() {
        return Err(request::bad(
            F,
            "messages",
            "with rag, the last message must be the user's question",
        ));
    }
    let question = last.content.clone();
    let q = question.clone();
    let state2 = Arc::clone(state);
    let sources = tokio::task::spawn_blocking(move || match (mounted, os) {
        (Some(store), _) => rag::retrieve_from_store(&state2, &index, store.as_ref(), &q, k, mode),
        (None, Some(os)) => {
            crate::opensearch::retrieve(&os, &index, &q, k, mode, fields.as_deref())
        }
        (None, None) => unreachable!("checked above: a store or the indices"),
    })
    .await
    .map_err(|e| ApiError::new(F, Kind::Engine, e.to_string()))?
    .map_err(|mut e| {
        e.flavor = F;
        e.param = Some("rag.index".into());
        e
    })?;
    let req = rag::RagRequest {
        question,
        sources,
        system,
        instructions,
        context_size,
        history: history.to_vec(),
    };
    rag::prepare(state, F, req).map(Some)
}

/// `POST /v1/completions`: the prompt as written (control tokens included; see
/// [`AppState::encode_raw`]), the raw continuation back (reasoning, `</think>`, answer).
pub async fn completions(State(state): State<Arc<AppState>>, body: Body) -> Response {
    completions_inner(state, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions_inner(state: Arc<AppState>, body: Body) -> Result<Response, ApiError> {
    let obj = request::json_object(body, state.options.max_body_bytes, F).await?;
    let f = Fields::new(&obj, F, "");
    let mut opts = options(&f, &state, false)?;
    let prompt_text = match f.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        Some(Value::Array(_)) => {
            return Err(f.bad("prompt", "only one prompt string per request is supported"))
        }
        Some(other) => {
            return Err(f.bad(
                "prompt",
                format!("expected a string, got {}", request::type_name(other)),
            ))
        }
        None => return Err(f.bad("prompt", "required")),
    };
    let prompt = state.encode_raw(F, &prompt_text)?;
    // OpenAI's default for this route is 16 tokens.
    let requested = opts.requested_max.or(Some(16));
    opts.params.max_tokens = state.max_tokens(F, prompt.len(), requested, opts.max_field)?;
    let job = state.start(F, prompt, opts.params.clone())?;
    let id = new_id("cmpl");
    let created = now();
    if !opts.stream {
        let g = job.finish(F).await?;
        return Ok(axum::Json(json!({
            "id": id, "object": "text_completion", "created": created, "model": opts.model,
            "system_fingerprint": fingerprint(),
            "choices": [{"index": 0, "text": state.raw_text(&g), "finish_reason": finish_reason(&g), "logprobs": null}],
            "usage": usage(&g),
            "timings": timings(&g),
        }))
        .into_response());
    }
    let chunk = {
        let (id, model) = (id.clone(), opts.model.clone());
        move |text: &str, finish: Option<&str>| {
            sse(
                &json!({"id": id, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}]}),
            )
        }
    };
    let include_usage = opts.include_usage;
    let mut answered = false;
    let st = Arc::clone(&state);
    let render = move |ev: OwnedEvent, _: &Job| -> Vec<Bytes> {
        match ev {
            OwnedEvent::Reasoning(t) => vec![chunk(&t, None)],
            OwnedEvent::Answer(t) => {
                let text = if answered {
                    t
                } else {
                    format!("</think>\n\n{t}")
                };
                answered = true;
                vec![chunk(&text, None)]
            }
            OwnedEvent::Done(g) => match finished(F, *g) {
                Ok(g) => {
                    let mut out = Vec::new();
                    if !answered && st.closed_thinking(&g) {
                        out.push(chunk("</think>\n\n", None));
                    }
                    out.push(chunk("", Some(finish_reason(&g))));
                    if include_usage {
                        out.push(sse(&json!({"id": new_id("cmpl"), "object": "text_completion", "created": created,
                                             "model": "", "choices": [], "usage": usage(&g)})));
                    }
                    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
                    out
                }
                Err(e) => vec![sse(&e.openai_body())],
            },
            OwnedEvent::Failed(message) => {
                vec![sse(&ApiError::new(F, Kind::Engine, message).openai_body())]
            }
        }
    };
    Ok(sse_stream(job, render, Vec::new()))
}

/// `POST /v1/embeddings`: text inputs (a string or an array of strings), vectors as floats or as
/// base64 of little-endian f32 (what the openai client asks for by default).
pub async fn embeddings(State(state): State<Arc<AppState>>, body: Body) -> Response {
    embeddings_inner(state, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn embeddings_inner(state: Arc<AppState>, body: Body) -> Result<Response, ApiError> {
    let obj = request::json_object(body, state.options.max_body_bytes, F).await?;
    let f = Fields::new(&obj, F, "");
    let Some(embedder) = state.embedder.clone() else {
        return Err(ApiError::new(
            F,
            Kind::NotFound,
            "this server has no embedding model: start it with --embedder (e.g. bge-base-en-v1.5) or --index",
        ));
    };
    let model = f.string("model")?.unwrap_or_default().to_string();
    let token_ids = || {
        f.bad(
            "input",
            "token ids are not accepted (they would be in the client's tokenizer, not this model's): \
             send text (LangChain's OpenAIEmbeddings: check_embedding_ctx_length=False)",
        )
    };
    let inputs: Vec<String> = match f.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.is_empty() => return Err(f.bad("input", "must not be empty")),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(_) | Value::Array(_) => Err(token_ids()),
                other => Err(request::bad(
                    F,
                    &format!("input[{i}]"),
                    format!("expected a string, got {}", request::type_name(other)),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(f.bad(
                "input",
                format!(
                    "expected a string or an array of strings, got {}",
                    request::type_name(other)
                ),
            ))
        }
        None => return Err(f.bad("input", "required")),
    };
    if inputs.len() > 2048 {
        return Err(f.bad(
            "input",
            format!("{} inputs, at most 2048 per request", inputs.len()),
        ));
    }
    if let Some(i) = inputs.iter().position(String::is_empty) {
        return Err(request::bad(F, &format!("input[{i}]"), "must not be empty"));
    }
    let base64 = match f.string("encoding_format")? {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(f.bad(
                "encoding_format",
                format!("{other:?} is not float or base64"),
            ))
        }
    };
    let dim = embedder.dim();
    if let Some(d) = f.int_in("dimensions", 1, 1 << 16)? {
        if d as usize != dim {
            return Err(f.bad(
                "dimensions",
                format!("{d} differs from this model's {dim}: omit it or send {dim}"),
            ));
        }
    }
    // Embedding is CPU work: off the async threads.
    let (vectors, tokens) = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let tokens: usize = inputs
            .iter()
            .map(|t| embedder.count_tokens(t).unwrap_or(0))
            .sum();
        let out = embedder
            .embed_passages(&inputs)
            .map_err(|e| e.to_string())?;
        Ok((out.vectors, tokens))
    })
    .await
    .map_err(|e| ApiError::new(F, Kind::Engine, format!("embedding failed: {e}")))?
    .map_err(|e| ApiError::new(F, Kind::Engine, format!("embedding failed: {e}")))?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let model = if model.is_empty() {
        state.embedder_id.clone().unwrap_or_default()
    } else {
        model
    };
    Ok(axum::Json(json!({
        "object": "list", "model": model, "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn fingerprint() -> String {
    format!("thinkrag-{}", env!("CARGO_PKG_VERSION"))
}
