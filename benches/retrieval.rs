//! Criterion benchmarks of retrieval: embedding throughput (passages/s) at batch 32 on
//! benches/data/passages.jsonl (the passages scripts/bench_embeddings.py also gives
//! sentence-transformers), at the default precision (bf16 on AMX tiles where the CPU has them) and
//! in f32, of the real all-MiniLM-L6-v2 or the model directory THINKRAG_BENCH_EMBEDDER names; and
//! document ingestion (reading and chunking PDF pages, pages/s).
//!
//!   cargo bench --bench retrieval                  # both groups
//!   python scripts/bench_embeddings.py --threads 2 # embedding, with sentence-transformers as peer
//! Optional: THINKRAG_BENCH_THREADS (2), THINKRAG_BENCH_PASSAGES (64), THINKRAG_BENCH_EMBEDDER.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use thinkrag::embed::test_models::minilm_dir;
use thinkrag::embed::{Embedder, EmbedderOptions, EmbedderPrecision, EmbedderSource};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn passages() -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/data/passages.jsonl");
    let n = env_or("THINKRAG_BENCH_PASSAGES", 64usize);
    std::fs::read_to_string(path)
        .expect("benches/data/passages.jsonl")
        .lines()
        .take(n)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            v["text"].as_str().expect("text").to_string()
        })
        .collect()
}

fn embed(c: &mut Criterion) {
    let threads = env_or("THINKRAG_BENCH_THREADS", 2usize);
    thinkrag_llm::device::set_cpu_threads(threads).expect("threads");
    // As the thinkrag binary does at start-up.
    thinkrag_llm::device::keep_tensor_memory();
    thinkrag::embed::request_amx_tiles();
    let dir = std::env::var_os("THINKRAG_BENCH_EMBEDDER")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(minilm_dir);
    let label = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "embedder".into());
    let texts = passages();
    let mut group = c.benchmark_group("embed");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Elements(texts.len() as u64));
    // The vectors of both precisions, for the script's cosine against sentence-transformers.
    let mut vectors = serde_json::Map::new();
    for (precision, suffix, name) in [
        (EmbedderPrecision::Auto, "", "default"),
        (EmbedderPrecision::F32, "_f32", "f32"),
    ] {
        let opts = EmbedderOptions {
            batch_size: 32,
            precision,
            ..EmbedderOptions::default()
        };
        let embedder = Embedder::load(&EmbedderSource::Dir(dir.clone()), &opts).expect("embedder");
        eprintln!("{label}{suffix}: AMX tiles {}", embedder.uses_amx());
        let out = embedder.embed_passages(&texts).expect("embeds");
        vectors.insert(name.into(), serde_json::json!(out.vectors));
        group.bench_function(format!("{label}_batch32{suffix}"), |b| {
            b.iter(|| embedder.embed_passages(&texts).expect("embeds"))
        });
    }
    group.finish();
    if let Some(path) = std::env::var_os("THINKRAG_BENCH_VECTORS") {
        let json = serde_json::Value::Object(vectors).to_string();
        std::fs::write(&path, json).expect("THINKRAG_BENCH_VECTORS is writable");
    }
}

/// Reading and chunking a generated 40-page PDF (about 1,400 characters a page): the part of
/// ingestion that is not embedding.
fn ingest(c: &mut Criterion) {
    use thinkrag_ingest::test_pdfs::{pdf_bytes, pdf_with_pages};
    let sentence = "The metro area population of the city grew by 0.8% in 2023 after a decade of steady increases";
    let lines: Vec<String> = (0..16).map(|i| format!("{i}. {sentence}.")).collect();
    let page: Vec<&str> = lines.iter().map(String::as_str).collect();
    let pages: Vec<&[&str]> = (0..40).map(|_| page.as_slice()).collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("report.pdf");
    std::fs::write(&path, pdf_bytes(pdf_with_pages(&pages))).expect("write the PDF");
    let chunker = thinkrag_ingest::Chunker::chars(512, 30).expect("chunker");
    let mut group = c.benchmark_group("ingest");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(pages.len() as u64));
    group.bench_function("pdf_40_pages_read_and_chunk", |b| {
        b.iter(|| {
            let doc = thinkrag_ingest::load_document(&path).expect("loads");
            assert_eq!(doc.pages.len(), 40);
            chunker.chunk(&doc)
        })
    });
    group.finish();
}

criterion_group!(benches, embed, ingest);
criterion_main!(benches);
