//! PDF loading: lopdf, pdf-extract behind catch_unwind, and thinkrag's own recovery of damaged
//! files (the xref rebuild by scanning). Any panic that escapes, abort or hang is a finding.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use thinkrag_ingest::{load_document_bytes, DocumentKind};

fuzz_target!(init: {
    // As the thinkrag binary does: pdf-extract panics on malformed files by design and
    // extraction catches those panics per page, so they must not count as crashes (libFuzzer's
    // hook aborts on every panic, caught or not). Panics anywhere else still abort.
    thinkrag_ingest::quiet_parser_panics();
}, |data: &[u8]| {
    if let Ok(doc) = load_document_bytes(Path::new("fuzz.pdf"), DocumentKind::Pdf, data) {
        // What comes back keeps its promises: pages with text, numbered within the count.
        for page in &doc.pages {
            assert!(!page.text.trim().is_empty());
            assert!(page.number.is_some_and(|n| n >= 1 && n <= doc.page_count));
        }
    }
});
