//! What the criterion benches of this crate share: the CPU thread count from the environment and
//! the group settings that keep a run to a minute.

use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};

/// Sets candle's CPU threads from `THINKRAG_BENCH_THREADS` (2 if unset), as in the issues'
/// 2-thread targets.
pub fn set_threads_from_env() {
    let threads = std::env::var("THINKRAG_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    thinkrag_llm::device::set_cpu_threads(threads).expect("threads");
}

/// A benchmark group of 10 samples over `measure_s` seconds after a 2-second warm-up.
// Unused by `weight_stream`, which prints its own table.
#[allow(dead_code)]
pub fn group<'a>(c: &'a mut Criterion, name: &str, measure_s: u64) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .measurement_time(Duration::from_secs(measure_s))
        .warm_up_time(Duration::from_secs(2));
    g
}
