//! How streamed generations are shown, shared by `generate`, `ask` and `chat`: dimmed reasoning
//! then the answer on a terminal, headed sections in pipes and files, or JSON events.

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;

use anyhow::{Context, Result};

use serde_json::json;
use thinkrag_llm::Generation;

/// How the streamed text is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Dimmed reasoning then the answer, on a terminal.
    Terminal,
    /// Headed sections, for pipes and files.
    Plain,
    /// One JSON object per event.
    JsonLines,
    /// Nothing until the end.
    Json,
}

impl Output {
    /// The style the flags ask for, else by whether stdout is a terminal.
    pub fn choose(json: bool, jsonl: bool) -> Self {
        if json {
            Output::Json
        } else if jsonl {
            Output::JsonLines
        } else if std::io::stdout().is_terminal() {
            Output::Terminal
        } else {
            Output::Plain
        }
    }
}

/// Writes streamed text in the chosen style, remembering which section is open.
#[derive(Debug)]
pub struct Printer {
    pub output: Output,
    pub hide_thinking: bool,
    section: Option<&'static str>,
}

pub const DIM: &str = "\x1b[2m";
pub const RESET: &str = "\x1b[0m";

impl Printer {
    pub fn new(output: Output, hide_thinking: bool) -> Self {
        Self {
            output,
            hide_thinking,
            section: None,
        }
    }

    pub fn reasoning(&mut self, out: &mut impl Write, t: &str) -> std::io::Result<()> {
        match self.output {
            Output::Json => Ok(()),
            Output::JsonLines => writeln!(out, "{}", json!({"type": "reasoning", "text": t})),
            _ if self.hide_thinking => Ok(()),
            _ => {
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
        }
    }

    pub fn answer(&mut self, out: &mut impl Write, t: &str) -> std::io::Result<()> {
        match self.output {
            Output::Json => Ok(()),
            Output::JsonLines => writeln!(out, "{}", json!({"type": "answer", "text": t})),
            _ => {
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
        }
    }

    /// The end of a generation: closes the open section and says why it stopped early.
    pub fn done(&mut self, out: &mut impl Write, g: &Generation) -> std::io::Result<()> {
        match self.output {
            Output::Json => Ok(()),
            Output::JsonLines => {
                let mut v = summary(g);
                v["type"] = json!("done");
                writeln!(out, "{v}")
            }
            _ => {
                if self.section == Some("reasoning") && matches!(self.output, Output::Terminal) {
                    write!(out, "{RESET}")?;
                }
                writeln!(out)?;
                match g.stop_reason {
                    Some(thinkrag_llm::StopReason::Length) => eprintln!(
                        "[stopped at the token limit after {} tokens{}]",
                        g.usage.completion_tokens,
                        if g.text.is_empty() {
                            ", before the answer"
                        } else {
                            ""
                        }
                    ),
                    Some(thinkrag_llm::StopReason::Cancelled) => eprintln!("[stopped]"),
                    _ => {}
                }
                Ok(())
            }
        }
    }
}

/// The generation as JSON (`--json`, and the body of the final `--jsonl` event).
pub fn summary(g: &Generation) -> serde_json::Value {
    serde_json::to_value(thinkrag_llm::GenerationReport::from(g)).unwrap_or_default()
}

/// `arg` itself, or standard input when it is `-` (`what` names it in the error).
pub fn arg_or_stdin(arg: &str, what: &str) -> Result<String> {
    if arg == "-" {
        std::io::read_to_string(std::io::stdin())
            .with_context(|| format!("cannot read the {what} from stdin"))
    } else {
        Ok(arg.to_string())
    }
}

/// Keeps streaming while writes succeed; the first failure is kept for [`finish_writes`] and
/// stops the generation.
pub fn keep_writing(
    written: std::io::Result<()>,
    failure: &mut Option<std::io::Error>,
) -> ControlFlow<()> {
    match written {
        Ok(()) => ControlFlow::Continue(()),
        Err(e) => {
            *failure = Some(e);
            ControlFlow::Break(())
        }
    }
}

/// After a stream: `Ok(true)` to go on, `Ok(false)` when stdout was closed (`| head`: the command
/// ends quietly), an error for any other write failure.
pub fn finish_writes(failure: Option<std::io::Error>) -> Result<bool> {
    match failure {
        None => Ok(true),
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Some(e) => Err(e).context("cannot write to stdout"),
    }
}
