//! `thinkrag chat`: an interactive conversation over the index. Each turn retrieves afresh; the
//! history keeps answers without their reasoning; the KV cache of the shared prefix is reused.
//! Ctrl-C stops the current generation and keeps the session.

use std::io::Write;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use rustyline::error::ReadlineError;

use crate::ask::{on_event, print_sources, RagArgs};
use crate::output::{finish_writes, keep_writing, Output, Printer};

/// `thinkrag chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub rag: RagArgs,
}

const HELP: &str = "Commands:
  /sources    the sources of the last answer
  /thinking   show or hide the reasoning
  /reset      forget the conversation
  /help       this list
  /quit       leave (also Ctrl-D)
Ctrl-C stops an answer being generated.";

/// Runs the command.
pub fn run(args: ChatArgs) -> Result<()> {
    let pipeline = args.rag.load()?;
    let mut chat = pipeline.chat();
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = Arc::clone(&cancel);
        ctrlc::set_handler(move || cancel.store(true, Ordering::SeqCst))
            .context("cannot install the Ctrl-C handler")?;
    }
    let mut editor = rustyline::DefaultEditor::new().context("cannot open the terminal")?;
    let output = Output::choose(false, false);
    let mut show_thinking = !args.rag.hide_thinking;
    match pipeline.retriever() {
        Some(r) => eprintln!(
            "thinkrag chat: {} over {} ({} chunks). /help for commands, /quit to leave.",
            pipeline.engine().name(),
            r.location(),
            r.store().stats().map(|s| s.chunks).unwrap_or(0)
        ),
        None => eprintln!(
            "thinkrag chat: {} without retrieval. /help for commands, /quit to leave.",
            pipeline.engine().name()
        ),
    }
    let stdout = std::io::stdout();
    loop {
        let line = match editor.readline("> ") {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e).context("cannot read the next question"),
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line);
        if let Some(command) = line.strip_prefix('/') {
            match command.trim() {
                "quit" | "exit" | "q" => break,
                "reset" | "clear" => {
                    chat.reset();
                    eprintln!("[conversation cleared]");
                }
                "sources" => match chat.last_answer() {
                    Some(answer) => print_sources(&mut stdout.lock(), answer)?,
                    None => eprintln!("[no answer yet]"),
                },
                "thinking" => {
                    show_thinking = !show_thinking;
                    eprintln!(
                        "[reasoning {}]",
                        if show_thinking { "shown" } else { "hidden" }
                    );
                }
                "help" | "?" => eprintln!("{HELP}"),
                other => eprintln!("[unknown command /{other}; /help lists them]"),
            }
            continue;
        }
        cancel.store(false, Ordering::SeqCst);
        let mut printer = Printer::new(output, !show_thinking);
        let mut write_error = None;
        let result = chat.send(line, &mut |ev| {
            if cancel.load(Ordering::SeqCst) {
                return ControlFlow::Break(());
            }
            let written = on_event(&pipeline, &mut printer, &mut stdout.lock(), ev, false);
            keep_writing(written, &mut write_error)
        });
        if !finish_writes(write_error)? {
            return Ok(());
        }
        match result {
            Ok(answer) => {
                if cancel.load(Ordering::SeqCst) {
                    // The Done event was not shown: close the open section.
                    printer.done(&mut stdout.lock(), &answer.generation)?;
                }
                let u = answer.generation.usage;
                eprintln!(
                    "[turn {}: {} prompt tokens, {} reused from the cache, {} computed; {} reasoning + {} answer tokens; {:.1} tokens/s]",
                    chat.turns(),
                    u.prompt_tokens,
                    u.cached_prompt_tokens,
                    u.prompt_tokens - u.cached_prompt_tokens,
                    u.reasoning_tokens,
                    u.answer_tokens,
                    answer.generation.timings.decode_tokens_per_s
                );
            }
            // A failed turn (a question too long, say) leaves the session as it was.
            Err(e) => eprintln!("error: {e:#}"),
        }
        stdout.lock().flush()?;
    }
    Ok(())
}
