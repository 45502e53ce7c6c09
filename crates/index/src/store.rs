//! The chunk-store seam: what ingestion, search, ask, chat and the server need from wherever the
//! chunks live. [`DirStore`] is the in-process index in a directory; `thinkrag-pgstore` keeps
//! them in PostgreSQL with pgvector. Ranking (the fusion of vector and lexical hits) is the same
//! on every store because it is done by [`crate::reciprocal_rank_fusion`] here, not by a backend.

use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use serde::{Deserialize, Serialize};

use crate::{EmbedderInfo, Index, IndexError, NewChunk, SearchMode};

/// Errors of a chunk store: the in-process index's, or a backend's own (typed, boxed so that
/// this crate does not depend on every backend; downcast to reach it).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The in-process index failed (or a check shared by all stores did, e.g. the embedder).
    #[error(transparent)]
    Index(#[from] IndexError),
    /// Nothing was ingested into a backend's store yet (an index directory says so with
    /// [`IndexError::NotFound`]).
    #[error("no thinkrag store in {location}; ingest documents to create one")]
    NotFound {
        /// Where it was looked for (without a password).
        location: String,
    },
    /// A backend failed; its error names the store and what to do.
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl StoreError {
    /// Whether this is "there is no store there yet" (nothing ingested).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            StoreError::Index(IndexError::NotFound { .. }) | StoreError::NotFound { .. }
        )
    }
}

/// Which chunks a search may return. Empty: all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchFilter {
    /// Only chunks of these documents, or of documents under these directories (a source is
    /// stored as an absolute path); empty: every document.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    /// Only chunks on pages in this inclusive range (chunks without a page, from text files,
    /// are left out when it is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<(u32, u32)>,
}

impl SearchFilter {
    /// Whether the filter lets everything through.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty() && self.pages.is_none()
    }

    /// Whether a chunk of `source` on `page` passes.
    pub fn matches(&self, source: &str, page: Option<u32>) -> bool {
        let source_ok =
            self.sources.is_empty() || self.sources.iter().any(|p| source_under(source, p));
        let page_ok = match (self.pages, page) {
            (None, _) => true,
            (Some((lo, hi)), Some(p)) => lo <= p && p <= hi,
            (Some(_), None) => false,
        };
        source_ok && page_ok
    }
}

/// Whether `source` is `prefix` itself or lies under the directory `prefix`.
pub fn source_under(source: &str, prefix: &str) -> bool {
    let dir = prefix.trim_end_matches('/');
    source == prefix
        || (source.len() > dir.len()
            && source.starts_with(dir)
            && source.as_bytes()[dir.len()] == b'/')
}

/// A search request to a store.
#[derive(Clone, Debug)]
pub struct StoreQuery<'a> {
    /// The query's text (lexical and hybrid search).
    pub text: &'a str,
    /// The query's embedding (vector and hybrid search).
    pub vector: Option<&'a [f32]>,
    /// How many hits.
    pub k: usize,
    /// Vector, lexical or hybrid.
    pub mode: SearchMode,
    /// Exact vector search instead of the approximate index.
    pub exact: bool,
    /// Which chunks may be returned.
    pub filter: &'a SearchFilter,
    /// The HNSW candidate list size for this query (default: the store's own choice).
    pub ef_search: Option<usize>,
}

/// One search hit, owned (it outlives the store's locks and connections).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreHit {
    /// The chunk's id in the store (stable, never reused).
    pub id: u64,
    /// The score hits are ranked by: cosine similarity (vector), the lexical score (lexical) or
    /// the reciprocal-rank-fusion score (hybrid).
    pub score: f32,
    /// Cosine similarity to the query, when it was embedded.
    pub vector_score: Option<f32>,
    /// The lexical score, when lexical search found the chunk: BM25 in the in-process index,
    /// the sum of the inverse document frequencies of the query words it holds (plus a phrase
    /// bonus) in PostgreSQL.
    pub lexical_score: Option<f32>,
    /// The chunk's text.
    pub text: String,
    /// The document it came from.
    pub source: String,
    /// Its page, for a PDF.
    pub page: Option<u32>,
    /// Byte offset of the chunk's start in its page's text.
    pub start: usize,
    /// End offset.
    pub end: usize,
}

/// A stored document, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDocument {
    /// Its key (the file's absolute path for ingested files).
    pub source: String,
    /// Hash of the file it was read from, to skip unchanged files.
    pub content_hash: String,
    /// Pages (1 for unpaginated formats).
    pub pages: u32,
    /// Chunks stored for it.
    pub chunks: usize,
    /// When it was (re)ingested, seconds since the Unix epoch.
    pub ingested_at: u64,
}

/// A document to store: its chunks and one vector per chunk.
#[derive(Clone, Debug, PartialEq)]
pub struct NewDocument {
    /// Its key; an existing document with this key is replaced.
    pub source: String,
    /// Hash of the file it was read from.
    pub content_hash: String,
    /// Pages (1 for unpaginated formats).
    pub pages: u32,
    /// The chunks, in document order.
    pub chunks: Vec<NewChunk>,
    /// `vectors[i]` embeds `chunks[i]`.
    pub vectors: Vec<Vec<f32>>,
}

/// Counts of a store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoreStats {
    /// Documents stored.
    pub documents: usize,
    /// Chunks stored.
    pub chunks: usize,
    /// The embedder that made the vectors.
    pub embedder: EmbedderInfo,
}

/// Where chunks live: documents upserted and removed by source, searched by vector, words or
/// both, each store checked on open against the embedder that made its vectors.
///
/// Writes become durable at [`ChunkStore::commit`] (or sooner: PostgreSQL commits each
/// document in its own transaction); a crash before it loses at most the uncommitted documents,
/// never leaves one half-written, and never damages what was committed.
pub trait ChunkStore: Send + Sync + std::fmt::Debug {
    /// Where the store is, for messages (a directory, or a URL without its password).
    fn location(&self) -> String;

    /// The embedder that made the stored vectors.
    fn embedder(&self) -> &EmbedderInfo;

    /// Checks that `wanted` made the stored vectors (same model, dimension, pooling and
    /// normalisation).
    fn check_embedder(&self, wanted: &EmbedderInfo) -> Result<(), StoreError> {
        check_embedder(self.embedder(), wanted).map_err(StoreError::from)
    }

    /// Counts of documents and chunks.
    fn stats(&self) -> Result<StoreStats, StoreError>;

    /// Every stored document, ordered by source.
    fn documents(&self) -> Result<Vec<StoredDocument>, StoreError>;

    /// A stored document with its chunks (in document order) and their vectors, as
    /// [`ChunkStore::upsert_document`] takes it: for copying between stores without embedding
    /// again. `None` when there is no such document.
    fn export_document(&self, source: &str) -> Result<Option<NewDocument>, StoreError>;

    /// Adds or replaces one document with all its chunks: afterwards searches see either the
    /// old version or the new one, never a mix. Vectors must have the store's dimension and be
    /// finite and non-zero; on error nothing is changed.
    fn upsert_document(&mut self, document: NewDocument) -> Result<(), StoreError>;

    /// Removes a document and its chunks; returns whether it was there.
    fn remove_document(&mut self, source: &str) -> Result<bool, StoreError>;

    /// Makes every change so far durable and visible to other processes.
    fn commit(&mut self) -> Result<(), StoreError>;

    /// The best `query.k` chunks for the query, best first.
    fn search(&self, query: &StoreQuery<'_>) -> Result<Vec<StoreHit>, StoreError>;

    /// Takes up changes other processes committed since this store was opened; returns whether
    /// anything changed. Stores that always read the latest committed state return `false`.
    fn refresh(&self) -> Result<bool, StoreError> {
        Ok(false)
    }
}

/// The embedder check every store applies: same model, dimension, pooling and normalisation
/// (`max_tokens` may differ since it only changes truncation of long chunks).
pub fn check_embedder(stored: &EmbedderInfo, wanted: &EmbedderInfo) -> Result<(), IndexError> {
    if stored.model == wanted.model
        && stored.dim == wanted.dim
        && stored.pooling == wanted.pooling
        && stored.normalized == wanted.normalized
    {
        Ok(())
    } else {
        Err(IndexError::EmbedderMismatch {
            index: Box::new(stored.clone()),
            wanted: Box::new(wanted.clone()),
        })
    }
}

/// The in-process store: an [`Index`] saved in a directory (atomic generations), following
/// the directory when another process saves a newer generation ([`ChunkStore::refresh`]).
#[derive(Debug)]
pub struct DirStore {
    dir: PathBuf,
    index: RwLock<Index>,
    /// The embedder, copied out of the lock so [`ChunkStore::embedder`] can lend it.
    embedder: EmbedderInfo,
}

impl DirStore {
    /// Opens the index in `dir` ([`IndexError::NotFound`] when there is none).
    pub fn open(dir: &Path) -> Result<Self, IndexError> {
        Ok(Self::from_index(dir, Index::open(dir)?))
    }

    /// Opens the index in `dir`, or starts an empty one for `embedder` there (written at the
    /// first commit); an existing index must have been built by `embedder`.
    pub fn open_or_create(dir: &Path, embedder: &EmbedderInfo) -> Result<Self, IndexError> {
        match Index::open(dir) {
            Ok(index) => {
                index.check_embedder(embedder)?;
                Ok(Self::from_index(dir, index))
            }
            Err(IndexError::NotFound { .. }) => {
                Ok(Self::from_index(dir, Index::new(embedder.clone())))
            }
            Err(e) => Err(e),
        }
    }

    /// Wraps an index opened from (or to be saved in) `dir`.
    pub fn from_index(dir: &Path, index: Index) -> Self {
        Self {
            dir: dir.to_path_buf(),
            embedder: index.embedder().clone(),
            index: RwLock::new(index),
        }
    }

    /// The index directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `f` on the index as of now (for inspection: counts, generations, chunks).
    pub fn with_index<T>(&self, f: impl FnOnce(&Index) -> T) -> T {
        f(&self.index.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn index_mut(&mut self) -> &mut Index {
        self.index.get_mut().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ChunkStore for DirStore {
    fn location(&self) -> String {
        self.dir.display().to_string()
    }

    fn embedder(&self) -> &EmbedderInfo {
        &self.embedder
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        Ok(self.with_index(|i| StoreStats {
            documents: i.documents().count(),
            chunks: i.len(),
            embedder: i.embedder().clone(),
        }))
    }

    fn documents(&self) -> Result<Vec<StoredDocument>, StoreError> {
        Ok(self.with_index(|i| {
            i.documents()
                .map(|d| StoredDocument {
                    source: d.source.clone(),
                    content_hash: d.content_hash.clone(),
                    pages: d.pages,
                    chunks: d.chunk_ids.len(),
                    ingested_at: d.ingested_at,
                })
                .collect()
        }))
    }

    fn export_document(&self, source: &str) -> Result<Option<NewDocument>, StoreError> {
        Ok(self.with_index(|i| {
            let doc = i.document(source)?;
            let mut chunks = Vec::with_capacity(doc.chunk_ids.len());
            let mut vectors = Vec::with_capacity(doc.chunk_ids.len());
            for &id in &doc.chunk_ids {
                let (c, v) = (i.chunk(id)?, i.vector(id)?);
                chunks.push(NewChunk {
                    text: c.text.clone(),
                    page: c.page,
                    start: c.start,
                    end: c.end,
                });
                vectors.push(v.to_vec());
            }
            Some(NewDocument {
                source: doc.source.clone(),
                content_hash: doc.content_hash.clone(),
                pages: doc.pages,
                chunks,
                vectors,
            })
        }))
    }

    fn upsert_document(&mut self, d: NewDocument) -> Result<(), StoreError> {
        self.index_mut()
            .upsert_document(&d.source, &d.content_hash, d.pages, d.chunks, d.vectors)
            .map_err(StoreError::from)
    }

    fn remove_document(&mut self, source: &str) -> Result<bool, StoreError> {
        Ok(self.index_mut().remove_document(source))
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        self.index_mut().save(&dir).map_err(StoreError::from)
    }

    fn search(&self, q: &StoreQuery<'_>) -> Result<Vec<StoreHit>, StoreError> {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        let hits = index.search_filtered(q)?;
        Ok(hits
            .into_iter()
            .map(|h| StoreHit {
                id: h.chunk.id,
                score: h.score,
                vector_score: h.vector_score,
                lexical_score: h.lexical_score,
                text: h.chunk.text.clone(),
                source: h.chunk.source.clone(),
                page: h.chunk.page,
                start: h.chunk.start,
                end: h.chunk.end,
            })
            .collect())
    }

    /// Opens the directory's newest generation when another process saved one since; an index
    /// that cannot be opened (or was rebuilt by another embedder) is reported and the current
    /// one kept.
    fn refresh(&self) -> Result<bool, StoreError> {
        let opened = self.with_index(|i| i.generation().map(str::to_string));
        let Ok(now) = Index::current_generation(&self.dir) else {
            return Ok(false);
        };
        if opened.as_deref() == Some(now.as_str()) {
            return Ok(false);
        }
        let index = Index::open(&self.dir)?;
        check_embedder(&self.embedder, index.embedder())?;
        tracing::info!(
            dir = %self.dir.display(),
            generation = index.generation().unwrap_or("?"),
            chunks = index.len(),
            "index changed on disk: searching the new generation"
        );
        *self.index.write().unwrap_or_else(PoisonError::into_inner) = index;
        Ok(true)
    }
}
