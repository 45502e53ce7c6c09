//! `thinkrag synth`: random weights of a built-in model's exact shape, for benchmarks where the
//! real weights cannot be downloaded.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use thinkrag_llm::synth::{write_random_gguf, write_random_model, SynthDType};
use thinkrag_llm::{ModelManifest, Quantization};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum WeightsDType {
    Bf16,
    F32,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// A built-in model name (see `thinkrag models`).
    pub model: String,
    /// Output directory, or with --quantize the GGUF file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Write one GGUF file of random blocks in this format instead of a directory of bf16/f32
    /// safetensors (q8_0, q4_k_m, ...: the types `thinkrag quantize --to` writes). It streams, so
    /// a 70B Q4_K_M (40 GB) is written with little memory; needs --tokenizer.
    #[arg(long)]
    pub quantize: Option<Quantization>,
    /// Precision of the written weights.
    #[arg(long, value_enum, default_value = "bf16")]
    pub weights_dtype: WeightsDType,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A tokenizer.json to copy in (so that `generate` works on the directory too).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

pub fn run(args: SynthArgs) -> Result<()> {
    let Some(manifest) = ModelManifest::find(&args.model) else {
        bail!(
            "no built-in model {:?}; built-in: {}",
            args.model,
            ModelManifest::builtin_names().join(", ")
        );
    };
    if let Some(quant) = args.quantize {
        return write_gguf(&manifest, quant, &args);
    }
    let dtype = match args.weights_dtype {
        WeightsDType::Bf16 => SynthDType::Bf16,
        WeightsDType::F32 => SynthDType::F32,
    };
    let params = manifest.config.parameter_count();
    eprintln!(
        "writing {} random parameters of {} to {}",
        params,
        manifest.display_name,
        args.out.display()
    );
    write_random_model(
        &manifest,
        &args.out,
        dtype,
        args.seed,
        args.tokenizer.as_deref(),
    )?;
    if args.tokenizer.is_none() {
        eprintln!("no --tokenizer given: the directory serves `thinkrag bench`; add tokenizer.json for `generate`");
    }
    Ok(())
}

/// `--quantize`: one GGUF file of random blocks, the tokenizer in its metadata.
fn write_gguf(manifest: &ModelManifest, quant: Quantization, args: &SynthArgs) -> Result<()> {
    if args.out.extension().is_none_or(|e| e != "gguf") {
        bail!("--out {} should end in .gguf", args.out.display());
    }
    let Some(tokenizer_json) = &args.tokenizer else {
        bail!("--quantize writes the tokenizer into the GGUF file: give one with --tokenizer tokenizer.json");
    };
    let start = std::time::Instant::now();
    eprintln!(
        "writing {} random parameters of {} as {quant} to {}",
        manifest.config.parameter_count(),
        manifest.display_name,
        args.out.display()
    );
    let notes = write_random_gguf(manifest, quant, tokenizer_json, &args.out, args.seed)?;
    for note in notes {
        eprintln!("note: {note}");
    }
    let bytes = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} ({:.2} GiB) in {:.1} s",
        args.out.display(),
        crate::gib(bytes),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
