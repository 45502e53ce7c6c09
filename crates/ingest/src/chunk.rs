//! Splitting pages into chunks sized for the embedding model, with text-splitter doing the
//! semantic work (Markdown structure, then paragraphs, lines, sentences, words).
//! Chunks never cross a page boundary, so every chunk can cite the page it came from.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use text_splitter::{Characters, ChunkConfig, ChunkSizer, MarkdownSplitter, TextSplitter};
use tokenizers::{PostProcessor, Tokenizer};

use crate::document::{Document, DocumentKind, Page};

/// How chunks are sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "unit", rename_all = "lowercase")]
pub enum ChunkSize {
    /// Tokens of the embedding model's tokenizer. `max` is the model's whole input, special
    /// tokens such as `[CLS]`/`[SEP]` included.
    Tokens {
        /// Most tokens in one chunk, special tokens included.
        max: usize,
        /// Tokens of text shared by consecutive chunks.
        overlap: usize,
    },
    /// Unicode scalar values (Rust `char`s).
    Chars {
        /// Most characters in one chunk.
        max: usize,
        /// Characters shared by consecutive chunks.
        overlap: usize,
    },
}

impl Default for ChunkSize {
    /// 256-token chunks with 32 tokens of overlap: small enough that a hit is specific, large
    /// enough to hold a paragraph, and within every supported embedder's limit.
    fn default() -> Self {
        Self::Tokens {
            max: 256,
            overlap: 32,
        }
    }
}

/// Why a [`Chunker`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// A chunk size of zero.
    #[error("chunk size must be greater than zero")]
    ZeroMax,
    /// The overlap is not smaller than the room a chunk has for text.
    #[error("chunk overlap ({overlap}) must be smaller than the chunk size ({max})")]
    OverlapTooLarge {
        /// The overlap asked for.
        overlap: usize,
        /// The room for text in one chunk (for tokens: `max` less the special tokens).
        max: usize,
    },
    /// The tokenizer's special tokens alone fill the chunk size.
    #[error("chunk size of {max} tokens leaves no room for text after the tokenizer's {special} special tokens")]
    NoRoomForText {
        /// The chunk size asked for.
        max: usize,
        /// Special tokens the tokenizer adds to every input.
        special: usize,
    },
    /// The tokenizer rejected the settings we need (no truncation, no padding).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// One chunk of a page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chunk {
    /// The chunk's text, never empty or only whitespace. Trimmed at both ends, except that
    /// Markdown chunks keep leading indentation (it can mean a code block or nested list).
    pub text: String,
    /// The page it came from ([`Page::number`]).
    pub page: Option<u32>,
    /// Byte offset of the chunk within the page text: `text == page.text[start..end]`.
    pub start: usize,
    /// Byte offset just past the chunk within the page text.
    pub end: usize,
}

/// Splits pages into chunks.
///
/// Overlap is text-splitter's: the tail of a chunk is repeated at the start of the next one in
/// whole units of the level the cut was made at (sentences, words, ...), up to the overlap
/// size. So a cut between two units too big for the overlap budget (say two paragraphs of 400
/// characters with a 30-character overlap) repeats nothing, while a cut inside a paragraph of
/// short sentences repeats the last sentence or words.
///
/// Build it once and reuse it: it is `Send + Sync`, so share it behind an `Arc` rather than
/// cloning.
#[derive(Debug)]
pub struct Chunker {
    size: ChunkSize,
    splitters: Splitters,
}

#[derive(Debug)]
enum Splitters {
    Chars {
        text: TextSplitter<Characters>,
        markdown: MarkdownSplitter<Characters>,
    },
    Tokens {
        text: TextSplitter<TokenCounter>,
        markdown: MarkdownSplitter<TokenCounter>,
    },
}

impl Chunker {
    /// Token-sized chunks counted with the embedding model's own tokenizer.
    ///
    /// `max` is the model's input limit *including* the special tokens its tokenizer adds
    /// (e.g. 2 for BERT's `[CLS]`/`[SEP]`, found from the tokenizer's post-processor): chunks
    /// get at most `max - special` tokens of text, so `tokenizer.encode(chunk, true)` fits in
    /// `max`. Pass the model's limit as is. The one exception is a single character that alone
    /// tokenizes to more than that, which cannot be split further.
    ///
    /// The tokenizer's own truncation and padding are switched off on our copy so they cannot
    /// distort the counts. Errors if `max == 0`, if the special tokens leave no room, or if
    /// `overlap` is not smaller than the room left.
    pub fn tokens(
        tokenizer: impl Into<Arc<Tokenizer>>,
        max: usize,
        overlap: usize,
    ) -> Result<Self, ChunkError> {
        if max == 0 {
            return Err(ChunkError::ZeroMax);
        }
        let mut tokenizer = Arc::unwrap_or_clone(tokenizer.into());
        if tokenizer.get_truncation().is_some() || tokenizer.get_padding().is_some() {
            tokenizer
                .with_truncation(None)
                .map_err(|e| ChunkError::Tokenizer(e.to_string()))?;
            tokenizer.with_padding(None);
        }
        let special = tokenizer
            .get_post_processor()
            .map_or(0, |processor| processor.added_tokens(false));
        let room = max
            .checked_sub(special)
            .filter(|&room| room > 0)
            .ok_or(ChunkError::NoRoomForText { max, special })?;
        let counter = TokenCounter(Arc::new(tokenizer));
        let text = TextSplitter::new(config(room, overlap, counter.clone())?);
        let markdown = MarkdownSplitter::new(config(room, overlap, counter)?);
        Ok(Self {
            size: ChunkSize::Tokens { max, overlap },
            splitters: Splitters::Tokens { text, markdown },
        })
    }

    /// Character-sized chunks; `Chunker::chars(512, 30)` is LangChain's usual
    /// RecursiveCharacterTextSplitter setting. Errors if `max == 0` or `overlap >= max`.
    pub fn chars(max: usize, overlap: usize) -> Result<Self, ChunkError> {
        if max == 0 {
            return Err(ChunkError::ZeroMax);
        }
        let text = TextSplitter::new(config(max, overlap, Characters)?);
        let markdown = MarkdownSplitter::new(config(max, overlap, Characters)?);
        Ok(Self {
            size: ChunkSize::Chars { max, overlap },
            splitters: Splitters::Chars { text, markdown },
        })
    }

    /// How this chunker sizes chunks, as it was built.
    pub fn size(&self) -> ChunkSize {
        self.size
    }

    /// Chunks of one document, in page order then text order.
    ///
    /// Markdown files use text-splitter's `MarkdownSplitter` (headings stay with their section
    /// where it fits), everything else its `TextSplitter`, which splits recursively on
    /// paragraph, line, sentence and word boundaries.
    pub fn chunk(&self, doc: &Document) -> Vec<Chunk> {
        doc.pages
            .iter()
            .flat_map(|page| self.chunk_page(page, doc.kind))
            .collect()
    }

    /// Chunks of one page of a document of the given kind.
    pub fn chunk_page(&self, page: &Page, kind: DocumentKind) -> Vec<Chunk> {
        let markdown = kind == DocumentKind::Markdown;
        let pieces: Vec<(usize, &str)> = match &self.splitters {
            Splitters::Chars { text, .. } if !markdown => text.chunk_indices(&page.text).collect(),
            Splitters::Chars { markdown: md, .. } => md.chunk_indices(&page.text).collect(),
            Splitters::Tokens { text, .. } if !markdown => text.chunk_indices(&page.text).collect(),
            Splitters::Tokens { markdown: md, .. } => md.chunk_indices(&page.text).collect(),
        };
        pieces
            .into_iter()
            .filter(|(_, text)| !text.trim().is_empty())
            .map(|(start, text)| Chunk {
                text: text.to_owned(),
                page: page.number,
                start,
                end: start + text.len(),
            })
            .collect()
    }
}

fn config<S: ChunkSizer>(
    max: usize,
    overlap: usize,
    sizer: S,
) -> Result<ChunkConfig<S>, ChunkError> {
    if overlap >= max {
        return Err(ChunkError::OverlapTooLarge { overlap, max });
    }
    ChunkConfig::new(max)
        .with_sizer(sizer)
        .with_overlap(overlap)
        .map_err(|_| ChunkError::OverlapTooLarge { overlap, max })
}

/// Counts tokens without special tokens (those are budgeted for once per chunk).
///
/// text-splitter's own `ChunkSizer` for `Tokenizer` panics when the tokenizer rejects a
/// string; this one instead counts one token per byte, an overestimate for every tokenizer
/// that can fail (those are not byte-level, so each token covers at least one character), so
/// the size limit still holds.
#[derive(Clone)]
struct TokenCounter(Arc<Tokenizer>);

impl ChunkSizer for TokenCounter {
    fn size(&self, chunk: &str) -> usize {
        match self.0.encode_fast(chunk, false) {
            Ok(encoding) => encoding.len(),
            Err(e) => {
                tracing::debug!(error = %e, "tokenizer failed; sizing the chunk by bytes");
                chunk.len()
            }
        }
    }
}

impl fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCounter")
            .field("vocab_size", &self.0.get_vocab_size(true))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(Chunker::chars(0, 0).unwrap_err(), ChunkError::ZeroMax);
        assert_eq!(
            Chunker::chars(10, 10).unwrap_err(),
            ChunkError::OverlapTooLarge {
                overlap: 10,
                max: 10
            }
        );
        assert!(Chunker::chars(10, 9).is_ok());
    }

    #[test]
    fn offsets_slice_the_page() {
        let chunker = Chunker::chars(20, 5).unwrap();
        let page = Page {
            number: Some(3),
            text: "First paragraph here.\n\nSecond one, somewhat longer than that.".into(),
        };
        let chunks = chunker.chunk_page(&page, DocumentKind::Text);
        assert!(chunks.len() > 1);
        for c in chunks {
            assert_eq!(c.page, Some(3));
            assert_eq!(&page.text[c.start..c.end], c.text);
            assert!(c.text.chars().count() <= 20);
        }
    }
}
