//! Parity with sentence-transformers on the real all-MiniLM-L6-v2: our vectors for a committed set
//! of sentences match the reference (scripts/make_embedding_reference.py) within cosine 0.9999,
//! including a sentence cut at the 256-token limit, in one batch and one at a time.

use std::path::PathBuf;

use thinkrag_embed::test_models::minilm_dir;
use thinkrag_embed::{
    request_amx_tiles, Embedder, EmbedderOptions, EmbedderPrecision, EmbedderSource, Pooling,
};

struct Reference {
    sentences: Vec<String>,
    tokens: Vec<usize>,
    vectors: Vec<Vec<f32>>,
}

fn reference() -> Reference {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/minilm/reference.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let strings = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    Reference {
        sentences: strings("sentences"),
        tokens: v["untruncated_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect(),
        vectors: v["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect(),
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

fn minilm() -> Embedder {
    minilm_with(EmbedderPrecision::Auto)
}

fn minilm_with(precision: EmbedderPrecision) -> Embedder {
    // As the thinkrag binary does at start: tiles where the CPU has them.
    request_amx_tiles();
    let mut opts = EmbedderOptions {
        batch_size: 5,
        precision,
        ..EmbedderOptions::default()
    };
    // scripts/gpu-check.sh runs these on a GPU.
    if let Ok(d) = std::env::var("THINKRAG_TEST_DEVICE") {
        opts.device = match d.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(n)) => candle_core::Device::new_cuda(n),
            _ if d == "cuda" => candle_core::Device::new_cuda(0),
            _ => Ok(candle_core::Device::Cpu),
        }
        .unwrap_or_else(|e| panic!("THINKRAG_TEST_DEVICE={d}: {e}"));
    }
    Embedder::load(&EmbedderSource::Dir(minilm_dir()), &opts).expect("MiniLM loads")
}

/// The default: bf16 projections on AMX tiles where the CPU has them, f32 elsewhere.
#[test]
fn vectors_match_sentence_transformers() {
    let e = minilm();
    eprintln!("AMX tiles: {}", e.uses_amx());
    check_against_reference(e);
}

#[test]
fn f32_vectors_match_sentence_transformers() {
    let e = minilm_with(EmbedderPrecision::F32);
    assert!(!e.uses_amx());
    check_against_reference(e);
}

/// The tiled path's CLS pooling (BGE's) against f32's, on the real MiniLM weights: the mean
/// pooling above is checked against sentence-transformers itself.
#[test]
fn cls_pooled_vectors_agree_across_precisions() {
    request_amx_tiles();
    let load = |precision| {
        let opts = EmbedderOptions {
            pooling: Some(Pooling::Cls),
            precision,
            ..EmbedderOptions::default()
        };
        Embedder::load(&EmbedderSource::Dir(minilm_dir()), &opts).expect("MiniLM loads")
    };
    let r = reference();
    let (auto, f32) = (load(EmbedderPrecision::Auto), load(EmbedderPrecision::F32));
    let a = auto.embed_passages(&r.sentences).unwrap();
    let b = f32.embed_passages(&r.sentences).unwrap();
    for (i, (x, y)) in a.vectors.iter().zip(&b.vectors).enumerate() {
        let c = cosine(x, y);
        assert!(c >= 0.9999, "sentence {i}: cosine {c} between precisions");
    }
}

fn check_against_reference(e: Embedder) {
    let r = reference();
    let spec = e.spec();
    assert_eq!(spec.model, "sentence-transformers/all-MiniLM-L6-v2");
    assert_eq!(
        (spec.dim, spec.pooling, spec.max_tokens),
        (384, Pooling::Mean, 256)
    );
    assert_eq!(
        spec.query_instruction, None,
        "MiniLM has no query instruction"
    );

    let out = e.embed_passages(&r.sentences).unwrap();
    assert_eq!(out.vectors.len(), r.sentences.len());
    let over_limit = r.tokens.iter().filter(|&&t| t > 256).count();
    assert!(
        over_limit >= 1,
        "the reference set has a sentence over the limit"
    );
    assert_eq!(out.truncated, over_limit, "truncation is counted");
    let mut worst = 1.0f32;
    for (i, (ours, theirs)) in out.vectors.iter().zip(&r.vectors).enumerate() {
        let norm: f32 = ours.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(
            (norm - 1.0).abs() < 1e-5,
            "vector {i} is unit length: {norm}"
        );
        let c = cosine(ours, theirs);
        assert!(
            c >= 0.9999,
            "sentence {i} ({:?}): cosine {c}",
            r.sentences[i]
        );
        worst = worst.min(c);
    }
    eprintln!("lowest cosine against sentence-transformers: {worst:.7}");

    // Batching (padding, masks, reordering) must not change any vector.
    for (i, s) in r.sentences.iter().enumerate().take(4) {
        let alone = e.embed_passages(&[s]).unwrap();
        let c = cosine(&alone.vectors[0], &out.vectors[i]);
        assert!(c > 0.99999, "sentence {i} alone vs in a batch: {c}");
    }

    // Token counts before truncation agree with the reference tokenizer.
    for (s, &t) in r.sentences.iter().zip(&r.tokens) {
        assert_eq!(e.count_tokens(s).unwrap(), t, "{s:?}");
    }
}

#[test]
fn queries_rank_the_relevant_passage_first() {
    let e = minilm();
    let passages = [
        "Miami's metro population rose from 6.17 million in 2021 to 6.27 million in 2023.",
        "The Seattle Seahawks play American football at Lumen Field.",
        "Bread is made from flour, water, yeast and salt.",
    ];
    let p = e.embed_passages(&passages).unwrap();
    let q = e
        .embed_query("How many people live in the Miami area?")
        .unwrap();
    let scores: Vec<f32> = p.vectors.iter().map(|v| cosine(v, &q)).collect();
    assert!(scores[0] > scores[1] && scores[0] > scores[2], "{scores:?}");
}

#[test]
fn bad_model_directories_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let err = Embedder::load(
        &EmbedderSource::Dir(dir.into()),
        &EmbedderOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("config.json"), "{err}");

    // A truncated weights file.
    let src = minilm_dir();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let weights = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &weights[..weights.len() / 3]).unwrap();
    let opts = EmbedderOptions {
        pooling: Some(Pooling::Mean),
        ..EmbedderOptions::default()
    };
    let err = Embedder::load(&EmbedderSource::Dir(dir.into()), &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated or corrupt"), "{err}");

    // Unknown pooling without 1_Pooling/config.json.
    let err = Embedder::load(
        &EmbedderSource::Dir(dir.into()),
        &EmbedderOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("pooling is unknown") && err.contains("cls"),
        "{err}"
    );

    // Not a BERT.
    std::fs::write(dir.join("config.json"), r#"{"model_type": "qwen2"}"#).unwrap();
    let err = Embedder::load(&EmbedderSource::Dir(dir.into()), &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("BERT"), "{err}");

    let err = EmbedderSource::parse("no-such-embedder")
        .unwrap_err()
        .to_string();
    assert!(err.contains("bge-base-en-v1.5"), "{err}");
}

/// Batches sized by tokens change which passages share a forward pass, never their vectors:
/// one passage per batch and every passage in one batch agree, and with sentence-transformers.
#[test]
fn the_batch_plan_does_not_change_the_vectors() {
    let r = reference();
    let load = |max_batch_tokens| {
        let opts = EmbedderOptions {
            max_batch_tokens,
            ..EmbedderOptions::default()
        };
        Embedder::load(&EmbedderSource::Dir(minilm_dir()), &opts).unwrap()
    };
    let single = load(1).embed_passages(&r.sentences).unwrap();
    let together = load(1 << 20).embed_passages(&r.sentences).unwrap();
    for (i, ((a, b), theirs)) in single
        .vectors
        .iter()
        .zip(&together.vectors)
        .zip(&r.vectors)
        .enumerate()
    {
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-5,
            "sentence {i}: batched alone and together differ by {diff}"
        );
        assert!(cosine(a, theirs) >= 0.9999, "sentence {i}");
    }
}
