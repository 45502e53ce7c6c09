//! Flags shared by the retrieval commands (`ingest`, `search`, `index`): where the index lives and
//! which embedding model runs where, and loading that model with a spinner.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use thinkrag::embed::{
    Embedder, EmbedderManifest, EmbedderOptions, EmbedderSource, Pooling, QueryInstruction,
    Reranker, RerankerOptions,
};
use thinkrag::index::Index;
use thinkrag_llm::DeviceChoice;

use crate::load::{init_threads, HubArgs};

/// Where the index lives.
#[derive(Debug, Clone, Args)]
pub struct IndexArgs {
    /// Index directory (default: $THINKRAG_INDEX, else ~/.local/share/thinkrag/index).
    #[arg(long, value_name = "DIR")]
    pub index: Option<PathBuf>,
}

impl IndexArgs {
    /// The index directory to use.
    pub fn dir(&self) -> PathBuf {
        self.index
            .clone()
            .unwrap_or_else(thinkrag::default_index_dir)
    }

    /// Opens the index to search: its directory and the index, which must hold chunks.
    pub fn open_nonempty(&self) -> Result<(PathBuf, Index)> {
        let dir = self.dir();
        let index = thinkrag::open_index(&dir)?;
        if index.is_empty() {
            return Err(thinkrag::Error::EmptyIndex { dir }.into());
        }
        Ok((dir, index))
    }
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
}

impl EmbedderChoice {
    /// The model to load: the flag, else the index's, else the default.
    pub fn spec(&self, index: Option<&Index>) -> String {
        if let Some(spec) = &self.embedder {
            return spec.clone();
        }
        if let Some(index) = index {
            let info = index.embedder();
            return info.source.clone().unwrap_or_else(|| info.model.clone());
        }
        EmbedderManifest::default_name().to_string()
    }

    /// Loads the embedder on `device`, with a spinner on a terminal.
    pub fn load(
        &self,
        index: Option<&Index>,
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
    pub fn load(&self, index: Option<&Index>) -> Result<Embedder> {
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
