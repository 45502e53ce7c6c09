//! thinkrag's HNSW index on the clustered vector set of `../shared/reference/ann-bench/`
//! (`DUMP_ONLY=1 python ann_bench.py DIR` writes `DIR/{X.f32,Q.f32,gt.u32}`), timed as that
//! README asks: build on all threads, then one query per call on one thread, 50 warm-up queries,
//! the median of 3 passes over the 1,000 queries, recall@10 against the exact top 10.
//!
//! `cargo run --release -p thinkrag-index --example ann_files -- DIR [M] [EF_CONSTRUCTION]`

use std::time::Instant;

use thinkrag_index::{dot, HnswParams, VectorIndex};

const DIM: usize = 384;
const K: usize = 10;

fn read_le<T>(path: &std::path::Path, parse: fn([u8; 4]) -> T) -> Vec<T> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| parse([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: ann_files DIR [M] [EF_C]"));
    let m: usize = args.next().map_or(16, |v| v.parse().expect("M"));
    let ef_construction: usize = args.next().map_or(200, |v| v.parse().expect("EF_C"));
    let x = read_le(&dir.join("X.f32"), f32::from_le_bytes);
    let q = read_le(&dir.join("Q.f32"), f32::from_le_bytes);
    let gt = read_le(&dir.join("gt.u32"), u32::from_le_bytes);
    let params = HnswParams {
        m,
        ef_construction,
        ..HnswParams::default()
    };
    let started = Instant::now();
    let index = VectorIndex::build_flat(&x, DIM, params).expect("valid vectors");
    let build = started.elapsed().as_secs_f64();
    println!(
        "RESULT thinkrag build {} x {DIM}, M={m} efC={ef_construction}, all threads: {build:.1} s",
        x.len() / DIM
    );
    let queries: Vec<&[f32]> = q.chunks_exact(DIM).collect();
    // One query per call, on this thread only.
    // The exact scan the index uses below its scan limit, for the same queries: every dot
    // product on this thread, then the top 10.
    let exact = |query: &[f32]| {
        let mut scored: Vec<(usize, f32)> = x
            .chunks_exact(DIM)
            .map(|v| dot(query, v))
            .enumerate()
            .collect();
        scored.select_nth_unstable_by(K - 1, |a, b| b.1.total_cmp(&a.1));
        scored.truncate(K);
        scored
    };
    let started = Instant::now();
    for query in queries.iter().take(200) {
        std::hint::black_box(exact(query));
    }
    let per_query = started.elapsed().as_secs_f64() / 200.0;
    println!(
        "RESULT exact scan 1 thread: {:.0} QPS, {:.3} ns per component",
        1.0 / per_query,
        per_query * 1e9 / x.len() as f64
    );
    // `EFS=64,96,128` sets the search widths timed (default 64, 128, 256).
    let efs: Vec<usize> = std::env::var("EFS").map_or(vec![64, 128, 256], |v| {
        v.split(',')
            .map(|e| e.trim().parse().expect("EFS"))
            .collect()
    });
    for ef in efs {
        let search = |query: &[f32]| index.search(query, K, ef).expect("valid query");
        for query in queries.iter().take(50) {
            std::hint::black_box(search(query));
        }
        let mut passes = Vec::new();
        let mut found = 0;
        for _ in 0..3 {
            let started = Instant::now();
            found = 0;
            for (i, query) in queries.iter().enumerate() {
                let truth = &gt[i * K..(i + 1) * K];
                found += search(query)
                    .iter()
                    .filter(|(id, _)| truth.contains(&(*id as u32)))
                    .count();
            }
            passes.push(started.elapsed().as_secs_f64());
        }
        passes.sort_by(f64::total_cmp);
        let qps = queries.len() as f64 / passes[1];
        let recall = found as f64 / (queries.len() * K) as f64;
        println!(
            "RESULT thinkrag ef={ef} 1 thread single queries: {qps:.0} QPS, recall@10={recall:.4}"
        );
    }
}
