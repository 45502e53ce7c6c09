//! thinkrag-index: a persistent index of document chunks and their embedding vectors.
//! Approximate search runs on an HNSW graph (thinkrag's own, `graph.rs`), exact search by brute force, lexical
//! search by BM25 (tantivy), hybrid search by fusing both; the index lives in a versioned
//! directory that is replaced atomically and updated per document.
//!
//! # On-disk layout
//!
//! ```text
//! dir/
//!   index.json          manifest: format, version, generation, embedder, counts, next_id,
//!                       HNSW params, SHA-256 of every file, segments and tombstones
//!                       (replaced by atomic rename)
//!   .lock               advisory lock: exclusive while saving, shared while opening
//!   gen-000006/         the previous version, kept as the fallback
//!   gen-000007/         one complete version ("generation"), never modified once written
//!     manifest.json     this generation's manifest (written last: the directory is complete)
//!     chunks.jsonl      one ChunkRecord per line, in slot order          } the first segment
//!     vectors.f32       "TRVECF32", dim u64 LE, count u64 LE, count*dim  }
//!                       f32 LE (normalised)
//!     chunks-gen-000007.jsonl, vectors-gen-000007.f32
//!                       a later segment: the slots added by that save (version 2)
//!     documents.json    DocumentRecords
//!     hnsw.links0       graph dump, level-0 neighbour lists (of the first `graph_points`
//!     hnsw.upper        slots; the rest are inserted on open), and its header, levels and
//!                       upper-level lists (no vectors: they are the segments')
//!     lexical/          tantivy's files of the BM25 index over the chunk texts (derived:
//!                       rebuilt from chunks.jsonl when absent or damaged)
//! ```
//!
//! A save writes a fresh `gen-N+1/`, fsyncs it, then renames a new manifest over `index.json`;
//! only then are older generation directories deleted, all but the one just replaced. A crash at
//! any point leaves the old manifest naming the old, complete generation, or the new manifest
//! naming the new one. Opening verifies every file's checksum; a damaged current generation (a
//! truncated file, a flipped bit) falls back to the previous one when that is intact.
//!
//! Saves are incremental: removing a document marks its chunks' slots removed (tombstones; the
//! graph keeps their points and searches skip them), and a save hard-links the segments, graph
//! dump and lexical files the previous generation already holds, writing only a segment with
//! the new slots, the document list, the tombstones and the lexical index's new files. A save
//! writes everything afresh (a plain version-1 generation: one segment, no tombstones) when
//! removed slots pass a quarter of all of them, or after 32 segments; that compaction renumbers
//! the slots and rebuilds the graph. Files shared between generations are one file on disk: a
//! damaged shared file is named by both, so the fallback protects what each save wrote itself.

mod error;
mod fusion;
mod graph;
mod lexical;
mod storage;
mod store;
mod vector;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use error::IndexError;
pub use fusion::{
    fuse_candidates, hybrid_candidates, reciprocal_rank_fusion, Fused, SearchMode,
    UnknownSearchMode, RRF_K,
};
pub use store::{
    check_embedder, source_under, ChunkStore, DirStore, NewDocument, SearchFilter, StoreError,
    StoreHit, StoreQuery, StoreStats, StoredDocument,
};
pub use vector::{dot, normalized, HnswParams, VectorIndex};

use lexical::{LexicalError, LexicalIndex};
use storage::{DirLock, FileChecksums, GraphFiles, LexicalFiles, Manifest};

/// Which embedder made the vectors; stored in the index and checked on open.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EmbedderInfo {
    /// Model identifier, e.g. "sentence-transformers/all-MiniLM-L6-v2" or a directory name.
    pub model: String,
    /// Dimension of the vectors.
    pub dim: usize,
    /// Pooling used to turn token states into one vector: "cls" or "mean".
    pub pooling: String,
    /// Whether the embedder L2-normalises its output.
    pub normalized: bool,
    /// Longest input in tokens the embedder reads (longer chunks are truncated).
    pub max_tokens: usize,
    /// Where the embedder was loaded from (a manifest name, hub repo or directory), so that a
    /// later run can load the same one. Informational: [`Index::check_embedder`] ignores it.
    #[serde(default)]
    pub source: Option<String>,
}

/// A chunk as stored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChunkRecord {
    /// Stable identifier, never reused within one index.
    pub id: u64,
    /// The chunk's text.
    pub text: String,
    /// Path of the source document as given (the caller canonicalises it).
    pub source: String,
    /// Page number in the source, for paginated formats.
    pub page: Option<u32>,
    /// Byte offset of the chunk's start in the document's extracted text.
    pub start: usize,
    /// Byte offset just past the chunk's end.
    pub end: usize,
    /// SHA-256 (hex) of `text`.
    pub content_hash: String,
}

/// A new chunk to add (it gets its id from the index).
#[derive(Clone, Debug, PartialEq)]
pub struct NewChunk {
    /// The chunk's text.
    pub text: String,
    /// Page number in the source, for paginated formats.
    pub page: Option<u32>,
    /// Byte offset of the chunk's start in the document's extracted text.
    pub start: usize,
    /// Byte offset just past the chunk's end.
    pub end: usize,
}

/// A search hit.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit<'a> {
    /// The matching chunk.
    pub chunk: &'a ChunkRecord,
    /// The score the hits are ranked by: the cosine similarity (vector search, in [-1, 1]),
    /// the BM25 score (lexical) or the reciprocal-rank-fusion score (hybrid).
    pub score: f32,
    /// Cosine similarity between the query and the chunk's vector, when the query was embedded.
    pub vector_score: Option<f32>,
    /// BM25 score, when the chunk was among the lexical results.
    pub lexical_score: Option<f32>,
}

/// Per-document bookkeeping for incremental ingestion.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DocumentRecord {
    /// Path of the document as given to [`Index::upsert_document`].
    pub source: String,
    /// Hash of the document file, used to skip unchanged files.
    pub content_hash: String,
    /// Ids of the document's chunks, in document order.
    pub chunk_ids: Vec<u64>,
    /// Number of pages (1 for unpaginated formats).
    pub pages: u32,
    /// When the document was (re)ingested, in seconds since the Unix epoch.
    pub ingested_at: u64,
    /// The caller's own data about the document (a search engine's `_source`, a version), kept
    /// with it and saved in the same generation; set with [`Index::set_document_fields`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<serde_json::Value>,
}

/// Summary of an index, for `thinkrag info`-style output.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct IndexInfo {
    /// Number of chunks.
    pub chunks: usize,
    /// Number of documents.
    pub documents: usize,
    /// The embedder that made the vectors.
    pub embedder: EmbedderInfo,
    /// Vector dimension.
    pub dim: usize,
    /// HNSW parameters.
    pub hnsw: HnswParams,
}

/// A persistent, incrementally updated index of chunks and their vectors.
///
/// Chunks and their (normalised) vectors are kept in parallel arrays; the HNSW graph's point
/// `i` is vector `i` (slot `i`). The graph is kept in step with additions; removals mark their
/// slots removed, which searches skip, until a save compacts the arrays (when removed slots pass
/// a quarter of them) and the graph is rebuilt from the vectors.
#[derive(Debug)]
pub struct Index {
    embedder: EmbedderInfo,
    params: HnswParams,
    chunks: Vec<ChunkRecord>,
    /// `chunks.len() * dim` components, L2-normalised.
    vectors: Vec<f32>,
    /// Per slot: removed (a tombstone). Removed chunks keep their slot, vector and graph point
    /// until a compaction, so removing a document costs in proportion to the document.
    dead: Vec<bool>,
    /// How many slots are removed.
    dead_count: usize,
    /// Live chunks only.
    slot_of: HashMap<u64, usize>,
    documents: BTreeMap<String, DocumentRecord>,
    next_id: u64,
    /// Covers every vector when set; empty when stale or not yet built.
    graph: OnceLock<VectorIndex>,
    /// BM25 over every chunk's text when set (kept in step with changes); built on first use
    /// from `lexical_files` when they are intact, else from the chunks.
    lexical: OnceLock<LexicalIndex>,
    /// The saved lexical index of the generation this index was opened from.
    lexical_files: Option<(PathBuf, LexicalFiles)>,
    /// Up to this many chunks [`Index::search`] scans exactly instead of using the graph.
    exact_scan_limit: usize,
    /// The (canonical) directory and generation this index was last opened from or saved to,
    /// to detect another process saving in between.
    origin: Option<(PathBuf, String)>,
    /// Set when opening fell back to an earlier generation.
    recovery: Option<Recovery>,
    /// What the generation this index was opened from (or last saved as) holds for its first
    /// slots, so the next save hard-links those files and writes only what changed; `None`
    /// after a compaction moved the slots.
    persisted: Option<Persisted>,
}

/// What [`Index::write_generation`] wrote, for the manifest.
struct Written {
    graph: Option<GraphFiles>,
    graph_points: usize,
    files: FileChecksums,
    lexical: Option<LexicalFiles>,
    segments: Vec<storage::SegmentFiles>,
    tombstones: Vec<u64>,
}

/// The files of the generation an index was opened from or saved as, and the slots they hold.
#[derive(Debug, Clone)]
struct Persisted {
    gen_dir: PathBuf,
    segments: Vec<storage::SegmentFiles>,
    /// Slots `0..slots` are in `segments`, in order.
    slots: usize,
    /// The graph dump and how many of the first slots it holds.
    graph: Option<(GraphFiles, usize)>,
    /// The saved lexical index's files.
    lexical: Option<LexicalFiles>,
}

impl Persisted {
    /// What the generation in `gen_dir` holds, as its manifest says; `None` when a file lacks a
    /// checksum (an index from before checksums: the next save writes everything). The graph
    /// dump counts only when `graph_usable` (it loaded, or it was just written).
    fn of(gen_dir: &Path, manifest: &Manifest, graph_usable: bool) -> Option<Self> {
        let segments = manifest.segment_files();
        if segments
            .iter()
            .any(|s| s.chunks_sha256.is_empty() || s.vectors_sha256.is_empty())
        {
            return None;
        }
        let slots = segments.iter().map(|s| s.count).sum();
        Some(Persisted {
            gen_dir: gen_dir.to_path_buf(),
            slots,
            graph: manifest
                .graph
                .clone()
                .filter(|_| graph_usable)
                .map(|g| (g, manifest.graph_points.unwrap_or(slots).min(slots))),
            lexical: manifest.lexical.clone(),
            segments,
        })
    }
}

/// Removed slots beyond this share of all slots make the next save compact the index (drop
/// them, renumber the slots, rebuild the graph) instead of saving incrementally.
const COMPACT_DEAD_SHARE: f64 = 0.25;
/// Segments beyond this make the next save write one segment afresh.
const MAX_SEGMENTS: usize = 32;
/// Points not in the saved graph dump beyond this share of the dump (or 4,096) make the next
/// save dump the graph again; below it they are inserted on open.
const GRAPH_REDUMP_SHARE: f64 = 0.25;

/// How [`Index::open`] recovered from a damaged current version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recovery {
    /// The error that made the current version unusable (it names the damaged file).
    pub damage: String,
    /// The generation directory opened instead.
    pub generation: String,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Vector components an exact scan may touch per query before HNSW is used instead.
///
/// Measured on the clustered 100,000 x 384 set (`ann_files` example, 2 cores): the scan costs
/// 0.17 ns per component on one thread, a graph query at the default ef about 0.34 ms. Below
/// 4M components (about 10,000 chunks of 384, 5,000 of 768) the scan takes at most 0.7 ms,
/// within 2x of the graph, and it is exact and needs no graph built.
const EXACT_SCAN_COMPONENTS: usize = 4 * 1024 * 1024;

fn default_exact_scan_limit(dim: usize) -> usize {
    EXACT_SCAN_COMPONENTS / dim.max(1)
}

/// SHA-256 (hex) of a chunk's text: what [`ChunkRecord::content_hash`] holds, for every store.
pub fn chunk_hash(text: &str) -> String {
    storage::hex(&Sha256::digest(text.as_bytes()))
}

impl Index {
    /// A new empty index for this embedder (in memory until saved), with default HNSW params.
    pub fn new(embedder: EmbedderInfo) -> Self {
        Index {
            params: HnswParams::default(),
            chunks: Vec::new(),
            vectors: Vec::new(),
            dead: Vec::new(),
            dead_count: 0,
            slot_of: HashMap::new(),
            documents: BTreeMap::new(),
            next_id: 0,
            graph: OnceLock::new(),
            lexical: OnceLock::new(),
            lexical_files: None,
            exact_scan_limit: default_exact_scan_limit(embedder.dim),
            embedder,
            origin: None,
            recovery: None,
            persisted: None,
        }
    }

    /// A new empty index with explicit HNSW parameters.
    pub fn with_params(embedder: EmbedderInfo, params: HnswParams) -> Result<Self, IndexError> {
        params.validate()?;
        let mut index = Self::new(embedder);
        index.params = params;
        Ok(index)
    }

    /// Opens the index in `dir`.
    ///
    /// Every data file is checked against the checksum its manifest recorded. When the current
    /// generation (or `index.json` itself) is damaged and an intact earlier generation is still
    /// on disk (a save keeps the one before it), that one is opened instead, with a warning and
    /// [`Index::recovery`] saying so; the next save replaces the damaged generation.
    ///
    /// Errors: [`IndexError::NotFound`] when there is none, [`IndexError::NewerFormat`] for a
    /// newer format version, [`IndexError::Corrupt`] (naming the file) for damaged files when
    /// no intact generation is left.
    pub fn open(dir: &Path) -> Result<Self, IndexError> {
        if !dir.join(storage::MANIFEST).is_file() {
            return Err(IndexError::NotFound {
                dir: dir.to_path_buf(),
            });
        }
        let started = Instant::now();
        let _lock = DirLock::shared(dir);
        let canonical = dir.canonicalize().ok();
        let (failed_generation, damage) = match storage::read_manifest(dir) {
            Ok(manifest) => match Self::open_generation(dir, &manifest) {
                Ok(mut index) => {
                    tracing::debug!(
                        dir = %dir.display(),
                        chunks = index.chunks.len(),
                        graph_loaded = index.graph.get().is_some(),
                        ms = started.elapsed().as_millis() as u64,
                        "opened index"
                    );
                    index.origin = canonical.map(|d| (d, manifest.generation));
                    return Ok(index);
                }
                Err(e @ IndexError::Corrupt { .. }) => (Some(manifest.generation), e),
                Err(e) => return Err(e),
            },
            Err(e @ IndexError::Corrupt { .. }) => (None, e),
            Err(e) => return Err(e),
        };
        // Newest first; only generations older than a damaged current one (a newer directory
        // would be a save that never published), any when the manifest itself is unreadable.
        let mut candidates: Vec<(u64, String)> = storage::list_generations(dir)?
            .into_iter()
            .filter_map(|g| storage::generation_number(&g).map(|n| (n, g)))
            .filter(|(n, _)| {
                failed_generation
                    .as_deref()
                    .and_then(storage::generation_number)
                    .is_none_or(|failed| *n < failed)
            })
            .collect();
        candidates.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
        for (_, generation) in candidates {
            let gen_dir = dir.join(&generation);
            let Ok(manifest) = storage::read_generation_manifest(&gen_dir) else {
                continue;
            };
            if manifest.generation != generation {
                continue;
            }
            match Self::open_generation(dir, &manifest) {
                Ok(mut index) => {
                    tracing::warn!(
                        damaged = %damage,
                        using = %gen_dir.display(),
                        "the index's current version is damaged; opened the previous intact version instead (documents ingested since are missing until ingested again)"
                    );
                    index.recovery = Some(Recovery {
                        damage: damage.to_string(),
                        generation: generation.clone(),
                    });
                    // A save must replace the damaged generation, not report a conflict with it.
                    index.origin = canonical.map(|d| (d, failed_generation.unwrap_or(generation)));
                    return Ok(index);
                }
                Err(e) => {
                    tracing::debug!(generation = %generation, error = %e, "earlier index generation is not usable either");
                }
            }
        }
        Err(damage)
    }

    /// Loads one generation as its manifest describes it, verifying every file.
    fn open_generation(dir: &Path, manifest: &Manifest) -> Result<Self, IndexError> {
        let dim = manifest.embedder.dim;
        manifest
            .hnsw_params
            .validate()
            .map_err(|e| IndexError::corrupt(dir.join(storage::MANIFEST), e.to_string()))?;
        let gen_dir = dir.join(&manifest.generation);
        if !gen_dir.is_dir() {
            return Err(IndexError::corrupt(
                &gen_dir,
                "the generation directory named by the manifest is missing",
            ));
        }
        let segments = manifest.segment_files();
        let slots: usize = segments.iter().map(|s| s.count).sum();
        let mut vectors = Vec::with_capacity(slots.min(1 << 24) * dim);
        let mut chunks = Vec::with_capacity(slots.min(1 << 24));
        for seg in &segments {
            if !seg.names_are_plain() {
                return Err(IndexError::corrupt(
                    dir.join(storage::MANIFEST),
                    format!("invalid segment file names {seg:?}"),
                ));
            }
            // Indexes written before checksums were recorded have none to check.
            let want = |h: &str| (!h.is_empty()).then(|| h.to_string());
            let vectors_path = gen_dir.join(&seg.vectors_file);
            let bytes = storage::read_data(&vectors_path)?;
            vectors.extend(storage::parse_vectors(
                &vectors_path,
                &bytes,
                dim,
                seg.count,
            )?);
            storage::verify_sha256(&vectors_path, &bytes, want(&seg.vectors_sha256).as_deref())?;
            drop(bytes);
            let chunks_path = gen_dir.join(&seg.chunks_file);
            let bytes = storage::read_data(&chunks_path)?;
            chunks.extend(parse_chunks(&chunks_path, &bytes, seg.count)?);
            storage::verify_sha256(&chunks_path, &bytes, want(&seg.chunks_sha256).as_deref())?;
        }
        let docs_path = gen_dir.join(storage::DOCUMENTS_FILE);
        let bytes = storage::read_data(&docs_path)?;
        let documents: Vec<DocumentRecord> = serde_json::from_slice(&bytes)
            .map_err(|e| IndexError::corrupt(&docs_path, e.to_string()))?;
        storage::verify_sha256(
            &docs_path,
            &bytes,
            manifest.files.as_ref().map(|s| s.documents_sha256.as_str()),
        )?;
        let (slot_of, documents, dead) = check_consistency(&gen_dir, manifest, &chunks, documents)?;
        let dead_count = dead.iter().filter(|d| **d).count();

        let graph = OnceLock::new();
        let graph_points = manifest.graph_points.unwrap_or(slots).min(slots);
        if let Some(files) = &manifest.graph {
            if let Some(mut g) = load_graph(
                &gen_dir,
                files,
                &vectors[..graph_points * dim],
                dim,
                manifest.hnsw_params,
            ) {
                // Points saved after the dump go in now: in proportion to what was added.
                g.insert_normalized(&vectors[graph_points * dim..]);
                let _ = graph.set(g);
            }
        }
        let persisted = Persisted::of(&gen_dir, manifest, graph.get().is_some());
        Ok(Index {
            embedder: manifest.embedder.clone(),
            params: manifest.hnsw_params,
            chunks,
            vectors,
            dead,
            dead_count,
            slot_of,
            documents,
            next_id: manifest.next_id,
            graph,
            lexical: OnceLock::new(),
            lexical_files: manifest
                .lexical
                .clone()
                .map(|files| (gen_dir.join(storage::LEXICAL_DIR), files)),
            exact_scan_limit: default_exact_scan_limit(dim),
            origin: None,
            recovery: None,
            persisted,
        })
    }

    /// Set when [`Index::open`] found the current version damaged and opened an earlier
    /// intact one: what was damaged, and which version is in use.
    pub fn recovery(&self) -> Option<&Recovery> {
        self.recovery.as_ref()
    }

    /// Checks the index was built by `wanted` (same model, dimension, pooling and
    /// normalisation; `max_tokens` may differ since it only changes truncation of long chunks).
    pub fn check_embedder(&self, wanted: &EmbedderInfo) -> Result<(), IndexError> {
        store::check_embedder(&self.embedder, wanted)
    }

    /// The embedder that made this index's vectors.
    pub fn embedder(&self) -> &EmbedderInfo {
        &self.embedder
    }

    /// Sets how many chunks [`Index::search`] scans exactly before it switches to the HNSW
    /// graph (default: as many as fit 4M vector components, 10,922 chunks at dimension 384).
    /// 0 always uses the graph.
    pub fn set_exact_scan_limit(&mut self, max_chunks: usize) {
        self.exact_scan_limit = max_chunks;
    }

    /// The chunk count up to which [`Index::search`] scans exactly.
    pub fn exact_scan_limit(&self) -> usize {
        self.exact_scan_limit
    }

    /// The HNSW parameters used for the graph.
    pub fn hnsw_params(&self) -> HnswParams {
        self.params
    }

    /// The bookkeeping of a source document, if present (its hash lets callers skip unchanged files).
    pub fn document(&self, source: &str) -> Option<&DocumentRecord> {
        self.documents.get(source)
    }

    /// All documents, ordered by source.
    pub fn documents(&self) -> impl Iterator<Item = &DocumentRecord> {
        self.documents.values()
    }

    /// Adds or replaces all chunks of one document.
    ///
    /// `vectors[i]` is the embedding of `chunks[i]`; each must have the index's dimension and
    /// finite, not-all-zero components. On error nothing is changed. Replaced chunks get new
    /// ids; old ids are never reused.
    pub fn upsert_document(
        &mut self,
        source: &str,
        content_hash: &str,
        pages: u32,
        chunks: Vec<NewChunk>,
        vectors: Vec<Vec<f32>>,
    ) -> Result<(), IndexError> {
        if chunks.len() != vectors.len() {
            return Err(IndexError::LengthMismatch {
                source_path: source.to_string(),
                chunks: chunks.len(),
                vectors: vectors.len(),
            });
        }
        let dim = self.embedder.dim;
        let mut flat = Vec::with_capacity(vectors.len() * dim);
        for (i, v) in vectors.iter().enumerate() {
            flat.extend(normalized(v, dim, &format!("vector {i} of {source}"))?);
        }
        self.remove_document(source);
        self.load_lexical_before_change();

        let first_id = self.next_id;
        let base = self.chunks.len();
        let mut chunk_ids = Vec::with_capacity(chunks.len());
        for (i, c) in chunks.into_iter().enumerate() {
            let id = first_id + i as u64;
            chunk_ids.push(id);
            self.slot_of.insert(id, base + i);
            self.chunks.push(ChunkRecord {
                id,
                content_hash: chunk_hash(&c.text),
                text: c.text,
                source: source.to_string(),
                page: c.page,
                start: c.start,
                end: c.end,
            });
        }
        self.next_id = first_id + chunk_ids.len() as u64;
        self.vectors.extend_from_slice(&flat);
        self.dead.resize(self.chunks.len(), false);
        if let Some(graph) = self.graph.get_mut() {
            graph.insert_normalized(&flat);
        }
        if let Some(lexical) = self.lexical.get() {
            let added = self.chunks[base..].iter().map(|c| (c.id, c.text.as_str()));
            if let Err(e) = lexical.add(added) {
                tracing::warn!(error = %e.0, "lexical index out of step; rebuilding it on next use");
                self.lexical = OnceLock::new();
            }
        }
        self.documents.insert(
            source.to_string(),
            DocumentRecord {
                source: source.to_string(),
                content_hash: content_hash.to_string(),
                chunk_ids,
                pages,
                ingested_at: now_unix(),
                fields: None,
            },
        );
        Ok(())
    }

    /// Attaches the caller's data to a stored document (replacing what was there); returns
    /// whether the document exists.
    pub fn set_document_fields(&mut self, source: &str, fields: serde_json::Value) -> bool {
        match self.documents.get_mut(source) {
            Some(doc) => {
                doc.fields = Some(fields);
                true
            }
            None => false,
        }
    }

    /// Drops a document and its chunks; returns whether it was there.
    pub fn remove_document(&mut self, source: &str) -> bool {
        if !self.documents.contains_key(source) {
            return false;
        }
        self.load_lexical_before_change();
        let Some(doc) = self.documents.remove(source) else {
            return false;
        };
        if doc.chunk_ids.is_empty() {
            return true;
        }
        if let Some(lexical) = self.lexical.get() {
            if let Err(e) = lexical.remove(doc.chunk_ids.iter().copied()) {
                tracing::warn!(error = %e.0, "lexical index out of step; rebuilding it on next use");
                self.lexical = OnceLock::new();
            }
        }
        // Tombstones: the slots, vectors and graph points stay until a compaction, so this
        // costs in proportion to the document, and the graph stays usable.
        for id in doc.chunk_ids {
            if let Some(slot) = self.slot_of.remove(&id) {
                self.dead[slot] = true;
                self.dead_count += 1;
            }
        }
        true
    }

    /// Drops the removed slots for good: the arrays are renumbered, so the graph is rebuilt on
    /// next use and the next save writes everything afresh.
    fn compact(&mut self) {
        if self.dead_count == 0 {
            return;
        }
        let dim = self.embedder.dim;
        let mut write = 0;
        for read in 0..self.chunks.len() {
            if self.dead[read] {
                continue;
            }
            if write != read {
                self.chunks.swap(write, read);
                self.vectors
                    .copy_within(read * dim..(read + 1) * dim, write * dim);
            }
            write += 1;
        }
        self.chunks.truncate(write);
        self.vectors.truncate(write * dim);
        self.dead = vec![false; write];
        self.dead_count = 0;
        self.slot_of = self
            .chunks
            .iter()
            .enumerate()
            .map(|(slot, c)| (c.id, slot))
            .collect();
        // The graph's points are slot numbers, and slots have moved: rebuild on next use.
        self.graph = OnceLock::new();
        self.persisted = None;
    }

    /// Live chunks with their slots.
    fn live(&self) -> impl Iterator<Item = (usize, &ChunkRecord)> {
        self.chunks
            .iter()
            .enumerate()
            .filter(|(slot, _)| !self.dead[*slot])
    }

    /// A saved lexical index must be loaded before the chunks change, so that the change can be
    /// applied to it; once they have changed, it could only be rebuilt from all chunks.
    fn load_lexical_before_change(&mut self) {
        if self.lexical.get().is_none() && self.lexical_files.is_some() {
            if let Err(e) = self.lexical() {
                tracing::warn!(error = %e, "lexical index not loaded; it will be rebuilt from the chunks");
            }
        }
        self.lexical_files = None;
    }

    /// The HNSW graph over all current vectors, built now if stale.
    fn graph(&self) -> Result<&VectorIndex, IndexError> {
        if let Some(g) = self.graph.get() {
            return Ok(g);
        }
        let started = Instant::now();
        let built = VectorIndex::from_normalized(&self.vectors, self.embedder.dim, self.params)?;
        tracing::debug!(
            points = built.len(),
            ms = started.elapsed().as_millis() as u64,
            "built HNSW graph"
        );
        // If another thread built it concurrently, its graph is equally valid.
        Ok(self.graph.get_or_init(|| built))
    }

    /// The lexical index over all current chunks: the saved one when its files are intact,
    /// else built from the chunks now.
    fn lexical(&self) -> Result<&LexicalIndex, IndexError> {
        if let Some(l) = self.lexical.get() {
            return Ok(l);
        }
        let started = Instant::now();
        let loaded = self.lexical_files.as_ref().and_then(|(dir, files)| {
            match load_lexical(dir, files) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "saved lexical index unusable; rebuilding it from the chunks");
                    None
                }
            }
        });
        let built = match loaded {
            Some(l) => l,
            None => LexicalIndex::build(self.live().map(|(_, c)| (c.id, c.text.as_str())))
                .map_err(lexical_error)?,
        };
        tracing::debug!(
            chunks = self.len(),
            loaded = self.lexical_files.is_some(),
            ms = started.elapsed().as_millis() as u64,
            "lexical index ready"
        );
        Ok(self.lexical.get_or_init(|| built))
    }

    /// The `k` chunks that best match `query`'s words by BM25, best first (`score` and
    /// `lexical_score` are the BM25 score). The text is taken as words, never as query syntax;
    /// a chunk holding the query's exact word sequence ranks above one with the words apart.
    /// A query without any word (only punctuation) finds nothing.
    pub fn search_lexical(&self, query: &str, k: usize) -> Result<Vec<Hit<'_>>, IndexError> {
        if k == 0 || self.is_empty() {
            return Ok(Vec::new());
        }
        let found = self.lexical()?.search(query, k).map_err(lexical_error)?;
        Ok(found
            .into_iter()
            .filter_map(|(id, bm25)| {
                self.chunk(id).map(|chunk| Hit {
                    chunk,
                    score: bm25,
                    vector_score: None,
                    lexical_score: Some(bm25),
                })
            })
            .collect())
    }

    /// Vector and lexical search fused by reciprocal rank fusion ([`reciprocal_rank_fusion`],
    /// [`RRF_K`]): each side contributes its [`hybrid_candidates`] best, and the `k` best fused
    /// chunks come back with the fusion score as `score`, their cosine similarity as
    /// `vector_score` and, when lexical search found them, their BM25 score. `exact` takes the
    /// vector candidates from an exact scan (as [`Index::search_exact`]) instead of
    /// [`Index::search`]'s choice.
    pub fn search_hybrid(
        &self,
        query_text: &str,
        query_vector: &[f32],
        k: usize,
        exact: bool,
    ) -> Result<Vec<Hit<'_>>, IndexError> {
        self.search_mode(SearchMode::Hybrid, query_text, Some(query_vector), k, exact)
    }

    /// Searches in `mode`: `query_vector` (the embedded `query_text`) is needed for vector and
    /// hybrid search, ignored for lexical search. `exact` makes the vector part an exact scan
    /// (lexical search is always exact).
    pub fn search_mode(
        &self,
        mode: SearchMode,
        query_text: &str,
        query_vector: Option<&[f32]>,
        k: usize,
        exact: bool,
    ) -> Result<Vec<Hit<'_>>, IndexError> {
        self.search_filtered(&StoreQuery {
            text: query_text,
            vector: query_vector,
            k,
            mode,
            exact,
            filter: &SearchFilter::default(),
            ef_search: None,
        })
    }

    /// Searches as [`ChunkStore::search`] does: `query.mode` over the chunks `query.filter`
    /// lets through, with `query.ef_search` as the HNSW candidate list when set.
    ///
    /// With a filter, vector candidates come from an exact scan of the matching chunks (a
    /// filter usually narrows to a few documents, where a scan is both exact and fast; HNSW
    /// would have to over-fetch blindly), and lexical candidates from BM25 results fetched
    /// deeper until enough pass the filter.
    pub fn search_filtered(&self, query: &StoreQuery<'_>) -> Result<Vec<Hit<'_>>, IndexError> {
        let (k, mode, filter) = (query.k, query.mode, query.filter);
        let vector = || {
            let v = query.vector.ok_or_else(|| IndexError::DimensionMismatch {
                what: format!("the query of a {mode} search (none given)"),
                expected: self.embedder.dim,
                found: 0,
            })?;
            self.prepare_query(v)
        };
        if k == 0 || self.is_empty() {
            if mode.uses_vectors() {
                vector()?;
            }
            return Ok(Vec::new());
        }
        match mode {
            SearchMode::Vector => {
                let q = vector()?;
                self.vector_candidates(&q, k, query.exact, filter, query.ef_search)
            }
            SearchMode::Lexical => self.lexical_candidates(query.text, k, filter),
            SearchMode::Hybrid => {
                let q = vector()?;
                let depth = hybrid_candidates(k);
                let vector_hits =
                    self.vector_candidates(&q, depth, query.exact, filter, query.ef_search)?;
                let lexical_hits = self.lexical_candidates(query.text, depth, filter)?;
                Ok(self.fuse(&q, vector_hits, lexical_hits, k))
            }
        }
    }

    /// The `depth` nearest chunks that pass `filter`.
    fn vector_candidates(
        &self,
        q: &[f32],
        depth: usize,
        exact: bool,
        filter: &SearchFilter,
        ef: Option<usize>,
    ) -> Result<Vec<Hit<'_>>, IndexError> {
        if !filter.is_empty() {
            let dim = self.embedder.dim;
            let mut found: Vec<(usize, f32)> = self
                .chunks
                .iter()
                .enumerate()
                .filter(|(slot, c)| !self.dead[*slot] && filter.matches(&c.source, c.page))
                .map(|(slot, _)| (slot, dot(q, &self.vectors[slot * dim..(slot + 1) * dim])))
                .collect();
            if found.len() > depth {
                found.select_nth_unstable_by(depth, |a, b| b.1.total_cmp(&a.1));
                found.truncate(depth);
            }
            return Ok(self.hits(q, found));
        }
        if exact {
            let found = self.exact(q, depth);
            return Ok(self.hits(q, found));
        }
        match ef {
            Some(ef) if self.chunks.len() > self.exact_scan_limit => {
                let found =
                    self.graph()?
                        .search_live(q, depth, ef.max(depth), &self.dead, self.dead_count);
                Ok(self.hits(q, found))
            }
            _ => self.search_normalized(q, depth),
        }
    }

    /// The `depth` best BM25 matches that pass `filter`, fetching deeper while the filter
    /// leaves too few.
    fn lexical_candidates(
        &self,
        text: &str,
        depth: usize,
        filter: &SearchFilter,
    ) -> Result<Vec<Hit<'_>>, IndexError> {
        if filter.is_empty() {
            return self.search_lexical(text, depth);
        }
        let mut fetch = depth.saturating_mul(4).max(64);
        loop {
            let all = self.search_lexical(text, fetch)?;
            let exhausted = all.len() < fetch || fetch >= self.chunks.len();
            let passed: Vec<Hit<'_>> = all
                .into_iter()
                .filter(|h| filter.matches(&h.chunk.source, h.chunk.page))
                .take(depth)
                .collect();
            if passed.len() >= depth || exhausted {
                return Ok(passed);
            }
            fetch = fetch.saturating_mul(4);
        }
    }

    /// The hybrid result from both candidate lists ([`fuse_candidates`]): a chunk only the
    /// lexical list found gets its cosine computed here.
    fn fuse<'a>(
        &'a self,
        q: &[f32],
        vector_hits: Vec<Hit<'a>>,
        lexical_hits: Vec<Hit<'a>>,
        k: usize,
    ) -> Vec<Hit<'a>> {
        let dim = self.embedder.dim;
        fuse_candidates(vector_hits, lexical_hits, |h| h.chunk.id, k)
            .into_iter()
            .filter_map(|f| {
                let lexical_score = f.by_words.as_ref().and_then(|h| h.lexical_score);
                let hit = f.by_vector.or(f.by_words)?;
                let vector_score = hit.vector_score.or_else(|| {
                    let slot = *self.slot_of.get(&hit.chunk.id)?;
                    Some(dot(q, &self.vectors[slot * dim..(slot + 1) * dim]))
                });
                Some(Hit {
                    score: f.score,
                    vector_score,
                    lexical_score,
                    ..hit
                })
            })
            .collect()
    }

    /// [`Index::search`] for an already normalised query.
    fn search_normalized(&self, q: &[f32], k: usize) -> Result<Vec<Hit<'_>>, IndexError> {
        if k == 0 || self.is_empty() {
            return Ok(Vec::new());
        }
        if self.chunks.len() <= self.exact_scan_limit {
            let found = self.exact(q, k);
            return Ok(self.hits(q, found));
        }
        self.search_hnsw_normalized(q, k)
    }

    /// Checks and normalises a query vector.
    fn prepare_query(&self, query: &[f32]) -> Result<Vec<f32>, IndexError> {
        normalized(query, self.embedder.dim, "query")
    }

    fn hits(&self, q: &[f32], mut found: Vec<(usize, f32)>) -> Vec<Hit<'_>> {
        let dim = self.embedder.dim;
        // Scores are recomputed the same way exact search computes them, so both agree exactly.
        for (slot, score) in &mut found {
            *score = dot(q, &self.vectors[*slot * dim..(*slot + 1) * dim]);
        }
        found.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        found
            .into_iter()
            .filter_map(|(slot, score)| {
                self.chunks
                    .get(slot)
                    .filter(|_| !self.dead[slot])
                    .map(|chunk| Hit {
                        chunk,
                        score,
                        vector_score: Some(score),
                        lexical_score: None,
                    })
            })
            .collect()
    }

    /// Nearest chunks by cosine similarity: at most `k` hits, best first. A query of the
    /// wrong dimension, with non-finite values or all zeros is an error.
    ///
    /// Uses the HNSW graph (approximate) once the index holds more than
    /// [`Index::exact_scan_limit`] chunks; below that an exact scan costs at most about twice a
    /// graph query and is exact, so it is used instead.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit<'_>>, IndexError> {
        let q = self.prepare_query(query)?;
        self.search_normalized(&q, k)
    }

    /// Approximate search on the HNSW graph regardless of the index size (builds the graph
    /// first if it is stale); same contract as [`Index::search`].
    pub fn search_hnsw(&self, query: &[f32], k: usize) -> Result<Vec<Hit<'_>>, IndexError> {
        let q = self.prepare_query(query)?;
        self.search_hnsw_normalized(&q, k)
    }

    fn search_hnsw_normalized(&self, q: &[f32], k: usize) -> Result<Vec<Hit<'_>>, IndexError> {
        if k == 0 || self.is_empty() {
            return Ok(Vec::new());
        }
        let found =
            self.graph()?
                .search_live(q, k, self.params.ef_for(k), &self.dead, self.dead_count);
        Ok(self.hits(q, found))
    }

    /// Exact brute-force cosine search (for small indexes and to measure HNSW recall).
    pub fn search_exact(&self, query: &[f32], k: usize) -> Result<Vec<Hit<'_>>, IndexError> {
        let q = self.prepare_query(query)?;
        let found = self.exact(&q, k);
        Ok(self.hits(&q, found))
    }

    /// The generation this index was opened from or last saved as (`gen-000007`), if any.
    pub fn generation(&self) -> Option<&str> {
        self.origin.as_ref().map(|(_, g)| g.as_str())
    }

    /// The generation `dir`'s manifest names now: another process's save changes it. Reads only
    /// the small manifest, so a long-running reader can afford it per query.
    pub fn current_generation(dir: &Path) -> Result<String, IndexError> {
        storage::read_manifest(dir).map(|m| m.generation)
    }

    /// Writes the index to `dir` atomically (see the crate docs for the layout): a crash or
    /// kill at any moment leaves either the previous complete index or the new complete one.
    /// Creates `dir` if needed. Fails with [`IndexError::Conflict`] when another process saved
    /// to `dir` after this index was opened from it, rather than silently discarding its work.
    pub fn save(&mut self, dir: &Path) -> Result<(), IndexError> {
        fs::create_dir_all(dir).map_err(|e| IndexError::io(dir, e))?;
        let canonical = dir.canonicalize().map_err(|e| IndexError::io(dir, e))?;
        let _lock = DirLock::exclusive(dir)?;
        let current = match storage::read_manifest(dir) {
            Ok(m) => Some(m),
            Err(IndexError::NotFound { .. }) => None,
            Err(e) => {
                tracing::warn!(error = %e, "replacing an unreadable index manifest");
                None
            }
        };
        if let (Some((origin_dir, opened)), Some(cur)) = (&self.origin, &current) {
            if *origin_dir == canonical && *opened != cur.generation {
                return Err(IndexError::Conflict {
                    dir: dir.to_path_buf(),
                    opened: opened.clone(),
                    found: cur.generation.clone(),
                });
            }
        }
        let existing = storage::list_generations(dir)?;
        let newest = existing
            .iter()
            .chain(current.as_ref().map(|m| &m.generation))
            .filter_map(|g| storage::generation_number(g))
            .max()
            .unwrap_or(0);
        let generation = storage::generation_name(newest + 1);
        let gen_dir = dir.join(&generation);

        // Incremental when this index holds what the current generation holds plus changes:
        // its files are hard-linked and only the new slots, the tombstones and the document
        // list are written. Otherwise (or when removed slots pile up) compact and write all.
        let base = self.persisted.clone().filter(|p| {
            let opened_current = matches!(
                (&self.origin, &current),
                (Some((origin_dir, opened)), Some(cur))
                    if *origin_dir == canonical && *opened == cur.generation
                        && p.gen_dir.file_name().and_then(|n| n.to_str()) == Some(cur.generation.as_str())
            );
            opened_current
                && self.recovery.is_none()
                && p.slots <= self.chunks.len()
                && p.segments.len() < MAX_SEGMENTS
                && (self.dead_count as f64) <= COMPACT_DEAD_SHARE * self.chunks.len() as f64
        });
        if base.is_none() {
            self.compact();
        }
        let written = self
            .write_generation(&gen_dir, &generation, base.as_ref())
            .and_then(|w| {
                let plain = w.segments.len() == 1
                    && w.segments[0].chunks_file == storage::CHUNKS_FILE
                    && w.tombstones.is_empty()
                    && w.graph_points == self.chunks.len();
                let manifest = Manifest {
                    format: storage::FORMAT_NAME.to_string(),
                    version: if plain {
                        storage::FORMAT_VERSION_PLAIN
                    } else {
                        storage::FORMAT_VERSION
                    },
                    generation: generation.clone(),
                    embedder: self.embedder.clone(),
                    chunks: self.len(),
                    documents: self.documents.len(),
                    next_id: self.next_id,
                    saved_at: now_unix(),
                    hnsw_params: self.params,
                    graph: w.graph,
                    files: Some(w.files),
                    lexical: w.lexical,
                    graph_points: (!plain).then_some(w.graph_points),
                    segments: if plain { Vec::new() } else { w.segments },
                    tombstones: w.tombstones,
                };
                // The generation's own copy, written last: a generation directory with it is
                // complete, and can stand in if `index.json` or a later generation is damaged.
                let json =
                    serde_json::to_vec_pretty(&manifest).map_err(|e| IndexError::GraphDump {
                        path: gen_dir.join(storage::GENERATION_MANIFEST),
                        message: format!("could not serialise the manifest: {e}"),
                    })?;
                storage::write_file_synced(&gen_dir.join(storage::GENERATION_MANIFEST), &json)?;
                storage::sync_dir(&gen_dir)?;
                Ok(manifest)
            });
        let manifest = match written {
            Ok(manifest) => manifest,
            Err(e) => {
                // Not needed for correctness (the manifest still names the old generation),
                // only to not leave a large useless directory behind.
                let _ = fs::remove_dir_all(&gen_dir);
                return Err(e);
            }
        };
        storage::write_manifest(dir, &manifest)?;
        self.origin = Some((canonical, generation.clone()));
        // Everything it names was just written or linked, the graph dump from this graph.
        self.persisted = Persisted::of(&gen_dir, &manifest, true);

        // The new version is published. The one it replaces stays, as the fallback should the
        // new one be damaged later (after a recovery, the intact one this index came from, not
        // the damaged one); anything else is older or a save that never published.
        let previous = match self.recovery.take() {
            Some(r) => Some(r.generation),
            None => current.map(|m| m.generation),
        };
        let previous = previous.as_deref();
        for old in existing
            .iter()
            .filter(|g| **g != generation && Some(g.as_str()) != previous)
        {
            if let Err(e) = fs::remove_dir_all(dir.join(old)) {
                tracing::warn!(dir = %dir.join(old).display(), error = %e, "could not delete an old index generation");
            }
        }
        Ok(())
    }

    /// Writes one generation into the new directory `gen_dir` and fsyncs it: everything, or,
    /// on top of `base` (the generation this index holds plus changes), hard links to its files
    /// and a segment with the slots added since.
    fn write_generation(
        &self,
        gen_dir: &Path,
        generation: &str,
        base: Option<&Persisted>,
    ) -> Result<Written, IndexError> {
        fs::create_dir(gen_dir).map_err(|e| IndexError::io(gen_dir, e))?;
        let dim = self.embedder.dim;
        let mut segments = Vec::new();
        let first_new = match base {
            Some(b) => {
                for seg in &b.segments {
                    for name in [&seg.chunks_file, &seg.vectors_file] {
                        storage::link_or_copy(&b.gen_dir.join(name), &gen_dir.join(name))?;
                    }
                    segments.push(seg.clone());
                }
                b.slots
            }
            None => 0,
        };
        if first_new < self.chunks.len() || segments.is_empty() {
            let (chunks_file, vectors_file) = if segments.is_empty() {
                (
                    storage::CHUNKS_FILE.to_string(),
                    storage::VECTORS_FILE.to_string(),
                )
            } else {
                (
                    format!("chunks-{generation}.jsonl"),
                    format!("vectors-{generation}.f32"),
                )
            };
            let chunks_path = gen_dir.join(&chunks_file);
            let file =
                fs::File::create(&chunks_path).map_err(|e| IndexError::io(&chunks_path, e))?;
            let mut w = storage::HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
            for c in &self.chunks[first_new..] {
                serde_json::to_writer(&mut w, c)
                    .map_err(|e| IndexError::io(&chunks_path, e.into()))?;
                w.write_all(b"\n")
                    .map_err(|e| IndexError::io(&chunks_path, e))?;
            }
            let (w, chunks_sha256) = w.finish();
            w.into_inner()
                .map_err(|e| IndexError::io(&chunks_path, e.into_error()))?
                .sync_all()
                .map_err(|e| IndexError::io(&chunks_path, e))?;
            let vectors_sha256 = storage::write_vectors(
                &gen_dir.join(&vectors_file),
                &self.vectors[first_new * dim..],
                dim,
            )?;
            segments.push(storage::SegmentFiles {
                chunks_file,
                vectors_file,
                count: self.chunks.len() - first_new,
                chunks_sha256,
                vectors_sha256,
            });
        }
        let tombstones: Vec<u64> = self
            .chunks
            .iter()
            .zip(&self.dead)
            .filter(|(_, dead)| **dead)
            .map(|(c, _)| c.id)
            .collect();

        let docs_path = gen_dir.join(storage::DOCUMENTS_FILE);
        let docs: Vec<&DocumentRecord> = self.documents.values().collect();
        let json = serde_json::to_vec(&docs).map_err(|e| IndexError::io(&docs_path, e.into()))?;
        storage::write_file_synced(&docs_path, &json)?;
        // Checksums of the bytes as they were written, hashed on the way out (no second read).
        let files = FileChecksums {
            chunks_sha256: segments[0].chunks_sha256.clone(),
            documents_sha256: storage::sha256_bytes(&json),
            vectors_sha256: segments[0].vectors_sha256.clone(),
        };

        // Small indexes are searched by exact scan, so building a graph just to save it would
        // only slow ingestion down; it is built when the index outgrows the scan limit. A saved
        // dump that lacks only a few of the newest points is kept (they are inserted on open).
        let slots = self.chunks.len();
        let wanted = self.graph.get().is_some() || slots > self.exact_scan_limit;
        let reusable =
            base.and_then(|b| b.graph.as_ref().map(|g| (b, g)))
                .filter(|(_, (_, points))| {
                    let missing = slots.saturating_sub(*points) as f64;
                    self.graph.get().is_some()
                        && missing <= (GRAPH_REDUMP_SHARE * *points as f64).max(4096.0)
                });
        let (graph, graph_points) = if let Some((b, (files, points))) = reusable {
            let (graph_path, data_path) = storage::graph_paths(&b.gen_dir, &files.basename);
            let (to_graph, to_data) = storage::graph_paths(gen_dir, &files.basename);
            storage::link_or_copy(&graph_path, &to_graph)?;
            storage::link_or_copy(&data_path, &to_data)?;
            (Some(files.clone()), *points)
        } else if slots == 0 || !wanted {
            (None, slots)
        } else {
            let basename = self.graph()?.dump(gen_dir, storage::GRAPH_BASENAME)?;
            let (graph_path, data_path) = storage::graph_paths(gen_dir, &basename);
            storage::sync_file(&graph_path)?;
            storage::sync_file(&data_path)?;
            (
                Some(GraphFiles {
                    graph_sha256: storage::sha256_file(&graph_path)?,
                    data_sha256: storage::sha256_file(&data_path)?,
                    basename,
                }),
                slots,
            )
        };
        let lexical = self.write_lexical(gen_dir, base)?;
        storage::sync_dir(gen_dir)?;
        Ok(Written {
            graph,
            graph_points,
            files,
            lexical,
            segments,
            tombstones,
        })
    }

    /// Writes the lexical index into the generation. It is derived from the chunks, so when
    /// tantivy fails the generation is saved without it (and rebuilt on first use) rather than
    /// failing the save; only I/O errors writing its files fail the save.
    fn write_lexical(
        &self,
        gen_dir: &Path,
        base: Option<&Persisted>,
    ) -> Result<Option<LexicalFiles>, IndexError> {
        // Tantivy never changes a segment file once written: the ones the base generation
        // already holds under the same name are linked, not read, hashed or written again.
        let saved = base.and_then(|b| b.lexical.as_ref().map(|l| (b, l)));
        let known = |name: &str| saved.is_some_and(|(_, l)| l.sha256.contains_key(name));
        let files = match self
            .lexical()
            .and_then(|l| l.files_except(&known).map_err(lexical_error))
        {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!(error = %e, "saving the index without its lexical index; it will be rebuilt on first use");
                return Ok(None);
            }
        };
        let dir = gen_dir.join(storage::LEXICAL_DIR);
        fs::create_dir(&dir).map_err(|e| IndexError::io(&dir, e))?;
        let mut sha256 = BTreeMap::new();
        for (name, bytes) in files {
            let hash = match (bytes, saved) {
                (Some(bytes), _) => {
                    storage::write_file_synced(&dir.join(&name), &bytes)?;
                    storage::sha256_bytes(&bytes)
                }
                (None, Some((b, l))) => {
                    storage::link_or_copy(
                        &b.gen_dir.join(storage::LEXICAL_DIR).join(&name),
                        &dir.join(&name),
                    )?;
                    l.sha256[&name].clone()
                }
                (None, None) => unreachable!("only files the base holds are left unread"),
            };
            sha256.insert(name, hash);
        }
        storage::sync_dir(&dir)?;
        Ok(Some(LexicalFiles { sha256 }))
    }

    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.chunks.len() - self.dead_count
    }

    /// Whether the index holds no chunks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Exact top `k` of the live chunks: the scan skips nothing, so it asks for as many more
    /// as there are removed slots and drops those.
    fn exact(&self, q: &[f32], k: usize) -> Vec<(usize, f32)> {
        let found = vector::exact_top_k(&self.vectors, self.embedder.dim, q, k + self.dead_count);
        found
            .into_iter()
            .filter(|(slot, _)| !self.dead[*slot])
            .take(k)
            .collect()
    }

    /// Counts, embedder and parameters.
    pub fn info(&self) -> IndexInfo {
        IndexInfo {
            chunks: self.len(),
            documents: self.documents.len(),
            embedder: self.embedder.clone(),
            dim: self.embedder.dim,
            hnsw: self.params,
        }
    }

    /// Size in bytes on disk of the saved index in `dir` (manifest plus current generation).
    pub fn disk_size(dir: &Path) -> Result<u64, IndexError> {
        let manifest = storage::read_manifest(dir)?;
        Ok(storage::tree_size(&dir.join(storage::MANIFEST))?
            + storage::tree_size(&dir.join(&manifest.generation))?)
    }

    /// The chunk with this id, if it is (still) in the index.
    pub fn chunk(&self, id: u64) -> Option<&ChunkRecord> {
        self.slot_of
            .get(&id)
            .and_then(|&slot| self.chunks.get(slot))
    }

    /// The (normalised) vector of the chunk with this id, if it is in the index.
    pub fn vector(&self, id: u64) -> Option<&[f32]> {
        let dim = self.embedder.dim;
        self.slot_of
            .get(&id)
            .and_then(|&slot| self.vectors.get(slot * dim..(slot + 1) * dim))
    }

    /// All chunks, in storage order.
    pub fn chunks(&self) -> impl Iterator<Item = &ChunkRecord> {
        self.live().map(|(_, c)| c)
    }
}

/// Loads the graph dump of a generation if its checksums match; `None` means "rebuild it".
fn load_graph(
    gen_dir: &Path,
    files: &GraphFiles,
    vectors: &[f32],
    dim: usize,
    params: HnswParams,
) -> Option<VectorIndex> {
    let (graph_path, data_path) = storage::graph_paths(gen_dir, &files.basename);
    // A basename with path separators would escape the generation directory.
    if files.basename.contains(['/', '\\']) || files.basename.contains("..") {
        tracing::warn!(basename = %files.basename, "invalid graph basename in manifest; rebuilding the graph");
        return None;
    }
    if !graph_path.exists() && storage::legacy_graph_path(gen_dir, &files.basename).exists() {
        tracing::info!(dir = %gen_dir.display(), "the HNSW graph was saved by an earlier thinkrag (hnsw_rs's format); rebuilding it from the stored vectors, and the next save writes it in the current format");
        return None;
    }
    for (path, want) in [
        (&graph_path, &files.graph_sha256),
        (&data_path, &files.data_sha256),
    ] {
        match storage::sha256_file(path) {
            Ok(got) if got == *want => {}
            Ok(_) => {
                tracing::warn!(file = %path.display(), "HNSW file checksum mismatch; rebuilding the graph from the stored vectors");
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "HNSW file unreadable; rebuilding the graph from the stored vectors");
                return None;
            }
        }
    }
    VectorIndex::load_checked(gen_dir, &files.basename, vectors, dim, params)
}

fn lexical_error(e: LexicalError) -> IndexError {
    IndexError::Lexical { message: e.0 }
}

/// Reads a generation's saved lexical index, verifying every file's checksum.
fn load_lexical(dir: &Path, files: &LexicalFiles) -> Result<LexicalIndex, IndexError> {
    let mut read = Vec::with_capacity(files.sha256.len());
    for (name, want) in &files.sha256 {
        // Names come from the manifest: a path in one would escape the directory.
        if name.contains(['/', '\\']) || name.starts_with("..") || name.is_empty() {
            return Err(IndexError::corrupt(
                dir,
                format!("invalid lexical file name {name:?}"),
            ));
        }
        let path = dir.join(name);
        let bytes = storage::read_data(&path)?;
        storage::verify_sha256(&path, &bytes, Some(want))?;
        read.push((name.clone(), bytes));
    }
    LexicalIndex::from_files(read).map_err(lexical_error)
}

/// Parses `chunks.jsonl`, expecting exactly `count` records.
fn parse_chunks(path: &Path, bytes: &[u8], count: usize) -> Result<Vec<ChunkRecord>, IndexError> {
    let mut chunks = Vec::with_capacity(count.min(1 << 24));
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let line = std::str::from_utf8(line)
            .map_err(|_| IndexError::corrupt(path, format!("line {} is not UTF-8", n + 1)))?;
        let chunk: ChunkRecord = serde_json::from_str(line)
            .map_err(|e| IndexError::corrupt(path, format!("line {}: {e}", n + 1)))?;
        chunks.push(chunk);
    }
    if chunks.len() != count {
        return Err(IndexError::corrupt(
            path,
            format!(
                "{} chunk records, the manifest says {count} (truncated?)",
                chunks.len()
            ),
        ));
    }
    Ok(chunks)
}

type Checked = (
    HashMap<u64, usize>,
    BTreeMap<String, DocumentRecord>,
    Vec<bool>,
);

/// Cross-checks chunks, tombstones, documents and manifest: unique ids below `next_id`, every
/// tombstone a stored chunk, every live chunk owned by exactly the document it names, counts as
/// recorded. Returns the live chunks' slots, the documents and which slots are removed.
fn check_consistency(
    gen_dir: &Path,
    manifest: &Manifest,
    chunks: &[ChunkRecord],
    documents: Vec<DocumentRecord>,
) -> Result<Checked, IndexError> {
    let chunks_path = gen_dir.join(storage::CHUNKS_FILE);
    let docs_path = gen_dir.join(storage::DOCUMENTS_FILE);
    let manifest_path = gen_dir.join(storage::GENERATION_MANIFEST);
    let mut slot_of = HashMap::with_capacity(chunks.len());
    for (slot, c) in chunks.iter().enumerate() {
        if c.id >= manifest.next_id {
            return Err(IndexError::corrupt(
                &chunks_path,
                format!(
                    "chunk id {} is not below next_id {}",
                    c.id, manifest.next_id
                ),
            ));
        }
        if slot_of.insert(c.id, slot).is_some() {
            return Err(IndexError::corrupt(
                &chunks_path,
                format!("chunk id {} appears twice", c.id),
            ));
        }
    }
    let mut dead = vec![false; chunks.len()];
    for id in &manifest.tombstones {
        match slot_of.remove(id) {
            Some(slot) => dead[slot] = true,
            None => {
                return Err(IndexError::corrupt(
                    &manifest_path,
                    format!("removed chunk {id} is not stored, or removed twice"),
                ))
            }
        }
    }
    if slot_of.len() != manifest.chunks {
        return Err(IndexError::corrupt(
            &manifest_path,
            format!(
                "{} chunks are stored, the manifest says {}",
                slot_of.len(),
                manifest.chunks
            ),
        ));
    }
    if documents.len() != manifest.documents {
        return Err(IndexError::corrupt(
            &docs_path,
            format!(
                "{} documents, the manifest says {}",
                documents.len(),
                manifest.documents
            ),
        ));
    }
    let mut owned = 0usize;
    let mut by_source = BTreeMap::new();
    for doc in documents {
        for id in &doc.chunk_ids {
            let ok = slot_of
                .get(id)
                .is_some_and(|&slot| chunks[slot].source == doc.source);
            if !ok {
                return Err(IndexError::corrupt(
                    &docs_path,
                    format!(
                        "document {} lists chunk {id}, which is not its chunk",
                        doc.source
                    ),
                ));
            }
        }
        owned += doc.chunk_ids.len();
        if let Some(dup) = by_source.insert(doc.source.clone(), doc) {
            return Err(IndexError::corrupt(
                &docs_path,
                format!("document {} appears twice", dup.source),
            ));
        }
    }
    if owned != slot_of.len() {
        return Err(IndexError::corrupt(
            &docs_path,
            format!(
                "documents own {owned} chunks but {} are stored",
                slot_of.len()
            ),
        ));
    }
    Ok((slot_of, by_source, dead))
}
