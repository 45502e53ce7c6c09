//! The bridge from HTTP handlers to the engine's scheduler: shared request semantics (how many
//! tokens may be generated, raw prompts, reasoning budgets), submission with a channel whose
//! closing cancels the sequence, and a relay that turns events into a response body and notices
//! when the client goes away.

use std::convert::Infallible;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use thinkrag_llm::generate::MAX_TOKENS_LIMIT;
use thinkrag_llm::{EventSink, Generation, GenerationParams, OwnedEvent};
use tokio::sync::mpsc;

use crate::error::{ApiError, Flavor, Kind};
use crate::AppState;

/// Delivers a sequence's events into a tokio channel; a dropped receiver cancels the sequence.
struct ChannelSink(mpsc::UnboundedSender<OwnedEvent>);

impl EventSink for ChannelSink {
    fn send(&mut self, event: OwnedEvent) -> ControlFlow<()> {
        match self.0.send(event) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// A submitted generation.
pub struct Job {
    /// Its events, ending with `Done` or `Failed`.
    pub rx: mpsc::UnboundedReceiver<OwnedEvent>,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// When it was submitted.
    pub started: Instant,
}

impl Job {
    /// Waits for the end and returns the whole generation.
    pub async fn finish(mut self, flavor: Flavor) -> Result<Generation, ApiError> {
        while let Some(ev) = self.rx.recv().await {
            match ev {
                OwnedEvent::Done(g) => return finished(flavor, *g),
                OwnedEvent::Failed(message) => {
                    return Err(ApiError::new(flavor, Kind::Engine, message))
                }
                _ => {}
            }
        }
        Err(ApiError::new(
            flavor,
            Kind::Engine,
            "the generation ended without a result",
        ))
    }
}

/// A finished generation, or the error that a server-side cancellation (shutdown) means.
pub fn finished(flavor: Flavor, g: Generation) -> Result<Generation, ApiError> {
    if g.stop_reason == Some(thinkrag_llm::StopReason::Cancelled) {
        return Err(ApiError::new(
            flavor,
            Kind::Unavailable,
            "the server is shutting down: the generation was cancelled",
        ));
    }
    Ok(g)
}

impl AppState {
    /// Submits a generation after `prompt`; bad parameters, a prompt too long and a full queue
    /// fail here, before any response is sent.
    pub fn start(
        &self,
        flavor: Flavor,
        prompt: Vec<u32>,
        params: GenerationParams,
    ) -> Result<Job, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let prompt_tokens = prompt.len();
        self.scheduler
            .submit(prompt, params, Box::new(ChannelSink(tx)))
            .map_err(|e| ApiError::from_engine(flavor, &e))?;
        Ok(Job {
            rx,
            prompt_tokens,
            started: Instant::now(),
        })
    }

    /// How many tokens a request may generate: what it asked for (`field`), which together with
    /// the prompt must fit the context window (400 `context_length_exceeded` otherwise, as
    /// OpenAI answers), or by default the model's default, cut to what the window has room for.
    pub fn max_tokens(
        &self,
        flavor: Flavor,
        prompt_tokens: usize,
        requested: Option<i64>,
        field: &str,
    ) -> Result<usize, ApiError> {
        let window = self.engine.context_window();
        if prompt_tokens >= window {
            return Err(ApiError::from_engine(
                flavor,
                &thinkrag_llm::Error::PromptTooLong {
                    prompt_tokens,
                    context_window: window,
                },
            ));
        }
        let room = window - prompt_tokens;
        match requested {
            Some(n) => {
                let n = n.max(1) as usize;
                if n > room {
                    let mut e = ApiError::new(
                        flavor,
                        Kind::ContextLength,
                        format!(
                            "this server's context window is {window} tokens, but the prompt is \
                             {prompt_tokens} tokens and {field} asks for {n} more: ask for at most \
                             {room}, or shorten the prompt"
                        ),
                    );
                    e.param = Some(field.to_string());
                    return Err(e);
                }
                Ok(n)
            }
            None => Ok(self
                .engine
                .default_params()
                .max_tokens
                .min(room)
                .min(MAX_TOKENS_LIMIT)),
        }
    }

    /// Encodes a raw prompt (`/v1/completions`, Bedrock `invoke`): control tokens written in it
    /// stay control tokens; ASCII and mojibake lookalikes of the DeepSeek markup are mapped to
    /// the real tokens; one BOS at the start; and a prompt that ends at `<｜Assistant｜>` gets the
    /// `<think>\n` the chat template would add, as DeepSeek advises, so reasoning is told apart.
    pub fn encode_raw(&self, flavor: Flavor, prompt: &str) -> Result<Vec<u32>, ApiError> {
        let text = normalize_markup(prompt);
        let tokenizer = self.engine.tokenizer();
        let mut ids = tokenizer
            .encode(&text)
            .map_err(|e| ApiError::from_engine(flavor, &e))?;
        let assistant = tokenizer.inner().token_to_id("<｜Assistant｜>");
        if let (Some(a), Some(open)) = (assistant, tokenizer.special().think_open) {
            if ids.last() == Some(&a) {
                ids.push(open);
                ids.extend(
                    tokenizer
                        .encode("\n")
                        .map_err(|e| ApiError::from_engine(flavor, &e))?,
                );
            }
        }
        Ok(tokenizer.with_single_bos(ids))
    }

    /// The text of a raw continuation as the hosted APIs return it: the reasoning, `</think>`,
    /// a blank line, the answer (reasoning and `</think>` only when the model reasoned).
    pub fn raw_text(&self, g: &Generation) -> String {
        if self.closed_thinking(g) {
            format!("{}</think>\n\n{}", g.reasoning, g.text)
        } else {
            format!("{}{}", g.reasoning, g.text)
        }
    }

    /// Whether the generation wrote (or was forced to write) `</think>`.
    pub fn closed_thinking(&self, g: &Generation) -> bool {
        let close = self.engine.tokenizer().special().think_close;
        close.is_some_and(|c| g.tokens.contains(&c))
    }
}

/// Maps lookalikes of DeepSeek's markup to the real thing: ASCII `|` for the full-width `｜`
/// (AWS's own Python sample writes `<|User|>`), and the UTF-8-read-as-cp1252 mojibake of `｜` and
/// `▁` that copying from web pages produces (`<ï½œbeginâ–ofâ–sentenceï½œ>`, seed 000).
pub fn normalize_markup(prompt: &str) -> String {
    let mut s = prompt
        .replace("ï½œ", "｜")
        .replace("â–\u{81}", "▁")
        .replace("â–", "▁");
    for name in [
        "begin▁of▁sentence",
        "end▁of▁sentence",
        "User",
        "Assistant",
        "tool▁calls▁begin",
        "tool▁calls▁end",
    ] {
        let real = format!("<｜{name}｜>");
        // ASCII bars, and `_` typed for the `▁` that keyboards lack.
        let underscored = name.replace('▁', "_");
        for lookalike in [
            format!("<|{name}|>"),
            format!("<|{underscored}|>"),
            format!("<｜{underscored}｜>"),
        ] {
            s = s.replace(&lookalike, &real);
        }
    }
    s
}

/// What the thinking budget is for OpenAI's `reasoning_effort` (and Ollama's `reasoning.effort`):
/// `none` closes the reasoning at once, `high` and above leave it unlimited.
pub fn effort_budget(effort: &str) -> Option<Option<usize>> {
    Some(match effort {
        "none" => Some(0),
        "minimal" => Some(128),
        "low" => Some(512),
        "medium" => Some(2048),
        "high" | "xhigh" | "max" => None,
        _ => return None,
    })
}

/// Relays a job's events into a streaming response body through `render`, which turns each
/// event into zero or more body chunks. While nothing arrives for `keepalive`, `ping` (if any)
/// is sent. When the client goes away the body is dropped, the relay ends, and with it the
/// receiver: the scheduler cancels the sequence within a step.
pub fn relay(
    mut job: Job,
    mut render: impl FnMut(OwnedEvent, &Job) -> Vec<Bytes> + Send + 'static,
    first: Vec<Bytes>,
    ping: Option<Bytes>,
) -> Body {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        for chunk in first {
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
        let keepalive = Duration::from_secs(15);
        loop {
            let ev = tokio::select! {
                ev = job.rx.recv() => ev,
                _ = tokio::time::sleep(keepalive), if ping.is_some() => {
                    if let Some(p) = &ping {
                        if tx.send(p.clone()).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                _ = tx.closed() => return,
            };
            let Some(ev) = ev else { return };
            let end = matches!(ev, OwnedEvent::Done(_) | OwnedEvent::Failed(_));
            for chunk in render(ev, &job) {
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
            if end {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookalike_markup_becomes_the_real_markup() {
        let real = "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>";
        for lookalike in [
            "<|begin▁of▁sentence|><|User|>Hi<|Assistant|>",
            "<|begin_of_sentence|><|User|>Hi<|Assistant|>",
            "<｜begin_of_sentence｜><｜User｜>Hi<｜Assistant｜>",
            // UTF-8 read as cp1252, as copying from some web pages gives.
            "<ï½œbeginâ–\u{81}ofâ–\u{81}sentenceï½œ><ï½œUserï½œ>Hi<ï½œAssistantï½œ>",
            "<ï½œbeginâ–ofâ–sentenceï½œ><ï½œUserï½œ>Hi<ï½œAssistantï½œ>",
        ] {
            assert_eq!(normalize_markup(lookalike), real, "{lookalike}");
        }
        assert_eq!(
            normalize_markup("<|end_of_sentence|>"),
            "<｜end▁of▁sentence｜>"
        );
        // Text that only resembles markup stays as it is.
        for text in ["a | b", "<|Users|>", "<User>", "x_of_y"] {
            assert_eq!(normalize_markup(text), text);
        }
    }
}
