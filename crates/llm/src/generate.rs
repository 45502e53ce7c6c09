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
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_tokens: 4096,
            stop: Vec::new(),
            max_thinking_tokens: None,
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
    /// The model ended its turn (EOS) or a stop string appeared.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
    /// The caller stopped it.
    Cancelled,
}

impl StopReason {
    /// The name used in JSON (`stop`, `length`, `cancelled`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
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
