//! Shared helpers of the engine's integration tests: the committed tiny Qwen2 fixture and its
//! transformers reference outputs (written by scripts/make_parity_fixture.py).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use thinkrag_llm::{DTypeChoice, DeviceChoice, Engine, LoadOptions, ModelFiles};

/// The fixture directory.
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-qwen2")
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

/// The tiny model, loaded in `dtype` on the CPU.
pub fn engine(dtype: DTypeChoice) -> Engine {
    let files = ModelFiles::from_dir(&fixture_dir()).unwrap();
    let opts = LoadOptions {
        device: DeviceChoice::Cpu,
        dtype,
        ..LoadOptions::default()
    };
    Engine::from_files(files, "tiny-qwen2".into(), None, &opts, &mut |_| {}).unwrap()
}

/// Largest absolute difference between two f32 tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
