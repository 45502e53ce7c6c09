//! Saves in proportion to the change: removing a document leaves tombstones (no graph rebuild),
//! a save hard-links the previous generation's files and writes only the new slots, the document
//! list and the tombstones; reopening gives exactly what was saved; once removed slots pile up,
//! a save compacts.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thinkrag_index::Index;

const DIM: usize = 32;

fn current_generation(dir: &Path) -> PathBuf {
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    dir.join(manifest["generation"].as_str().unwrap())
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap()
}

/// Files of a generation written by its own save (one link) and shared with another (more).
fn written_and_linked(gen: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut written, mut linked) = (BTreeSet::new(), BTreeSet::new());
    for entry in fs::read_dir(gen).unwrap() {
        let entry = entry.unwrap();
        if !entry.file_type().unwrap().is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.metadata().unwrap().nlink() > 1 {
            linked.insert(name);
        } else {
            written.insert(name);
        }
    }
    (written, linked)
}

fn add(index: &mut Index, d: usize, per_doc: usize, seed: u64) -> Vec<Vec<f32>> {
    let source = format!("/docs/file{d}.md");
    let vectors = common::unit_vectors(per_doc, DIM, seed);
    index
        .upsert_document(
            &source,
            &format!("hash{d}-{seed}"),
            1,
            common::chunks(&source, per_doc),
            vectors.clone(),
        )
        .unwrap();
    vectors
}

/// Every query's exact and graph hits, by id, for comparing an index with its reopened self.
fn answers(index: &Index, queries: &[Vec<f32>]) -> Vec<(Vec<u64>, Vec<u64>)> {
    queries
        .iter()
        .map(|q| {
            let exact = index.search_exact(q, 10).unwrap();
            let graph = index.search_hnsw(q, 10).unwrap();
            (
                exact.iter().map(|h| h.chunk.id).collect(),
                graph.iter().map(|h| h.chunk.id).collect(),
            )
        })
        .collect()
}

#[test]
fn saves_write_only_what_changed_and_reopen_to_the_same_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut index = Index::new(common::embedder(DIM));
    index.set_exact_scan_limit(0); // the graph is in use and saved
    for d in 0..20 {
        add(&mut index, d, 30, d as u64);
    }
    index.save(dir.path()).unwrap();
    let first = current_generation(dir.path());
    assert_eq!(
        manifest(dir.path())["version"],
        1,
        "a first save is a plain one"
    );

    // Add one, replace one, remove one.
    let added = add(&mut index, 100, 30, 100);
    let replaced = add(&mut index, 3, 12, 103);
    assert!(index.remove_document("/docs/file7.md"));
    assert_eq!(index.len(), 20 * 30 + 30 + 12 - 30 - 30);
    let queries: Vec<Vec<f32>> = common::unit_vectors(12, DIM, 999)
        .into_iter()
        .chain([added[4].clone(), replaced[0].clone()])
        .collect();
    let before = answers(&index, &queries);
    // Removed chunks never come back, from the scan or the graph, and k hits still do.
    for (exact, graph) in &before {
        assert_eq!((exact.len(), graph.len()), (10, 10));
    }
    index.save(dir.path()).unwrap();
    let second = current_generation(dir.path());
    let m = manifest(dir.path());
    assert_eq!(m["version"], 2);
    assert_eq!(m["segments"].as_array().unwrap().len(), 2);
    assert_eq!(m["tombstones"].as_array().unwrap().len(), 30 + 30);
    let (written, linked) = written_and_linked(&second);
    assert!(
        linked.contains("chunks.jsonl") && linked.contains("vectors.f32"),
        "the first generation's segment is shared: {linked:?}"
    );
    assert!(
        linked.iter().any(|n| n.ends_with(".links0"))
            && linked.iter().any(|n| n.ends_with(".upper")),
        "the graph dump is shared, not rebuilt: {linked:?}"
    );
    let new_segment: Vec<_> = written
        .iter()
        .filter(|n| n.starts_with("vectors-"))
        .collect();
    assert_eq!(new_segment.len(), 1, "{written:?}");
    let segment_bytes = fs::metadata(second.join(new_segment[0])).unwrap().len();
    assert_eq!(
        segment_bytes,
        24 + (30 + 12) * DIM as u64 * 4,
        "only the 42 new vectors"
    );
    assert!(
        first.exists(),
        "the previous generation stays as the fallback"
    );

    // Reopened: the same index.
    let reopened = Index::open(dir.path()).unwrap();
    assert_eq!(reopened.len(), index.len());
    assert_eq!(answers(&reopened, &queries), before);
    assert!(reopened.document("/docs/file7.md").is_none());
    assert_eq!(
        reopened.document("/docs/file3.md").unwrap().chunk_ids.len(),
        12
    );
    let all: BTreeSet<u64> = reopened.chunks().map(|c| c.id).collect();
    assert_eq!(all.len(), reopened.len());

    // Another small change on top of the reopened index: a third segment, still shared files.
    let mut reopened = reopened;
    add(&mut reopened, 101, 5, 101);
    reopened.save(dir.path()).unwrap();
    let third = current_generation(dir.path());
    assert_eq!(
        manifest(dir.path())["segments"].as_array().unwrap().len(),
        3
    );
    assert!(written_and_linked(&third).1.contains("chunks.jsonl"));
    let again = Index::open(dir.path()).unwrap();
    assert_eq!(again.len(), index.len() + 5);

    // Removing past a quarter of the slots: the next save compacts into one plain segment.
    let mut again = again;
    for d in 8..20 {
        assert!(again.remove_document(&format!("/docs/file{d}.md")));
    }
    let left = again.len();
    let queries = common::unit_vectors(8, DIM, 4242);
    let before = answers(&again, &queries);
    again.save(dir.path()).unwrap();
    let m = manifest(dir.path());
    assert_eq!(m["version"], 1, "compacted: {m}");
    assert!(m.get("tombstones").is_none() && m.get("segments").is_none());
    let (written, _) = written_and_linked(&current_generation(dir.path()));
    assert!(written.contains("chunks.jsonl") && written.contains("vectors.f32"));
    let compacted = Index::open(dir.path()).unwrap();
    assert_eq!(compacted.len(), left);
    let after = answers(&compacted, &queries);
    for ((e1, _), (e2, _)) in before.iter().zip(&after) {
        assert_eq!(e1, e2, "exact answers survive the compaction");
    }
}

#[test]
fn a_damaged_shared_segment_is_named_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut index = Index::new(common::embedder(DIM));
    for d in 0..4 {
        add(&mut index, d, 10, d as u64);
    }
    index.save(dir.path()).unwrap();
    add(&mut index, 9, 10, 9);
    index.save(dir.path()).unwrap();
    // A bit flip in the shared first segment reaches both generations (one file, two links):
    // opening fails naming it rather than serving damaged text.
    let path = current_generation(dir.path()).join("chunks.jsonl");
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.windows(7).position(|w| w == b"\"text\":").unwrap() + 9;
    bytes[at] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    let err = Index::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("chunks.jsonl") && err.contains("checksum"),
        "{err}"
    );
}
