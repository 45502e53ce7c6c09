//! The synthetic corpus the index benches share: documents of 50 chunks of about 1,000
//! characters of Zipf-distributed words (a 30,000-word vocabulary, like English text), each chunk
//! ending in an option string of its own (`option --flag-D-I`), with random 384-d unit vectors.

use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal, Zipf};
use thinkrag_index::{EmbedderInfo, NewChunk};

/// Chunks per document.
pub const PER_DOC: usize = 50;
/// Vector dimension (MiniLM's, bge-small's).
pub const DIM: usize = 384;
const VOCAB: usize = 30_000;

/// Distinct pronounceable words from an index.
fn word(i: usize) -> String {
    const SYL: [&str; 16] = [
        "ka", "to", "ri", "mo", "sen", "la", "pu", "dex", "ni", "ro", "va", "ti", "gor", "el",
        "su", "fa",
    ];
    let mut s = String::new();
    let mut n = i + 1;
    while n > 0 {
        s.push_str(SYL[n % 16]);
        n /= 16;
    }
    s
}

/// A random unit vector of [`DIM`] components.
pub fn unit(rng: &mut StdRng) -> Vec<f32> {
    let v: Vec<f32> = (0..DIM).map(|_| StandardNormal.sample(rng)).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

/// The embedder the bench indexes record.
pub fn embedder() -> EmbedderInfo {
    EmbedderInfo {
        model: "bench/random-384".into(),
        dim: DIM,
        pooling: "mean".into(),
        normalized: true,
        max_tokens: 256,
        source: None,
    }
}

/// The vocabulary and its word-frequency distribution.
pub struct Corpus {
    words: Vec<String>,
    zipf: Zipf<f64>,
}

impl Corpus {
    pub fn new() -> Self {
        Self {
            words: (0..VOCAB).map(word).collect(),
            zipf: Zipf::new(VOCAB as f64, 1.07).unwrap(),
        }
    }

    /// A word drawn by frequency.
    pub fn word(&self, rng: &mut StdRng) -> &str {
        &self.words[self.zipf.sample(rng) as usize - 1]
    }

    /// Document `d`: its [`PER_DOC`] chunks (pages 1..) and their vectors.
    pub fn document(&self, rng: &mut StdRng, d: usize) -> (Vec<NewChunk>, Vec<Vec<f32>>) {
        let chunks = (0..PER_DOC)
            .map(|i| {
                let mut text = String::with_capacity(1100);
                while text.len() < 1000 {
                    text.push_str(self.word(rng));
                    text.push(' ');
                }
                text.push_str(&format!("option --flag-{d}-{i}"));
                NewChunk {
                    page: Some(i as u32 + 1),
                    start: 0,
                    end: text.len(),
                    text,
                }
            })
            .collect();
        let vectors = (0..PER_DOC).map(|_| unit(rng)).collect();
        (chunks, vectors)
    }
}
