//! Loading one file into a [`Document`]: its pages of text, its content hash and the pages
//! that failed. Text and Markdown are decoded here; PDFs are handed to [`crate::pdf`].

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::failure::{Failure, FailureReason};
use crate::pdf;

/// Kinds of input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DocumentKind {
    /// A PDF file (`.pdf`).
    Pdf,
    /// A plain text file (`.txt`).
    Text,
    /// A Markdown file (`.md`, `.markdown`).
    Markdown,
}

impl DocumentKind {
    /// The kind a path's extension names (case-insensitive), or `None` if we do not ingest it.
    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "pdf" => Some(Self::Pdf),
            "txt" => Some(Self::Text),
            "md" | "markdown" => Some(Self::Markdown),
            _ => None,
        }
    }
}

/// One page of extracted text.
///
/// For PDFs `number` is the 1-based page number; text and Markdown files are one page with
/// `number` `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// 1-based page number within a PDF; `None` for text and Markdown files.
    pub number: Option<u32>,
    /// The page's text: LF line endings, never empty or only whitespace.
    pub text: String,
}

/// A loaded document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Document {
    /// The file it was read from.
    pub path: PathBuf,
    /// What kind of file it is.
    pub kind: DocumentKind,
    /// Pages that yielded text, in order. Blank PDF pages are left out, so page numbers may
    /// have gaps.
    pub pages: Vec<Page>,
    /// Hex SHA-256 of the file's bytes, as [`file_hash`] computes it.
    pub content_hash: String,
    /// Pages that could not be read while others could, and for a damaged PDF that was
    /// recovered, a whole-file [`FailureReason::Damaged`] first (the result is partial).
    pub page_failures: Vec<Failure>,
    /// Pages in the file (1 for text and Markdown), including blank and failed ones.
    pub page_count: u32,
}

/// Hex SHA-256 of a file's bytes, streamed, so a caller can skip unchanged files on re-ingest
/// without extracting them.
pub fn file_hash(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Reads one file.
///
/// Returns `Err` only when the whole file yields nothing; problems with single pages go into
/// [`Document::page_failures`]. Never panics on file contents: PDF parsing runs behind
/// `catch_unwind` (see [`crate::pdf`]).
pub fn load_document(path: &Path) -> Result<Document, Failure> {
    let fail = |reason| Failure::file(path, reason);
    let kind = DocumentKind::from_path(path).ok_or_else(|| fail(FailureReason::Unsupported))?;
    let bytes = std::fs::read(path).map_err(|e| fail(e.into()))?;
    load_document_bytes(path, kind, &bytes)
}

/// Reads a document held in memory, as [`load_document`] reads a file; `path` names it in the
/// result and in failures.
pub fn load_document_bytes(
    path: &Path,
    kind: DocumentKind,
    bytes: &[u8],
) -> Result<Document, Failure> {
    let fail = |reason| Failure::file(path, reason);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(fail(FailureReason::Empty));
    }
    let content_hash = format!("{:x}", Sha256::digest(bytes));

    let (pages, page_failures, page_count) = match kind {
        DocumentKind::Pdf => {
            let extracted = pdf::extract_pages(bytes).map_err(fail)?;
            let mut failures: Vec<Failure> = extracted
                .failures
                .into_iter()
                .map(|(page, reason)| Failure::page(path, page, reason))
                .collect();
            if extracted.recovered {
                let pages_with_text = u32::try_from(extracted.pages.len()).unwrap_or(u32::MAX);
                failures.insert(
                    0,
                    Failure::file(
                        path,
                        FailureReason::Damaged {
                            pages_found: extracted.page_count,
                            pages_with_text,
                        },
                    ),
                );
            }
            (extracted.pages, failures, extracted.page_count)
        }
        DocumentKind::Text | DocumentKind::Markdown => {
            let text = decode_text(bytes).map_err(fail)?;
            let page = Page { number: None, text };
            (vec![page], Vec::new(), 1)
        }
    };

    Ok(Document {
        path: path.to_path_buf(),
        kind,
        pages,
        content_hash,
        page_failures,
        page_count,
    })
}

/// Decodes a text or Markdown file: strict UTF-8 (a BOM is dropped), LF line endings.
fn decode_text(bytes: &[u8]) -> Result<String, FailureReason> {
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    let (body, skipped) = match bytes.strip_prefix(BOM) {
        Some(rest) => (rest, BOM.len()),
        None => (bytes, 0),
    };
    let text = std::str::from_utf8(body).map_err(|e| FailureReason::NotUtf8 {
        // Reported against the file as the user sees it, BOM included.
        offset: skipped + e.valid_up_to(),
    })?;
    // Lone CRs are classic Mac line endings; treating them as breaks keeps paragraphs apart.
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    if text.trim().is_empty() {
        return Err(FailureReason::Empty);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_from_extension_is_case_insensitive() {
        assert_eq!(
            DocumentKind::from_path(Path::new("a.PDF")),
            Some(DocumentKind::Pdf)
        );
        assert_eq!(
            DocumentKind::from_path(Path::new("a.Md")),
            Some(DocumentKind::Markdown)
        );
        assert_eq!(
            DocumentKind::from_path(Path::new("a.markdown")),
            Some(DocumentKind::Markdown)
        );
        assert_eq!(
            DocumentKind::from_path(Path::new("a.txt")),
            Some(DocumentKind::Text)
        );
        assert_eq!(DocumentKind::from_path(Path::new("a.docx")), None);
        assert_eq!(DocumentKind::from_path(Path::new("README")), None);
    }

    #[test]
    fn decode_strips_bom_and_crlf() {
        assert_eq!(decode_text(b"\xEF\xBB\xBFa\r\nb\rc").unwrap(), "a\nb\nc");
    }

    #[test]
    fn decode_reports_offset_of_bad_byte() {
        assert_eq!(
            decode_text(b"ab\xFFcd"),
            Err(FailureReason::NotUtf8 { offset: 2 })
        );
        assert_eq!(
            decode_text(b"\xEF\xBB\xBFab\xFF"),
            Err(FailureReason::NotUtf8 { offset: 5 })
        );
    }

    #[test]
    fn decode_rejects_whitespace_only() {
        assert_eq!(
            decode_text("\u{a0}\n".as_bytes()),
            Err(FailureReason::Empty)
        );
    }
}
