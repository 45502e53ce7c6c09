//! Why a file or one of its pages yielded no text.
//! Every message tells the user what they can do about it, because ingest runs unattended
//! over whole folders and the report is the only place a skipped file shows up.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Why a file or a page yielded no text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum FailureReason {
    /// The PDF is encrypted with a user password we do not have.
    #[error("encrypted: decrypt it (qpdf --decrypt --password=PASSWORD in.pdf out.pdf) and ingest again")]
    Encrypted,
    /// The PDF has pages but none of them carries text (scanned or image-only).
    #[error("no text layer (scanned?): run OCR first, e.g. ocrmypdf in.pdf out.pdf, and ingest the result")]
    NoTextLayer,
    /// The file (or page) could not be parsed; the string is the parser's message.
    #[error("unparsable ({0}): the file may be damaged or truncated; repair it (e.g. qpdf in.pdf out.pdf) or re-export it")]
    Unparsable(String),
    /// The PDF is damaged (cut short, or its cross-reference table is broken): its object
    /// table was rebuilt by scanning, and the text of the pages found was kept. A partial
    /// result: pages may be missing.
    #[error("damaged (truncated or broken cross-reference table): rebuilt by scanning, text from {pages_with_text} of the {pages_found} pages found was kept; later pages may be missing, so get a complete copy or repair it (qpdf in.pdf out.pdf) and ingest again")]
    Damaged {
        /// Page objects found by the scan.
        pages_found: u32,
        /// Of those, the pages that yielded text.
        pages_with_text: u32,
    },
    /// Reading the file took longer than the time allowed per file (a parser that hangs or
    /// loops on it); it was stopped.
    #[error("stopped after {seconds} s, the time allowed per file (the parser hung or looped on it): repair or re-export it (e.g. qpdf in.pdf out.pdf), or allow more time per file")]
    TimedOut {
        /// The limit, in seconds.
        seconds: u64,
    },
    /// Reading the file needed more memory than allowed per file (a decompression bomb, or a
    /// parser that runs away on it); it was stopped.
    #[error("stopped: it needed more than {limit_mib} MiB, the memory allowed per file (a compressed stream that expands without end, or a parser running away): repair or re-export it, or allow more memory per file")]
    OutOfMemory {
        /// The limit, in MiB.
        limit_mib: u64,
    },
    /// The parser crashed on the file in a way that cannot be caught in process (a stack
    /// overflow from endless nesting, an abort); it was read in a separate process, so only
    /// that file is lost.
    #[error("the parser crashed on it ({0}): repair or re-export it (e.g. qpdf in.pdf out.pdf)")]
    Crashed(String),
    /// The file is empty or only whitespace.
    #[error("empty: the file has no text, nothing to ingest")]
    Empty,
    /// A text or Markdown file that is not valid UTF-8.
    #[error("not UTF-8 (first invalid byte at offset {offset}): convert it, e.g. iconv -f LATIN1 -t UTF-8, and ingest again")]
    NotUtf8 {
        /// Byte offset in the file of the first byte that is not valid UTF-8.
        offset: usize,
    },
    /// The file could not be read; the string is the operating system's message.
    #[error("cannot read ({0}): check that the path exists and is readable")]
    Io(String),
    /// The extension is not one we ingest.
    #[error("unsupported file type: only .pdf, .txt, .md and .markdown files are ingested")]
    Unsupported,
}

/// A file or page that yielded no text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}{}: {reason}", path.display(), page.map(|p| format!(" (page {p})")).unwrap_or_default())]
pub struct Failure {
    /// The file concerned.
    pub path: PathBuf,
    /// The 1-based page for a per-page failure; `None` when the whole file failed.
    pub page: Option<u32>,
    /// What went wrong.
    pub reason: FailureReason,
}

impl Failure {
    /// A failure of the whole file.
    pub fn file(path: impl Into<PathBuf>, reason: FailureReason) -> Self {
        Self {
            path: path.into(),
            page: None,
            reason,
        }
    }

    /// A failure of one page of a file.
    pub fn page(path: impl Into<PathBuf>, page: u32, reason: FailureReason) -> Self {
        Self {
            path: path.into(),
            page: Some(page),
            reason,
        }
    }
}

impl From<std::io::Error> for FailureReason {
    fn from(e: std::io::Error) -> Self {
        FailureReason::Io(e.to_string())
    }
}
