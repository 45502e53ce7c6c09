//! Many requests at once: a scheduler thread that owns the running [`Sequence`]s and steps them
//! together, as vLLM's and llama.cpp's servers do. Each step computes one chunk of a waiting
//! prompt (so a long RAG prompt never freezes the others) and one batched decode step for every
//! sequence that is generating, which reads each weight once for the whole batch. Finished
//! sequences leave their KV cache in a prefix cache, bounded in bytes, so a later request that
//! starts with the same system prompt or retrieved context does not compute it again.
//!
//! Requests are submitted with an [`EventSink`] (a closure, or the channel of [`EventStream`]);
//! when the sink reports that its receiver is gone, the sequence is cancelled within one step and
//! its cache freed.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::engine::{common_prefix, Engine, Session};
use crate::error::{Error, Result};
use crate::generate::{GenerationParams, OwnedEvent};
use crate::sequence::{Phase, Sequence};

/// Limits of a [`Scheduler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences generating at once (the decode batch); more wait in the queue.
    pub max_sequences: usize,
    /// Requests that may wait for a free slot; beyond that `submit` fails with
    /// [`Error::QueueFull`].
    pub max_queue: usize,
    /// Prompt tokens computed per step while other sequences decode: smaller keeps their tokens
    /// flowing, larger finishes the prompt sooner.
    pub prefill_chunk: usize,
    /// Bytes of KV cache kept for prefix reuse after sequences finish (0 turns it off).
    pub prefix_cache_bytes: usize,
    /// Shortest shared prefix (tokens) worth taking from the prefix cache.
    pub min_prefix_tokens: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_sequences: 8,
            max_queue: 64,
            prefill_chunk: 256,
            prefix_cache_bytes: 1 << 30,
            min_prefix_tokens: 16,
        }
    }
}

/// Where a sequence's events go.
pub trait EventSink: Send {
    /// Delivers one event; `Break` cancels the sequence.
    fn send(&mut self, event: OwnedEvent) -> ControlFlow<()>;
    /// Whether the receiver has gone away (checked every step, so a silent sequence is cancelled
    /// too).
    fn is_closed(&self) -> bool {
        false
    }
}

impl<F: FnMut(OwnedEvent) -> ControlFlow<()> + Send> EventSink for F {
    fn send(&mut self, event: OwnedEvent) -> ControlFlow<()> {
        self(event)
    }
}

/// The receiving end of a submitted request: an iterator over its events, ending after
/// [`OwnedEvent::Done`] or [`OwnedEvent::Failed`]. Dropping it cancels the request.
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::Receiver<OwnedEvent>,
    closed: Arc<AtomicBool>,
}

impl Iterator for EventStream {
    type Item = OwnedEvent;
    fn next(&mut self) -> Option<OwnedEvent> {
        self.rx.recv().ok()
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

struct ChannelSink {
    tx: mpsc::Sender<OwnedEvent>,
    closed: Arc<AtomicBool>,
}

impl EventSink for ChannelSink {
    fn send(&mut self, event: OwnedEvent) -> ControlFlow<()> {
        match self.tx.send(event) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Counters for monitoring (Prometheus and the like).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SchedulerMetrics {
    /// Requests accepted since start.
    pub requests_total: u64,
    /// Requests finished (any reason).
    pub requests_finished: u64,
    /// Requests cancelled (by their caller or at shutdown).
    pub requests_cancelled: u64,
    /// Requests refused because the queue was full.
    pub requests_rejected: u64,
    /// Prompt tokens of finished and running requests.
    pub prompt_tokens_total: u64,
    /// Of those, taken from a cache instead of computed.
    pub cached_prompt_tokens_total: u64,
    /// Tokens generated.
    pub generated_tokens_total: u64,
    /// Batched decode steps run.
    pub decode_steps_total: u64,
    /// Sum over decode steps of the sequences in each (divide by steps for the mean batch).
    pub decode_batch_sum: u64,
    /// Sequences running now.
    pub running: u64,
    /// Requests waiting now.
    pub waiting: u64,
    /// Bytes of KV cache held by running sequences.
    pub kv_cache_bytes: u64,
    /// Bytes of KV cache held for prefix reuse.
    pub prefix_cache_bytes: u64,
    /// Sequences the prefix cache holds.
    pub prefix_cache_entries: u64,
}

#[derive(Default)]
struct Counters {
    requests_total: AtomicU64,
    requests_finished: AtomicU64,
    requests_cancelled: AtomicU64,
    requests_rejected: AtomicU64,
    prompt_tokens_total: AtomicU64,
    cached_prompt_tokens_total: AtomicU64,
    generated_tokens_total: AtomicU64,
    decode_steps_total: AtomicU64,
    decode_batch_sum: AtomicU64,
    running: AtomicU64,
    kv_cache_bytes: AtomicU64,
    prefix_cache_bytes: AtomicU64,
    prefix_cache_entries: AtomicU64,
}

fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

struct Pending {
    seq: Sequence,
    sink: Box<dyn EventSink>,
}

struct State {
    waiting: VecDeque<Pending>,
    /// No new requests; the loop ends when nothing is left.
    draining: bool,
    /// Cancel everything now.
    cancel_all: bool,
    running: usize,
}

struct Shared {
    engine: Arc<Engine>,
    config: SchedulerConfig,
    state: Mutex<State>,
    /// Signalled when work arrives or the scheduler is told to stop.
    wake: Condvar,
    /// Signalled when a request finishes (for `drain`).
    idle: Condvar,
    counters: Counters,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves plain data behind: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Steps many sequences of one engine together on a thread of its own.
pub struct Scheduler {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// Starts the scheduler thread for `engine`.
    pub fn new(engine: Arc<Engine>, config: SchedulerConfig) -> Result<Self> {
        if config.max_sequences == 0 || config.prefill_chunk == 0 {
            return Err(Error::invalid(
                "max_sequences/prefill_chunk",
                format!("{}/{}", config.max_sequences, config.prefill_chunk),
                "at least 1 each",
            ));
        }
        let shared = Arc::new(Shared {
            engine,
            config,
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                draining: false,
                cancel_all: false,
                running: 0,
            }),
            wake: Condvar::new(),
            idle: Condvar::new(),
            counters: Counters::default(),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("thinkrag-scheduler".into())
            .spawn(move || run(&worker))
            .map_err(|e| Error::io("scheduler thread", e))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The engine it runs.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.shared.engine
    }

    /// Its limits.
    pub fn config(&self) -> &SchedulerConfig {
        &self.shared.config
    }

    /// Queues a generation after `prompt` (token ids, BOS included), its events going to `sink`.
    /// Parameters and the prompt's length are checked now, so a bad request fails here and not
    /// in the stream; a full queue is [`Error::QueueFull`].
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: GenerationParams,
        sink: Box<dyn EventSink>,
    ) -> Result<()> {
        let seq = Sequence::new(&self.shared.engine, prompt, params)?;
        let mut state = self.shared.lock();
        if state.draining {
            return Err(Error::ShuttingDown);
        }
        let limit = self.shared.config.max_queue;
        let free_slots = self
            .shared
            .config
            .max_sequences
            .saturating_sub(state.running);
        if state.waiting.len() >= limit + free_slots {
            add(&self.shared.counters.requests_rejected, 1);
            return Err(Error::QueueFull {
                waiting: state.waiting.len(),
                limit,
            });
        }
        add(&self.shared.counters.requests_total, 1);
        state.waiting.push_back(Pending { seq, sink });
        drop(state);
        self.shared.wake.notify_all();
        Ok(())
    }

    /// Like [`Self::submit`], returning the events as an iterator over a channel.
    pub fn submit_stream(&self, prompt: Vec<u32>, params: GenerationParams) -> Result<EventStream> {
        let (tx, rx) = mpsc::channel();
        let closed = Arc::new(AtomicBool::new(false));
        let sink = ChannelSink {
            tx,
            closed: Arc::clone(&closed),
        };
        self.submit(prompt, params, Box::new(sink))?;
        Ok(EventStream { rx, closed })
    }

    /// Whether [`Self::drain`] has been called: no new requests are taken.
    pub fn is_draining(&self) -> bool {
        self.shared.lock().draining
    }

    /// The counters now.
    pub fn metrics(&self) -> SchedulerMetrics {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let waiting = self.shared.lock().waiting.len() as u64;
        SchedulerMetrics {
            requests_total: get(&c.requests_total),
            requests_finished: get(&c.requests_finished),
            requests_cancelled: get(&c.requests_cancelled),
            requests_rejected: get(&c.requests_rejected),
            prompt_tokens_total: get(&c.prompt_tokens_total),
            cached_prompt_tokens_total: get(&c.cached_prompt_tokens_total),
            generated_tokens_total: get(&c.generated_tokens_total),
            decode_steps_total: get(&c.decode_steps_total),
            decode_batch_sum: get(&c.decode_batch_sum),
            running: get(&c.running),
            waiting,
            kv_cache_bytes: get(&c.kv_cache_bytes),
            prefix_cache_bytes: get(&c.prefix_cache_bytes),
            prefix_cache_entries: get(&c.prefix_cache_entries),
        }
    }

    /// Stops taking requests and waits up to `grace` for the queued and running ones to finish;
    /// whatever is left then is cancelled (its callers get a `Done` with `cancelled`). Returns
    /// whether everything finished within the grace period.
    pub fn drain(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        let mut state = self.shared.lock();
        state.draining = true;
        self.shared.wake.notify_all();
        while state.running > 0 || !state.waiting.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                state.cancel_all = true;
                self.shared.wake.notify_all();
                while state.running > 0 || !state.waiting.is_empty() {
                    state = self
                        .shared
                        .idle
                        .wait(state)
                        .unwrap_or_else(|e| e.into_inner());
                }
                return false;
            }
            state = self
                .shared
                .idle
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.draining = true;
            state.cancel_all = true;
        }
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A running sequence and where its events go.
struct Slot {
    seq: Sequence,
    sink: Box<dyn EventSink>,
}

impl Slot {
    /// Delivers events; on a `Break` (the receiver went away) cancels the sequence.
    fn deliver(&mut self, events: Vec<OwnedEvent>, counters: &Counters) {
        for ev in events {
            if self.sink.send(ev).is_break() {
                if self.seq.phase() != Phase::Finished {
                    let _ = self.seq.cancel();
                    add(&counters.requests_cancelled, 1);
                }
                return;
            }
        }
    }
}

/// Finished sequences' caches, reused by later requests that share their prefix.
struct PrefixCache {
    entries: Vec<(Session, Instant)>,
    budget: usize,
}

impl PrefixCache {
    fn bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|(s, _)| s.cache().allocated_bytes())
            .sum()
    }

    /// A copy of the longest cached prefix of `prompt` (at least `min` tokens), if any.
    fn lookup(&mut self, prompt: &[u32], min: usize) -> Option<Session> {
        let limit = prompt.len().saturating_sub(1);
        let (i, len) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (s, _))| (i, common_prefix(s.tokens(), prompt).min(limit)))
            .max_by_key(|&(_, len)| len)?;
        if len < min.max(1) {
            return None;
        }
        self.entries[i].1 = Instant::now();
        self.entries[i].0.copy_prefix(len).ok()
    }

    /// Keeps `session` (dropping entries it extends), then evicts the least recently used entries
    /// beyond the budget.
    fn insert(&mut self, session: Session, min: usize) {
        if self.budget == 0 || session.len() < min.max(1) {
            return;
        }
        let tokens = session.tokens();
        if self
            .entries
            .iter()
            .any(|(s, _)| common_prefix(s.tokens(), tokens) == tokens.len())
        {
            return; // an entry already holds all of it
        }
        self.entries
            .retain(|(s, _)| common_prefix(s.tokens(), tokens) < s.len());
        // A sequence's cache was sized for all the tokens it might have generated; one that
        // stopped early is kept in buffers of its own length, not its reach.
        let (len, capacity) = (session.len(), session.cache().capacity());
        let session = if capacity > len + len / 4 {
            session.copy_prefix(len).unwrap_or(session)
        } else {
            session
        };
        self.entries.push((session, Instant::now()));
        while self.bytes() > self.budget && !self.entries.is_empty() {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(i, _)| i)
                .unwrap_or(0);
            self.entries.swap_remove(oldest);
        }
    }
}

/// The scheduler thread: admit, prefill a chunk, decode a batch, deliver, retire; until drained.
fn run(shared: &Shared) {
    let engine = &*shared.engine;
    let config = &shared.config;
    let counters = &shared.counters;
    let mut slots: Vec<Slot> = Vec::new();
    let mut prefixes = PrefixCache {
        entries: Vec::new(),
        budget: config.prefix_cache_bytes,
    };
    loop {
        // Admit waiting requests into free slots, or sleep until there is work.
        let cancel_all = {
            let mut state = shared.lock();
            while slots.is_empty() && state.waiting.is_empty() && !state.draining {
                state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            if slots.is_empty() && state.waiting.is_empty() && state.draining {
                return;
            }
            while slots.len() < config.max_sequences {
                let Some(p) = state.waiting.pop_front() else {
                    break;
                };
                let seq = match prefixes.lookup(p.seq.prompt(), config.min_prefix_tokens) {
                    Some(session) => p.seq.with_session(session),
                    None => p.seq,
                };
                add(&counters.prompt_tokens_total, seq.prompt().len());
                add(
                    &counters.cached_prompt_tokens_total,
                    seq.cached_prompt_tokens(),
                );
                slots.push(Slot { seq, sink: p.sink });
            }
            state.running = slots.len();
            if state.cancel_all {
                // Queued requests are finished without running.
                for mut p in state.waiting.drain(..) {
                    for ev in p.seq.cancel() {
                        let _ = p.sink.send(ev);
                    }
                    add(&counters.requests_cancelled, 1);
                    add(&counters.requests_finished, 1);
                }
            }
            state.cancel_all
        };

        // Receivers that went away, and everything at a forced shutdown, are cancelled now.
        for slot in &mut slots {
            if (cancel_all || slot.sink.is_closed()) && slot.seq.phase() != Phase::Finished {
                let events = slot.seq.cancel();
                add(&counters.requests_cancelled, 1);
                for ev in events {
                    let _ = slot.sink.send(ev);
                }
            }
        }

        // One chunk of the oldest prompt still prefilling: a whole chunk when nobody is
        // decoding, `prefill_chunk` tokens between decode steps otherwise.
        let decoding = slots.iter().any(|s| s.seq.phase() == Phase::Decoding);
        // (A prompt with one token left joins the decode batch below instead.)
        if let Some(slot) = slots
            .iter_mut()
            .find(|s| s.seq.phase() == Phase::Prefilling && s.seq.prefill_remaining() > 1)
        {
            let budget = if decoding {
                config.prefill_chunk
            } else {
                crate::sequence::PREFILL_CHUNK.max(config.prefill_chunk)
            };
            let events = match slot.seq.prefill(engine, budget) {
                Ok(events) => events,
                Err(e) => slot.seq.fail(e.to_string()),
            };
            slot.deliver(events, counters);
        }

        // One decode step for every sequence that has a token to feed.
        let batch: Vec<usize> = (0..slots.len())
            .filter(|&i| slots[i].seq.step_input().is_some())
            .collect();
        if !batch.is_empty() {
            decode_step(engine, &mut slots, &batch, counters);
        }

        // Retire finished sequences: their caches go to the prefix cache.
        let before = slots.len();
        let mut kept = Vec::with_capacity(slots.len());
        for slot in slots.drain(..) {
            if slot.seq.phase() == Phase::Finished {
                add(&counters.requests_finished, 1);
                add(
                    &counters.generated_tokens_total,
                    slot.seq.generation().usage.completion_tokens,
                );
                // A cancelled or failed sequence's cache is freed, not kept for reuse.
                let completed = matches!(
                    slot.seq.generation().stop_reason,
                    Some(r) if r != crate::generate::StopReason::Cancelled
                );
                if completed {
                    prefixes.insert(slot.seq.into_session(), config.min_prefix_tokens);
                }
            } else {
                kept.push(slot);
            }
        }
        slots = kept;
        let kv: usize = slots.iter().map(|s| s.seq.cache_bytes()).sum();
        counters.kv_cache_bytes.store(kv as u64, Ordering::Relaxed);
        counters
            .prefix_cache_bytes
            .store(prefixes.bytes() as u64, Ordering::Relaxed);
        counters
            .prefix_cache_entries
            .store(prefixes.entries.len() as u64, Ordering::Relaxed);
        counters
            .running
            .store(slots.len() as u64, Ordering::Relaxed);
        if slots.len() != before || cancel_all {
            let mut state = shared.lock();
            state.running = slots.len();
            drop(state);
            shared.idle.notify_all();
        }
    }
}

/// Feeds the next token of each sequence in `batch` in one forward pass and hands every sequence
/// its row of logits. A failure fails the sequences of the step, not the scheduler.
fn decode_step(engine: &Engine, slots: &mut [Slot], batch: &[usize], counters: &Counters) {
    let ids: Vec<u32> = batch
        .iter()
        .filter_map(|&i| slots[i].seq.step_input())
        .collect();
    add(&counters.decode_steps_total, 1);
    add(&counters.decode_batch_sum, batch.len());
    let logits = {
        // `batch` lists, in order, the slots with a step input: the same filter gives their caches.
        let mut caches: Vec<&mut crate::model::KvCache> = slots
            .iter_mut()
            .filter(|s| s.seq.step_input().is_some())
            .map(|s| s.seq.cache_mut())
            .collect();
        debug_assert_eq!(caches.len(), batch.len());
        engine
            .model()
            .forward_decode(&ids, &mut caches)
            .and_then(|l| Ok(l.to_vec2::<f32>()?))
    };
    match logits {
        Ok(rows) => {
            for (&i, row) in batch.iter().zip(rows) {
                let slot = &mut slots[i];
                let events = match slot.seq.stepped(engine, &row) {
                    Ok(events) => events,
                    Err(e) => slot.seq.fail(e.to_string()),
                };
                slot.deliver(events, counters);
            }
        }
        Err(e) => {
            for &i in batch {
                let slot = &mut slots[i];
                let events = slot.seq.fail(format!("decode step failed: {e}"));
                slot.deliver(events, counters);
            }
        }
    }
}
