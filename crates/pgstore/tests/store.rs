//! The PostgreSQL store against a real server (PostgreSQL 15 + pgvector, started here on a
//! loopback port and stopped at the end), and against the in-process index on the same data:
//! the same documents, the same hits in the same order.

use std::collections::BTreeSet;

use rand::{rngs::StdRng, Rng, SeedableRng};
use thinkrag_index::{
    ChunkStore, DirStore, EmbedderInfo, NewChunk, NewDocument, SearchFilter, SearchMode,
    StoreError, StoreHit, StoreQuery,
};
use thinkrag_pgstore::test_server::TestServer;
use thinkrag_pgstore::{PgOptions, PgStore, PgStoreError};

const DIM: usize = 16;

fn embedder() -> EmbedderInfo {
    EmbedderInfo {
        model: "test/random-16".into(),
        dim: DIM,
        pooling: "mean".into(),
        normalized: true,
        max_tokens: 128,
        source: None,
    }
}

fn server() -> TestServer {
    TestServer::start().unwrap_or_else(|e| panic!("{e}"))
}

/// Documents with distinct words per chunk and random vectors, reproducible from `seed`.
fn corpus(seed: u64, docs: usize, chunks: usize) -> Vec<NewDocument> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..docs)
        .map(|d| {
            let source = format!("/corpus/dir{}/doc{d}.pdf", d % 3);
            let chunk_list: Vec<NewChunk> = (0..chunks)
                .map(|c| NewChunk {
                    text: format!(
                        "document {d} chunk {c} about topic{} with option --flag-{d}-{c} and word{}",
                        (d * chunks + c) % 7,
                        c % 5
                    ),
                    page: Some(c as u32 + 1),
                    start: c * 100,
                    end: c * 100 + 90,
                })
                .collect();
            let vectors = (0..chunks)
                .map(|_| (0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect())
                .collect();
            NewDocument {
                source,
                content_hash: format!("hash-{seed}-{d}"),
                pages: chunks as u32,
                chunks: chunk_list,
                vectors,
            }
        })
        .collect()
}

fn query_vector(seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn pg(server: &TestServer, schema: &str) -> PgStore {
    PgStore::open_or_create(&server.url(schema), &PgOptions::default(), &embedder()).unwrap()
}

fn search(
    store: &dyn ChunkStore,
    mode: SearchMode,
    text: &str,
    vector: &[f32],
    k: usize,
    exact: bool,
    filter: &SearchFilter,
) -> Vec<StoreHit> {
    store
        .search(&StoreQuery {
            text,
            vector: Some(vector),
            k,
            mode,
            exact,
            filter,
            ef_search: None,
        })
        .unwrap()
}

/// Hits named by what they are (ids differ between stores).
fn keys(hits: &[StoreHit]) -> Vec<(String, Option<u32>)> {
    hits.iter().map(|h| (h.source.clone(), h.page)).collect()
}

#[test]
fn postgres_and_the_in_process_index_store_and_find_the_same_chunks() {
    let server = server();
    let dir = tempfile::tempdir().unwrap();
    let mut local = DirStore::open_or_create(dir.path(), &embedder()).unwrap();
    let mut remote = pg(&server, "conformance");
    let stores: [&mut dyn ChunkStore; 2] = [&mut local, &mut remote];
    for store in stores {
        for doc in corpus(1, 6, 8) {
            store.upsert_document(doc).unwrap();
        }
        store.commit().unwrap();
    }
    // Re-open both from scratch: what was committed is what is found.
    let local = DirStore::open(dir.path()).unwrap();
    let remote = PgStore::open(&server.url("conformance"), &PgOptions::default()).unwrap();
    assert_eq!(local.documents().unwrap(), {
        let mut docs = remote.documents().unwrap();
        // ingestion times differ by the test's duration
        for (d, l) in docs.iter_mut().zip(local.documents().unwrap()) {
            d.ingested_at = l.ingested_at;
        }
        docs
    });
    let (ls, rs) = (local.stats().unwrap(), remote.stats().unwrap());
    assert_eq!((ls.documents, ls.chunks), (6, 48));
    assert_eq!((rs.documents, rs.chunks), (6, 48));
    assert_eq!(remote.embedder(), &embedder());

    let none = SearchFilter::default();
    for seed in 0..5 {
        let v = query_vector(100 + seed);
        // Exact vector search: the same chunks in the same order with the same cosines.
        let a = search(&local, SearchMode::Vector, "", &v, 10, true, &none);
        let b = search(&remote, SearchMode::Vector, "", &v, 10, true, &none);
        assert_eq!(keys(&a), keys(&b));
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x.score - y.score).abs() < 1e-5,
                "{} vs {}",
                x.score,
                y.score
            );
            assert_eq!((&x.text, x.start, x.end), (&y.text, y.start, y.end));
        }
        // Approximate search through pgvector's HNSW finds the exact top 10 on this size.
        let c = search(&remote, SearchMode::Vector, "", &v, 10, false, &none);
        assert_eq!(keys(&a), keys(&c));
    }
    // Lexical: an option string found word for word, first, on both.
    for store in [&local as &dyn ChunkStore, &remote] {
        let hits = search(
            store,
            SearchMode::Lexical,
            "--flag-4-6",
            &[],
            3,
            false,
            &none,
        );
        assert_eq!(
            keys(&hits[..1]),
            vec![("/corpus/dir1/doc4.pdf".to_string(), Some(7))]
        );
        assert!(hits[0].lexical_score.is_some() && hits[0].vector_score.is_none());
        // A phrase outranks the same words apart.
        let hits = search(
            store,
            SearchMode::Lexical,
            "document 2 chunk 3",
            &[],
            5,
            false,
            &none,
        );
        assert_eq!(
            hits[0].text.split(" about").next(),
            Some("document 2 chunk 3")
        );
        // Words only: query syntax and punctuation are not operators.
        let odd = search(store, SearchMode::Lexical, "'|&!(:*", &[], 5, false, &none);
        assert!(odd.is_empty());
        let quoted = search(
            store,
            SearchMode::Lexical,
            "it's topic3 & <-> !word1",
            &[],
            5,
            false,
            &none,
        );
        assert!(!quoted.is_empty());
    }
    // Hybrid: fused by the same function, so a chunk found by both lists ranks as on the index.
    let v = query_vector(7);
    let a = search(
        &local,
        SearchMode::Hybrid,
        "topic3 word2",
        &v,
        8,
        true,
        &none,
    );
    let b = search(
        &remote,
        SearchMode::Hybrid,
        "topic3 word2",
        &v,
        8,
        true,
        &none,
    );
    assert_eq!(a.len(), 8);
    assert_eq!(b.len(), 8);
    for h in &b {
        assert!(h.vector_score.is_some());
    }
    let both_a: BTreeSet<_> = a
        .iter()
        .filter(|h| h.lexical_score.is_some())
        .map(|h| (h.source.clone(), h.page))
        .collect();
    let both_b: BTreeSet<_> = b
        .iter()
        .filter(|h| h.lexical_score.is_some())
        .map(|h| (h.source.clone(), h.page))
        .collect();
    assert!(!both_a.is_empty() && !both_b.is_empty());

    // Filters: by document, by directory, by page range; the same on both.
    let filters = [
        SearchFilter {
            sources: vec!["/corpus/dir1/doc4.pdf".into()],
            pages: None,
        },
        SearchFilter {
            sources: vec!["/corpus/dir2/".into()],
            pages: Some((2, 3)),
        },
        SearchFilter {
            sources: vec!["/corpus/dir".into()],
            pages: None,
        },
    ];
    for (i, f) in filters.iter().enumerate() {
        for mode in [SearchMode::Vector, SearchMode::Lexical, SearchMode::Hybrid] {
            for exact in [true, false] {
                let a = search(&local, mode, "topic1 word3 document", &v, 5, exact, f);
                let b = search(&remote, mode, "topic1 word3 document", &v, 5, exact, f);
                for h in a.iter().chain(&b) {
                    assert!(f.matches(&h.source, h.page), "{h:?} passed filter {i}");
                }
                if i == 2 {
                    // "/corpus/dir" is a prefix of the directories' names, not a directory.
                    assert!(a.is_empty() && b.is_empty());
                } else {
                    assert!(!a.is_empty());
                    assert_eq!(a.len(), b.len(), "filter {i} {mode}");
                }
                if mode == SearchMode::Vector && exact {
                    assert_eq!(keys(&a), keys(&b));
                }
            }
        }
    }
}

#[test]
fn documents_are_replaced_and_removed_whole_and_the_schema_is_checked() {
    let server = server();
    let url = server.url("lifecycle");
    // Nothing there yet: opening to search says so; nothing is created.
    let err = PgStore::open(&url, &PgOptions::default()).unwrap_err();
    assert!(matches!(err, PgStoreError::NotFound { .. }), "{err}");
    assert!(StoreError::from(err).is_not_found());

    let mut store = pg(&server, "lifecycle");
    let docs = corpus(2, 2, 5);
    for d in docs.clone() {
        store.upsert_document(d).unwrap();
    }
    let mut changed = corpus(3, 1, 3).remove(0);
    changed.source = docs[0].source.clone();
    store.upsert_document(changed.clone()).unwrap();
    let listed = store.documents().unwrap();
    assert_eq!(listed.len(), 2);
    let first = listed.iter().find(|d| d.source == docs[0].source).unwrap();
    assert_eq!(
        (first.chunks, first.content_hash.as_str()),
        (3, changed.content_hash.as_str())
    );
    assert_eq!(store.stats().unwrap().chunks, 3 + 5);
    // Ids are never reused: a replaced document's chunks get new ones.
    let v = query_vector(1);
    let all = search(
        &store,
        SearchMode::Vector,
        "",
        &v,
        100,
        true,
        &SearchFilter::default(),
    );
    assert_eq!(all.len(), 8);
    assert!(store.remove_document(&docs[1].source).unwrap());
    assert!(!store.remove_document(&docs[1].source).unwrap());
    assert_eq!(store.stats().unwrap().chunks, 3);

    // Bad vectors change nothing.
    let mut bad = corpus(4, 1, 2).remove(0);
    bad.source = docs[0].source.clone();
    bad.vectors[1] = vec![0.0; DIM];
    let err = store.upsert_document(bad).unwrap_err();
    assert!(err.to_string().contains("vector 1 of"), "{err}");
    let mut short = corpus(4, 1, 2).remove(0);
    short.vectors[0].pop();
    assert!(store.upsert_document(short).is_err());
    assert_eq!(store.stats().unwrap().chunks, 3);

    // Another embedder is refused with both named.
    let mut other = embedder();
    other.model = "BAAI/bge-small-en-v1.5".into();
    let err = PgStore::open_or_create(&url, &PgOptions::default(), &other).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("bge-small") && msg.contains("test/random-16"),
        "{msg}"
    );

    // A schema from a newer thinkrag is refused, not misread.
    let mut admin =
        postgres::Client::connect(&server.url("x").replace("&schema=x", ""), postgres::NoTls)
            .unwrap();
    admin
        .batch_execute("INSERT INTO lifecycle.schema_migrations (version) VALUES (99)")
        .unwrap();
    let err = PgStore::open(&url, &PgOptions::default()).unwrap_err();
    assert!(
        matches!(err, PgStoreError::NewerSchema { found: 99, .. }),
        "{err}"
    );
    admin
        .batch_execute("DELETE FROM lifecycle.schema_migrations WHERE version = 99")
        .unwrap();

    // ef_search is per query: a tiny candidate list still returns k rows (raised to k).
    let reopened = PgStore::open(&url, &PgOptions::default()).unwrap();
    let hits = reopened
        .search(&StoreQuery {
            text: "",
            vector: Some(&v),
            k: 3,
            mode: SearchMode::Vector,
            exact: false,
            filter: &SearchFilter::default(),
            ef_search: Some(1),
        })
        .unwrap();
    assert_eq!(hits.len(), 3);

    // A wrong password or port is a clear error naming the server, without the password.
    let err = PgStore::open(
        "postgres://postgres:hunter2@127.0.0.1:1/postgres?sslmode=disable",
        &PgOptions::default(),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("cannot connect to") && !msg.contains("hunter2"),
        "{msg}"
    );
}

#[test]
fn concurrent_writers_and_readers_leave_every_document_whole_and_single() {
    let server = server();
    let url = server.url("concurrent");
    // Several "processes" (separate stores, separate connections) create the schema at once.
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| pg(&server, "concurrent"));
        }
    });
    let docs = corpus(5, 8, 6);
    std::thread::scope(|s| {
        for w in 0..3u64 {
            let docs = docs.clone();
            let server = &server;
            s.spawn(move || {
                let mut store = pg(server, "concurrent");
                // Every writer writes every document, in its own order, twice.
                for round in 0..2 {
                    for i in 0..docs.len() {
                        let mut d = docs[(i + w as usize * 3 + round) % docs.len()].clone();
                        d.content_hash = format!("writer-{w}-round-{round}");
                        store.upsert_document(d).unwrap();
                    }
                }
            });
        }
        for r in 0..2u64 {
            let url = url.clone();
            s.spawn(move || {
                let store = PgStore::open(&url, &PgOptions::default()).unwrap();
                for i in 0..20 {
                    let v = query_vector(r * 100 + i);
                    let hits = search(
                        &store,
                        SearchMode::Hybrid,
                        "topic2",
                        &v,
                        5,
                        false,
                        &SearchFilter::default(),
                    );
                    assert!(hits.len() <= 5);
                }
            });
        }
    });
    let store = PgStore::open(&url, &PgOptions::default()).unwrap();
    let stats = store.stats().unwrap();
    assert_eq!((stats.documents, stats.chunks), (8, 48));
    let mut admin =
        postgres::Client::connect(&server.url("x").replace("&schema=x", ""), postgres::NoTls)
            .unwrap();
    let row = admin
        .query_one(
            "SELECT count(*), count(DISTINCT (source, ord)) FROM concurrent.chunks",
            &[],
        )
        .unwrap();
    let (rows, distinct): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!((rows, distinct), (48, 48), "duplicated chunks");
}

#[test]
fn tls_is_used_and_certificates_are_checked_as_libpq_does() {
    let server = server();
    let dir = server.scratch().to_path_buf();
    // A private CA and a server certificate for 127.0.0.1 signed by it (webpki, like libpq's
    // verify modes, wants a real chain, not a self-signed CA used as the server's certificate).
    let script = r#"set -e
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=thinkrag-test-ca -keyout ca.key -out ca.crt
openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout server.key -out server.csr
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' > ext.cnf
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -out server.crt -extfile ext.cnf
"#;
    let out = std::process::Command::new("sh")
        .args(["-c", script])
        .current_dir(&dir)
        .output()
        .expect("openssl (Debian's openssl package) makes the test certificates");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let data = server.data_dir().to_path_buf();
    for f in ["server.crt", "server.key"] {
        std::fs::copy(dir.join(f), data.join(f)).unwrap();
    }
    // PostgreSQL wants its key private and owned by the server's user.
    let _ = std::process::Command::new("chown")
        .args(["postgres:postgres"])
        .arg(data.join("server.crt"))
        .arg(data.join("server.key"))
        .status();
    let _ = std::process::Command::new("chmod")
        .arg("600")
        .arg(data.join("server.key"))
        .status();
    let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
    conf.push_str("\nssl = on\n");
    std::fs::write(data.join("postgresql.conf"), conf).unwrap();
    server.restart().unwrap();

    let base = server.url("tls").replace("sslmode=disable&", "");
    let mut store = PgStore::open_or_create(
        &format!("{base}&sslmode=require"),
        &PgOptions::default(),
        &embedder(),
    )
    .unwrap();
    store.upsert_document(corpus(6, 1, 2).remove(0)).unwrap();
    // verify-full with the server's certificate as the root: chain and name check out.
    let opts = PgOptions {
        sslrootcert: Some(cert.display().to_string()),
        ..PgOptions::default()
    };
    let verified = PgStore::open(&format!("{base}&sslmode=verify-full"), &opts).unwrap();
    assert_eq!(verified.stats().unwrap().chunks, 2);
    // The connection really is encrypted.
    let mut client = postgres::Client::connect(
        &format!("postgres://postgres@127.0.0.1:{}/postgres", server.port()),
        thinkrag_pgstore::PgLocation::parse(
            &format!("{base}&sslmode=require"),
            &PgOptions::default(),
        )
        .unwrap()
        .connector()
        .unwrap(),
    )
    .unwrap();
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(ssl);
    // verify-full against the public roots: this self-signed server is refused.
    let err = PgStore::open(
        &format!("{base}&sslmode=verify-full"),
        &PgOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, PgStoreError::Connect { .. }), "{err}");
    // verify-ca ignores the name, not the chain: "localhost" with our root passes.
    let by_name = base.replace("127.0.0.1", "localhost");
    assert!(PgStore::open(&format!("{by_name}&sslmode=verify-ca"), &opts).is_ok());
    assert!(PgStore::open(&format!("{by_name}&sslmode=verify-full"), &opts).is_err());
    // A root file that is not a certificate is named.
    let bad = PgOptions {
        sslrootcert: Some(key.display().to_string()),
        ..PgOptions::default()
    };
    let err = PgStore::open(&format!("{base}&sslmode=verify-full"), &bad).unwrap_err();
    assert!(err.to_string().contains("sslrootcert"), "{err}");
}

#[test]
fn passwords_come_from_the_url_or_the_environment_and_never_show() {
    let server = server();
    // A role with a password, then password authentication for TCP connections.
    let mut admin = postgres::Client::connect(
        &format!("postgres://postgres@127.0.0.1:{}/postgres", server.port()),
        postgres::NoTls,
    )
    .unwrap();
    admin
        .batch_execute(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE rag LOGIN PASSWORD 'c0rrect-h0rse';
             GRANT CREATE ON DATABASE postgres TO rag;
             CREATE EXTENSION IF NOT EXISTS vector;",
        )
        .unwrap();
    let hba = server.data_dir().join("pg_hba.conf");
    let conf = std::fs::read_to_string(&hba).unwrap();
    // First match wins: the role `rag` must give a password; the superuser stays trusted (the
    // start script uses it).
    let scram = format!("host all rag 127.0.0.1/32 scram-sha-256\n{conf}");
    std::fs::write(&hba, scram).unwrap();
    server.restart().unwrap();

    let base = format!(
        "127.0.0.1:{}/postgres?sslmode=disable&schema=secured",
        server.port()
    );
    // In the URL.
    let mut store = PgStore::open_or_create(
        &format!("postgres://rag:c0rrect-h0rse@{base}"),
        &PgOptions::default(),
        &embedder(),
    )
    .unwrap();
    store.upsert_document(corpus(7, 1, 2).remove(0)).unwrap();
    // From the environment (as the CLI passes $PGPASSWORD).
    let from_env = PgOptions {
        password: Some("c0rrect-h0rse".into()),
        ..PgOptions::default()
    };
    let store = PgStore::open(&format!("postgres://rag@{base}"), &from_env).unwrap();
    assert_eq!(store.stats().unwrap().chunks, 2);
    // A wrong one fails clearly, without showing either.
    let wrong = PgOptions {
        password: Some("guess-w0rk".into()),
        ..PgOptions::default()
    };
    let err = PgStore::open(&format!("postgres://rag@{base}"), &wrong).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("cannot connect") && msg.contains("password"),
        "{msg}"
    );
    assert!(
        !msg.contains("guess-w0rk") && !msg.contains("c0rrect"),
        "{msg}"
    );
    let err = PgStore::open(&format!("postgres://rag:guess-w0rk@{base}"), &from_env).unwrap_err();
    assert!(!err.to_string().contains("guess-w0rk"), "{err}");
    // None at all: the server asks for one and the error says where to put it.
    let err = PgStore::open(&format!("postgres://rag@{base}"), &PgOptions::default()).unwrap_err();
    assert!(err.to_string().contains("PGPASSWORD"), "{err}");
}

#[test]
fn a_server_restart_between_writes_and_searches_is_survived() {
    let server = server();
    let mut store = pg(&server, "restarts");
    let docs = corpus(8, 3, 4);
    store.upsert_document(docs[0].clone()).unwrap();
    let v = query_vector(3);
    assert_eq!(
        search(
            &store,
            SearchMode::Vector,
            "",
            &v,
            2,
            false,
            &SearchFilter::default()
        )
        .len(),
        2
    );
    server.restart().unwrap();
    // Both the write connection and the pooled search connection were closed by the restart.
    store.upsert_document(docs[1].clone()).unwrap();
    assert!(store.remove_document(&docs[0].source).unwrap());
    store.upsert_document(docs[2].clone()).unwrap();
    let hits = search(
        &store,
        SearchMode::Hybrid,
        "topic1",
        &v,
        3,
        false,
        &SearchFilter::default(),
    );
    assert_eq!(hits.len(), 3);
    assert_eq!(store.stats().unwrap().documents, 2);
}
