//! Amazon Bedrock runtime routes, as `boto3.client("bedrock-runtime", endpoint_url=...)` calls
//! them: `InvokeModel` and `InvokeModelWithResponseStream` with the DeepSeek-R1 body (`prompt`,
//! `max_tokens`, `stop` in; `choices[].text`, `stop_reason` out) or the Llama-style body that
//! OpenSearch's DeepSeek connector sends (`max_gen_len` in; `generation` and token counts out),
//! and `Converse`/`ConverseStream` with `reasoningContent`. Streams are AWS event-stream frames;
//! errors take Bedrock's shape before a stream and exception frames inside one.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Map, Value};
use thinkrag_llm::generate::{MAX_STOP_STRINGS, MAX_TOKENS_LIMIT};
use thinkrag_llm::{Generation, GenerationParams, Message, OwnedEvent, StopReason};

use crate::error::{ApiError, Flavor, Kind};
use crate::eventstream;
use crate::generation::{finished, relay, Job};
use crate::request::{self, Fields};
use crate::AppState;

const F: Flavor = Flavor::Bedrock;

/// A Bedrock runtime operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `InvokeModel`.
    Invoke,
    /// `InvokeModelWithResponseStream`.
    InvokeStream,
    /// `Converse`.
    Converse,
    /// `ConverseStream`.
    ConverseStream,
}

impl Op {
    /// The label in the request counters.
    pub fn label(self) -> &'static str {
        match self {
            Self::Invoke => "bedrock_invoke",
            Self::InvokeStream => "bedrock_invoke_stream",
            Self::Converse => "bedrock_converse",
            Self::ConverseStream => "bedrock_converse_stream",
        }
    }
}

/// `.../model/{modelId}/{operation}` on the raw (still percent-encoded) path, so an ARN's `%2F`
/// stays inside the id and an `endpoint_url` with a path prefix works; the id comes back decoded.
pub fn parse_path(path: &str) -> Option<(String, Op)> {
    let at = path.rfind("/model/")?;
    let rest = &path[at + "/model/".len()..];
    let (id, op) = rest.split_once('/')?;
    let op = match op {
        "invoke" => Op::Invoke,
        "invoke-with-response-stream" => Op::InvokeStream,
        "converse" => Op::Converse,
        "converse-stream" => Op::ConverseStream,
        _ => return None,
    };
    if id.is_empty() {
        return None;
    }
    Some((percent_decode(id), op))
}

/// Decodes `%XX` escapes (invalid ones are kept as written).
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs one operation; every response carries `x-amzn-RequestId`.
pub async fn handle(
    state: Arc<AppState>,
    op: Op,
    model: String,
    _headers: HeaderMap,
    body: Body,
) -> Response {
    let request_id = uuid_like();
    let result = match op {
        Op::Invoke | Op::InvokeStream => invoke(state, op == Op::InvokeStream, body).await,
        Op::Converse | Op::ConverseStream => {
            converse(state, op == Op::ConverseStream, model, body).await
        }
    };
    let mut response = result.unwrap_or_else(|e| e.into_response());
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-amzn-RequestId", v);
    }
    response
}

/// Which body dialect an `InvokeModel` request uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    /// `us.deepseek.r1-v1:0`: `max_tokens`, `stop`; `choices[].text` back (raw, with reasoning).
    DeepSeek,
    /// Meta Llama / Custom Model Import: `max_gen_len`; `generation` back (the answer).
    Llama,
}

async fn invoke(state: Arc<AppState>, stream: bool, body: Body) -> Result<Response, ApiError> {
    let obj = request::json_object(body, state.options.max_body_bytes, F).await?;
    let f = Fields::new(&obj, F, "");
    f.only(&[
        "prompt",
        "temperature",
        "top_p",
        "top_k",
        "max_tokens",
        "max_gen_len",
        "stop",
    ])?;
    let dialect = if f.get("max_gen_len").is_some() {
        if f.get("max_tokens").is_some() {
            return Err(f.bad(
                "max_gen_len",
                "give max_tokens (DeepSeek body) or max_gen_len (Llama body), not both",
            ));
        }
        Dialect::Llama
    } else {
        Dialect::DeepSeek
    };
    let prompt_text = f
        .string("prompt")?
        .ok_or_else(|| f.bad("prompt", "required key [prompt] not found"))?;
    let mut params = sampling(&state, &f, "temperature", "top_p")?;
    if let Some(k) = f.int_in("top_k", 0, 1_000_000)? {
        params.sampling.top_k = k as usize;
    }
    params.stop = f.stops("stop", MAX_STOP_STRINGS)?;
    let (max_field, requested) = match dialect {
        Dialect::DeepSeek => (
            "max_tokens",
            f.int_in("max_tokens", 1, MAX_TOKENS_LIMIT as i64)?,
        ),
        Dialect::Llama => (
            "max_gen_len",
            f.int_in("max_gen_len", 1, MAX_TOKENS_LIMIT as i64)?,
        ),
    };
    let prompt = state.encode_raw(F, prompt_text)?;
    params.max_tokens = state.max_tokens(F, prompt.len(), requested, max_field)?;
    let job = state.start(F, prompt, params)?;
    if stream {
        return Ok(invoke_stream(state, job, dialect));
    }
    let started = job.started;
    let g = job.finish(F).await?;
    let stop = stop_reason(&g);
    let body = match dialect {
        Dialect::DeepSeek => {
            json!({"choices": [{"text": state.raw_text(&g), "stop_reason": stop}]})
        }
        Dialect::Llama => json!({
            "generation": g.text,
            "prompt_token_count": g.usage.prompt_tokens,
            "generation_token_count": g.usage.completion_tokens,
            "stop_reason": stop,
            "reasoning": g.reasoning,
        }),
    };
    let mut r = axum::Json(body).into_response();
    let h = r.headers_mut();
    let latency = started.elapsed().as_millis();
    for (name, value) in [
        (
            "x-amzn-bedrock-input-token-count",
            g.usage.prompt_tokens.to_string(),
        ),
        (
            "x-amzn-bedrock-output-token-count",
            g.usage.completion_tokens.to_string(),
        ),
        ("x-amzn-bedrock-invocation-latency", latency.to_string()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
    Ok(r)
}

/// The model's defaults with temperature and top-p in Bedrock's ranges (both at most 1).
fn sampling(
    state: &AppState,
    f: &Fields,
    temperature: &str,
    top_p: &str,
) -> Result<GenerationParams, ApiError> {
    let mut params = state.engine.default_params();
    if let Some(t) = f.f64_in(temperature, 0.0, 1.0)? {
        params.sampling.temperature = t;
    }
    if let Some(p) = f.f64_in(top_p, 0.0, 1.0)? {
        if p == 0.0 {
            return Err(f.bad(
                top_p,
                "0 is not greater than 0: use temperature 0 for greedy decoding",
            ));
        }
        params.sampling.top_p = p;
    }
    Ok(params)
}

fn stop_reason(g: &Generation) -> &'static str {
    match g.stop_reason {
        Some(StopReason::Length) => "length",
        _ => "stop",
    }
}

fn stream_response(body: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/vnd.amazon.eventstream"),
            (
                HeaderName::from_static("x-amzn-bedrock-content-type"),
                "application/json",
            ),
        ],
        body,
    )
        .into_response()
}

/// An exception frame for a generation that ended badly inside a stream.
fn stream_error(e: &ApiError) -> Bytes {
    Bytes::from(eventstream::exception(e.stream_exception(), &e.message))
}

fn invoke_stream(state: Arc<AppState>, job: Job, dialect: Dialect) -> Response {
    let chunk = |fragment: Value| {
        let b64 = base64::engine::general_purpose::STANDARD.encode(fragment.to_string());
        Bytes::from(eventstream::event("chunk", &json!({ "bytes": b64 })))
    };
    let started = job.started;
    let mut first_byte: Option<u128> = None;
    let mut answered = false;
    let render = move |ev: OwnedEvent, _: &Job| -> Vec<Bytes> {
        let mut first = || *first_byte.get_or_insert_with(|| started.elapsed().as_millis());
        let text = |t: String| match dialect {
            Dialect::DeepSeek => json!({"choices": [{"text": t, "stop_reason": null}]}),
            Dialect::Llama => {
                json!({"generation": t, "prompt_token_count": null, "generation_token_count": null, "stop_reason": null})
            }
        };
        match ev {
            OwnedEvent::Reasoning(t) => {
                first();
                match dialect {
                    Dialect::DeepSeek => vec![chunk(text(t))],
                    // The Llama body's `generation` is the answer only.
                    Dialect::Llama => Vec::new(),
                }
            }
            OwnedEvent::Answer(t) => {
                first();
                let t = match dialect {
                    Dialect::DeepSeek if !answered => format!("</think>\n\n{t}"),
                    _ => t,
                };
                answered = true;
                vec![chunk(text(t))]
            }
            OwnedEvent::Done(g) => match finished(F, *g) {
                Ok(g) => {
                    let metrics = json!({
                        "inputTokenCount": g.usage.prompt_tokens,
                        "outputTokenCount": g.usage.completion_tokens,
                        "invocationLatency": started.elapsed().as_millis(),
                        "firstByteLatency": first(),
                    });
                    let mut out = Vec::new();
                    let last = match dialect {
                        Dialect::DeepSeek => {
                            let tail = if !answered && state.closed_thinking(&g) {
                                "</think>\n\n"
                            } else {
                                ""
                            };
                            json!({"choices": [{"text": tail, "stop_reason": stop_reason(&g)}],
                                   "amazon-bedrock-invocationMetrics": metrics})
                        }
                        Dialect::Llama => json!({
                            "generation": "",
                            "prompt_token_count": g.usage.prompt_tokens,
                            "generation_token_count": g.usage.completion_tokens,
                            "stop_reason": stop_reason(&g),
                            "amazon-bedrock-invocationMetrics": metrics,
                        }),
                    };
                    out.push(chunk(last));
                    out
                }
                Err(e) => vec![stream_error(&e)],
            },
            OwnedEvent::Failed(message) => {
                vec![stream_error(&ApiError::new(F, Kind::Engine, message))]
            }
        }
    };
    stream_response(relay(job, render, Vec::new(), None))
}

/// The text of a Converse message's content blocks; `reasoningContent` blocks (echoed back by
/// clients) are dropped, as the R1 template drops earlier reasoning.
fn blocks_text(blocks: &[Value], field: &str) -> Result<String, ApiError> {
    let mut out = String::new();
    for (i, b) in blocks.iter().enumerate() {
        let Value::Object(b) = b else {
            return Err(request::bad(
                F,
                &format!("{field}/{i}"),
                "expected a content block object",
            ));
        };
        if let Some(t) = b.get("text") {
            match t {
                Value::String(t) => out.push_str(t),
                _ => {
                    return Err(request::bad(
                        F,
                        &format!("{field}/{i}/text"),
                        "expected a string",
                    ))
                }
            }
        } else if b.contains_key("reasoningContent") {
            continue;
        } else {
            let kind = b.keys().find(|k| *k != "type").cloned().unwrap_or_default();
            return Err(request::bad(
                F,
                &format!("{field}/{i}"),
                format!("{kind} blocks are not supported: this model reads text only"),
            ));
        }
    }
    Ok(out)
}

fn converse_messages(obj: &Map<String, Value>) -> Result<Vec<Message>, ApiError> {
    let f = Fields::new(obj, F, "");
    let mut out = Vec::new();
    if let Some(system) = f.array("system")? {
        let text = blocks_text(system, "system")?;
        if !text.is_empty() {
            out.push(Message::system(text));
        }
    }
    let list = f
        .array("messages")?
        .ok_or_else(|| f.bad("messages", "required key [messages] not found"))?;
    if list.is_empty() {
        return Err(f.bad("messages", "must hold at least one message"));
    }
    for (i, m) in list.iter().enumerate() {
        let field = format!("messages/{i}");
        let Value::Object(m) = m else {
            return Err(request::bad(
                F,
                &field,
                "expected an object with role and content",
            ));
        };
        let content = match m.get("content") {
            Some(Value::Array(blocks)) => blocks_text(blocks, &format!("{field}/content"))?,
            _ => {
                return Err(request::bad(
                    F,
                    &format!("{field}/content"),
                    "expected an array of content blocks",
                ))
            }
        };
        out.push(match m.get("role").and_then(Value::as_str) {
            Some("user") => Message::user(content),
            Some("assistant") => Message::assistant(content),
            Some("system") => Message::system(content),
            other => {
                return Err(request::bad(
                    F,
                    &format!("{field}/role"),
                    format!("{other:?} is not user or assistant"),
                ))
            }
        });
    }
    Ok(out)
}

async fn converse(
    state: Arc<AppState>,
    stream: bool,
    _model: String,
    body: Body,
) -> Result<Response, ApiError> {
    let obj = request::json_object(body, state.options.max_body_bytes, F).await?;
    let f = Fields::new(&obj, F, "");
    if f.get("toolConfig").is_some() {
        return Err(f.bad(
            "toolConfig",
            "tool use is not supported by the DeepSeek-R1 distills",
        ));
    }
    let msgs = converse_messages(&obj)?;
    let (mut params, requested) = match f.object("inferenceConfig")? {
        Some(cfg) => {
            let c = Fields::new(cfg, F, "inferenceConfig.");
            let mut p = sampling(&state, &c, "temperature", "topP")?;
            p.stop = c.stops("stopSequences", MAX_STOP_STRINGS)?;
            (p, c.int_in("maxTokens", 1, MAX_TOKENS_LIMIT as i64)?)
        }
        None => (state.engine.default_params(), None),
    };
    // Model-specific fields, as Bedrock passes them to the model: thinkrag's extras.
    if let Some(extra) = f.object("additionalModelRequestFields")? {
        let x = Fields::new(extra, F, "additionalModelRequestFields.");
        x.only(&[
            "top_k",
            "ignore_eos",
            "max_thinking_tokens",
            "reasoning_effort",
        ])?;
        if let Some(k) = x.int_in("top_k", 0, 1_000_000)? {
            params.sampling.top_k = k as usize;
        }
        if let Some(b) = x.boolean("ignore_eos")? {
            params.ignore_eos = b;
        }
        if let Some(e) = x.string("reasoning_effort")? {
            params.max_thinking_tokens = crate::generation::effort_budget(e).ok_or_else(|| {
                x.bad(
                    "reasoning_effort",
                    "not one of none, minimal, low, medium, high, xhigh, max",
                )
            })?;
        }
        if let Some(b) = x.int_in("max_thinking_tokens", 0, MAX_TOKENS_LIMIT as i64)? {
            params.max_thinking_tokens = Some(b as usize);
        }
    }
    let prompt = state
        .engine
        .encode_messages(&msgs)
        .map_err(|e| ApiError::from_engine(F, &e))?;
    params.max_tokens =
        state.max_tokens(F, prompt.len(), requested, "inferenceConfig.maxTokens")?;
    let job = state.start(F, prompt, params)?;
    if stream {
        return Ok(converse_stream(job));
    }
    let started = job.started;
    let g = job.finish(F).await?;
    // The answer's text block first: OpenSearch reads content[0].text.
    let mut content = vec![json!({"text": g.text})];
    if !g.reasoning.is_empty() {
        content.push(json!({"reasoningContent": {"reasoningText": {"text": g.reasoning}}}));
    }
    Ok(axum::Json(json!({
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": converse_stop(&g),
        "usage": {
            "inputTokens": g.usage.prompt_tokens,
            "outputTokens": g.usage.completion_tokens,
            "totalTokens": g.usage.prompt_tokens + g.usage.completion_tokens,
            "cacheReadInputTokens": g.usage.cached_prompt_tokens,
        },
        "metrics": {"latencyMs": started.elapsed().as_millis()},
    }))
    .into_response())
}

fn converse_stop(g: &Generation) -> &'static str {
    match g.stop_reason {
        Some(StopReason::Length) => "max_tokens",
        Some(StopReason::Stop) => "stop_sequence",
        _ => "end_turn",
    }
}

fn converse_stream(job: Job) -> Response {
    let ev = |ty: &str, payload: Value| Bytes::from(eventstream::event(ty, &payload));
    let first = vec![ev("messageStart", json!({"role": "assistant"}))];
    let started: Instant = job.started;
    // Block 0 is the reasoning, block 1 the answer.
    let mut reasoning_open = false;
    let mut answer_open = false;
    let render =
        move |e: OwnedEvent, _: &Job| -> Vec<Bytes> {
            let mut out = Vec::new();
            match e {
                OwnedEvent::Reasoning(t) => {
                    reasoning_open = true;
                    out.push(ev(
                        "contentBlockDelta",
                        json!({"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": t}}}),
                    ));
                }
                OwnedEvent::Answer(t) => {
                    if reasoning_open {
                        out.push(ev("contentBlockStop", json!({"contentBlockIndex": 0})));
                        reasoning_open = false;
                    }
                    answer_open = true;
                    out.push(ev(
                        "contentBlockDelta",
                        json!({"contentBlockIndex": 1, "delta": {"text": t}}),
                    ));
                }
                OwnedEvent::Done(g) => match finished(F, *g) {
                    Ok(g) => {
                        if reasoning_open {
                            out.push(ev("contentBlockStop", json!({"contentBlockIndex": 0})));
                        }
                        if !answer_open {
                            // Clients assembling content[] find a text block even for an empty answer.
                            out.push(ev(
                                "contentBlockDelta",
                                json!({"contentBlockIndex": 1, "delta": {"text": ""}}),
                            ));
                        }
                        out.push(ev("contentBlockStop", json!({"contentBlockIndex": 1})));
                        out.push(ev("messageStop", json!({"stopReason": converse_stop(&g)})));
                        out.push(ev("metadata", json!({
                        "usage": {
                            "inputTokens": g.usage.prompt_tokens,
                            "outputTokens": g.usage.completion_tokens,
                            "totalTokens": g.usage.prompt_tokens + g.usage.completion_tokens,
                        },
                        "metrics": {"latencyMs": started.elapsed().as_millis()},
                    })));
                    }
                    Err(e) => out.push(stream_error(&e)),
                },
                OwnedEvent::Failed(message) => {
                    out.push(stream_error(&ApiError::new(F, Kind::Engine, message)))
                }
            }
            out
        };
    stream_response(relay(job, render, first, None))
}

/// A random request id in UUID form.
fn uuid_like() -> String {
    let x: u128 = rand::random();
    let h = format!("{x:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_are_decoded_from_the_raw_path_with_any_prefix() {
        assert_eq!(
            parse_path("/model/us.deepseek.r1-v1%3A0/invoke"),
            Some(("us.deepseek.r1-v1:0".into(), Op::Invoke))
        );
        let arn = "/bedrock/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Aimported-model%2Fabc/converse-stream";
        assert_eq!(
            parse_path(arn),
            Some((
                "arn:aws:bedrock:us-east-1:1:imported-model/abc".into(),
                Op::ConverseStream
            ))
        );
        assert_eq!(parse_path("/model//invoke"), None);
        assert_eq!(parse_path("/model/x/other"), None);
        assert_eq!(parse_path("/v1/models"), None);
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }
}
