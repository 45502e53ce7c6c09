//! `thinkrag`: the command-line interface, a thin layer over the thinkrag library crates.
//! Each subcommand lives in its own module; this file only parses arguments and dispatches.

mod bench;
mod generate;
mod load;
mod synth;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// thinkrag: local reasoning models (DeepSeek-R1 distills) with retrieval-augmented generation.
#[derive(Debug, Parser)]
#[command(name = "thinkrag", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a reply to a prompt, streaming the reasoning apart from the answer.
    #[command(args_override_self = true)]
    Generate(Box<generate::GenerateArgs>),
    /// Measure prefill (ppN) and decode (tgN) speed, like llama-bench.
    Bench(bench::BenchArgs),
    /// Write random weights of a built-in model's exact shape (for benchmarks).
    Synth(synth::SynthArgs),
    /// Download a model into the Hugging Face cache (for later offline use).
    Download(load::DownloadArgs),
    /// List the built-in models.
    Models,
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("THINKRAG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(*args),
        Command::Bench(args) => bench::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Download(args) => load::download(args),
        Command::Models => {
            for m in thinkrag_llm::ModelManifest::builtin() {
                println!(
                    "{:<34} {} ({}, {})",
                    m.name,
                    m.hub.repo,
                    m.architecture,
                    m.parameters.as_deref().unwrap_or("?")
                );
            }
            Ok(())
        }
    }
}
