//! The pipeline end to end on the committed tiny random-weight Qwen2 and the real
//! all-MiniLM-L6-v2 over the sample corpus: `ask` gives hits, a prompt holding the retrieved
//! chunks in rank order, reasoning and answer; `chat` keeps answers without reasoning in its
//! history, reuses the KV cache of the shared prefix, and drops the oldest turns when the window
//! fills up.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use thinkrag::embed::test_models::minilm_dir;
use thinkrag::embed::{Embedder, EmbedderOptions, EmbedderSource};
use thinkrag::index::SearchMode;
use thinkrag::llm::{
    DTypeChoice, DeviceChoice, Engine, GenerationParams, LoadOptions, ModelFiles, SamplingParams,
};
use thinkrag::{
    AskEvent, AskOptions, IngestOptions, Pipeline, PromptOptions, Retriever, SearchOptions,
    StoreLocation,
};

/// Exact vector search for `k` chunks.
fn exact(k: usize) -> SearchOptions {
    SearchOptions {
        exact: true,
        ..SearchOptions::new(k, SearchMode::Vector)
    }
}

/// Compile-time: what a server shares between threads is `Send + Sync`.
#[allow(dead_code)]
fn shared_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Pipeline>();
    send_sync::<Retriever>();
    send_sync::<Embedder>();
    send_sync::<Engine>();
    send_sync::<thinkrag::llm::Scheduler>();
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const QUESTION: &str = "What's the population increase of New York City from 2021 to 2023? \
How is the trending comparing with Miami?";

fn embedder() -> Embedder {
    let source = EmbedderSource::parse(minilm_dir().to_str().unwrap()).unwrap();
    Embedder::load(&source, &EmbedderOptions::default()).unwrap()
}

/// The sample corpus, ingested into `dir`.
fn build_index(dir: &Path) {
    let report = thinkrag::ingest(
        &dir.into(),
        &[root().join("samples/population")],
        &embedder(),
        &IngestOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(report.files_indexed, 6);
}

fn tiny_engine(context_window: Option<usize>) -> Engine {
    let files = ModelFiles::from_dir(&root().join("tests/fixtures/tiny-qwen2")).unwrap();
    let opts = LoadOptions {
        device: DeviceChoice::Cpu,
        dtype: DTypeChoice::F32,
        context_window,
        ..LoadOptions::default()
    };
    Engine::from_files(files, "tiny-qwen2".into(), None, &opts, &mut |_| {}).unwrap()
}

fn pipeline(dir: &Path, context_window: Option<usize>, prompt: PromptOptions) -> Pipeline {
    let store = StoreLocation::from(dir).open().unwrap();
    let retriever = Retriever::new(store, embedder()).unwrap();
    let params = GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens: 16,
        max_thinking_tokens: Some(6),
        ..GenerationParams::default()
    };
    let options = AskOptions {
        k: 4,
        prompt,
        params: Some(params),
        ..AskOptions::default()
    };
    Pipeline::new(tiny_engine(context_window), Some(retriever), options).unwrap()
}

#[test]
fn ask_retrieves_builds_the_prompt_in_rank_order_and_streams() {
    let tmp = tempfile::tempdir().unwrap();
    build_index(tmp.path());
    let p = pipeline(tmp.path(), None, PromptOptions::default());

    let mut events = Vec::new();
    let (mut reasoning, mut answer_text) = (String::new(), String::new());
    let answer = p
        .ask(QUESTION, &mut |ev| {
            match ev {
                AskEvent::Retrieved(h) => events.push(format!("retrieved {}", h.len())),
                AskEvent::Prompt(_) => events.push("prompt".into()),
                AskEvent::Reasoning(t) => reasoning.push_str(t),
                AskEvent::Answer(t) => answer_text.push_str(t),
                AskEvent::Done(_) => events.push("done".into()),
                AskEvent::TurnsDropped(_) => events.push("dropped".into()),
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(events, ["retrieved 4", "prompt", "done"]);
    assert_eq!(answer.hits.len(), 4);
    let top2: Vec<&str> = answer.hits[..2]
        .iter()
        .map(|h| thinkrag::prompt::display_source(&h.source))
        .collect();
    assert!(
        top2.contains(&"new-york-city.txt") && top2.contains(&"miami.txt"),
        "{top2:?}"
    );

    // Every hit is in the prompt, numbered by rank, in rank order.
    let user = answer.prompt.user_text();
    assert_eq!(answer.prompt.sources.len(), 4);
    let mut last = 0;
    for (i, s) in answer.prompt.sources.iter().enumerate() {
        assert_eq!((s.number, s.rank), (i + 1, i + 1));
        assert_eq!(s.hit.id, answer.hits[i].id);
        let at = user
            .find(s.hit.text.trim())
            .unwrap_or_else(|| panic!("source {} is in the prompt: {user}", s.number));
        assert!(at > last, "source {} comes after the one before", s.number);
        last = at;
        assert!(user.contains(&format!("[{}] ", s.number)));
    }
    assert!(user.ends_with(&format!("Question: {QUESTION}")));

    // The generated part, as streamed.
    let g = &answer.generation;
    assert_eq!(g.reasoning, reasoning);
    assert_eq!(g.text, answer_text);
    assert!(
        !g.reasoning.is_empty(),
        "the reasoning budget forces </think>"
    );
    assert!(g.stop_reason.is_some());
    assert_eq!(g.usage.prompt_tokens, answer.prompt.prompt_tokens);
    assert_eq!(g.usage.completion_tokens, 16.min(g.usage.completion_tokens));
    let limits = p.limits();
    assert!(answer.prompt.prompt_tokens <= limits.window - limits.reserve);
    let t = answer.timings;
    assert!(t.retrieval_ms > 0.0 && t.prefill_ms > 0.0 && t.total_ms >= t.time_to_first_token_ms);
}

#[test]
fn chat_keeps_answers_without_reasoning_and_reuses_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    build_index(tmp.path());
    // Small enough for three turns to fit the tiny model's 4,096-token window.
    let prompt = PromptOptions {
        max_context_tokens: Some(700),
        ..PromptOptions::default()
    };
    let p = pipeline(tmp.path(), None, prompt);
    let mut chat = p.chat();
    let questions = [
        QUESTION,
        "And how did Chicago change?",
        "Which city grew fastest?",
    ];
    let mut answers = Vec::new();
    for q in questions {
        answers.push(chat.send(q, &mut |_| ControlFlow::Continue(())).unwrap());
    }
    assert_eq!(chat.turns(), 3);
    let messages = chat.conversation().messages();
    assert_eq!(messages.len(), 6);

    // What the model reads for turn 3 carries turn 1's and 2's answers, not their reasoning.
    let rendered = p
        .engine()
        .tokenizer()
        .render_chat(&messages[..5], true)
        .unwrap();
    for a in &answers[..2] {
        let g = &a.generation;
        assert!(g.reasoning.trim().len() >= 4, "{:?}", g.reasoning);
        assert!(
            !rendered.contains(g.reasoning.trim()),
            "no reasoning in the history"
        );
        assert!(
            rendered.contains(g.text.trim()),
            "the answer is in the history"
        );
    }
    assert!(rendered.contains(answers[1].prompt.user_text()));

    // Turn 2 computes only what turn 1's prompt did not hold: turn 1's answer and the new
    // question (the cache's `<think>\n` after the assistant marker differs from the history).
    for turn in 1..3 {
        let before = answers[turn - 1].generation.usage;
        let now = answers[turn].generation.usage;
        let computed = now.prompt_tokens - now.cached_prompt_tokens;
        let new_tokens = now.prompt_tokens - before.prompt_tokens;
        eprintln!(
            "turn {}: {} prompt tokens, {} from the cache, {computed} computed, {new_tokens} new",
            turn + 1,
            now.prompt_tokens,
            now.cached_prompt_tokens
        );
        assert!(
            now.cached_prompt_tokens + 3 >= before.prompt_tokens,
            "turn {}: {} of {} cached, the previous prompt had {}",
            turn + 1,
            now.cached_prompt_tokens,
            now.prompt_tokens,
            before.prompt_tokens
        );
        assert!(
            computed <= new_tokens + 3,
            "turn {}: {computed} computed for {new_tokens} new",
            turn + 1
        );
        assert!(computed < now.prompt_tokens / 2);
    }

    chat.reset();
    assert_eq!(chat.turns(), 0);
    let again = chat
        .send("Hello?", &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(again.generation.usage.cached_prompt_tokens, 0);
}

#[test]
fn chat_drops_the_oldest_turns_when_the_window_fills() {
    let tmp = tempfile::tempdir().unwrap();
    build_index(tmp.path());
    let prompt = PromptOptions {
        max_context_tokens: Some(600),
        ..PromptOptions::default()
    };
    let p = pipeline(tmp.path(), Some(1000), prompt);
    let mut chat = p.chat();
    let first = chat
        .send(QUESTION, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert!(
        first.prompt.context_tokens > 500,
        "{}",
        first.prompt.context_tokens
    );
    let mut dropped = Vec::new();
    let second = chat
        .send("And Chicago?", &mut |ev| {
            if let AskEvent::TurnsDropped(n) = ev {
                dropped.push(n);
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(dropped, [1], "said when it happens");
    assert_eq!(chat.turns(), 1);
    assert!(second.prompt.prompt_tokens <= 1000 - 16);
    assert!(
        second.prompt.context_tokens > 500,
        "the new turn's sources keep their room"
    );
}

#[test]
fn a_failed_or_cancelled_chat_turn_loses_no_history() {
    let tmp = tempfile::tempdir().unwrap();
    build_index(tmp.path());
    let p = pipeline(tmp.path(), Some(4000), PromptOptions::default());
    let mut chat = p.chat();
    for q in [QUESTION, "And Chicago?"] {
        chat.send(q, &mut |_| ControlFlow::Continue(())).unwrap();
    }
    let before = chat.conversation().messages().to_vec();
    assert_eq!(chat.turns(), 2);

    // A question longer than the whole window: the loop drops both earlier turns looking for
    // room and still fails; the history must be what it was.
    let huge = "Seattle population growth statistics. ".repeat(400);
    let err = chat
        .send(&huge, &mut |_| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(
        matches!(err, thinkrag::Error::PromptTooLong { .. }),
        "{err}"
    );
    assert_eq!(chat.conversation().messages(), &before[..]);

    // A turn cancelled at its first event records nothing either.
    let cancelled = chat
        .send("Which is larger?", &mut |_| ControlFlow::Break(()))
        .unwrap();
    assert_eq!(
        cancelled.generation.stop_reason,
        Some(thinkrag::llm::StopReason::Cancelled)
    );
    assert_eq!(chat.conversation().messages(), &before[..]);

    // And the conversation goes on from there, reusing its cache.
    let next = chat
        .send("Which is larger?", &mut |_| ControlFlow::Continue(()))
        .unwrap();
    let messages = chat.conversation().messages();
    assert!(
        messages[messages.len() - 2]
            .content
            .contains("Which is larger?"),
        "{messages:?}"
    );
    assert!(next.generation.usage.cached_prompt_tokens > 0);
}

/// A running pipeline searches documents ingested into its index after it started (another
/// process's save, a new generation), and keeps searching the old generation when the new one
/// cannot be opened.
#[test]
fn a_running_pipeline_sees_documents_ingested_after_it_started() {
    let dir = tempfile::tempdir().unwrap();
    build_index(dir.path());
    let p = pipeline(dir.path(), None, PromptOptions::default());
    let retriever = p.retriever().unwrap();
    let before = retriever.store().stats().unwrap().chunks;
    let question = "Which river carries the zebra mussels of Lake Quinsigamond?";
    let hits = retriever.search(question, &exact(3)).unwrap();
    assert!(hits.iter().all(|h| !h.source.contains("quinsigamond")));

    // Another ingest (as `thinkrag ingest` in another process would) adds a document.
    let docs = tempfile::tempdir().unwrap();
    let new_doc = docs.path().join("quinsigamond.md");
    std::fs::write(
        &new_doc,
        "# Lake Quinsigamond\n\nZebra mussels reached Lake Quinsigamond in Worcester, \
         Massachusetts; its outflow, the Quinsigamond River, carries them downstream.\n",
    )
    .unwrap();
    let report = thinkrag::ingest(
        &dir.path().into(),
        &[new_doc],
        &embedder(),
        &IngestOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(report.files_indexed, 1);

    let hits = retriever.search(question, &exact(3)).unwrap();
    assert!(
        hits[0].source.contains("quinsigamond"),
        "the new document is found: {:?}",
        hits.iter().map(|h| &h.source).collect::<Vec<_>>()
    );
    assert!(retriever.store().stats().unwrap().chunks > before);
    assert!(!retriever.refresh(), "nothing newer to take up");

    // A manifest naming a generation that is not there: the index's own recovery opens the
    // newest intact one, and searching goes on.
    let manifest = dir.path().join("index.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let current = thinkrag::index::Index::current_generation(dir.path()).unwrap();
    std::fs::write(&manifest, text.replace(&current, "gen-999999")).unwrap();
    let hits = retriever.search(question, &exact(3)).unwrap();
    assert!(hits[0].source.contains("quinsigamond"));
    // An index directory gone altogether: nothing to take up, the loaded one keeps answering.
    std::fs::remove_dir_all(dir.path()).unwrap();
    assert!(!retriever.refresh());
    let hits = retriever.search(question, &exact(3)).unwrap();
    assert!(hits[0].source.contains("quinsigamond"));
}
