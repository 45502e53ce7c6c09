//! Generated PDFs for tests and benchmarks across the workspace (a text PDF with given pages, an
//! image-only page, an encrypted file), written with lopdf so that no fixture files are committed.
//! Not part of the API: it panics on failure, as test code does.

use lopdf::content::{Content, Operation};
use lopdf::{
    dictionary, Document, EncryptionState, EncryptionVersion, Object, Permissions, Stream,
};

/// A PDF with one page per entry; each page shows its lines with Helvetica.
/// A page with no lines gets only a drawn rectangle (a page without a text layer).
pub fn pdf_with_pages(pages: &[&[&str]]) -> Document {
    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let font_id = doc.add_object(dictionary! {
        "Type" => "Font",
        "Subtype" => "Type1",
        "BaseFont" => "Helvetica",
    });
    let resources_id = doc.add_object(dictionary! {
        "Font" => dictionary! { "F1" => font_id },
    });
    let mut kids = Vec::new();
    for lines in pages {
        let mut operations = Vec::new();
        if lines.is_empty() {
            operations.push(Operation::new(
                "re",
                vec![50.into(), 50.into(), 200.into(), 100.into()],
            ));
            operations.push(Operation::new("f", vec![]));
        } else {
            operations.push(Operation::new("BT", vec![]));
            operations.push(Operation::new("Tf", vec!["F1".into(), 12.into()]));
            operations.push(Operation::new("Td", vec![72.into(), 720.into()]));
            for (i, line) in lines.iter().enumerate() {
                if i > 0 {
                    operations.push(Operation::new("Td", vec![0.into(), (-16).into()]));
                }
                operations.push(Operation::new("Tj", vec![Object::string_literal(*line)]));
            }
            operations.push(Operation::new("ET", vec![]));
        }
        let content = Content { operations };
        let content_id = doc.add_object(Stream::new(dictionary! {}, content.encode().unwrap()));
        let page_id = doc.add_object(dictionary! {
            "Type" => "Page",
            "Parent" => pages_id,
            "Contents" => content_id,
        });
        kids.push(page_id.into());
    }
    let count = i64::try_from(kids.len()).unwrap();
    doc.objects.insert(
        pages_id,
        Object::Dictionary(dictionary! {
            "Type" => "Pages",
            "Kids" => kids,
            "Count" => count,
            "Resources" => resources_id,
            "MediaBox" => vec![0.into(), 0.into(), 612.into(), 792.into()],
        }),
    );
    let catalog_id = doc.add_object(dictionary! {
        "Type" => "Catalog",
        "Pages" => pages_id,
    });
    doc.trailer.set("Root", catalog_id);
    // The standard security handler derives its key from the file ID, so give every file one.
    doc.trailer.set(
        "ID",
        Object::Array(vec![
            Object::string_literal(b"0123456789abcdef".to_vec()),
            Object::string_literal(b"0123456789abcdef".to_vec()),
        ]),
    );
    doc
}

/// The bytes of a saved document.
pub fn pdf_bytes(mut doc: Document) -> Vec<u8> {
    let mut out = Vec::new();
    doc.save_to(&mut out).unwrap();
    out
}

/// Encrypts with lopdf's RC4 128-bit standard security handler.
pub fn encrypt(mut doc: Document, user_password: &str) -> Document {
    let state = EncryptionState::try_from(EncryptionVersion::V2 {
        document: &doc,
        owner_password: "owner-secret",
        user_password,
        key_length: 128,
        permissions: Permissions::all(),
    })
    .unwrap();
    doc.encrypt(&state).unwrap();
    doc
}

/// A one-page PDF whose page draws a form XObject that draws itself: a parser that follows
/// `Do` without a depth limit recurses until its stack overflows.
pub fn self_drawing_xobject_pdf() -> Vec<u8> {
    xobject_pdf(|doc, _| {
        let id = doc.new_object_id();
        doc.objects
            .insert(id, Object::Stream(form(id, id, b"/X Do".to_vec())));
        id
    })
}

/// A one-page PDF whose XObjects draw the next one twice, `depth` levels deep: 2^depth draws,
/// so a parser without a budget runs for hours on a few hundred bytes.
pub fn xobject_fan_pdf(depth: usize) -> Vec<u8> {
    xobject_pdf(|doc, _| {
        let ids: Vec<_> = (0..depth).map(|_| doc.new_object_id()).collect();
        for (i, id) in ids.iter().enumerate() {
            let (next, content) = match ids.get(i + 1) {
                Some(next) => (*next, b"/X Do /X Do".to_vec()),
                None => (*id, b"0 0 1 1 re f".to_vec()),
            };
            doc.objects
                .insert(*id, Object::Stream(form(*id, next, content)));
        }
        ids[0]
    })
}

/// A one-page PDF whose content stream is `expanded` zero bytes deflated (about 1,000 times
/// smaller): reading it takes `expanded` bytes of memory.
pub fn flate_bomb_pdf(expanded: usize) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    let block = vec![0u8; 1 << 20];
    let mut left = expanded;
    while left > 0 {
        let n = left.min(block.len());
        z.write_all(&block[..n]).unwrap();
        left -= n;
    }
    let deflated = z.finish().unwrap();
    let mut doc = pdf_with_pages(&[&["placeholder"]]);
    let page = doc.get_pages()[&1];
    let content_id = doc.add_object(Stream::new(
        dictionary! { "Filter" => "FlateDecode" },
        deflated,
    ));
    doc.get_dictionary_mut(page)
        .unwrap()
        .set("Contents", content_id);
    pdf_bytes(doc)
}

/// A form XObject stream with `content`, whose resources name `target` as /X (and Helvetica).
fn form(_id: lopdf::ObjectId, target: lopdf::ObjectId, content: Vec<u8>) -> Stream {
    Stream::new(
        dictionary! {
            "Type" => "XObject",
            "Subtype" => "Form",
            "BBox" => vec![0.into(), 0.into(), 612.into(), 792.into()],
            "Resources" => dictionary! { "XObject" => dictionary! { "X" => target } },
        },
        content,
    )
}

/// A one-page PDF whose page draws the XObject `make` returns, as /X.
fn xobject_pdf(make: impl FnOnce(&mut Document, ()) -> lopdf::ObjectId) -> Vec<u8> {
    let mut doc = pdf_with_pages(&[&["placeholder"]]);
    let first = make(&mut doc, ());
    let page = doc.get_pages()[&1];
    let content_id = doc.add_object(Stream::new(dictionary! {}, b"/X Do".to_vec()));
    let dict = doc.get_dictionary_mut(page).unwrap();
    dict.set("Contents", content_id);
    dict.set(
        "Resources",
        dictionary! { "XObject" => dictionary! { "X" => first } },
    );
    pdf_bytes(doc)
}
