//! `thinkrag search "QUERY"`: the k chunks nearest to a question, printed with score, source, page
//! and a snippet, or as a search engine's hits (`--json`: `_id`, `_score`, `_source`).

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use thinkrag::index::SearchMode;
use thinkrag::SearchHit;

/// Parses `--mode` (clap shows the error with the accepted names).
pub fn parse_mode(s: &str) -> Result<SearchMode, thinkrag::index::UnknownSearchMode> {
    s.parse()
}

use crate::retrieval_args::{EmbedderArgs, FilterArgs, IndexArgs, RerankArgs};

/// `thinkrag search`.
#[derive(Debug, Args)]
pub struct SearchArgs {
    /// The question.
    pub query: String,
    /// How many hits.
    #[arg(short, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub k: u32,
    /// Exact (brute-force) search instead of the HNSW graph.
    #[arg(long)]
    pub exact: bool,
    /// How chunks are found: vector (embeddings), lexical (BM25 over the words: exact names,
    /// commands, option strings) or hybrid (both, fused by reciprocal rank).
    #[arg(long, default_value = "vector", value_parser = parse_mode)]
    pub mode: SearchMode,
    /// Print the hits as JSON, in the shape of a search engine's response.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub rerank: RerankArgs,
    #[command(flatten)]
    pub index: IndexArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub embedder: EmbedderArgs,
}

/// Runs the command.
pub fn run(args: SearchArgs) -> Result<()> {
    let store = args.index.open_nonempty()?;
    let embedder = args.embedder.load(Some(store.embedder()))?;
    let reranker = args
        .rerank
        .load(&args.embedder.device, &args.embedder.hub)?;
    let started = Instant::now();
    let hits = thinkrag::search_reranked(
        store.as_ref(),
        &embedder,
        &args.query,
        &args.filter.options(args.k as usize, args.mode, args.exact),
        args.rerank.with(reranker.as_deref()),
    )
    .with_context(|| format!("search in {} failed", store.location()))?;
    let took_ms = started.elapsed().as_millis() as u64;
    if args.json {
        let out = hits_json(&store.location(), &hits, took_ms);
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if hits.is_empty() {
        println!("No hits.");
    }
    for (rank, h) in hits.iter().enumerate() {
        let page = h.page.map(|p| format!(", page {p}")).unwrap_or_default();
        println!("{}. {:.4}  {}{page}", rank + 1, h.score, h.source);
        println!("   {}", snippet(&h.text, 240));
    }
    Ok(())
}

/// The hits as a search engine's response: `hits.hits[]` with `_id`, `_score`, `_source`.
pub fn hits_json(index: &str, hits: &[SearchHit], took_ms: u64) -> serde_json::Value {
    serde_json::to_value(thinkrag::json::SearchResponse::new(index, hits, took_ms))
        .unwrap_or_default()
}

/// The text on one line, cut at a character boundary near `max` bytes.
pub fn snippet(text: &str, max: usize) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.len() <= max {
        return flat;
    }
    let mut end = max;
    while !flat.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &flat[..end])
}
