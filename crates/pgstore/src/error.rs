//! Typed errors of the PostgreSQL store. Each names the store (its URL without the password)
//! and says what to do.

use thinkrag_index::StoreError;

/// Everything that can go wrong talking to the PostgreSQL store.
#[derive(Debug, thiserror::Error)]
pub enum PgStoreError {
    /// The URL cannot be used.
    #[error("invalid PostgreSQL URL {url}: {reason}")]
    InvalidUrl {
        /// The URL, without its password.
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The TLS settings cannot be used (a root certificate file unreadable or empty).
    #[error("TLS for {url}: {reason}")]
    Tls {
        /// The URL, without its password.
        url: String,
        /// What is wrong.
        reason: String,
    },

    /// Connecting failed.
    #[error("cannot connect to {url}: {source}; check that the server runs, the URL (host, port, database, user) and the password (in the URL or $PGPASSWORD)")]
    Connect {
        /// The URL, without its password.
        url: String,
        /// What the client reported.
        #[source]
        source: postgres::Error,
    },

    /// A statement failed.
    #[error("{url}: {what} failed: {}", describe(source))]
    Query {
        /// The URL, without its password.
        url: String,
        /// What was being done.
        what: String,
        /// What the server or client reported.
        #[source]
        source: postgres::Error,
    },

    /// The database has no thinkrag store in this schema.
    #[error("no thinkrag store in schema {schema} of {url}; ingest documents to create one")]
    NotFound {
        /// The URL, without its password.
        url: String,
        /// The schema looked in.
        schema: String,
    },

    /// pgvector is not installed in the server, or not enabled and this user may not enable it.
    #[error("{url}: the pgvector extension is not available ({detail}); install pgvector on the server (scripts/setup-postgres.sh install) or have an administrator run CREATE EXTENSION vector")]
    NoPgvector {
        /// The URL, without its password.
        url: String,
        /// What the server said.
        detail: String,
    },

    /// The store's schema was written by a newer thinkrag.
    #[error("the store in schema {schema} of {url} has schema version {found}, this thinkrag reads up to {supported}; upgrade thinkrag")]
    NewerSchema {
        /// The URL, without its password.
        url: String,
        /// The schema.
        schema: String,
        /// The version found.
        found: i32,
        /// The newest this build knows.
        supported: i32,
    },

    /// A stored row is not what thinkrag wrote.
    #[error("{url}: stored data in schema {schema} is inconsistent: {message}")]
    Corrupt {
        /// The URL, without its password.
        url: String,
        /// The schema.
        schema: String,
        /// What is wrong.
        message: String,
    },
}

impl From<PgStoreError> for StoreError {
    /// "Nothing stored here yet" as the seam's own variant, so callers tell it from failures
    /// without knowing this backend; every other error boxed as it is.
    fn from(e: PgStoreError) -> Self {
        match e {
            PgStoreError::NotFound { url, schema } => StoreError::NotFound {
                location: format!("schema {schema} of {url}"),
            },
            other => StoreError::Backend(Box::new(other)),
        }
    }
}

/// A server error's message with its detail and hint, or the client's error.
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} ({})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!("; {d}"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => e.to_string(),
    }
}
