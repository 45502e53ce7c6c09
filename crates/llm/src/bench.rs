//! Speed measurements in the shape of llama-bench: prompt processing (`pp512`: tokens/s of a
//! 512-token prefill) and text generation (`tg128`: tokens/s of 128 decode steps) at a chosen KV
//! cache position. Shared by `thinkrag bench` and the criterion benchmarks.

use std::time::{Duration, Instant};

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
    /// Sequences decoded together (1 for prefill and a lone decode).
    pub sequences: usize,
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

/// The median of `v` (the mean of the middle two for an even count; 0 when empty).
pub fn median(v: &[f64]) -> f64 {
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
        sequences: 1,
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
    batched_decode(model, 1, tokens, position, runs)
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
    let (mut results, _) = decode_rounds(model, sequences, tokens, &[position], runs, None)?;
    Ok(results.remove(0))
}

/// [`batched_decode`] at each of `positions`, measured in rounds whose steps interleave: step
/// `s` of every position runs before step `s + 1` of any, each timed on its own, so the
/// positions are timed within a step (tens of milliseconds) of one another. On a shared or
/// throttling machine their ratio (how much decode slows down with a long context) is then far
/// steadier than the ratio of two series taken one after the other, or even of two series a
/// round apart (seconds, in which this project's test hosts have moved by 20%). With a probe,
/// also the memory's read rate (GB/s) in each round, its buffer read a slice at a time between
/// the steps: run `i` of a decode against bandwidth `i` is a fair ratio.
pub fn decode_rounds(
    model: &CausalLm,
    sequences: usize,
    tokens: usize,
    positions: &[usize],
    runs: usize,
    probe: Option<&ReadProbe>,
) -> Result<(Vec<BenchResult>, Vec<f64>)> {
    let mut bandwidth = Vec::new();
    let n = sequences.max(1);
    let tokens = tokens.max(1);
    let ids: Vec<Vec<u32>> = (0..n)
        .map(|i| bench_tokens(tokens, model.vocab_size(), 2 + i as u64))
        .collect();
    let mut cases = Vec::with_capacity(positions.len());
    for &position in positions {
        let caches: Vec<KvCache> = (0..n)
            .map(|_| model.new_cache(position + tokens + 2))
            .collect();
        cases.push((position, caches, Vec::new()));
    }
    // Run 0 is one untimed warm-up step per position.
    for run in 0..=runs.max(1) {
        for (position, caches, _) in cases.iter_mut() {
            for c in caches.iter_mut() {
                c.clear();
                c.fill_for_benchmark(*position)?;
            }
        }
        let steps = if run == 0 { 1 } else { tokens };
        let mut spent = vec![Duration::ZERO; cases.len()];
        let slices = ReadProbe::slices_for(steps);
        let (mut probed, mut probe_bytes, mut probe_time) = (0, 0, Duration::ZERO);
        for step in 0..steps {
            let step_ids: Vec<u32> = ids.iter().map(|v| v[step]).collect();
            for ((_, caches, _), spent) in cases.iter_mut().zip(spent.iter_mut()) {
                let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                let t = Instant::now();
                model
                    .forward_decode(&step_ids, &mut refs)?
                    .to_vec2::<f32>()?;
                *spent += t.elapsed();
            }
            if let (Some(p), true) = (probe, run > 0) {
                // The slices spread evenly over the steps, the last one after the last step.
                while probed < (step + 1) * slices / steps {
                    let (bytes, time) = p.measure_slice(probed, slices);
                    (probe_bytes, probe_time) = (probe_bytes + bytes, probe_time + time);
                    probed += 1;
                }
            }
        }
        if run > 0 {
            for ((_, _, rates), spent) in cases.iter_mut().zip(&spent) {
                rates.push((n * tokens) as f64 / spent.as_secs_f64());
            }
            if probe.is_some() {
                bandwidth.push(probe_bytes as f64 / probe_time.as_secs_f64() / 1e9);
            }
        }
    }
    let results = cases
        .into_iter()
        .map(|(position, _, rates)| BenchResult {
            test: if n == 1 {
                format!("tg{tokens}@{position}")
            } else {
                format!("tg{tokens}@{position} x{n}")
            },
            tokens: n * tokens,
            position,
            sequences: n,
            tokens_per_s: median(&rates),
            runs: rates,
        })
        .collect();
    Ok((results, bandwidth))
}

/// The instruction sets of the tiled kernels for quantized weights, for benchmarks that compare
/// them on one CPU (a CPU with AVX-512 runs both; thinkrag itself takes the best it runs).
pub use crate::model::ktiles::Isa as TileKernels;

/// A probe of the rate at which this machine's memory feeds the CPU thread pool the kernels run
/// on: every thread streams its share of a 1 GiB buffer (larger than any CPU cache), the
/// ceiling for a decode step that must read every weight once. [`decode_rounds`] reads it a slice
/// at a time between its steps, since on a shared machine both move from one second to the next.
pub struct ReadProbe {
    buf: Vec<u64>,
}

impl ReadProbe {
    /// The fewest bytes a slice reads: 64 MiB, milliseconds of reading, in which a parallel
    /// region's start-up (microseconds) is lost. (No slice is in a cache when read: each is read
    /// once a round, after the rest of the 1 GiB and the steps' weights.)
    const MIN_SLICE: usize = 64 << 20;

    /// The buffer's bytes.
    const BYTES: usize = 1 << 30;

    /// Allocates and writes the buffer (untouched pages all map one zero page, which reads from
    /// cache), on huge pages where the OS has them, so TLB misses do not count against memory.
    pub fn new() -> Self {
        let mut buf = vec![0u64; Self::BYTES / size_of::<u64>()];
        crate::device::advise_huge_pages(&buf);
        for (i, x) in buf.iter_mut().enumerate() {
            *x = i as u64;
        }
        ReadProbe { buf }
    }

    /// Into how many slices to cut one pass for `steps` steps: one a step, none under
    /// [`Self::MIN_SLICE`] bytes (at least one).
    pub fn slices_for(steps: usize) -> usize {
        let most = Self::BYTES / Self::MIN_SLICE;
        steps.clamp(1, most)
    }

    /// One pass: GB/s.
    pub fn measure(&self) -> f64 {
        let (bytes, time) = self.measure_slice(0, 1);
        bytes as f64 / time.as_secs_f64() / 1e9
    }

    /// Reads slice `i` of `slices` equal ones of the buffer in one parallel region: the bytes read
    /// and the time taken.
    pub fn measure_slice(&self, i: usize, slices: usize) -> (usize, Duration) {
        let part = slice_of(&self.buf, i, slices);
        let t = Instant::now();
        read_in_parallel(part);
        (std::mem::size_of_val(part), t.elapsed())
    }
}

/// Slice `i` of `slices` near-equal ones of `buf` (lengths differ by at most one; empty past the
/// last).
fn slice_of(buf: &[u64], i: usize, slices: usize) -> &[u64] {
    let slices = slices.max(1);
    let at = |j: usize| buf.len() * j.min(slices) / slices;
    &buf[at(i)..at(i + 1)]
}

/// Reads all of `buf` once in one parallel region, each thread of candle's pool streaming its
/// contiguous share: the probe's pass, and the plain-reads peer of the weight-stream bench.
pub fn read_in_parallel(buf: &[u64]) {
    let pool = candle_core::utils::barrier_pool();
    let share = buf.len().div_ceil(pool.n_workers() + 1).max(1);
    pool.execute(|tid| {
        let part = buf.chunks(share).nth(tid).unwrap_or(&[]);
        std::hint::black_box(stream_sum(part));
    });
}

impl Default for ReadProbe {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads all of `part` as fast as one core can: 64-byte loads into four independent sums, with
/// AVX-512 where the CPU has it (the compiler's own vectorization of the portable loop uses
/// narrower loads on some CPUs, which then read below what the memory allows).
fn stream_sum(part: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f")]
        unsafe fn run(part: &[u64]) -> u64 {
            use core::arch::x86_64::*;
            let mut acc = [_mm512_setzero_si512(); 4];
            let (blocks, _) = part.as_chunks::<32>();
            for b in blocks {
                for (j, a) in acc.iter_mut().enumerate() {
                    // SAFETY: `b` holds 32 u64s, four 64-byte vectors.
                    let x = unsafe { _mm512_loadu_si512(b.as_ptr().add(8 * j).cast()) };
                    *a = _mm512_add_epi64(*a, x);
                }
            }
            let s = _mm512_add_epi64(
                _mm512_add_epi64(acc[0], acc[1]),
                _mm512_add_epi64(acc[2], acc[3]),
            );
            _mm512_reduce_add_epi64(s) as u64
        }
        // SAFETY: the CPU has AVX-512 F (checked just above).
        return unsafe { run(part) };
    }
    let mut acc = [0u64; 8];
    for block in part.chunks_exact(8) {
        for (a, &x) in acc.iter_mut().zip(block) {
            *a = a.wrapping_add(x);
        }
    }
    acc.iter().fold(0, |s, &x| s.wrapping_add(x))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe's streaming read sums what a plain loop sums (whatever the CPU runs it with), so
    /// it reads every byte it claims to.
    #[test]
    fn the_read_probe_reads_every_value() {
        let part: Vec<u64> = (0..10_000u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        let whole = part.len() / 32 * 32;
        let expected = part[..whole].iter().fold(0u64, |s, &x| s.wrapping_add(x));
        assert_eq!(stream_sum(&part[..whole]), expected);
    }

    /// A round's probe slices read the buffer once, every value in one slice, and none is
    /// smaller than the floor (bar the last) however many steps a round has.
    #[test]
    fn probe_slices_cover_the_buffer_once() {
        assert_eq!(ReadProbe::slices_for(0), 1);
        assert_eq!(ReadProbe::slices_for(1), 1);
        assert_eq!(ReadProbe::slices_for(7), 7);
        assert_eq!(ReadProbe::slices_for(128), 16);
        let buf: Vec<u64> = (0..1000).collect();
        for slices in [1, 3, 7, 16, 999, 1000] {
            let parts: Vec<&[u64]> = (0..slices).map(|i| slice_of(&buf, i, slices)).collect();
            assert_eq!(parts.concat(), buf, "{slices} slices");
            assert!(parts.iter().all(|p| !p.is_empty()), "{slices} slices");
        }
        assert!(slice_of(&buf, 5, 3).is_empty());
    }
}
