//! Test inputs built on the fly: small PDFs written with lopdf, a tiny BERT-like tokenizer.
//! Nothing is downloaded and no fixture files are checked in.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A word-level tokenizer that, like BERT's, wraps every input in `[CLS] ... [SEP]`.
/// Words outside the small vocabulary become `[UNK]`, so any text can be encoded and every
/// whitespace- or punctuation-separated word is exactly one token.
pub fn tiny_bert_tokenizer() -> tokenizers::Tokenizer {
    let words = [
        "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "a", "and", "of", "to",
        "in", "is", "it", ".", ",",
    ];
    let mut vocab = String::from(r#""[UNK]": 0, "[CLS]": 1, "[SEP]": 2"#);
    for (i, word) in words.iter().enumerate() {
        vocab.push_str(&format!(r#", "{word}": {}"#, i + 3));
    }
    let json = format!(
        r#"{{
            "version": "1.0",
            "normalizer": {{ "type": "Lowercase" }},
            "pre_tokenizer": {{ "type": "Whitespace" }},
            "post_processor": {{ "type": "BertProcessing", "sep": ["[SEP]", 2], "cls": ["[CLS]", 1] }},
            "model": {{ "type": "WordLevel", "vocab": {{ {vocab} }}, "unk_token": "[UNK]" }}
        }}"#
    );
    json.parse().unwrap()
}
