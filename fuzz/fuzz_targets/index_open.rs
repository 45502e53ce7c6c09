//! The index loader on arbitrary bytes: a valid two-generation index is written once, then each
//! run replaces one of its files (the first input byte picks which) with the rest of the input
//! and opens it. Open must fail with an error or succeed with an index that searches; a panic,
//! abort or hang is a finding. Checksums are verified after parsing, so the parsers are reached.
#![no_main]

use std::fs;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use thinkrag_index::{EmbedderInfo, Index, NewChunk};

const DIM: usize = 8;
const FILES: [&str; 5] = [
    "index.json",
    "manifest.json",
    "chunks.jsonl",
    "documents.json",
    "vectors.f32",
];

/// The files of a saved index, by path relative to its directory.
fn template() -> &'static Vec<(PathBuf, Vec<u8>)> {
    static FILES_OF: OnceLock<Vec<(PathBuf, Vec<u8>)>> = OnceLock::new();
    FILES_OF.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let embedder = EmbedderInfo {
            model: "fuzz".into(),
            dim: DIM,
            pooling: "mean".into(),
            normalized: true,
            max_tokens: 128,
            source: None,
        };
        let mut index = Index::new(embedder);
        for doc in 0..3u32 {
            let source = format!("/docs/{doc}.md");
            let chunks: Vec<NewChunk> = (0..4)
                .map(|i| NewChunk {
                    text: format!("document {doc} chunk {i}"),
                    page: Some(i + 1),
                    start: 0,
                    end: 10,
                })
                .collect();
            let vectors: Vec<Vec<f32>> = (0..4)
                .map(|i| (0..DIM).map(|d| ((doc * 7 + i * 3 + d as u32) % 5) as f32 + 0.5).collect())
                .collect();
            index.upsert_document(&source, "hash", 4, chunks, vectors).unwrap();
            index.save(dir.path()).unwrap();
        }
        let mut out = Vec::new();
        for entry in walk(dir.path()) {
            let rel = entry.strip_prefix(dir.path()).unwrap().to_path_buf();
            out.push((rel, fs::read(&entry).unwrap()));
        }
        out
    })
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    let files = template();
    let dir = tempfile::tempdir().unwrap();
    // The newest generation's copy of a file is the one replaced (the fallback stays intact
    // unless the byte's high bit asks for the older one).
    let name = FILES[usize::from(which) % FILES.len()];
    let mut candidates: Vec<&PathBuf> = files
        .iter()
        .map(|(p, _)| p)
        .filter(|p| p.file_name().is_some_and(|n| n == name))
        .collect();
    candidates.sort();
    let target = if which & 0x80 != 0 { candidates.first() } else { candidates.last() };
    for (rel, content) in files {
        let path = dir.path().join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let content = if Some(&rel) == target { bytes } else { content.as_slice() };
        fs::write(&path, content).unwrap();
    }
    if let Ok(index) = Index::open(dir.path()) {
        let query = vec![1.0f32; DIM];
        let _ = index.search(&query, 3);
        let _ = index.search_exact(&query, 3);
        for chunk in index.chunks() {
            let _ = index.chunk(chunk.id);
        }
    }
});
