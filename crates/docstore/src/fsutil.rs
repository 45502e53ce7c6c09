//! Small file-system helpers: a whole file replaced atomically (write a sibling, fsync, rename,
//! fsync the directory), so that a crash leaves either the old or the new content.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::error::{DocStoreError, Result};

/// Replaces `path` with `bytes` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{:08x}", rand::random::<u32>()));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        DocStoreError::io("cannot write", path, e)
    })
}

/// Makes a directory's entries (a rename, a new file) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads a JSON file into `T`, `None` when it does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DocStoreError::io("cannot read", path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| DocStoreError::CorruptMeta {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Writes `value` as pretty JSON to `path` atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).expect("JSON values serialise");
    write_atomic(path, &bytes)
}
