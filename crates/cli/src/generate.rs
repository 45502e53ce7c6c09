//! `thinkrag generate`: one prompt, the reasoning streamed apart from the answer (dimmed on a
//! terminal, under headings otherwise), or machine-readable output (`--json`, `--jsonl`).

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use thinkrag_llm::{Event, Generation, GenerationParams, Message};

use crate::load::{load_engine, ModelArgs};

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

/// How the streamed text is shown.
enum Output {
    /// Dimmed reasoning then the answer, on a terminal.
    Terminal,
    /// Headed sections, for pipes and files.
    Plain,
    /// One JSON object per event.
    JsonLines,
    /// Nothing until the end.
    Json,
}

/// Writes streamed events in the chosen style, remembering which section is open.
struct Printer {
    output: Output,
    hide_thinking: bool,
    section: Option<&'static str>,
}

const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

impl Printer {
    fn event(&mut self, out: &mut impl Write, ev: &Event<'_>) -> std::io::Result<()> {
        match (&self.output, ev) {
            (Output::Json, _) => Ok(()),
            (Output::JsonLines, Event::Reasoning(t)) => {
                writeln!(out, "{}", json!({"type": "reasoning", "text": t}))
            }
            (Output::JsonLines, Event::Answer(t)) => {
                writeln!(out, "{}", json!({"type": "answer", "text": t}))
            }
            (Output::JsonLines, Event::Done(g)) => {
                let mut v = summary(g);
                v["type"] = json!("done");
                writeln!(out, "{v}")
            }
            (_, Event::Reasoning(t)) => {
                if self.hide_thinking {
                    return Ok(());
                }
                if self.section.is_none() {
                    self.section = Some("reasoning");
                    match self.output {
                        Output::Terminal => write!(out, "{DIM}")?,
                        _ => writeln!(out, "## Reasoning\n")?,
                    }
                }
                write!(out, "{t}")?;
                out.flush()
            }
            (_, Event::Answer(t)) => {
                if self.section != Some("answer") {
                    if self.section == Some("reasoning") {
                        match self.output {
                            Output::Terminal => write!(out, "{RESET}\n\n")?,
                            _ => write!(out, "\n\n")?,
                        }
                    }
                    if matches!(self.output, Output::Plain) && !self.hide_thinking {
                        writeln!(out, "## Answer\n")?;
                    }
                    self.section = Some("answer");
                }
                write!(out, "{t}")?;
                out.flush()
            }
            (_, Event::Done(g)) => {
                if self.section == Some("reasoning") && matches!(self.output, Output::Terminal) {
                    write!(out, "{RESET}")?;
                }
                writeln!(out)?;
                if g.stop_reason == Some(thinkrag_llm::StopReason::Length) {
                    eprintln!(
                        "[stopped at the token limit after {} tokens{}]",
                        g.usage.completion_tokens,
                        if g.text.is_empty() {
                            ", before the answer"
                        } else {
                            ""
                        }
                    );
                }
                Ok(())
            }
        }
    }
}

/// The `--json` object (and the body of the final `--jsonl` event).
fn summary(g: &Generation) -> serde_json::Value {
    json!({
        "reasoning": g.reasoning,
        "text": g.text,
        "stop_reason": g.stop_reason.map(|r| r.as_str()),
        "usage": g.usage,
        "timings": g.timings,
    })
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let prompt = if args.prompt == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read the prompt from stdin")?
    } else {
        args.prompt.clone()
    };
    let engine = load_engine(&args.model)?;
    let params = args.sampling.apply(engine.default_params())?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::system(system.clone()));
    }
    messages.push(Message::user(prompt));
    let output = if args.json {
        Output::Json
    } else if args.jsonl {
        Output::JsonLines
    } else if std::io::stdout().is_terminal() {
        Output::Terminal
    } else {
        Output::Plain
    };
    let mut printer = Printer {
        output,
        hide_thinking: args.hide_thinking,
        section: None,
    };
    let stdout = std::io::stdout();
    let mut write_error = None;
    let generation = engine
        .generate(&messages, &params, &mut |ev| {
            match printer.event(&mut stdout.lock(), &ev) {
                Ok(()) => ControlFlow::Continue(()),
                // A closed pipe (`| head`) ends generation quietly.
                Err(e) => {
                    write_error = Some(e);
                    ControlFlow::Break(())
                }
            }
        })
        .context("generation failed")?;
    if let Some(e) = write_error {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("cannot write to stdout");
        }
        return Ok(());
    }
    if args.json {
        let mut v = summary(&generation);
        v["model"] = json!(engine.name());
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}
