//! PDF text extraction that survives real-world files: pdf-extract page by page, each page
//! behind `catch_unwind`, with lopdf's own extractor as a fallback for pages pdf-extract
//! cannot handle. pdf-extract panics on many malformed PDFs by design and its by-pages API
//! silently drops every page after the first failure, so neither is used as is.
//!
//! Panics are caught, not prevented, so the default panic hook would still print each one to
//! stderr. A library changes no process-wide state on its own, so the program opts in with
//! [`quiet_parser_panics`]: it installs (once) a hook that defers to the previous one except
//! on a thread that is inside PDF extraction ([`QuietPanics`] marks it), where it stays silent;
//! the panic message is kept in the page's [`FailureReason::Unparsable`] instead. Stack
//! overflows and infinite loops inside the parsers cannot be caught this way (see
//! [`crate::Isolation`]).

use std::any::Any;
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

use crate::document::Page;
use crate::failure::FailureReason;

/// What came out of one PDF.
#[derive(Debug)]
pub(crate) struct Extracted {
    /// Pages with text, in order.
    pub pages: Vec<Page>,
    /// Pages that could not be parsed, by 1-based number.
    pub failures: Vec<(u32, FailureReason)>,
    /// All pages in the file (found in it, for a recovered file).
    pub page_count: u32,
    /// Whether the file was damaged and its object table rebuilt by scanning: pages may be
    /// missing, and those found are numbered in the order found.
    pub recovered: bool,
}

/// Extracts the text of every page of a PDF held in memory.
///
/// `Err` when the file as a whole yields no text: it does not load, is encrypted with a user
/// password, has no pages, every page is blank (no text layer) or no page could be parsed.
pub(crate) fn extract_pages(bytes: &[u8]) -> Result<Extracted, FailureReason> {
    let _quiet = QuietPanics::enter();

    let loaded = match guarded(|| lopdf::Document::load_mem(bytes)) {
        Ok(Ok(doc)) => Ok(doc),
        Ok(Err(lopdf::Error::InvalidPassword | lopdf::Error::Decryption(_))) => {
            return Err(FailureReason::Encrypted)
        }
        Ok(Err(e)) => Err(FailureReason::Unparsable(format!("lopdf: {e}"))),
        Err(panic) => Err(FailureReason::Unparsable(format!(
            "lopdf panicked: {panic}"
        ))),
    };
    let loaded = loaded.and_then(|mut doc| {
        // lopdf tries the empty user password while loading and, when that works, hands back
        // a decrypted document with the /Encrypt entry removed; still encrypted means the
        // file needs a password we do not have. One more try costs nothing and covers any
        // document the loader left for later.
        if doc.is_encrypted() && !matches!(guarded(|| doc.decrypt("")), Ok(Ok(()))) {
            return Err(FailureReason::Encrypted);
        }
        let numbers: Vec<u32> = guarded(|| doc.get_pages().into_keys().collect())
            .map_err(|panic| FailureReason::Unparsable(format!("page tree: {panic}")))?;
        if numbers.is_empty() {
            return Err(FailureReason::Unparsable(
                "no pages found (truncated or damaged file?)".into(),
            ));
        }
        Ok((doc, numbers))
    });
    // A file that does not load, or loads without pages, may be cut short or have a broken
    // cross-reference table: rebuild its object table by scanning, as qpdf and mutool do.
    let (doc, numbers, recovered) = match loaded {
        Ok((doc, numbers)) => (doc, numbers, false),
        Err(FailureReason::Encrypted) => return Err(FailureReason::Encrypted),
        Err(damage) => match guarded(|| crate::recover::rebuild(bytes)) {
            Ok(Some(doc)) => {
                let numbers: Vec<u32> = guarded(|| doc.get_pages().into_keys().collect())
                    .map_err(|_| damage.clone())?;
                tracing::debug!(pages = numbers.len(), %damage, "rebuilt a damaged PDF by scanning");
                (doc, numbers, true)
            }
            _ => return Err(damage),
        },
    };
    let mut doc = doc;
    break_parent_cycles(&mut doc);
    let page_count = u32::try_from(numbers.len()).unwrap_or(u32::MAX);

    let mut pages = Vec::new();
    let mut failures = Vec::new();
    for number in numbers {
        match page_text(&doc, number) {
            Ok(Some(raw)) => {
                let text = normalize_pdf_text(&raw);
                if !text.is_empty() {
                    pages.push(Page {
                        number: Some(number),
                        text,
                    });
                }
            }
            // Blank pages are normal (separators, the back of a cover); skip them quietly.
            Ok(None) => {}
            Err(msg) => {
                tracing::debug!(page = number, %msg, "PDF page could not be parsed");
                failures.push((number, FailureReason::Unparsable(msg)));
            }
        }
    }

    if pages.is_empty() {
        return Err(match failures.into_iter().next() {
            Some((number, FailureReason::Unparsable(msg))) => {
                FailureReason::Unparsable(format!("no page could be read; page {number}: {msg}"))
            }
            Some((_, other)) => other,
            None => FailureReason::NoTextLayer,
        });
    }
    Ok(Extracted {
        pages,
        failures,
        page_count,
        recovered,
    })
}

/// Cuts every cycle in the page tree's `/Parent` links. pdf-extract follows them to find
/// inherited attributes without a bound, so a page that is its own ancestor (fuzzing found a
/// 584-byte file like that) would hang it forever; the cut link's node keeps its own attributes.
fn break_parent_cycles(doc: &mut lopdf::Document) {
    let pages: Vec<lopdf::ObjectId> = doc.page_iter().collect();
    for page in pages {
        let mut seen = std::collections::HashSet::from([page]);
        let mut node = page;
        loop {
            let parent = doc
                .get_dictionary(node)
                .ok()
                .and_then(|d| d.get(b"Parent").ok())
                .and_then(|p| p.as_reference().ok());
            let Some(parent) = parent else { break };
            // Deeper than any real tree (lopdf's own limit is 256): treat as a cycle too.
            if !seen.insert(parent) || seen.len() > 256 {
                if let Ok(dict) = doc.get_dictionary_mut(node) {
                    dict.remove(b"Parent");
                }
                break;
            }
            node = parent;
        }
    }
}

/// The raw text of one page: `Ok(None)` for a page without text, `Err` when neither extractor
/// could parse it.
fn page_text(doc: &lopdf::Document, number: u32) -> Result<Option<String>, String> {
    let primary = match guarded(|| pdf_extract_page(doc, number)) {
        Ok(Ok(text)) if has_text(&text) => return Ok(Some(text)),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("pdf-extract: {e}")),
        Err(panic) => Err(format!("pdf-extract panicked: {panic}")),
    };
    // Also tried for pages pdf-extract found blank: its font handling misses some text that
    // lopdf's simpler decoder gets.
    let fallback = match guarded(|| doc.extract_text(&[number])) {
        Ok(Ok(text)) if has_text(&text) => return Ok(Some(text)),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("lopdf: {e}")),
        Err(panic) => Err(format!("lopdf panicked: {panic}")),
    };
    match (primary, fallback) {
        (Ok(()), _) => Ok(None),
        (Err(primary), Ok(())) => Err(primary),
        (Err(primary), Err(fallback)) => Err(format!("{primary}; fallback {fallback}")),
    }
}

fn pdf_extract_page(
    doc: &lopdf::Document,
    number: u32,
) -> Result<String, pdf_extract::OutputError> {
    let mut text = String::new();
    pdf_extract::output_doc_page(
        doc,
        &mut pdf_extract::PlainTextOutput::new(&mut text),
        number,
    )?;
    Ok(text)
}

fn has_text(text: &str) -> bool {
    text.chars().any(|c| !c.is_whitespace() && !c.is_control())
}

/// Light clean-up of extracted page text: control characters become spaces, runs of
/// whitespace within a line collapse to one space, lines are trimmed, and any run of blank
/// lines becomes one paragraph break. pdf-extract marks bigger vertical jumps with an empty
/// line, so paragraph structure survives for the splitter.
pub(crate) fn normalize_pdf_text(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut paragraph_break = false;
    let mut line = String::new();
    for raw_line in raw.split(['\n', '\r', '\u{0c}', '\u{2028}', '\u{2029}']) {
        line.clear();
        for word in raw_line
            .split(|c: char| c.is_whitespace() || c.is_control())
            .filter(|w| !w.is_empty())
        {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        if line.is_empty() {
            paragraph_break = true;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if paragraph_break { "\n\n" } else { "\n" });
        }
        paragraph_break = false;
        out.push_str(&line);
    }
    out
}

/// Runs `f`, turning a panic into its message.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| panic_message(payload.as_ref()))
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

thread_local! {
    static IN_EXTRACTION: Cell<bool> = const { Cell::new(false) };
}

static INSTALL_HOOK: Once = Once::new();

/// While alive, panics on this thread are not printed by the hook [`quiet_parser_panics`]
/// installs (see module docs).
struct QuietPanics {
    was_quiet: bool,
}

/// Installs (once, process-wide) a panic hook that stays silent for the panics PDF extraction
/// catches (pdf-extract panics on many malformed files by design) and defers to the previous
/// hook for every other panic. For programs: without it, each caught panic is printed to
/// stderr by the default hook, and nothing else changes.
pub fn quiet_parser_panics() {
    INSTALL_HOOK.call_once(|| {
        // Chains to whatever hook was there, so other threads and other code keep their usual
        // panic output; only the flag QuietPanics sets silences anything.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_EXTRACTION.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

impl QuietPanics {
    fn enter() -> Self {
        Self {
            was_quiet: IN_EXTRACTION.with(|q| q.replace(true)),
        }
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        IN_EXTRACTION.with(|q| q.set(self.was_quiet));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_collapses_spaces_and_keeps_paragraphs() {
        let raw = "\n\n  Hello   world \t!\nnext line\n\n\n\nNew  paragraph\u{0}x\n  \n";
        assert_eq!(
            normalize_pdf_text(raw),
            "Hello world !\nnext line\n\nNew paragraph x"
        );
    }

    #[test]
    fn normalize_of_blank_is_empty() {
        assert_eq!(normalize_pdf_text(" \n\u{0c}\r\n "), "");
    }

    #[test]
    fn guarded_turns_panics_into_messages() {
        let _quiet = QuietPanics::enter();
        let r: Result<(), String> = guarded(|| panic!("boom {}", 1));
        assert_eq!(r, Err("boom 1".to_owned()));
    }

    #[test]
    fn garbage_is_unparsable() {
        assert!(matches!(
            extract_pages(b"%PDF-1.4 not really"),
            Err(FailureReason::Unparsable(_))
        ));
    }
}
