//! Shared helpers for the integration tests: seeded random unit vectors and a test embedder.
//! Not every test file uses every helper.
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use thinkrag_index::{EmbedderInfo, NewChunk};

/// A plausible embedder description of dimension `dim`.
pub fn embedder(dim: usize) -> EmbedderInfo {
    EmbedderInfo {
        model: "sentence-transformers/all-MiniLM-L6-v2".to_string(),
        dim,
        pooling: "mean".to_string(),
        normalized: true,
        max_tokens: 256,
        source: None,
    }
}

/// `n` seeded Gaussian vectors of `dim` components, L2-normalised.
pub fn unit_vectors(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let v: Vec<f32> = (0..dim).map(|_| StandardNormal.sample(&mut rng)).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / norm).collect()
        })
        .collect()
}

/// `n` chunks whose text names `source` and the chunk number.
pub fn chunks(source: &str, n: usize) -> Vec<NewChunk> {
    (0..n)
        .map(|i| NewChunk {
            text: format!("{source} chunk {i}"),
            page: Some(i as u32 / 10 + 1),
            start: i * 100,
            end: i * 100 + 99,
        })
        .collect()
}

/// `n` seeded unit vectors with the structure of real embeddings (the "lowrank" set of
/// shared/reference/ann-bench): a random rank-32 signal plus isotropic noise of 0.3.
pub fn lowrank_vectors(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let rank = 32;
    let basis: Vec<Vec<f32>> = (0..rank)
        .map(|_| (0..dim).map(|_| StandardNormal.sample(&mut rng)).collect())
        .collect();
    let scale = 1.0 / (rank as f32).sqrt();
    (0..n)
        .map(|_| {
            let z: Vec<f32> = (0..rank).map(|_| StandardNormal.sample(&mut rng)).collect();
            let v: Vec<f32> = (0..dim)
                .map(|j| {
                    let signal: f32 = z.iter().zip(&basis).map(|(zi, b)| zi * b[j]).sum();
                    let noise: f32 = StandardNormal.sample(&mut rng);
                    signal * scale + 0.3 * noise
                })
                .collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / norm).collect()
        })
        .collect()
}
