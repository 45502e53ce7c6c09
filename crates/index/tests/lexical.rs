//! Lexical (BM25) and hybrid search on the index: exact words found where vectors are random,
//! the saved lexical index kept in step through upserts, removals, saves and reopenings (and
//! rebuilt when its files are damaged or absent), and hybrid ranking equal to reciprocal rank
//! fusion of the two lists computed apart.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use thinkrag_index::{
    hybrid_candidates, reciprocal_rank_fusion, Hit, Index, NewChunk, SearchMode, RRF_K,
};

const DIM: usize = 16;

fn ids(hits: &[Hit<'_>]) -> Vec<u64> {
    hits.iter().map(|h| h.chunk.id).collect()
}

fn current_generation(dir: &Path) -> PathBuf {
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    dir.join(manifest["generation"].as_str().unwrap())
}

/// Documents of a few chunks each; chunk text mentions the document's own command.
fn corpus() -> Vec<(String, Vec<String>)> {
    let commands = [
        "apt-get install --no-install-recommends",
        "dpkg-reconfigure tzdata",
        "update-alternatives --config editor",
        "systemctl mask getty@tty1",
        "debconf-set-selections",
    ];
    commands
        .iter()
        .enumerate()
        .map(|(d, cmd)| {
            let texts = (0..4)
                .map(|i| match i {
                    0 => format!("To do this, run {cmd} as root. Section {d}."),
                    _ => format!("General notes about the system, paragraph {i} of part {d}."),
                })
                .collect();
            (format!("/docs/manual{d}.pdf"), texts)
        })
        .collect()
}

fn upsert(index: &mut Index, source: &str, texts: &[String], seed: u64) {
    let chunks: Vec<NewChunk> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| NewChunk {
            text: t.clone(),
            page: Some(i as u32 + 1),
            start: 0,
            end: t.len(),
        })
        .collect();
    let vectors = common::unit_vectors(texts.len(), DIM, seed);
    index
        .upsert_document(
            source,
            &format!("hash{seed}"),
            texts.len() as u32,
            chunks,
            vectors,
        )
        .unwrap();
}

fn sample() -> Index {
    let mut index = Index::new(common::embedder(DIM));
    for (d, (source, texts)) in corpus().iter().enumerate() {
        upsert(&mut index, source, texts, d as u64);
    }
    index
}

fn top_source<'a>(hits: &'a [Hit<'_>]) -> (&'a str, Option<u32>) {
    (hits[0].chunk.source.as_str(), hits[0].chunk.page)
}

#[test]
fn lexical_search_finds_exact_commands_and_option_strings() {
    let index = sample();
    let hits = index.search_lexical("--no-install-recommends", 5).unwrap();
    assert_eq!(top_source(&hits), ("/docs/manual0.pdf", Some(1)));
    assert!(hits
        .iter()
        .all(|h| h.lexical_score == Some(h.score) && h.vector_score.is_none()));
    assert_eq!(
        top_source(&index.search_lexical("tzdata", 5).unwrap()),
        ("/docs/manual1.pdf", Some(1))
    );
    // The exact sequence outranks chunks that share only some of its words.
    let hits = index
        .search_lexical("update-alternatives --config editor", 5)
        .unwrap();
    assert_eq!(top_source(&hits), ("/docs/manual2.pdf", Some(1)));
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    // No word, no match, no error; k = 0 finds nothing.
    assert!(index.search_lexical("--- ::", 5).unwrap().is_empty());
    assert!(index
        .search_lexical("nonexistentword", 5)
        .unwrap()
        .is_empty());
    assert!(index.search_lexical("tzdata", 0).unwrap().is_empty());
    // search_mode dispatches, and refuses a vector mode without a vector.
    let by_mode = index
        .search_mode(SearchMode::Lexical, "tzdata", None, 3, false)
        .unwrap();
    assert_eq!(
        ids(&by_mode),
        ids(&index.search_lexical("tzdata", 3).unwrap())
    );
    assert!(index
        .search_mode(SearchMode::Hybrid, "tzdata", None, 3, false)
        .is_err());
}

#[test]
fn hybrid_is_reciprocal_rank_fusion_of_both_lists() {
    let index = sample();
    let query_vector = common::unit_vectors(1, DIM, 99).remove(0);
    let text = "systemctl mask getty@tty1";
    let k = 6;
    let depth = hybrid_candidates(k);
    let vector = ids(&index.search(&query_vector, depth).unwrap());
    let lexical = ids(&index.search_lexical(text, depth).unwrap());
    let want: Vec<(u64, f32)> = reciprocal_rank_fusion(&[vector, lexical], RRF_K)
        .into_iter()
        .take(k)
        .collect();
    let hits = index.search_hybrid(text, &query_vector, k, false).unwrap();
    // Below the exact-scan limit the vector candidates are exact either way.
    let exact = index.search_hybrid(text, &query_vector, k, true).unwrap();
    assert_eq!(ids(&exact), ids(&hits));
    let got: Vec<(u64, f32)> = hits.iter().map(|h| (h.chunk.id, h.score)).collect();
    assert_eq!(got, want);
    // The lexical match is among the fused results with both of its scores.
    let exact = hits
        .iter()
        .find(|h| h.chunk.source == "/docs/manual3.pdf" && h.chunk.page == Some(1))
        .expect("the chunk with the command");
    assert!(exact.lexical_score.is_some());
    let cosine = exact.vector_score.unwrap();
    assert!((-1.0..=1.0).contains(&cosine));
    let by_mode = index
        .search_mode(SearchMode::Hybrid, text, Some(&query_vector), k, false)
        .unwrap();
    assert_eq!(ids(&by_mode), ids(&hits));
}

#[test]
fn the_lexical_index_follows_changes_saves_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let mut index = sample();
    // Loaded before the changes below, so they are applied to it incrementally.
    assert_eq!(index.search_lexical("tzdata", 1).unwrap().len(), 1);
    index.save(dir.path()).unwrap();
    let gen = current_generation(dir.path());
    assert!(
        gen.join("lexical/meta.json").is_file(),
        "saved with the generation"
    );

    let mut opened = Index::open(dir.path()).unwrap();
    for q in ["tzdata", "--no-install-recommends", "paragraph 2"] {
        let a: Vec<(u64, f32)> = index
            .search_lexical(q, 10)
            .unwrap()
            .iter()
            .map(|h| (h.chunk.id, h.score))
            .collect();
        let b: Vec<(u64, f32)> = opened
            .search_lexical(q, 10)
            .unwrap()
            .iter()
            .map(|h| (h.chunk.id, h.score))
            .collect();
        assert_eq!(a, b, "{q}");
    }
    // Changes after opening (before any lexical search) reach the saved lexical index.
    let mut reopened = Index::open(dir.path()).unwrap();
    reopened.remove_document("/docs/manual1.pdf");
    upsert(
        &mut reopened,
        "/docs/new.pdf",
        &["Set it with localectl set-keymap".to_string()],
        50,
    );
    assert!(reopened.search_lexical("tzdata", 5).unwrap().is_empty());
    assert_eq!(
        top_source(&reopened.search_lexical("localectl", 5).unwrap()).0,
        "/docs/new.pdf"
    );
    // Replacing a document replaces its words.
    upsert(
        &mut opened,
        "/docs/manual0.pdf",
        &["Nothing about packages here.".to_string()],
        51,
    );
    assert!(opened
        .search_lexical("--no-install-recommends", 5)
        .unwrap()
        .is_empty());
    reopened.save(dir.path()).unwrap();
    let third = Index::open(dir.path()).unwrap();
    assert!(third.search_lexical("tzdata", 5).unwrap().is_empty());
    assert_eq!(
        top_source(&third.search_lexical("localectl", 5).unwrap()).0,
        "/docs/new.pdf"
    );
    assert_eq!(third.search_lexical("paragraph", 100).unwrap().len(), 12);
}

#[test]
fn damaged_or_missing_lexical_files_are_rebuilt_from_the_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let mut index = sample();
    index.save(dir.path()).unwrap();
    let want = ids(&index.search_lexical("debconf-set-selections", 10).unwrap());
    assert!(!want.is_empty());
    let lexical_dir = current_generation(dir.path()).join("lexical");
    for entry in fs::read_dir(&lexical_dir).unwrap() {
        let p = entry.unwrap().path();
        let mut bytes = fs::read(&p).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        fs::write(&p, bytes).unwrap();
    }
    let damaged = Index::open(dir.path()).unwrap();
    assert_eq!(
        ids(&damaged
            .search_lexical("debconf-set-selections", 10)
            .unwrap()),
        want
    );
    // An index saved before lexical search existed: no lexical files, no manifest entry.
    fs::remove_dir_all(&lexical_dir).unwrap();
    for path in [
        dir.path().join("index.json"),
        current_generation(dir.path()).join("manifest.json"),
    ] {
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        manifest.as_object_mut().unwrap().remove("lexical");
        fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    }
    let old = Index::open(dir.path()).unwrap();
    assert_eq!(
        ids(&old.search_lexical("debconf-set-selections", 10).unwrap()),
        want
    );
}
