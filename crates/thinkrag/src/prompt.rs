//! Prompt assembly for retrieval-augmented answers: numbered sources and the question in the user
//! turn (DeepSeek advises no system prompt for R1), or a user template with `{context}` and
//! `{question}`, always within the model's context window and a token budget for the sources.

use serde::Serialize;
use thinkrag_llm::Message;

use crate::error::{Error, Result};
use crate::retrieval::SearchHit;

/// The default instructions, placed in the user turn before the sources.
pub const DEFAULT_INSTRUCTIONS: &str = "Answer the question using the numbered sources below. \
Cite each source you use as [n] right after the statement it supports. \
If the sources do not contain the answer, say so.";

/// The default user turn: instructions, the numbered sources, the question.
pub const DEFAULT_TEMPLATE: &str =
    "{instructions}\n\nSources:\n\n{context}\n\nQuestion: {question}";

/// Sources shorter than this many tokens after cutting are left out instead: a few words of a
/// chunk mislead more than they help.
const MIN_CUT_TOKENS: usize = 24;

/// A field of a retrieved chunk that can go into the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceField {
    /// The chunk's text.
    Text,
    /// The file it came from.
    Source,
    /// Its page.
    Page,
    /// Its similarity score.
    Score,
}

impl std::str::FromStr for SourceField {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "source" => Ok(Self::Source),
            "page" => Ok(Self::Page),
            "score" => Ok(Self::Score),
            other => Err(format!(
                "unknown field {other:?}: expected text, source, page or score"
            )),
        }
    }
}

/// How the prompt is built (the options of a search pipeline's RAG processor, plus a template).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptOptions {
    /// The user turn with `{context}` (the numbered sources) and `{question}`, and optionally
    /// `{instructions}`; `None` uses [`DEFAULT_TEMPLATE`].
    pub template: Option<String>,
    /// A system prompt (none by default: DeepSeek advises against one for R1).
    pub system: Option<String>,
    /// Instructions for `{instructions}`; `None` uses [`DEFAULT_INSTRUCTIONS`].
    pub instructions: Option<String>,
    /// How many of the retrieved hits may go into the prompt (`None`: all of them).
    pub context_size: Option<usize>,
    /// Which fields of each hit are shown, in this order (the text always comes last).
    pub fields: Vec<SourceField>,
    /// Most tokens the sources may take (`None`: whatever the context window leaves).
    pub max_context_tokens: Option<usize>,
}

impl Default for PromptOptions {
    fn default() -> Self {
        Self {
            template: None,
            system: None,
            instructions: None,
            context_size: None,
            fields: vec![SourceField::Source, SourceField::Page, SourceField::Text],
            max_context_tokens: Some(3072),
        }
    }
}

impl PromptOptions {
    /// Rejects a template without its placeholders and empty settings.
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.template {
            for needed in ["{context}", "{question}"] {
                if !t.contains(needed) {
                    return Err(Error::InvalidParameter {
                        name: "template",
                        value: shorten(t, 80),
                        expected: format!("a template containing {needed}"),
                    });
                }
            }
        }
        if self.context_size == Some(0) {
            return Err(Error::InvalidParameter {
                name: "context_size",
                value: "0".into(),
                expected: "1 or more hits".into(),
            });
        }
        if self.max_context_tokens == Some(0) {
            return Err(Error::InvalidParameter {
                name: "max_context_tokens",
                value: "0".into(),
                expected: "1 or more tokens".into(),
            });
        }
        if !self.fields.contains(&SourceField::Text) {
            return Err(Error::InvalidParameter {
                name: "fields",
                value: format!("{:?}", self.fields),
                expected: "a list that includes text".into(),
            });
        }
        Ok(())
    }
}

/// Token counting in the language model's tokenizer, as prompt assembly needs it.
pub trait PromptTokens {
    /// Tokens the model reads for `messages` rendered with its chat template (generation prompt
    /// included).
    fn count_messages(&self, messages: &[Message]) -> Result<usize>;
    /// Tokens of a piece of text.
    fn count(&self, text: &str) -> Result<usize>;
    /// The longest prefix of `text` of at most `max_tokens` tokens.
    fn truncate(&self, text: &str, max_tokens: usize) -> Result<String>;
}

impl PromptTokens for thinkrag_llm::Engine {
    fn count_messages(&self, messages: &[Message]) -> Result<usize> {
        Ok(self.encode_messages(messages)?.len())
    }
    fn count(&self, text: &str) -> Result<usize> {
        Ok(self.tokenizer().encode(text)?.len())
    }
    fn truncate(&self, text: &str, max_tokens: usize) -> Result<String> {
        let ids = self.tokenizer().encode(text)?;
        if ids.len() <= max_tokens {
            return Ok(text.to_string());
        }
        Ok(self.tokenizer().decode(&ids[..max_tokens]))
    }
}

/// The room the prompt must fit in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptLimits {
    /// The model's context window.
    pub window: usize,
    /// Tokens kept free for the reasoning and the answer.
    pub reserve: usize,
}

impl PromptLimits {
    /// Tokens the prompt may take.
    pub fn prompt_max(&self) -> usize {
        self.window.saturating_sub(self.reserve)
    }
}

/// A retrieved chunk as it went into the prompt.
#[derive(Debug, Clone, Serialize)]
pub struct PromptSource {
    /// Its number in the prompt, `[n]`, from 1.
    pub number: usize,
    /// Its rank among the retrieved hits, from 1.
    pub rank: usize,
    /// The hit.
    pub hit: SearchHit,
    /// Whether its text was cut to fit the budget.
    pub cut: bool,
    /// Tokens it took in the prompt.
    pub tokens: usize,
}

/// A retrieved chunk that did not go into the prompt, and why.
#[derive(Debug, Clone, Serialize)]
pub struct LeftOut {
    /// Its rank among the retrieved hits, from 1.
    pub rank: usize,
    /// The document.
    pub source: String,
    /// The page.
    pub page: Option<u32>,
    /// Why it was left out.
    pub reason: String,
}

/// A prompt ready for the model.
#[derive(Debug, Clone, Serialize)]
pub struct BuiltPrompt {
    /// The messages of this turn (a system message first when one was asked for).
    pub messages: Vec<Message>,
    /// The sources it contains, in rank order.
    pub sources: Vec<PromptSource>,
    /// The retrieved chunks it does not contain.
    pub left_out: Vec<LeftOut>,
    /// Tokens of the whole prompt (earlier turns included).
    pub prompt_tokens: usize,
    /// Tokens the sources took.
    pub context_tokens: usize,
    /// The budget the sources had.
    pub context_budget: usize,
    /// Whether the budget cut a source or left one out (as opposed to `context_size`).
    pub budget_limited: bool,
}

impl BuiltPrompt {
    /// The user turn's text.
    pub fn user_text(&self) -> &str {
        self.messages.last().map_or("", |m| m.content.as_str())
    }
}

/// Builds the prompt for `question` over `hits` (best first), after the `history` of earlier
/// turns, so that it fits `limits` and the sources fit `opts.max_context_tokens`. Sources go in
/// by rank; the first that does not fit is cut (when enough of it fits) and the rest are left
/// out, each with its reason. A question that does not fit even without sources is an error.
pub fn build_prompt(
    question: &str,
    hits: &[SearchHit],
    history: &[Message],
    opts: &PromptOptions,
    limits: PromptLimits,
    tokens: &dyn PromptTokens,
) -> Result<BuiltPrompt> {
    opts.validate()?;
    if question.trim().is_empty() {
        return Err(Error::InvalidParameter {
            name: "question",
            value: "\"\"".into(),
            expected: "a question".into(),
        });
    }
    let retrieval = !hits.is_empty();
    let render = |blocks: &[String]| -> Vec<Message> {
        let mut messages = history.to_vec();
        if history.is_empty() {
            if let Some(system) = &opts.system {
                messages.push(Message::system(system.clone()));
            }
        }
        messages.push(Message::user(user_turn(question, blocks, retrieval, opts)));
        messages
    };
    let base = tokens.count_messages(&render(&[]))?;
    let prompt_max = limits.prompt_max();
    if base >= prompt_max {
        return Err(Error::PromptTooLong {
            prompt_tokens: base,
            window: limits.window,
            reserve: limits.reserve,
        });
    }
    let budget = (prompt_max - base).min(opts.max_context_tokens.unwrap_or(usize::MAX));
    let take = opts.context_size.unwrap_or(hits.len()).min(hits.len());

    let mut sources: Vec<PromptSource> = Vec::new();
    let mut blocks: Vec<String> = Vec::new();
    let mut left_out: Vec<LeftOut> = Vec::new();
    let mut used = 0;
    let mut full = false;
    for (i, hit) in hits.iter().enumerate() {
        let rank = i + 1;
        let leave = |reason: String| LeftOut {
            rank,
            source: hit.source.clone(),
            page: hit.page,
            reason,
        };
        if i >= take {
            left_out.push(leave(format!(
                "beyond the context size of {take} hit{}",
                plural(take)
            )));
            continue;
        }
        if full {
            left_out.push(leave(budget_reason(budget)));
            continue;
        }
        let number = sources.len() + 1;
        // The separator between blocks costs about one token; counting it keeps the sum an
        // upper bound of the joined text.
        let block = source_block(number, hit, &hit.text, &opts.fields);
        let cost = tokens.count(&block)? + usize::from(number > 1);
        let chosen = if used + cost <= budget {
            Some((block, cost, false))
        } else {
            full = true;
            let header = source_block(number, hit, "", &opts.fields);
            let header_cost = tokens.count(&header)? + usize::from(number > 1) + 1;
            let room = budget.saturating_sub(used + header_cost);
            let mut cut = None;
            if room >= MIN_CUT_TOKENS {
                let text = cut_text(tokens, &hit.text, room)?;
                let block = source_block(number, hit, &text, &opts.fields);
                let cost = tokens.count(&block)? + usize::from(number > 1);
                if used + cost <= budget {
                    cut = Some((block, cost, true));
                }
            }
            cut
        };
        match chosen {
            Some((block, cost, cut)) => {
                used += cost;
                blocks.push(block);
                sources.push(PromptSource {
                    number,
                    rank,
                    hit: hit.clone(),
                    cut,
                    tokens: cost,
                });
            }
            None => left_out.push(leave(budget_reason(budget))),
        }
    }

    // The parts were counted one by one; the joined prompt is checked as a whole, and the
    // lowest-ranked source goes until it fits.
    loop {
        let messages = render(&blocks);
        let total = tokens.count_messages(&messages)?;
        if total <= prompt_max && total - base <= budget || blocks.is_empty() {
            let context_tokens = total.saturating_sub(base);
            return Ok(BuiltPrompt {
                messages,
                sources,
                left_out,
                prompt_tokens: total,
                context_tokens,
                context_budget: budget,
                budget_limited: full,
            });
        }
        blocks.pop();
        full = true;
        if let Some(s) = sources.pop() {
            left_out.insert(
                0,
                LeftOut {
                    rank: s.rank,
                    source: s.hit.source.clone(),
                    page: s.hit.page,
                    reason: budget_reason(budget),
                },
            );
            left_out.sort_by_key(|l| l.rank);
        }
    }
}

fn budget_reason(budget: usize) -> String {
    format!("did not fit the context budget of {budget} tokens")
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `text` cut to at most `max_tokens` tokens, then back to the last word boundary, marked with
/// an ellipsis.
fn cut_text(tokens: &dyn PromptTokens, text: &str, max_tokens: usize) -> Result<String> {
    // The ellipsis and a boundary effect may cost a token or two.
    let mut cut = tokens.truncate(text, max_tokens.saturating_sub(2))?;
    if let Some(space) = cut.rfind(char::is_whitespace) {
        if space > cut.len() / 2 {
            cut.truncate(space);
        }
    }
    let cut = cut.trim_end().to_string();
    Ok(format!("{cut} …"))
}

/// One numbered source: `[n] source, page p, score s` and its text below.
fn source_block(number: usize, hit: &SearchHit, text: &str, fields: &[SourceField]) -> String {
    let mut header = format!("[{number}]");
    for field in fields {
        match field {
            SourceField::Source => header.push_str(&format!(" {}", display_source(&hit.source))),
            SourceField::Page => {
                if let Some(p) = hit.page {
                    header.push_str(&format!(", page {p}"));
                }
            }
            SourceField::Score => header.push_str(&format!(" (score {:.3})", hit.score)),
            SourceField::Text => {}
        }
    }
    format!("{header}\n{}", text.trim())
}

/// The file name, not the whole path: it tells the model (and the reader) enough, and keeps
/// the user's directory layout out of the prompt.
pub fn display_source(source: &str) -> &str {
    std::path::Path::new(source)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(source)
}

/// The user turn: the template with its placeholders filled in one pass, so that text inside a
/// chunk that looks like a placeholder stays as it is.
fn user_turn(question: &str, blocks: &[String], retrieval: bool, opts: &PromptOptions) -> String {
    let question = question.trim();
    if !retrieval && opts.template.is_none() {
        return match &opts.instructions {
            Some(i) => format!("{i}\n\n{question}"),
            None => question.to_string(),
        };
    }
    let template = opts.template.as_deref().unwrap_or(DEFAULT_TEMPLATE);
    let context = blocks.join("\n\n");
    let instructions = opts.instructions.as_deref().unwrap_or(DEFAULT_INSTRUCTIONS);
    let mut out = String::with_capacity(template.len() + context.len() + question.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        let (value, len) = if tail.starts_with("{context}") {
            (context.as_str(), "{context}".len())
        } else if tail.starts_with("{question}") {
            (question, "{question}".len())
        } else if tail.starts_with("{instructions}") {
            (instructions, "{instructions}".len())
        } else {
            ("{", 1)
        };
        out.push_str(value);
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// The source numbers an answer cites as `[n]`, `[n, m]` or `[n-m]`, in order of first citation,
/// keeping only numbers of sources that exist.
pub fn citations(answer: &str, sources: usize) -> Vec<usize> {
    let mut found: Vec<usize> = Vec::new();
    let mut rest = answer;
    while let Some(open) = rest.find('[') {
        rest = &rest[open + 1..];
        let Some(close) = rest.find(']') else { break };
        let inside = &rest[..close];
        if inside.len() <= 40
            && !inside.is_empty()
            && inside
                .chars()
                .all(|c| c.is_ascii_digit() || matches!(c, ',' | ' ' | '-' | '–'))
        {
            for part in inside.split(',') {
                let part = part.trim();
                let range: Vec<&str> = part.split(['-', '–']).map(str::trim).collect();
                let numbers: Vec<usize> = match range.as_slice() {
                    [n] => n.parse().into_iter().collect(),
                    [a, b] => match (a.parse::<usize>(), b.parse::<usize>()) {
                        (Ok(a), Ok(b)) if a <= b && b - a < 50 => (a..=b).collect(),
                        _ => Vec::new(),
                    },
                    _ => Vec::new(),
                };
                for n in numbers {
                    if (1..=sources).contains(&n) && !found.contains(&n) {
                        found.push(n);
                    }
                }
            }
        }
    }
    found
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return format!("{s:?}");
    }
    let cut: String = s.chars().take(max).collect();
    format!("{cut:?}...")
}
