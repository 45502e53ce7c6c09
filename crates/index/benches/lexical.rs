//! The lexical (BM25) half of the index at the scale: 100,000 chunks of ~1,000
//! characters of Zipf-distributed words (a 30,000-word vocabulary, like English text) with 384-d
//! vectors. One-shot timings (building, saving, reopening, one-document upserts) are printed;
//! criterion times lexical and hybrid queries.
//!
//!     cargo bench -p thinkrag-index --bench lexical

mod corpus;

use std::time::Instant;

use corpus::{unit, Corpus, PER_DOC};
use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use thinkrag_index::Index;

const CHUNKS: usize = 100_000;

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(3);
    let corpus = Corpus::new();
    let mut index = Index::new(corpus::embedder());
    for d in 0..CHUNKS / PER_DOC {
        let (chunks, vectors) = corpus.document(&mut rng, d);
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
    let (chunks, vectors) = corpus.document(&mut rng, 5);
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
                .map(|_| corpus.word(&mut rng).to_string())
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
