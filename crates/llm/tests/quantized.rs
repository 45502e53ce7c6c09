//! Quantized weights on the tiny parity model: how far Q8_0 and Q4_K logits are from f32 (itself
//! checked against transformers in parity.rs), GGUF export and reload (bit-identical to quantizing
//! at load), the tokenizer and chat template rebuilt from GGUF metadata, and the errors users meet.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use thinkrag_llm::{
    DTypeChoice, Engine, KvFormat, LoadOptions, LoadProgress, ModelSource, Quantization,
};

for_each_fixture!(
    q8_0_logits_stay_close_to_f32,
    gguf_export_reloads_bit_identical_to_quantizing_at_load,
    gguf_metadata_carries_tokenizer_and_chat_template,
    greedy_generation_from_gguf_q8_0_matches_f32,
    a_split_gguf_loads_as_the_whole_file,
    an_f16_kv_cache_stays_close_to_f32,
    a_q8_0_kv_cache_stays_close_to_f32,
    a_bf16_kv_cache_stays_close_to_f32,
    a_random_gguf_has_the_quantized_exports_tensors_and_runs,
    a_gguf_beyond_the_memory_runs_in_place_from_the_file,
);

/// Prefill logits (every position) of the reference prompt.
fn prefill_logits(e: &Engine) -> Tensor {
    let prompt = ids(&reference()["prompt_ids"]);
    let mut session = e.new_session();
    session.feed_all(e.model(), &prompt).unwrap()
}

/// The reference prompt's logits fed one token at a time, as decode steps.
fn stepwise_logits(e: &Engine) -> Tensor {
    let prompt = ids(&reference()["prompt_ids"]);
    let mut session = e.new_session();
    let rows: Vec<Tensor> = prompt
        .iter()
        .map(|&t| session.feed_all(e.model(), &[t]).unwrap())
        .collect();
    Tensor::cat(&rows, 0).unwrap()
}

/// At each position where the argmax of `a` over real tokens differs from `b`'s: how far `b`'s
/// top logit is above its logit for `a`'s pick (a near-tie is a small margin).
fn margins_where_top1_differs(a: &Tensor, b: &Tensor, tokens: usize) -> Vec<f32> {
    let a = a.narrow(1, 0, tokens).unwrap().to_vec2::<f32>().unwrap();
    let b = b.narrow(1, 0, tokens).unwrap().to_vec2::<f32>().unwrap();
    let argmax = |r: &[f32]| (0..r.len()).fold(0, |m, i| if r[i] > r[m] { i } else { m });
    a.iter()
        .zip(&b)
        .filter(|(ra, rb)| argmax(ra) != argmax(rb))
        .map(|(ra, rb)| rb[argmax(rb)] - rb[argmax(ra)])
        .collect()
}

/// Fraction of positions whose argmax over real tokens agrees, and the largest logit difference.
fn agreement(a: &Tensor, b: &Tensor, tokens: usize) -> (f32, f32) {
    let a = a.narrow(1, 0, tokens).unwrap();
    let b = b.narrow(1, 0, tokens).unwrap();
    let top_a = a.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let top_b = b.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let same = top_a.iter().zip(&top_b).filter(|(x, y)| x == y).count();
    (same as f32 / top_a.len() as f32, max_abs_diff(&a, &b))
}

fn measure(q: Quantization) -> (f32, f32, f32) {
    let f32_engine = engine(DTypeChoice::F32);
    let reference = prefill_logits(&f32_engine);
    let qe = quantized_engine(q);
    assert_eq!(
        qe.model().dtype(),
        DType::F32,
        "quantized weights compute in f32"
    );
    let got = prefill_logits(&qe);
    let tokens = f32_engine.tokenizer().size();
    let (top1, max_diff) = agreement(&got, &reference, tokens);
    let scale = max_abs(&reference);
    eprintln!(
        "{q}: weights {}, top-1 agreement {:.1}% over {} positions, max |logit diff| {max_diff:.4} (largest |logit| {scale:.2})",
        qe.model().weights_format(),
        top1 * 100.0,
        reference.dim(0).unwrap()
    );
    (top1, max_diff, scale)
}

// Measured 2026-11-29 (AVX-512 VNNI CPU) on the 34-position reference prompt, every matrix of the
// model quantized (hidden 256, logits up to 30.2 in magnitude):
//   Q8_0: top-1 agreement 97.1% (33 of 34 positions), max |logit diff| 1.06
//   Q4_K: top-1 agreement 73.5% (25 of 34 positions), max |logit diff| 8.16
//   tiny-llama, Q8_0: top-1 agreement 88.2% (30 of 34), max |logit diff| 1.15 (logits up to 33.1)
// The random parity model is far more sensitive to weight noise than a trained one (its weights
// are Gaussian with sharp attention, chosen for wide top-1 margins in f32, not for robustness); the
// kernels themselves are held to 2% of the exact product in `linear.rs`. The bounds leave room for
// the other CPU paths (without AVX2 or AVX-512: Q8_0 through the dequantized GEMM, which rounds
// less), and fail on a broken kernel, which agrees on almost no position.
fn q8_0_logits_stay_close_to_f32() {
    let (top1, max_diff, _) = measure(Quantization::Q8_0);
    let bound = match fixture() {
        Fixture::Qwen2 => 0.94,
        Fixture::Llama => 0.85,
    };
    assert!(top1 >= bound, "Q8_0 top-1 agreement {top1}");
    assert!(max_diff < 1.6, "Q8_0 max logit difference {max_diff}");
}

#[test]
fn q4k_logits_stay_close_to_f32() {
    let (top1, max_diff, _) = measure(Quantization::Q4K);
    assert!(top1 >= 0.65, "Q4_K top-1 agreement {top1}");
    assert!(max_diff < 11.0, "Q4_K max logit difference {max_diff}");
}

#[test]
fn every_matrix_of_the_parity_model_is_quantized() {
    let e = quantized_engine(Quantization::Q4K);
    assert_eq!(e.model().weights_format(), "q4k");
    let f = engine(DTypeChoice::F32);
    let ratio = e.model().weights_size_in_bytes() as f64 / f.model().weights_size_in_bytes() as f64;
    // 4.5 bits of 32 for the matrices; norms and biases stay f32.
    assert!(ratio < 0.16, "Q4_K weights take {ratio:.3} of f32's memory");
}

fn gguf_export_reloads_bit_identical_to_quantizing_at_load() {
    for q in [Quantization::Q8_0, Quantization::Q4K] {
        let at_load = prefill_logits(&quantized_engine(q));
        let from_file = prefill_logits(&gguf_engine(q));
        assert_eq!(max_abs_diff(&at_load, &from_file), 0.0, "{q}");
    }
}

fn gguf_metadata_carries_tokenizer_and_chat_template() {
    let original = engine(DTypeChoice::F32);
    let e = gguf_engine(Quantization::Q8_0);
    assert!(
        e.tokenizer()
            .path()
            .extension()
            .is_some_and(|x| x == "gguf"),
        "the tokenizer came from the GGUF metadata, not a file beside it"
    );
    assert_eq!(e.tokenizer().special(), original.tokenizer().special());
    assert_eq!(e.tokenizer().size(), original.tokenizer().size());
    let r = reference_json();
    for case in r["tokenization"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(e.tokenizer().encode(text).unwrap(), want, "{text:?}");
        assert_eq!(e.tokenizer().decode(&want), text);
    }
    let turn2: Vec<thinkrag_llm::Message> =
        serde_json::from_value(r["turn2_messages"].clone()).unwrap();
    assert_eq!(
        e.encode_messages(&turn2).unwrap(),
        ids(&reference()["turn2_ids"]),
        "chat template from GGUF renders as transformers does"
    );
    let (got, want) = (e.model().config(), original.model().config());
    let shape = |c: &thinkrag_llm::ModelConfig| {
        (
            c.architecture,
            c.head_dim,
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.max_position_embeddings,
            c.tie_word_embeddings,
        )
    };
    assert_eq!(shape(got), shape(want));
    assert_eq!(got.rope_inv_freq(), want.rope_inv_freq());
    assert!((got.rms_norm_eps - want.rms_norm_eps).abs() < 1e-12);
}

fn greedy_generation_from_gguf_q8_0_matches_f32() {
    let want = ids(&reference()["greedy_ids"]);
    // An f32 cache, so that only the weights' quantization differs from the reference (the f16
    // cache that is the CPU default for quantized weights moves this tiny random Qwen2 off the
    // reference's path after 9 tokens: an_f16_kv_cache_stays_close_to_f32 measures it).
    let source = ModelSource::parse(gguf_file(Quantization::Q8_0).to_str().unwrap()).unwrap();
    let opts = LoadOptions {
        device: test_device(),
        kv_cache: Some(KvFormat::F32),
        ..LoadOptions::default()
    };
    let e = Engine::load(&source, &opts, &mut |_| {}).unwrap();
    let prompt = ids(&reference()["prompt_ids"]);
    let mut session = e.new_session();
    let mut logits = session.feed_all(e.model(), &prompt).unwrap();
    let tokens = e.tokenizer().size();
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let last = logits.get(logits.dim(0).unwrap() - 1).unwrap();
        let id = last
            .narrow(0, 0, tokens)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        got.push(id);
        logits = session.feed_all(e.model(), &[id]).unwrap();
    }
    let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
    eprintln!(
        "Q8_0 GGUF greedy: first {same} of {} tokens identical to transformers f32",
        want.len()
    );
    assert!(same >= want.len() / 2, "{got:?} vs {want:?}");
}

/// `--kv-cache f16` on the Q8_0 GGUF: the cache holds f16, and the logits of a prefill and of
/// ten decode steps (the decode attention reading f16 directly; both fed the f32 cache's greedy
/// tokens) stay close to the f32 cache's; f16 is the default on CPUs with AVX-512 or AVX2 and
/// F16C. Measured 2026-11-30: max |logit diff| 0.54 (Qwen2) and
/// 0.71 (Llama) against logits up to 30 and 33, about half of what Q8_0 weights themselves
/// move them (1.06); these random tiny models amplify rounding far more than trained ones, and
/// one of the 11 greedy choices (a near-tie) differed.
fn an_f16_kv_cache_stays_close_to_f32() {
    let (_, drift) = drift_from_f32(KvFormat::F16);
    drift.logits_within(0.04);
    // The default: f16 where the CPU widens it fast, as these quantized weights are.
    let auto = load_with_kv(None);
    // (The decode attention's fused kernels: AVX-512 F, or AVX2 with FMA and F16C.)
    #[cfg(target_arch = "x86_64")]
    let widens_fast = std::is_x86_feature_detected!("avx512f")
        || (std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c"));
    #[cfg(not(target_arch = "x86_64"))]
    let widens_fast = false;
    let fast = widens_fast && auto.model().device().is_cpu();
    let want = if fast { KvFormat::F16 } else { KvFormat::F32 };
    assert_eq!(auto.model().kv_format(), want, "the default");
}

/// `--kv-cache q8_0` (llama.cpp's 8-bit cache blocks) on the Q8_0 GGUF, as for f16 above: the
/// prefill (its attention over the widened blocks) and ten decode steps (the decode attention
/// reading the blocks directly) stay close to the f32 cache; and feeding the prompt one token at
/// a time (only the decode kernels) gives the prefill's logits, since both read the same stored
/// values. Measured 2026-12-01: max |logit diff| 0.67 (Qwen2) and 0.97 (Llama) against logits
/// up to 30 and 33, the same in every run (f16: 0.54 and 0.71; Q8_0 weights themselves: 1.06;
/// the 0.70 and 0.81 first quoted here came from an earlier build and are not what this one
/// gives), 11 of 11 greedy choices the same for both; prefill against stepwise 0 (the two
/// attention paths sum in different orders, and the 8-bit quantization of the next layer's
/// inputs absorbs it here).
fn a_q8_0_kv_cache_stays_close_to_f32() {
    let (q8, drift) = drift_from_f32(KvFormat::Q8_0);
    drift.within(0.05, 1e-4);
    // The cache's bytes: 36 for every 32 values, against 64 in f16.
    let prompt = ids(&reference()["prompt_ids"]);
    let bytes = |e: &Engine| {
        let mut session = e.new_session();
        session.feed_all(e.model(), &prompt).unwrap();
        session.cache().allocated_bytes()
    };
    let f16 = load_with_kv(Some(KvFormat::F16));
    assert_eq!(bytes(&q8) * 64, bytes(&f16) * 36);
}

/// `--kv-cache bf16` (a bf16 model's own cache) on the Q8_0 GGUF, as for f16 above: the decode
/// attention reads the bf16 rows directly (widened to f32 in registers, as f16 is), and the
/// logits stay close to the f32 cache's. Measured 2026-12-01: max |logit diff| 0.56 (Qwen2) and
/// 0.75 (Llama), 11 of 11 greedy choices the same; the same figures as when a bf16 cache took
/// candle's matmuls instead. Feeding the prompt one token at a time lands within 0.35 of the
/// prefill's logits (candle's matmuls: 0.32 and 0.35). Layer 0's cached rows are the same both
/// ways; the prompt's attention (one product over all its positions) and a lone token's sum in
/// other orders, and where a later layer's key or value then comes out an ulp apart in f32 it
/// can round to the neighbouring bf16, a step of 2^-8. On Qwen2 that happens once, at position
/// 10: positions 0-9 agree to the bit, and every later one attends to the changed row.
fn a_bf16_kv_cache_stays_close_to_f32() {
    let (_, drift) = drift_from_f32(KvFormat::Bf16);
    drift.within(0.04, 0.02);
}

/// How far a KV cache format moves the logits.
struct Drift {
    /// The largest difference from an f32 cache's ([`kv_cache_against_f32`]).
    worst: f32,
    /// The largest |logit|.
    scale: f32,
    /// Greedy choices (of 11) that agree with the f32 cache's.
    same: usize,
    /// The largest difference between the prompt's prefill and the prompt fed one token at a time.
    paths: f32,
}

impl Drift {
    /// Asserts the logits moved at most `worst` (a fraction of the largest |logit|) and at least
    /// 9 of the 11 greedy choices agree.
    fn logits_within(&self, worst: f32) {
        let Drift { scale, same, .. } = *self;
        assert!(
            self.worst <= worst * scale,
            "{} vs logits up to {scale}",
            self.worst
        );
        assert!(same >= 9, "{same} of 11 greedy choices the same");
    }

    /// [`Drift::logits_within`], and the two prompt paths parted by at most `paths` (a fraction
    /// of the largest |logit|).
    fn within(&self, worst: f32, paths: f32) {
        self.logits_within(worst);
        let scale = self.scale;
        assert!(
            self.paths <= paths * scale,
            "prefill against stepwise: {}",
            self.paths
        );
    }
}

/// The Q8_0 GGUF with a `format` KV cache, and its [`Drift`].
fn drift_from_f32(format: KvFormat) -> (Engine, Drift) {
    let (wide, narrow) = (
        load_with_kv(Some(KvFormat::F32)),
        load_with_kv(Some(format)),
    );
    assert_eq!(wide.model().kv_format(), KvFormat::F32);
    assert_eq!(narrow.model().kv_format(), format);
    let (worst, scale, same) = kv_cache_against_f32(&wide, &narrow);
    let paths = max_abs_diff(&prefill_logits(&narrow), &stepwise_logits(&narrow));
    eprintln!(
        "{format} KV cache: max |logit diff| {worst:.4} against f32 (largest |logit| {scale:.2}), \
         {same} of 11 greedy choices the same; prefill against stepwise {paths:.2e}"
    );
    let drift = Drift {
        worst,
        scale,
        same,
        paths,
    };
    (narrow, drift)
}

/// The Q8_0 GGUF loaded with `kv_cache` as the KV cache's format (`None`: the default).
fn load_with_kv(kv_cache: Option<KvFormat>) -> Engine {
    let path = gguf_file(Quantization::Q8_0);
    let source = ModelSource::parse(path.to_str().unwrap()).unwrap();
    let opts = LoadOptions {
        device: test_device(),
        kv_cache,
        ..LoadOptions::default()
    };
    Engine::load(&source, &opts, &mut |_| {}).unwrap()
}

/// The largest logit difference of `narrow` (another KV cache format) from `wide` (an f32
/// cache) over the reference prompt's prefill and ten decode steps fed `wide`'s greedy tokens,
/// the largest |logit|, and how many of the 11 greedy choices agree.
fn kv_cache_against_f32(wide: &Engine, narrow: &Engine) -> (f32, f32, usize) {
    let prompt = ids(&reference()["prompt_ids"]);
    let tokens = wide.tokenizer().size();
    let last = |l: &Tensor| {
        let row = l.get(l.dim(0).unwrap() - 1).unwrap();
        let row = row.narrow(0, 0, tokens).unwrap();
        row.argmax(0).unwrap().to_scalar::<u32>().unwrap()
    };
    let (mut sw, mut sn) = (wide.new_session(), narrow.new_session());
    let mut lw = sw.feed_all(wide.model(), &prompt).unwrap();
    let mut ln = sn.feed_all(narrow.model(), &prompt).unwrap();
    let scale = max_abs(&lw);
    let mut worst = max_abs_diff(&lw, &ln);
    let mut same = 0;
    for _ in 0..10 {
        let id = last(&lw);
        same += usize::from(last(&ln) == id);
        lw = sw.feed_all(wide.model(), &[id]).unwrap();
        ln = sn.feed_all(narrow.model(), &[id]).unwrap();
        worst = worst.max(max_abs_diff(&lw, &ln));
    }
    same += usize::from(last(&ln) == last(&lw));
    (worst, scale, same)
}

#[test]
fn bad_inputs_get_clear_errors() {
    // A truncated GGUF names the file.
    let path = gguf_file(Quantization::Q8_0);
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let source = ModelSource::parse(cut.to_str().unwrap()).unwrap();
    let err = Engine::load(&source, &LoadOptions::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("cut.gguf"), "{err}");

    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file at all").unwrap();
    let source = ModelSource::parse(junk.to_str().unwrap()).unwrap();
    let err = Engine::load(&source, &LoadOptions::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("junk.gguf") && err.contains("GGUF"), "{err}");

    // --quantize on an already quantized file, and bf16 activations with quantized weights.
    let source = ModelSource::parse(path.to_str().unwrap()).unwrap();
    let opts = LoadOptions {
        quantize: Some(Quantization::Q4K),
        ..LoadOptions::default()
    };
    let err = Engine::load(&source, &opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("quantize") && err.contains("already quantized"),
        "{err}"
    );
    let opts = LoadOptions {
        dtype: DTypeChoice::Bf16,
        ..LoadOptions::default()
    };
    let err = Engine::load(&source, &opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("f32"), "{err}");

    // A hub GGUF spec parses into repo, revision and file.
    match ModelSource::parse("someone/Model-GGUF@v1/Model-Q4_K_M.gguf").unwrap() {
        ModelSource::RepoGguf {
            repo,
            revision,
            file,
        } => {
            assert_eq!(
                (repo.as_str(), revision.as_str(), file.as_str()),
                ("someone/Model-GGUF", "v1", "Model-Q4_K_M.gguf")
            );
        }
        other => panic!("{other:?}"),
    }
}

/// A GGUF v3 header: `kvs` metadata entries (already encoded) and one F32 tensor of `dims`.
fn gguf_header(kvs: &[Vec<u8>], dims: &[u64]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes()); // tensors
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for kv in kvs {
        b.extend_from_slice(kv);
    }
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b't');
    b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend_from_slice(&d.to_le_bytes());
    }
    b.extend_from_slice(&0u32.to_le_bytes()); // F32
    b.extend_from_slice(&0u64.to_le_bytes()); // offset
    b.resize(b.len().div_ceil(32) * 32 + 64, 0);
    b
}

/// Regression tests for what fuzzing the GGUF reader found (`fuzz/fuzz_targets/gguf.rs`):
/// candle panics on dimensions whose product overflows and on an alignment of 0. Both must be
/// errors naming the file, from the reader and from a model load.
#[test]
fn damaged_gguf_headers_are_errors_not_crashes() {
    let alignment_zero = {
        let mut kv = (17u64).to_le_bytes().to_vec();
        kv.extend_from_slice(b"general.alignment");
        kv.extend_from_slice(&4u32.to_le_bytes()); // u32
        kv.extend_from_slice(&0u32.to_le_bytes());
        kv
    };
    let cases = [
        (
            "overflow.gguf",
            gguf_header(&[], &[1 << 40, 1 << 40]),
            "impossible dimensions",
        ),
        (
            "alignment.gguf",
            gguf_header(&[alignment_zero], &[4]),
            "malformed",
        ),
        (
            "past-end.gguf",
            gguf_header(&[], &[1 << 20]),
            "past the end",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes, want) in cases {
        let path = dir.path().join(name);
        let err = thinkrag_llm::gguf::read_content(&mut std::io::Cursor::new(&bytes), &path)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want) && err.contains(name), "{name}: {err}");
        std::fs::write(&path, &bytes).unwrap();
        let source = ModelSource::parse(path.to_str().unwrap()).unwrap();
        let err = Engine::load(&source, &LoadOptions::default(), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains(name), "{name}: {err}");
    }
}

/// The input the GGUF fuzzer found (tensor dimensions whose product overflows).
#[test]
fn the_gguf_input_found_by_fuzzing_is_an_error() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/fuzz/gguf");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let result = thinkrag_llm::gguf::read_content(&mut std::io::Cursor::new(&bytes), &path);
        assert!(result.is_err(), "{}", path.display());
    }
}

/// A model split as llama.cpp's gguf-split writes it (all metadata in the first part, `split.no`,
/// `split.count` and `split.tensors.count` in every part, the tensors spread over the parts)
/// loads from its first part and computes exactly what the whole file does.
fn a_split_gguf_loads_as_the_whole_file() {
    use candle_core::quantized::gguf_file::{self, Value};
    let whole = gguf_file(Quantization::Q8_0);
    let mut reader = std::io::BufReader::new(std::fs::File::open(&whole).unwrap());
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let mut names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    names.sort();
    let tensors: Vec<(String, candle_core::quantized::QTensor)> = names
        .iter()
        .map(|n| {
            let t = content
                .tensor(&mut reader, n, &candle_core::Device::Cpu)
                .unwrap();
            (n.clone(), t)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let part = |i: usize| dir.path().join(format!("tiny-q8_0-{i:05}-of-00003.gguf"));
    let total = Value::I32(tensors.len() as i32);
    let count = Value::U16(3);
    let thirds = tensors
        .chunks(tensors.len().div_ceil(3))
        .collect::<Vec<_>>();
    for (no, chunk) in thirds.iter().enumerate() {
        let no_value = Value::U16(no as u16);
        let mut metadata: Vec<(&str, &Value)> = vec![
            ("split.no", &no_value),
            ("split.count", &count),
            ("split.tensors.count", &total),
        ];
        if no == 0 {
            metadata.extend(content.metadata.iter().map(|(k, v)| (k.as_str(), v)));
        }
        let refs: Vec<(&str, &candle_core::quantized::QTensor)> =
            chunk.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut out = std::fs::File::create(part(no + 1)).unwrap();
        gguf_file::write(&mut out, &metadata, &refs).unwrap();
    }
    let opts = LoadOptions {
        device: test_device(),
        ..LoadOptions::default()
    };
    let load = |p: &std::path::Path| {
        let source = ModelSource::parse(p.to_str().unwrap()).unwrap();
        Engine::load(&source, &opts, &mut |_| {})
    };
    let split = load(&part(1)).unwrap();
    let want = prefill_logits(&gguf_engine(Quantization::Q8_0));
    let got = prefill_logits(&split);
    assert_eq!(
        max_abs_diff(&got, &want),
        0.0,
        "the same weights, the same logits"
    );

    // A later part is not a model by itself; a missing part is named.
    let err = load(&part(2)).err().unwrap().to_string();
    assert!(err.contains("open the first part"), "{err}");
    std::fs::remove_file(part(3)).unwrap();
    let err = load(&part(1)).err().unwrap().to_string();
    assert!(
        err.contains("00003-of-00003") && err.contains("missing"),
        "{err}"
    );
}

/// Each tensor's name, block type and shape in a GGUF file.
fn tensor_layout(path: &std::path::Path) -> Vec<(String, String, Vec<usize>)> {
    let mut f = std::fs::File::open(path).unwrap();
    let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut out: Vec<_> = c
        .tensor_infos
        .iter()
        .map(|(n, i)| {
            (
                n.clone(),
                format!("{:?}", i.ggml_dtype),
                i.shape.dims().to_vec(),
            )
        })
        .collect();
    out.sort();
    out
}

// `thinkrag synth --quantize` streams random blocks into the layout `thinkrag quantize` writes
// (llama.cpp's Q4_K_M mix, the same names, shapes and metadata), and the file loads and runs.
fn a_random_gguf_has_the_quantized_exports_tensors_and_runs() {
    let f32_engine = engine(DTypeChoice::F32);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("random.gguf");
    thinkrag_llm::synth::write_random_gguf_with(
        f32_engine.model().config(),
        f32_engine.tokenizer(),
        Quantization::Q4KM,
        "random",
        &path,
        3,
    )
    .unwrap();
    let exported = gguf_file(Quantization::Q4KM);
    assert_eq!(tensor_layout(&path), tensor_layout(&exported));
    let source = thinkrag_llm::ModelSource::parse(path.to_str().unwrap()).unwrap();
    let opts = LoadOptions {
        device: test_device(),
        ..LoadOptions::default()
    };
    let random = Engine::load(&source, &opts, &mut |_| {}).unwrap();
    assert_eq!(
        random.tokenizer().special(),
        f32_engine.tokenizer().special()
    );
    let logits = prefill_logits(&random);
    let values = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(logits.dims()[1], f32_engine.model().config().vocab_size);
    assert!(
        values.iter().all(|x| x.is_finite()),
        "random blocks give finite logits"
    );
    assert!(
        values.iter().any(|&x| x != values[0]),
        "the logits are not all the same"
    );
}

/// A GGUF model whose CPU layout would take more memory than there is (here: one byte) runs in
/// place from the mapped file instead of being refused, says so (and how many layers stay in
/// memory, the rest paged out after each use), and computes what the laid-out
/// model computes (other kernels over the same blocks: the integer sums are exact, only the order
/// of the float sums differs); weights quantized into the heap at load have no file to run from
/// and stay a clear error.
fn a_gguf_beyond_the_memory_runs_in_place_from_the_file() {
    if !matches!(test_device(), thinkrag_llm::DeviceChoice::Cpu) {
        eprintln!("skipped: weights are laid out only on a CPU");
        return;
    }
    for q in [Quantization::Q8_0, Quantization::Q4K] {
        let path = gguf_file(q);
        let source = ModelSource::parse(path.to_str().unwrap()).unwrap();
        let opts = LoadOptions {
            device: test_device(),
            layout_memory: Some(1),
            ..LoadOptions::default()
        };
        let mut notes = Vec::new();
        let e = Engine::load(&source, &opts, &mut |p| {
            if let LoadProgress::Note(n) = p {
                notes.push(n)
            }
        })
        .unwrap();
        assert!(
            notes
                .iter()
                .any(|n| n.contains("run in place from the mapped file")),
            "{q}: {notes:?}"
        );
        assert!(e.model().weights_in_place(), "{q}");
        // With one byte, no layer stays in memory: each hands its pages back after use, and the
        // steps below read them from the file again.
        let layers = e.model().config().num_hidden_layers;
        let kept = format!("0 of {layers} layers kept in memory");
        assert!(notes.iter().any(|n| n.contains(&kept)), "{q}: {notes:?}");
        let laid_out = gguf_engine(q);
        assert!(!laid_out.model().weights_in_place(), "{q}");
        // Token by token, as decode steps. The same blocks, but not the same kernels for every
        // product: a laid-out product whose shape the tiles do not take goes through candle's,
        // which quantize activations their own way (a Q8_0 product's with one scale per 256
        // values, where the in-place block products use ggml's one per 32). Measured
        // 2026-12-01: max |logit diff| 0.26-0.69 with logits up to 33, top-1 the same at every
        // position; a broken path agrees on almost no position. Activations are quantized to 8
        // bits, so a last-bit change upstream (2026-12-02: the norms' order of summation) can
        // move a value by a quantization step and a logit by tenths: top-1 may then differ
        // where the laid-out model's top two are closer than the paths' own difference (one
        // position of 34, margin 0.41 against a largest difference of 0.69), nowhere else.
        let (want, got) = (stepwise_logits(&laid_out), stepwise_logits(&e));
        let tokens = e.tokenizer().size();
        let (top1, max_diff) = agreement(&got, &want, tokens);
        let scale = max_abs(&want);
        let near_ties = margins_where_top1_differs(&got, &want, tokens);
        eprintln!(
            "{q}: in place against laid out: top-1 {top1}, max |logit diff| {max_diff} (largest \
             |logit| {scale}), margins where top-1 differs {near_ties:?}"
        );
        assert!(top1 >= 0.9, "{q}: top-1 at {top1} of the positions");
        assert!(
            near_ties.iter().all(|&m| m <= max_diff),
            "{q}: top-1 differs where the margin {near_ties:?} exceeds the paths' difference {max_diff}"
        );
        assert!(max_diff <= 0.03 * scale, "{q}: max |logit diff| {max_diff}");
    }
    let files = thinkrag_llm::ModelFiles::from_dir(&fixture_dir()).unwrap();
    let opts = LoadOptions {
        device: test_device(),
        quantize: Some(Quantization::Q8_0),
        layout_memory: Some(1),
        ..LoadOptions::default()
    };
    let Err(e) = Engine::from_files(files, "heap".into(), None, &opts, &mut |_| {}) else {
        panic!("weights in the heap beyond the memory must be an error");
    };
    let e = e.to_string();
    assert!(
        e.contains("laying out the q8_0 weights for the CPU kernels needs")
            && e.contains("GB is available"),
        "{e}"
    );
}
