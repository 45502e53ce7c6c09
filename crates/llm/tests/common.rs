//! Shared helpers of the engine's integration tests: the committed tiny Qwen2 and Llama fixtures
//! and their transformers reference outputs (written by scripts/make_parity_fixture.py).

#![allow(dead_code)]

use std::cell::Cell;
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use thinkrag_llm::{DTypeChoice, DeviceChoice, Engine, LoadOptions, ModelFiles};

/// The committed parity fixtures, one per architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixture {
    /// tests/fixtures/tiny-qwen2.
    Qwen2,
    /// tests/fixtures/tiny-llama (llama3 RoPE scaling, transformers 5 config layout).
    Llama,
}

impl Fixture {
    /// The directory name.
    pub fn name(self) -> &'static str {
        match self {
            Fixture::Qwen2 => "tiny-qwen2",
            Fixture::Llama => "tiny-llama",
        }
    }
}

thread_local! {
    // Each test runs on its own thread: the fixture a test works on is set once at its start
    // (`with_fixture`), so the helpers below keep their signatures for every test file.
    static FIXTURE: Cell<Fixture> = const { Cell::new(Fixture::Qwen2) };
}

/// Runs `test` with the helpers pointed at `fixture`.
pub fn with_fixture(fixture: Fixture, test: fn()) {
    set_fixture(fixture);
    test();
}

/// Points the helpers at `fixture` for the rest of the current test.
pub fn set_fixture(fixture: Fixture) {
    FIXTURE.with(|f| f.set(fixture));
}

/// The fixture the current test works on (Qwen2 unless `with_fixture` says otherwise).
pub fn fixture() -> Fixture {
    FIXTURE.with(Cell::get)
}

/// Declares each named function (a test body) once per fixture: `qwen2::NAME` and `llama::NAME`.
#[macro_export]
macro_rules! for_each_fixture {
    ($($name:ident),* $(,)?) => {
        mod qwen2 {
            $( #[test] fn $name() { super::common::with_fixture(super::common::Fixture::Qwen2, super::$name) } )*
        }
        mod llama {
            $( #[test] fn $name() { super::common::with_fixture(super::common::Fixture::Llama, super::$name) } )*
        }
    };
}

/// The fixture directory.
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(fixture().name())
}

/// The reference tensors.
pub fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("reference.safetensors"), &Device::Cpu)
        .expect("reference.safetensors loads")
}

/// The reference JSON.
pub fn reference_json() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Ids stored as an int64 tensor.
pub fn ids(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

/// The device the tests run on: the CPU, or `THINKRAG_TEST_DEVICE` (`cuda`, `cuda:N`), which
/// scripts/gpu-check.sh sets to run the parity tests on a GPU.
pub fn test_device() -> DeviceChoice {
    match std::env::var("THINKRAG_TEST_DEVICE") {
        Ok(d) => d
            .parse()
            .unwrap_or_else(|e| panic!("THINKRAG_TEST_DEVICE={d}: {e}")),
        Err(_) => DeviceChoice::Cpu,
    }
}

/// The tiny model, loaded in `dtype` on the test device.
pub fn engine(dtype: DTypeChoice) -> Engine {
    let files = ModelFiles::from_dir(&fixture_dir()).unwrap();
    let opts = LoadOptions {
        device: test_device(),
        dtype,
        // Half precision really runs in half precision, also on a CPU.
        strict_dtype: true,
        ..LoadOptions::default()
    };
    Engine::from_files(files, fixture().name().into(), None, &opts, &mut |_| {}).unwrap()
}

/// Largest absolute value of an f32 tensor.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest absolute difference between two f32 tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    // Results of a GPU run are compared on the CPU, where the references are.
    let (a, b) = (
        a.to_device(&Device::Cpu).unwrap(),
        b.to_device(&Device::Cpu).unwrap(),
    );
    max_abs(&(a - b).unwrap())
}

/// The tiny model with its matrices quantized to `q` while loading.
pub fn quantized_engine(q: thinkrag_llm::Quantization) -> Engine {
    let files = ModelFiles::from_dir(&fixture_dir()).unwrap();
    let opts = LoadOptions {
        device: test_device(),
        quantize: Some(q),
        ..LoadOptions::default()
    };
    Engine::from_files(
        files,
        format!("{}-{q}", fixture().name()),
        None,
        &opts,
        &mut |_| {},
    )
    .unwrap()
}

/// The tiny model quantized to `q` and exported to a GGUF file (tokenizer and chat template in
/// its metadata, nothing beside it), written once per test process.
pub fn gguf_file(q: thinkrag_llm::Quantization) -> PathBuf {
    use std::sync::Mutex;
    static WRITTEN: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut written = WRITTEN.lock().unwrap_or_else(|e| e.into_inner());
    let key = format!("{}-{}", fixture().name(), q.name());
    if let Some((_, p)) = written.iter().find(|(n, _)| *n == key) {
        return p.clone();
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("gguf-{}-{key}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{key}.gguf"));
    let e = quantized_engine(q);
    thinkrag_llm::gguf::export(e.model(), e.tokenizer(), fixture().name(), &path).unwrap();
    written.push((key, path.clone()));
    path
}

/// The tiny model loaded from its GGUF export in format `q`.
pub fn gguf_engine(q: thinkrag_llm::Quantization) -> Engine {
    let path = gguf_file(q);
    let source = thinkrag_llm::ModelSource::parse(path.to_str().unwrap()).unwrap();
    let opts = LoadOptions {
        device: test_device(),
        ..LoadOptions::default()
    };
    Engine::load(&source, &opts, &mut |_| {}).unwrap()
}
