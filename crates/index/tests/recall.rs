//! HNSW quality on 20,000 seeded random 384-dimensional unit vectors: all but a handful of stored
//! vectors find themselves first with the default parameters, and recall@10 against exact search reaches 0.98.
//!
//! Random isotropic vectors are the hardest case for HNSW (no cluster structure, all distances
//! nearly equal): the graph needs ef around 2048 for recall@10 >= 0.98 here, versus ~160 for
//! clustered vectors like text embeddings. The index crate is built with optimisations in every
//! profile (see the workspace's `[profile.dev.package.thinkrag-index]`), which keeps this test
//! to seconds.

mod common;

use std::time::Instant;

use rayon::prelude::*;
use thinkrag_index::{HnswParams, Index, VectorIndex};

const N: usize = 20_000;
const DIM: usize = 384;
const QUERIES: usize = 300;
const K: usize = 10;
/// Search width at which the default graph reaches recall@10 >= 0.98 on random data.
const RANDOM_DATA_EF: usize = 2048;

#[test]
fn hnsw_recall_and_self_retrieval_on_random_vectors() {
    let vectors = common::unit_vectors(N, DIM, 42);
    let flat = vectors.concat();
    let params = HnswParams::default();
    let started = Instant::now();
    let graph = VectorIndex::build_flat(&flat, DIM, params).unwrap();
    let build_s = started.elapsed().as_secs_f64();

    // The Index answers the recall queries too, told to scan exactly at this size.
    let mut index = Index::new(common::embedder(DIM));
    index.set_exact_scan_limit(N);
    for d in 0..20 {
        let source = format!("doc{d}.txt");
        let part = vectors[d * 1000..(d + 1) * 1000].to_vec();
        index
            .upsert_document(&source, "h", 1, common::chunks(&source, 1000), part)
            .unwrap();
    }
    assert!(index.len() <= index.exact_scan_limit());

    let queries = common::unit_vectors(QUERIES, DIM, 4242);
    let recalls: Vec<(usize, usize)> = queries
        .par_iter()
        .map(|q| {
            let exact: Vec<usize> = index
                .search_exact(q, K)
                .unwrap()
                .iter()
                .map(|h| h.chunk.id as usize)
                .collect();
            let count = |hits: Vec<(usize, f32)>| {
                assert_eq!(hits.len(), K);
                for (id, score) in &hits {
                    let cos = thinkrag_index::dot(q, &vectors[*id]);
                    assert!((score - cos).abs() < 1e-5, "{score} vs {cos}");
                }
                hits.iter().filter(|(id, _)| exact.contains(id)).count()
            };
            let via_index: Vec<usize> = index
                .search(q, K)
                .unwrap()
                .iter()
                .map(|h| h.chunk.id as usize)
                .collect();
            assert_eq!(via_index, exact);
            (
                count(graph.search(q, K, params.ef_for(K)).unwrap()),
                count(graph.search(q, K, RANDOM_DATA_EF).unwrap()),
            )
        })
        .collect();
    let recall = |f: fn(&(usize, usize)) -> usize| {
        recalls.iter().map(f).sum::<usize>() as f64 / (QUERIES * K) as f64
    };
    let recall_default = recall(|r| r.0);
    let recall_wide = recall(|r| r.1);

    let started = Instant::now();
    let misses: Vec<usize> = (0..N)
        .into_par_iter()
        .filter(|&i| {
            let hits = graph.search(&vectors[i], K, params.ef_for(K)).unwrap();
            hits.first().map(|h| h.0) != Some(i)
        })
        .collect();
    let self_s = started.elapsed().as_secs_f64();

    println!(
        "params {params:?}: build {build_s:.2} s; recall@{K} {recall_default:.4} at default ef {}, \
         {recall_wide:.4} at ef {RANDOM_DATA_EF}; self-retrieval misses {} of {N} at default ef ({self_s:.2} s)",
        params.ef_for(K),
        misses.len()
    );
    // The graph is built in parallel, so it differs from run to run: on these worst-case
    // random vectors a run occasionally leaves a few vectors too far to be found first at the
    // default ef (seen: 0 to 3 of 20,000, the 3 in a CI run of 2026-12-01). A broken graph
    // misses hundreds; 10 (0.05%) keeps that apart from the parallel build's spread.
    assert!(
        misses.len() <= 10,
        "{} of {N} vectors not found first: {misses:?}",
        misses.len()
    );
    assert!(
        recall_wide >= 0.98,
        "recall@{K} at ef {RANDOM_DATA_EF} = {recall_wide}"
    );
}

/// The graph itself, through `Index::search` at its default settings, on vectors shaped like
/// real embeddings: exact scanning is switched off so the graph answers, and recall@10 against
/// exact search must reach 0.95.
#[test]
fn the_graph_at_default_settings_finds_the_true_neighbours_of_clustered_vectors() {
    const N: usize = 10_000;
    let all = common::lowrank_vectors(N + QUERIES, DIM, 7);
    let (vectors, queries) = all.split_at(N);
    let mut index = Index::new(common::embedder(DIM));
    for d in 0..10 {
        let source = format!("doc{d}.txt");
        let part = vectors[d * 1000..(d + 1) * 1000].to_vec();
        index
            .upsert_document(&source, "h", 1, common::chunks(&source, 1000), part)
            .unwrap();
    }
    index.set_exact_scan_limit(0);
    let found: usize = queries
        .par_iter()
        .map(|q| {
            let exact: Vec<u64> = index
                .search_exact(q, K)
                .unwrap()
                .iter()
                .map(|h| h.chunk.id)
                .collect();
            let graph: Vec<u64> = index
                .search(q, K)
                .unwrap()
                .iter()
                .map(|h| h.chunk.id)
                .collect();
            assert_eq!(graph.len(), K);
            graph.iter().filter(|id| exact.contains(id)).count()
        })
        .sum();
    let recall = found as f64 / (QUERIES * K) as f64;
    println!("recall@{K} through the graph at default settings: {recall:.4}");
    assert!(recall >= 0.95, "recall@{K} = {recall}");
}
