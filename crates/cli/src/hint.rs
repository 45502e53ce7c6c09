//! What to type next: the libraries' errors state facts (no flag names); the CLI adds the flags
//! and commands that fix them.

use thinkrag::index::IndexError;

/// The flag or command that addresses `err`, when there is one.
pub fn for_error(err: &anyhow::Error) -> Option<String> {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<thinkrag::Error>() {
            match e {
                thinkrag::Error::PromptTooLong { .. } => {
                    return Some("lower --max-tokens or raise --context-window".into())
                }
                thinkrag::Error::NoIndex { location } => {
                    return Some(format!(
                        "build it with `thinkrag ingest PATH...` (add `--store {location}` if that is where it should live)"
                    ))
                }
                thinkrag::Error::EmptyIndex { .. } => {
                    return Some("add documents with `thinkrag ingest PATH...`".into())
                }
                thinkrag::Error::Index(ix) => return index_hint(ix),
                _ => {}
            }
        }
        if let Some(ix) = cause.downcast_ref::<IndexError>() {
            return index_hint(ix);
        }
        if cause.to_string().contains("pooling is unknown") {
            return Some("pass --pooling cls (BGE-style) or --pooling mean".into());
        }
    }
    None
}

fn index_hint(e: &IndexError) -> Option<String> {
    match e {
        IndexError::NotFound { .. } => Some("build one with `thinkrag ingest PATH...`".into()),
        IndexError::Corrupt { .. } => {
            Some("re-ingest into a fresh directory with `thinkrag ingest --index DIR`".into())
        }
        IndexError::EmbedderMismatch { index, .. } => Some(format!(
            "pass --embedder {}, or ingest into a new --index directory",
            index.model
        )),
        _ => None,
    }
}
