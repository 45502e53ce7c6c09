//! What one document's change costs in a 100,000-chunk index (384-d vectors, ~1,000-character
//! chunks, 50 chunks a document, the HNSW graph in use): the time and the bytes written by adding,
//! replacing and removing one document and saving, against a save that writes everything (what
//! every save did before incremental saves), and the time to reopen. One-shot timings, printed
//! as a table.
//!
//!     cargo bench -p thinkrag-index --bench incremental

mod corpus;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

use corpus::{unit, Corpus, DIM, PER_DOC};
use rand::rngs::StdRng;
use rand::SeedableRng;
use thinkrag_index::Index;

const CHUNKS: usize = 100_000;

/// Bytes of the current generation's files that its save wrote (one link), and of all of them.
fn written_bytes(dir: &Path) -> (u64, u64) {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let gen = dir.join(manifest["generation"].as_str().unwrap());
    let (mut written, mut total) = (0, 0);
    let mut stack = vec![gen];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
                continue;
            }
            total += m.len();
            if m.nlink() == 1 {
                written += m.len();
            }
        }
    }
    // The manifest itself is rewritten every time.
    let index_json = std::fs::metadata(dir.join("index.json")).unwrap().len();
    (written + index_json, total + index_json)
}

fn row(what: &str, seconds: f64, bytes: Option<(u64, u64)>) {
    match bytes {
        Some((w, t)) => println!(
            "| {what} | {seconds:.3} | {:.2} | {:.1} |",
            w as f64 / 1e6,
            t as f64 / 1e6
        ),
        None => println!("| {what} | {seconds:.3} | | |"),
    }
}

fn main() {
    let mut rng = StdRng::seed_from_u64(7);
    let corpus = Corpus::new();
    let mut index = Index::new(corpus::embedder());
    let docs = CHUNKS / PER_DOC;
    for d in 0..docs {
        let (chunks, vectors) = corpus.document(&mut rng, d);
        index
            .upsert_document(
                &format!("/corpus/doc{d}.pdf"),
                &format!("h{d}"),
                50,
                chunks,
                vectors,
            )
            .unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("index");
    println!(
        "| step ({} chunks, {} documents) | seconds | MB written | MB in the generation |",
        CHUNKS, docs
    );
    println!("| --- | ---: | ---: | ---: |");
    let t = Instant::now();
    index.save(&dir).unwrap();
    row(
        "first save (builds the graph, writes everything)",
        t.elapsed().as_secs_f64(),
        Some(written_bytes(&dir)),
    );

    let t = Instant::now();
    let mut index = Index::open(&dir).unwrap();
    row("open", t.elapsed().as_secs_f64(), None);
    let q = unit(&mut rng);
    let t = Instant::now();
    index.search_hnsw(&q, 10).unwrap();
    row(
        "first graph search after open",
        t.elapsed().as_secs_f64(),
        None,
    );

    let (chunks, vectors) = corpus.document(&mut rng, docs);
    let t = Instant::now();
    index
        .upsert_document("/corpus/new.pdf", "hnew", 50, chunks, vectors)
        .unwrap();
    let upsert = t.elapsed().as_secs_f64();
    let t = Instant::now();
    index.save(&dir).unwrap();
    row(
        &format!("add one document: upsert ({upsert:.3} s) + save"),
        upsert + t.elapsed().as_secs_f64(),
        Some(written_bytes(&dir)),
    );

    let (chunks, vectors) = corpus.document(&mut rng, 1);
    let t = Instant::now();
    index
        .upsert_document("/corpus/doc1.pdf", "h1-changed", 50, chunks, vectors)
        .unwrap();
    let upsert = t.elapsed().as_secs_f64();
    let t = Instant::now();
    index.save(&dir).unwrap();
    row(
        &format!("change one document: upsert ({upsert:.3} s) + save"),
        upsert + t.elapsed().as_secs_f64(),
        Some(written_bytes(&dir)),
    );

    let t = Instant::now();
    index.remove_document("/corpus/doc2.pdf");
    let remove = t.elapsed().as_secs_f64();
    let t = Instant::now();
    index.search_hnsw(&q, 10).unwrap();
    let search = t.elapsed().as_secs_f64();
    let t = Instant::now();
    index.save(&dir).unwrap();
    row(
        &format!("remove one document ({remove:.3} s), search the graph ({search:.3} s), save"),
        remove + search + t.elapsed().as_secs_f64(),
        Some(written_bytes(&dir)),
    );

    let t = Instant::now();
    let reopened = Index::open(&dir).unwrap();
    row(
        "open after three incremental saves",
        t.elapsed().as_secs_f64(),
        None,
    );
    assert_eq!(reopened.len(), index.len());

    // What every save cost before: everything written afresh (and, after a removal, the graph
    // rebuilt from all vectors).
    let full = tmp.path().join("full");
    let t = Instant::now();
    index.save(&full).unwrap();
    row(
        "a save that writes everything (as every save did before)",
        t.elapsed().as_secs_f64(),
        Some(written_bytes(&full)),
    );
    let flat: Vec<f32> = (0..CHUNKS).flat_map(|_| unit(&mut rng)).collect();
    let t = Instant::now();
    thinkrag_index::VectorIndex::build_flat(&flat, DIM, thinkrag_index::HnswParams::default())
        .unwrap();
    row(
        "rebuilding the graph of 100,000 vectors (what a removal cost before)",
        t.elapsed().as_secs_f64(),
        None,
    );
}
