//! Ingest, search, ask and a running retriever behave the same on both chunk stores: an index
//! directory and PostgreSQL + pgvector (a real server started for these tests on a loopback port
//! and stopped at the end). Real all-MiniLM-L6-v2 embeddings of the sample corpus; the answers
//! come from the committed tiny random-weight Qwen2.

use std::path::{Path, PathBuf};

use thinkrag::embed::test_models::minilm_dir;
use thinkrag::embed::{Embedder, EmbedderOptions, EmbedderSource};
use thinkrag::index::{SearchFilter, SearchMode};
use thinkrag::llm::{
    DTypeChoice, DeviceChoice, Engine, GenerationParams, LoadOptions, ModelFiles, SamplingParams,
};
use thinkrag::pgstore::test_server::TestServer;
use thinkrag::pgstore::PgOptions;
use thinkrag::{
    AskOptions, IngestOptions, IngestReport, Pipeline, PromptOptions, Retriever, SearchHit,
    SearchOptions, StoreLocation,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn embedder() -> Embedder {
    let source = EmbedderSource::parse(minilm_dir().to_str().unwrap()).unwrap();
    Embedder::load(&source, &EmbedderOptions::default()).unwrap()
}

fn ingest(location: &StoreLocation, paths: &[PathBuf], prune: bool) -> IngestReport {
    let opts = IngestOptions {
        prune,
        ..IngestOptions::default()
    };
    thinkrag::ingest(location, paths, &embedder(), &opts, &mut |_| {}).unwrap()
}

fn postgres(server: &TestServer, schema: &str) -> StoreLocation {
    StoreLocation::parse(&server.url(schema), PgOptions::default())
}

/// Copies the sample corpus where the test may change it.
fn corpus_copy(dir: &Path) -> PathBuf {
    let to = dir.join("population");
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(root().join("samples/population")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    to
}

fn search(location: &StoreLocation, query: &str, opts: &SearchOptions) -> Vec<SearchHit> {
    let store = location.open().unwrap();
    thinkrag::search(store.as_ref(), &embedder(), query, opts).unwrap()
}

/// What a hit is, whichever store found it (ids are each store's own).
fn key(h: &SearchHit) -> (String, Option<u32>, usize, usize) {
    (h.source.clone(), h.page, h.start, h.end)
}

const QUESTIONS: &[&str] = &[
    "What's the population increase of New York City from 2021 to 2023?",
    "How is the trend in Miami?",
    "Which metro areas grew fastest?",
    "domestic migration",
];

#[test]
fn ingest_search_and_ask_behave_the_same_on_both_stores() {
    let server = TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    let work = tempfile::tempdir().unwrap();
    let corpus = corpus_copy(work.path());
    let stores = [
        StoreLocation::Dir(work.path().join("index")),
        postgres(&server, "conformance"),
    ];

    // Nothing there yet: both say so the same way.
    for s in &stores {
        let e = s.open().unwrap_err();
        assert!(matches!(e, thinkrag::Error::NoIndex { .. }), "{e}");
    }

    // Ingest: the same files, chunks and totals; a second run skips every file.
    let reports: Vec<IngestReport> = stores
        .iter()
        .map(|s| ingest(s, std::slice::from_ref(&corpus), false))
        .collect();
    for r in &reports {
        assert_eq!(r.files_indexed, 6);
        assert_eq!(r.chunks_added, reports[0].chunks_added);
        assert_eq!(r.total_chunks, reports[0].chunks_added);
        assert_eq!(r.total_documents, 6);
    }
    for s in &stores {
        let again = ingest(s, std::slice::from_ref(&corpus), false);
        assert_eq!((again.files_unchanged, again.chunks_added), (6, 0));
    }

    // Exact vector search: the same chunks, same order, same cosines.
    for q in QUESTIONS {
        let opts = SearchOptions {
            exact: true,
            ..SearchOptions::new(5, SearchMode::Vector)
        };
        let (a, b) = (search(&stores[0], q, &opts), search(&stores[1], q, &opts));
        assert_eq!(
            a.iter().map(key).collect::<Vec<_>>(),
            b.iter().map(key).collect::<Vec<_>>(),
            "{q}"
        );
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x.score - y.score).abs() < 1e-5,
                "{q}: {} vs {}",
                x.score,
                y.score
            );
            assert_eq!(x.text, y.text);
        }
        // And the approximate path of each store agrees with its exact one on this size.
        let approx = SearchOptions::new(5, SearchMode::Vector);
        assert_eq!(
            search(&stores[1], q, &approx)
                .iter()
                .map(key)
                .collect::<Vec<_>>(),
            b.iter().map(key).collect::<Vec<_>>()
        );
    }
    // Lexical: both find the chunks with the words; the best one is the same document.
    for q in ["Miami", "New York City population 2023"] {
        let opts = SearchOptions::new(5, SearchMode::Lexical);
        let (a, b) = (search(&stores[0], q, &opts), search(&stores[1], q, &opts));
        assert!(!a.is_empty() && !b.is_empty(), "{q}");
        assert_eq!(a[0].source, b[0].source, "{q}");
        for h in a.iter().chain(&b) {
            assert!(h.lexical_score.is_some() && h.vector_score.is_none());
        }
    }
    // Hybrid: fused the same way; both report both scores where both lists found a chunk.
    for q in QUESTIONS {
        let opts = SearchOptions {
            exact: true,
            ..SearchOptions::new(4, SearchMode::Hybrid)
        };
        for s in &stores {
            let hits = search(s, q, &opts);
            assert_eq!(hits.len(), 4, "{q}");
            assert!(hits.iter().all(|h| h.vector_score.is_some()));
            assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        }
    }
    // Filters: one document, a page range that text files do not have.
    let one = std::path::absolute(corpus.join("miami.txt"))
        .unwrap()
        .display()
        .to_string();
    for mode in [SearchMode::Vector, SearchMode::Lexical, SearchMode::Hybrid] {
        let opts = SearchOptions {
            filter: SearchFilter {
                sources: vec![one.clone()],
                pages: None,
            },
            ..SearchOptions::new(3, mode)
        };
        let (a, b) = (
            search(&stores[0], "population", &opts),
            search(&stores[1], "population", &opts),
        );
        assert!(!a.is_empty(), "{mode}");
        assert_eq!(a.len(), b.len(), "{mode}");
        assert!(a.iter().chain(&b).all(|h| h.source == one));
        let paged = SearchOptions {
            filter: SearchFilter {
                sources: vec![],
                pages: Some((1, 2)),
            },
            ..SearchOptions::new(3, mode)
        };
        assert!(search(&stores[1], "population", &paged).is_empty());
        assert!(search(&stores[0], "population", &paged).is_empty());
    }

    // Ask: the same retrieval gives the same prompt and the same greedy answer.
    let answers: Vec<_> = stores
        .iter()
        .map(|s| {
            let retriever = Retriever::new(s.open().unwrap(), embedder()).unwrap();
            let params = GenerationParams {
                sampling: SamplingParams::greedy(),
                max_tokens: 12,
                max_thinking_tokens: Some(4),
                ..GenerationParams::default()
            };
            let options = AskOptions {
                k: 3,
                exact: true,
                prompt: PromptOptions::default(),
                params: Some(params),
                ..AskOptions::default()
            };
            let p = Pipeline::new(tiny_engine(), Some(retriever), options).unwrap();
            let asked = p
                .ask(QUESTIONS[0], &mut |_| std::ops::ControlFlow::Continue(()))
                .unwrap();
            // Chat: two turns, each retrieving afresh from the store.
            let mut chat = p.chat();
            let turns: Vec<_> = QUESTIONS[1..3]
                .iter()
                .map(|q| {
                    chat.send(q, &mut |_| std::ops::ControlFlow::Continue(()))
                        .unwrap()
                })
                .collect();
            (asked, turns)
        })
        .collect();
    let (ask_a, chat_a) = &answers[0];
    let (ask_b, chat_b) = &answers[1];
    assert_eq!(ask_a.prompt.messages, ask_b.prompt.messages);
    assert_eq!(ask_a.generation.tokens, ask_b.generation.tokens);
    for (a, b) in chat_a.iter().zip(chat_b) {
        assert_eq!(a.prompt.messages, b.prompt.messages);
        assert_eq!(a.generation.tokens, b.generation.tokens);
        assert!(!a.hits.is_empty());
    }

    // A changed file is re-read whole (its old chunks gone), a deleted one pruned: the same on both.
    let changed = corpus.join("miami.txt");
    std::fs::write(
        &changed,
        "# Replaced\n\nThis document now speaks only of zebra mussels.\n",
    )
    .unwrap();
    let gone = corpus.join("austin.txt");
    std::fs::remove_file(&gone).unwrap();
    let mut totals = Vec::new();
    for s in &stores {
        let r = ingest(s, std::slice::from_ref(&corpus), true);
        assert_eq!((r.files_indexed, r.files_unchanged), (1, 4));
        assert_eq!(r.documents_pruned.len(), 1);
        assert_eq!(r.total_documents, 5);
        let hits = search(
            s,
            "zebra mussels",
            &SearchOptions::new(10, SearchMode::Lexical),
        );
        assert_eq!(hits.len(), 1, "the replaced document's old chunks are gone");
        totals.push(r.total_chunks);
    }
    assert_eq!(totals[0], totals[1]);

    // Another embedder is refused by both, naming both models.
    let mut other = thinkrag::embedder_info(embedder().spec());
    other.model = "BAAI/bge-base-en-v1.5".into();
    other.dim = 768;
    for s in &stores {
        let e = s.open_or_create(&other).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("bge-base-en-v1.5"), "{e}");
    }
}

#[test]
fn a_running_retriever_on_postgres_sees_what_other_processes_ingest() {
    let server = TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    let work = tempfile::tempdir().unwrap();
    let location = postgres(&server, "live");
    ingest(&location, &[root().join("samples/population")], false);
    let retriever = Retriever::new(location.open().unwrap(), embedder()).unwrap();
    let question = "Which river carries the zebra mussels of Lake Quinsigamond?";
    let opts = SearchOptions::new(3, SearchMode::Hybrid);
    let before = retriever.search(question, &opts).unwrap();
    assert!(before.iter().all(|h| !h.source.contains("quinsigamond")));

    let new_doc = work.path().join("quinsigamond.md");
    std::fs::write(
        &new_doc,
        "# Lake Quinsigamond\n\nZebra mussels reached Lake Quinsigamond in Worcester, \
         Massachusetts; its outflow, the Quinsigamond River, carries them downstream.\n",
    )
    .unwrap();
    // Another store instance: its own connections, as another process would have.
    ingest(&location, &[new_doc], false);
    let after = retriever.search(question, &opts).unwrap();
    assert!(after[0].source.contains("quinsigamond"), "{after:?}");
}

fn tiny_engine() -> Engine {
    let files = ModelFiles::from_dir(&root().join("tests/fixtures/tiny-qwen2")).unwrap();
    let opts = LoadOptions {
        device: DeviceChoice::Cpu,
        dtype: DTypeChoice::F32,
        ..LoadOptions::default()
    };
    Engine::from_files(files, "tiny-qwen2".into(), None, &opts, &mut |_| {}).unwrap()
}
