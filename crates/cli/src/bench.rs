//! `thinkrag bench`: prefill and decode speed in llama-bench's terms (pp512, tg128), with the
//! decode measured at several KV cache positions (decode should not slow down with position).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use thinkrag_llm::bench::{admission_ttft, decode_rounds, median, prefill, BenchResult, ReadProbe};
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
    /// Decode several sequences at once: aggregate tokens/s of one batched step per token for each
    /// count (e.g. 1,2,4,8), at each position.
    #[arg(long, value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Also measure the time to first token of a short request admitted while 3 long ones decode,
    /// against the same request alone (needs the model's tokenizer: a GGUF with one, or a
    /// directory with tokenizer.json).
    #[arg(long)]
    pub admission: bool,
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
    let kv = model.kv_format().to_string();
    let weights = model.weights_format();
    let weights_gib = crate::gib(model.weights_size_in_bytes() as u64);
    let params = cfg.parameter_count();
    let mut results: Vec<BenchResult> = Vec::new();
    if args.prompt_tokens > 0 {
        results.push(prefill(&model, args.prompt_tokens, args.repetitions)?);
    }
    let mut bandwidth = None;
    if args.gen_tokens > 0 {
        let mut positions = Vec::new();
        for &pos in &args.positions {
            if pos + args.gen_tokens >= cfg.max_position_embeddings {
                eprintln!(
                    "skipping decode at position {pos}: past the model's context window of {}",
                    cfg.max_position_embeddings
                );
            } else {
                positions.push(pos);
            }
        }
        let batches = if args.batch.is_empty() {
            vec![1]
        } else {
            args.batch.clone()
        };
        if !positions.is_empty() {
            // On a CPU, the memory's read rate is probed between the steps of a lone
            // sequence's decode.
            let probe = (model.device().is_cpu() && batches.contains(&1)).then(ReadProbe::new);
            for &n in &batches {
                let (r, bw) = decode_rounds(
                    &model,
                    n,
                    args.gen_tokens,
                    &positions,
                    args.repetitions,
                    probe.as_ref().filter(|_| n == 1),
                )?;
                results.extend(r);
                if !bw.is_empty() {
                    bandwidth = Some(bw);
                }
            }
        }
    }
    let read_gb = model.decode_read_bytes() as f64 / 1e9;
    let mut admission = None;
    if args.admission {
        drop(model);
        let source = thinkrag_llm::ModelSource::parse(&args.model.to_string_lossy())?;
        let engine = thinkrag_llm::Engine::load(&source, &rt.load_options(), &mut |_| {})
            .with_context(|| format!("cannot load {} with its tokenizer", args.model.display()))?;
        let (alone, busy) =
            admission_ttft(std::sync::Arc::new(engine), 3, 512, 32, args.repetitions)?;
        admission = Some((alone, busy));
    }
    if args.json {
        let v = serde_json::json!({
            "model": args.model,
            "params": params,
            "backend": backend,
            "dtype": dtype,
            "kv_cache": kv,
            "weights": weights,
            "weights_gib": weights_gib,
            "threads": threads,
            "results": results,
            "decode_read_gb_per_token": read_gb,
            "memory_read_gb_per_s": bandwidth,
            "admission": admission.map(|(alone, busy)| serde_json::json!({
                "short_prompt_tokens": 32, "busy_sequences": 3, "long_prompt_tokens": 512,
                "ttft_alone_ms": alone, "ttft_busy_ms": busy, "ratio": busy / alone,
            })),
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
            .map(|&x| rate(x))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {name} | {:.2} B | {backend} | {weights} ({dtype} act., {kv} KV) | {weights_gib:.2} | {threads} | {} | {} ({spread}) |",
            params as f64 / 1e9,
            r.test,
            rate(r.tokens_per_s)
        );
    }
    print_ratios(&results, read_gb, bandwidth);
    if let Some((alone, busy)) = admission {
        println!(
            "\ntime to first token of a 32-token request: {alone:.0} ms alone, {busy:.0} ms while 3 \
             requests (512-token prompts) decode: {:.2}x",
            busy / alone
        );
    }
    Ok(())
}

/// Below the table: each decode test against the same batch at the first position, as the
/// median of the per-round ratios (the positions' steps interleave in each round), and a
/// single sequence's weight stream against the memory bandwidth measured in the same run.
fn print_ratios(results: &[BenchResult], read_gb: f64, bandwidth: Option<Vec<f64>>) {
    let decodes: Vec<&BenchResult> = results
        .iter()
        .filter(|r| r.test.starts_with("tg"))
        .collect();
    for r in &decodes {
        let Some(first) = decodes.iter().find(|f| f.sequences == r.sequences) else {
            continue;
        };
        if first.position == r.position {
            continue;
        }
        let ratios: Vec<f64> = r.runs.iter().zip(&first.runs).map(|(a, b)| a / b).collect();
        let listed: Vec<String> = ratios.iter().map(|x| format!("{x:.3}")).collect();
        println!(
            "\n{} against {}: {:.3}x (median of the rounds' ratios: {})",
            r.test,
            first.test,
            median(&ratios),
            listed.join(", ")
        );
    }
    if let Some(bw) = bandwidth {
        let listed: Vec<String> = bw.iter().map(|x| format!("{x:.1}")).collect();
        println!(
            "\nmemory read rate with these threads, probed between the steps of each round: {} \
             GB/s; a decode step reads {read_gb:.3} GB of weights",
            listed.join(", ")
        );
        for r in decodes.iter().filter(|r| r.sequences == 1) {
            let shares: Vec<f64> = r
                .runs
                .iter()
                .zip(&bw)
                .map(|(t, b)| t * read_gb / b)
                .collect();
            println!(
                "{}: {:.1} GB/s of weights, {:.2} of the memory's read rate (median of the rounds)",
                r.test,
                r.tokens_per_s * read_gb,
                median(&shares)
            );
        }
    }
}

/// Tokens per second as the table prints them: two decimals, or three significant digits below 1
/// (a 70B run from disk decodes 0.0337 tokens/s, which two decimals would round to 0.03).
fn rate(x: f64) -> String {
    if x >= 1.0 || x <= 0.0 {
        format!("{x:.2}")
    } else {
        let decimals = (2.0 - x.log10().floor()) as usize;
        format!("{x:.decimals$}")
    }
}

#[cfg(test)]
mod tests {
    use super::rate;

    #[test]
    fn slow_rates_keep_three_significant_digits() {
        assert_eq!(rate(22.851), "22.85");
        assert_eq!(rate(1.0), "1.00");
        assert_eq!(rate(0.5), "0.500");
        assert_eq!(rate(0.03371), "0.0337");
        assert_eq!(rate(0.0), "0.00");
    }
}
