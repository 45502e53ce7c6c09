//! `thinkrag index info`: what an index holds (documents, chunks, embedder, dimensions, size on
//! disk) and, with `--documents`, each document.

use anyhow::Result;
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
    }
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
