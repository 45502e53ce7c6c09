//! `thinkrag synth`: random weights of a built-in model's exact shape, for benchmarks where the
//! real weights cannot be downloaded.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use thinkrag_llm::synth::{write_random_model, SynthDType};
use thinkrag_llm::ModelManifest;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum WeightsDType {
    Bf16,
    F32,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// A built-in model name (see `thinkrag models`).
    pub model: String,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
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
    )
    .with_context(|| format!("cannot write {}", args.out.display()))?;
    if args.tokenizer.is_none() {
        eprintln!("no --tokenizer given: the directory serves `thinkrag bench`; add tokenizer.json for `generate`");
    }
    Ok(())
}
