//! The write-ahead log of one collection: every acknowledged change, as one JSON line with the
//! chunks and vectors it produced, fsynced before the write is acknowledged and replayed over the
//! last saved index generation on open. A checkpoint saves a generation and empties the log.
//!
//! Written by hand because the records are few and simple and must share the index's fsync
//! discipline; a database would be a second store to keep consistent with the index.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DocStoreError, Result};

/// One chunk of a document as logged.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub(crate) struct LoggedChunk {
    pub text: String,
    pub start: usize,
    pub end: usize,
}

/// One logged change. Each record is the whole new state of one document, so replaying a record
/// that a checkpoint already holds changes nothing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(crate) enum Record {
    /// The document now holds these fields, chunks and vectors.
    Put {
        id: String,
        fields: serde_json::Value,
        hash: String,
        chunks: Vec<LoggedChunk>,
        vectors: Vec<Vec<f32>>,
    },
    /// The document is gone.
    Delete { id: String },
}

/// An open log, appended to.
#[derive(Debug)]
pub(crate) struct Wal {
    path: PathBuf,
    file: File,
    /// Records in the file.
    pub records: usize,
    /// Bytes in the file.
    pub bytes: u64,
}

impl Wal {
    /// Reads the log at `path` (missing = empty). A last line without its newline is a write
    /// the crash cut short, never acknowledged: it is dropped. Any other damaged line is an error.
    pub fn read(path: &Path) -> Result<Vec<Record>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(DocStoreError::io("cannot read", path, e)),
        };
        let mut reader = BufReader::new(file);
        let mut records = Vec::new();
        let mut line = String::new();
        let mut number = 0;
        loop {
            line.clear();
            let n = reader
                .read_line(&mut line)
                .map_err(|e| DocStoreError::io("cannot read", path, e))?;
            if n == 0 {
                break;
            }
            number += 1;
            if !line.ends_with('\n') {
                tracing::warn!(path = %path.display(), line = number, "dropping a torn last log record");
                break;
            }
            let record =
                serde_json::from_str(line.trim_end()).map_err(|e| DocStoreError::CorruptLog {
                    path: path.to_path_buf(),
                    line: number,
                    reason: e.to_string(),
                })?;
            records.push(record);
        }
        Ok(records)
    }

    /// Starts an empty log at `path`, replacing any there atomically.
    pub fn create(path: &Path) -> Result<Self> {
        crate::fsutil::write_atomic(path, b"")?;
        Self::open_append(path, 0, 0)
    }

    fn open_append(path: &Path, records: usize, bytes: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| DocStoreError::io("cannot open", path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            records,
            bytes,
        })
    }

    /// Appends records and fsyncs: when this returns, they survive a crash.
    pub fn append(&mut self, records: &[Record]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for r in records {
            // Serialising our own types cannot fail.
            serde_json::to_writer(&mut buf, r).expect("a log record serialises");
            buf.push(b'\n');
        }
        self.file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| DocStoreError::io("cannot write", &self.path, e))?;
        self.records += records.len();
        self.bytes += buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(id: &str) -> Record {
        Record::Put {
            id: id.into(),
            fields: serde_json::json!({"_source": {"text": id}}),
            hash: "h".into(),
            chunks: vec![LoggedChunk {
                text: id.into(),
                start: 0,
                end: id.len(),
            }],
            vectors: vec![vec![0.25, -1.5, 1e-7]],
        }
    }

    #[test]
    fn appended_records_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.jsonl");
        let mut wal = Wal::create(&path).unwrap();
        let records = vec![put("a"), Record::Delete { id: "a".into() }, put("b")];
        wal.append(&records[..2]).unwrap();
        wal.append(&records[2..]).unwrap();
        assert_eq!(wal.records, 3);
        assert_eq!(Wal::read(&path).unwrap(), records);
        assert_eq!(Wal::read(&dir.path().join("missing")).unwrap(), vec![]);
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_a_damaged_one_before_it_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.jsonl");
        let mut wal = Wal::create(&path).unwrap();
        wal.append(&[put("a")]).unwrap();
        // A crash in the middle of the next append: the line has no newline, it was never
        // acknowledged.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"op":"put","id":"b","fie"#).unwrap();
        assert_eq!(Wal::read(&path).unwrap(), vec![put("a")]);

        f.write_all(b"\n").unwrap();
        f.write_all(&serde_json::to_vec(&put("c")).unwrap())
            .unwrap();
        f.write_all(b"\n").unwrap();
        match Wal::read(&path) {
            Err(DocStoreError::CorruptLog { line, .. }) => assert_eq!(line, 2),
            other => panic!("expected a corrupt log error, got {other:?}"),
        }
    }
}
