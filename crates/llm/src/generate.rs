//! Generation parameters and results: what a caller asks for (sampling, stops, token limits, a
//! thinking budget) and what it gets back (reasoning apart from the answer, why it stopped, token
//! counts and timings), in the shapes of the hosted R1 APIs (`stop` | `length`).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sampling::SamplingParams;

/// The most tokens one generation may produce (DeepSeek evaluated R1 with up to 32,768).
pub const MAX_TOKENS_LIMIT: usize = 32_768;
/// The most stop strings one generation may have (as the hosted API allows).
pub const MAX_STOP_STRINGS: usize = 10;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    /// How tokens are drawn.
    pub sampling: SamplingParams,
    /// Most tokens to generate, reasoning included. 1..=32768, and never past the context window.
    pub max_tokens: usize,
    /// Up to 10 strings that end generation; they never appear in the output.
    pub stop: Vec<String>,
    /// End the reasoning after this many tokens by feeding `</think>`, so the model answers.
    pub max_thinking_tokens: Option<usize>,
    /// Never end the turn: end-of-sequence tokens are never sampled, so generation runs to
    /// `max_tokens` or a stop string (for benchmarks, as llama.cpp's and vLLM's `ignore_eos`).
    #[serde(default)]
    pub ignore_eos: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_tokens: 4096,
            stop: Vec::new(),
            max_thinking_tokens: None,
            ignore_eos: false,
        }
    }
}

impl GenerationParams {
    /// Rejects out-of-range values with the valid range in the message.
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if !(1..=MAX_TOKENS_LIMIT).contains(&self.max_tokens) {
            return Err(Error::invalid(
                "max_tokens",
                self.max_tokens,
                format!("1..={MAX_TOKENS_LIMIT}"),
            ));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(Error::invalid(
                "stop",
                format!("{} strings", self.stop.len()),
                format!("at most {MAX_STOP_STRINGS} stop strings"),
            ));
        }
        if let Some(s) = self.stop.iter().find(|s| s.is_empty() || s.len() > 1000) {
            return Err(Error::invalid(
                "stop",
                format!("{s:?}"),
                "non-empty strings of at most 1000 bytes",
            ));
        }
        if let Some(n) = self.max_thinking_tokens {
            if n > MAX_TOKENS_LIMIT {
                return Err(Error::invalid(
                    "max_thinking_tokens",
                    n,
                    format!("0..={MAX_TOKENS_LIMIT}"),
                ));
            }
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopReason {
    /// The model ended its turn (an end-of-sequence token).
    Eos,
    /// A stop string appeared ([`Generation::stop_string`] says which).
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
    /// The caller stopped it (or went away).
    Cancelled,
}

impl StopReason {
    /// The precise name (`eos`, `stop`, `length`, `cancelled`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eos => "eos",
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
        }
    }

    /// The name hosted APIs use (`finish_reason` of OpenAI, `stop_reason` of Bedrock's DeepSeek
    /// body): `stop` for the end of the turn and for a stop string alike, `length`, `cancelled`.
    pub fn finish_reason(self) -> &'static str {
        match self {
            Self::Eos | Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Token counts of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Of those, how many were already in the KV cache (a shared prefix of an earlier turn) and
    /// were not computed again.
    pub cached_prompt_tokens: usize,
    /// Tokens of reasoning, `</think>` included.
    pub reasoning_tokens: usize,
    /// Tokens of the answer (EOS included when the model ended its turn).
    pub answer_tokens: usize,
    /// `reasoning_tokens + answer_tokens`.
    pub completion_tokens: usize,
}

/// How long the phases took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Computing the prompt (its uncached part).
    pub prefill_ms: f64,
    /// Prompt tokens computed per second.
    pub prefill_tokens_per_s: f64,
    /// From the call to the first generated token.
    pub time_to_first_token_ms: f64,
    /// From the first generated token to the last.
    pub decode_ms: f64,
    /// Generated tokens per second after the first.
    pub decode_tokens_per_s: f64,
    /// The whole call.
    pub total_ms: f64,
}

/// The result of one generation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// The reasoning (inside `<think>`), without the tags.
    pub reasoning: String,
    /// The answer after `</think>`.
    pub text: String,
    /// Why it ended.
    pub stop_reason: Option<StopReason>,
    /// The stop string that ended it, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_string: Option<String>,
    /// Token counts.
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
    /// Every token appended after the prompt, in order (forced `</think>` included).
    #[serde(skip)]
    pub tokens: Vec<u32>,
}

impl Generation {
    /// The assistant turn as the chat template expects it back: reasoning, `</think>`, answer. The
    /// template keeps only what follows `</think>`, so reasoning is never fed to the next turn.
    pub fn assistant_content(&self) -> String {
        format!("{}</think>{}", self.reasoning, self.text)
    }
}

/// A generation as thinkrag's JSON reports it (`thinkrag generate --json`, the `done` event of
/// `--jsonl`, the generated part of `ask --json`): the reasoning and the answer apart, the stop
/// reason both as hosted APIs name it and precisely, usage and timings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationReport {
    /// The reasoning, without the tags.
    pub reasoning: String,
    /// The answer.
    pub text: String,
    /// `stop` (end of turn or a stop string), `length` or `cancelled`, as hosted APIs say.
    pub stop_reason: Option<String>,
    /// `eos`, `stop`, `length` or `cancelled`.
    pub stop_cause: Option<String>,
    /// The stop string that ended the text.
    pub stop_string: Option<String>,
    /// Token counts.
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
}

impl From<&Generation> for GenerationReport {
    fn from(g: &Generation) -> Self {
        Self {
            reasoning: g.reasoning.clone(),
            text: g.text.clone(),
            stop_reason: g.stop_reason.map(|r| r.finish_reason().to_string()),
            stop_cause: g.stop_reason.map(|r| r.as_str().to_string()),
            stop_string: g.stop_string.clone(),
            usage: g.usage,
            timings: g.timings,
        }
    }
}

/// What a streaming caller receives, owned: what a channel carries from the engine's scheduler to
/// whoever asked (see [`crate::scheduler`]).
#[derive(Debug, Clone, PartialEq)]
pub enum OwnedEvent {
    /// More reasoning text.
    Reasoning(String),
    /// More answer text.
    Answer(String),
    /// The end: everything, with the stop reason, usage and timings.
    Done(Box<Generation>),
    /// The generation failed; nothing more follows.
    Failed(String),
}

impl OwnedEvent {
    /// The borrowed form, for callbacks; `None` for [`OwnedEvent::Failed`].
    pub fn as_event(&self) -> Option<Event<'_>> {
        Some(match self {
            Self::Reasoning(t) => Event::Reasoning(t),
            Self::Answer(t) => Event::Answer(t),
            Self::Done(g) => Event::Done(g),
            Self::Failed(_) => return None,
        })
    }
}

/// What a streaming caller receives, as it is decoded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event<'a> {
    /// More reasoning text.
    Reasoning(&'a str),
    /// More answer text.
    Answer(&'a str),
    /// The end: everything, with the stop reason, usage and timings.
    Done(&'a Generation),
}
