//! The cross-encoder reranker against transformers: the tiny random XLM-RoBERTa classifier of
//! tests/fixtures/tiny-reranker (scripts/make_reranker_fixture.py) scores query/passage pairs
//! (short, truncated, non-English, empty passage) as XLMRobertaForSequenceClassification does,
//! within 1e-4, batched with padding or one at a time; bad model directories are clear errors.

use std::path::PathBuf;

use thinkrag_embed::{EmbedError, EmbedderSource, Reranker, RerankerOptions};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-reranker")
}

fn load(batch_size: usize) -> Reranker {
    let opts = RerankerOptions {
        batch_size,
        ..RerankerOptions::default()
    };
    Reranker::load(&EmbedderSource::Dir(fixture()), &opts).unwrap()
}

#[test]
fn scores_match_transformers() {
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("reference.json")).unwrap()).unwrap();
    let pairs = reference["pairs"].as_array().unwrap();
    assert_eq!(
        load(4).max_tokens(),
        reference["max_length"].as_u64().unwrap() as usize
    );
    for batch_size in [1, 3, 16] {
        let reranker = load(batch_size);
        for p in pairs {
            let query = p["query"].as_str().unwrap();
            let got = reranker
                .score(query, &[p["passage"].as_str().unwrap()])
                .unwrap()[0];
            let want = p["score"].as_f64().unwrap() as f32;
            assert!(
                (got - want).abs() < 1e-4,
                "{query:?} batch {batch_size}: {got} vs {want}"
            );
        }
    }
    // Several passages of one query in one padded batch score as they do alone.
    let reranker = load(16);
    let query = pairs[0]["query"].as_str().unwrap();
    let passages: Vec<&str> = pairs
        .iter()
        .map(|p| p["passage"].as_str().unwrap())
        .collect();
    let together = reranker.score(query, &passages).unwrap();
    for (i, passage) in passages.iter().enumerate() {
        let alone = reranker.score(query, &[passage]).unwrap()[0];
        assert!(
            (together[i] - alone).abs() < 1e-4,
            "{i}: {} vs {alone}",
            together[i]
        );
    }
    // rerank orders by score, keeps `keep`, ties in retrieval order.
    let ranked = reranker.rerank(query, passages.clone(), |p| p, 3).unwrap();
    assert_eq!(ranked.len(), 3);
    let mut sorted = together.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    assert_eq!(ranked.iter().map(|r| r.1).collect::<Vec<_>>(), sorted[..3]);
    assert!(reranker.score(query, &[]).unwrap().is_empty());
}

#[test]
fn bad_model_directories_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = Reranker::load(
        &EmbedderSource::Dir(dir.path().to_path_buf()),
        &RerankerOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, EmbedError::MissingFile { .. }), "{e}");
    for f in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture().join(f), dir.path().join(f)).unwrap();
    }
    // An embedding model is not a reranker.
    let config = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["BertModel"]);
    std::fs::write(&config, cfg.to_string()).unwrap();
    let e = Reranker::load(
        &EmbedderSource::Dir(dir.path().to_path_buf()),
        &RerankerOptions::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("XLMRobertaForSequenceClassification"),
        "{e}"
    );
    // Truncated weights.
    std::fs::copy(fixture().join("config.json"), &config).unwrap();
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let e = Reranker::load(
        &EmbedderSource::Dir(dir.path().to_path_buf()),
        &RerankerOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, EmbedError::Weights { .. }), "{e}");
}
