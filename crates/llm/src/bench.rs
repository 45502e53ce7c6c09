//! Speed measurements in the shape of llama-bench: prompt processing (`pp512`: tokens/s of a
//! 512-token prefill) and text generation (`tg128`: tokens/s of 128 decode steps) at a chosen KV
//! cache position. Shared by `thinkrag bench` and the criterion benchmarks.

use std::time::Instant;

use serde::Serialize;

use crate::error::Result;
use crate::model::{Logits, Qwen2};

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
pub fn prefill(model: &Qwen2, tokens: usize, runs: usize) -> Result<BenchResult> {
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
/// `position` positions in the cache, `runs` times.
pub fn decode(model: &Qwen2, tokens: usize, position: usize, runs: usize) -> Result<BenchResult> {
    let ids = bench_tokens(tokens, model.vocab_size(), 2);
    let mut cache = model.new_cache(position + tokens + 1);
    cache.fill_for_benchmark(position)?;
    model.forward(&ids[..1], &mut cache, Logits::Last)?; // warm-up, untimed
    let mut rates = Vec::new();
    for _ in 0..runs.max(1) {
        cache.clear();
        cache.fill_for_benchmark(position)?;
        let t = Instant::now();
        for &id in &ids {
            let logits = model.forward(&[id], &mut cache, Logits::Last)?;
            logits.to_vec1::<f32>()?;
        }
        rates.push(tokens as f64 / t.elapsed().as_secs_f64());
    }
    Ok(BenchResult {
        test: format!("tg{tokens}@{position}"),
        tokens,
        position,
        tokens_per_s: median(&rates),
        runs: rates,
    })
}
