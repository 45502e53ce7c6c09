//! Where the chunks live: an index directory (the in-process store) or a PostgreSQL database
//! shared by many thinkrag processes (`postgres://...`). Everything above this module (ingest,
//! search, ask, chat, the server) works on a [`ChunkStore`] and behaves the same on both.

use std::path::{Path, PathBuf};

use thinkrag_index::{ChunkStore, DirStore, EmbedderInfo, StoreError};
use thinkrag_pgstore::{is_postgres_url, PgOptions, PgStore};

use crate::error::{Error, Result};

/// A store's location, as given on a command line (`--store DIR` or `--store postgres://...`).
#[derive(Clone, Debug)]
pub enum StoreLocation {
    /// An index directory.
    Dir(PathBuf),
    /// A PostgreSQL database (libpq's URL form; `?schema=NAME` picks thinkrag's schema).
    Postgres {
        /// The URL.
        url: String,
        /// Password and TLS settings taken from the environment (`PGPASSWORD`, `PGSSLMODE`,
        /// `PGSSLROOTCERT`) by the caller; the URL's own win.
        options: PgOptions,
    },
}

impl StoreLocation {
    /// A `postgres://`/`postgresql://` URL is a database, anything else a directory.
    pub fn parse(s: &str, options: PgOptions) -> Self {
        if is_postgres_url(s) {
            StoreLocation::Postgres {
                url: s.to_string(),
                options,
            }
        } else {
            StoreLocation::Dir(PathBuf::from(s))
        }
    }

    /// The location for messages (a URL without its password).
    pub fn display(&self) -> String {
        match self {
            StoreLocation::Dir(d) => d.display().to_string(),
            StoreLocation::Postgres { url, .. } => thinkrag_pgstore::redact(url),
        }
    }

    /// The directory, for a directory store.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            StoreLocation::Dir(d) => Some(d),
            StoreLocation::Postgres { .. } => None,
        }
    }

    /// Opens the store to read: [`Error::NoIndex`] when nothing was ingested there.
    pub fn open(&self) -> Result<Box<dyn ChunkStore>> {
        let opened: std::result::Result<Box<dyn ChunkStore>, StoreError> = match self {
            StoreLocation::Dir(dir) => DirStore::open(dir)
                .map(|s| Box::new(s) as Box<dyn ChunkStore>)
                .map_err(StoreError::from),
            StoreLocation::Postgres { url, options } => PgStore::open(url, options)
                .map(|s| Box::new(s) as Box<dyn ChunkStore>)
                .map_err(StoreError::from),
        };
        match opened {
            Ok(store) => Ok(store),
            Err(e) if e.is_not_found() => Err(Error::NoIndex {
                location: self.display(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Opens the store to search: [`Error::NoIndex`] when nothing was ingested there,
    /// [`Error::EmptyIndex`] when it holds no chunks.
    pub fn open_nonempty(&self) -> Result<Box<dyn ChunkStore>> {
        let store = self.open()?;
        if store.stats()?.chunks == 0 {
            return Err(Error::EmptyIndex {
                location: store.location(),
            });
        }
        Ok(store)
    }

    /// Opens the store to write, creating it for `embedder` when there is none; an existing
    /// store must have been built by `embedder`.
    pub fn open_or_create(&self, embedder: &EmbedderInfo) -> Result<Box<dyn ChunkStore>> {
        Ok(match self {
            StoreLocation::Dir(dir) => Box::new(DirStore::open_or_create(dir, embedder)?),
            StoreLocation::Postgres { url, options } => {
                Box::new(PgStore::open_or_create(url, options, embedder)?)
            }
        })
    }
}

impl From<&Path> for StoreLocation {
    fn from(dir: &Path) -> Self {
        StoreLocation::Dir(dir.to_path_buf())
    }
}

impl From<PathBuf> for StoreLocation {
    fn from(dir: PathBuf) -> Self {
        StoreLocation::Dir(dir)
    }
}

impl From<&PathBuf> for StoreLocation {
    fn from(dir: &PathBuf) -> Self {
        StoreLocation::Dir(dir.clone())
    }
}

/// What [`copy`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CopyReport {
    /// Where from.
    pub from: String,
    /// Where to.
    pub to: String,
    /// Documents written (new or changed).
    pub documents_copied: usize,
    /// Documents the target already held with the same content hash.
    pub documents_unchanged: usize,
    /// Chunks written.
    pub chunks_copied: usize,
    /// Documents in the target afterwards.
    pub total_documents: usize,
    /// Chunks in the target afterwards.
    pub total_chunks: usize,
}

/// Copies every document of `from` into the store at `to` (created with `from`'s embedder if
/// needed; an existing one must have the same embedder) with its chunks and vectors, without
/// embedding anything again: how a team moves an index directory into a shared PostgreSQL, or
/// keeps an offline copy of one. Documents the target holds with the same hash are skipped, so a
/// copy can be re-run after an interruption. `on_document` is told each source copied.
pub fn copy(
    from: &dyn ChunkStore,
    to: &StoreLocation,
    on_document: &mut dyn FnMut(&str),
) -> Result<CopyReport> {
    let mut target = to.open_or_create(from.embedder())?;
    let have: std::collections::HashMap<String, String> = target
        .documents()?
        .into_iter()
        .map(|d| (d.source, d.content_hash))
        .collect();
    let mut report = CopyReport {
        from: from.location(),
        to: target.location(),
        ..CopyReport::default()
    };
    for doc in from.documents()? {
        if have.get(&doc.source) == Some(&doc.content_hash) {
            report.documents_unchanged += 1;
            continue;
        }
        // A document removed meanwhile by another process is simply not copied.
        let Some(full) = from.export_document(&doc.source)? else {
            continue;
        };
        report.chunks_copied += full.chunks.len();
        target.upsert_document(full)?;
        report.documents_copied += 1;
        on_document(&doc.source);
    }
    target.commit()?;
    let stats = target.stats()?;
    report.total_documents = stats.documents;
    report.total_chunks = stats.chunks;
    Ok(report)
}
