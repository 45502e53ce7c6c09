//! thinkrag-pgstore: the scale-out chunk store, PostgreSQL with pgvector. Many thinkrag
//! processes (ingesting, searching, serving) share one database; each document is written in
//! one transaction, vectors are searched through a pgvector HNSW index (cosine) and words
//! through PostgreSQL full-text search, fused in Rust exactly as the in-process index fuses them.
//!
//! # Tables (in the URL's `schema`, default `thinkrag`)
//!
//! ```text
//! schema_migrations (version, applied_at)                 versions applied, newest last
//! store    (embedder jsonb, dim, created_at)              one row: who made the vectors
//! documents(source PK, content_hash, pages, chunks, ingested_at)
//! chunks   (id identity PK, source FK ON DELETE CASCADE, ord, page, start_offset, end_offset,
//!           content_hash, text, embedding vector(dim), tsv tsvector GENERATED from text)
//!           HNSW index (vector_cosine_ops), GIN index on tsv, btree on (source, ord)
//! ```

mod connect;
mod error;
#[cfg(feature = "test-server")]
pub mod test_server;

use std::sync::Mutex;

use pgvector::Vector;
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{Kind, ToSql, Type};
use postgres::{Client, IsolationLevel, Transaction};
use thinkrag_index::{
    check_embedder, fuse_candidates, hybrid_candidates, normalized, ChunkStore, EmbedderInfo,
    IndexError, NewDocument, SearchFilter, SearchMode, StoreError, StoreHit, StoreQuery,
    StoreStats, StoredDocument,
};

pub use connect::{is_postgres_url, redact, PgLocation, PgOptions, TlsMode, DEFAULT_SCHEMA};
pub use error::PgStoreError;

/// The newest schema version this build writes and reads.
pub const SCHEMA_VERSION: i32 = 1;

/// The HNSW candidate list when a query sets none: the in-process index's default, so both
/// stores trade recall for speed alike. pgvector returns at most `ef_search` rows, so it is
/// raised to `k` when `k` is larger, and capped at pgvector's limit of 1000.
pub const DEFAULT_EF_SEARCH: usize = 128;
const MAX_EF_SEARCH: usize = 1000;

/// Idle connections kept for searches.
const IDLE_CONNECTIONS: usize = 8;

/// Serialises schema creation and migration across processes and schemas (an advisory lock
/// key: "thinkrag" in ASCII).
const MIGRATION_LOCK: i64 = 0x7468_696e_6b72_6167;

/// A chunk store in PostgreSQL.
pub struct PgStore {
    location: PgLocation,
    embedder: EmbedderInfo,
    /// The connection writes go through.
    writer: Mutex<Client>,
    /// Connections for searches, so concurrent searches do not queue behind one another.
    idle: Mutex<Vec<Client>>,
    /// pgvector's `vector` type as this database knows it (its OID), for binary COPY.
    vector_type: Type,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("location", &self.location.display)
            .field("schema", &self.location.schema)
            .field("embedder", &self.embedder)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Opens the store at `url` for searching: [`PgStoreError::NotFound`] when nothing was
    /// ingested there yet. Migrates an older schema.
    pub fn open(url: &str, opts: &PgOptions) -> Result<Self, PgStoreError> {
        Self::connect(PgLocation::parse(url, opts)?, None)
    }

    /// Opens the store at `url`, creating its schema and tables for `embedder` when there are
    /// none; an existing store must have been built by `embedder`.
    pub fn open_or_create(
        url: &str,
        opts: &PgOptions,
        embedder: &EmbedderInfo,
    ) -> Result<Self, StoreError> {
        let location = PgLocation::parse(url, opts).map_err(StoreError::from)?;
        let store = Self::connect(location, Some(embedder)).map_err(StoreError::from)?;
        check_embedder(&store.embedder, embedder)?;
        Ok(store)
    }

    /// The schema holding this store's tables.
    pub fn schema(&self) -> &str {
        &self.location.schema
    }

    fn connect(location: PgLocation, create: Option<&EmbedderInfo>) -> Result<Self, PgStoreError> {
        let mut client = open_client(&location)?;
        let embedder = migrate(&mut client, &location, create)?;
        let q = Q::new(&location);
        let row = client
            .query_one(
                "SELECT t.oid, n.nspname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.typname = 'vector' LIMIT 1",
                &[],
            )
            .map_err(|e| q.err("looking up pgvector's vector type", e))?;
        let vector_type = Type::new("vector".into(), row.get(0), Kind::Simple, row.get(1));
        Ok(Self {
            location,
            embedder,
            writer: Mutex::new(client),
            idle: Mutex::new(Vec::new()),
            vector_type,
        })
    }

    /// Runs `f` on an idle search connection (or a new one), returning it afterwards.
    fn with_reader<T>(
        &self,
        f: impl FnMut(&mut Client) -> Result<T, PgStoreError>,
    ) -> Result<T, PgStoreError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let mut client = match idle {
            Some(c) if !c.is_closed() => c,
            _ => open_client(&self.location)?,
        };
        let mut f = f;
        let mut out = f(&mut client);
        if out.is_err() && client.is_closed() {
            // The server dropped the connection (a restart, a failover): searches are
            // read-only, so one more try on a new connection is safe.
            client = open_client(&self.location)?;
            out = f(&mut client);
        }
        if !client.is_closed() {
            let mut idle = self
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if idle.len() < IDLE_CONNECTIONS {
                idle.push(client);
            }
        }
        out
    }

    /// Runs `f` on the write connection. When the server dropped the connection (a restart,
    /// a failover, an idle timeout) the connection is reopened and `f` tried once more, so a
    /// long ingest or server survives them: every write is one transaction that either
    /// committed or rolled back, and repeating it leaves the same state.
    fn with_writer<T>(
        &self,
        mut f: impl FnMut(&mut Client) -> Result<T, PgStoreError>,
    ) -> Result<T, PgStoreError> {
        let mut client = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if client.is_closed() {
            *client = open_client(&self.location)?;
        }
        match f(&mut client) {
            Err(_) if client.is_closed() => {
                *client = open_client(&self.location)?;
                f(&mut client)
            }
            other => other,
        }
    }

    fn q(&self) -> Q<'_> {
        Q::new(&self.location)
    }
}

/// Names tables in the store's schema and words errors.
struct Q<'a> {
    loc: &'a PgLocation,
}

impl<'a> Q<'a> {
    fn new(loc: &'a PgLocation) -> Self {
        Self { loc }
    }

    /// `"schema".name`.
    fn t(&self, name: &str) -> String {
        format!("\"{}\".{name}", self.loc.schema)
    }

    fn err(&self, what: &str, source: postgres::Error) -> PgStoreError {
        PgStoreError::Query {
            url: self.loc.display.clone(),
            what: what.to_string(),
            source,
        }
    }

    fn corrupt(&self, message: String) -> PgStoreError {
        PgStoreError::Corrupt {
            url: self.loc.display.clone(),
            schema: self.loc.schema.clone(),
            message,
        }
    }
}

fn open_client(location: &PgLocation) -> Result<Client, PgStoreError> {
    let tls = location.connector()?;
    location
        .config
        .connect(tls)
        .map_err(|source| PgStoreError::Connect {
            url: location.display.clone(),
            source,
        })
}

/// Creates or migrates the schema (under a cross-process advisory lock) and returns the
/// store's embedder; with `create` unset, a missing store is [`PgStoreError::NotFound`].
fn migrate(
    client: &mut Client,
    loc: &PgLocation,
    create: Option<&EmbedderInfo>,
) -> Result<EmbedderInfo, PgStoreError> {
    let q = Q::new(loc);
    let schema = &loc.schema;
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_schema = $1 AND table_name = 'store')",
            &[schema],
        )
        .map_err(|e| q.err("looking for the store's tables", e))?
        .get(0);
    if !exists && create.is_none() {
        return Err(PgStoreError::NotFound {
            url: loc.display.clone(),
            schema: schema.clone(),
        });
    }
    let mut tx = client
        .transaction()
        .map_err(|e| q.err("starting the schema transaction", e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(|e| q.err("taking the migration lock", e))?;
    let has_vector: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector')",
            &[],
        )
        .map_err(|e| q.err("looking for pgvector", e))?
        .get(0);
    if !has_vector {
        tx.batch_execute("CREATE EXTENSION IF NOT EXISTS vector")
            .map_err(|e| PgStoreError::NoPgvector {
                url: loc.display.clone(),
                detail: e
                    .as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_string()),
            })?;
    }
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
         CREATE TABLE IF NOT EXISTS {m} (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());",
        m = q.t("schema_migrations")
    ))
    .map_err(|e| q.err("creating the schema", e))?;
    let version: i32 = tx
        .query_one(
            &format!(
                "SELECT coalesce(max(version), 0) FROM {}",
                q.t("schema_migrations")
            ),
            &[],
        )
        .map_err(|e| q.err("reading the schema version", e))?
        .get(0);
    if version > SCHEMA_VERSION {
        return Err(PgStoreError::NewerSchema {
            url: loc.display.clone(),
            schema: schema.clone(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    // Migrations, oldest first; each runs once, in this transaction. A later version appends
    // its own step here (ALTER TABLE ...), never edits an earlier one.
    if version < 1 {
        tx.batch_execute(&format!(
            "CREATE TABLE {store} (
                 singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
                 embedder jsonb NOT NULL,
                 dim integer NOT NULL CHECK (dim > 0),
                 created_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE {documents} (
                 source text PRIMARY KEY,
                 content_hash text NOT NULL,
                 pages integer NOT NULL,
                 chunks integer NOT NULL,
                 ingested_at bigint NOT NULL);
             INSERT INTO {m} (version) VALUES (1);",
            store = q.t("store"),
            documents = q.t("documents"),
            m = q.t("schema_migrations"),
        ))
        .map_err(|e| q.err("creating the tables (schema version 1)", e))?;
    }
    let stored = tx
        .query_opt(&format!("SELECT embedder::text FROM {}", q.t("store")), &[])
        .map_err(|e| q.err("reading the store's embedder", e))?;
    let embedder = match (stored, create) {
        (Some(row), _) => {
            let text: String = row.get(0);
            serde_json::from_str(&text)
                .map_err(|e| q.corrupt(format!("the store's embedder record: {e}")))?
        }
        (None, Some(embedder)) => {
            // The chunk table's vector column is sized by the embedder, so it is made with it.
            let json = serde_json::to_string(embedder)
                .map_err(|e| q.corrupt(format!("the embedder record: {e}")))?;
            let dim = i32::try_from(embedder.dim)
                .map_err(|_| q.corrupt(format!("dimension {} too large", embedder.dim)))?;
            tx.execute(
                &format!(
                    "INSERT INTO {} (embedder, dim) VALUES ($1::text::jsonb, $2)",
                    q.t("store")
                ),
                &[&json, &dim],
            )
            .map_err(|e| q.err("recording the embedder", e))?;
            tx.batch_execute(&format!(
                "CREATE TABLE {chunks} (
                     id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                     source text NOT NULL REFERENCES {documents} (source) ON DELETE CASCADE,
                     ord integer NOT NULL,
                     page integer,
                     start_offset bigint NOT NULL,
                     end_offset bigint NOT NULL,
                     content_hash text NOT NULL,
                     text text NOT NULL,
                     embedding vector({dim}) NOT NULL,
                     tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED);
                 CREATE INDEX chunks_embedding ON {chunks} USING hnsw (embedding vector_cosine_ops);
                 CREATE INDEX chunks_tsv ON {chunks} USING gin (tsv);
                 CREATE INDEX chunks_source ON {chunks} (source, ord);",
                chunks = q.t("chunks"),
                documents = q.t("documents"),
            ))
            .map_err(|e| q.err("creating the chunk table", e))?;
            embedder.clone()
        }
        (None, None) => {
            return Err(PgStoreError::NotFound {
                url: loc.display.clone(),
                schema: schema.clone(),
            })
        }
    };
    tx.commit().map_err(|e| q.err("committing the schema", e))?;
    Ok(embedder)
}

/// A read-only transaction that sees one snapshot of the database throughout.
fn snapshot(client: &mut Client) -> Result<Transaction<'_>, postgres::Error> {
    client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
}

/// The SQL condition for `filter` on table alias `c`, its parameters appended to `params`
/// (numbered after those already there).
fn filter_sql(filter: &SearchFilter, params: &mut Vec<Box<dyn ToSql + Sync>>) -> String {
    let mut parts = Vec::new();
    if !filter.sources.is_empty() {
        params.push(Box::new(filter.sources.clone()));
        // The same rule as thinkrag_index::source_under: the source itself, or under it.
        parts.push(format!(
            "EXISTS (SELECT 1 FROM unnest(${}::text[]) AS p WHERE c.source = p OR starts_with(c.source, rtrim(p, '/') || '/'))",
            params.len()
        ));
    }
    if let Some((lo, hi)) = filter.pages {
        params.push(Box::new(i32::try_from(lo).unwrap_or(i32::MAX)));
        params.push(Box::new(i32::try_from(hi).unwrap_or(i32::MAX)));
        parts.push(format!(
            "c.page BETWEEN ${} AND ${}",
            params.len() - 1,
            params.len()
        ));
    }
    if parts.is_empty() {
        "true".into()
    } else {
        parts.join(" AND ")
    }
}

/// A hit from a row of (id, source, page, start, end, text, cosine, lexical).
fn hit_from_row(row: &postgres::Row) -> StoreHit {
    let id: i64 = row.get(0);
    let page: Option<i32> = row.get(2);
    let start: i64 = row.get(3);
    let end: i64 = row.get(4);
    let cosine: Option<f64> = row.get(6);
    let lexical: Option<f32> = row.get(7);
    StoreHit {
        id: id as u64,
        score: 0.0,
        vector_score: cosine.map(|c| c as f32),
        lexical_score: lexical,
        text: row.get(5),
        source: row.get(1),
        page: page.map(|p| p as u32),
        start: start as usize,
        end: end as usize,
    }
}

impl PgStore {
    /// Vector candidates: the `depth` nearest chunks passing the filter.
    fn vector_candidates(
        &self,
        tx: &mut Transaction<'_>,
        query: &Vector,
        depth: usize,
        q: &StoreQuery<'_>,
    ) -> Result<Vec<StoreHit>, PgStoreError> {
        let sql = self.q();
        let ef = q
            .ef_search
            .unwrap_or(DEFAULT_EF_SEARCH)
            .max(depth)
            .clamp(1, MAX_EF_SEARCH);
        // SET LOCAL takes no parameters; these are integers and fixed words.
        let mut settings = format!("SET LOCAL hnsw.ef_search = {ef};");
        if q.exact {
            // Without index scans the planner sorts every row by distance: an exact search.
            settings.push_str("SET LOCAL enable_indexscan = off;");
        } else if !q.filter.is_empty() {
            // pgvector 0.8's iterative scan keeps walking the graph until enough rows pass
            // the filter, instead of returning fewer than asked.
            settings.push_str("SET LOCAL hnsw.iterative_scan = strict_order;");
        }
        tx.batch_execute(&settings)
            .map_err(|e| sql.err("setting the search parameters", e))?;
        let mut params: Vec<Box<dyn ToSql + Sync>> = vec![Box::new(query.clone())];
        let cond = filter_sql(q.filter, &mut params);
        params.push(Box::new(depth as i64));
        let stmt = format!(
            "SELECT c.id, c.source, c.page, c.start_offset, c.end_offset, c.text,
                    1 - (c.embedding <=> $1) AS cosine, NULL::real
             FROM {} c WHERE {cond} ORDER BY c.embedding <=> $1, c.id LIMIT ${}",
            sql.t("chunks"),
            params.len()
        );
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
        let rows = tx
            .query(&stmt, &refs)
            .map_err(|e| sql.err("vector search", e))?;
        let mut hits: Vec<StoreHit> = rows.iter().map(hit_from_row).collect();
        for h in &mut hits {
            h.score = h.vector_score.unwrap_or(0.0);
        }
        // Recomputed scores may tie differently from the index's float order; rank as the
        // in-process index does (score, then id).
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
        Ok(hits)
    }

    /// Lexical candidates: chunks holding any of the query's words, ranked by how rare the
    /// words they hold are (BM25's inverse document frequency; PostgreSQL's own `ts_rank_cd`
    /// knows nothing of it, and ranking by it alone let common words outweigh the ones that
    /// matter), first when they hold the words as a phrase (as the in-process index ranks an
    /// exact phrase first). The query is taken as words, never as tsquery syntax. The
    /// `english` configuration drops stop words and stems, on the text and the query alike.
    fn lexical_candidates(
        &self,
        tx: &mut Transaction<'_>,
        text: &str,
        vector: Option<&Vector>,
        depth: usize,
        filter: &SearchFilter,
    ) -> Result<Vec<StoreHit>, PgStoreError> {
        let sql = self.q();
        let mut params: Vec<Box<dyn ToSql + Sync>> = vec![Box::new(text.to_string())];
        let cosine = match vector {
            Some(v) => {
                params.push(Box::new(v.clone()));
                format!("1 - (c.embedding <=> ${})", params.len())
            }
            None => "NULL::float8".into(),
        };
        let cond = filter_sql(filter, &mut params);
        params.push(Box::new(depth as i64));
        // Each word becomes a quoted lexeme (quotes and backslashes escaped) cast to a tsquery
        // as it is, so nothing in the user's text is read as operators. A chunk scores the
        // BM25 inverse document frequency of each query word it holds (document frequencies
        // counted through the GIN index, the chunk total from the documents table), the sum of
        // all of them again when it holds the words as a phrase, and a little ts_rank_cd to
        // order chunks that hold the same words.
        let stmt = format!(
            "WITH words AS (
                 SELECT DISTINCT ('''' || replace(replace(lexeme, '\\', '\\\\'), '''', '''''') || '''')::tsquery AS q
                 FROM unnest(to_tsvector('english', $1))),
             total AS (SELECT greatest(coalesce(sum(chunks), 0), 1)::float8 AS n FROM {documents}),
             weighted AS (
                 SELECT w.q, ln(1 + (total.n - d.df + 0.5) / (d.df + 0.5)) AS idf
                 FROM words w, total,
                      LATERAL (SELECT count(*)::float8 AS df FROM {chunks} x WHERE x.tsv @@ w.q) d),
             terms AS (
                 SELECT (SELECT string_agg(q::text, ' | ') FROM words)::tsquery AS any_word,
                        phraseto_tsquery('english', $1) AS phrase,
                        (SELECT coalesce(sum(idf), 0) FROM weighted) AS all_idf)
             SELECT c.id, c.source, c.page, c.start_offset, c.end_offset, c.text, {cosine},
                    ((SELECT coalesce(sum(wt.idf), 0) FROM weighted wt WHERE c.tsv @@ wt.q)
                     + CASE WHEN numnode(t.phrase) > 1 AND c.tsv @@ t.phrase THEN t.all_idf ELSE 0 END
                     + 0.01 * ts_rank_cd(c.tsv, t.any_word, 32))::real AS lexical
             FROM {chunks} c, terms t
             WHERE t.any_word IS NOT NULL AND c.tsv @@ t.any_word AND {cond}
             ORDER BY lexical DESC, c.id LIMIT ${}",
            params.len(),
            documents = sql.t("documents"),
            chunks = sql.t("chunks"),
        );
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
        let rows = tx
            .query(&stmt, &refs)
            .map_err(|e| sql.err("lexical search", e))?;
        Ok(rows
            .iter()
            .map(|r| {
                let mut h = hit_from_row(r);
                h.score = h.lexical_score.unwrap_or(0.0);
                h
            })
            .collect())
    }

    fn search_pg(&self, q: &StoreQuery<'_>) -> Result<Vec<StoreHit>, StoreError> {
        let vector = match (q.mode.uses_vectors(), q.vector) {
            (true, Some(v)) => Some(Vector::from(normalized(v, self.embedder.dim, "query")?)),
            (true, None) => {
                return Err(IndexError::DimensionMismatch {
                    what: format!("the query of a {} search (none given)", q.mode),
                    expected: self.embedder.dim,
                    found: 0,
                }
                .into())
            }
            (false, _) => None,
        };
        if q.k == 0 {
            return Ok(Vec::new());
        }
        let sql = self.q();
        self.with_reader(|client| {
            // One snapshot for both halves of a hybrid search.
            let mut tx = snapshot(client).map_err(|e| sql.err("starting a search", e))?;
            let hits = match q.mode {
                SearchMode::Vector => {
                    self.vector_candidates(&mut tx, vector.as_ref().expect("checked"), q.k, q)?
                }
                SearchMode::Lexical => {
                    self.lexical_candidates(&mut tx, q.text, None, q.k, q.filter)?
                }
                SearchMode::Hybrid => {
                    let v = vector.as_ref().expect("checked");
                    let depth = hybrid_candidates(q.k);
                    let by_vector = self.vector_candidates(&mut tx, v, depth, q)?;
                    let by_words =
                        self.lexical_candidates(&mut tx, q.text, Some(v), depth, q.filter)?;
                    fuse(by_vector, by_words, q.k)
                }
            };
            tx.commit().map_err(|e| sql.err("ending a search", e))?;
            Ok(hits)
        })
        .map_err(StoreError::from)
    }
}

/// Both candidate lists fused as every store fuses them ([`fuse_candidates`]), each hit keeping
/// its cosine (both lists carry it) and its lexical score.
fn fuse(by_vector: Vec<StoreHit>, by_words: Vec<StoreHit>, k: usize) -> Vec<StoreHit> {
    fuse_candidates(by_vector, by_words, |h| h.id, k)
        .into_iter()
        .filter_map(|f| {
            let lexical_score = f.by_words.as_ref().and_then(|h| h.lexical_score);
            let mut hit = f.by_vector.or(f.by_words)?;
            hit.score = f.score;
            hit.lexical_score = lexical_score;
            Some(hit)
        })
        .collect()
}

impl ChunkStore for PgStore {
    fn location(&self) -> String {
        if self.location.schema == DEFAULT_SCHEMA {
            self.location.display.clone()
        } else {
            format!(
                "{} (schema {})",
                self.location.display, self.location.schema
            )
        }
    }

    fn embedder(&self) -> &EmbedderInfo {
        &self.embedder
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let q = self.q();
        self.with_reader(|c| {
            let row = c
                .query_one(
                    &format!(
                        "SELECT count(*), coalesce(sum(chunks), 0)::bigint FROM {}",
                        q.t("documents")
                    ),
                    &[],
                )
                .map_err(|e| q.err("counting documents", e))?;
            let (documents, chunks): (i64, i64) = (row.get(0), row.get(1));
            Ok(StoreStats {
                documents: documents as usize,
                chunks: chunks as usize,
                embedder: self.embedder.clone(),
            })
        })
        .map_err(StoreError::from)
    }

    fn documents(&self) -> Result<Vec<StoredDocument>, StoreError> {
        let q = self.q();
        self.with_reader(|c| {
            let rows = c
                .query(
                    &format!(
                        "SELECT source, content_hash, pages, chunks, ingested_at FROM {} ORDER BY source",
                        q.t("documents")
                    ),
                    &[],
                )
                .map_err(|e| q.err("listing documents", e))?;
            Ok(rows
                .iter()
                .map(|r| {
                    let pages: i32 = r.get(2);
                    let chunks: i32 = r.get(3);
                    let at: i64 = r.get(4);
                    StoredDocument {
                        source: r.get(0),
                        content_hash: r.get(1),
                        pages: pages as u32,
                        chunks: chunks as usize,
                        ingested_at: at as u64,
                    }
                })
                .collect())
        })
        .map_err(StoreError::from)
    }

    fn export_document(&self, source: &str) -> Result<Option<NewDocument>, StoreError> {
        let q = self.q();
        self.with_reader(|c| {
            // The document row and its chunks as of one moment.
            let mut tx = snapshot(c).map_err(|e| q.err("starting an export", e))?;
            let Some(doc) = tx
                .query_opt(
                    &format!(
                        "SELECT content_hash, pages FROM {} WHERE source = $1",
                        q.t("documents")
                    ),
                    &[&source],
                )
                .map_err(|e| q.err(&format!("reading document {source}"), e))?
            else {
                return Ok(None);
            };
            let rows = tx
                .query(
                    &format!(
                        "SELECT text, page, start_offset, end_offset, embedding FROM {} WHERE source = $1 ORDER BY ord",
                        q.t("chunks")
                    ),
                    &[&source],
                )
                .map_err(|e| q.err(&format!("reading the chunks of {source}"), e))?;
            let mut chunks = Vec::with_capacity(rows.len());
            let mut vectors = Vec::with_capacity(rows.len());
            for r in &rows {
                let page: Option<i32> = r.get(1);
                let (start, end): (i64, i64) = (r.get(2), r.get(3));
                let v: Vector = r.get(4);
                chunks.push(thinkrag_index::NewChunk {
                    text: r.get(0),
                    page: page.map(|p| p as u32),
                    start: start as usize,
                    end: end as usize,
                });
                vectors.push(v.to_vec());
            }
            let pages: i32 = doc.get(1);
            Ok(Some(NewDocument {
                source: source.to_string(),
                content_hash: doc.get(0),
                pages: pages as u32,
                chunks,
                vectors,
            }))
        })
        .map_err(StoreError::from)
    }

    /// One transaction: the document row is upserted first (its row lock makes a concurrent
    /// writer of the same document wait), its old chunks deleted, the new ones loaded with
    /// binary COPY. Killed at any point, the database keeps the old version or the new one.
    fn upsert_document(&mut self, d: NewDocument) -> Result<(), StoreError> {
        if d.chunks.len() != d.vectors.len() {
            return Err(IndexError::LengthMismatch {
                source_path: d.source.clone(),
                chunks: d.chunks.len(),
                vectors: d.vectors.len(),
            }
            .into());
        }
        let dim = self.embedder.dim;
        let mut vectors = Vec::with_capacity(d.vectors.len());
        for (i, v) in d.vectors.iter().enumerate() {
            vectors.push(Vector::from(normalized(
                v,
                dim,
                &format!("vector {i} of {}", d.source),
            )?));
        }
        let q = self.q();
        let vector_type = self.vector_type.clone();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_secs() as i64);
        let run = |client: &mut Client| -> Result<(), PgStoreError> {
            let mut tx = client
                .transaction()
                .map_err(|e| q.err("starting a document transaction", e))?;
            let pages = i32::try_from(d.pages).unwrap_or(i32::MAX);
            let count = i32::try_from(d.chunks.len()).unwrap_or(i32::MAX);
            tx.execute(
                &format!(
                    "INSERT INTO {} (source, content_hash, pages, chunks, ingested_at) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (source) DO UPDATE SET content_hash = EXCLUDED.content_hash,
                         pages = EXCLUDED.pages, chunks = EXCLUDED.chunks, ingested_at = EXCLUDED.ingested_at",
                    q.t("documents")
                ),
                &[&d.source, &d.content_hash, &pages, &count, &now],
            )
            .map_err(|e| q.err(&format!("storing document {}", d.source), e))?;
            tx.execute(
                &format!("DELETE FROM {} WHERE source = $1", q.t("chunks")),
                &[&d.source],
            )
            .map_err(|e| q.err(&format!("removing the old chunks of {}", d.source), e))?;
            let sink = tx
                .copy_in(&format!(
                    "COPY {} (source, ord, page, start_offset, end_offset, content_hash, text, embedding) FROM STDIN (FORMAT BINARY)",
                    q.t("chunks")
                ))
                .map_err(|e| q.err("starting the chunk COPY", e))?;
            let types = [
                Type::TEXT,
                Type::INT4,
                Type::INT4,
                Type::INT8,
                Type::INT8,
                Type::TEXT,
                Type::TEXT,
                vector_type.clone(),
            ];
            let mut writer = BinaryCopyInWriter::new(sink, &types);
            for (ord, (c, v)) in d.chunks.iter().zip(&vectors).enumerate() {
                let ord = ord as i32;
                let page = c.page.map(|p| i32::try_from(p).unwrap_or(i32::MAX));
                let (start, end) = (c.start as i64, c.end as i64);
                let hash = thinkrag_index::chunk_hash(&c.text);
                writer
                    .write(&[&d.source, &ord, &page, &start, &end, &hash, &c.text, v])
                    .map_err(|e| q.err(&format!("loading the chunks of {}", d.source), e))?;
            }
            writer
                .finish()
                .map_err(|e| q.err(&format!("loading the chunks of {}", d.source), e))?;
            tx.commit()
                .map_err(|e| q.err(&format!("committing document {}", d.source), e))
        };
        self.with_writer(run).map_err(StoreError::from)
    }

    fn remove_document(&mut self, source: &str) -> Result<bool, StoreError> {
        let q = self.q();
        let n = self
            .with_writer(|c| {
                c.execute(
                    &format!("DELETE FROM {} WHERE source = $1", q.t("documents")),
                    &[&source],
                )
                .map_err(|e| q.err(&format!("removing document {source}"), e))
            })
            .map_err(StoreError::from)?;
        Ok(n > 0)
    }

    /// Every document was committed by its own write: nothing is pending.
    fn commit(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn search(&self, query: &StoreQuery<'_>) -> Result<Vec<StoreHit>, StoreError> {
        self.search_pg(query)
    }
}
