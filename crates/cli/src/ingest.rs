//! `thinkrag ingest PATH...`: builds or updates the index from files and directories, with progress
//! bars for files and embedding, and a summary that lists every input that yielded no text (or,
//! for a damaged PDF, only part of it).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::MultiProgress;
use thinkrag::{Chunking, IngestEvent, IngestOptions, IngestReport};

use crate::retrieval_args::{bar, EmbedderArgs, IndexArgs};

/// `thinkrag ingest`.
#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Files and directories (searched recursively) of PDF, .txt and .md.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    #[command(flatten)]
    pub index: IndexArgs,
    #[command(flatten)]
    pub embedder: EmbedderArgs,
    /// Chunk size in tokens of the embedder's tokenizer (at most what it embeds).
    #[arg(long, default_value_t = 256, conflicts_with = "chunk_chars")]
    pub chunk_tokens: usize,
    /// Tokens shared by neighbouring chunks.
    #[arg(long, default_value_t = 32, conflicts_with = "chunk_chars")]
    pub chunk_overlap: usize,
    /// Chunk size in characters instead (LangChain's common setting: 512 with 30 overlap).
    #[arg(long)]
    pub chunk_chars: Option<usize>,
    /// Characters shared by neighbouring chunks, with --chunk-chars.
    #[arg(long, default_value_t = 30, requires = "chunk_chars")]
    pub chunk_char_overlap: usize,
    /// Drop indexed documents whose file no longer exists.
    #[arg(long)]
    pub prune: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Seconds a PDF may take to read before it is stopped and reported (its parser hung or
    /// looped); each PDF is read in a child process so that only it is lost.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub file_timeout: u64,
    /// MiB of memory a PDF may take to read before it is stopped and reported (a compressed
    /// stream that expands without end).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(64..))]
    pub file_memory: u64,
    /// Read PDFs in this process, without the time and memory limits (faster to debug; a
    /// hostile PDF can then stop the whole ingest).
    #[arg(long, conflicts_with_all = ["file_timeout", "file_memory"])]
    pub in_process: bool,
    /// When stderr is not a terminal: seconds between progress lines (0: one per file).
    #[arg(long, default_value_t = 10, hide = true)]
    pub progress_every: u64,
}

/// `thinkrag __read-document PATH`: the child process that reads one file for `ingest` and
/// writes the result as JSON on stdout (see [`thinkrag::documents::Isolation`]).
#[derive(Debug, Args)]
pub struct ReadDocumentArgs {
    /// The file.
    pub path: PathBuf,
}

/// Runs the reader child.
pub fn read_document(args: ReadDocumentArgs) -> Result<bool> {
    let mut out = std::io::stdout().lock();
    thinkrag::documents::read_document_for_parent(&args.path, &mut out)
        .context("cannot write the document to the parent process")?;
    Ok(true)
}

/// The isolation `ingest` reads PDFs under: this program, re-run as `__read-document` with the
/// same `-v` (the parsers' log lines come from the reader; `THINKRAG_LOG` is inherited).
fn isolation(args: &IngestArgs, verbose: u8) -> Result<Option<thinkrag::documents::Isolation>> {
    if args.in_process {
        return Ok(None);
    }
    let program = std::env::current_exe().context("cannot find this program to read PDFs in")?;
    let mut child_args: Vec<std::ffi::OsString> =
        (0..verbose.min(2)).map(|_| "-v".into()).collect();
    child_args.push("__read-document".into());
    Ok(Some(thinkrag::documents::Isolation {
        program,
        args: child_args,
        limits: thinkrag::documents::FileLimits {
            time: std::time::Duration::from_secs(args.file_timeout),
            memory_bytes: Some(args.file_memory << 20),
        },
    }))
}

/// Runs the command; `Ok(false)` when some inputs yielded no text (the rest is indexed).
pub fn run(args: IngestArgs, verbose: u8) -> Result<bool> {
    let location = args.index.location();
    // The embedder the store was built with, when there is one: it embeds the new documents.
    let existing = match location.open() {
        Ok(store) => Some(store.embedder().clone()),
        Err(thinkrag::Error::NoIndex { .. }) => None,
        Err(e) => {
            return Err(e).context(format!("cannot open the index at {}", location.display()))
        }
    };
    let embedder = args.embedder.load(existing.as_ref())?;
    let opts = IngestOptions {
        chunking: match args.chunk_chars {
            Some(max) => Chunking::Chars {
                max,
                overlap: args.chunk_char_overlap,
            },
            None => Chunking::Tokens {
                max: args.chunk_tokens,
                overlap: args.chunk_overlap,
            },
        },
        prune: args.prune,
        isolation: isolation(&args, verbose)?,
        ..IngestOptions::default()
    };

    let multi = MultiProgress::new();
    let terminal = std::io::stderr().is_terminal();
    if !terminal {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let files = multi.add(bar(0, "files"));
    let chunks = multi.add(bar(0, "chunks"));
    let mut progress = Progress::new(std::time::Duration::from_secs(args.progress_every));
    let report = thinkrag::ingest(&location, &args.paths, &embedder, &opts, &mut |ev| {
        progress.record(&ev);
        if terminal {
            files.set_position(progress.files_done as u64);
            files.set_prefix(progress.summary());
        } else if let Some(line) = progress.periodic_line() {
            eprintln!("{line}");
        }
        match ev {
            IngestEvent::Discovered { files: n, .. } => files.set_length(n as u64),
            IngestEvent::FileStarted { path } => files.set_message(
                path.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            ),
            IngestEvent::FileChunked { chunks: n, .. } => {
                chunks.set_length(n as u64);
                chunks.set_position(0);
                chunks.set_message("embedding");
            }
            IngestEvent::Embedded { done, .. } => chunks.set_position(done as u64),
            IngestEvent::Saving => files.set_message("saving the index"),
            // Files done are counted by `progress`.
            IngestEvent::FileUnchanged { .. }
            | IngestEvent::FileDone { .. }
            | IngestEvent::Failed(_) => {}
        }
    })
    .with_context(|| format!("ingestion into {} failed", location.display()))?;
    files.finish_and_clear();
    chunks.finish_and_clear();

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report, embedder.spec().model.as_str());
    }
    Ok(!report.has_failures())
}

/// What an ingest has done so far, for the progress display: files, pages and chunks, the rate
/// and an ETA from the bytes of files left to read at the rate so far (files that are unchanged
/// or yield no text cost next to nothing and are left out).
struct Progress {
    started: std::time::Instant,
    every: std::time::Duration,
    last_line: Option<std::time::Instant>,
    files_at_last_line: usize,
    files_total: usize,
    files_done: usize,
    pages: usize,
    chunks: usize,
    /// Chunks of the current file embedded so far (added to `chunks` when it is done).
    current: usize,
    /// Chunks the current file was cut into.
    current_total: usize,
    /// Size of the current file.
    current_bytes: u64,
    /// Size of all files found.
    bytes_total: u64,
    /// Size of the files read and embedded.
    bytes_done: u64,
    /// Size of the files that cost next to nothing (unchanged, or yielding no text).
    bytes_skipped: u64,
}

impl Progress {
    fn new(every: std::time::Duration) -> Self {
        Self {
            started: std::time::Instant::now(),
            every,
            last_line: None,
            files_at_last_line: 0,
            files_total: 0,
            files_done: 0,
            pages: 0,
            chunks: 0,
            current: 0,
            current_total: 0,
            current_bytes: 0,
            bytes_total: 0,
            bytes_done: 0,
            bytes_skipped: 0,
        }
    }

    fn record(&mut self, ev: &IngestEvent<'_>) {
        match ev {
            IngestEvent::Discovered { files, bytes } => {
                self.files_total = *files;
                self.bytes_total = *bytes;
            }
            IngestEvent::FileStarted { path } => {
                self.current_bytes = std::fs::metadata(path).map_or(0, |m| m.len());
                self.current_total = 0;
            }
            IngestEvent::FileChunked { pages, chunks, .. } => {
                self.pages += pages;
                self.current = 0;
                self.current_total = *chunks;
            }
            IngestEvent::Embedded { done, .. } => self.current = *done,
            IngestEvent::FileDone { .. } => {
                self.chunks += std::mem::take(&mut self.current);
                self.files_done += 1;
                self.bytes_done += std::mem::take(&mut self.current_bytes);
            }
            IngestEvent::FileUnchanged { .. } => {
                self.files_done += 1;
                self.bytes_skipped += std::mem::take(&mut self.current_bytes);
            }
            IngestEvent::Failed(f) => {
                // A damaged PDF read in part is also counted by its FileDone.
                let partial =
                    matches!(f.reason, thinkrag::documents::FailureReason::Damaged { .. });
                if f.page.is_none() && !partial {
                    self.files_done += 1;
                    self.bytes_skipped += std::mem::take(&mut self.current_bytes);
                }
            }
            _ => {}
        }
    }

    /// `12/40 files, 310 pages, 1,204 chunks (35.1/s), ETA 2m 05s`.
    fn summary(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let chunks = self.chunks + self.current;
        let rate = if elapsed > 0.0 {
            chunks as f64 / elapsed
        } else {
            0.0
        };
        // Work is measured in bytes of the files that need reading (one large manual costs
        // more than many small notes), counting the file being embedded by its share of chunks.
        let work = self.bytes_total.saturating_sub(self.bytes_skipped) as f64;
        let share = if self.current_total > 0 {
            self.current as f64 / self.current_total as f64
        } else {
            0.0
        };
        let done = self.bytes_done as f64 + share * self.current_bytes as f64;
        let eta = if self.files_done >= self.files_total && self.files_total > 0 {
            "ETA 0s".to_string()
        } else if done <= 0.0 || elapsed <= 0.0 {
            "ETA -".to_string()
        } else {
            let secs = (elapsed * (work - done).max(0.0) / done).round() as u64;
            format!("ETA {}", duration_text(secs))
        };
        format!(
            "{}/{} files, {} pages, {} chunks ({rate:.1}/s), {eta}",
            self.files_done, self.files_total, self.pages, chunks
        )
    }

    /// A progress line when stderr is not a terminal: at most one per `every` (one per finished
    /// file when it is zero), so a long ingest logs steadily without flooding.
    fn periodic_line(&mut self) -> Option<String> {
        if self.files_total == 0 {
            return None;
        }
        let now = std::time::Instant::now();
        let due = if self.every.is_zero() {
            self.files_done > self.files_at_last_line
        } else {
            now.duration_since(self.last_line.unwrap_or(self.started)) >= self.every
        };
        if !due {
            return None;
        }
        self.last_line = Some(now);
        self.files_at_last_line = self.files_done;
        Some(format!("ingest: {}", self.summary()))
    }
}

fn duration_text(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {:02}s", s / 60, s % 60),
        s => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn print_summary(r: &IngestReport, model: &str) {
    println!(
        "Indexed {} file{} ({} pages, {} chunks) in {:.1} s, {:.1} chunks/s; {} unchanged, {} failed.",
        r.files_indexed,
        if r.files_indexed == 1 { "" } else { "s" },
        r.pages,
        r.chunks_added,
        r.seconds,
        r.chunks_per_second,
        r.files_unchanged,
        r.files_failed,
    );
    if r.files_indexed > 0 {
        // Reading runs ahead of embedding in a thread of its own: the slower stage sets the pace.
        println!(
            "Stages: reading and chunking {:.1} s ({:.1} pages/s), embedding {:.1} s ({:.1} chunks/s), storing {:.1} s.",
            r.read_seconds,
            r.pages as f64 / r.read_seconds.max(1e-9),
            r.embed_seconds,
            r.chunks_added as f64 / r.embed_seconds.max(1e-9),
            r.store_seconds,
        );
    }
    if r.chunks_truncated > 0 {
        println!(
            "{} chunks were longer than {model} embeds and were cut (use token-sized chunks to avoid this).",
            r.chunks_truncated
        );
    }
    for source in &r.documents_pruned {
        println!("Pruned {source} (the file is gone).");
    }
    println!(
        "Index {}: {} documents, {} chunks, embedder {model}.",
        r.index, r.total_documents, r.total_chunks
    );
    if !r.failures.is_empty() {
        println!(
            "Inputs that yielded no text, or only part of it ({}):",
            r.failures.len()
        );
        for f in &r.failures {
            match f.page {
                Some(p) => println!("  {} page {p}: {}", f.path.display(), f.reason),
                None => println!("  {}: {}", f.path.display(), f.reason),
            }
        }
    }
}
