//! Benchmarks the HNSW graph on 20,000 random 384-dimensional unit vectors: build time,
//! queries/s at the smallest ef reaching recall@10 >= 0.95, and exact search for comparison.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use thinkrag_index::{dot, EmbedderInfo, HnswParams, Index, NewChunk, VectorIndex};

const N: usize = 20_000;
const DIM: usize = 384;
const QUERIES: usize = 200;
const K: usize = 10;

/// `n` Gaussian vectors, L2-normalised, laid end to end.
fn unit_vectors(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut flat = Vec::with_capacity(n * DIM);
    for _ in 0..n {
        let v: Vec<f32> = (0..DIM).map(|_| StandardNormal.sample(&mut rng)).collect();
        let norm = dot(&v, &v).sqrt();
        flat.extend(v.iter().map(|x| x / norm));
    }
    flat
}

fn exact(flat: &[f32], q: &[f32], k: usize) -> Vec<usize> {
    let mut scored: Vec<(usize, f32)> = flat
        .chunks_exact(DIM)
        .map(|v| dot(q, v))
        .enumerate()
        .collect();
    scored.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    scored.into_iter().take(k).map(|(i, _)| i).collect()
}

fn recall(index: &VectorIndex, queries: &[f32], truth: &[Vec<usize>], ef: usize) -> f64 {
    let mut found = 0;
    for (q, t) in queries.chunks_exact(DIM).zip(truth) {
        let got = index.search(q, K, ef).expect("valid query");
        found += got.iter().filter(|(id, _)| t.contains(id)).count();
    }
    found as f64 / (truth.len() * K) as f64
}

fn bench(c: &mut Criterion) {
    let data = unit_vectors(N, 7);
    let queries = unit_vectors(QUERIES, 8);
    let params = HnswParams::default();

    // One build takes half a minute on 2 cores; criterion's minimum of 10 samples would take
    // five, so the build is timed once.
    let started = Instant::now();
    let index = VectorIndex::build_flat(&data, DIM, params).expect("valid vectors");
    println!(
        "params {params:?}: one build of {N} x {DIM} took {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let truth: Vec<Vec<usize>> = queries
        .chunks_exact(DIM)
        .map(|q| exact(&data, q, K))
        .collect();
    let mut chosen = None;
    // Random isotropic vectors need a far wider search than text embeddings do, hence the
    // range up to 2048.
    for ef in [16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048] {
        let r = recall(&index, &queries, &truth, ef);
        println!("ef {ef:>3}: recall@{K} = {r:.4}");
        if r >= 0.95 && chosen.is_none() {
            chosen = Some((ef, r));
        }
    }
    let (ef, r) = chosen.unwrap_or((2048, recall(&index, &queries, &truth, 2048)));
    let default_ef = params.ef_for(K);
    let r_default = recall(&index, &queries, &truth, default_ef);
    println!("benchmarking ef {ef} (recall@{K} {r:.4}) and default ef {default_ef} (recall@{K} {r_default:.4})");

    let mut group = c.benchmark_group("search_k10");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(QUERIES as u64));
    for (name, ef) in [
        (format!("hnsw_ef{ef}"), ef),
        (format!("hnsw_default_ef{default_ef}"), default_ef),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                for q in queries.chunks_exact(DIM) {
                    std::hint::black_box(index.search(q, K, ef).expect("valid query"));
                }
            })
        });
    }
    group.bench_function("exact", |b| {
        b.iter(|| {
            for q in queries.chunks_exact(DIM) {
                std::hint::black_box(exact(&data, q, K));
            }
        })
    });
    group.finish();
}

/// Reopening a saved 20k index: graph loaded from its dump versus rebuilt from the
/// stored vectors (what happens when the dump is missing or damaged). Timed once each.
fn reopen(data: &[f32]) {
    let embedder = EmbedderInfo {
        model: "bench".to_string(),
        dim: DIM,
        pooling: "mean".to_string(),
        normalized: true,
        max_tokens: 256,
        source: None,
    };
    let mut index = Index::new(embedder);
    index.set_exact_scan_limit(0);
    let vectors: Vec<Vec<f32>> = data.chunks_exact(DIM).map(<[f32]>::to_vec).collect();
    let chunks = (0..N)
        .map(|i| NewChunk {
            text: format!("chunk {i}"),
            page: None,
            start: 0,
            end: 0,
        })
        .collect();
    index
        .upsert_document("all.txt", "h", 1, chunks, vectors)
        .expect("valid vectors");
    let dir = tempfile::tempdir().expect("temp dir");
    let started = Instant::now();
    index.save(dir.path()).expect("save");
    println!(
        "save (graph build + write): {:.2} s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "disk size: {:.1} MiB",
        Index::disk_size(dir.path()).expect("size") as f64 / (1024.0 * 1024.0)
    );

    let started = Instant::now();
    let loaded = Index::open(dir.path()).expect("open");
    loaded.search_hnsw(&data[..DIM], K).expect("search");
    println!(
        "open + first HNSW search, graph loaded from dump: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    drop(loaded);

    for gen in std::fs::read_dir(dir.path()).expect("dir") {
        let gen = gen.expect("entry").path();
        if gen.is_dir() {
            for f in std::fs::read_dir(&gen).expect("gen dir") {
                let f = f.expect("entry").path();
                if f.extension().is_some_and(|e| e == "links0" || e == "upper") {
                    std::fs::remove_file(f).expect("remove");
                }
            }
        }
    }
    let started = Instant::now();
    let rebuilt = Index::open(dir.path()).expect("open");
    rebuilt.search_hnsw(&data[..DIM], K).expect("search");
    println!(
        "open + first HNSW search, graph rebuilt from vectors: {:.2} s",
        started.elapsed().as_secs_f64()
    );
}

fn bench_reopen(_c: &mut Criterion) {
    reopen(&unit_vectors(N, 7));
}

criterion_group!(benches, bench, bench_reopen);
criterion_main!(benches);
