//! The lexical (BM25) half of the index at the scale: 100,000 chunks of ~1,000
//! characters of Zipf-distributed words (a 30,000-word vocabulary, like English text) with 384-d
//! vectors. One-shot timings (building, saving, reopening, one-document upserts) are printed;
//! criterion times lexical and hybrid queries.
//!
//!     cargo bench -p thinkrag-index --bench lexical

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal, Zipf};
use thinkrag_index::{EmbedderInfo, Index, NewChunk};

const CHUNKS: usize = 100_000;
const PER_DOC: usize = 50;
const DIM: usize = 384;
const VOCAB: usize = 30_000;

fn word(i: usize) -> String {
    // Distinct pronounceable words from an index.
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

fn unit(rng: &mut StdRng) -> Vec<f32> {
    let v: Vec<f32> = (0..DIM).map(|_| StandardNormal.sample(rng)).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

fn document(
    rng: &mut StdRng,
    words: &[String],
    zipf: &Zipf<f64>,
    d: usize,
) -> (Vec<NewChunk>, Vec<Vec<f32>>) {
    let chunks = (0..PER_DOC)
        .map(|i| {
            let mut text = String::with_capacity(1100);
            while text.len() < 1000 {
                let w = zipf.sample(rng) as usize - 1;
                text.push_str(&words[w]);
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

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(3);
    let words: Vec<String> = (0..VOCAB).map(word).collect();
    let zipf = Zipf::new(VOCAB as f64, 1.07).unwrap();
    let mut index = Index::new(EmbedderInfo {
        model: "bench".into(),
        dim: DIM,
        pooling: "mean".into(),
        normalized: true,
        max_tokens: 256,
        source: None,
    });
    for d in 0..CHUNKS / PER_DOC {
        let (chunks, vectors) = document(&mut rng, &words, &zipf, d);
        index
            .upsert_document(
                &format!("/doc{d}.pdf"),
                "h",
                PER_DOC as u32,
                chunks,
                vectors,
            )
            .unwrap();
    }
    let t = Instant::now();
    let first = index.search_lexical("option --flag-7-3", 10).unwrap();
    assert_eq!(first[0].chunk.source, "/doc7.pdf");
    println!(
        "lexical index built from {CHUNKS} chunks in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    index.save(dir.path()).unwrap();
    let save = t.elapsed().as_secs_f64();
    let gen = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    let size = |p: &std::path::Path| -> u64 {
        std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    println!(
        "save (vectors, chunks, graph, lexical): {save:.1} s; lexical files {:.1} MB, vectors {:.1} MB, chunks {:.1} MB",
        size(&gen.join("lexical")) as f64 / 1e6,
        std::fs::metadata(gen.join("vectors.f32")).unwrap().len() as f64 / 1e6,
        std::fs::metadata(gen.join("chunks.jsonl")).unwrap().len() as f64 / 1e6,
    );
    let t = Instant::now();
    let mut opened = Index::open(dir.path()).unwrap();
    let open = t.elapsed().as_secs_f64();
    let t = Instant::now();
    assert_eq!(
        opened.search_lexical("option --flag-9-2", 1).unwrap()[0]
            .chunk
            .source,
        "/doc9.pdf"
    );
    println!(
        "open {open:.2} s, then the saved lexical index loaded and searched in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    // One document replaced in the 100,000-chunk index: the lexical index takes it incrementally.
    let t = Instant::now();
    let (chunks, vectors) = document(&mut rng, &words, &zipf, 5);
    opened
        .upsert_document("/doc5.pdf", "h2", PER_DOC as u32, chunks, vectors)
        .unwrap();
    let hits = opened.search_lexical("option --flag-5-0", 1).unwrap();
    println!(
        "one 50-chunk document replaced and searchable lexically in {:.3} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(hits[0].chunk.source, "/doc5.pdf");

    let queries: Vec<String> = (0..64)
        .map(|_| {
            (0..4)
                .map(|_| words[zipf.sample(&mut rng) as usize - 1].clone())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let vectors: Vec<Vec<f32>> = (0..64).map(|_| unit(&mut rng)).collect();
    let mut group = c.benchmark_group("lexical_100k");
    group.sample_size(20);
    let mut i = 0;
    group.bench_function("bm25_k10", |b| {
        b.iter(|| {
            i = (i + 1) % queries.len();
            index.search_lexical(&queries[i], 10).unwrap().len()
        })
    });
    group.bench_function("hybrid_k10", |b| {
        b.iter(|| {
            i = (i + 1) % queries.len();
            index
                .search_hybrid(&queries[i], &vectors[i], 10, false)
                .unwrap()
                .len()
        })
    });
    let _ = rng.random::<u8>();
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
