//! Chunking: size limits (characters and tokens, special tokens included), overlap, offsets
//! that slice the page text, coverage of all text, and Markdown sections kept together.

mod common;

use std::path::PathBuf;

use common::tiny_bert_tokenizer;
use proptest::prelude::*;
use thinkrag_ingest::{ChunkError, ChunkSize, Chunker, Document, DocumentKind, Page};
use tokenizers::{Tokenizer, TruncationParams};

fn doc(kind: DocumentKind, pages: &[&str]) -> Document {
    let numbered = kind == DocumentKind::Pdf;
    Document {
        path: PathBuf::from("test"),
        kind,
        pages: pages
            .iter()
            .enumerate()
            .map(|(i, text)| Page {
                number: numbered.then(|| u32::try_from(i + 1).unwrap()),
                text: (*text).to_owned(),
            })
            .collect(),
        content_hash: String::new(),
        page_failures: Vec::new(),
        page_count: u32::try_from(pages.len()).unwrap(),
    }
}

/// Several paragraphs of varied sentences, a few thousand characters.
fn long_text() -> String {
    let mut text = String::new();
    for p in 0..12 {
        for s in 0..6 {
            text.push_str(&format!(
                "Sentence {s} of paragraph {p} says the quick brown fox jumps over the lazy dog. "
            ));
        }
        text.push_str("\n\n");
    }
    text
}

/// One long paragraph of short sentences (about 25 characters, 7 tiny-tokenizer tokens each).
fn short_sentences() -> String {
    (0..200)
        .map(|i| format!("Fox {i} jumps over dog {i}."))
        .collect::<Vec<_>>()
        .join(" ")
}

fn special_tokens_len(tokenizer: &Tokenizer, text: &str) -> usize {
    tokenizer.encode(text, true).unwrap().len()
}

#[test]
fn char_chunks_respect_size_and_cover_the_text() {
    let text = long_text();
    let chunker = Chunker::chars(512, 30).unwrap();
    assert_eq!(
        chunker.size(),
        ChunkSize::Chars {
            max: 512,
            overlap: 30
        }
    );
    let chunks = chunker.chunk(&doc(DocumentKind::Pdf, &[&text]));
    assert!(chunks.len() > 5, "{} chunks", chunks.len());

    for chunk in &chunks {
        assert!(chunk.text.chars().count() <= 512);
        assert_eq!(&text[chunk.start..chunk.end], chunk.text);
        assert_eq!(chunk.text.trim(), chunk.text);
        assert_eq!(chunk.page, Some(1));
    }
    for pair in chunks.windows(2) {
        assert!(pair[1].start > pair[0].start, "chunks are in order");
    }
    // Every non-whitespace byte of the page is in some chunk.
    for (i, c) in text.char_indices() {
        if !c.is_whitespace() {
            assert!(
                chunks.iter().any(|ch| ch.start <= i && i < ch.end),
                "byte {i} ({c:?}) not covered"
            );
        }
    }
}

#[test]
fn chunks_cut_inside_a_paragraph_overlap() {
    // text-splitter overlaps with whole units of the level it cut at (here sentences), so
    // neighbours share text whenever such a unit fits in the overlap; sentences 75 characters
    // long would not fit in 30 and would not be repeated.
    let text = short_sentences();
    let chunks = Chunker::chars(512, 30)
        .unwrap()
        .chunk(&doc(DocumentKind::Text, &[&text]));
    assert!(chunks.len() > 5);
    for pair in chunks.windows(2) {
        assert!(pair[1].start < pair[0].end, "no overlap: {pair:#?}");
        let shared = &text[pair[1].start..pair[0].end];
        assert!(
            shared.chars().count() <= 30,
            "overlap {shared:?} over 30 chars"
        );
    }
}

#[test]
fn chunks_never_cross_pages() {
    let chunker = Chunker::chars(40, 0).unwrap();
    let d = doc(
        DocumentKind::Pdf,
        &[
            "First page, short.",
            "Second page is a bit longer than forty characters in total.",
        ],
    );
    let chunks = chunker.chunk(&d);
    assert_eq!(chunks[0].page, Some(1));
    assert_eq!(chunks[0].text, "First page, short.");
    assert!(chunks[1..].iter().all(|c| c.page == Some(2)));
    assert!(chunks.len() >= 3);
}

#[test]
fn token_chunks_fit_the_model_including_special_tokens() {
    let tokenizer = tiny_bert_tokenizer();
    assert_eq!(
        special_tokens_len(&tokenizer, "the dog"),
        4,
        "[CLS] the dog [SEP]"
    );

    let text = short_sentences();
    let chunker = Chunker::tokens(tokenizer.clone(), 40, 8).unwrap();
    assert_eq!(
        chunker.size(),
        ChunkSize::Tokens {
            max: 40,
            overlap: 8
        }
    );
    let chunks = chunker.chunk(&doc(DocumentKind::Text, &[&text]));
    assert!(chunks.len() > 10);
    let mut largest = 0;
    for chunk in &chunks {
        let n = special_tokens_len(&tokenizer, &chunk.text);
        assert!(n <= 40, "{n} tokens: {:?}", chunk.text);
        largest = largest.max(n);
        assert_eq!(&text[chunk.start..chunk.end], chunk.text);
    }
    // The budget is used, not wasted: some chunk comes close to the limit.
    assert!(largest >= 30, "largest chunk only {largest} tokens");
    for pair in chunks.windows(2) {
        assert!(pair[1].start < pair[0].end, "no overlap: {pair:#?}");
    }
}

#[test]
fn tokenizer_truncation_and_padding_do_not_hide_tokens() {
    let mut tokenizer = tiny_bert_tokenizer();
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: 8,
            ..Default::default()
        }))
        .unwrap();
    tokenizer.with_padding(Some(tokenizers::PaddingParams::default()));
    let chunker = Chunker::tokens(std::sync::Arc::new(tokenizer), 20, 0).unwrap();
    let text = long_text();
    let plain = tiny_bert_tokenizer();
    for chunk in chunker.chunk(&doc(DocumentKind::Text, &[&text])) {
        assert!(
            special_tokens_len(&plain, &chunk.text) <= 20,
            "{:?}",
            chunk.text
        );
    }
}

#[test]
fn bad_token_sizes_are_errors() {
    let t = tiny_bert_tokenizer;
    assert_eq!(Chunker::tokens(t(), 0, 0).unwrap_err(), ChunkError::ZeroMax);
    assert_eq!(
        Chunker::tokens(t(), 2, 0).unwrap_err(),
        ChunkError::NoRoomForText { max: 2, special: 2 }
    );
    assert_eq!(
        Chunker::tokens(t(), 10, 8).unwrap_err(),
        ChunkError::OverlapTooLarge { overlap: 8, max: 8 }
    );
    assert!(Chunker::tokens(t(), 10, 7).is_ok());
    assert_eq!(
        Chunker::chars(30, 31).unwrap_err(),
        ChunkError::OverlapTooLarge {
            overlap: 31,
            max: 30
        }
    );
}

#[test]
fn whitespace_only_chunks_are_skipped() {
    let chunker = Chunker::chars(10, 0).unwrap();
    let chunks = chunker.chunk(&doc(DocumentKind::Text, &["  one\n\n\n\n   \n\n two  "]));
    let texts: Vec<_> = chunks.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(texts, ["one", "two"]);
}

#[test]
fn markdown_keeps_headings_with_their_section() {
    let alpha = "Alpha body text explains the first topic in a couple of sentences. It is short.";
    let beta = "Beta body text explains the second topic. It is also short enough to fit.";
    let gamma = "Gamma body under a subheading.";
    let text = format!("# Alpha\n\n{alpha}\n\n# Beta\n\n{beta}\n\n## Gamma\n\n{gamma}\n");
    let chunker = Chunker::chars(140, 0).unwrap();
    let chunks = chunker.chunk(&doc(DocumentKind::Markdown, &[&text]));
    let texts: Vec<_> = chunks.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(texts.len(), 2, "{texts:#?}");
    assert_eq!(texts[0], format!("# Alpha\n\n{alpha}"));
    assert!(texts[1].starts_with("# Beta\n\n"), "{texts:#?}");
    assert!(texts[1].contains(beta));
    assert!(texts[1].contains("## Gamma\n\n"));
}

/// Text with words, punctuation, multi-byte characters, spaces and paragraph breaks.
fn text_strategy() -> impl Strategy<Value = String> {
    proptest::string::string_regex("([a-zé]{1,12}|[ .,;!?]|\n|\n\n|  |\t|😀|中文|#)*")
        .unwrap()
        .prop_map(|s| s.chars().take(1500).collect())
}

fn kind_strategy() -> impl Strategy<Value = DocumentKind> {
    prop_oneof![
        Just(DocumentKind::Text),
        Just(DocumentKind::Markdown),
        Just(DocumentKind::Pdf)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn char_chunks_fit_and_slice_the_page(
        text in text_strategy(),
        max in 1usize..120,
        overlap_frac in 0.0f64..1.0,
        kind in kind_strategy(),
    ) {
        let overlap = ((max as f64) * overlap_frac) as usize % max;
        let chunker = Chunker::chars(max, overlap).unwrap();
        let page = Page { number: Some(7), text: text.clone() };
        for chunk in chunker.chunk_page(&page, kind) {
            prop_assert!(chunk.text.chars().count() <= max);
            prop_assert_eq!(&text[chunk.start..chunk.end], chunk.text.as_str());
            prop_assert!(!chunk.text.trim().is_empty());
            if kind == DocumentKind::Markdown {
                // Markdown chunks keep leading indentation (it can mean a code block).
                prop_assert_eq!(chunk.text.trim_end(), chunk.text.as_str());
                prop_assert!(!chunk.text.starts_with('\n'));
            } else {
                prop_assert_eq!(chunk.text.trim(), chunk.text.as_str());
            }
            prop_assert_eq!(chunk.page, Some(7));
        }
    }

    #[test]
    fn token_chunks_fit_and_slice_the_page(
        text in text_strategy(),
        max in 3usize..48,
        overlap_frac in 0.0f64..1.0,
        kind in kind_strategy(),
    ) {
        let room = max - 2;
        let overlap = ((room as f64) * overlap_frac) as usize % room;
        let tokenizer = tiny_bert_tokenizer();
        let chunker = Chunker::tokens(tokenizer.clone(), max, overlap).unwrap();
        let page = Page { number: None, text: text.clone() };
        for chunk in chunker.chunk_page(&page, kind) {
            prop_assert!(special_tokens_len(&tokenizer, &chunk.text) <= max);
            prop_assert_eq!(&text[chunk.start..chunk.end], chunk.text.as_str());
            prop_assert!(!chunk.text.trim().is_empty());
        }
    }
}
