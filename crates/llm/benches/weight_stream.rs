//! How close the quantized decode products come to the memory's read rate: one activation row
//! against about 1 GiB of distinct weights of one format and shape (so every byte comes from
//! memory, as in a decode step), against two peers measured in the same run: the read probe
//! `thinkrag bench` uses, and plain streaming reads of buffers of the same size in as many
//! parallel regions (what a product would get if multiplying cost nothing). A last column runs
//! the first layer alone over and over, its weights in the CPU's caches where they fit: the
//! kernels' arithmetic ceiling, which tells a product bound by arithmetic from one bound by memory.
//! Where the CPU has AVX-512, the AVX2 kernels stream the same weights in the same rounds too (in
//! turn with the AVX-512 ones, which go first every other round), and their ratio to the AVX-512
//! products is the median of the rounds' ratios: this host's speed moves between runs.
//!   cargo bench -p thinkrag-llm --bench weight_stream
//! Optional: THINKRAG_BENCH_THREADS (2), THINKRAG_BENCH_ROUNDS (5).

mod support;

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use thinkrag_llm::bench::{read_in_parallel, ReadProbe, TileKernels};
use thinkrag_llm::model::{Linear, Weight};

/// Bytes of weights each case streams per round.
const STREAM_BYTES: usize = 1 << 30;

fn main() {
    support::set_threads_from_env();
    let rounds: usize = std::env::var("THINKRAG_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let probe = ReadProbe::new();
    // The AVX2 kernels as a peer, where they are not already the ones thinkrag runs.
    let peer = TileKernels::Avx512Vnni.available() && TileKernels::Avx2.available();
    println!(
        "| weights | format | products GB/s | regions GB/s | probe GB/s | products / probe | cached GB/s | AVX2 products GB/s | AVX2 / products |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    // The 1.5B's MLP up/gate and down, and its attention's query/output, shapes.
    for (name, n, k) in [
        ("up 8960x1536", 8960, 1536),
        ("down 1536x8960", 1536, 8960),
        ("q 1536x1536", 1536, 1536),
    ] {
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let w = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu).expect("weights");
            let q = Arc::new(QTensor::quantize(&w, dtype).expect("quantize"));
            let bytes = q.storage_size_in_bytes();
            let copies = STREAM_BYTES / bytes;
            // Each layer lays out its own copy of the tiles on first use.
            let layers: Vec<Linear> = (0..copies)
                .map(|_| Linear::new(Weight::Quantized(Arc::clone(&q)), None))
                .collect();
            let avx2: Vec<Linear> = if peer {
                (0..copies)
                    .map(|_| {
                        Linear::with_tile_kernels(Arc::clone(&q), TileKernels::Avx2)
                            .expect("AVX2 tiles")
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let x = Tensor::randn(0f32, 1.0, (1, 1, k), &Device::Cpu).expect("input");
            for l in layers.iter().chain(&avx2) {
                l.forward_rows(&x).expect("forward");
            }
            let plain: Vec<Vec<u64>> = (0..copies).map(|c| vec![c as u64; bytes / 8]).collect();
            let total = (copies * bytes) as f64;
            let stream = |layers: &[Linear]| {
                let t = Instant::now();
                for l in layers {
                    std::hint::black_box(l.forward_rows(&x).expect("forward"));
                }
                total / t.elapsed().as_secs_f64() / 1e9
            };
            let (mut products, mut regions, mut probes, mut cached) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut peers = Vec::new();
            for round in 0..rounds {
                if peer && round % 2 == 1 {
                    peers.push(stream(&avx2));
                }
                products.push(stream(&layers));
                if peer && round % 2 == 0 {
                    peers.push(stream(&avx2));
                }
                let t = Instant::now();
                for b in &plain {
                    read_in_parallel(b);
                }
                regions.push(total / t.elapsed().as_secs_f64() / 1e9);
                probes.push(probe.measure());
                let t = Instant::now();
                for _ in 0..copies {
                    std::hint::black_box(layers[0].forward_rows(&x).expect("forward"));
                }
                cached.push(total / t.elapsed().as_secs_f64() / 1e9);
            }
            let ratios: Vec<f64> = products.iter().zip(&probes).map(|(p, r)| p / r).collect();
            let (peer_rate, peer_ratio) = if peer {
                let r: Vec<f64> = peers.iter().zip(&products).map(|(a, p)| a / p).collect();
                (
                    format!("{:.1}", median(&peers)),
                    format!("{:.2}", median(&r)),
                )
            } else {
                ("-".to_string(), "-".to_string())
            };
            println!(
                "| {name} | {dtype:?} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {peer_rate} | {peer_ratio} |",
                median(&products),
                median(&regions),
                median(&probes),
                median(&ratios),
                median(&cached)
            );
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
