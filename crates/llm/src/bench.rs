//! Speed measurements in the shape of llama-bench: prompt processing (`pp512`: tokens/s of a
//! 512-token prefill) and text generation (`tg128`: tokens/s of 128 decode steps) at a chosen KV
//! cache position. Shared by `thinkrag bench` and the criterion benchmarks.

use std::time::Instant;

use serde::Serialize;

use crate::error::Result;
use std::sync::Arc;

use crate::engine::Engine;
use crate::generate::{GenerationParams, OwnedEvent, MAX_TOKENS_LIMIT};
use crate::model::{CausalLm, KvCache, Logits};
use crate::scheduler::{Scheduler, SchedulerConfig};

/// One measured test.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// `pp512`, `tg128@4000`...
    pub test: String,
    /// Tokens processed per run.
    pub tokens: usize,
    /// KV cache position the test starts at.
    pub position: usize,
    /// Median tokens per second.
    pub tokens_per_s: f64,
    /// Every run's tokens per second.
    pub runs: Vec<f64>,
}

/// Deterministic token ids for benchmarks (values do not affect speed; ids stay in range).
pub fn bench_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab.min(150_000) as u64) as u32
        })
        .collect()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Times the prefill of `tokens` tokens from an empty cache, `runs` times.
pub fn prefill(model: &CausalLm, tokens: usize, runs: usize) -> Result<BenchResult> {
    let ids = bench_tokens(tokens, model.vocab_size(), 1);
    let mut cache = model.new_cache(tokens + 1);
    // Untimed warm-up: first-touch allocations and thread start-up are not what is measured.
    model.forward(&ids[..ids.len().min(16)], &mut cache, Logits::Last)?;
    let mut rates = Vec::new();
    for _ in 0..runs.max(1) {
        cache.clear();
        let t = Instant::now();
        for chunk in ids.chunks(512) {
            let logits = model.forward(chunk, &mut cache, Logits::Last)?;
            // Wait for the device (a no-op on the CPU).
            logits.to_vec1::<f32>()?;
        }
        rates.push(tokens as f64 / t.elapsed().as_secs_f64());
    }
    Ok(BenchResult {
        test: format!("pp{tokens}"),
        tokens,
        position: 0,
        tokens_per_s: median(&rates),
        runs: rates,
    })
}

/// Times `tokens` decode steps (one token each, logits read back as generation does) starting with
/// `position` positions in the cache, `runs` times. Runs the decode step generation runs
/// ([`CausalLm::forward_decode`]) with a batch of one.
pub fn decode(
    model: &CausalLm,
    tokens: usize,
    position: usize,
    runs: usize,
) -> Result<BenchResult> {
    let mut r = batched_decode(model, 1, tokens, position, runs)?;
    r.test = format!("tg{tokens}@{position}");
    Ok(r)
}

/// Times `tokens` batched decode steps of `sequences` sequences, each with `position` positions
/// in its own cache: one forward per step for all of them, as the scheduler runs it. Reports the
/// aggregate tokens per second (`sequences * tokens / time`), `runs` times after a warm-up step.
pub fn batched_decode(
    model: &CausalLm,
    sequences: usize,
    tokens: usize,
    position: usize,
    runs: usize,
) -> Result<BenchResult> {
    let n = sequences.max(1);
    let tokens = tokens.max(1);
    let ids: Vec<Vec<u32>> = (0..n)
        .map(|i| bench_tokens(tokens, model.vocab_size(), 2 + i as u64))
        .collect();
    let mut caches: Vec<_> = (0..n)
        .map(|_| model.new_cache(position + tokens + 2))
        .collect();
    let mut rates = Vec::new();
    for run in 0..=runs.max(1) {
        for c in caches.iter_mut() {
            c.clear();
            c.fill_for_benchmark(position)?;
        }
        // Run 0 is one untimed warm-up step.
        let steps = if run == 0 { 1 } else { tokens };
        let t = Instant::now();
        for step in 0..steps {
            let step_ids: Vec<u32> = ids.iter().map(|v| v[step]).collect();
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            model
                .forward_decode(&step_ids, &mut refs)?
                .to_vec2::<f32>()?;
        }
        if run > 0 {
            rates.push((n * tokens) as f64 / t.elapsed().as_secs_f64());
        }
    }
    Ok(BenchResult {
        test: format!("tg{tokens}@{position} x{n}"),
        tokens: n * tokens,
        position,
        tokens_per_s: median(&rates),
        runs: rates,
    })
}

/// Time to first token of a short request admitted while `busy` long requests decode, against
/// the same kind of request alone, through the engine's [`Scheduler`] (chunked prefill
/// interleaved with batched decode steps). Returns `(alone_ms, busy_ms)`, medians of `runs`.
pub fn admission_ttft(
    engine: Arc<Engine>,
    busy: usize,
    long_prompt: usize,
    short_prompt: usize,
    runs: usize,
) -> Result<(f64, f64)> {
    let vocab = engine.tokenizer().size().min(engine.model().vocab_size());
    let scheduler = Scheduler::new(
        Arc::clone(&engine),
        SchedulerConfig {
            max_sequences: busy + 1,
            prefix_cache_bytes: 0,
            ..SchedulerConfig::default()
        },
    )?;
    let params = |max_tokens| GenerationParams {
        max_tokens,
        ignore_eos: true,
        ..GenerationParams::default()
    };
    let ttft = |seed: u64| -> Result<f64> {
        let prompt = bench_tokens(short_prompt.max(1), vocab, 100 + seed);
        for ev in scheduler.submit_stream(prompt, params(1))? {
            if let OwnedEvent::Done(g) = ev {
                return Ok(g.timings.time_to_first_token_ms);
            }
        }
        Ok(f64::NAN)
    };
    ttft(0)?; // warm-up
    let alone: Vec<f64> = (0..runs.max(1))
        .map(|i| ttft(1 + i as u64))
        .collect::<Result<_>>()?;
    // The long requests: prefilled, then decoding for longer than the measurement takes.
    let mut streams = Vec::new();
    for i in 0..busy {
        let prompt = bench_tokens(long_prompt.max(1), vocab, 10 + i as u64);
        let mut s = scheduler.submit_stream(prompt, params(MAX_TOKENS_LIMIT))?;
        for ev in s.by_ref() {
            if matches!(ev, OwnedEvent::Reasoning(_) | OwnedEvent::Answer(_)) {
                break; // it is decoding
            }
        }
        streams.push(s);
    }
    let busy_ms: Vec<f64> = (0..runs.max(1))
        .map(|i| ttft(50 + i as u64))
        .collect::<Result<_>>()?;
    drop(streams);
    Ok((median(&alone), median(&busy_ms)))
}
