//! Retrieval-augmented answers: retrieve the chunks nearest to a question, build the prompt,
//! and stream the model's reasoning and answer; one-shot ([`Pipeline::ask`]) or as a
//! conversation that reuses the KV cache between turns ([`Chat`]).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use thinkrag_embed::{Embedder, EmbedderOptions, EmbedderSource, Reranker};
use thinkrag_index::{ChunkStore, SearchFilter, SearchMode};
use thinkrag_llm::{
    Conversation, Engine, Event, Generation, GenerationParams, LoadOptions, Message, ModelSource,
};

use crate::error::{Error, Result};
use crate::prompt::{build_prompt, citations, BuiltPrompt, PromptLimits, PromptOptions};
use crate::retrieval::{
    default_index_dir, embedder_info, search_reranked, SearchHit, SearchOptions,
};
use crate::store::StoreLocation;

/// A chunk store and the embedder that built it, checked to belong together and to hold
/// chunks. It follows the store: documents another process ingests are found without a restart
/// (an index directory's new generation is taken up on the next search; PostgreSQL is always
/// read as committed).
pub struct Retriever {
    store: Box<dyn ChunkStore>,
    embedder: Embedder,
    reranker: Option<(Arc<Reranker>, usize)>,
}

impl std::fmt::Debug for Retriever {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retriever")
            .field("store", &self.store.location())
            .field("embedder", &self.embedder.spec().model)
            .field("reranker", &self.reranker.as_ref().map(|(_, n)| n))
            .finish()
    }
}

impl Retriever {
    /// Joins an opened store and a loaded embedder: an error when the store is empty or was
    /// built by another embedder.
    pub fn new(store: Box<dyn ChunkStore>, embedder: Embedder) -> Result<Self> {
        if store.stats()?.chunks == 0 {
            return Err(Error::EmptyIndex {
                location: store.location(),
            });
        }
        store.check_embedder(&embedder_info(embedder.spec()))?;
        Ok(Self {
            store,
            embedder,
            reranker: None,
        })
    }

    /// Opens the store at `location` and loads `embedder`, or the one the store was built with.
    pub fn open(
        location: &StoreLocation,
        embedder: Option<&str>,
        opts: &EmbedderOptions,
    ) -> Result<Self> {
        let store = location.open_nonempty()?;
        let info = store.embedder();
        let spec = embedder
            .map(str::to_string)
            .or_else(|| info.source.clone())
            .unwrap_or_else(|| info.model.clone());
        let embedder = Embedder::load(&EmbedderSource::parse(&spec)?, opts)?;
        Self::new(store, embedder)
    }

    /// Where the chunks are (a directory, or a URL without its password).
    pub fn location(&self) -> String {
        self.store.location()
    }

    /// The store.
    pub fn store(&self) -> &dyn ChunkStore {
        self.store.as_ref()
    }

    /// Takes up what other processes committed to the store since the last search; returns
    /// whether anything changed. A store that changed but cannot be read is reported and the
    /// previous state searched.
    pub fn refresh(&self) -> bool {
        match self.store.refresh() {
            Ok(changed) => changed,
            Err(e) => {
                tracing::warn!(store = %self.store.location(), error = %e, "the index changed on disk but cannot be opened; searching the previous generation");
                false
            }
        }
    }

    /// The embedder that embeds questions.
    pub fn embedder(&self) -> &Embedder {
        &self.embedder
    }

    /// Reranks what this retriever finds with `reranker`: `candidates` chunks are retrieved
    /// and the best `k` of them by the cross-encoder kept.
    pub fn with_reranker(mut self, reranker: Arc<Reranker>, candidates: usize) -> Self {
        self.reranker = Some((reranker, candidates.max(1)));
        self
    }

    /// The chunks that best match `query`, after taking up what other processes ingested;
    /// reranked when the retriever has a reranker.
    pub fn search(&self, query: &str, opts: &SearchOptions) -> Result<Vec<SearchHit>> {
        self.refresh();
        let reranker = self.reranker.as_ref().map(|(r, n)| (r.as_ref(), *n));
        search_reranked(self.store.as_ref(), &self.embedder, query, opts, reranker)
    }
}

/// How questions are answered.
#[derive(Debug, Clone)]
pub struct AskOptions {
    /// How many chunks to retrieve.
    pub k: usize,
    /// Exact (brute-force) search instead of HNSW.
    pub exact: bool,
    /// Vector, lexical (BM25) or hybrid retrieval.
    pub mode: SearchMode,
    /// Which documents and pages may be retrieved.
    pub filter: SearchFilter,
    /// The HNSW candidate list size (default: the store's choice).
    pub ef_search: Option<usize>,
    /// How the prompt is built.
    pub prompt: PromptOptions,
    /// Sampling and stopping (`None`: the model's defaults).
    pub params: Option<GenerationParams>,
    /// Tokens of the context window kept for the reasoning and answer (`None`: `max_tokens`,
    /// at most half the window).
    pub answer_reserve: Option<usize>,
}

impl AskOptions {
    /// The retrieval part of these options.
    pub fn search_options(&self) -> SearchOptions {
        SearchOptions {
            k: self.k,
            mode: self.mode,
            exact: self.exact,
            filter: self.filter.clone(),
            ef_search: self.ef_search,
        }
    }
}

impl Default for AskOptions {
    fn default() -> Self {
        Self {
            k: 4,
            exact: false,
            filter: SearchFilter::default(),
            ef_search: None,
            mode: SearchMode::Vector,
            prompt: PromptOptions::default(),
            params: None,
            answer_reserve: None,
        }
    }
}

/// What [`Pipeline::ask`] and [`Chat::send`] report as they go.
#[derive(Debug, Clone, Copy)]
pub enum AskEvent<'a> {
    /// The retrieved chunks, best first (before the prompt is built).
    Retrieved(&'a [SearchHit]),
    /// Oldest turns dropped from a conversation to make room.
    TurnsDropped(usize),
    /// The prompt, before generation starts.
    Prompt(&'a BuiltPrompt),
    /// More reasoning text.
    Reasoning(&'a str),
    /// More answer text.
    Answer(&'a str),
    /// The end.
    Done(&'a Answer),
}

/// Where the time of one answer went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct AskTimings {
    /// Embedding the question and searching the index.
    pub retrieval_ms: f64,
    /// Building the prompt (token counting included).
    pub prompt_ms: f64,
    /// Computing the uncached part of the prompt.
    pub prefill_ms: f64,
    /// From the call to the first generated token (reasoning or answer).
    pub time_to_first_token_ms: f64,
    /// From the call to the first token of the answer, when there was one.
    pub time_to_first_answer_token_ms: Option<f64>,
    /// From the first generated token to the last.
    pub decode_ms: f64,
    /// Generated tokens per second after the first.
    pub decode_tokens_per_s: f64,
    /// The whole call.
    pub total_ms: f64,
}

/// One answer, with what it was given.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// The question.
    pub question: String,
    /// Every retrieved chunk, best first (some may have been left out of the prompt).
    pub hits: Vec<SearchHit>,
    /// The prompt: its messages, the sources it holds and what was left out.
    pub prompt: BuiltPrompt,
    /// The reasoning, the answer, the stop reason and the token counts.
    pub generation: Generation,
    /// The source numbers the answer cites, in order of first citation.
    pub citations: Vec<usize>,
    /// Where the time went.
    pub timings: AskTimings,
}

/// Answers questions over an index with a reasoning model.
#[derive(Debug)]
pub struct Pipeline {
    engine: Engine,
    retriever: Option<Retriever>,
    options: AskOptions,
}

impl Pipeline {
    /// A pipeline over loaded parts; `retriever: None` asks the model alone.
    pub fn new(engine: Engine, retriever: Option<Retriever>, options: AskOptions) -> Result<Self> {
        if options.k == 0 || options.k > 1000 {
            return Err(Error::InvalidParameter {
                name: "k",
                value: options.k.to_string(),
                expected: "1..=1000".into(),
            });
        }
        options.prompt.validate()?;
        if let Some(p) = &options.params {
            p.validate()?;
        }
        Ok(Self {
            engine,
            retriever,
            options,
        })
    }

    /// A builder that loads the parts by name.
    pub fn builder() -> PipelineBuilder {
        PipelineBuilder::default()
    }

    /// The language model.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The index and embedder, unless the pipeline asks the model alone.
    pub fn retriever(&self) -> Option<&Retriever> {
        self.retriever.as_ref()
    }

    /// The options.
    pub fn options(&self) -> &AskOptions {
        &self.options
    }

    /// The generation parameters in use.
    pub fn params(&self) -> GenerationParams {
        self.options
            .params
            .clone()
            .unwrap_or_else(|| self.engine.default_params())
    }

    /// The room a prompt has: the context window less what is kept for the answer.
    pub fn limits(&self) -> PromptLimits {
        let window = self.engine.context_window();
        let reserve = self
            .options
            .answer_reserve
            .unwrap_or_else(|| self.params().max_tokens.min(window / 2));
        PromptLimits { window, reserve }
    }

    /// The chunks nearest to `query` (empty without a retriever).
    pub fn search(&self, query: &str) -> Result<Vec<SearchHit>> {
        match &self.retriever {
            Some(r) => r.search(query, &self.options.search_options()),
            None => Ok(Vec::new()),
        }
    }

    /// The prompt `question` would get after `history` (what `--show-prompt` prints).
    pub fn build_prompt(
        &self,
        question: &str,
        hits: &[SearchHit],
        history: &[Message],
    ) -> Result<BuiltPrompt> {
        build_prompt(
            question,
            hits,
            history,
            &self.options.prompt,
            self.limits(),
            &self.engine,
        )
    }

    /// Answers `question`: retrieves, builds the prompt, and streams the reasoning and the
    /// answer through `on_event` (return `Break` to stop generating; the answer so far is kept).
    pub fn ask(
        &self,
        question: &str,
        on_event: &mut dyn FnMut(AskEvent<'_>) -> ControlFlow<()>,
    ) -> Result<Answer> {
        let started = Instant::now();
        let hits = self.search(question)?;
        let retrieval_ms = ms(started);
        let _ = on_event(AskEvent::Retrieved(&hits));
        let prompt_started = Instant::now();
        let prompt = self.build_prompt(question, &hits, &[])?;
        let retrieved = Retrieved {
            hits,
            started,
            retrieval_ms,
            prompt_ms: ms(prompt_started),
        };
        self.generate_answer(
            question,
            retrieved,
            prompt,
            on_event,
            |prompt, params, cb| self.engine.generate(&prompt.messages, params, cb),
        )
    }

    /// Announces the prompt, streams the generation `generate` runs, and assembles the answer.
    fn generate_answer(
        &self,
        question: &str,
        retrieved: Retrieved,
        prompt: BuiltPrompt,
        on_event: &mut dyn FnMut(AskEvent<'_>) -> ControlFlow<()>,
        generate: impl FnOnce(
            &BuiltPrompt,
            &GenerationParams,
            &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
        ) -> thinkrag_llm::Result<Generation>,
    ) -> Result<Answer> {
        let _ = on_event(AskEvent::Prompt(&prompt));
        let params = self.params();
        let (generation, first_answer) = stream(on_event, |cb| generate(&prompt, &params, cb))?;
        Ok(finish(
            question,
            retrieved,
            prompt,
            generation,
            first_answer,
            on_event,
        ))
    }

    /// A conversation over the index.
    pub fn chat(&self) -> Chat<'_> {
        let mut chat = Chat {
            pipeline: self,
            conversation: Conversation::new(&self.engine),
            last: None,
        };
        chat.reset();
        chat
    }
}

/// Runs a generation, passing its text on as [`AskEvent`]s and noting when the answer began.
fn stream(
    on_event: &mut dyn FnMut(AskEvent<'_>) -> ControlFlow<()>,
    generate: impl FnOnce(
        &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> thinkrag_llm::Result<Generation>,
) -> Result<(Generation, Option<Instant>)> {
    let mut first_answer = None;
    let generation = generate(&mut |ev| match ev {
        Event::Reasoning(t) => on_event(AskEvent::Reasoning(t)),
        Event::Answer(t) => {
            first_answer.get_or_insert_with(Instant::now);
            on_event(AskEvent::Answer(t))
        }
        Event::Done(_) => ControlFlow::Continue(()),
    })?;
    Ok((generation, first_answer))
}

/// What came before generation: the hits, and when and how long retrieval and prompt took.
struct Retrieved {
    hits: Vec<SearchHit>,
    started: Instant,
    retrieval_ms: f64,
    prompt_ms: f64,
}

/// The answer from its parts, announced with [`AskEvent::Done`].
fn finish(
    question: &str,
    retrieved: Retrieved,
    prompt: BuiltPrompt,
    generation: Generation,
    first_answer: Option<Instant>,
    on_event: &mut dyn FnMut(AskEvent<'_>) -> ControlFlow<()>,
) -> Answer {
    let t = generation.timings;
    let started = retrieved.started;
    let timings = AskTimings {
        retrieval_ms: retrieved.retrieval_ms,
        prompt_ms: retrieved.prompt_ms,
        prefill_ms: t.prefill_ms,
        time_to_first_token_ms: retrieved.retrieval_ms
            + retrieved.prompt_ms
            + t.time_to_first_token_ms,
        time_to_first_answer_token_ms: first_answer
            .map(|at| at.duration_since(started).as_secs_f64() * 1e3),
        decode_ms: t.decode_ms,
        decode_tokens_per_s: t.decode_tokens_per_s,
        total_ms: ms(started),
    };
    let answer = Answer {
        question: question.to_string(),
        citations: citations(&generation.text, prompt.sources.len()),
        hits: retrieved.hits,
        prompt,
        generation,
        timings,
    };
    let _ = on_event(AskEvent::Done(&answer));
    answer
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// A multi-turn conversation over the index: each turn retrieves afresh, the history carries the
/// earlier questions with their sources and the answers without their reasoning (the chat
/// template drops it), and the KV cache of the shared prefix is reused. The oldest turns are
/// dropped when the window fills up.
#[derive(Debug)]
pub struct Chat<'p> {
    pipeline: &'p Pipeline,
    conversation: Conversation,
    last: Option<Answer>,
}

impl Chat<'_> {
    /// Forgets the conversation (the system prompt, if any, stays).
    pub fn reset(&mut self) {
        self.conversation.reset();
        if let Some(system) = &self.pipeline.options.prompt.system {
            self.conversation.set_system(system.clone());
        }
        self.last = None;
    }

    /// The last turn's answer.
    pub fn last_answer(&self) -> Option<&Answer> {
        self.last.as_ref()
    }

    /// The conversation: its messages and the session whose cache it reuses.
    pub fn conversation(&self) -> &Conversation {
        &self.conversation
    }

    /// How many question-and-answer turns the history holds.
    pub fn turns(&self) -> usize {
        self.conversation
            .messages()
            .iter()
            .filter(|m| m.role == thinkrag_llm::Role::User)
            .count()
    }

    /// Asks the next question.
    pub fn send(
        &mut self,
        question: &str,
        on_event: &mut dyn FnMut(AskEvent<'_>) -> ControlFlow<()>,
    ) -> Result<Answer> {
        let p = self.pipeline;
        let started = Instant::now();
        let hits = p.search(question)?;
        let retrieval_ms = ms(started);
        let _ = on_event(AskEvent::Retrieved(&hits));
        let prompt_started = Instant::now();
        let wanted_budget = p.options.prompt.max_context_tokens.unwrap_or(usize::MAX);
        // Turns are dropped from a copy: the conversation forgets them only if this turn
        // succeeds, so a question too long even for an empty history loses nothing.
        let mut history = self.conversation.messages().to_vec();
        let mut dropped = 0;
        let prompt = loop {
            let has_turns = history.iter().any(|m| m.role == thinkrag_llm::Role::User);
            match p.build_prompt(question, &hits, &history) {
                // The history squeezed the sources: older turns matter less than this turn's
                // sources.
                Ok(built)
                    if has_turns
                        && built.context_budget < wanted_budget
                        && built.budget_limited =>
                {
                    thinkrag_llm::drop_oldest_turns(&mut history, 1);
                    dropped += 1;
                }
                Err(Error::PromptTooLong { .. }) if has_turns => {
                    thinkrag_llm::drop_oldest_turns(&mut history, 1);
                    dropped += 1;
                }
                other => break other?,
            }
        };
        let retrieved = Retrieved {
            hits,
            started,
            retrieval_ms,
            prompt_ms: ms(prompt_started),
        };
        if dropped > 0 {
            let _ = on_event(AskEvent::TurnsDropped(dropped));
        }
        let conversation = &mut self.conversation;
        let answer = p.generate_answer(
            question,
            retrieved,
            prompt,
            on_event,
            |prompt, params, cb| {
                conversation.send_dropping_oldest(
                    &p.engine,
                    dropped,
                    prompt.user_text(),
                    params,
                    cb,
                )
            },
        )?;
        self.last = Some(answer.clone());
        Ok(answer)
    }
}

/// Loads a [`Pipeline`]'s parts by name: the model, the index and its embedder.
#[derive(Debug, Default)]
pub struct PipelineBuilder {
    model: Option<String>,
    load: LoadOptions,
    store: Option<StoreLocation>,
    no_retrieval: bool,
    embedder: Option<String>,
    embedder_options: Option<EmbedderOptions>,
    options: AskOptions,
}

impl PipelineBuilder {
    /// The language model: a directory, a built-in name or a hub repo (default:
    /// deepseek-r1-distill-qwen-1.5b).
    pub fn model(mut self, spec: impl Into<String>) -> Self {
        self.model = Some(spec.into());
        self
    }

    /// How the language model loads (device, dtype, context window, hub access).
    pub fn load_options(mut self, load: LoadOptions) -> Self {
        self.load = load;
        self
    }

    /// The index directory (default: [`default_index_dir`]).
    pub fn index(mut self, dir: impl Into<PathBuf>) -> Self {
        self.store = Some(StoreLocation::Dir(dir.into()));
        self
    }

    /// The chunk store: an index directory or a PostgreSQL database.
    pub fn store(mut self, location: StoreLocation) -> Self {
        self.store = Some(location);
        self
    }

    /// Ask the model alone, without an index.
    pub fn no_retrieval(mut self) -> Self {
        self.no_retrieval = true;
        self
    }

    /// The embedder (default: the one the index was built with).
    pub fn embedder(mut self, spec: impl Into<String>) -> Self {
        self.embedder = Some(spec.into());
        self
    }

    /// How the embedder loads and embeds.
    pub fn embedder_options(mut self, opts: EmbedderOptions) -> Self {
        self.embedder_options = Some(opts);
        self
    }

    /// How many chunks to retrieve.
    pub fn k(mut self, k: usize) -> Self {
        self.options.k = k;
        self
    }

    /// Exact search instead of HNSW.
    pub fn exact(mut self, exact: bool) -> Self {
        self.options.exact = exact;
        self
    }

    /// Vector, lexical (BM25) or hybrid retrieval.
    pub fn mode(mut self, mode: SearchMode) -> Self {
        self.options.mode = mode;
        self
    }

    /// How the prompt is built.
    pub fn prompt(mut self, prompt: PromptOptions) -> Self {
        self.options.prompt = prompt;
        self
    }

    /// Sampling and stopping.
    pub fn params(mut self, params: GenerationParams) -> Self {
        self.options.params = Some(params);
        self
    }

    /// Every answer option at once.
    pub fn options(mut self, options: AskOptions) -> Self {
        self.options = options;
        self
    }

    /// Loads the index and embedder first (they fail faster), then the model.
    pub fn build(self) -> Result<Pipeline> {
        let retriever = if self.no_retrieval {
            None
        } else {
            let location = self
                .store
                .unwrap_or_else(|| StoreLocation::Dir(default_index_dir()));
            let opts = self.embedder_options.unwrap_or_default();
            Some(Retriever::open(&location, self.embedder.as_deref(), &opts)?)
        };
        let model = self
            .model
            .unwrap_or_else(|| thinkrag_llm::ModelManifest::default_model().to_string());
        let engine = Engine::load(&ModelSource::parse(&model)?, &self.load, &mut |_| {})?;
        Pipeline::new(engine, retriever, self.options)
    }
}
