//! `thinkrag ingest`, `search`, `ask` and `index info` with `--store postgres://...` against a
//! real PostgreSQL 15 + pgvector (started here on a loopback port, stopped at the end): the
//! commands work as on an index directory, a password never shows in output, and an ingest
//! killed with SIGKILL leaves every document either absent, old or new, never half-written;
//! several processes ingesting at once leave no duplicates.

use std::path::Path;
use std::process::{Command as StdCommand, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::Command;
use serde_json::Value;
use thinkrag::embed::test_models::minilm_dir;
use thinkrag::pgstore::test_server::TestServer;

mod common;
use common::{corpus, hit_sources, run_json, write_reports, Server};

fn server() -> TestServer {
    TestServer::start().unwrap_or_else(|e| panic!("{e}"))
}

/// `thinkrag SUB --store LOCATION REST...` with the test embedder, offline.
fn cmd(sub: &[&str], store: &str, rest: &[&str]) -> Command {
    common::cmd(sub, "--store", store, rest)
}

fn ingest(store: &str, paths: &[&Path]) -> Value {
    let mut c = cmd(
        &["ingest"],
        store,
        &["--device", "cpu", "--threads", "2", "--json"],
    );
    c.args(paths);
    run_json(&mut c, 0)
}

/// Every stored document has exactly the chunks its row says, numbered 0..n: none half-written.
fn assert_documents_whole(server: &TestServer, schema: &str) -> (i64, i64) {
    let mut admin = postgres::Client::connect(
        &format!("postgres://postgres@127.0.0.1:{}/postgres", server.port()),
        postgres::NoTls,
    )
    .unwrap();
    let broken: i64 = admin
        .query_one(
            &format!(
                "SELECT count(*) FROM {schema}.documents d
                 LEFT JOIN (SELECT source, count(*) AS n, min(ord) AS lo, max(ord) AS hi
                            FROM {schema}.chunks GROUP BY source) c ON c.source = d.source
                 WHERE coalesce(c.n, 0) <> d.chunks OR (d.chunks > 0 AND (c.lo <> 0 OR c.hi <> d.chunks - 1))"
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(broken, 0, "documents whose chunks do not match their row");
    let orphans: i64 = admin
        .query_one(
            &format!(
                "SELECT count(*) FROM {schema}.chunks c WHERE NOT EXISTS (SELECT 1 FROM {schema}.documents d WHERE d.source = c.source)"
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0);
    let row = admin
        .query_one(
            &format!("SELECT (SELECT count(*) FROM {schema}.documents), (SELECT count(*) FROM {schema}.chunks)"),
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn ingest_search_and_info_on_postgres() {
    let server = server();
    let store = server.url("cli");
    let v = ingest(&store, &[&corpus()]);
    assert_eq!(v["files_indexed"], 6, "{v}");
    assert!(
        v["index"].as_str().unwrap().starts_with("postgres://"),
        "{v}"
    );

    // The same ranking test the index directory passes.
    let q = "What's the population increase of New York City from 2021 to 2023? How is the trending comparing with Miami?";
    let v = run_json(
        cmd(&["search", q], &store, &["-k", "2", "--json"]).args(["--device", "cpu"]),
        0,
    );
    let mut top = hit_sources(&v);
    top.sort();
    assert_eq!(top, ["miami.txt", "new-york-city.txt"], "{v}");
    for mode in ["lexical", "hybrid"] {
        let v = run_json(
            cmd(
                &["search", "Miami population"],
                &store,
                &["-k", "1", "--json", "--mode", mode],
            )
            .args(["--device", "cpu"]),
            0,
        );
        assert_eq!(hit_sources(&v), ["miami.txt"], "{mode}: {v}");
    }
    // Filters by document and page, and a per-query ef_search.
    let chicago = corpus().join("chicago.txt");
    let v = run_json(
        cmd(
            &["search", "Miami population"],
            &store,
            &["-k", "3", "--json", "--ef-search", "8"],
        )
        .arg("--source")
        .arg(&chicago)
        .args(["--device", "cpu"]),
        0,
    );
    assert_eq!(hit_sources(&v), ["chicago.txt"], "{v}");
    let v = run_json(
        &mut cmd(
            &["search", "Miami"],
            &store,
            &["--json", "--pages", "2-3", "--device", "cpu"],
        ),
        0,
    );
    assert_eq!(
        hit_sources(&v),
        Vec::<String>::new(),
        "text files have no pages: {v}"
    );
    let out = cmd(&["search", "Miami"], &store, &["--pages", "3-2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap refuses a reversed range");

    let info = run_json(
        &mut cmd(&["index", "info"], &store, &["--json", "--documents"]),
        0,
    );
    assert_eq!(info["documents"], 6, "{info}");
    assert_eq!(info["document_list"].as_array().unwrap().len(), 6);
    assert!(info["bytes_on_disk"].is_null());

    // A second ingest skips everything.
    let v = ingest(&store, &[&corpus()]);
    assert_eq!(
        (v["files_unchanged"].as_u64(), v["chunks_added"].as_u64()),
        (Some(6), Some(0))
    );

    // Errors name the store without its password, and say what to do.
    let wrong = format!(
        "postgres://postgres:sw0rdfish@127.0.0.1:{}/postgres?sslmode=disable&schema=nothing_here",
        server.port()
    );
    let out = cmd(&["search", "Miami"], &wrong, &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no index at") && stderr.contains("thinkrag ingest"),
        "{stderr}"
    );
    assert!(!stderr.contains("sw0rdfish"), "{stderr}");
    let out = cmd(
        &["search", "Miami"],
        "postgres://postgres@127.0.0.1:1/x?sslmode=disable",
        &[],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot connect to") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn killing_ingest_leaves_no_half_written_document_and_parallel_ingests_no_duplicates() {
    let server = server();
    let store = server.url("killed");
    let tmp = tempfile::tempdir().unwrap();
    let more = tmp.path().join("more");
    write_reports(&more, 40, 4);
    let bin = assert_cmd::cargo::cargo_bin("thinkrag");
    let spawn = |path: &Path| {
        StdCommand::new(&bin)
            .env("HF_HUB_OFFLINE", "1")
            .env("THINKRAG_EMBEDDER", minilm_dir())
            .env("RAYON_NUM_THREADS", "1")
            .args([
                "ingest",
                "--device",
                "cpu",
                "--threads",
                "1",
                "--store",
                &store,
            ])
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut killed_mid_way = 0;
    for delay_ms in [1500u64, 2500, 4000] {
        let mut child = spawn(&more);
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(delay_ms) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL: no cleanup runs
            killed_mid_way += 1;
        }
        child.wait().unwrap();
        let (docs, _) = assert_documents_whole(&server, "killed");
        assert!(docs <= 40);
    }
    assert!(killed_mid_way > 0, "at least one kill landed mid-ingestion");

    // Two processes finish the job at once: every document once, whole.
    let mut a = spawn(&more);
    let mut b = spawn(&more);
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let (docs, chunks) = assert_documents_whole(&server, "killed");
    assert_eq!(docs, 40);
    let v = ingest(&store, &[&more]);
    assert_eq!(v["files_unchanged"], 40, "{v}");
    assert_eq!(v["total_chunks"].as_i64(), Some(chunks));
}

/// A RAG chat over the store mounted as `docs`; the `rag` extra of the answer.
fn ask_rag(server: &Server, question: &str) -> Value {
    let body = serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 8,
        "temperature": 0,
        "rag": {"index": "docs", "k": 2, "mode": "hybrid"},
    });
    let resp = ureq::post(&server.url("/v1/chat/completions"))
        .set("content-type", "application/json")
        .send_string(&body.to_string())
        .unwrap_or_else(|e| panic!("{e:?}"));
    let v: Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap();
    v["rag"].clone()
}

fn rag_ids(rag: &Value) -> Vec<String> {
    rag["sources"]
        .as_array()
        .unwrap_or_else(|| panic!("{rag}"))
        .iter()
        .map(|s| s["_id"].as_str().unwrap().to_string())
        .collect()
}

/// `thinkrag serve --store` answers RAG requests from an index directory and from PostgreSQL
/// alike, and finds what `thinkrag ingest` adds while it runs.
#[test]
fn serve_answers_from_either_store_and_sees_new_documents() {
    let server = server();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("index");
    for store in [dir.display().to_string(), server.url("served")] {
        ingest(&store, &[&corpus()]);

        let served = Server::start(&["--store", &store]);
        let rag = ask_rag(&served, "How fast is Miami growing?");
        assert_eq!(rag["index"], "docs", "{rag}");
        let ids = rag_ids(&rag);
        assert!(
            ids.iter().any(|i| i.ends_with("miami.txt")),
            "{store}: {rag}"
        );

        let new_doc = tmp.path().join(format!("quinsigamond-{}.md", ids.len()));
        std::fs::write(
            &new_doc,
            "# Lake Quinsigamond\n\nZebra mussels reached Lake Quinsigamond in Worcester, \
             Massachusetts; its outflow, the Quinsigamond River, carries them downstream.\n",
        )
        .unwrap();
        ingest(&store, &[&new_doc]);
        let rag = ask_rag(
            &served,
            "Which river carries the zebra mussels of Lake Quinsigamond?",
        );
        assert!(
            rag_ids(&rag)[0].contains("quinsigamond"),
            "{store}: the document ingested while serving is found: {rag}"
        );
    }
}

/// `thinkrag index copy` moves an index directory into PostgreSQL (and back) without embedding
/// again: the copy finds the same chunks in the same order; re-running copies nothing.
#[test]
fn index_copy_moves_a_directory_into_postgres_and_back() {
    let server = server();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("index").display().to_string();
    let pg = server.url("copied");
    ingest(&dir, &[&corpus()]);
    let copy = |from: &str, to: &str| {
        run_json(
            &mut cmd(&["index", "copy"], from, &["--json", "--to", to]),
            0,
        )
    };
    let r = copy(&dir, &pg);
    assert_eq!(
        (
            r["documents_copied"].as_u64(),
            r["total_documents"].as_u64()
        ),
        (Some(6), Some(6)),
        "{r}"
    );
    let r = copy(&dir, &pg);
    assert_eq!(
        (
            r["documents_copied"].as_u64(),
            r["documents_unchanged"].as_u64()
        ),
        (Some(0), Some(6)),
        "{r}"
    );
    let back = tmp.path().join("back").display().to_string();
    let r = copy(&pg, &back);
    assert_eq!(r["total_chunks"], r["chunks_copied"], "{r}");
    let q = "How is the trend in Miami compared with Chicago?";
    let exact = |store: &str| {
        let v = run_json(
            &mut cmd(
                &["search", q],
                store,
                &["-k", "6", "--exact", "--json", "--device", "cpu"],
            ),
            0,
        );
        v["hits"]["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h["_source"]["source"].clone(), h["_source"]["text"].clone()))
            .collect::<Vec<_>>()
    };
    let original = exact(&dir);
    assert_eq!(original, exact(&pg));
    assert_eq!(original, exact(&back));
}
