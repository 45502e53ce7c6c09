//! thinkrag-docstore: named collections of JSON documents (a search engine's indices), each a
//! thinkrag vector index whose documents are keyed by id and carry their `_source`. Text fields
//! are chunked as `thinkrag ingest` chunks files and embedded with the store's embedder; a
//! document is searchable as soon as the write that stored it returns.
//!
//! # Durability
//!
//! A write is applied in memory and appended to the collection's write-ahead log (fsynced)
//! before it is acknowledged; the log is replayed over the last saved index generation on open,
//! and a checkpoint (a new generation, then an empty log) runs when the log grows and on
//! [`DocStore::checkpoint_all`]. A crash at any point loses nothing that was acknowledged.
//!
//! ```text
//! root/
//!   indices/{name}/collection.json   name, uuid, creation time, settings, mappings
//!   indices/{name}/index/            the thinkrag index (see thinkrag-index)
//!   indices/{name}/wal.jsonl         changes since the index was last saved
//! ```

pub mod error;
pub mod fsutil;
mod wal;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thinkrag_embed::Embedder;
use thinkrag_index::{EmbedderInfo, Index, NewChunk};
pub use thinkrag_index::{SearchMode, RRF_K};
use thinkrag_ingest::{Chunker, DocumentKind, Page};

pub use error::{DocStoreError, Result};
use wal::{LoggedChunk, Record, Wal};

/// Log records after which a write also checkpoints.
const CHECKPOINT_RECORDS: usize = 4096;
/// Log bytes after which a write also checkpoints.
const CHECKPOINT_BYTES: u64 = 256 << 20;
/// Chunks embedded per embedder call.
const EMBED_BATCH: usize = 64;

/// What a collection was created with.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CollectionMeta {
    /// Its name.
    pub name: String,
    /// A random id (OpenSearch's index uuid).
    pub uuid: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Settings as given (e.g. `index.search.default_pipeline`).
    pub settings: Value,
    /// Mappings as given: `properties.{field}.type` says which fields are text.
    pub mappings: Value,
}

impl CollectionMeta {
    /// A setting by its dotted name, found flat (`"index.x": v`) or nested (`index: {x: v}`),
    /// with or without the `index.` prefix, as OpenSearch accepts settings.
    pub fn setting(&self, dotted: &str) -> Option<&Value> {
        let short = dotted.strip_prefix("index.").unwrap_or(dotted);
        let root = &self.settings;
        [dotted, short]
            .into_iter()
            .find_map(|name| lookup(root, name))
            .or_else(|| root.get("index").and_then(|i| lookup(i, short)))
    }

    /// The text fields whose content is embedded: those the mapping types `text` (or
    /// `match_only_text`); with none declared, every top-level string field of a document.
    pub fn text_fields(&self) -> Option<Vec<String>> {
        let props = self.mappings.get("properties")?.as_object()?;
        let fields: Vec<String> = props
            .iter()
            .filter(|(_, v)| {
                matches!(
                    v.get("type").and_then(Value::as_str),
                    Some("text" | "match_only_text")
                )
            })
            .map(|(k, _)| k.clone())
            .collect();
        (!fields.is_empty()).then_some(fields)
    }

    /// The declared vector fields (`type: knn_vector`) with their dimension and space type.
    pub fn vector_fields(&self) -> Vec<VectorField> {
        let Some(props) = self.mappings.get("properties").and_then(Value::as_object) else {
            return Vec::new();
        };
        props
            .iter()
            .filter(|(_, v)| v.get("type").and_then(Value::as_str) == Some("knn_vector"))
            .map(|(k, v)| VectorField {
                name: k.clone(),
                dimension: v.get("dimension").and_then(Value::as_u64),
                space_type: v
                    .pointer("/method/space_type")
                    .or_else(|| v.get("space_type"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
            })
            .collect()
    }
}

/// Finds `name` either as a flat key or as a nested path.
fn lookup<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    if let Some(found) = v.get(name) {
        return Some(found);
    }
    let (head, rest) = name.split_once('.')?;
    lookup(v.get(head)?, rest)
}

/// A `knn_vector` field of a mapping.
#[derive(Clone, Debug, PartialEq)]
pub struct VectorField {
    /// Its name.
    pub name: String,
    /// Its declared dimension.
    pub dimension: Option<u64>,
    /// Its declared space type (`l2`, `cosinesimil`, `innerproduct`).
    pub space_type: Option<String>,
}

/// A stored document.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredDoc {
    /// Its id.
    pub id: String,
    /// Its fields as given.
    pub source: Value,
    /// How many times it was written (1 when created).
    pub version: u64,
    /// The collection's sequence number of its last write.
    pub seq_no: u64,
    /// How many chunks of it are searchable.
    pub chunks: usize,
}

/// A document found by a vector search: its best chunk's score.
#[derive(Clone, Debug, PartialEq)]
pub struct DocHit {
    /// The document.
    pub doc: StoredDoc,
    /// The score of its best chunk, by which documents are ranked: cosine similarity (vector
    /// search), BM25 (lexical) or the reciprocal-rank-fusion score (hybrid).
    pub score: f32,
    /// That chunk's cosine similarity to the query, when the query has a vector.
    pub cosine: Option<f32>,
    /// That chunk's BM25 score, when lexical search found it.
    pub bm25: Option<f32>,
    /// That chunk's text.
    pub chunk_text: String,
}

/// The vector half of a hybrid search: a text to embed, or a vector.
#[derive(Clone, Copy, Debug)]
pub enum HybridVector<'a> {
    /// Embedded with the store's embedder.
    Text(&'a str),
    /// Already a query vector of the store's dimension.
    Vector(&'a [f32]),
}

/// One change of a bulk write.
#[derive(Clone, Debug, PartialEq)]
pub enum DocOp {
    /// Store the document, replacing any with the same id (a new id when none is given).
    Index {
        /// Its id.
        id: Option<String>,
        /// Its fields.
        source: Value,
    },
    /// Store the document only if no document has this id.
    Create {
        /// Its id.
        id: Option<String>,
        /// Its fields.
        source: Value,
    },
    /// Merge fields into a stored document (or store `upsert` / the doc itself when missing and
    /// asked to).
    Update {
        /// Its id.
        id: String,
        /// Fields to merge in.
        doc: Value,
        /// Store `doc` as the document when there is none.
        doc_as_upsert: bool,
        /// The document to store when there is none.
        upsert: Option<Value>,
    },
    /// Remove the document.
    Delete {
        /// Its id.
        id: String,
    },
}

/// The outcome of one [`DocOp`], as a bulk response item needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct OpOutcome {
    /// The document's id.
    pub id: String,
    /// HTTP-style status: 200, 201, 404, 409, 400.
    pub status: u16,
    /// `created`, `updated`, `deleted`, `not_found` or `noop`; empty on error.
    pub result: &'static str,
    /// The document's version after the change.
    pub version: u64,
    /// The collection's sequence number of the change.
    pub seq_no: u64,
    /// On failure: an error type and reason.
    pub error: Option<(&'static str, String)>,
}

/// The mutable part of a collection.
struct State {
    index: Index,
    wal: Wal,
    next_seq: u64,
}

/// One collection of documents.
pub struct Collection {
    meta: CollectionMeta,
    dir: PathBuf,
    state: RwLock<State>,
    /// Serialises writers (readers go on): an update reads, embeds, then applies.
    writer: Mutex<()>,
}

impl std::fmt::Debug for Collection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collection")
            .field("name", &self.meta.name)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A random id of 20 URL-safe characters, as OpenSearch makes them.
pub fn random_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    (0..20)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn stored(id: &str, fields: &Value, chunks: usize) -> StoredDoc {
    StoredDoc {
        id: id.to_string(),
        source: fields.get("_source").cloned().unwrap_or(Value::Null),
        version: fields.get("_version").and_then(Value::as_u64).unwrap_or(1),
        seq_no: fields.get("_seq_no").and_then(Value::as_u64).unwrap_or(0),
        chunks,
    }
}

impl Collection {
    /// What it was created with.
    pub fn meta(&self) -> &CollectionMeta {
        &self.meta
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.meta.name
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.read().index.documents().count()
    }

    /// Whether it holds no documents.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of searchable chunks.
    pub fn chunk_count(&self) -> usize {
        self.read().index.len()
    }

    /// Bytes its files take on disk.
    pub fn disk_bytes(&self) -> u64 {
        fn size(p: &Path) -> u64 {
            match fs::metadata(p) {
                Ok(m) if m.is_dir() => fs::read_dir(p)
                    .map(|rd| rd.flatten().map(|e| size(&e.path())).sum())
                    .unwrap_or(0),
                Ok(m) => m.len(),
                Err(_) => 0,
            }
        }
        size(&self.dir)
    }

    /// A document by id.
    pub fn get(&self, id: &str) -> Option<StoredDoc> {
        let st = self.read();
        let d = st.index.document(id)?;
        Some(stored(id, d.fields.as_ref()?, d.chunk_ids.len()))
    }

    /// Documents in id order, `from` on, at most `size` (a match-all query), and the total.
    pub fn scan(&self, from: usize, size: usize) -> (usize, Vec<StoredDoc>) {
        let st = self.read();
        let total = st.index.documents().count();
        let docs = st
            .index
            .documents()
            .skip(from)
            .take(size)
            .filter_map(|d| Some(stored(&d.source, d.fields.as_ref()?, d.chunk_ids.len())))
            .collect();
        (total, docs)
    }

    /// The `k` documents whose best chunk is nearest `query` (cosine), best first.
    pub fn search_vector(&self, query: &[f32], k: usize) -> Result<Vec<DocHit>> {
        self.search(SearchMode::Vector, "", Some(query), k)
    }

    /// The `k` documents whose best chunk ranks first in `mode`, best first: `text` is what
    /// lexical search matches (BM25 over the document's text fields), `vector` the query's
    /// embedding (needed by vector and hybrid search).
    pub fn search(
        &self,
        mode: SearchMode,
        text: &str,
        vector: Option<&[f32]>,
        k: usize,
    ) -> Result<Vec<DocHit>> {
        let st = self.read();
        let chunks = st.index.len();
        if k == 0 || chunks == 0 {
            return Ok(Vec::new());
        }
        // Several chunks may belong to one document: ask for more chunks until k documents are
        // found or every chunk was looked at.
        let mut want = (k * 3).max(k + 8).min(chunks);
        loop {
            let hits = st.index.search_mode(mode, text, vector, want, false)?;
            let mut seen: HashMap<&str, usize> = HashMap::new();
            let mut out: Vec<DocHit> = Vec::new();
            for h in &hits {
                if seen.contains_key(h.chunk.source.as_str()) {
                    continue;
                }
                let Some(d) = st.index.document(&h.chunk.source) else {
                    continue;
                };
                let Some(fields) = d.fields.as_ref() else {
                    continue;
                };
                seen.insert(&h.chunk.source, out.len());
                out.push(DocHit {
                    doc: stored(&h.chunk.source, fields, d.chunk_ids.len()),
                    score: h.score,
                    cosine: h.vector_score,
                    bm25: h.lexical_score,
                    chunk_text: h.chunk.text.clone(),
                });
                if out.len() == k {
                    break;
                }
            }
            if out.len() >= k || want >= chunks {
                return Ok(out);
            }
            want = (want * 2).min(chunks);
        }
    }

    /// The text of a document that is embedded: its text fields, joined by blank lines.
    fn text_of(&self, source: &Value) -> String {
        let Some(obj) = source.as_object() else {
            return String::new();
        };
        let mut parts: Vec<&str> = Vec::new();
        match self.meta.text_fields() {
            Some(fields) => {
                for f in &fields {
                    if let Some(Value::String(s)) = obj.get(f) {
                        parts.push(s);
                    }
                }
            }
            None => {
                for v in obj.values() {
                    if let Value::String(s) = v {
                        parts.push(s);
                    }
                }
            }
        }
        parts
            .into_iter()
            .filter(|s| !s.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n\n")
    }

    /// Saves the index as a new generation and empties the log.
    fn checkpoint_locked(&self, st: &mut State) -> Result<()> {
        let dir = self.dir.join("index");
        st.index.save(&dir)?;
        st.wal = Wal::create(&self.dir.join("wal.jsonl"))?;
        Ok(())
    }

    /// Saves a generation now if the log holds anything.
    pub fn checkpoint(&self) -> Result<()> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if st.wal.records == 0 {
            return Ok(());
        }
        self.checkpoint_locked(&mut st)
    }
}

/// A resolved write, ready to apply: the document's new state or its removal.
enum Planned {
    Put {
        id: String,
        source: Value,
        text: String,
        result: &'static str,
        status: u16,
    },
    Delete {
        id: String,
    },
    Failed(OpOutcome),
}

/// Named collections under one directory, all embedded with one embedder.
pub struct DocStore {
    root: PathBuf,
    embedder: Arc<Embedder>,
    info: EmbedderInfo,
    chunker: Chunker,
    collections: RwLock<BTreeMap<String, Arc<Collection>>>,
    /// Collections that could not be opened, with why (kept out of the way, never deleted).
    broken: RwLock<BTreeMap<String, String>>,
}

impl std::fmt::Debug for DocStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocStore")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

/// Checks a collection name against OpenSearch's index-name rules (which also keep it a safe
/// directory name).
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(DocStoreError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > 255 {
        return bad("must be at most 255 bytes");
    }
    if name == "." || name == ".." {
        return bad("must not be . or ..");
    }
    if name.starts_with(['_', '-', '+']) {
        return bad("must not start with _, - or +");
    }
    if name.chars().any(|c| c.is_uppercase()) {
        return bad("must be lowercase");
    }
    if let Some(c) = name.chars().find(|c| {
        matches!(
            c,
            '\\' | '/' | '*' | '?' | '"' | '<' | '>' | '|' | ' ' | ',' | '#' | ':'
        ) || c.is_control()
    }) {
        return bad(&format!(
            "must not contain {c:?} (nor \\ / * ? \" < > | space , # :)"
        ));
    }
    Ok(())
}

impl DocStore {
    /// Opens (or creates) the store in `root`, replaying each collection's log. A collection
    /// that cannot be opened is reported by [`DocStore::broken`] and left on disk as it is.
    pub fn open(root: &Path, embedder: Arc<Embedder>) -> Result<Self> {
        let info = thinkrag::embedder_info(embedder.spec());
        let chunker = thinkrag::chunker(&embedder, thinkrag::Chunking::default())?;
        let indices = root.join("indices");
        fs::create_dir_all(&indices)
            .map_err(|e| DocStoreError::io("cannot create", &indices, e))?;
        let store = Self {
            root: root.to_path_buf(),
            embedder,
            info,
            chunker,
            collections: RwLock::new(BTreeMap::new()),
            broken: RwLock::new(BTreeMap::new()),
        };
        let entries =
            fs::read_dir(&indices).map_err(|e| DocStoreError::io("cannot read", &indices, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with('.') {
                // A creation or deletion a crash interrupted: never acknowledged, or already gone.
                let _ = fs::remove_dir_all(&path);
                continue;
            }
            match store.open_collection(&path) {
                Ok(c) => {
                    store.write_map().insert(c.meta.name.clone(), Arc::new(c));
                }
                Err(e) => {
                    tracing::error!(collection = %name, error = %e, "cannot open collection");
                    store
                        .broken
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(name, e.to_string());
                }
            }
        }
        Ok(store)
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Collection>>> {
        self.collections.write().unwrap_or_else(|e| e.into_inner())
    }

    fn open_collection(&self, dir: &Path) -> Result<Collection> {
        let meta_path = dir.join("collection.json");
        let meta: CollectionMeta =
            fsutil::read_json(&meta_path)?.ok_or_else(|| DocStoreError::CorruptMeta {
                path: meta_path.clone(),
                reason: "missing".into(),
            })?;
        let mut index = Index::open(&dir.join("index"))?;
        index.check_embedder(&self.info)?;
        let wal_path = dir.join("wal.jsonl");
        let records = Wal::read(&wal_path)?;
        let replayed = records.len();
        for r in records {
            apply(&mut index, r)?;
        }
        if replayed > 0 {
            // Fold the replayed changes into a generation so the log can start empty.
            tracing::info!(collection = %meta.name, records = replayed, "replayed the write-ahead log");
            index.save(&dir.join("index"))?;
        }
        let next_seq = index
            .documents()
            .filter_map(|d| d.fields.as_ref()?.get("_seq_no")?.as_u64())
            .max()
            .map_or(0, |s| s + 1);
        let collection = Collection {
            meta,
            dir: dir.to_path_buf(),
            state: RwLock::new(State {
                index,
                wal: Wal::create(&wal_path)?,
                next_seq,
            }),
            writer: Mutex::new(()),
        };
        Ok(collection)
    }

    /// The embedder.
    pub fn embedder(&self) -> &Arc<Embedder> {
        &self.embedder
    }

    /// The embedder's name and dimension as stored in each collection.
    pub fn embedder_info(&self) -> &EmbedderInfo {
        &self.info
    }

    /// A collection by name.
    pub fn get(&self, name: &str) -> Option<Arc<Collection>> {
        self.collections
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Why a collection that exists on disk could not be opened.
    pub fn broken(&self, name: &str) -> Option<String> {
        self.broken
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// All collections, by name.
    pub fn list(&self) -> Vec<Arc<Collection>> {
        self.collections
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Creates a collection. Its declared `knn_vector` fields must have the embedder's dimension.
    pub fn create(&self, name: &str, settings: Value, mappings: Value) -> Result<Arc<Collection>> {
        validate_name(name)?;
        let meta = CollectionMeta {
            name: name.to_string(),
            uuid: random_id(),
            created_ms: now_ms(),
            settings,
            mappings,
        };
        for field in meta.vector_fields() {
            if let Some(d) = field.dimension {
                if d != self.info.dim as u64 {
                    return Err(DocStoreError::DimensionMismatch {
                        name: name.to_string(),
                        field: field.name,
                        declared: d,
                        embedder: self.info.model.clone(),
                        dim: self.info.dim,
                    });
                }
            }
        }
        let mut map = self.write_map();
        if map.contains_key(name) || self.broken(name).is_some() {
            return Err(DocStoreError::AlreadyExists {
                name: name.to_string(),
            });
        }
        let indices = self.root.join("indices");
        // Built under a hidden name and renamed into place: a crash leaves no half collection.
        let tmp = indices.join(format!(".new-{}", random_id()));
        let dir = indices.join(name);
        let build = || -> Result<()> {
            fs::create_dir_all(&tmp).map_err(|e| DocStoreError::io("cannot create", &tmp, e))?;
            fsutil::write_json(&tmp.join("collection.json"), &meta)?;
            Index::new(self.info.clone()).save(&tmp.join("index"))?;
            fs::rename(&tmp, &dir).map_err(|e| DocStoreError::io("cannot create", &dir, e))?;
            fsutil::sync_dir(&indices).map_err(|e| DocStoreError::io("cannot sync", &indices, e))
        };
        if let Err(e) = build() {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let collection = Arc::new(Collection {
            state: RwLock::new(State {
                index: Index::open(&dir.join("index"))?,
                wal: Wal::create(&dir.join("wal.jsonl"))?,
                next_seq: 0,
            }),
            meta,
            dir,
            writer: Mutex::new(()),
        });
        map.insert(name.to_string(), Arc::clone(&collection));
        Ok(collection)
    }

    /// The collection, created with default settings if it does not exist (as a bulk write to
    /// a new index creates it).
    pub fn get_or_create(&self, name: &str) -> Result<Arc<Collection>> {
        if let Some(c) = self.get(name) {
            return Ok(c);
        }
        match self.create(name, json!({}), json!({})) {
            Err(DocStoreError::AlreadyExists { .. }) => {
                self.get(name).ok_or_else(|| DocStoreError::NotFound {
                    name: name.to_string(),
                })
            }
            other => other,
        }
    }

    /// Deletes a collection and its files; returns whether it existed.
    pub fn delete(&self, name: &str) -> Result<bool> {
        let Some(collection) = self.write_map().remove(name) else {
            return Ok(false);
        };
        let _w = collection.writer.lock().unwrap_or_else(|e| e.into_inner());
        let gone = self
            .root
            .join("indices")
            .join(format!(".deleted-{}", random_id()));
        fs::rename(&collection.dir, &gone)
            .map_err(|e| DocStoreError::io("cannot delete", &collection.dir, e))?;
        let _ = fs::remove_dir_all(&gone);
        Ok(true)
    }

    /// Saves every collection whose log holds changes (on shutdown).
    pub fn checkpoint_all(&self) -> Result<()> {
        for c in self.list() {
            c.checkpoint()?;
        }
        Ok(())
    }

    /// Applies `ops` in order to `collection`: each is planned (an update merges into the
    /// stored document), the new documents' text is chunked and embedded, then all are applied
    /// and logged in one fsync. A failed op fails alone. Errors only when the embedder or the
    /// log fails, and then nothing of this call was applied.
    pub fn bulk(&self, collection: &Collection, ops: Vec<DocOp>) -> Result<Vec<OpOutcome>> {
        let _w = collection.writer.lock().unwrap_or_else(|e| e.into_inner());
        // Plan against the stored state plus the earlier ops of this batch.
        let mut pending: HashMap<String, Option<Value>> = HashMap::new();
        let mut plans = Vec::with_capacity(ops.len());
        {
            let st = collection.read();
            let current = |id: &str, pending: &HashMap<String, Option<Value>>| -> Option<Value> {
                match pending.get(id) {
                    Some(v) => v.clone(),
                    None => st
                        .index
                        .document(id)
                        .and_then(|d| d.fields.as_ref()?.get("_source").cloned()),
                }
            };
            for op in ops {
                let plan = match op {
                    DocOp::Index { id, source } | DocOp::Create { id, source }
                        if !source.is_object() =>
                    {
                        let id = id.unwrap_or_default();
                        Planned::Failed(failed(
                            &id,
                            400,
                            "mapper_parsing_exception",
                            "the document must be a JSON object".into(),
                        ))
                    }
                    DocOp::Index { id, source } => {
                        let id = id.unwrap_or_else(random_id);
                        let existed = current(&id, &pending).is_some();
                        put(&id, source, existed, collection)
                    }
                    DocOp::Create { id, source } => {
                        let id = id.unwrap_or_else(random_id);
                        if current(&id, &pending).is_some() {
                            Planned::Failed(failed(
                                &id,
                                409,
                                "version_conflict_engine_exception",
                                format!("[{id}]: version conflict, document already exists"),
                            ))
                        } else {
                            put(&id, source, false, collection)
                        }
                    }
                    DocOp::Update {
                        id,
                        doc,
                        doc_as_upsert,
                        upsert,
                    } => match (current(&id, &pending), doc.is_object()) {
                        (_, false) => Planned::Failed(failed(
                            &id,
                            400,
                            "action_request_validation_exception",
                            "update needs a `doc` object".into(),
                        )),
                        (Some(mut cur), true) => {
                            merge(&mut cur, &doc);
                            put(&id, cur, true, collection)
                        }
                        (None, true) if doc_as_upsert => put(&id, doc, false, collection),
                        (None, true) => match upsert {
                            Some(u) if u.is_object() => put(&id, u, false, collection),
                            _ => Planned::Failed(failed(
                                &id,
                                404,
                                "document_missing_exception",
                                format!("[{id}]: document missing"),
                            )),
                        },
                    },
                    DocOp::Delete { id } => {
                        if current(&id, &pending).is_some() {
                            Planned::Delete { id }
                        } else {
                            let mut o = failed(&id, 404, "", String::new());
                            o.result = "not_found";
                            o.error = None;
                            Planned::Failed(o)
                        }
                    }
                };
                match &plan {
                    Planned::Put { id, source, .. } => {
                        pending.insert(id.clone(), Some(source.clone()));
                    }
                    Planned::Delete { id } => {
                        pending.insert(id.clone(), None);
                    }
                    Planned::Failed(_) => {}
                }
                plans.push(plan);
            }
        }

        // Chunk and embed every new document's text, outside the state lock.
        let mut chunked: Vec<Vec<thinkrag_ingest::Chunk>> = Vec::with_capacity(plans.len());
        for plan in &plans {
            chunked.push(match plan {
                Planned::Put { text, .. } if !text.trim().is_empty() => self.chunker.chunk_page(
                    &Page {
                        number: None,
                        text: text.clone(),
                    },
                    DocumentKind::Text,
                ),
                _ => Vec::new(),
            });
        }
        let texts: Vec<&str> = chunked.iter().flatten().map(|c| c.text.as_str()).collect();
        let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(texts.len());
        for batch in texts.chunks(EMBED_BATCH) {
            vectors.extend(self.embedder.embed_passages(batch)?.vectors);
        }

        // Apply and log.
        let mut st = collection.state.write().unwrap_or_else(|e| e.into_inner());
        let mut records = Vec::new();
        let mut outcomes = Vec::with_capacity(plans.len());
        let mut vectors = vectors.into_iter();
        for (plan, chunks) in plans.into_iter().zip(chunked) {
            match plan {
                Planned::Failed(o) => outcomes.push(o),
                Planned::Delete { id } => {
                    let prev = st.index.document(&id).and_then(|d| d.fields.clone());
                    let version = prev
                        .as_ref()
                        .and_then(|f| f.get("_version")?.as_u64())
                        .unwrap_or(1)
                        + 1;
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    let record = Record::Delete { id: id.clone() };
                    apply(&mut st.index, record.clone())?;
                    records.push(record);
                    outcomes.push(OpOutcome {
                        id,
                        status: 200,
                        result: "deleted",
                        version,
                        seq_no: seq,
                        error: None,
                    });
                }
                Planned::Put {
                    id,
                    source,
                    result,
                    status,
                    ..
                } => {
                    let version = st
                        .index
                        .document(&id)
                        .and_then(|d| d.fields.as_ref()?.get("_version")?.as_u64())
                        .map_or(1, |v| v + 1);
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    let doc_vectors: Vec<Vec<f32>> = vectors.by_ref().take(chunks.len()).collect();
                    let hash = sha_of(&source);
                    let record = Record::Put {
                        id: id.clone(),
                        fields: json!({"_source": source, "_version": version, "_seq_no": seq}),
                        hash,
                        chunks: chunks
                            .into_iter()
                            .map(|c| LoggedChunk {
                                text: c.text,
                                start: c.start,
                                end: c.end,
                            })
                            .collect(),
                        vectors: doc_vectors,
                    };
                    match apply(&mut st.index, record.clone()) {
                        Ok(()) => {
                            records.push(record);
                            outcomes.push(OpOutcome {
                                id,
                                status,
                                result,
                                version,
                                seq_no: seq,
                                error: None,
                            });
                        }
                        // A vector the index refuses (all zeros from an empty text): that
                        // document fails, the rest go on.
                        Err(e) => outcomes.push(failed(
                            &id,
                            400,
                            "mapper_parsing_exception",
                            e.to_string(),
                        )),
                    }
                }
            }
        }
        if let Err(e) = st.wal.append(&records) {
            // Not durable, so not acknowledged: take the batch back out of memory by reopening
            // from disk (the saved generation plus the log as it was).
            drop(st);
            if let Ok(reopened) = self.open_collection(&collection.dir) {
                let fresh = reopened
                    .state
                    .into_inner()
                    .unwrap_or_else(|e| e.into_inner());
                *collection.state.write().unwrap_or_else(|e| e.into_inner()) = fresh;
            }
            return Err(e);
        }
        if st.wal.records >= CHECKPOINT_RECORDS || st.wal.bytes >= CHECKPOINT_BYTES {
            if let Err(e) = collection.checkpoint_locked(&mut st) {
                // The log still holds everything: a failed checkpoint loses nothing.
                tracing::warn!(collection = %collection.meta.name, error = %e, "checkpoint failed");
            }
        }
        Ok(outcomes)
    }

    /// The `k` documents of `collection` nearest to a query text.
    pub fn search_text(
        &self,
        collection: &Collection,
        query: &str,
        k: usize,
    ) -> Result<Vec<DocHit>> {
        self.search_mode(collection, SearchMode::Vector, query, k)
    }

    /// The `k` documents of `collection` that best match a query text in `mode` (the text is
    /// embedded only when the mode uses vectors).
    pub fn search_mode(
        &self,
        collection: &Collection,
        mode: SearchMode,
        query: &str,
        k: usize,
    ) -> Result<Vec<DocHit>> {
        let vector = if mode.uses_vectors() {
            Some(self.embedder.embed_query(query)?)
        } else {
            None
        };
        collection.search(mode, query, vector.as_deref(), k)
    }

    /// Hybrid search whose two halves have their own queries, as OpenSearch's `hybrid` query
    /// allows: BM25 over `lexical_text`, vectors nearest `vector` (or the embedding of
    /// `vector_text`), fused by reciprocal rank.
    pub fn search_hybrid(
        &self,
        collection: &Collection,
        lexical_text: &str,
        vector: HybridVector<'_>,
        k: usize,
    ) -> Result<Vec<DocHit>> {
        let embedded;
        let v = match vector {
            HybridVector::Text(t) => {
                embedded = self.embedder.embed_query(t)?;
                embedded.as_slice()
            }
            HybridVector::Vector(v) => v,
        };
        collection.search(SearchMode::Hybrid, lexical_text, Some(v), k)
    }
}

fn failed(id: &str, status: u16, ty: &'static str, reason: String) -> OpOutcome {
    OpOutcome {
        id: id.to_string(),
        status,
        result: "",
        version: 0,
        seq_no: 0,
        error: Some((ty, reason)),
    }
}

fn put(id: &str, source: Value, existed: bool, collection: &Collection) -> Planned {
    let text = collection.text_of(&source);
    Planned::Put {
        id: id.to_string(),
        source,
        text,
        result: if existed { "updated" } else { "created" },
        status: if existed { 200 } else { 201 },
    }
}

/// Merges `patch` into `target` as OpenSearch's partial update does: objects recursively, other
/// values replaced.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn sha_of(v: &Value) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Applies one log record to the index.
fn apply(index: &mut Index, record: Record) -> Result<()> {
    match record {
        Record::Delete { id } => {
            index.remove_document(&id);
        }
        Record::Put {
            id,
            fields,
            hash,
            chunks,
            vectors,
        } => {
            let chunks = chunks
                .into_iter()
                .map(|c| NewChunk {
                    text: c.text,
                    page: None,
                    start: c.start,
                    end: c.end,
                })
                .collect();
            index.upsert_document(&id, &hash, 1, chunks, vectors)?;
            index.set_document_fields(&id, fields);
        }
    }
    Ok(())
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<DocStore>();
    is::<Collection>();
}
