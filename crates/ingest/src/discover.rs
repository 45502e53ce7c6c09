//! Finding the files to ingest under the paths a user names: directories are walked
//! recursively, hidden entries are skipped, and anything we cannot ingest is either ignored
//! (inside a directory) or reported (when named explicitly).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use walkdir::{DirEntry, WalkDir};

use crate::document::DocumentKind;
use crate::failure::{Failure, FailureReason};

/// Finds the files to ingest under the given paths.
///
/// Files and directories are accepted; directories are walked recursively (following
/// symbolic links, with walkdir's loop detection). Only `.pdf`, `.txt`, `.md` and `.markdown`
/// files (extension case-insensitive) are returned, sorted and deduplicated (two spellings of
/// the same file count once, by canonical path). Below a named directory, hidden entries
/// (name starting with `.`, such as `.git`) are skipped; a named path is never skipped.
///
/// Failures: a named path that does not exist or cannot be read is an `Io` failure, a named
/// file with an unsupported extension is `Unsupported`, and a directory entry that cannot be
/// read during the walk is an `Io` failure for that entry.
pub fn discover(paths: &[PathBuf]) -> (Vec<PathBuf>, Vec<Failure>) {
    let mut found = Vec::new();
    let mut failures = Vec::new();

    for root in paths {
        let meta = match std::fs::metadata(root) {
            Ok(meta) => meta,
            Err(e) => {
                failures.push(Failure::file(root, e.into()));
                continue;
            }
        };
        if !meta.is_dir() {
            if DocumentKind::from_path(root).is_some() {
                found.push(root.clone());
            } else {
                failures.push(Failure::file(root, FailureReason::Unsupported));
            }
            continue;
        }
        let walk = WalkDir::new(root)
            .follow_links(true)
            .into_iter()
            .filter_entry(|entry| entry.depth() == 0 || !is_hidden(entry));
        for entry in walk {
            match entry {
                Ok(entry) => {
                    if entry.file_type().is_file()
                        && DocumentKind::from_path(entry.path()).is_some()
                    {
                        found.push(entry.into_path());
                    }
                }
                Err(e) => {
                    let path = e.path().unwrap_or(root).to_path_buf();
                    failures.push(Failure::file(path, FailureReason::Io(e.to_string())));
                }
            }
        }
    }

    found.sort();
    let mut seen = HashSet::new();
    found.retain(|path| seen.insert(identity(path)));
    (found, failures)
}

fn is_hidden(entry: &DirEntry) -> bool {
    entry
        .file_name()
        .to_str()
        .is_some_and(|name| name.starts_with('.'))
}

/// What makes two paths the same file: the canonical path where it can be had.
fn identity(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}
