//! Behaviour of the persistent index: save/open round trips, incremental upserts and removals,
//! crash atomicity, error reporting on bad input and damaged files, and score semantics.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use thinkrag_index::{Hit, Index, IndexError, NewChunk};

const DIM: usize = 32;

fn ids(hits: &[Hit<'_>]) -> Vec<u64> {
    hits.iter().map(|h| h.chunk.id).collect()
}

fn id_scores(hits: &[Hit<'_>]) -> Vec<(u64, f32)> {
    hits.iter().map(|h| (h.chunk.id, h.score)).collect()
}

/// An index with `docs` documents of `per_doc` chunks each; returns it and all vectors in id order.
fn sample_index(docs: usize, per_doc: usize, seed: u64) -> (Index, Vec<Vec<f32>>) {
    let vectors = common::unit_vectors(docs * per_doc, DIM, seed);
    let mut index = Index::new(common::embedder(DIM));
    // Small indexes are searched exactly by default; these tests are about the graph.
    index.set_exact_scan_limit(0);
    for d in 0..docs {
        let source = format!("/docs/file{d}.md");
        index
            .upsert_document(
                &source,
                &format!("hash{d}"),
                3,
                common::chunks(&source, per_doc),
                vectors[d * per_doc..(d + 1) * per_doc].to_vec(),
            )
            .unwrap();
    }
    (index, vectors)
}

fn generation_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out
}

fn current_generation(dir: &Path) -> PathBuf {
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    dir.join(manifest["generation"].as_str().unwrap())
}

#[test]
fn save_open_round_trip_gives_identical_results_and_metadata() {
    let (mut index, vectors) = sample_index(5, 60, 1);
    let queries = common::unit_vectors(20, DIM, 2);
    let before: Vec<_> = queries
        .iter()
        .map(|q| id_scores(&index.search(q, 10).unwrap()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested").join("idx");
    index.save(&path).unwrap();

    let mut opened = Index::open(&path).unwrap();
    opened.set_exact_scan_limit(0);
    assert_eq!(opened.info(), index.info());
    assert_eq!(opened.embedder(), index.embedder());
    assert_eq!(
        opened.documents().cloned().collect::<Vec<_>>(),
        index.documents().cloned().collect::<Vec<_>>()
    );
    for id in 0..300 {
        assert_eq!(opened.chunk(id), index.chunk(id));
    }
    for (q, want) in queries.iter().zip(&before) {
        assert_eq!(&id_scores(&opened.search(q, 10).unwrap()), want);
        assert_eq!(
            id_scores(&opened.search_exact(q, 10).unwrap()),
            id_scores(&index.search_exact(q, 10).unwrap())
        );
    }
    // Every stored vector survives bit for bit: it finds itself with score ~1.
    let top = opened.search_exact(&vectors[123], 1).unwrap();
    assert_eq!(top[0].chunk.id, 123);
    assert!((top[0].score - 1.0).abs() < 1e-5);
    assert!(Index::disk_size(&path).unwrap() > (300 * DIM * 4) as u64);

    // Saving again (a graph loaded from disk) and reopening still works.
    opened.save(&path).unwrap();
    let mut again = Index::open(&path).unwrap();
    again.set_exact_scan_limit(0);
    assert_eq!(
        id_scores(&again.search(&queries[0], 10).unwrap()),
        before[0]
    );
    let gens = generation_dirs(&path);
    assert_eq!(
        gens.len(),
        2,
        "the current generation and the one before it (the fallback) remain: {gens:?}"
    );
    opened.save(&path).unwrap();
    assert_eq!(generation_dirs(&path).len(), 2, "older ones are deleted");
}

#[test]
fn empty_index_saves_and_opens() {
    let mut index = Index::new(common::embedder(DIM));
    let q = common::unit_vectors(1, DIM, 3).remove(0);
    assert!(index.search(&q, 5).unwrap().is_empty());
    assert!(index.search_exact(&q, 5).unwrap().is_empty());
    let dir = tempfile::tempdir().unwrap();
    index.save(dir.path()).unwrap();
    let opened = Index::open(dir.path()).unwrap();
    assert!(opened.is_empty());
    assert!(opened.search(&q, 5).unwrap().is_empty());
}

#[test]
fn incremental_upserts_replace_and_remove() {
    let mut index = Index::new(common::embedder(DIM));
    index.set_exact_scan_limit(0);
    let va = common::unit_vectors(40, DIM, 10);
    let vb = common::unit_vectors(30, DIM, 11);
    index
        .upsert_document("a.txt", "ha1", 1, common::chunks("a.txt", 40), va.clone())
        .unwrap();
    index
        .upsert_document("b.txt", "hb1", 2, common::chunks("b.txt", 30), vb.clone())
        .unwrap();
    assert_eq!(index.len(), 70);
    assert_eq!(index.document("a.txt").unwrap().content_hash, "ha1");
    let old_a_ids = index.document("a.txt").unwrap().chunk_ids.clone();
    // Build the graph so later upserts exercise the incremental insert path.
    assert_eq!(index.search(&va[0], 1).unwrap()[0].chunk.id, old_a_ids[0]);

    // Same content again: replaced, counts unchanged.
    index
        .upsert_document("a.txt", "ha1", 1, common::chunks("a.txt", 40), va.clone())
        .unwrap();
    assert_eq!(index.len(), 70);
    assert_eq!(index.info().documents, 2);
    let a_ids = index.document("a.txt").unwrap().chunk_ids.clone();
    assert!(
        a_ids.iter().all(|id| !old_a_ids.contains(id)),
        "ids are never reused"
    );
    assert!(index.chunk(old_a_ids[0]).is_none());

    // Changed content: old chunks are gone from every search, new ones are found.
    let va2 = common::unit_vectors(25, DIM, 12);
    index
        .upsert_document("a.txt", "ha2", 1, common::chunks("a.txt", 25), va2.clone())
        .unwrap();
    assert_eq!(index.len(), 55);
    let new_a_ids = index.document("a.txt").unwrap().chunk_ids.clone();
    for (i, v) in va.iter().enumerate() {
        let hits = index.search(v, 55).unwrap();
        assert!(
            hits.iter().all(|h| !a_ids.contains(&h.chunk.id)),
            "stale chunk for old vector {i}"
        );
        let exact = index.search_exact(v, 55).unwrap();
        assert!(exact.iter().all(|h| !a_ids.contains(&h.chunk.id)));
    }
    for (i, v) in va2.iter().enumerate() {
        let hits = index.search(v, 1).unwrap();
        assert_eq!(hits[0].chunk.id, new_a_ids[i]);
        assert_eq!(hits[0].chunk.text, format!("a.txt chunk {i}"));
        assert_eq!(hits[0].chunk.source, "a.txt");
    }

    // A new document while the graph is current goes into the graph directly.
    let vc = common::unit_vectors(100, DIM, 13);
    index
        .upsert_document("c.txt", "hc", 1, common::chunks("c.txt", 100), vc.clone())
        .unwrap();
    let c_ids = index.document("c.txt").unwrap().chunk_ids.clone();
    for (i, v) in vc.iter().enumerate() {
        assert_eq!(index.search(v, 1).unwrap()[0].chunk.id, c_ids[i]);
    }

    // Removing B: its chunks are never returned again, even asking for everything.
    let b_ids = index.document("b.txt").unwrap().chunk_ids.clone();
    assert!(index.remove_document("b.txt"));
    assert!(!index.remove_document("b.txt"));
    assert!(index.document("b.txt").is_none());
    assert_eq!(index.len(), 125);
    for v in &vb {
        let hits = index.search(v, 200).unwrap();
        assert!(hits.iter().all(|h| !b_ids.contains(&h.chunk.id)));
        assert!(hits.iter().all(|h| h.chunk.source != "b.txt"));
    }

    // Ids stay unique across everything ever assigned, also after a save and reopen.
    let dir = tempfile::tempdir().unwrap();
    index.save(dir.path()).unwrap();
    let mut reopened = Index::open(dir.path()).unwrap();
    reopened.set_exact_scan_limit(0);
    reopened
        .upsert_document(
            "d.txt",
            "hd",
            1,
            common::chunks("d.txt", 5),
            common::unit_vectors(5, DIM, 14),
        )
        .unwrap();
    let d_ids = reopened.document("d.txt").unwrap().chunk_ids.clone();
    let max_before = old_a_ids
        .iter()
        .chain(&a_ids)
        .chain(&new_a_ids)
        .chain(&b_ids)
        .chain(&c_ids)
        .max()
        .copied()
        .unwrap();
    assert!(d_ids.iter().all(|&id| id > max_before));

    // A document with no chunks is still recorded, so unchanged empty files are skipped.
    reopened
        .upsert_document("empty.txt", "he", 0, Vec::new(), Vec::new())
        .unwrap();
    assert_eq!(reopened.document("empty.txt").unwrap().chunk_ids.len(), 0);
    assert!(reopened.remove_document("empty.txt"));
}

#[test]
fn crash_mid_save_leaves_previous_index_and_strays_are_cleaned() {
    let (mut index, vectors) = sample_index(3, 20, 20);
    let dir = tempfile::tempdir().unwrap();
    index.save(dir.path()).unwrap();
    let good_gen = current_generation(dir.path());
    let want = id_scores(&index.search(&vectors[5], 5).unwrap());

    // What a crash part-way through the next save leaves behind: a half-written generation
    // (with a truncated vectors file) and a half-written temporary manifest.
    let partial = dir.path().join("gen-000002");
    fs::create_dir(&partial).unwrap();
    fs::write(partial.join("chunks.jsonl"), b"{\"id\": 0, \"te").unwrap();
    fs::write(partial.join("vectors.f32"), b"TRVECF32\x20").unwrap();
    fs::write(
        dir.path().join("index.json.tmp"),
        b"{\"format\": \"thinkrag-in",
    )
    .unwrap();
    // And a stray from an even older crashed run.
    fs::create_dir(dir.path().join("gen-000000")).unwrap();

    let mut opened = Index::open(dir.path()).unwrap();
    opened.set_exact_scan_limit(0);
    assert_eq!(opened.len(), 60);
    assert_eq!(id_scores(&opened.search(&vectors[5], 5).unwrap()), want);

    opened
        .upsert_document(
            "/docs/new.md",
            "hn",
            1,
            common::chunks("/docs/new.md", 4),
            common::unit_vectors(4, DIM, 21),
        )
        .unwrap();
    opened.save(dir.path()).unwrap();
    let gens = generation_dirs(dir.path());
    assert_eq!(
        gens,
        vec![good_gen.clone(), current_generation(dir.path())],
        "the new generation and the one it replaced remain, the strays are gone"
    );
    assert_ne!(gens[1], good_gen);
    assert_ne!(
        gens[1], partial,
        "a new save never reuses a possibly half-written name"
    );
    assert!(!dir.path().join("index.json.tmp").exists());
    assert_eq!(Index::open(dir.path()).unwrap().len(), 64);
}

#[test]
fn save_refuses_to_overwrite_a_concurrent_writer() {
    let (mut index, _) = sample_index(2, 10, 30);
    let dir = tempfile::tempdir().unwrap();
    index.save(dir.path()).unwrap();
    let mut first = Index::open(dir.path()).unwrap();
    let mut second = Index::open(dir.path()).unwrap();
    first.remove_document("/docs/file0.md");
    first.save(dir.path()).unwrap();
    second.remove_document("/docs/file1.md");
    let err = second.save(dir.path()).unwrap_err();
    assert!(matches!(err, IndexError::Conflict { .. }), "{err}");
    assert_eq!(Index::open(dir.path()).unwrap().len(), 10);
}

#[test]
fn damaged_graph_files_are_rebuilt_from_vectors() {
    let (mut index, vectors) = sample_index(2, 50, 40);
    let dir = tempfile::tempdir().unwrap();
    index.save(dir.path()).unwrap();
    let gen = current_generation(dir.path());
    let mut damaged = 0;
    for entry in fs::read_dir(&gen).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "links0" || e == "upper") {
            let mut bytes = fs::read(&p).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid..].iter_mut().for_each(|b| *b = 0xff);
            fs::write(&p, bytes).unwrap();
            damaged += 1;
        }
    }
    assert_eq!(damaged, 2, "both graph files were found and damaged");
    let opened = Index::open(dir.path()).unwrap();
    assert_eq!(opened.search_hnsw(&vectors[77], 1).unwrap()[0].chunk.id, 77);
}

/// An index whose graph hnsw_rs saved (thinkrag before its own graph) opens with the graph
/// rebuilt from its vectors, and its next save writes the graph in the current format.
#[test]
fn a_graph_in_the_earlier_format_is_rebuilt_and_saved_anew() {
    let (mut index, vectors) = sample_index(2, 50, 40);
    let dir = tempfile::tempdir().unwrap();
    index.save(dir.path()).unwrap();
    let gen = current_generation(dir.path());
    // What an earlier build left: `hnsw.hnsw.graph` and `hnsw.hnsw.data`, no current files.
    fs::rename(gen.join("hnsw.links0"), gen.join("hnsw.hnsw.graph")).unwrap();
    fs::rename(gen.join("hnsw.upper"), gen.join("hnsw.hnsw.data")).unwrap();
    let mut opened = Index::open(dir.path()).unwrap();
    assert_eq!(opened.search_hnsw(&vectors[77], 1).unwrap()[0].chunk.id, 77);
    let extra = common::unit_vectors(5, DIM, 41);
    opened
        .upsert_document(
            "/docs/extra.md",
            "h",
            1,
            common::chunks("/docs/extra.md", 5),
            extra,
        )
        .unwrap();
    opened.save(dir.path()).unwrap();
    let next = current_generation(dir.path());
    assert_ne!(next, gen);
    assert!(next.join("hnsw.links0").exists() && next.join("hnsw.upper").exists());
    let reopened = Index::open(dir.path()).unwrap();
    assert_eq!(
        reopened.search_hnsw(&vectors[77], 1).unwrap()[0].chunk.id,
        77
    );
}

fn expect_corrupt(dir: &Path, file: &str) -> String {
    match Index::open(dir) {
        Err(e @ IndexError::Corrupt { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(file), "message {msg:?} should name {file}");
            msg
        }
        other => panic!("expected Corrupt naming {file}, got {other:?}"),
    }
}

#[test]
fn errors_are_typed_and_helpful() {
    // Missing index.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = Index::open(&missing).unwrap_err();
    assert!(matches!(err, IndexError::NotFound { .. }));
    assert!(err.to_string().contains("ingest documents"), "{err}");
    assert!(matches!(
        Index::open(dir.path()),
        Err(IndexError::NotFound { .. })
    ));
    assert!(matches!(
        Index::disk_size(&missing),
        Err(IndexError::NotFound { .. })
    ));

    let (mut index, vectors) = sample_index(2, 10, 50);
    let saved = dir.path().join("idx");
    index.save(&saved).unwrap();
    let manifest_path = saved.join("index.json");
    let manifest = fs::read(&manifest_path).unwrap();

    // Newer format.
    let mut newer: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    newer["version"] = 999.into();
    newer["something_new"] = "x".into();
    fs::write(&manifest_path, serde_json::to_vec(&newer).unwrap()).unwrap();
    let err = Index::open(&saved).unwrap_err();
    assert!(
        matches!(err, IndexError::NewerFormat { found: 999, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("newer thinkrag (format 999"),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade"), "{err}");

    // Garbage and foreign manifests: the generation's own copy of its manifest stands in, and
    // says so; without that copy the damaged index.json is named.
    let gen = current_generation(&saved);
    let damaged_manifests: [Vec<u8>; 3] = [
        b"\x00\x01 definitely not json".to_vec(),
        br#"{"format": "other-tool", "version": 1}"#.to_vec(),
        {
            let mut traversal: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
            traversal["generation"] = "../../etc".into();
            serde_json::to_vec(&traversal).unwrap()
        },
    ];
    let copy = fs::read(gen.join("manifest.json")).unwrap();
    for damaged in &damaged_manifests {
        fs::write(&manifest_path, damaged).unwrap();
        let opened = Index::open(&saved).unwrap();
        assert_eq!(opened.len(), 20);
        let recovery = opened
            .recovery()
            .expect("fell back to the generation's copy");
        assert!(recovery.damage.contains("index.json"), "{recovery:?}");
        fs::remove_file(gen.join("manifest.json")).unwrap();
        expect_corrupt(&saved, "index.json");
        fs::write(gen.join("manifest.json"), &copy).unwrap();
    }
    fs::write(&manifest_path, &manifest).unwrap();
    assert!(Index::open(&saved).unwrap().recovery().is_none());
    assert_eq!(Index::open(&saved).unwrap().len(), 20);

    // Truncated vectors file.
    let vec_path = gen.join("vectors.f32");
    let vec_bytes = fs::read(&vec_path).unwrap();
    fs::write(&vec_path, &vec_bytes[..vec_bytes.len() - 7]).unwrap();
    let msg = expect_corrupt(&saved, "vectors.f32");
    assert!(msg.contains("truncated"), "{msg}");
    fs::write(&vec_path, &vec_bytes).unwrap();

    // Damaged chunk records and documents.
    let chunks_path = gen.join("chunks.jsonl");
    let chunk_bytes = fs::read(&chunks_path).unwrap();
    fs::write(&chunks_path, &chunk_bytes[..chunk_bytes.len() / 2]).unwrap();
    expect_corrupt(&saved, "chunks.jsonl");
    fs::write(&chunks_path, &chunk_bytes).unwrap();
    let docs_path = gen.join("documents.json");
    fs::write(&docs_path, b"[{\"source\": 3}]").unwrap();
    expect_corrupt(&saved, "documents.json");
    fs::remove_file(&docs_path).unwrap();
    expect_corrupt(&saved, "documents.json");

    // Wrong query dimension, NaN and zero queries.
    let err = index.search(&[0.5; DIM + 1], 3).unwrap_err();
    assert!(
        matches!(err, IndexError::DimensionMismatch { expected: DIM, found, .. } if found == DIM + 1)
    );
    assert!(index.search_exact(&[0.5; 3], 3).is_err());
    let mut nan = vectors[0].clone();
    nan[3] = f32::NAN;
    assert!(matches!(
        index.search(&nan, 3),
        Err(IndexError::InvalidVector { .. })
    ));
    assert!(matches!(
        index.search(&[0.0; DIM], 3),
        Err(IndexError::InvalidVector { .. })
    ));

    // Bad upserts are rejected and leave the index unchanged.
    let before = index.len();
    let err = index
        .upsert_document(
            "/docs/file0.md",
            "h",
            1,
            common::chunks("x", 2),
            vec![nan.clone(), vectors[1].clone()],
        )
        .unwrap_err();
    assert!(matches!(err, IndexError::InvalidVector { .. }), "{err:?}");
    assert!(err.to_string().contains("/docs/file0.md"), "{err}");
    let mut inf = vectors[0].clone();
    inf[0] = f32::INFINITY;
    assert!(index
        .upsert_document("x", "h", 1, common::chunks("x", 1), vec![inf])
        .is_err());
    assert!(matches!(
        index.upsert_document(
            "x",
            "h",
            1,
            common::chunks("x", 1),
            vec![vec![1.0; DIM - 1]]
        ),
        Err(IndexError::DimensionMismatch { .. })
    ));
    assert!(matches!(
        index.upsert_document(
            "x",
            "h",
            1,
            common::chunks("x", 2),
            vec![vectors[0].clone()]
        ),
        Err(IndexError::LengthMismatch {
            chunks: 2,
            vectors: 1,
            ..
        })
    ));
    assert_eq!(index.len(), before);
    assert_eq!(
        index.document("/docs/file0.md").unwrap().chunk_ids.len(),
        10
    );

    // Embedder mismatch.
    let mut other = common::embedder(768);
    other.model = "BAAI/bge-base-en-v1.5".to_string();
    other.pooling = "cls".to_string();
    let err = index.check_embedder(&other).unwrap_err();
    assert!(matches!(err, IndexError::EmbedderMismatch { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("use embedder sentence-transformers/all-MiniLM-L6-v2"),
        "{msg}"
    );
    assert!(msg.contains("new index directory"), "{msg}");
    assert!(msg.contains("BAAI/bge-base-en-v1.5"), "{msg}");
    let mut longer = common::embedder(DIM);
    longer.max_tokens = 512;
    index.check_embedder(&longer).unwrap();
}

#[test]
fn scores_are_cosine_similarities() {
    let (index, _) = sample_index(4, 50, 60);
    // Queries that are not unit length: scores must still be cosines.
    let queries: Vec<Vec<f32>> = common::unit_vectors(20, DIM, 61)
        .into_iter()
        .map(|v| v.into_iter().map(|x| x * 7.5).collect())
        .collect();
    let stored: Vec<Vec<f32>> = common::unit_vectors(200, DIM, 60);
    for q in &queries {
        let approx = index.search(q, 10).unwrap();
        let exact = index.search_exact(q, 10).unwrap();
        assert!(
            exact.windows(2).all(|w| w[0].score >= w[1].score),
            "best first"
        );
        assert!(
            approx.windows(2).all(|w| w[0].score >= w[1].score),
            "best first"
        );
        let qn: f32 = q.iter().map(|x| x * x).sum::<f32>().sqrt();
        for h in approx.iter().chain(&exact) {
            let v = &stored[h.chunk.id as usize];
            let cos = q.iter().zip(v).map(|(a, b)| (a * b) as f64).sum::<f64>() as f32 / qn;
            assert!((h.score - cos).abs() < 1e-5, "{} vs {cos}", h.score);
        }
        for h in &approx {
            if let Some(e) = exact.iter().find(|e| e.chunk.id == h.chunk.id) {
                assert!((h.score - e.score).abs() < 1e-5);
            }
        }
        assert_eq!(ids(&approx)[..5], ids(&exact)[..5]);
    }
    assert!(index.search(&queries[0], 0).unwrap().is_empty());
    assert_eq!(index.search(&queries[0], 10_000).unwrap().len(), 200);
}

#[test]
fn standalone_vector_index_finds_neighbours() {
    use thinkrag_index::{HnswParams, VectorIndex};
    let vectors = common::unit_vectors(500, DIM, 70);
    let mut vi = VectorIndex::build(&vectors, HnswParams::default()).unwrap();
    assert_eq!(vi.len(), 500);
    for (i, v) in vectors.iter().enumerate().step_by(7) {
        let hits = vi.search(v, 3, 64).unwrap();
        assert_eq!(hits[0].0, i);
        assert!((hits[0].1 - 1.0).abs() < 1e-5);
    }
    let more = common::unit_vectors(10, DIM, 71);
    vi.insert_flat(&more.concat()).unwrap();
    assert_eq!(vi.search(&more[3], 1, 64).unwrap()[0].0, 503);
    assert!(vi.search(&[f32::NAN; DIM], 1, 64).is_err());
    assert!(VectorIndex::build_flat(&[1.0; 10], 3, HnswParams::default()).is_err());
    let bad = HnswParams {
        m: 1000,
        ..HnswParams::default()
    };
    assert!(VectorIndex::build(&vectors, bad).is_err());
}

#[test]
fn index_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Index>();
    let _ = NewChunk {
        text: String::new(),
        page: None,
        start: 0,
        end: 0,
    };
}

#[test]
fn a_damaged_current_generation_falls_back_to_the_previous_one() {
    let (mut index, vectors) = sample_index(3, 20, 60);
    let dir = tempfile::tempdir().unwrap();
    index.save(dir.path()).unwrap();
    let first = current_generation(dir.path());
    index
        .upsert_document(
            "/docs/later.md",
            "hl",
            1,
            common::chunks("/docs/later.md", 5),
            common::unit_vectors(5, DIM, 61),
        )
        .unwrap();
    index.save(dir.path()).unwrap();
    let second = current_generation(dir.path());
    assert_ne!(first, second);
    assert_eq!(Index::open(dir.path()).unwrap().len(), 65);

    // The second save was incremental: it hard-linked the first generation's files and wrote
    // the new document's chunks in a segment of its own. One flipped bit inside a chunk's text
    // there: still valid JSON, so only a checksum sees it.
    let chunks_path = fs::read_dir(&second)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.starts_with("chunks-") && name.ends_with(".jsonl")
        })
        .expect("the second generation's own segment");
    let good_chunks = fs::read(&chunks_path).unwrap();
    let mut flipped = good_chunks.clone();
    let at = flipped.windows(7).position(|w| w == b"\"text\":").unwrap() + 9;
    flipped[at] ^= 0x01;
    fs::write(&chunks_path, &flipped).unwrap();
    let opened = Index::open(dir.path()).unwrap();
    assert_eq!(opened.len(), 60, "the previous generation, intact");
    let recovery = opened.recovery().expect("says it fell back");
    assert!(recovery.damage.contains("chunks-gen-"), "{recovery:?}");
    assert!(recovery.damage.contains("checksum"), "{recovery:?}");
    assert_eq!(
        recovery.generation,
        first.file_name().unwrap().to_str().unwrap()
    );
    assert_eq!(opened.search_exact(&vectors[7], 1).unwrap()[0].chunk.id, 7);

    // A save from the recovered index replaces the damaged generation (no false conflict).
    let mut recovered = opened;
    recovered.save(dir.path()).unwrap();
    let reopened = Index::open(dir.path()).unwrap();
    assert!(reopened.recovery().is_none());
    assert_eq!(reopened.len(), 60);
    assert!(!second.exists(), "the damaged generation is gone");

    // A truncated vectors file in the current generation, and the previous one damaged too:
    // the error names the current generation's file.
    let current = current_generation(dir.path());
    let previous = generation_dirs(dir.path())
        .into_iter()
        .find(|g| *g != current)
        .unwrap();
    let vec_path = current.join("vectors.f32");
    let bytes = fs::read(&vec_path).unwrap();
    fs::write(&vec_path, &bytes[..bytes.len() - 100]).unwrap();
    assert!(Index::open(dir.path()).unwrap().recovery().is_some());
    let prev_vectors = previous.join("vectors.f32");
    let mut pv = fs::read(&prev_vectors).unwrap();
    let mid = pv.len() / 2;
    pv[mid] ^= 0x40;
    fs::write(&prev_vectors, &pv).unwrap();
    let msg = expect_corrupt(dir.path(), "vectors.f32");
    assert!(msg.contains(current.to_str().unwrap()), "{msg}");
}
