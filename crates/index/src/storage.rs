//! On-disk layout of an index directory: the manifest, generation directories, the raw vector
//! file, atomic replacement (write, fsync, rename) and the advisory lock that serialises writers.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use fs2::FileExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::vector::HnswParams;
use crate::{EmbedderInfo, IndexError};

/// Name of the manifest file; the only file that is ever replaced in place.
pub(crate) const MANIFEST: &str = "index.json";
/// Temporary name the next manifest is written under before the atomic rename.
pub(crate) const MANIFEST_TMP: &str = "index.json.tmp";
/// Advisory lock file: writers take it exclusively, readers shared.
pub(crate) const LOCK: &str = ".lock";
/// Value of the manifest's `format` field.
pub(crate) const FORMAT_NAME: &str = "thinkrag-index";
/// The newest format version this build reads: 2 adds segments and tombstones (an
/// incremental save). A save that writes everything afresh still writes version 1, which
/// older builds read.
pub(crate) const FORMAT_VERSION: u64 = 2;
/// The version of a generation without segments or tombstones.
pub(crate) const FORMAT_VERSION_PLAIN: u64 = 1;
/// Chunk records, one JSON object per line, in vector order.
pub(crate) const CHUNKS_FILE: &str = "chunks.jsonl";
/// Per-document bookkeeping, a JSON array.
pub(crate) const DOCUMENTS_FILE: &str = "documents.json";
/// Raw normalised vectors.
pub(crate) const VECTORS_FILE: &str = "vectors.f32";
/// A copy of the generation's manifest inside its directory, so a damaged `index.json` or a
/// damaged newer generation can fall back to an intact generation.
pub(crate) const GENERATION_MANIFEST: &str = "manifest.json";
/// Basename the graph is dumped under.
pub(crate) const GRAPH_BASENAME: &str = "hnsw";

/// Subdirectory of a generation holding the lexical (tantivy) index's files.
pub(crate) const LEXICAL_DIR: &str = "lexical";

/// Header of `vectors.f32`: magic, then dim and count as little-endian u64.
const VECTORS_MAGIC: &[u8; 8] = b"TRVECF32";
const VECTORS_HEADER: usize = 8 + 8 + 8;

/// The manifest, `dir/index.json`. Switching it atomically is what publishes a new version.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct Manifest {
    pub format: String,
    pub version: u64,
    /// Name of the generation directory holding this version's files, `gen-NNNNNN`.
    pub generation: String,
    pub embedder: EmbedderInfo,
    pub chunks: usize,
    pub documents: usize,
    pub next_id: u64,
    pub saved_at: u64,
    pub hnsw_params: HnswParams,
    /// The graph files, if a graph was written (none for an empty index).
    pub graph: Option<GraphFiles>,
    /// Checksums of the generation's other files, verified on open (absent in indexes written
    /// before they were recorded; those are read unverified).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<FileChecksums>,
    /// The lexical index's files (absent in indexes written before lexical search: their
    /// lexical index is built from the chunks on first use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lexical: Option<LexicalFiles>,
    /// Version 2: the chunk and vector files, in slot order (the first may be `chunks.jsonl` and
    /// `vectors.f32`); empty in version 1, whose only files are those two.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<SegmentFiles>,
    /// Version 2: ids of chunks still in the segments but removed (a document replaced or
    /// dropped since the segment was written); they are skipped on open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tombstones: Vec<u64>,
    /// Version 2: how many of the first slots the graph dump holds (the rest are inserted on
    /// open); absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph_points: Option<usize>,
}

impl Manifest {
    /// The generation's segments, in slot order: version 1's implicit one (`chunks.jsonl` and
    /// `vectors.f32`, with the checksums of `files` when recorded) or version 2's list.
    pub(crate) fn segment_files(&self) -> Vec<SegmentFiles> {
        if !self.segments.is_empty() {
            return self.segments.clone();
        }
        let sums = self.files.as_ref();
        vec![SegmentFiles {
            chunks_file: CHUNKS_FILE.into(),
            vectors_file: VECTORS_FILE.into(),
            count: self.chunks,
            chunks_sha256: sums.map(|s| s.chunks_sha256.clone()).unwrap_or_default(),
            vectors_sha256: sums.map(|s| s.vectors_sha256.clone()).unwrap_or_default(),
        }]
    }
}

/// One segment of a version-2 generation: chunk records and their vectors for consecutive
/// slots. Segments are never modified: a later generation hard-links the ones it keeps.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub(crate) struct SegmentFiles {
    /// The chunk records file (JSON lines), in the generation directory.
    pub chunks_file: String,
    /// The vectors file (the `vectors.f32` format).
    pub vectors_file: String,
    /// Records (slots) in the segment, removed ones included.
    pub count: usize,
    pub chunks_sha256: String,
    pub vectors_sha256: String,
}

impl SegmentFiles {
    /// Whether the file names stay inside the generation directory.
    pub(crate) fn names_are_plain(&self) -> bool {
        [&self.chunks_file, &self.vectors_file]
            .iter()
            .all(|n| !n.is_empty() && !n.contains(['/', '\\']) && !n.starts_with(".."))
    }
}

/// Puts `from` at `to` without copying data when the file system allows (a hard link: a
/// generation shares the unchanged files of the one before), else copies it; fsynced either way.
pub(crate) fn link_or_copy(from: &Path, to: &Path) -> Result<(), IndexError> {
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to).map_err(|e| IndexError::io(to, e))?;
        sync_file(to)?;
    }
    Ok(())
}

/// The tantivy files of one generation's lexical index (in `LEXICAL_DIR`), with checksums.
/// Derived data: a damaged or missing file means "rebuild it from the chunks", never an error.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub(crate) struct LexicalFiles {
    /// File name (tantivy's own, no directories) -> SHA-256 hex.
    pub sha256: std::collections::BTreeMap<String, String>,
}

/// SHA-256 of each data file of a generation: a bit flip in a chunk's text or a vector would
/// otherwise still parse, and be served as if it were what was ingested.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileChecksums {
    pub chunks_sha256: String,
    pub documents_sha256: String,
    pub vectors_sha256: String,
}

/// The graph dump of one generation, with checksums: the loader checks the structure, and the
/// hashes catch damage that would still be well formed. `graph_sha256` is the level-0 links
/// file's, `data_sha256` the header and upper levels' (the names are those of the earlier
/// hnsw_rs dump, kept so manifests keep one shape).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct GraphFiles {
    pub basename: String,
    pub graph_sha256: String,
    pub data_sha256: String,
}

/// Parses `gen-NNNNNN` into its number; anything else (including path tricks) is `None`.
pub(crate) fn generation_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("gen-")?;
    if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The directory name of generation `n`.
pub(crate) fn generation_name(n: u64) -> String {
    format!("gen-{n:06}")
}

/// Names of all generation directories in `dir`.
pub(crate) fn list_generations(dir: &Path) -> Result<Vec<String>, IndexError> {
    let mut out = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| IndexError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| IndexError::io(dir, e))?;
        if let Some(name) = entry.file_name().to_str() {
            if generation_number(name).is_some() && entry.path().is_dir() {
                out.push(name.to_string());
            }
        }
    }
    Ok(out)
}

/// Reads and validates the manifest of `dir`.
pub(crate) fn read_manifest(dir: &Path) -> Result<Manifest, IndexError> {
    read_manifest_file(dir, &dir.join(MANIFEST))
}

/// Reads and validates the copy of its manifest a generation directory holds.
pub(crate) fn read_generation_manifest(gen_dir: &Path) -> Result<Manifest, IndexError> {
    read_manifest_file(gen_dir, &gen_dir.join(GENERATION_MANIFEST))
}

fn read_manifest_file(dir: &Path, path: &Path) -> Result<Manifest, IndexError> {
    let path = path.to_path_buf();
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(IndexError::NotFound {
                dir: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(IndexError::io(&path, e)),
    };
    // Look at format and version before the full schema, so a newer version whose fields
    // changed is reported as "newer", not as corrupt.
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| IndexError::corrupt(&path, format!("not valid JSON ({e})")))?;
    let format = value.get("format").and_then(|v| v.as_str());
    if format != Some(FORMAT_NAME) {
        return Err(IndexError::corrupt(
            &path,
            format!("not a thinkrag index manifest (format field is {format:?})"),
        ));
    }
    let version = value
        .get("version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| IndexError::corrupt(&path, "missing or invalid version field"))?;
    if version > FORMAT_VERSION {
        return Err(IndexError::NewerFormat {
            path,
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if version < FORMAT_VERSION_PLAIN {
        return Err(IndexError::corrupt(
            &path,
            format!("unknown format version {version}"),
        ));
    }
    let manifest: Manifest = serde_json::from_value(value)
        .map_err(|e| IndexError::corrupt(&path, format!("invalid manifest ({e})")))?;
    if generation_number(&manifest.generation).is_none() {
        return Err(IndexError::corrupt(
            &path,
            format!("invalid generation name {:?}", manifest.generation),
        ));
    }
    if manifest.embedder.dim == 0 {
        return Err(IndexError::corrupt(&path, "embedder dimension is 0"));
    }
    Ok(manifest)
}

/// Reads a whole data file of a generation.
pub(crate) fn read_data(path: &Path) -> Result<Vec<u8>, IndexError> {
    fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => IndexError::corrupt(path, "file is missing"),
        _ => IndexError::io(path, e),
    })
}

/// Hex SHA-256 of bytes.
pub(crate) fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Checks a data file's bytes against the SHA-256 recorded when it was written (if any). Run
/// after parsing, so a truncated or malformed file gets the parser's more precise message.
pub(crate) fn verify_sha256(
    path: &Path,
    bytes: &[u8],
    want: Option<&str>,
) -> Result<(), IndexError> {
    let Some(want) = want else { return Ok(()) };
    let got = sha256_bytes(bytes);
    if got == want {
        return Ok(());
    }
    Err(IndexError::corrupt(
        path,
        format!(
            "checksum mismatch (SHA-256 {got}, written as {want}): the file was damaged or changed after it was saved"
        ),
    ))
}

/// Writes the manifest of `dir` atomically: temp file, fsync, rename over, fsync the directory.
pub(crate) fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), IndexError> {
    let tmp = dir.join(MANIFEST_TMP);
    let json = serde_json::to_vec_pretty(manifest).map_err(|e| IndexError::GraphDump {
        path: tmp.clone(),
        message: format!("could not serialise the manifest: {e}"),
    })?;
    write_file_synced(&tmp, &json)?;
    let path = dir.join(MANIFEST);
    fs::rename(&tmp, &path).map_err(|e| IndexError::io(&path, e))?;
    sync_dir(dir)
}

/// Creates (truncating) `path`, writes `bytes` and fsyncs it.
pub(crate) fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<(), IndexError> {
    let mut f = File::create(path).map_err(|e| IndexError::io(path, e))?;
    f.write_all(bytes).map_err(|e| IndexError::io(path, e))?;
    f.sync_all().map_err(|e| IndexError::io(path, e))
}

/// Fsyncs an existing file.
pub(crate) fn sync_file(path: &Path) -> Result<(), IndexError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| IndexError::io(path, e))
}

/// Fsyncs a directory so that renames and new entries in it survive a power cut.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), IndexError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| IndexError::io(dir, e))
    }
    // Windows cannot open directories as files; NTFS journals the rename itself.
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Writes the vectors file: header then `flat` as little-endian f32, fsynced; returns the hex
/// SHA-256 of what it wrote.
pub(crate) fn write_vectors(path: &Path, flat: &[f32], dim: usize) -> Result<String, IndexError> {
    let f = File::create(path).map_err(|e| IndexError::io(path, e))?;
    let mut w = HashingWriter::new(BufWriter::with_capacity(1 << 20, f));
    let count = flat.len().checked_div(dim).unwrap_or(0);
    let mut header = Vec::with_capacity(VECTORS_HEADER);
    header.extend_from_slice(VECTORS_MAGIC);
    header.extend_from_slice(&(dim as u64).to_le_bytes());
    header.extend_from_slice(&(count as u64).to_le_bytes());
    w.write_all(&header).map_err(|e| IndexError::io(path, e))?;
    let mut buf = Vec::with_capacity(64 * 1024);
    for block in flat.chunks(16 * 1024) {
        buf.clear();
        for x in block {
            buf.extend_from_slice(&x.to_le_bytes());
        }
        w.write_all(&buf).map_err(|e| IndexError::io(path, e))?;
    }
    let (w, sha256) = w.finish();
    let f = w
        .into_inner()
        .map_err(|e| IndexError::io(path, e.into_error()))?;
    f.sync_all().map_err(|e| IndexError::io(path, e))?;
    Ok(sha256)
}

/// A writer that hashes what passes through it, so a file's checksum costs no second read.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
        }
    }

    /// The inner writer and the hex SHA-256 of everything written.
    pub(crate) fn finish(self) -> (W, String) {
        (self.inner, hex(&self.hasher.finalize()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Parses the vectors file's bytes, checking header, dimension, count and exact length.
pub(crate) fn parse_vectors(
    path: &Path,
    bytes: &[u8],
    dim: usize,
    count: usize,
) -> Result<Vec<f32>, IndexError> {
    let expected = count
        .checked_mul(dim)
        .and_then(|n| n.checked_mul(4))
        .and_then(|n| n.checked_add(VECTORS_HEADER))
        .ok_or_else(|| IndexError::corrupt(path, "manifest counts overflow"))?;
    let actual = bytes.len();
    if actual != expected {
        return Err(IndexError::corrupt(
            path,
            format!(
                "{actual} bytes, expected {expected} for {count} vectors of dimension {dim} (truncated or overwritten)"
            ),
        ));
    }
    if &bytes[..8] != VECTORS_MAGIC {
        return Err(IndexError::corrupt(path, "bad magic number"));
    }
    let h_dim = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
    let h_count = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or_default());
    if h_dim != dim as u64 || h_count != count as u64 {
        return Err(IndexError::corrupt(
            path,
            format!("header says {h_count} vectors of dimension {h_dim}, manifest says {count} of dimension {dim}"),
        ));
    }
    let flat: Vec<f32> = bytes[VECTORS_HEADER..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(pos) = flat.iter().position(|x| !x.is_finite()) {
        return Err(IndexError::corrupt(
            path,
            format!("vector {} holds a non-finite value", pos / dim.max(1)),
        ));
    }
    Ok(flat)
}

/// Hex SHA-256 of a file's contents.
pub(crate) fn sha256_file(path: &Path) -> Result<String, IndexError> {
    let mut f = File::open(path).map_err(|e| IndexError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| IndexError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Paths of the two files of a graph dump.
pub(crate) fn graph_paths(gen_dir: &Path, basename: &str) -> (PathBuf, PathBuf) {
    crate::VectorIndex::dump_paths(gen_dir, basename)
}

/// The graph file an index saved before thinkrag's own graph (by hnsw_rs) has instead.
pub(crate) fn legacy_graph_path(gen_dir: &Path, basename: &str) -> PathBuf {
    gen_dir.join(format!("{basename}.hnsw.graph"))
}

/// Total size in bytes of the regular files under `path` (recursively).
pub(crate) fn tree_size(path: &Path) -> Result<u64, IndexError> {
    let meta = fs::symlink_metadata(path).map_err(|e| IndexError::io(path, e))?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    if !meta.is_dir() {
        return Ok(0);
    }
    let mut total = 0;
    for entry in fs::read_dir(path).map_err(|e| IndexError::io(path, e))? {
        let entry = entry.map_err(|e| IndexError::io(path, e))?;
        total += tree_size(&entry.path())?;
    }
    Ok(total)
}

/// An advisory lock on `dir/.lock`, released when dropped (the OS releases it if the process dies).
/// The lock file, created if missing and never truncated (its content is irrelevant).
fn open_lock_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the exclusive (writer) lock, waiting for other holders.
    pub(crate) fn exclusive(dir: &Path) -> Result<Self, IndexError> {
        let path = dir.join(LOCK);
        let file = open_lock_file(&path).map_err(|e| IndexError::io(&path, e))?;
        // Fully qualified: std's own File locking methods (Rust 1.89) are newer than our MSRV.
        if FileExt::try_lock_exclusive(&file).is_err() {
            tracing::info!(lock = %path.display(), "waiting for another thinkrag process to finish with the index");
            FileExt::lock_exclusive(&file).map_err(|e| IndexError::io(&path, e))?;
        }
        Ok(DirLock { _file: file })
    }

    /// Takes the shared (reader) lock so a concurrent save cannot delete the generation being
    /// read. Best effort: on a read-only index directory there is no lock to take, and reading
    /// still works because nobody can be writing there.
    pub(crate) fn shared(dir: &Path) -> Option<Self> {
        let path = dir.join(LOCK);
        let file = open_lock_file(&path).or_else(|_| File::open(&path)).ok()?;
        match FileExt::lock_shared(&file) {
            Ok(()) => Some(DirLock { _file: file }),
            Err(e) => {
                tracing::debug!(lock = %path.display(), error = %e, "could not take the shared index lock");
                None
            }
        }
    }
}
