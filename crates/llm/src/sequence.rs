//! One request's generation state, apart from the loop that steps it: its KV cache and tokens,
//! sampler, reasoning/answer splitter, stop strings, thinking budget, usage and timings. The
//! scheduler ([`crate::scheduler`]) steps many of these in one batched forward pass; the
//! single-request [`crate::Engine::generate_in`] drives one alone through the same methods.

use std::collections::VecDeque;
use std::time::Instant;

use crate::engine::{common_prefix, Engine, Session};
use crate::error::{Error, Result};
use crate::generate::{Generation, GenerationParams, OwnedEvent, StopReason, Usage};
use crate::model::{KvCache, Logits};
use crate::sampling::Sampler;
use crate::stream::{Segment, StreamEvent, TextStream};
use crate::tokenizer::TextTokenizer;

/// Prompts are prefilled in chunks of at most this many tokens: it bounds the attention scores'
/// memory (heads x chunk x context) on long RAG prompts without slowing the matmuls down.
pub const PREFILL_CHUNK: usize = 512;

/// Where a sequence is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Prompt tokens remain to be computed.
    Prefilling,
    /// The next token is chosen; it is fed in the next decode step.
    Decoding,
    /// Finished; its [`OwnedEvent::Done`] has been produced.
    Finished,
}

/// One generation in progress.
#[derive(Debug)]
pub struct Sequence {
    session: Session,
    prompt: Vec<u32>,
    /// Prompt tokens found in the session's cache when the sequence started.
    shared: usize,
    params: GenerationParams,
    sampler: Sampler,
    stream: TextStream,
    out: Generation,
    phase: Phase,
    in_reasoning: bool,
    answer_started: bool,
    eos: Vec<u32>,
    think_close: u32,
    /// `</think>\n\n`, fed one token per step when the thinking budget is spent.
    forced_close: Vec<u32>,
    forced: VecDeque<u32>,
    /// The token the next decode step feeds, while decoding.
    next_input: Option<u32>,
    context_window: usize,
    start: Instant,
    prefill_ms: f64,
    first_token_at: Option<Instant>,
}

impl Sequence {
    /// Starts generating after `prompt` (token ids, BOS included) in `session`, whose cached prefix
    /// shared with `prompt` is kept (at least the last prompt token is computed again: its logits
    /// are needed). Checks the parameters and that the prompt fits the context window.
    pub fn new(engine: &Engine, prompt: Vec<u32>, params: GenerationParams) -> Result<Self> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(Error::invalid("prompt", "empty", "at least one token"));
        }
        let context_window = engine.context_window();
        if prompt.len() >= context_window {
            return Err(Error::PromptTooLong {
                prompt_tokens: prompt.len(),
                context_window,
            });
        }
        let tokenizer = engine.tokenizer();
        let special = tokenizer.special().clone();
        let sampler = Sampler::new(params.sampling.clone(), tokenizer.size())?;
        let starts_in_reasoning = tokenizer.prompt_opens_reasoning(&prompt);
        let think_close = special.think_close.unwrap_or(u32::MAX);
        let forced_close = match special.think_close {
            Some(close) => {
                let mut v = vec![close];
                v.extend(tokenizer.encode("\n\n")?);
                v
            }
            None => Vec::new(),
        };
        Ok(Self {
            stream: TextStream::new(params.stop.clone(), think_close, starts_in_reasoning),
            out: Generation {
                usage: Usage {
                    prompt_tokens: prompt.len(),
                    ..Usage::default()
                },
                ..Generation::default()
            },
            session: engine.new_session(),
            prompt,
            shared: 0,
            params,
            sampler,
            phase: Phase::Prefilling,
            in_reasoning: starts_in_reasoning,
            answer_started: false,
            eos: special.eos.clone(),
            think_close,
            forced_close,
            forced: VecDeque::new(),
            next_input: None,
            context_window,
            start: Instant::now(),
            prefill_ms: 0.0,
            first_token_at: None,
        })
    }

    /// Continues from `session` instead of an empty cache: the prefix it shares with the prompt
    /// is kept (all but the last prompt token at most, whose logits are needed) and the rest of
    /// it forgotten. Only before prefilling starts; later the session is ignored.
    pub fn with_session(mut self, mut session: Session) -> Self {
        if self.phase == Phase::Prefilling && self.session.is_empty() {
            let shared = common_prefix(session.tokens(), &self.prompt).min(self.prompt.len() - 1);
            session.truncate(shared);
            self.shared = shared;
            self.out.usage.cached_prompt_tokens = shared;
            self.session = session;
        }
        self
    }

    /// The prompt's token ids.
    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    /// Where the sequence is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The parameters it runs with.
    pub fn params(&self) -> &GenerationParams {
        &self.params
    }

    /// Prompt tokens still to be computed.
    pub fn prefill_remaining(&self) -> usize {
        self.prompt.len() - self.session.len().min(self.prompt.len())
    }

    /// Prompt tokens that came from the cache (a shared prefix) and were not computed.
    pub fn cached_prompt_tokens(&self) -> usize {
        self.shared
    }

    /// The result so far (text, usage); final once [`Phase::Finished`].
    pub fn generation(&self) -> &Generation {
        &self.out
    }

    /// The session: tokens and KV cache (prompt and generated tokens so far).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Takes the session back (for a conversation's next turn, or a prefix cache).
    pub fn into_session(self) -> Session {
        self.session
    }

    /// Bytes its KV cache holds.
    pub fn cache_bytes(&self) -> usize {
        self.session.cache().allocated_bytes()
    }

    /// Computes up to `max_tokens` more prompt tokens (at most [`PREFILL_CHUNK`] per forward).
    /// When the prompt is complete, picks the first token and returns its events.
    pub fn prefill(&mut self, engine: &Engine, max_tokens: usize) -> Result<Vec<OwnedEvent>> {
        if self.phase != Phase::Prefilling {
            return Ok(Vec::new());
        }
        let t = Instant::now();
        let from = self.session.len();
        let end = from
            .saturating_add(max_tokens.max(1))
            .min(self.prompt.len());
        // Room for the whole prompt and the start of the answer at once: growing the cache by
        // doubling holds the old and the new buffers together (for the 8B model near 4k
        // positions, 0.27 and 0.54 GB), and a cache sized to the prompt alone would grow again
        // on the first token. Not the whole `max_tokens`: with huge pages, reserved positions
        // become resident as their neighbours are written.
        let reach = self
            .prompt
            .len()
            .saturating_add(self.params.max_tokens.min(PREFILL_CHUNK))
            .min(self.context_window);
        let cache = self.session.cache_mut();
        cache.reserve(reach.saturating_sub(cache.len()))?;
        let mut logits = None;
        for chunk in self.prompt[from..end].chunks(PREFILL_CHUNK) {
            logits = Some(
                self.session
                    .feed_logits(engine.model(), chunk, Logits::Last)?,
            );
        }
        self.prefill_ms += t.elapsed().as_secs_f64() * 1e3;
        if end < self.prompt.len() {
            return Ok(Vec::new());
        }
        let logits = match logits {
            Some(l) => l.to_vec1::<f32>()?,
            None => return Err(Error::invalid("prompt", "empty", "at least one token")),
        };
        self.phase = Phase::Decoding;
        self.advance(engine, &logits)
    }

    /// What a batched decode step may compute for this sequence: its next token while decoding,
    /// or the last prompt token when only that one is left to prefill (a prefix-cache hit leaves
    /// exactly that), so it joins the batch instead of taking a forward of its own.
    pub fn step_input(&self) -> Option<u32> {
        match self.phase {
            Phase::Decoding => self.next_input,
            Phase::Prefilling if self.prefill_remaining() == 1 => {
                self.prompt.get(self.session.len()).copied()
            }
            _ => None,
        }
    }

    /// After a decode step fed [`Self::step_input`]: records it as cached and picks the next
    /// token from `logits` (the step's row for this sequence). Returns the events it makes.
    pub fn stepped(&mut self, engine: &Engine, logits: &[f32]) -> Result<Vec<OwnedEvent>> {
        let Some(id) = self.step_input() else {
            return Ok(Vec::new());
        };
        self.session.push_cached(id);
        self.next_input = None;
        self.phase = Phase::Decoding;
        self.advance(engine, logits)
    }

    /// The cache the next decode step appends to.
    pub(crate) fn cache_mut(&mut self) -> &mut KvCache {
        self.session.cache_mut()
    }

    /// Ends the sequence as cancelled (the caller went away or asked); returns its `Done`.
    pub fn cancel(&mut self) -> Vec<OwnedEvent> {
        if self.phase == Phase::Finished {
            return Vec::new();
        }
        self.finish(None, Vec::new(), StopReason::Cancelled)
    }

    /// Ends the sequence with an error: nothing more is generated.
    pub fn fail(&mut self, message: String) -> Vec<OwnedEvent> {
        self.phase = Phase::Finished;
        vec![OwnedEvent::Failed(message)]
    }

    /// Picks the next token (forced, or sampled from `logits`), accounts for it and decides whether
    /// the generation goes on.
    fn advance(&mut self, engine: &Engine, logits: &[f32]) -> Result<Vec<OwnedEvent>> {
        let budget_spent = self
            .params
            .max_thinking_tokens
            .is_some_and(|b| self.in_reasoning && self.out.usage.reasoning_tokens >= b);
        if budget_spent && self.forced.is_empty() && !self.forced_close.is_empty() {
            self.forced.extend(self.forced_close.iter().copied());
        }
        let id = match self.forced.pop_front() {
            Some(id) => id,
            None => {
                // The repetition penalty looks at the last `window` generated tokens, or the
                // last `window` of the whole sequence when the prompt counts too. When a token is
                // sampled every earlier one has been fed: the session holds the prompt and all
                // generated tokens, `out.tokens` the generated ones.
                let p = self.sampler.params();
                let (penalize_prompt, window) = (p.penalize_prompt, p.repetition_window);
                let tokens = if penalize_prompt {
                    self.session.tokens()
                } else {
                    &self.out.tokens
                };
                let recent = &tokens[tokens.len().saturating_sub(window)..];
                if self.params.ignore_eos {
                    let mut masked = logits.to_vec();
                    for &eos in &self.eos {
                        if let Some(l) = masked.get_mut(eos as usize) {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                    self.sampler.sample(&masked, recent)?
                } else {
                    self.sampler.sample(logits, recent)?
                }
            }
        };
        if self.first_token_at.is_none() {
            self.first_token_at = Some(Instant::now());
        }
        let mut events = Vec::new();
        if self.in_reasoning {
            self.out.usage.reasoning_tokens += 1;
        } else {
            self.out.usage.answer_tokens += 1;
        }
        self.out.tokens.push(id);
        if id == self.think_close {
            self.in_reasoning = false;
        }
        let tokenizer = engine.tokenizer();
        if self.eos.contains(&id) {
            return Ok(self.finish(Some(tokenizer), events, StopReason::Eos));
        }
        for ev in self.stream.push(tokenizer, id) {
            if let Some(stop) = self.record(ev, &mut events) {
                return Ok(self.finish(Some(tokenizer), events, stop));
            }
        }
        let generated = self.out.usage.reasoning_tokens + self.out.usage.answer_tokens;
        // The fed token takes a position too: stop before the cache would overflow the window.
        if generated >= self.params.max_tokens || self.session.len() + 1 >= self.context_window {
            return Ok(self.finish(Some(tokenizer), events, StopReason::Length));
        }
        self.next_input = Some(id);
        Ok(events)
    }

    /// Records one stream event as owned output; `Some(Stop)` when a stop string ended the text.
    fn record(&mut self, ev: StreamEvent, events: &mut Vec<OwnedEvent>) -> Option<StopReason> {
        match ev {
            StreamEvent::Stopped => return Some(StopReason::Stop),
            StreamEvent::Text {
                segment: Segment::Reasoning,
                text,
            } => {
                self.out.reasoning.push_str(&text);
                push_text(events, OwnedEvent::Reasoning(text));
            }
            StreamEvent::Text {
                segment: Segment::Answer,
                text,
            } => {
                // The model writes `</think>\n\n` before its answer: drop the blank lines once.
                let text = if self.answer_started {
                    text
                } else {
                    text.trim_start().to_string()
                };
                if !text.is_empty() {
                    self.answer_started = true;
                    self.out.text.push_str(&text);
                    push_text(events, OwnedEvent::Answer(text));
                }
            }
        }
        None
    }

    /// Flushes held-back text (unless cancelled), fills in the stop reason, usage and timings, and
    /// appends the `Done` event.
    fn finish(
        &mut self,
        tokenizer: Option<&TextTokenizer>,
        mut events: Vec<OwnedEvent>,
        reason: StopReason,
    ) -> Vec<OwnedEvent> {
        self.phase = Phase::Finished;
        self.next_input = None;
        // Held-back text is released at the end (not when cancelled); a stop string completing
        // only now still cuts the text there, and the reason stays what ended the generation.
        if let Some(tokenizer) = tokenizer {
            for ev in self.stream.finish(tokenizer) {
                let _ = self.record(ev, &mut events);
            }
        }
        self.out.stop_reason = Some(reason);
        if reason == StopReason::Stop {
            self.out.stop_string = self.stream.stop_string().map(str::to_string);
        }
        let usage = &mut self.out.usage;
        usage.completion_tokens = usage.reasoning_tokens + usage.answer_tokens;
        let first = self.first_token_at.unwrap_or_else(Instant::now);
        let decoded = usage.completion_tokens.saturating_sub(1);
        let computed = self.prompt.len() - self.shared;
        let t = &mut self.out.timings;
        t.prefill_ms = self.prefill_ms;
        t.prefill_tokens_per_s = per_second(computed, self.prefill_ms);
        t.time_to_first_token_ms = (first - self.start).as_secs_f64() * 1e3;
        t.decode_ms = first.elapsed().as_secs_f64() * 1e3;
        t.decode_tokens_per_s = per_second(decoded, t.decode_ms);
        t.total_ms = self.start.elapsed().as_secs_f64() * 1e3;
        events.push(OwnedEvent::Done(Box::new(self.out.clone())));
        events
    }
}

/// Appends text, merging it into the previous event of the same kind.
fn push_text(events: &mut Vec<OwnedEvent>, ev: OwnedEvent) {
    match (events.last_mut(), ev) {
        (Some(OwnedEvent::Reasoning(a)), OwnedEvent::Reasoning(b)) => a.push_str(&b),
        (Some(OwnedEvent::Answer(a)), OwnedEvent::Answer(b)) => a.push_str(&b),
        (_, ev) => events.push(ev),
    }
}

fn per_second(tokens: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        tokens as f64 / (ms / 1e3)
    } else {
        0.0
    }
}
