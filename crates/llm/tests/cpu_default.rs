//! The CPU default for half-precision weights: quantized to Q8_0 on the first load and cached as
//! GGUF beside the hub cache, loaded from that copy on the next start (same logits), full
//! precision one option away, and a damaged copy replaced rather than fatal.

mod common;

use common::*;
use thinkrag_llm::{DTypeChoice, Engine, HubOptions, LoadOptions, LoadProgress, ModelFiles};

/// The tiny fixture re-published in bf16 (config.json says so, the weights are bf16).
fn bf16_model(dir: &std::path::Path) {
    for f in [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture_dir().join(f), dir.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("config.json")).unwrap())
            .unwrap();
    config["torch_dtype"] = "bfloat16".into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let cfg = thinkrag_llm::ModelConfig::from_file(&dir.join("config.json")).unwrap();
    thinkrag_llm::synth::write_random_weights(
        &cfg,
        &dir.join("model.safetensors"),
        thinkrag_llm::synth::SynthDType::Bf16,
        7,
    )
    .unwrap();
}

fn load(
    dir: &std::path::Path,
    cache: &std::path::Path,
    dtype: DTypeChoice,
) -> (Engine, Vec<String>) {
    let opts = LoadOptions {
        dtype,
        hub: HubOptions {
            cache_dir: Some(cache.join("hub")),
            offline: true,
            ..HubOptions::default()
        },
        ..LoadOptions::default()
    };
    let mut notes = Vec::new();
    let e = Engine::from_files(
        ModelFiles::from_dir(dir).unwrap(),
        "bf16-model".into(),
        None,
        &opts,
        &mut |p| {
            if let LoadProgress::Note(n) = p {
                notes.push(n)
            }
        },
    )
    .unwrap();
    (e, notes)
}

fn logits(e: &Engine) -> Vec<f32> {
    let prompt = ids(&reference()["prompt_ids"]);
    let mut s = e.new_session();
    s.feed(e.model(), &prompt)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn cpu_default_quantizes_once_and_loads_the_cached_copy() {
    let model = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    bf16_model(model.path());

    let (first, notes) = load(model.path(), cache.path(), DTypeChoice::Auto);
    assert_eq!(first.model().weights_format(), "q8_0");
    assert!(
        notes
            .iter()
            .any(|n| n.contains("quantized the bfloat16 weights to q8_0")),
        "{notes:?}"
    );
    let cached: Vec<_> = walk(cache.path());
    assert_eq!(cached.len(), 1, "one cached file: {cached:?}");
    assert!(cached[0].starts_with(cache.path().join("thinkrag").join("quantized")));

    let (second, notes) = load(model.path(), cache.path(), DTypeChoice::Auto);
    assert!(notes.iter().any(|n| n.contains("cached at")), "{notes:?}");
    assert_eq!(second.model().weights_format(), "q8_0");
    assert_eq!(
        logits(&first),
        logits(&second),
        "the cached copy is the same model"
    );

    // Full precision is one option away.
    let (full, _) = load(model.path(), cache.path(), DTypeChoice::F32);
    assert_eq!(full.model().weights_format(), "f32");
    // Half precision on a CPU computes in f32, with a note.
    let (half, notes) = load(model.path(), cache.path(), DTypeChoice::Bf16);
    assert_eq!(half.model().weights_format(), "f32");
    assert!(
        notes.iter().any(|n| n.contains("computes in f32")),
        "{notes:?}"
    );

    // A damaged copy is replaced, not fatal.
    let len = std::fs::metadata(&cached[0]).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&cached[0])
        .unwrap();
    f.set_len(len / 2).unwrap();
    let (again, notes) = load(model.path(), cache.path(), DTypeChoice::Auto);
    assert!(notes.iter().any(|n| n.contains("unusable")), "{notes:?}");
    assert_eq!(logits(&again), logits(&first));
    assert_eq!(std::fs::metadata(&cached[0]).unwrap().len(), len);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

for_each_fixture!(cpu_default_quantizes_once_and_loads_the_cached_copy);
