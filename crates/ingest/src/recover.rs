//! Recovery of damaged PDFs: a file cut short, or one whose cross-reference table points at the
//! wrong offsets, still holds most of its objects. As qpdf and mutool do, the object table is
//! rebuilt by scanning the bytes for `N G obj ... endobj`, and a missing catalog or page tree is
//! replaced by one listing the page objects found, in file order.
//!
//! Written by hand because lopdf (which parses every object) has no reconstruction mode and
//! keeps its object parser private: the scan only finds object boundaries, then hands lopdf a
//! well-formed file (the same bytes with a synthesised xref table and trailer) to parse.

use std::collections::BTreeMap;

use lopdf::{dictionary, Document, Object, ObjectId};

/// Object numbers above this are taken for damage, not objects (PDF's own limit is 8,388,607).
const MAX_OBJECT_NUMBER: u32 = 8_388_607;

/// A document rebuilt from the objects found by scanning `bytes`, or `None` when no page can
/// be found that way. Encrypted files are not attempted (their objects cannot be read without
/// the key from a trailer that may be gone).
pub(crate) fn rebuild(bytes: &[u8]) -> Option<Document> {
    let start = find(bytes, b"%PDF-", 0)?;
    let body = &bytes[start..];
    if find(body, b"/Encrypt", 0).is_some() {
        return None;
    }
    let objects = scan_objects(body);
    if objects.is_empty() {
        return None;
    }
    let root = last_root_reference(body).filter(|(n, _)| objects.contains_key(n));
    let mut doc = Document::load_mem(&with_rebuilt_xref(body, &objects, root)).ok()?;
    if doc.get_pages().is_empty() {
        replace_page_tree(&mut doc);
    }
    (!doc.get_pages().is_empty()).then_some(doc)
}

/// Complete objects by number: (generation, offset in `body`). A later definition of the same
/// number wins, as an incremental update's does.
fn scan_objects(body: &[u8]) -> BTreeMap<u32, (u16, usize)> {
    let mut headers = Vec::new();
    let mut at = 0;
    while let Some(pos) = find(body, b"obj", at) {
        at = pos + 3;
        // `obj` must end a token (not `objstm`, `endobj`) and follow "N G ".
        if body.get(pos + 3).is_some_and(|&b| !is_delimiter(b)) {
            continue;
        }
        if let Some((number, generation, offset)) = object_header_before(body, pos) {
            headers.push((number, generation, offset, pos + 3));
        }
    }
    let mut objects = BTreeMap::new();
    for (i, &(number, generation, offset, content)) in headers.iter().enumerate() {
        // Complete means an `endobj` before the next header (or the end): a cut-off object
        // would otherwise swallow whatever follows it.
        let limit = headers.get(i + 1).map_or(body.len(), |h| h.2);
        if find(&body[..limit], b"endobj", content).is_some() {
            objects.insert(number, (generation, offset));
        }
    }
    objects
}

/// Parses "N G " backwards from the `obj` at `pos`: the object number, generation and the
/// offset where the number starts, which must begin a line or follow a delimiter.
fn object_header_before(body: &[u8], pos: usize) -> Option<(u32, u16, usize)> {
    let mut i = pos;
    let skip_space = |i: &mut usize| {
        let before = *i;
        while *i > 0 && is_space(body[*i - 1]) {
            *i -= 1;
        }
        *i < before
    };
    let digits = |i: &mut usize| {
        let end = *i;
        while *i > 0 && body[*i - 1].is_ascii_digit() && end - *i < 10 {
            *i -= 1;
        }
        (*i < end).then(|| std::str::from_utf8(&body[*i..end]).ok())?
    };
    if !skip_space(&mut i) {
        return None;
    }
    let generation: u16 = digits(&mut i)?.parse().ok()?;
    if !skip_space(&mut i) {
        return None;
    }
    let number: u32 = digits(&mut i)?.parse().ok()?;
    if number == 0 || number > MAX_OBJECT_NUMBER {
        return None;
    }
    if i > 0 && !is_delimiter(body[i - 1]) {
        return None;
    }
    Some((number, generation, i))
}

/// The last `/Root N G R` in the file (the newest trailer or xref stream names the catalog).
fn last_root_reference(body: &[u8]) -> Option<(u32, u16)> {
    let mut found = None;
    let mut at = 0;
    while let Some(pos) = find(body, b"/Root", at) {
        at = pos + 5;
        let rest = &body[at..body.len().min(at + 32)];
        let text = String::from_utf8_lossy(rest);
        let mut words = text.split_ascii_whitespace();
        if let (Some(n), Some(g), Some(r)) = (words.next(), words.next(), words.next()) {
            if r.starts_with('R') {
                if let (Ok(n), Ok(g)) = (n.parse(), g.parse()) {
                    found = Some((n, g));
                }
            }
        }
    }
    found
}

/// `body` followed by a cross-reference table of `objects` and a trailer, as a well-formed PDF
/// ends; lopdf reads the last `startxref`, so the damaged original table is never looked at.
fn with_rebuilt_xref(
    body: &[u8],
    objects: &BTreeMap<u32, (u16, usize)>,
    root: Option<(u32, u16)>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + objects.len() * 20 + 256);
    out.extend_from_slice(body);
    out.extend_from_slice(b"\n");
    let xref_at = out.len();
    out.extend_from_slice(b"xref\n0 1\n0000000000 65535 f\r\n");
    // One subsection per run of consecutive numbers keeps the table small even when the
    // numbers are sparse.
    let numbers: Vec<u32> = objects.keys().copied().collect();
    for run in numbers.chunk_by(|a, b| b.checked_sub(*a) == Some(1)) {
        out.extend_from_slice(format!("{} {}\n", run[0], run.len()).as_bytes());
        for n in run {
            let (generation, offset) = objects[n];
            out.extend_from_slice(format!("{offset:010} {generation:05} n\r\n").as_bytes());
        }
    }
    let size = numbers.last().map_or(1, |n| n + 1);
    out.extend_from_slice(format!("trailer\n<< /Size {size}").as_bytes());
    if let Some((n, g)) = root {
        out.extend_from_slice(format!(" /Root {n} {g} R").as_bytes());
    }
    out.extend_from_slice(format!(" >>\nstartxref\n{xref_at}\n%%EOF\n").as_bytes());
    out
}

/// Gives `doc` a catalog whose page tree lists every page object found, in object order (the
/// order writers number pages in), when its own catalog or tree is gone. A page whose parent
/// survived keeps it, and with it the attributes it inherits; the others get the fonts of
/// every resource dictionary found, since the ones they inherited went with the tree.
fn replace_page_tree(doc: &mut Document) {
    let pages: Vec<ObjectId> = doc
        .objects
        .iter()
        .filter(|(_, o)| {
            o.as_dict()
                .is_ok_and(|d| d.get_type().is_ok_and(|t| t == b"Page"))
        })
        .map(|(id, _)| *id)
        .collect();
    if pages.is_empty() {
        return;
    }
    let tree_id = doc.new_object_id();
    for id in &pages {
        let parent_ok = doc
            .get_dictionary(*id)
            .and_then(|d| d.get(b"Parent"))
            .and_then(Object::as_reference)
            .is_ok_and(|p| doc.get_dictionary(p).is_ok());
        if !parent_ok {
            if let Ok(dict) = doc.get_dictionary_mut(*id) {
                dict.set("Parent", tree_id);
            }
        }
    }
    // Pages often inherit their fonts from the lost tree; without them no text can be
    // decoded. Every font name that any surviving resource dictionary defines is offered.
    let mut fonts = lopdf::Dictionary::new();
    for object in doc.objects.values() {
        let Ok(dict) = object.as_dict() else { continue };
        let named = match dict.get(b"Font") {
            Ok(Object::Dictionary(d)) => Some(d),
            Ok(Object::Reference(id)) => doc.get_dictionary(*id).ok(),
            _ => None,
        };
        for (name, font) in named.into_iter().flat_map(|d| d.iter()) {
            if !fonts.has(name) {
                fonts.set(name.clone(), font.clone());
            }
        }
    }
    let count = i64::try_from(pages.len()).unwrap_or(i64::MAX);
    let kids: Vec<Object> = pages.into_iter().map(Object::Reference).collect();
    doc.objects.insert(
        tree_id,
        Object::Dictionary(dictionary! {
            "Type" => "Pages",
            "Kids" => kids,
            "Count" => count,
            "Resources" => dictionary! { "Font" => fonts },
            // Letter: a page without a surviving MediaBox still needs one to be laid out.
            "MediaBox" => vec![0.into(), 0.into(), 612.into(), 792.into()],
        }),
    );
    let catalog_id = doc.add_object(dictionary! {
        "Type" => "Catalog",
        "Pages" => tree_id,
    });
    doc.trailer.set("Root", catalog_id);
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b'\x0c' | b'\0')
}

fn is_delimiter(b: u8) -> bool {
    is_space(b) || b"()<>[]{}/%".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_complete_objects_only() {
        let body = b"%PDF-1.5\n1 0 obj\n<< /Type /Pages >>\nendobj\n2 0 obj << /A 1 >> endobj\n12 3 obj\n(cut off";
        let objects = scan_objects(body);
        assert_eq!(objects.keys().copied().collect::<Vec<_>>(), [1, 2]);
        assert_eq!(objects[&1], (0, 9));
        let second = body.windows(7).position(|w| w == b"2 0 obj").unwrap();
        assert_eq!(objects[&2], (0, second));
    }

    #[test]
    fn headers_need_two_numbers_and_a_boundary() {
        assert!(scan_objects(b"x1 0 obj endobj 7 obj endobj 3 0 objstm endobj").is_empty());
    }

    #[test]
    fn the_last_root_wins() {
        let body = b"trailer << /Root 3 0 R >> ... trailer << /Size 9 /Root 8 0 R >>";
        assert_eq!(last_root_reference(body), Some((8, 0)));
        assert_eq!(last_root_reference(b"/Root /Name"), None);
    }
}
