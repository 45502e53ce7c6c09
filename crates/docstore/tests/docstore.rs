//! The document store with the real MiniLM embedder: bulk semantics (create conflicts, partial
//! updates, deletes, a bad document failing alone), long documents chunked yet found once, vector
//! search ranked by best chunk, and persistence through the log and checkpoints.

use std::sync::Arc;

use serde_json::json;
use thinkrag::embed::test_models::minilm_dir;
use thinkrag::embed::{Embedder, EmbedderOptions, EmbedderSource};
use thinkrag_docstore::{DocOp, DocStore, DocStoreError};

fn embedder() -> Arc<Embedder> {
    let source = EmbedderSource::parse(minilm_dir().to_str().unwrap()).unwrap();
    Arc::new(Embedder::load(&source, &EmbedderOptions::default()).unwrap())
}

fn index(id: &str, text: &str) -> DocOp {
    DocOp::Index {
        id: Some(id.into()),
        source: json!({"text": text, "n": id}),
    }
}

#[test]
fn bulk_ops_apply_in_order_and_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = DocStore::open(dir.path(), embedder()).unwrap();
    let c = store.get_or_create("docs").unwrap();
    let out = store
        .bulk(
            &c,
            vec![
                index("a", "Miami is in Florida."),
                DocOp::Create {
                    id: Some("a".into()),
                    source: json!({"text": "again"}),
                },
                DocOp::Update {
                    id: "a".into(),
                    doc: json!({"extra": {"k": 1}}),
                    doc_as_upsert: false,
                    upsert: None,
                },
                DocOp::Update {
                    id: "b".into(),
                    doc: json!({"text": "Chicago is in Illinois."}),
                    doc_as_upsert: true,
                    upsert: None,
                },
                DocOp::Index {
                    id: Some("c".into()),
                    source: json!("not an object"),
                },
                DocOp::Delete { id: "zz".into() },
            ],
        )
        .unwrap();
    let statuses: Vec<u16> = out.iter().map(|o| o.status).collect();
    assert_eq!(statuses, [201, 409, 200, 201, 400, 404]);
    assert_eq!(out[2].result, "updated");
    assert_eq!(out[2].version, 2);
    assert_eq!(out[5].result, "not_found");
    let a = c.get("a").unwrap();
    assert_eq!(
        a.source,
        json!({"text": "Miami is in Florida.", "n": "a", "extra": {"k": 1}})
    );
    assert_eq!(a.version, 2);
    assert_eq!(c.len(), 2);
    assert!(c.get("c").is_none());
    // Sequence numbers only grow.
    let seqs: Vec<u64> = out
        .iter()
        .filter(|o| o.error.is_none() && o.status != 404)
        .map(|o| o.seq_no)
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

#[test]
fn a_long_document_is_chunked_but_found_once_and_ranked_by_its_best_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let emb = embedder();
    let store = DocStore::open(dir.path(), Arc::clone(&emb)).unwrap();
    let c = store
        .create(
            "docs",
            json!({}),
            json!({"properties": {"body": {"type": "text"}, "tag": {"type": "keyword"}}}),
        )
        .unwrap();
    let long = (0..60)
        .map(|i| {
            format!("Paragraph {i} is about the migration of arctic terns and their long flights.")
        })
        .collect::<Vec<_>>()
        .join("\n\n");
    let topics = [
        "volcanoes erupt lava",
        "the stock market fell",
        "a recipe for bread",
        "football match results",
    ];
    let mut ops = vec![DocOp::Index {
        id: Some("long".into()),
        source: json!({"body": long, "tag": "birds birds birds"}),
    }];
    for (i, t) in topics.iter().enumerate() {
        ops.push(DocOp::Index {
            id: Some(format!("t{i}")),
            source: json!({"body": t, "tag": "arctic terns"}),
        });
    }
    store.bulk(&c, ops).unwrap();
    assert!(
        c.chunk_count() > 5,
        "the long body is split: {} chunks",
        c.chunk_count()
    );
    assert_eq!(
        c.get("long").unwrap().chunks,
        c.chunk_count() - topics.len()
    );

    let hits = store.search_text(&c, "arctic tern migration", 3).unwrap();
    let ids: Vec<&str> = hits.iter().map(|h| h.doc.id.as_str()).collect();
    assert_eq!(
        ids.len(),
        3,
        "three documents, not three chunks of one: {ids:?}"
    );
    assert_eq!(ids[0], "long");
    // The keyword field is not embedded: "arctic terns" in `tag` did not make t0..t3 match.
    // Every document, best chunk first, in the same order whatever k asks for.
    let q = emb.embed_query("arctic tern migration").unwrap();
    let all = c.search_vector(&q, 10).unwrap();
    assert_eq!(all.len(), 5);
    for w in all.windows(2) {
        assert!(w[0].score >= w[1].score);
        assert_eq!(w[0].cosine, Some(w[0].score));
    }
    assert_eq!(
        &all[..3]
            .iter()
            .map(|h| h.doc.id.as_str())
            .collect::<Vec<_>>(),
        &ids
    );
}

#[test]
fn writes_persist_through_the_log_and_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let emb = embedder();
    {
        let store = DocStore::open(dir.path(), Arc::clone(&emb)).unwrap();
        let c = store.get_or_create("docs").unwrap();
        store
            .bulk(&c, vec![index("a", "alpha"), index("b", "beta")])
            .unwrap();
        store
            .bulk(&c, vec![DocOp::Delete { id: "a".into() }])
            .unwrap();
        // Dropped without a checkpoint: only the log has these.
    }
    let store = DocStore::open(dir.path(), Arc::clone(&emb)).unwrap();
    let c = store.get("docs").unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c.get("b").unwrap().source["text"], "beta");
    store.bulk(&c, vec![index("c", "gamma")]).unwrap();
    store.checkpoint_all().unwrap();
    drop(store);
    let store = DocStore::open(dir.path(), emb).unwrap();
    let c = store.get("docs").unwrap();
    let (total, docs) = c.scan(0, 10);
    assert_eq!(total, 2);
    assert_eq!(
        docs.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["b", "c"]
    );
    assert!(matches!(
        store.create("docs", json!({}), json!({})),
        Err(DocStoreError::AlreadyExists { .. })
    ));
    assert!(matches!(
        store.create("../x", json!({}), json!({})),
        Err(DocStoreError::InvalidName { .. })
    ));
    assert!(store.delete("docs").unwrap());
    assert!(store.get("docs").is_none() && !dir.path().join("indices/docs").exists());
}
