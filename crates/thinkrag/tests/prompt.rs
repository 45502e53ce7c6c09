//! Golden tests of prompt assembly: the exact user turn for the default and a user template,
//! and the budget cases (a chunk larger than the budget, k chunks that do not fit, a question
//! alone longer than the window). Tokens are counted as whitespace-separated words here, so that
//! the expected budgets can be worked out by hand.

use thinkrag::llm::{Message, Role};
use thinkrag::prompt::{
    build_prompt, citations, PromptLimits, PromptOptions, PromptTokens, SourceField,
    DEFAULT_INSTRUCTIONS,
};
use thinkrag::{Error, SearchHit};

/// One token per word; a message costs its words plus 2 (role markers), plus 1 for the
/// generation prompt.
struct Words;

impl PromptTokens for Words {
    fn count_messages(&self, messages: &[Message]) -> thinkrag::Result<usize> {
        Ok(messages
            .iter()
            .map(|m| m.content.split_whitespace().count() + 2)
            .sum::<usize>()
            + 1)
    }
    fn count(&self, text: &str) -> thinkrag::Result<usize> {
        Ok(text.split_whitespace().count())
    }
    fn truncate(&self, text: &str, max_tokens: usize) -> thinkrag::Result<String> {
        Ok(text
            .split_whitespace()
            .take(max_tokens)
            .collect::<Vec<_>>()
            .join(" "))
    }
}

fn hit(id: u64, source: &str, page: Option<u32>, score: f32, text: &str) -> SearchHit {
    SearchHit {
        id,
        score,
        text: text.to_string(),
        source: source.to_string(),
        page,
        start: 0,
        end: text.len(),
        ..SearchHit::default()
    }
}

fn hits() -> Vec<SearchHit> {
    vec![
        hit(
            7,
            "/docs/miami.txt",
            None,
            0.81,
            "Miami grew to 6.27 million in 2023.",
        ),
        hit(
            3,
            "/docs/report.pdf",
            Some(4),
            0.64,
            "Chicago shrank to 9.26 million.",
        ),
    ]
}

const WIDE: PromptLimits = PromptLimits {
    window: 100_000,
    reserve: 1000,
};

fn build(question: &str, hits: &[SearchHit], opts: &PromptOptions) -> thinkrag::BuiltPrompt {
    build_prompt(question, hits, &[], opts, WIDE, &Words).unwrap()
}

#[test]
fn default_prompt_is_one_user_turn_with_numbered_sources() {
    let p = build("How did Miami grow?", &hits(), &PromptOptions::default());
    assert_eq!(p.messages.len(), 1, "no system prompt by default");
    assert_eq!(p.messages[0].role, Role::User);
    let expected = format!(
        "{DEFAULT_INSTRUCTIONS}\n\nSources:\n\n\
         [1] miami.txt\nMiami grew to 6.27 million in 2023.\n\n\
         [2] report.pdf, page 4\nChicago shrank to 9.26 million.\n\n\
         Question: How did Miami grow?"
    );
    assert_eq!(p.messages[0].content, expected);
    assert_eq!(
        p.sources
            .iter()
            .map(|s| (s.number, s.rank))
            .collect::<Vec<_>>(),
        [(1, 1), (2, 2)]
    );
    assert!(p.left_out.is_empty());
    assert!(p.sources.iter().all(|s| !s.cut));
    assert_eq!(p.prompt_tokens, Words.count_messages(&p.messages).unwrap());
}

#[test]
fn user_template_system_prompt_instructions_and_fields() {
    let opts = PromptOptions {
        template: Some(
            "Use the following context:\n{context}\n---\n{instructions}\nQ: {question}\nA:".into(),
        ),
        system: Some("You are terse.".into()),
        instructions: Some("One sentence.".into()),
        fields: vec![SourceField::Score, SourceField::Source, SourceField::Text],
        ..PromptOptions::default()
    };
    // A chunk that looks like a placeholder stays as it is.
    let mut h = hits();
    h[1].text = "Literally {question} and {context}.".into();
    let p = build("Why?", &h, &opts);
    assert_eq!(p.messages[0], Message::system("You are terse."));
    assert_eq!(
        p.messages[1].content,
        "Use the following context:\n\
         [1] (score 0.810) miami.txt\nMiami grew to 6.27 million in 2023.\n\n\
         [2] (score 0.640) report.pdf\nLiterally {question} and {context}.\n---\n\
         One sentence.\nQ: Why?\nA:"
    );
}

#[test]
fn templates_need_their_placeholders() {
    let opts = PromptOptions {
        template: Some("Context: {context}".into()),
        ..PromptOptions::default()
    };
    let err = build_prompt("q", &hits(), &[], &opts, WIDE, &Words).unwrap_err();
    assert!(
        err.to_string().contains("{question}"),
        "names what is missing: {err}"
    );
}

#[test]
fn no_retrieval_sends_the_question_alone() {
    let p = build("  What is 2+2?  ", &[], &PromptOptions::default());
    assert_eq!(p.messages, [Message::user("What is 2+2?")]);
    assert!(p.sources.is_empty());
}

#[test]
fn context_size_limits_how_many_hits_go_in() {
    let mut h = hits();
    h.push(hit(9, "c.txt", None, 0.5, "third"));
    let opts = PromptOptions {
        context_size: Some(1),
        ..PromptOptions::default()
    };
    let p = build("q", &h, &opts);
    assert_eq!(p.sources.len(), 1);
    assert_eq!(
        p.left_out.iter().map(|l| l.rank).collect::<Vec<_>>(),
        [2, 3]
    );
    assert!(p.left_out[0].reason.contains("context size of 1 hit"));
}

#[test]
fn a_chunk_larger_than_the_budget_is_cut_and_said_to_be() {
    let long: String = (0..200).map(|i| format!("w{i} ")).collect();
    let h = vec![hit(1, "big.txt", None, 0.9, &long)];
    let opts = PromptOptions {
        max_context_tokens: Some(60),
        ..PromptOptions::default()
    };
    let p = build("q", &h, &opts);
    assert_eq!(p.sources.len(), 1);
    assert!(p.sources[0].cut, "marked as cut");
    assert!(p.context_tokens <= 60, "{} tokens", p.context_tokens);
    assert!(p.context_tokens >= 40, "most of the budget is used");
    let user = &p.messages[0].content;
    assert!(user.contains("[1] big.txt\nw0 w1 w2"), "{user}");
    assert!(
        user.contains(" …\n\nQuestion: q"),
        "ends with an ellipsis: {user}"
    );
    assert!(!user.contains("w199"));
}

#[test]
fn chunks_that_do_not_fit_are_left_out_by_rank() {
    let text = |n: usize| {
        (0..n)
            .map(|i| format!("t{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    // Each block costs 2 header words + 20 text words (+1 separator after the first).
    let h: Vec<SearchHit> = (0..5)
        .map(|i| {
            hit(
                i,
                &format!("d{i}.txt"),
                None,
                1.0 - i as f32 / 10.0,
                &text(20),
            )
        })
        .collect();
    let opts = PromptOptions {
        max_context_tokens: Some(50),
        ..PromptOptions::default()
    };
    let p = build("q", &h, &opts);
    // 22 + 23 = 45 fit; the third's header takes 4 more, leaving 1 word of room: too little to
    // cut it, so it is left out.
    assert_eq!(p.sources.len(), 2);
    assert!(p.sources.iter().all(|s| !s.cut));
    assert_eq!(
        p.left_out.iter().map(|l| l.rank).collect::<Vec<_>>(),
        [3, 4, 5]
    );
    assert!(
        p.left_out
            .iter()
            .all(|l| l.reason == "did not fit the context budget of 50 tokens"),
        "{:?}",
        p.left_out
    );
    assert!(p.context_tokens <= 50);
}

#[test]
fn the_window_bounds_the_budget_too() {
    let text: String = (0..100).map(|i| format!("x{i} ")).collect();
    let h = vec![
        hit(1, "a.txt", None, 0.9, &text),
        hit(2, "b.txt", None, 0.8, &text),
    ];
    let limits = PromptLimits {
        window: 250,
        reserve: 50,
    };
    let p = build_prompt("q", &h, &[], &PromptOptions::default(), limits, &Words).unwrap();
    assert!(p.prompt_tokens <= 200, "{} > 200", p.prompt_tokens);
    assert!(
        p.prompt_tokens >= 190,
        "the room is used: {}",
        p.prompt_tokens
    );
    assert_eq!(p.sources.len(), 2, "the second is cut to fit");
    assert!(p.sources[1].cut);
}

#[test]
fn a_question_longer_than_the_window_is_a_clear_error() {
    let question: String = (0..500).map(|i| format!("why{i} ")).collect();
    let limits = PromptLimits {
        window: 300,
        reserve: 100,
    };
    let err = build_prompt(
        &question,
        &hits(),
        &[],
        &PromptOptions::default(),
        limits,
        &Words,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::PromptTooLong {
                window: 300,
                reserve: 100,
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("context window of 300 tokens") && msg.contains("shorten the question"),
        "{msg}"
    );
}

#[test]
fn history_counts_against_the_window() {
    let history = vec![
        Message::user((0..100).map(|i| format!("u{i} ")).collect::<String>()),
        Message::assistant("ok"),
    ];
    let limits = PromptLimits {
        window: 200,
        reserve: 50,
    };
    let p = build_prompt(
        "q",
        &hits(),
        &history,
        &PromptOptions::default(),
        limits,
        &Words,
    )
    .unwrap();
    assert_eq!(p.messages.len(), 3);
    assert_eq!(p.messages[..2], history[..]);
    assert!(p.prompt_tokens <= 150);
    assert!(p.context_budget < 150 - 100);
}

#[test]
fn citations_are_found_in_the_answer() {
    let a = "Miami grew [1]. Both changed [2, 3] and [1][4]. See [2-3], not [9] or [a] or [].";
    assert_eq!(citations(a, 4), [1, 2, 3, 4]);
    assert_eq!(citations(a, 2), [1, 2]);
    assert!(citations("no sources cited", 3).is_empty());
    assert_eq!(citations("unclosed [1", 3), Vec::<usize>::new());
}
