//! `thinkrag index info`: what an index holds (documents, chunks, embedder, dimensions, size on
//! disk) and, with `--documents`, each document; `thinkrag index copy`: its documents into another
//! store, vectors and all.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use thinkrag::index::Index;

use crate::retrieval_args::IndexArgs;

/// `thinkrag index`.
#[derive(Debug, Args)]
pub struct IndexCommand {
    #[command(subcommand)]
    pub command: IndexSubcommand,
}

/// What to do with the index.
#[derive(Debug, Subcommand)]
pub enum IndexSubcommand {
    /// Chunk and document counts, embedder, dimensions, size on disk.
    Info(InfoArgs),
    /// Copies the documents, chunks and vectors into another store without embedding again
    /// (an index directory into a shared PostgreSQL, or back); re-run it to copy what changed.
    Copy(CopyArgs),
}

/// `thinkrag index copy`.
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The store to copy into: a directory or postgres://... (created if needed).
    #[arg(long, value_name = "DIR|URL")]
    pub to: String,
    #[command(flatten)]
    pub index: IndexArgs,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `thinkrag index info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub index: IndexArgs,
    /// List the documents too.
    #[arg(long)]
    pub documents: bool,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
pub fn run(cmd: IndexCommand) -> Result<()> {
    match cmd.command {
        IndexSubcommand::Info(args) => info(args),
        IndexSubcommand::Copy(args) => copy(args),
    }
}

fn copy(args: CopyArgs) -> Result<()> {
    let from = args.index.location().open()?;
    let to = crate::retrieval_args::store_location(&args.to);
    let quiet = args.json;
    let report = thinkrag::copy(from.as_ref(), &to, &mut |source| {
        if !quiet {
            eprintln!("copied {source}");
        }
    })
    .with_context(|| format!("copying {} into {} failed", from.location(), to.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "Copied {} documents ({} chunks) into {}; {} unchanged. It holds {} documents, {} chunks.",
            report.documents_copied,
            report.chunks_copied,
            report.to,
            report.documents_unchanged,
            report.total_documents,
            report.total_chunks
        );
    }
    Ok(())
}

fn info(args: InfoArgs) -> Result<()> {
    let location = args.index.location();
    let store = location.open()?;
    let info = store.stats()?;
    // Bytes on disk for an index directory; a database reports its own sizes.
    let bytes = match location.dir() {
        Some(dir) => Some(Index::disk_size(dir)?),
        None => None,
    };
    let e = store.embedder();
    let docs = store.documents()?;
    if args.json {
        let mut out = json!({
            "index": store.location(),
            "documents": info.documents,
            "chunks": info.chunks,
            "embedder": e,
            "dim": e.dim,
            "bytes_on_disk": bytes,
        });
        if args.documents {
            out["document_list"] = docs
                .iter()
                .map(|d| json!({"source": d.source, "chunks": d.chunks, "pages": d.pages, "content_hash": d.content_hash}))
                .collect();
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("index      {}", store.location());
    println!("documents  {}", info.documents);
    println!("chunks     {}", info.chunks);
    println!(
        "embedder   {} ({} dims, {} pooling, up to {} tokens)",
        e.model, e.dim, e.pooling, e.max_tokens
    );
    if let Some(bytes) = bytes {
        println!("on disk    {:.1} MB", bytes as f64 / 1e6);
    }
    if args.documents {
        for d in docs {
            println!("  {} ({} chunks, {} pages)", d.source, d.chunks, d.pages);
        }
    }
    Ok(())
}
