//! `thinkrag bench`: prefill and decode speed in llama-bench's terms (pp512, tg128), with the
//! decode measured at several KV cache positions (decode should not slow down with position).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use thinkrag_llm::bench::{decode, prefill, BenchResult};
use thinkrag_llm::load_model_only;

use crate::load::{init_threads, progress_bar, RuntimeArgs};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model directory (config.json + safetensors; `thinkrag synth` writes one) or GGUF file
    /// (`thinkrag quantize` writes one); add --quantize to bench quantize-at-load.
    #[arg(short, long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Prompt tokens of the prefill test (0 skips it).
    #[arg(short = 'p', long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens of the decode test (0 skips it).
    #[arg(short = 'n', long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// KV cache positions at which decode is measured.
    #[arg(long, value_delimiter = ',', default_value = "100,4000")]
    pub positions: Vec<usize>,
    /// Runs of each test (the median is reported).
    #[arg(short, long, default_value_t = 3)]
    pub repetitions: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let threads = init_threads(args.runtime.threads)?;
    let (bar, mut progress) = progress_bar();
    let rt = &args.runtime;
    let model = load_model_only(&args.model, &rt.load_options(), &mut progress)
        .with_context(|| format!("cannot load {}", args.model.display()))?;
    bar.finish_and_clear();
    let cfg = model.config();
    let backend = if model.device().is_cuda() {
        "CUDA"
    } else {
        "CPU"
    };
    let dtype = thinkrag_llm::device::dtype_name(model.dtype());
    let weights = model.weights_format();
    let weights_gib = model.weights_size_in_bytes() as f64 / (1u64 << 30) as f64;
    let params = cfg.parameter_count();
    let mut results: Vec<BenchResult> = Vec::new();
    if args.prompt_tokens > 0 {
        results.push(prefill(&model, args.prompt_tokens, args.repetitions)?);
    }
    if args.gen_tokens > 0 {
        for &pos in &args.positions {
            results.push(decode(&model, args.gen_tokens, pos, args.repetitions)?);
        }
    }
    if args.json {
        let v = serde_json::json!({
            "model": args.model,
            "params": params,
            "backend": backend,
            "dtype": dtype,
            "weights": weights,
            "weights_gib": weights_gib,
            "threads": threads,
            "results": results,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("| model | params | backend | weights | GiB | threads | test | t/s |");
    println!("| --- | ---: | --- | --- | ---: | ---: | --- | ---: |");
    let name = args
        .model
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    for r in &results {
        let spread = r
            .runs
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {name} | {:.2} B | {backend} | {weights} ({dtype} act.) | {weights_gib:.2} | {threads} | {} | {:.2} ({spread}) |",
            params as f64 / 1e9,
            r.test,
            r.tokens_per_s
        );
    }
    Ok(())
}
