//! `thinkrag`: the command-line interface, a thin layer over the thinkrag library crates.
//! Each subcommand lives in its own module; this file only parses arguments and dispatches.

mod ask;
mod bench;
mod chat;
mod eval;
mod generate;
mod hint;
mod index_cmd;
mod ingest;
mod load;
mod output;
mod quantize;
mod retrieval_args;
mod search;
mod serve;
mod synth;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// thinkrag: local reasoning models (DeepSeek-R1 distills) with retrieval-augmented generation.
#[derive(Debug, Parser)]
#[command(name = "thinkrag", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// More messages on stderr: -v adds thinkrag's progress details and the warnings of the
    /// parsers it uses (lopdf, pdf-extract: font encodings, damaged objects), -vv debug output.
    /// THINKRAG_LOG (a tracing filter such as `info,lopdf=debug`) overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

/// `bytes` in GiB, as the commands that write or load weights report sizes.
fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The log filter for a `-v` count. By default the PDF parsers' own log lines are off: on a
/// large corpus they print hundreds of thousands of warnings (glyph names, font encodings,
/// objects they skip) that tell the user nothing they can act on; ingest reports each file's
/// problems itself.
fn log_filter(verbose: u8) -> &'static str {
    match verbose {
        0 => "warn,lopdf=off,pdf_extract=off",
        1 => "info,lopdf=warn,pdf_extract=warn",
        _ => "debug",
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Answer a question over the index: retrieve, reason, answer with cited sources.
    #[command(args_override_self = true)]
    Ask(Box<ask::AskArgs>),
    /// A conversation over the index (each turn retrieves afresh).
    #[command(args_override_self = true)]
    Chat(Box<chat::ChatArgs>),
    /// Generate a reply to a prompt, streaming the reasoning apart from the answer.
    #[command(args_override_self = true)]
    Generate(Box<generate::GenerateArgs>),
    /// Serve OpenAI- and Amazon Bedrock-compatible HTTP APIs (many users at once).
    #[command(args_override_self = true)]
    Serve(Box<serve::ServeArgs>),
    /// Measure prefill (ppN) and decode (tgN) speed, like llama-bench.
    Bench(bench::BenchArgs),
    /// Write random weights of a built-in model's exact shape (for benchmarks).
    Synth(synth::SynthArgs),
    /// Quantize a model and save it as a GGUF file (thinkrag and llama.cpp load it).
    Quantize(quantize::QuantizeArgs),
    /// Build or update the index from files and directories of PDF, text and Markdown.
    /// Exits with 2 when some inputs yielded no text (the others are indexed).
    Ingest(Box<ingest::IngestArgs>),
    /// Search the index: the chunks nearest to a question.
    Search(Box<search::SearchArgs>),
    /// Inspect the index.
    Index(index_cmd::IndexCommand),
    /// Measure retrieval quality on labeled questions: recall@k, MRR and nDCG@10 for vector,
    /// lexical and hybrid search.
    Eval(Box<eval::EvalArgs>),
    /// Download a model into the Hugging Face cache (for later offline use).
    Download(load::DownloadArgs),
    /// List the built-in models (language models and embedders).
    Models,
    /// Internal: reads one file for `ingest`, in a child process under its limits.
    #[command(name = "__read-document", hide = true)]
    ReadDocument(ingest::ReadDocumentArgs),
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so `thinkrag models | head -1` would panic in println!; restore the
    // default so a closed pipe ends the program quietly, as it does every Unix filter.
    #[cfg(unix)]
    // SAFETY: the first thing main does, before any other thread exists; SIG_DFL is valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // The PDF parsers panic on many malformed files by design; ingest catches those panics
    // and reports them per page, so the default hook must not print each one.
    thinkrag::documents::quiet_parser_panics();
    // Activation buffers are reused instead of mapped and faulted in afresh for every batch.
    thinkrag_llm::device::keep_tensor_memory();
    // Embedders run their projections on AMX tiles where the CPU has them.
    thinkrag::embed::request_amx_tiles();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("THINKRAG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_filter(cli.verbose))),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        // Partial success: the command did its job but some inputs failed (it said which).
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(hint) = hint::for_error(&e) {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(1)
        }
    }
}

/// Runs a command: `Ok(false)` when it finished but some inputs failed.
fn run(cli: Cli) -> Result<bool> {
    let verbose = cli.verbose;
    let done = match cli.command {
        Command::Ingest(args) => return ingest::run(*args, verbose),
        Command::ReadDocument(args) => return ingest::read_document(args),
        Command::Ask(args) => ask::run(*args),
        Command::Chat(args) => chat::run(*args),
        Command::Generate(args) => generate::run(*args),
        Command::Serve(args) => serve::run(*args),
        Command::Bench(args) => bench::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Download(args) => load::download(args),
        Command::Search(args) => search::run(*args),
        Command::Index(cmd) => index_cmd::run(cmd),
        Command::Eval(args) => eval::run(*args),
        Command::Models => {
            // Memory for a 4,096-position context: the weights as they sit in memory plus the KV
            // cache; safetensors models run in f32 on a CPU by default (bf16 with --dtype bf16).
            const CONTEXT: usize = 4096;
            let gb = |b: u64| format!("{:.1} GB", b as f64 / 1e9);
            println!("Language models (memory: weights + KV cache for {CONTEXT} positions):");
            println!(
                "  {:<37} {:<6} {:>7} {:>9} {:>22}  SOURCE",
                "NAME", "ARCH", "PARAMS", "DOWNLOAD", "MEMORY"
            );
            for m in thinkrag_llm::ModelManifest::builtin() {
                let memory = if m.is_gguf() {
                    gb(m.memory_estimate(CONTEXT, false))
                } else {
                    format!(
                        "{} (bf16 {})",
                        gb(m.memory_estimate(CONTEXT, false)),
                        gb(m.memory_estimate(CONTEXT, true))
                    )
                };
                println!(
                    "  {:<37} {:<6} {:>7} {:>9} {:>22}  {}",
                    m.name,
                    m.architecture,
                    m.parameters.as_deref().unwrap_or("?"),
                    m.hub.size_bytes.map(gb).unwrap_or_else(|| "?".into()),
                    memory,
                    m.hub.repo,
                );
            }
            println!("Embedders:");
            for m in thinkrag::embed::EmbedderManifest::builtin() {
                println!(
                    "  {:<38} {} ({} dims, {} pooling)",
                    m.name,
                    m.hub.repo,
                    m.dim,
                    m.pooling.as_str()
                );
            }
            Ok(())
        }
    };
    done.map(|()| true)
}
