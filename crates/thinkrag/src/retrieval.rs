//! Retrieval: ingesting documents into a persistent index (find files, skip unchanged ones, read,
//! chunk, embed, store) and searching it. The CLI's `ingest` and `search` are thin layers over this.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use thinkrag_embed::{Embedder, EmbedderSpec, Reranker};
use thinkrag_index::{
    ChunkStore, EmbedderInfo, Index, IndexError, NewChunk, NewDocument, SearchFilter, SearchMode,
    StoreQuery,
};
use thinkrag_ingest::{Chunker, Failure};

use crate::error::{Error, Result};
use crate::store::StoreLocation;

/// How documents are cut into chunks (the ingestion crate's sizes; default 256 tokens with 32
/// of overlap).
pub use thinkrag_ingest::ChunkSize as Chunking;

/// How an ingestion runs.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Chunk sizes.
    pub chunking: Chunking,
    /// Drop indexed documents whose file no longer exists.
    pub prune: bool,
    /// Save the index this often while ingesting, so a crash loses at most this much work.
    pub checkpoint_every: Option<Duration>,
    /// Read PDFs in a child process under a time and memory limit, so one whose parser hangs,
    /// loops or overflows its stack fails alone (`None`: in this process, unprotected).
    pub isolation: Option<thinkrag_ingest::Isolation>,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            chunking: Chunking::default(),
            prune: false,
            checkpoint_every: Some(Duration::from_secs(120)),
            isolation: None,
        }
    }
}

/// Progress of an ingestion, for progress bars.
#[derive(Debug)]
pub enum IngestEvent<'a> {
    /// The files to look at were found.
    Discovered {
        /// How many.
        files: usize,
        /// Their total size in bytes (for an estimate of the time left: pages and chunks
        /// follow size far better than the number of files does).
        bytes: u64,
    },
    /// A file is being read.
    FileStarted {
        /// The file.
        path: &'a Path,
    },
    /// A file is unchanged since it was indexed and was skipped.
    FileUnchanged {
        /// The file.
        path: &'a Path,
    },
    /// A file was read and cut into chunks, about to be embedded.
    FileChunked {
        /// The file.
        path: &'a Path,
        /// Pages with text.
        pages: usize,
        /// Chunks to embed.
        chunks: usize,
    },
    /// A batch of chunks was embedded.
    Embedded {
        /// Chunks of the current file embedded so far.
        done: usize,
        /// Chunks of the current file.
        total: usize,
    },
    /// A file (or one of its pages) yielded no text.
    Failed(&'a Failure),
    /// A file is indexed.
    FileDone {
        /// The file.
        path: &'a Path,
    },
    /// The index is being written.
    Saving,
}

/// A file or page that yielded no text, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct FailureReport {
    /// The file.
    pub path: PathBuf,
    /// The page, for a page of a PDF.
    pub page: Option<u32>,
    /// Why, and what to do.
    pub reason: String,
}

impl From<&Failure> for FailureReport {
    fn from(f: &Failure) -> Self {
        Self {
            path: f.path.clone(),
            page: f.page,
            reason: f.reason.to_string(),
        }
    }
}

/// What an ingestion did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngestReport {
    /// Where the chunks were stored: the index directory, or the database URL without its
    /// password.
    pub index: String,
    /// Supported files found under the given paths.
    pub files_seen: usize,
    /// Files read and indexed (new or changed).
    pub files_indexed: usize,
    /// Files skipped because they are unchanged since they were indexed.
    pub files_unchanged: usize,
    /// Files that yielded no text.
    pub files_failed: usize,
    /// Pages read (with text) from the indexed files.
    pub pages: usize,
    /// Chunks embedded and added.
    pub chunks_added: usize,
    /// Chunks longer than the embedder's limit, cut to it (should be 0 with token chunking).
    pub chunks_truncated: usize,
    /// Documents dropped because their file is gone (`prune`).
    pub documents_pruned: Vec<String>,
    /// Every file or page that yielded no text, and why.
    pub failures: Vec<FailureReport>,
    /// Documents in the index afterwards.
    pub total_documents: usize,
    /// Chunks in the index afterwards.
    pub total_chunks: usize,
    /// Wall time.
    pub seconds: f64,
    /// Chunks embedded per second of wall time.
    pub chunks_per_second: f64,
    /// Pages read per second of wall time.
    pub pages_per_second: f64,
    /// Seconds the reading thread spent hashing, reading, parsing and chunking files (it runs
    /// ahead of embedding, so this overlaps the stages below).
    pub read_seconds: f64,
    /// Seconds spent embedding chunks.
    pub embed_seconds: f64,
    /// Seconds spent storing documents and committing (writing the index, or PostgreSQL).
    pub store_seconds: f64,
}

impl IngestReport {
    /// Whether some input yielded no text (a file, or a page of a PDF).
    pub fn has_failures(&self) -> bool {
        !self.failures.is_empty()
    }
}

/// What an index records about the embedder that made its vectors.
pub fn embedder_info(spec: &EmbedderSpec) -> EmbedderInfo {
    EmbedderInfo {
        model: spec.model.clone(),
        dim: spec.dim,
        pooling: spec.pooling.as_str().to_string(),
        normalized: spec.normalized,
        max_tokens: spec.max_tokens,
        source: Some(spec.source.clone()),
    }
}

/// Where the index lives when none is named: `$THINKRAG_INDEX`, else the user's data directory
/// (`~/.local/share/thinkrag/index` on Linux), else `.thinkrag-index` here.
pub fn default_index_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("THINKRAG_INDEX").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    dirs::data_dir()
        .map(|d| d.join("thinkrag").join("index"))
        .unwrap_or_else(|| PathBuf::from(".thinkrag-index"))
}

/// Opens the index in `dir`: [`Error::NoIndex`] when there is none.
pub fn open_index(dir: &Path) -> Result<Index> {
    match Index::open(dir) {
        Ok(index) => Ok(index),
        Err(IndexError::NotFound { .. }) => Err(Error::NoIndex {
            location: dir.display().to_string(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// The chunker `ingest` uses for `chunking` with this embedder (token sizes are checked against
/// the longest input it reads).
pub fn chunker(embedder: &Embedder, chunking: Chunking) -> Result<Chunker> {
    Ok(match chunking {
        Chunking::Tokens { max, overlap } => {
            let limit = embedder.max_tokens();
            if max > limit {
                return Err(Error::InvalidParameter {
                    name: "chunk tokens",
                    value: max.to_string(),
                    expected: format!(
                        "at most {limit}, the longest input {} embeds",
                        embedder.spec().model
                    ),
                });
            }
            Chunker::tokens(embedder.sizing_tokenizer(), max, overlap)?
        }
        Chunking::Chars { max, overlap } => Chunker::chars(max, overlap)?,
    })
}

/// The key a document is stored under: its absolute path, so the same file named two ways is one
/// document.
fn source_key(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// Ingests files and directories into the store at `location` (created if needed): new and
/// changed files are read, chunked, embedded and stored; unchanged ones are skipped; files that
/// yield no text are reported, never fatal. An index directory is replaced atomically at the
/// end (and at checkpoints), so an interruption leaves the previous one intact; PostgreSQL
/// commits each document in its own transaction, so an interruption leaves every document
/// either as it was or as it is now.
pub fn ingest(
    location: &StoreLocation,
    paths: &[PathBuf],
    embedder: &Embedder,
    opts: &IngestOptions,
    on_event: &mut dyn FnMut(IngestEvent<'_>),
) -> Result<IngestReport> {
    let started = Instant::now();
    let wanted = embedder_info(embedder.spec());
    // A new index directory is written even when nothing was ingested, so it can be opened.
    let existed = match location.dir() {
        Some(dir) => Index::current_generation(dir).is_ok(),
        None => true,
    };
    let mut store = location.open_or_create(&wanted)?;
    let chunker = chunker(embedder, opts.chunking)?;
    let mut report = IngestReport {
        index: location.display(),
        ..IngestReport::default()
    };
    let (files, missing) = thinkrag_ingest::discover(paths);
    report.files_seen = files.len();
    let bytes = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    on_event(IngestEvent::Discovered {
        files: files.len(),
        bytes,
    });
    for failure in &missing {
        on_event(IngestEvent::Failed(failure));
        report.failures.push(failure.into());
    }
    let mut changed = false;
    let mut last_save = Instant::now();
    // Reading, parsing and chunking run a few files ahead in a thread of their own while this one
    // embeds, so a corpus takes about the time of its slower stage rather than the sum of both.
    // The stored hashes are copied first: the reader never touches the index this thread writes.
    let known: HashMap<String, String> = store
        .documents()?
        .into_iter()
        .map(|d| (d.source, d.content_hash))
        .collect();
    let (sender, prepared) = std::sync::mpsc::sync_channel::<Prepared>(READ_AHEAD);
    std::thread::scope(|scope| -> Result<()> {
        let chunker = &chunker;
        let known = &known;
        let files = &files;
        let reader = scope.spawn(move || {
            let mut busy = Duration::ZERO;
            for path in files {
                let started = Instant::now();
                let item = prepare(path, known, opts, chunker);
                busy += started.elapsed();
                if sender.send(item).is_err() {
                    break; // the embedding side stopped (an error): read no further
                }
            }
            busy
        });
        embed_prepared(
            prepared,
            store.as_mut(),
            embedder,
            opts,
            &mut report,
            &mut changed,
            &mut last_save,
            on_event,
        )?;
        report.read_seconds = reader.join().map_or(0.0, |busy| busy.as_secs_f64());
        Ok(())
    })?;
    if opts.prune {
        let gone: Vec<String> = store
            .documents()?
            .into_iter()
            .filter(|d| !Path::new(&d.source).exists())
            .map(|d| d.source)
            .collect();
        for source in gone {
            store.remove_document(&source)?;
            report.documents_pruned.push(source);
            changed = true;
        }
    }
    if changed || !existed {
        on_event(IngestEvent::Saving);
        let started = Instant::now();
        store.commit()?;
        report.store_seconds += started.elapsed().as_secs_f64();
    }
    let stats = store.stats()?;
    report.total_documents = stats.documents;
    report.total_chunks = stats.chunks;
    report.seconds = started.elapsed().as_secs_f64();
    report.chunks_per_second = report.chunks_added as f64 / report.seconds.max(1e-9);
    report.pages_per_second = report.pages as f64 / report.seconds.max(1e-9);
    Ok(report)
}

/// Files read, parsed and chunked ahead of the one being embedded.
const READ_AHEAD: usize = 2;

/// A file made ready for embedding by the reading thread.
enum Prepared<'p> {
    /// Its content hash matches the indexed one: nothing to do.
    Unchanged(&'p Path),
    /// It yielded no text.
    Failed(&'p Path, Failure),
    /// Read and cut into chunks.
    Ready {
        path: &'p Path,
        key: String,
        document: thinkrag_ingest::Document,
        chunks: Vec<thinkrag_ingest::Chunk>,
    },
}

/// Reads, parses and chunks one file (the reading thread's part of an ingest).
fn prepare<'p>(
    path: &'p Path,
    known: &HashMap<String, String>,
    opts: &IngestOptions,
    chunker: &Chunker,
) -> Prepared<'p> {
    let key = source_key(path);
    // Hashing is far cheaper than extracting: unchanged files cost one read.
    if let (Some(stored), Ok(hash)) = (known.get(&key), thinkrag_ingest::file_hash(path)) {
        if *stored == hash {
            return Prepared::Unchanged(path);
        }
    }
    let loaded = match (
        &opts.isolation,
        thinkrag_ingest::DocumentKind::from_path(path),
    ) {
        (Some(isolation), Some(thinkrag_ingest::DocumentKind::Pdf)) => isolation.load(path),
        _ => thinkrag_ingest::load_document(path),
    };
    match loaded {
        Ok(document) => {
            let chunks = chunker.chunk(&document);
            Prepared::Ready {
                path,
                key,
                document,
                chunks,
            }
        }
        Err(failure) => Prepared::Failed(path, failure),
    }
}

/// The embedding thread's part of an ingest: embeds each prepared file as it arrives, stores it,
/// reports events and checkpoints.
#[allow(clippy::too_many_arguments)]
fn embed_prepared(
    prepared: std::sync::mpsc::Receiver<Prepared<'_>>,
    store: &mut dyn ChunkStore,
    embedder: &Embedder,
    opts: &IngestOptions,
    report: &mut IngestReport,
    changed: &mut bool,
    last_save: &mut Instant,
    on_event: &mut dyn FnMut(IngestEvent<'_>),
) -> Result<()> {
    for item in prepared {
        let (path, key, document, chunks) = match item {
            Prepared::Unchanged(path) => {
                on_event(IngestEvent::FileStarted { path });
                report.files_unchanged += 1;
                on_event(IngestEvent::FileUnchanged { path });
                continue;
            }
            Prepared::Failed(path, failure) => {
                on_event(IngestEvent::FileStarted { path });
                on_event(IngestEvent::Failed(&failure));
                report.failures.push((&failure).into());
                report.files_failed += 1;
                continue;
            }
            Prepared::Ready {
                path,
                key,
                document,
                chunks,
            } => (path, key, document, chunks),
        };
        on_event(IngestEvent::FileStarted { path });
        for failure in &document.page_failures {
            on_event(IngestEvent::Failed(failure));
            report.failures.push(failure.into());
        }
        on_event(IngestEvent::FileChunked {
            path,
            pages: document.pages.len(),
            chunks: chunks.len(),
        });
        let mut vectors = Vec::with_capacity(chunks.len());
        // Embedding file by file in slices keeps progress moving on long documents.
        for slice in chunks.chunks(128) {
            let texts: Vec<&str> = slice.iter().map(|c| c.text.as_str()).collect();
            let started = Instant::now();
            let embedded = embedder.embed_passages(&texts)?;
            report.embed_seconds += started.elapsed().as_secs_f64();
            report.chunks_truncated += embedded.truncated;
            vectors.extend(embedded.vectors);
            on_event(IngestEvent::Embedded {
                done: vectors.len(),
                total: chunks.len(),
            });
        }
        let new_chunks: Vec<NewChunk> = chunks
            .into_iter()
            .map(|c| NewChunk {
                text: c.text,
                page: c.page,
                start: c.start,
                end: c.end,
            })
            .collect();
        report.chunks_added += new_chunks.len();
        report.pages += document.pages.len();
        report.files_indexed += 1;
        let started = Instant::now();
        store.upsert_document(NewDocument {
            source: key,
            content_hash: document.content_hash.clone(),
            pages: document.page_count,
            chunks: new_chunks,
            vectors,
        })?;
        report.store_seconds += started.elapsed().as_secs_f64();
        *changed = true;
        on_event(IngestEvent::FileDone { path });
        if opts
            .checkpoint_every
            .is_some_and(|every| last_save.elapsed() >= every)
        {
            on_event(IngestEvent::Saving);
            let started = Instant::now();
            store.commit()?;
            report.store_seconds += started.elapsed().as_secs_f64();
            *last_save = Instant::now();
        }
    }
    Ok(())
}

/// How a search runs.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchOptions {
    /// How many chunks.
    pub k: usize,
    /// Vector, lexical or hybrid.
    pub mode: SearchMode,
    /// Exact vector search instead of the approximate index.
    pub exact: bool,
    /// Which documents and pages may be returned.
    pub filter: SearchFilter,
    /// The HNSW candidate list size (default: the store's choice).
    pub ef_search: Option<usize>,
}

impl Default for SearchOptions {
    fn default() -> Self {
        Self {
            k: 4,
            mode: SearchMode::Vector,
            exact: false,
            filter: SearchFilter::default(),
            ef_search: None,
        }
    }
}

impl SearchOptions {
    /// `k` chunks in `mode`, approximate, unfiltered.
    pub fn new(k: usize, mode: SearchMode) -> Self {
        Self {
            k,
            mode,
            ..Self::default()
        }
    }
}

/// [`search`], then, with a reranker, reranked: `(reranker, candidates)` retrieves that many
/// chunks (at least `k`), reorders them with [`rerank`] and keeps the best `k`.
pub fn search_reranked(
    store: &dyn ChunkStore,
    embedder: &Embedder,
    query: &str,
    opts: &SearchOptions,
    reranker: Option<(&Reranker, usize)>,
) -> Result<Vec<SearchHit>> {
    match reranker {
        None => search(store, embedder, query, opts),
        Some((reranker, candidates)) => {
            let wide = SearchOptions {
                k: candidates.max(opts.k),
                ..opts.clone()
            };
            let hits = search(store, embedder, query, &wide)?;
            rerank(reranker, query, hits, opts.k)
        }
    }
}
/// Reorders retrieved `hits` with a cross-encoder and keeps the best `keep`: each hit's
/// `score` becomes its relevance score (also in `rerank_score`); its retrieval scores stay.
pub fn rerank(
    reranker: &Reranker,
    query: &str,
    hits: Vec<SearchHit>,
    keep: usize,
) -> Result<Vec<SearchHit>> {
    Ok(reranker
        .rerank(query, hits, |h| h.text.as_str(), keep)?
        .into_iter()
        .map(|(mut h, s)| {
            h.score = s;
            h.rerank_score = Some(s);
            h
        })
        .collect())
}

/// One search result.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SearchHit {
    /// The chunk's id in the index.
    pub id: u64,
    /// The score hits are ranked by: cosine similarity (vector search), BM25 (lexical) or the
    /// reciprocal-rank-fusion score (hybrid).
    pub score: f32,
    /// Cosine similarity to the query, when it was embedded (vector and hybrid search).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vector_score: Option<f32>,
    /// BM25 score, when lexical search found the chunk (lexical and hybrid search).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lexical_score: Option<f32>,
    /// The cross-encoder's relevance score, when the hits were reranked (it is then `score`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rerank_score: Option<f32>,
    /// The chunk's text.
    pub text: String,
    /// The document it came from.
    pub source: String,
    /// Its page, for a PDF.
    pub page: Option<u32>,
    /// Byte offsets of the chunk in its page's text.
    pub start: usize,
    /// End offset.
    pub end: usize,
}

/// The `k` chunks that best match `query` in `mode`, best first: by their vectors (approximate
/// HNSW, or `exact` brute force), by their words (BM25 in an index directory, full-text rank in
/// PostgreSQL), or both fused (see [`thinkrag_index::SearchMode`]), among those the filter lets
/// through. Lexical search does not embed the query.
pub fn search(
    store: &dyn ChunkStore,
    embedder: &Embedder,
    query: &str,
    opts: &SearchOptions,
) -> Result<Vec<SearchHit>> {
    if opts.k == 0 {
        return Err(Error::InvalidParameter {
            name: "k",
            value: opts.k.to_string(),
            expected: "1 or more".into(),
        });
    }
    if let Some((lo, hi)) = opts.filter.pages {
        if lo > hi || lo == 0 {
            return Err(Error::InvalidParameter {
                name: "pages",
                value: format!("{lo}-{hi}"),
                expected: "a range FIRST-LAST of pages counted from 1, FIRST <= LAST".into(),
            });
        }
    }
    store.check_embedder(&embedder_info(embedder.spec()))?;
    let vector = if opts.mode.uses_vectors() {
        Some(embedder.embed_query(query)?)
    } else {
        None
    };
    let hits = store.search(&StoreQuery {
        text: query,
        vector: vector.as_deref(),
        k: opts.k,
        mode: opts.mode,
        exact: opts.exact,
        filter: &opts.filter,
        ef_search: opts.ef_search,
    })?;
    Ok(hits
        .into_iter()
        .map(|h| SearchHit {
            id: h.id,
            score: h.score,
            vector_score: h.vector_score,
            lexical_score: h.lexical_score,
            rerank_score: None,
            text: h.text,
            source: h.source,
            page: h.page,
            start: h.start,
            end: h.end,
        })
        .collect())
}
