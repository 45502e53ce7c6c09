//! Retrieval-augmented answers over the server's document collections, shared by OpenSearch's
//! `retrieval_augmented_generation` search processor and RAG through the OpenAI chat API: the
//! retrieved documents become numbered sources in the prompt (thinkrag's prompt builder, which
//! keeps them within the context window), the answer is generated on the scheduler like any
//! request, and the sources it cites are reported.

use serde_json::{json, Value};
use thinkrag::prompt::{build_prompt, citations, PromptLimits};
use thinkrag::{BuiltPrompt, PromptOptions, SearchHit, SourceField};
use thinkrag_llm::{Generation, GenerationParams, Message};

use crate::error::{ApiError, Flavor, Kind};
use crate::AppState;

/// Asks the model to cite, so that the answer can be traced to its sources.
pub const CITE: &str = "Cite each source you use as [n] right after the statement it supports.";

/// A retrieved document offered to the model.
#[derive(Debug, Clone)]
pub struct RagSource {
    /// The collection it came from.
    pub index: String,
    /// Its id.
    pub id: String,
    /// Its search score.
    pub score: f32,
    /// The text that goes into the prompt.
    pub text: String,
}

/// What to answer and how.
#[derive(Debug, Clone, Default)]
pub struct RagRequest {
    /// The question.
    pub question: String,
    /// The retrieved documents, best first.
    pub sources: Vec<RagSource>,
    /// A system prompt.
    pub system: Option<String>,
    /// Instructions before the sources (thinkrag's default when `None`); [`CITE`] is added.
    pub instructions: Option<String>,
    /// How many sources may go in (all when `None`).
    pub context_size: Option<usize>,
    /// Earlier turns (answers only).
    pub history: Vec<Message>,
}

/// A prompt ready to generate from.
#[derive(Debug)]
pub struct Prepared {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// How it was built: which sources went in, which were left out and why.
    pub built: BuiltPrompt,
    /// The offered sources, by rank.
    pub offered: Vec<RagSource>,
    /// Generation parameters (the server's defaults, `max_tokens` fitted to the window).
    pub params: GenerationParams,
}

/// Builds the prompt for `req`; a question too long for the window is a 400.
/// The `k` chunks of a mounted store (`thinkrag serve --store`) that best match `question`, as
/// RAG sources named `SOURCE` or, for a page of a PDF, `SOURCE#page=N`. The store is searched as
/// of now: what other processes ingested since the last request is found.
pub fn retrieve_from_store(
    state: &AppState,
    name: &str,
    store: &dyn thinkrag::index::ChunkStore,
    question: &str,
    k: usize,
    mode: thinkrag::index::SearchMode,
) -> Result<Vec<RagSource>, ApiError> {
    let Some(embedder) = state.embedder.as_deref() else {
        return Err(ApiError::new(
            Flavor::OpenAi,
            Kind::Invalid,
            format!("the store {name} needs an embedder"),
        ));
    };
    if let Err(e) = store.refresh() {
        tracing::warn!(store = %store.location(), error = %e, "the store changed but cannot be reopened; searching what was loaded");
    }
    let hits = thinkrag::search(
        store,
        embedder,
        question,
        &thinkrag::SearchOptions::new(k, mode),
    )
    .map_err(|e| {
        tracing::error!(store = %store.location(), error = %e, "store search failed");
        ApiError::new(
            Flavor::OpenAi,
            Kind::Engine,
            format!("searching the store {name} failed: {e}"),
        )
    })?;
    Ok(hits
        .into_iter()
        .map(|h| RagSource {
            index: name.to_string(),
            id: match h.page {
                Some(p) => format!("{}#page={p}", h.source),
                None => h.source,
            },
            score: h.score,
            text: h.text,
        })
        .collect())
}

pub fn prepare(state: &AppState, flavor: Flavor, req: RagRequest) -> Result<Prepared, ApiError> {
    let engine = &state.engine;
    let hits: Vec<SearchHit> = req
        .sources
        .iter()
        .enumerate()
        .map(|(i, s)| SearchHit {
            id: i as u64,
            score: s.score,
            text: s.text.clone(),
            source: s.id.clone(),
            page: None,
            start: 0,
            end: s.text.len(),
            ..SearchHit::default()
        })
        .collect();
    let instructions = match req.instructions.as_deref().map(str::trim) {
        Some(i) if !i.is_empty() => Some(format!("{i}\n{CITE}")),
        _ => None,
    };
    let opts = PromptOptions {
        system: req.system.filter(|s| !s.trim().is_empty()),
        instructions,
        context_size: req.context_size,
        fields: vec![SourceField::Text],
        ..PromptOptions::default()
    };
    let mut history = req.history;
    if !history.is_empty() {
        if let Some(system) = &opts.system {
            history.insert(0, Message::system(system.clone()));
        }
    }
    let window = engine.context_window();
    let params = engine.default_params();
    let limits = PromptLimits {
        window,
        reserve: params.max_tokens.min(window / 2),
    };
    let built = build_prompt(
        &req.question,
        &hits,
        &history,
        &opts,
        limits,
        engine.as_ref(),
    )
    .map_err(|e| match e {
        thinkrag::Error::PromptTooLong { .. } => {
            ApiError::new(flavor, Kind::ContextLength, e.to_string())
        }
        thinkrag::Error::InvalidParameter { name, .. } => {
            ApiError::invalid(flavor, name, e.to_string())
        }
        other => ApiError::new(flavor, Kind::Engine, other.to_string()),
    })?;
    let prompt = engine
        .encode_messages(&built.messages)
        .map_err(|e| ApiError::from_engine(flavor, &e))?;
    let mut params = params;
    params.max_tokens = state.max_tokens(flavor, prompt.len(), None, "max_tokens")?;
    Ok(Prepared {
        prompt,
        built,
        offered: req.sources,
        params,
    })
}

impl Prepared {
    /// The sources that went into the prompt: `[{number, _index, _id, _score, cut}]`, then the
    /// ones left out with why.
    pub fn sources_json(&self) -> Value {
        let used: Vec<Value> = self
            .built
            .sources
            .iter()
            .map(|s| {
                let o = &self.offered[s.rank - 1];
                json!({"number": s.number, "_index": o.index, "_id": o.id, "_score": o.score,
                       "cut": s.cut})
            })
            .collect();
        json!(used)
    }

    /// The retrieved documents that did not go into the prompt, with why.
    pub fn left_out_json(&self) -> Value {
        json!(self
            .built
            .left_out
            .iter()
            .map(|l| {
                let o = &self.offered[l.rank - 1];
                json!({"_index": o.index, "_id": o.id, "reason": l.reason})
            })
            .collect::<Vec<_>>())
    }

    /// The sources `answer` cites: `[{number, _index, _id}]`, in order of first citation.
    pub fn citations_json(&self, answer: &str) -> Value {
        let cited = citations(answer, self.built.sources.len());
        json!(cited
            .into_iter()
            .filter_map(|n| {
                let s = self.built.sources.iter().find(|s| s.number == n)?;
                let o = &self.offered[s.rank - 1];
                Some(json!({"number": n, "_index": o.index, "_id": o.id}))
            })
            .collect::<Vec<_>>())
    }
}

/// Usage of a generation, OpenAI-style.
pub fn usage_json(g: &Generation) -> Value {
    let u = &g.usage;
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "reasoning_tokens": u.reasoning_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}
