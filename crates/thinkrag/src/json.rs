//! The JSON shapes thinkrag reports hits and answers in, as serde types shared by the CLI's
//! `--json` output and the server: hits in a search engine's response shape (OpenSearch's `took`,
//! `hits.total`, `hits.hits[{_index,_id,_score,_source}]`), answers with the sources the model was
//! given and what it cited. Generations use [`thinkrag_llm::GenerationReport`].

use serde::{Deserialize, Serialize};
use thinkrag_llm::{GenerationReport, Timings, Usage};

use crate::pipeline::{Answer, AskTimings};
use crate::prompt::LeftOut;
use crate::retrieval::SearchHit;

/// A search response: the hits of one query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchResponse {
    /// Milliseconds the search took.
    pub took: u64,
    /// Always false: a local search runs to the end.
    pub timed_out: bool,
    /// The hits.
    pub hits: Hits,
}

/// The `hits` object of a search response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hits {
    /// How many hits.
    pub total: Total,
    /// The best score.
    pub max_score: Option<f32>,
    /// The hits, best first.
    pub hits: Vec<Hit>,
}

/// A hit count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Total {
    /// The count.
    pub value: usize,
    /// `eq`: the count is exact.
    pub relation: String,
}

/// One hit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    /// The index it came from.
    #[serde(rename = "_index")]
    pub index: String,
    /// The chunk's id.
    #[serde(rename = "_id")]
    pub id: String,
    /// The ranking score: cosine similarity (vector search), BM25 (lexical) or the
    /// reciprocal-rank-fusion score (hybrid).
    #[serde(rename = "_score")]
    pub score: f32,
    /// Cosine similarity to the query, when it was embedded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vector_score: Option<f32>,
    /// BM25 score, when lexical search found the chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lexical_score: Option<f32>,
    /// The cross-encoder's score, when the hits were reranked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerank_score: Option<f32>,
    /// The chunk.
    #[serde(rename = "_source")]
    pub source: HitSource,
}

/// A hit's chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HitSource {
    /// The chunk's text.
    pub text: String,
    /// Its document.
    pub source: String,
    /// Its page, for a PDF.
    pub page: Option<u32>,
    /// Byte offsets in the page's text.
    pub start: usize,
    /// End offset.
    pub end: usize,
}

impl Hits {
    /// The hits of `index` (its name or directory).
    pub fn new(index: &str, hits: &[SearchHit]) -> Self {
        Self {
            total: Total {
                value: hits.len(),
                relation: "eq".into(),
            },
            max_score: hits.first().map(|h| h.score),
            hits: hits
                .iter()
                .map(|h| Hit {
                    index: index.to_string(),
                    id: h.id.to_string(),
                    score: h.score,
                    vector_score: h.vector_score,
                    lexical_score: h.lexical_score,
                    rerank_score: h.rerank_score,
                    source: HitSource {
                        text: h.text.clone(),
                        source: h.source.clone(),
                        page: h.page,
                        start: h.start,
                        end: h.end,
                    },
                })
                .collect(),
        }
    }
}

impl SearchResponse {
    /// The response for `hits` of `index`, found in `took_ms`.
    pub fn new(index: &str, hits: &[SearchHit], took_ms: u64) -> Self {
        Self {
            took: took_ms,
            timed_out: false,
            hits: Hits::new(index, hits),
        }
    }
}

/// A source the model was given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceReport {
    /// Its number in the prompt (`[n]`).
    pub number: usize,
    /// Its rank among the hits, from 1.
    pub rank: usize,
    /// The chunk's id.
    #[serde(rename = "_id")]
    pub id: String,
    /// Its score.
    pub score: f32,
    /// Its document.
    pub source: String,
    /// Its page.
    pub page: Option<u32>,
    /// Whether it was cut to fit the budget.
    pub cut: bool,
    /// Whether the answer cites it.
    pub cited: bool,
    /// The start of its text.
    pub snippet: String,
}

/// An answer over the index.
#[derive(Debug, Clone, Serialize)]
pub struct AnswerReport {
    /// The question.
    pub question: String,
    /// The model's name.
    pub model: String,
    /// Every retrieved chunk.
    pub hits: Hits,
    /// The sources in the prompt.
    pub sources: Vec<SourceReport>,
    /// Retrieved chunks left out of the prompt, and why.
    pub left_out: Vec<LeftOut>,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Of those, the sources'.
    pub context_tokens: usize,
    /// The reasoning.
    pub reasoning: String,
    /// The answer.
    pub answer: String,
    /// The source numbers the answer cites.
    pub citations: Vec<usize>,
    /// `stop`, `length` or `cancelled`.
    pub stop_reason: Option<String>,
    /// Token counts.
    pub usage: Usage,
    /// Where the time went.
    pub timings: AskTimings,
    /// The generation's own timings.
    pub generation_timings: Timings,
}

impl AnswerReport {
    /// The report of `answer` by `model` over `index`; `snippet` shortens a source's text.
    pub fn new(
        answer: &Answer,
        model: &str,
        index: &str,
        snippet: impl Fn(&str) -> String,
    ) -> Self {
        let g = GenerationReport::from(&answer.generation);
        Self {
            question: answer.question.clone(),
            model: model.to_string(),
            hits: Hits::new(index, &answer.hits),
            sources: answer
                .prompt
                .sources
                .iter()
                .map(|s| SourceReport {
                    number: s.number,
                    rank: s.rank,
                    id: s.hit.id.to_string(),
                    score: s.hit.score,
                    source: s.hit.source.clone(),
                    page: s.hit.page,
                    cut: s.cut,
                    cited: answer.citations.contains(&s.number),
                    snippet: snippet(&s.hit.text),
                })
                .collect(),
            left_out: answer.prompt.left_out.clone(),
            prompt_tokens: answer.prompt.prompt_tokens,
            context_tokens: answer.prompt.context_tokens,
            reasoning: g.reasoning,
            answer: g.text,
            citations: answer.citations.clone(),
            stop_reason: g.stop_reason,
            usage: g.usage,
            timings: answer.timings,
            generation_timings: g.timings,
        }
    }
}
