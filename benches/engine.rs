//! Criterion benchmarks of the engine on the 1.5B shape: prefill of a 512-token prompt and decode of
//! 128 tokens at KV positions ~100 and ~4,000 (f32, CPU, 2 threads by default).
//!
//! Needs a model directory of the real shape (random weights are as fast as real ones):
//!   thinkrag synth deepseek-r1-distill-qwen-1.5b --out /tmp/r1-1.5b
//!   THINKRAG_BENCH_MODEL=/tmp/r1-1.5b cargo bench --bench engine
//! THINKRAG_BENCH_MODEL may also be a GGUF file (`thinkrag quantize` writes one).
//! Optional: THINKRAG_BENCH_THREADS (2), THINKRAG_BENCH_DTYPE (f32), THINKRAG_BENCH_GEN (128),
//! THINKRAG_BENCH_QUANTIZE (quantize safetensors at load: q8_0, q4k...).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use thinkrag_llm::bench::bench_tokens;
use thinkrag_llm::model::{CausalLm, Logits};
use thinkrag_llm::{load_model_only, DTypeChoice, DeviceChoice, LoadOptions, Quantization};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn load() -> Option<CausalLm> {
    let Ok(dir) = std::env::var("THINKRAG_BENCH_MODEL") else {
        eprintln!("THINKRAG_BENCH_MODEL is not set: nothing to benchmark (see benches/engine.rs)");
        return None;
    };
    thinkrag_llm::device::set_cpu_threads(env_or("THINKRAG_BENCH_THREADS", 2)).ok()?;
    // As the thinkrag binary does at start-up.
    thinkrag_llm::device::keep_tensor_memory();
    let dtype: DTypeChoice = env_or("THINKRAG_BENCH_DTYPE", DTypeChoice::F32);
    let quantize: Option<Quantization> = std::env::var("THINKRAG_BENCH_QUANTIZE")
        .ok()
        .and_then(|q| q.parse().ok());
    let opts = LoadOptions {
        device: DeviceChoice::Cpu,
        dtype,
        quantize,
        ..LoadOptions::default()
    };
    match load_model_only(dir.as_ref(), &opts, &mut |_| {}) {
        Ok(m) => Some(m),
        Err(e) => {
            eprintln!("cannot load {dir}: {e}");
            None
        }
    }
}

fn engine(c: &mut Criterion) {
    let Some(model) = load() else { return };
    let prompt = bench_tokens(512, model.vocab_size(), 1);
    let mut g = c.benchmark_group("engine");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(60))
        .warm_up_time(Duration::from_secs(5));

    g.throughput(Throughput::Elements(prompt.len() as u64));
    g.bench_function("prefill_512", |b| {
        b.iter_batched(
            || model.new_cache(1024),
            |mut cache| {
                model
                    .forward(&prompt, &mut cache, Logits::Last)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            },
            BatchSize::LargeInput,
        )
    });

    let gen: usize = env_or("THINKRAG_BENCH_GEN", 128);
    let ids = bench_tokens(gen, model.vocab_size(), 2);
    for position in [100usize, 4000] {
        g.throughput(Throughput::Elements(gen as u64));
        g.bench_function(format!("decode_{gen}_at_{position}"), |b| {
            b.iter_batched(
                || {
                    let mut cache = model.new_cache(position + gen + 1);
                    cache.fill_for_benchmark(position).unwrap();
                    cache
                },
                |mut cache| {
                    for &id in &ids {
                        model
                            .forward(&[id], &mut cache, Logits::Last)
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap();
                    }
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();

    // Batched decode: one forward per step for N sequences (what `thinkrag serve` runs), the
    // aggregate throughput in tokens of all sequences.
    let mut g = c.benchmark_group("batched_decode");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(30))
        .warm_up_time(Duration::from_secs(3));
    let steps: usize = env_or("THINKRAG_BENCH_BATCH_STEPS", 16);
    for n in [1usize, 2, 4, 8] {
        let ids: Vec<Vec<u32>> = (0..n)
            .map(|i| bench_tokens(steps, model.vocab_size(), 3 + i as u64))
            .collect();
        g.throughput(Throughput::Elements((n * steps) as u64));
        g.bench_function(format!("{n}_sequences_{steps}_steps_at_100"), |b| {
            b.iter_batched(
                || {
                    (0..n)
                        .map(|_| {
                            let mut cache = model.new_cache(100 + steps + 1);
                            cache.fill_for_benchmark(100).unwrap();
                            cache
                        })
                        .collect::<Vec<_>>()
                },
                |mut caches| {
                    for step in 0..steps {
                        let step_ids: Vec<u32> = ids.iter().map(|v| v[step]).collect();
                        let mut refs: Vec<_> = caches.iter_mut().collect();
                        model
                            .forward_decode(&step_ids, &mut refs)
                            .unwrap()
                            .to_vec2::<f32>()
                            .unwrap();
                    }
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);
