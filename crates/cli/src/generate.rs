//! `thinkrag generate`: one prompt, the reasoning streamed apart from the answer (dimmed on a
//! terminal, under headings otherwise), or machine-readable output (`--json`, `--jsonl`).

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use thinkrag_llm::{Event, GenerationParams, Message};

use crate::load::{load_engine, ModelArgs};
use crate::output::{arg_or_stdin, finish_writes, keep_writing, summary, Output, Printer};

/// Sampling and stopping flags; unset ones take the model's defaults (generation_config.json).
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Temperature, 0.0..=2.0 (0 = greedy). Default: the model's (0.6 for R1 distills).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, (0, 1]. Default: the model's (0.95).
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Drop tokens below min_p x the top probability, [0, 1).
    #[arg(long)]
    pub min_p: Option<f64>,
    /// Penalty for recently generated tokens, 0.1..=10 (1 = off).
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// How many recent tokens the penalty covers.
    #[arg(long)]
    pub repetition_window: Option<usize>,
    /// Let the penalty also cover the prompt's tokens.
    #[arg(long)]
    pub penalize_prompt: bool,
    /// Seed: the same seed and prompt give the same tokens.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Most tokens to generate, reasoning included (1..=32768).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// End the reasoning after this many tokens and make the model answer.
    #[arg(long)]
    pub max_thinking_tokens: Option<usize>,
    /// A string that ends generation (repeatable, at most 10); it is not printed.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The model's defaults overridden by the flags given.
    pub fn apply(&self, mut p: GenerationParams) -> Result<GenerationParams> {
        let s = &mut p.sampling;
        if let Some(v) = self.temperature {
            s.temperature = v;
        }
        if let Some(v) = self.top_p {
            s.top_p = v;
        }
        if let Some(v) = self.top_k {
            s.top_k = v;
        }
        if let Some(v) = self.min_p {
            s.min_p = v;
        }
        if let Some(v) = self.repetition_penalty {
            s.repetition_penalty = v;
        }
        if let Some(v) = self.repetition_window {
            s.repetition_window = v;
        }
        s.penalize_prompt |= self.penalize_prompt;
        if self.seed.is_some() {
            s.seed = self.seed;
        }
        if let Some(v) = self.max_tokens {
            p.max_tokens = v;
        }
        if self.max_thinking_tokens.is_some() {
            p.max_thinking_tokens = self.max_thinking_tokens;
        }
        p.stop.extend(self.stop.iter().cloned());
        p.validate()?;
        Ok(p)
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt (the user turn; DeepSeek advises putting all instructions here); `-` reads it
    /// from standard input.
    pub prompt: String,
    /// An optional system prompt (DeepSeek advises against one for R1).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Do not print the reasoning.
    #[arg(long)]
    pub hide_thinking: bool,
    /// Print one JSON object at the end.
    #[arg(long, conflicts_with = "jsonl")]
    pub json: bool,
    /// Stream one JSON event per line.
    #[arg(long)]
    pub jsonl: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let prompt = arg_or_stdin(&args.prompt, "prompt")?;
    let engine = load_engine(&args.model)?;
    let params = args.sampling.apply(engine.default_params())?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::system(system.clone()));
    }
    messages.push(Message::user(prompt));
    let mut printer = Printer::new(Output::choose(args.json, args.jsonl), args.hide_thinking);
    let stdout = std::io::stdout();
    let mut write_error = None;
    let generation = engine
        .generate(&messages, &params, &mut |ev| {
            let mut out = stdout.lock();
            let written = match ev {
                Event::Reasoning(t) => printer.reasoning(&mut out, t),
                Event::Answer(t) => printer.answer(&mut out, t),
                Event::Done(g) => printer.done(&mut out, g),
            };
            // A closed pipe (`| head`) ends generation quietly.
            keep_writing(written, &mut write_error)
        })
        .context("generation failed")?;
    if !finish_writes(write_error)? {
        return Ok(());
    }
    if args.json {
        let mut v = summary(&generation);
        v["model"] = json!(engine.name());
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}
