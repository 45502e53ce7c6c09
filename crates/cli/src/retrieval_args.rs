//! Flags shared by the retrieval commands (`ingest`, `search`, `index`): where the index lives and
//! which embedding model runs where, and loading that model with a spinner.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use thinkrag::embed::{
    Embedder, EmbedderManifest, EmbedderOptions, EmbedderPrecision, EmbedderSource, Pooling,
    QueryInstruction, Reranker, RerankerOptions,
};
use thinkrag::index::{ChunkStore, EmbedderInfo, SearchFilter, SearchMode};
use thinkrag::pgstore::PgOptions;
use thinkrag::{SearchOptions, StoreLocation};
use thinkrag_llm::DeviceChoice;

use crate::load::{init_threads, HubArgs};

/// Where the chunks live.
#[derive(Debug, Clone, Args)]
pub struct IndexArgs {
    /// Index directory (default: $THINKRAG_INDEX, else ~/.local/share/thinkrag/index).
    #[arg(long, value_name = "DIR", conflicts_with = "store")]
    pub index: Option<PathBuf>,
    /// Where the chunks live: an index directory, or a PostgreSQL database with pgvector that
    /// several thinkrag processes share: postgres://USER@HOST[:PORT]/DB, with ?schema=NAME to
    /// keep several stores in one database and ?sslmode=require|verify-full (&sslrootcert=FILE)
    /// for TLS. The password comes from the URL or $PGPASSWORD; $PGSSLMODE and $PGSSLROOTCERT
    /// are read as libpq reads them.
    #[arg(long, value_name = "DIR|URL")]
    pub store: Option<String>,
}

impl IndexArgs {
    /// The store to use.
    pub fn location(&self) -> StoreLocation {
        match (&self.store, &self.index) {
            (Some(s), _) => store_location(s),
            (None, Some(dir)) => StoreLocation::Dir(dir.clone()),
            (None, None) => StoreLocation::Dir(thinkrag::default_index_dir()),
        }
    }

    /// Opens the store to search; it must hold chunks.
    pub fn open_nonempty(&self) -> Result<Box<dyn ChunkStore>> {
        Ok(self.location().open_nonempty()?)
    }
}

/// A store named on the command line: a directory, or a `postgres://` URL whose password and TLS
/// settings may also come from `$PGPASSWORD`, `$PGSSLMODE` and `$PGSSLROOTCERT`, as with libpq.
pub fn store_location(arg: &str) -> StoreLocation {
    StoreLocation::parse(arg, PgOptions::from_env())
}

/// Which chunks a search may return, and how hard the approximate index looks.
#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
    /// Only chunks of this document, or of the documents under this directory (repeatable).
    #[arg(long = "source", value_name = "PATH")]
    pub sources: Vec<PathBuf>,
    /// Only chunks on these pages: N or FIRST-LAST, counted from 1.
    #[arg(long, value_name = "N|FIRST-LAST", value_parser = parse_pages)]
    pub pages: Option<(u32, u32)>,
    /// HNSW candidate list size for this search (higher: better recall, slower).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub ef_search: Option<u32>,
}

impl FilterArgs {
    /// The filter: sources as the absolute paths documents are stored under.
    pub fn filter(&self) -> SearchFilter {
        SearchFilter {
            sources: self
                .sources
                .iter()
                .map(|p| {
                    std::path::absolute(p)
                        .unwrap_or_else(|_| p.clone())
                        .display()
                        .to_string()
                })
                .collect(),
            pages: self.pages,
        }
    }

    /// The search options with this filter.
    pub fn options(&self, k: usize, mode: SearchMode, exact: bool) -> SearchOptions {
        SearchOptions {
            k,
            mode,
            exact,
            filter: self.filter(),
            ef_search: self.ef_search.map(|e| e as usize),
        }
    }
}

/// Parses `--pages`: `7` or `3-9`.
fn parse_pages(s: &str) -> std::result::Result<(u32, u32), String> {
    let bad = || format!("{s:?}: expected a page N or a range FIRST-LAST, counted from 1");
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        ),
        None => {
            let n = s.trim().parse().map_err(|_| bad())?;
            (n, n)
        }
    };
    if lo == 0 || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// Which embedding model, and how it embeds.
#[derive(Debug, Clone, Args)]
pub struct EmbedderChoice {
    /// Embedding model: a directory, a built-in name (bge-base-en-v1.5, bge-small-en-v1.5,
    /// all-minilm-l6-v2) or a hub repo. Default: the one the index was built with, else
    /// bge-base-en-v1.5.
    #[arg(long, env = "THINKRAG_EMBEDDER")]
    pub embedder: Option<String>,
    /// Pooling for a model directory that does not say (cls or mean).
    #[arg(long)]
    pub pooling: Option<Pooling>,
    /// Do not prefix queries with the model's instruction (BGE's "Represent this sentence...").
    #[arg(long, conflicts_with = "query_instruction")]
    pub no_query_instruction: bool,
    /// Prefix queries with this instead of the model's instruction.
    #[arg(long)]
    pub query_instruction: Option<String>,
    /// Most passages per embedding batch.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub batch_size: u16,
    /// Most tokens per embedding batch, padding included: long passages go in small batches,
    /// short ones in large ones.
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_tokens: u32,
    /// The embedder's arithmetic on a CPU: auto (bf16 projections on AMX tiles where the CPU has
    /// them, within cosine 0.9999 of f32, 1.5 to 2.5 times faster; f32 elsewhere) or f32.
    #[arg(long, default_value = "auto")]
    pub embedder_precision: EmbedderPrecision,
}

impl EmbedderChoice {
    /// The model to load: the flag, else the index's, else the default.
    pub fn spec(&self, index: Option<&EmbedderInfo>) -> String {
        if let Some(spec) = &self.embedder {
            return spec.clone();
        }
        if let Some(info) = index {
            return info.source.clone().unwrap_or_else(|| info.model.clone());
        }
        EmbedderManifest::default_name().to_string()
    }

    /// Loads the embedder on `device`, with a spinner on a terminal.
    pub fn load(
        &self,
        index: Option<&EmbedderInfo>,
        device: &DeviceChoice,
        hub: &HubArgs,
    ) -> Result<Embedder> {
        let spec = self.spec(index);
        let device = device
            .open()
            .with_context(|| format!("cannot open device {device:?}"))?;
        let opts = EmbedderOptions {
            device,
            batch_size: self.batch_size as usize,
            max_batch_tokens: self.batch_tokens as usize,
            query_instruction: match (&self.query_instruction, self.no_query_instruction) {
                (Some(p), _) => QueryInstruction::Custom(p.clone()),
                (None, true) => QueryInstruction::Off,
                (None, false) => QueryInstruction::ModelDefault,
            },
            pooling: self.pooling,
            hub: hub.options(),
            precision: self.embedder_precision,
        };
        let spinner = ProgressBar::new_spinner();
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            spinner.enable_steady_tick(std::time::Duration::from_millis(120));
        }
        spinner.set_message(format!("loading embedder {spec}"));
        let source = EmbedderSource::parse(&spec)?;
        let embedder = Embedder::load(&source, &opts)
            .with_context(|| format!("cannot load embedder {spec}"))?;
        spinner.finish_and_clear();
        Ok(embedder)
    }
}

/// Which embedding model, and where it runs (for the commands without a language model).
#[derive(Debug, Clone, Args)]
pub struct EmbedderArgs {
    #[command(flatten)]
    pub choice: EmbedderChoice,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// CPU threads (default: the physical cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub hub: HubArgs,
}

impl EmbedderArgs {
    /// Loads the embedder, with a spinner on a terminal.
    pub fn load(&self, index: Option<&EmbedderInfo>) -> Result<Embedder> {
        init_threads(self.threads)?;
        self.choice.load(index, &self.device, &self.hub)
    }
}

/// A progress bar on stderr: `{msg} [bar] pos/len`, hidden when stderr is not a terminal.
pub fn bar(len: u64, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{msg:30!}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{elapsed}} {{prefix}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// Reranking of retrieved chunks by a cross-encoder.
#[derive(Debug, Clone, Args)]
pub struct RerankArgs {
    /// Rerank the retrieved chunks with this cross-encoder (a directory or a hub repo such as
    /// BAAI/bge-reranker-base): more candidates are retrieved, reordered, and the best k kept.
    #[arg(long, value_name = "MODEL")]
    pub rerank: Option<String>,
    /// How many candidates the reranker reorders (at least k are retrieved).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rerank_candidates: u32,
}

impl RerankArgs {
    /// The loaded reranker with the number of candidates it reorders, as
    /// `thinkrag::search_reranked` takes them.
    pub fn with<'a>(&self, reranker: Option<&'a Reranker>) -> Option<(&'a Reranker, usize)> {
        reranker.map(|r| (r, self.rerank_candidates as usize))
    }

    /// Loads the reranker, if one was asked for, on `device`.
    pub fn load(
        &self,
        device: &DeviceChoice,
        hub: &HubArgs,
    ) -> Result<Option<std::sync::Arc<Reranker>>> {
        let Some(spec) = &self.rerank else {
            return Ok(None);
        };
        let device = device
            .open()
            .with_context(|| format!("cannot open device {device:?}"))?;
        let opts = RerankerOptions {
            device,
            hub: hub.options(),
            ..RerankerOptions::default()
        };
        let source = EmbedderSource::parse(spec)?;
        let reranker = Reranker::load(&source, &opts)
            .with_context(|| format!("cannot load reranker {spec}"))?;
        Ok(Some(std::sync::Arc::new(reranker)))
    }
}
