//! `thinkrag quantize`: loads a model with its weights quantized (or a GGUF as it is) and saves it,
//! tokenizer and chat template included, as one GGUF file that loads fast next time.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use thinkrag_llm::{DTypeChoice, DeviceChoice, Engine, LoadOptions, ModelSource, Quantization};

use crate::load::{init_threads, progress_bar, HubArgs};

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The model to quantize: a directory, a built-in name or a hub repo (safetensors).
    #[arg(short, long)]
    pub model: String,
    /// The format: q8_0, q6k, q5_k_m, q5k, q4_k_m, q4k, q3k, q2k, q5_1, q5_0, q4_1 or q4_0
    /// (q4_k_m and q5_k_m: llama.cpp's mixes, the tensor types llama-quantize writes).
    #[arg(long)]
    pub to: Quantization,
    /// The GGUF file to write (replaced if it exists).
    #[arg(short, long)]
    pub out: PathBuf,
    /// CPU threads (default: the physical cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub hub: HubArgs,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    if args.out.extension().is_none_or(|e| e != "gguf") {
        bail!("--out {} should end in .gguf", args.out.display());
    }
    init_threads(args.threads)?;
    let source = ModelSource::parse(&args.model)?;
    let opts = LoadOptions {
        device: DeviceChoice::Cpu,
        dtype: DTypeChoice::F32,
        quantize: Some(args.to),
        // The weights are written, never run: no CPU layout (a second copy in memory).
        skip_weight_layout: true,
        hub: args.hub.options(),
        ..LoadOptions::default()
    };
    let start = Instant::now();
    let (bar, mut progress) = progress_bar();
    let engine = Engine::load(&source, &opts, &mut progress)
        .with_context(|| format!("cannot load model {}", args.model))?;
    bar.finish_and_clear();
    let loaded = start.elapsed();
    let name = format!("{}-{}", source_stem(&engine), args.to);
    thinkrag_llm::gguf::export(engine.model(), engine.tokenizer(), &name, &args.out)?;
    let bytes = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} ({:.2} GiB, weights {}): quantized in {:.1} s, written in {:.1} s",
        args.out.display(),
        crate::gib(bytes),
        engine.model().weights_format(),
        loaded.as_secs_f64(),
        (start.elapsed() - loaded).as_secs_f64()
    );
    Ok(())
}

/// The model's name without directories, for the GGUF's `general.name`.
fn source_stem(engine: &Engine) -> String {
    let name = engine.name().trim_end_matches('/');
    name.rsplit('/').next().unwrap_or(name).to_string()
}
