//! `thinkrag ask "QUESTION"`: retrieve the nearest chunks, build the prompt, stream the reasoning
//! and the answer, and end with the sources the model was given (which of them it cited).
//! Also the flags `ask` and `chat` share, and loading their pipeline.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use thinkrag::index::SearchMode;
use thinkrag::prompt::display_source;
use thinkrag::{Answer, AskEvent, AskOptions, Pipeline, PromptOptions, Retriever, SourceField};
use thinkrag_llm::DeviceChoice;

use crate::generate::SamplingArgs;
use crate::load::{init_threads, load_engine, ModelArgs};
use crate::output::{arg_or_stdin, finish_writes, keep_writing, Output, Printer};
use crate::retrieval_args::{EmbedderChoice, FilterArgs, IndexArgs, RerankArgs};
use crate::search::{hits_json, snippet};

/// Retrieval, prompt and model flags shared by `ask` and `chat`.
#[derive(Debug, Args)]
pub struct RagArgs {
    /// How many chunks to retrieve.
    #[arg(short, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub k: u32,
    /// Exact (brute-force) search instead of the HNSW graph.
    #[arg(long)]
    pub exact: bool,
    /// How chunks are retrieved: vector (embeddings), lexical (BM25 over the words: exact names,
    /// commands, option strings) or hybrid (both, fused by reciprocal rank).
    #[arg(long, default_value = "vector", value_parser = crate::search::parse_mode)]
    pub mode: SearchMode,
    /// How many of the retrieved chunks may go into the prompt (default: all k).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub context_size: Option<u32>,
    /// Most tokens the sources may take in the prompt; lower-ranked chunks are cut or left out
    /// (and the output says which).
    #[arg(long, default_value_t = 3072, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_context_tokens: u32,
    /// Which fields of each chunk go into the prompt, comma-separated: text, source, page, score.
    #[arg(long, value_delimiter = ',', default_value = "source,page,text")]
    pub fields: Vec<SourceField>,
    /// The user turn as a template with {context} (the numbered sources) and {question}, and
    /// optionally {instructions}.
    #[arg(long, conflicts_with = "template_file")]
    pub template: Option<String>,
    /// Reads the template from a file.
    #[arg(long, value_name = "FILE")]
    pub template_file: Option<PathBuf>,
    /// Instructions placed before the sources (default: answer from the sources, cite them as
    /// [n], say when they do not hold the answer).
    #[arg(long)]
    pub instructions: Option<String>,
    /// A system prompt (DeepSeek advises against one for R1: instructions belong in the user turn).
    #[arg(long)]
    pub system: Option<String>,
    /// Ask the model alone: no index, no sources.
    #[arg(long)]
    pub no_retrieval: bool,
    /// Where the embedder runs (default: cpu; the model takes the GPU).
    #[arg(long, default_value = "cpu")]
    pub embedder_device: DeviceChoice,
    #[command(flatten)]
    pub index: IndexArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub rerank: RerankArgs,
    #[command(flatten)]
    pub embedder: EmbedderChoice,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Do not print the reasoning.
    #[arg(long)]
    pub hide_thinking: bool,
}

impl RagArgs {
    fn prompt_options(&self) -> Result<PromptOptions> {
        let template = match &self.template_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the template {}", path.display()))?,
            ),
            None => self.template.clone(),
        };
        let opts = PromptOptions {
            template,
            system: self.system.clone(),
            instructions: self.instructions.clone(),
            context_size: self.context_size.map(|n| n as usize),
            fields: self.fields.clone(),
            max_context_tokens: Some(self.max_context_tokens as usize),
        };
        opts.validate()?;
        Ok(opts)
    }

    /// Loads the index and embedder (they fail fast), then the model.
    pub fn load(&self) -> Result<Pipeline> {
        let prompt = self.prompt_options()?;
        init_threads(self.model.runtime.threads)?;
        let retriever = if self.no_retrieval {
            None
        } else {
            let store = self.index.open_nonempty()?;
            let embedder = self.embedder.load(
                Some(store.embedder()),
                &self.embedder_device,
                &self.model.hub,
            )?;
            let retriever = Retriever::new(store, embedder)?;
            match self.rerank.load(&self.embedder_device, &self.model.hub)? {
                Some(r) => Some(retriever.with_reranker(r, self.rerank.rerank_candidates as usize)),
                None => Some(retriever),
            }
        };
        let engine = load_engine(&self.model)?;
        let params = self.sampling.apply(engine.default_params())?;
        let options = AskOptions {
            k: self.k as usize,
            exact: self.exact,
            mode: self.mode,
            filter: self.filter.filter(),
            ef_search: self.filter.ef_search.map(|e| e as usize),
            prompt,
            params: Some(params),
            answer_reserve: None,
        };
        Ok(Pipeline::new(engine, retriever, options)?)
    }
}

/// `thinkrag ask`.
#[derive(Debug, Args)]
pub struct AskArgs {
    /// The question; `-` reads it from standard input.
    pub question: String,
    #[command(flatten)]
    pub rag: RagArgs,
    /// Print the exact prompt the model reads before generating.
    #[arg(long)]
    pub show_prompt: bool,
    /// Print one JSON object at the end: the hits, the reasoning, the answer and its citations.
    #[arg(long, conflicts_with = "jsonl")]
    pub json: bool,
    /// Stream one JSON event per line.
    #[arg(long)]
    pub jsonl: bool,
}

/// Runs the command.
pub fn run(args: AskArgs) -> Result<()> {
    let question = arg_or_stdin(&args.question, "question")?;
    let pipeline = args.rag.load()?;
    let mut printer = Printer::new(
        Output::choose(args.json, args.jsonl),
        args.rag.hide_thinking,
    );
    let stdout = std::io::stdout();
    let mut write_error = None;
    let answer = pipeline.ask(&question, &mut |ev| {
        let written = on_event(
            &pipeline,
            &mut printer,
            &mut stdout.lock(),
            ev,
            args.show_prompt,
        );
        keep_writing(written, &mut write_error)
    });
    if !finish_writes(write_error)? {
        return Ok(());
    }
    let answer = answer.context("cannot answer")?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&answer_json(&pipeline, &answer))?
        );
    }
    Ok(())
}

/// Shows one event of an answer in the printer's style (`ask` and `chat`).
pub fn on_event(
    pipeline: &Pipeline,
    printer: &mut Printer,
    out: &mut impl Write,
    ev: AskEvent<'_>,
    show_prompt: bool,
) -> std::io::Result<()> {
    let jsonl = printer.output == Output::JsonLines;
    match ev {
        AskEvent::Retrieved(hits) => {
            if jsonl {
                writeln!(
                    out,
                    "{}",
                    json!({"type": "retrieved", "hits": hits_value(pipeline, hits)})
                )?;
            }
        }
        AskEvent::TurnsDropped(n) => {
            if jsonl {
                writeln!(out, "{}", json!({"type": "turns_dropped", "turns": n}))?;
            } else {
                eprintln!(
                    "[dropped the oldest {n} turn{} to fit the context window]",
                    if n == 1 { "" } else { "s" }
                );
            }
        }
        AskEvent::Prompt(prompt) => {
            let rendered = if show_prompt {
                pipeline
                    .engine()
                    .tokenizer()
                    .render_chat(&prompt.messages, true)
                    .unwrap_or_else(|e| format!("(cannot render the prompt: {e})"))
            } else {
                String::new()
            };
            if jsonl {
                let mut v = json!({
                    "type": "prompt",
                    "prompt_tokens": prompt.prompt_tokens,
                    "context_tokens": prompt.context_tokens,
                    "context_budget": prompt.context_budget,
                    "sources": prompt.sources.iter().map(|s| json!({
                        "number": s.number, "rank": s.rank, "source": s.hit.source,
                        "page": s.hit.page, "cut": s.cut,
                    })).collect::<Vec<_>>(),
                    "left_out": prompt.left_out,
                });
                if show_prompt {
                    v["prompt"] = json!(rendered);
                }
                writeln!(out, "{v}")?;
            } else if printer.output != Output::Json {
                if show_prompt {
                    writeln!(out, "## Prompt\n\n{rendered}\n")?;
                }
                for l in &prompt.left_out {
                    eprintln!(
                        "[left out of the prompt: hit {} {}{} ({})]",
                        l.rank,
                        display_source(&l.source),
                        page_suffix(l.page),
                        l.reason
                    );
                }
                if let Some(cut) = prompt.sources.iter().find(|s| s.cut) {
                    eprintln!(
                        "[source [{}] was cut to fit the context budget of {} tokens]",
                        cut.number, prompt.context_budget
                    );
                }
            }
        }
        AskEvent::Reasoning(t) => printer.reasoning(out, t)?,
        AskEvent::Answer(t) => printer.answer(out, t)?,
        AskEvent::Done(answer) => match printer.output {
            Output::Json => {}
            Output::JsonLines => {
                let mut v = answer_json(pipeline, answer);
                v["type"] = json!("done");
                writeln!(out, "{v}")?;
            }
            _ => {
                printer.done(out, &answer.generation)?;
                print_sources(out, answer)?;
            }
        },
    }
    Ok(())
}

fn page_suffix(page: Option<u32>) -> String {
    page.map(|p| format!(", page {p}")).unwrap_or_default()
}

/// The sources list after an answer: number, file, page, score, and whether it was cited.
pub fn print_sources(out: &mut impl Write, answer: &Answer) -> std::io::Result<()> {
    if answer.prompt.sources.is_empty() {
        return Ok(());
    }
    writeln!(out, "\nSources:")?;
    for s in &answer.prompt.sources {
        let cited = if answer.citations.contains(&s.number) {
            "  cited"
        } else {
            ""
        };
        let cut = if s.cut { "  (cut to fit)" } else { "" };
        writeln!(
            out,
            "  [{}] {:.4}  {}{}{cited}{cut}",
            s.number,
            s.hit.score,
            s.hit.source,
            page_suffix(s.hit.page)
        )?;
    }
    for l in &answer.prompt.left_out {
        writeln!(
            out,
            "  (left out: hit {} {}{}: {})",
            l.rank,
            l.source,
            page_suffix(l.page),
            l.reason
        )?;
    }
    Ok(())
}

fn hits_value(pipeline: &Pipeline, hits: &[thinkrag::SearchHit]) -> serde_json::Value {
    let index = pipeline
        .retriever()
        .map(Retriever::location)
        .unwrap_or_default();
    hits_json(&index, hits, 0)["hits"].clone()
}

/// The `--json` object: the hits (as `search --json`), the sources given to the model, and
/// the generated part.
pub fn answer_json(pipeline: &Pipeline, answer: &Answer) -> serde_json::Value {
    let index = pipeline
        .retriever()
        .map(Retriever::location)
        .unwrap_or_default();
    let report = thinkrag::json::AnswerReport::new(answer, pipeline.engine().name(), &index, |t| {
        snippet(t, 160)
    });
    serde_json::to_value(report).unwrap_or_default()
}
