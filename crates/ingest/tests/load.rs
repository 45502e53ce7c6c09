//! Loading documents end to end: generated PDFs (good, truncated, garbage, encrypted,
//! image-only), text and Markdown files, and discovery over a mixed directory.

mod common;

use std::path::PathBuf;

use common::write;
use thinkrag_ingest::test_pdfs::{encrypt, pdf_bytes, pdf_with_pages};
use thinkrag_ingest::{discover, file_hash, load_document, Chunker, DocumentKind, FailureReason};

const SENTENCES: [&str; 3] = [
    "Alpha page talks about apples.",
    "Beta page describes bridges.",
    "Gamma page covers gardens.",
];

fn three_page_pdf() -> Vec<u8> {
    pdf_bytes(pdf_with_pages(&[
        &[SENTENCES[0]],
        &[SENTENCES[1], "It has a second line."],
        &[SENTENCES[2]],
    ]))
}

#[test]
fn three_page_pdf_yields_numbered_pages_and_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "three.pdf", three_page_pdf());

    let doc = load_document(&path).unwrap();
    assert_eq!(doc.kind, DocumentKind::Pdf);
    assert_eq!(doc.page_count, 3);
    assert!(doc.page_failures.is_empty(), "{:?}", doc.page_failures);
    let numbers: Vec<_> = doc.pages.iter().map(|p| p.number).collect();
    assert_eq!(numbers, [Some(1), Some(2), Some(3)]);
    for (page, sentence) in doc.pages.iter().zip(SENTENCES) {
        assert!(
            page.text.contains(sentence),
            "{:?} lacks {sentence:?}",
            page.text
        );
    }
    assert!(doc.pages[1].text.contains("It has a second line."));
    assert_eq!(doc.content_hash, file_hash(&path).unwrap());
    assert_eq!(doc.content_hash.len(), 64);

    let chunks = Chunker::chars(512, 30).unwrap().chunk(&doc);
    assert_eq!(chunks.len(), 3);
    for (i, chunk) in chunks.iter().enumerate() {
        let number = u32::try_from(i + 1).unwrap();
        assert_eq!(chunk.page, Some(number));
        assert!(chunk.text.contains(SENTENCES[i]));
    }
}

#[test]
fn truncated_pdf_does_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = three_page_pdf();
    for cut in [bytes.len() / 2, bytes.len() * 3 / 4, bytes.len() - 10, 20] {
        let path = write(dir.path(), &format!("cut{cut}.pdf"), &bytes[..cut]);
        match load_document(&path) {
            Ok(doc) => {
                // lopdf may rebuild the cross-reference table and recover some pages; whatever
                // comes back must be real text from those pages.
                assert!(!doc.pages.is_empty());
                for page in &doc.pages {
                    let n = page.number.unwrap();
                    assert!((1..=3).contains(&n));
                    assert!(page.text.contains(SENTENCES[(n - 1) as usize]), "{page:?}");
                }
            }
            Err(failure) => {
                assert_eq!(failure.path, path);
                assert!(
                    matches!(
                        failure.reason,
                        FailureReason::Unparsable(_) | FailureReason::NoTextLayer
                    ),
                    "cut at {cut}: {failure}"
                );
            }
        }
    }
}

#[test]
fn broken_page_is_a_page_failure_and_the_rest_survives() {
    // Without a MediaBox anywhere pdf-extract panics on every page, so page 2 can only come
    // from the lopdf fallback; page 1 also points at a missing content stream, so both
    // extractors fail on it.
    let mut doc = pdf_with_pages(&[&["Broken page"], &["Second page survives."]]);
    let first = doc.get_pages()[&1];
    doc.get_dictionary_mut(first)
        .unwrap()
        .set("Contents", lopdf::Object::Reference((999, 0)));
    for object in doc.objects.values_mut() {
        if let Ok(dict) = object.as_dict_mut() {
            dict.remove(b"MediaBox");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "broken.pdf", pdf_bytes(doc));

    let doc = load_document(&path).unwrap();
    assert_eq!(doc.page_count, 2);
    assert_eq!(doc.pages.len(), 1);
    assert_eq!(doc.pages[0].number, Some(2));
    assert!(doc.pages[0].text.contains("Second page survives."));
    assert_eq!(doc.page_failures.len(), 1);
    let failure = &doc.page_failures[0];
    assert_eq!(
        (failure.path.as_path(), failure.page),
        (path.as_path(), Some(1))
    );
    match &failure.reason {
        FailureReason::Unparsable(msg) => assert!(msg.contains("pdf-extract panicked"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert!(failure.to_string().contains("(page 1)"));
}

#[test]
fn random_bytes_named_pdf_are_unparsable() {
    let dir = tempfile::tempdir().unwrap();
    // A fixed xorshift stream: random-looking, reproducible.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    let path = write(dir.path(), "noise.pdf", &bytes);
    let failure = load_document(&path).unwrap_err();
    assert!(
        matches!(failure.reason, FailureReason::Unparsable(_)),
        "{failure}"
    );
    assert!(failure.to_string().contains("noise.pdf"));

    let path = write(dir.path(), "header-only.pdf", "%PDF-1.7\n%%EOF\n");
    let failure = load_document(&path).unwrap_err();
    assert!(
        matches!(failure.reason, FailureReason::Unparsable(_)),
        "{failure}"
    );
}

#[test]
fn pdf_with_user_password_is_encrypted() {
    let dir = tempfile::tempdir().unwrap();
    let doc = encrypt(pdf_with_pages(&[&[SENTENCES[0]]]), "open-sesame");
    let path = write(dir.path(), "locked.pdf", pdf_bytes(doc));
    let failure = load_document(&path).unwrap_err();
    assert_eq!(failure.reason, FailureReason::Encrypted);
    assert!(failure.to_string().contains("qpdf --decrypt"));
}

#[test]
fn pdf_with_empty_user_password_is_read() {
    // Owner-password-only PDFs (print/copy restrictions) open without a password in every
    // viewer; they must ingest normally.
    let dir = tempfile::tempdir().unwrap();
    let doc = encrypt(pdf_with_pages(&[&[SENTENCES[0]], &[SENTENCES[1]]]), "");
    let path = write(dir.path(), "restricted.pdf", pdf_bytes(doc));
    let doc = load_document(&path).unwrap();
    assert_eq!(doc.pages.len(), 2);
    assert!(doc.pages[0].text.contains(SENTENCES[0]));
    assert!(doc.pages[1].text.contains(SENTENCES[1]));
}

#[test]
fn pdf_without_text_has_no_text_layer() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "scan.pdf",
        pdf_bytes(pdf_with_pages(&[&[], &[]])),
    );
    let failure = load_document(&path).unwrap_err();
    assert_eq!(failure.reason, FailureReason::NoTextLayer);
    assert!(failure.to_string().contains("ocrmypdf"));
}

#[test]
fn blank_pages_are_skipped_silently() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = pdf_bytes(pdf_with_pages(&[&[SENTENCES[0]], &[], &[SENTENCES[2]]]));
    let path = write(dir.path(), "gap.pdf", bytes);
    let doc = load_document(&path).unwrap();
    assert_eq!(doc.page_count, 3);
    assert!(doc.page_failures.is_empty());
    let numbers: Vec<_> = doc.pages.iter().map(|p| p.number).collect();
    assert_eq!(numbers, [Some(1), Some(3)]);
}

#[test]
fn empty_files_are_empty() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a.txt", "b.md", "c.pdf", "d.markdown"] {
        let path = write(dir.path(), name, "");
        assert_eq!(
            load_document(&path).unwrap_err().reason,
            FailureReason::Empty,
            "{name}"
        );
        let path = write(dir.path(), &format!("ws-{name}"), " \n\t\r\n ");
        assert_eq!(
            load_document(&path).unwrap_err().reason,
            FailureReason::Empty,
            "{name}"
        );
    }
    // A BOM and nothing else is empty too.
    let path = write(dir.path(), "bom.txt", b"\xEF\xBB\xBF\n");
    assert_eq!(
        load_document(&path).unwrap_err().reason,
        FailureReason::Empty
    );
}

#[test]
fn non_utf8_text_is_rejected_with_offset() {
    let dir = tempfile::tempdir().unwrap();
    // "café" in Latin-1.
    let path = write(dir.path(), "latin1.txt", b"caf\xE9 au lait\n");
    let failure = load_document(&path).unwrap_err();
    assert_eq!(failure.reason, FailureReason::NotUtf8 { offset: 3 });
    assert!(failure.to_string().contains("iconv"));
}

#[test]
fn text_and_markdown_are_one_page_with_lf() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "notes.TXT",
        b"\xEF\xBB\xBFline one\r\nline two\r\n",
    );
    let doc = load_document(&path).unwrap();
    assert_eq!(doc.kind, DocumentKind::Text);
    assert_eq!(doc.page_count, 1);
    assert_eq!(doc.pages.len(), 1);
    assert_eq!(doc.pages[0].number, None);
    assert_eq!(doc.pages[0].text, "line one\nline two\n");

    let path = write(dir.path(), "readme.md", "# Title\n\nBody.\n");
    let doc = load_document(&path).unwrap();
    assert_eq!(doc.kind, DocumentKind::Markdown);
    assert_eq!(doc.pages[0].text, "# Title\n\nBody.\n");
}

#[test]
fn missing_and_unsupported_files_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.txt");
    assert!(matches!(
        load_document(&missing).unwrap_err().reason,
        FailureReason::Io(_)
    ));
    let docx = write(dir.path(), "report.docx", "PK");
    assert_eq!(
        load_document(&docx).unwrap_err().reason,
        FailureReason::Unsupported
    );
}

/// Whether a failure reason is the one a bad file should get.
type ReasonCheck = fn(&FailureReason) -> bool;

#[test]
fn mixed_directory_loads_good_files_and_names_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let good_pdf = write(root, "good.pdf", three_page_pdf());
    let good_txt = write(root, "sub/notes.txt", "Some notes.\n");
    let good_md = write(root, "sub/deeper/guide.MD", "# Guide\n\nRead me.\n");
    let bad: Vec<(PathBuf, ReasonCheck)> = vec![
        (
            write(root, "broken.pdf", b"garbage, not a pdf".as_slice()),
            |r| matches!(r, FailureReason::Unparsable(_)),
        ),
        (write(root, "empty.md", ""), |r| *r == FailureReason::Empty),
        (write(root, "sub/latin1.txt", b"\xFF\xFE".as_slice()), |r| {
            matches!(r, FailureReason::NotUtf8 { .. })
        }),
        (
            write(
                root,
                "locked.pdf",
                pdf_bytes(encrypt(pdf_with_pages(&[&["x"]]), "pw")),
            ),
            |r| *r == FailureReason::Encrypted,
        ),
        (
            write(root, "scan.pdf", pdf_bytes(pdf_with_pages(&[&[]]))),
            |r| *r == FailureReason::NoTextLayer,
        ),
    ];
    // Ignored: unsupported extensions inside a directory, hidden files and directories.
    write(root, "image.png", "png");
    write(root, ".git/config.txt", "hidden");
    write(root, ".hidden.md", "hidden");

    // Naming a file that is also inside the directory must not list it twice.
    let (files, failures) = discover(&[root.to_path_buf(), good_txt.clone()]);
    assert!(failures.is_empty(), "{failures:?}");
    let mut expected: Vec<PathBuf> = vec![good_pdf.clone(), good_txt.clone(), good_md.clone()];
    expected.extend(bad.iter().map(|(p, _)| p.clone()));
    expected.sort();
    assert_eq!(files, expected);

    for file in &files {
        let result = load_document(file);
        if let Some((_, check)) = bad.iter().find(|(p, _)| p == file) {
            let failure = result.unwrap_err();
            assert_eq!(&failure.path, file);
            assert!(check(&failure.reason), "{failure}");
            assert!(failure
                .to_string()
                .contains(&*file.file_name().unwrap().to_string_lossy()));
        } else {
            let doc = result.unwrap_or_else(|f| panic!("{f}"));
            assert_eq!(&doc.path, file);
            assert!(!doc.pages.is_empty());
        }
    }
}

#[test]
fn discover_reports_missing_and_unsupported_named_paths() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let docx = write(dir.path(), "x.docx", "PK");
    let pdf = write(dir.path(), "Y.PDF", "x");
    let (files, failures) = discover(&[missing.clone(), docx.clone(), pdf.clone()]);
    assert_eq!(files, [pdf]);
    assert_eq!(failures.len(), 2);
    assert_eq!(failures[0].path, missing);
    assert!(matches!(failures[0].reason, FailureReason::Io(_)));
    assert_eq!(failures[1].path, docx);
    assert_eq!(failures[1].reason, FailureReason::Unsupported);
}

#[test]
fn failures_serialize_for_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "bad.txt", b"ok\xC0".as_slice());
    let failure = load_document(&path).unwrap_err();
    let json = serde_json::to_string(&failure).unwrap();
    assert!(json.contains(r#""kind":"not_utf8""#), "{json}");
    assert!(json.contains(r#""offset":2"#), "{json}");
}

/// Ten pages, each with a sentence naming its number.
fn ten_page_pdf() -> Vec<u8> {
    let lines: Vec<String> = (1..=10)
        .map(|n| format!("Page {n} talks about topic number {n}."))
        .collect();
    let pages: Vec<Vec<&str>> = lines.iter().map(|l| vec![l.as_str()]).collect();
    let pages: Vec<&[&str]> = pages.iter().map(Vec::as_slice).collect();
    pdf_bytes(pdf_with_pages(&pages))
}

fn assert_damaged_but_recovered(doc: &thinkrag_ingest::Document, min_pages: usize) {
    assert!(doc.pages.len() >= min_pages, "{:?}", doc.pages);
    for page in &doc.pages {
        let n = page.number.unwrap();
        assert!(
            page.text
                .contains(&format!("Page {n} talks about topic number {n}.")),
            "{page:?}"
        );
    }
    let first = &doc.page_failures[0];
    assert_eq!(first.page, None, "{first:?}");
    match first.reason {
        FailureReason::Damaged {
            pages_found,
            pages_with_text,
        } => {
            assert_eq!(pages_with_text as usize, doc.pages.len());
            assert_eq!(pages_found, doc.page_count);
        }
        ref other => panic!("{other:?}"),
    }
    let message = first.to_string();
    assert!(message.contains("rebuilt by scanning"), "{message}");
}

#[test]
fn a_pdf_cut_at_60_percent_gives_the_pages_before_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = ten_page_pdf();
    let cut = bytes.len() * 6 / 10;
    let path = write(dir.path(), "cut.pdf", &bytes[..cut]);
    let doc = load_document(&path).expect("the pages before the cut are readable");
    // Every page whose objects lie wholly before the cut.
    let complete = (1..=10)
        .filter(|n| {
            let text = format!("(Page {n} talks");
            bytes[..cut]
                .windows(text.len())
                .any(|w| w == text.as_bytes())
        })
        .count();
    assert!(complete >= 4, "{complete}");
    assert_damaged_but_recovered(&doc, complete - 1);
}

#[test]
fn a_pdf_with_a_broken_xref_table_gives_all_its_pages() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = ten_page_pdf();
    // Shift every object by inserting bytes after the header: each xref offset is now wrong.
    let header_end = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
    bytes.splice(
        header_end..header_end,
        b"% padding that moves every object\n".iter().copied(),
    );
    let path = write(dir.path(), "xref.pdf", &bytes);
    let doc = load_document(&path).expect("recovered");
    assert_eq!(doc.page_count, 10);
    assert_damaged_but_recovered(&doc, 10);

    // And a startxref that points past the end of the file.
    let mut bytes = ten_page_pdf();
    let at = bytes.windows(9).rposition(|w| w == b"startxref").unwrap() + 10;
    let end = at
        + bytes[at..]
            .iter()
            .position(|b| !b.is_ascii_digit())
            .unwrap();
    bytes.splice(at..end, b"99999999".iter().copied());
    let path = write(dir.path(), "startxref.pdf", &bytes);
    let doc = load_document(&path).expect("recovered");
    assert_damaged_but_recovered(&doc, 10);
}

#[test]
fn a_cut_pdf_whose_page_tree_is_gone_gives_its_pages_in_order() {
    // As when a writer puts the page tree after the pages (pdfTeX does) and the file is cut.
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = ten_page_pdf();
    let cut = bytes.len() * 6 / 10;
    bytes.truncate(cut);
    let tree = bytes.windows(7).position(|w| w == b"1 0 obj").unwrap();
    bytes[tree..tree + 7].copy_from_slice(b"1 0 xxx");
    let path = write(dir.path(), "no-tree.pdf", &bytes);
    let doc = load_document(&path).expect("pages found without their tree");
    assert_damaged_but_recovered(&doc, 4);
    let numbers: Vec<u32> = doc.pages.iter().map(|p| p.number.unwrap()).collect();
    assert_eq!(numbers, (1..=numbers.len() as u32).collect::<Vec<_>>());
}

#[cfg(unix)]
#[test]
fn isolation_stops_a_reader_at_its_time_limit_and_reports_a_crash() {
    use std::time::{Duration, Instant};
    use thinkrag_ingest::{FileLimits, Isolation};
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "any.pdf", three_page_pdf());
    // A reader that hangs: `sh -c 'sleep 30' sh PATH`.
    let hanging = Isolation {
        program: "sh".into(),
        args: vec!["-c".into(), "sleep 30".into(), "sh".into()],
        limits: FileLimits {
            time: Duration::from_secs(1),
            memory_bytes: Some(256 << 20),
        },
    };
    let started = Instant::now();
    let failure = hanging.load(&path).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(failure.reason, FailureReason::TimedOut { seconds: 1 });
    assert_eq!(failure.path, path);
    // A reader that dies with a message.
    let dying = Isolation {
        args: vec![
            "-c".into(),
            "echo 'it broke' >&2; exit 3".into(),
            "sh".into(),
        ],
        ..hanging
    };
    match dying.load(&path).unwrap_err().reason {
        FailureReason::Crashed(msg) => assert!(msg.contains("it broke"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

/// Runs `load_document_bytes` on another thread, failing (not hanging) after `secs`.
fn load_within(
    bytes: Vec<u8>,
    secs: u64,
) -> Result<thinkrag_ingest::Document, thinkrag_ingest::Failure> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let path = std::path::Path::new("fuzz.pdf");
        let _ = tx.send(thinkrag_ingest::load_document_bytes(
            path,
            DocumentKind::Pdf,
            &bytes,
        ));
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .expect("the PDF loads or fails in time, it does not hang")
}

#[test]
fn a_page_that_is_its_own_parent_does_not_hang_extraction() {
    let mut doc = pdf_with_pages(&[&["Cyclic page text."], &["Second page."]]);
    let first = doc.get_pages()[&1];
    doc.get_dictionary_mut(first)
        .unwrap()
        .set("Parent", lopdf::Object::Reference(first));
    let loaded = load_within(pdf_bytes(doc), 60).unwrap();
    assert_eq!(loaded.page_count, 2);
    assert!(loaded.pages.iter().any(|p| p.text.contains("Second page.")));
}

/// Every input the PDF fuzzer (`fuzz/fuzz_targets/pdf.rs`) flagged: panics inside pdf-extract
/// (caught per page by design, and flagged only because libFuzzer's hook aborts on any panic)
/// and two hangs (a page that is its own ancestor). Each must load or fail, promptly.
#[test]
fn inputs_found_by_fuzzing_load_or_fail_promptly() {
    thinkrag_ingest::quiet_parser_panics();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/fuzz/pdf");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        match load_within(bytes, 60) {
            Ok(doc) => assert!(doc.pages.iter().all(|p| !p.text.trim().is_empty())),
            Err(failure) => assert!(!failure.to_string().is_empty()),
        }
        seen += 1;
    }
    assert!(seen >= 2, "fixtures in {}", dir.display());
}
