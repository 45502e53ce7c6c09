//! Lexical (BM25) search over the chunk text with tantivy, the keyword half of hybrid search:
//! names, codes, commands and option strings that embeddings blur. The tantivy index lives in
//! memory, kept in step with the chunks as documents come and go, and is saved as files of the
//! index's generation (checksummed like the others; it can always be rebuilt from the chunks).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tantivy::collector::TopDocs;
use tantivy::directory::{Directory, RamDirectory};
use tantivy::query::{BooleanQuery, Occur, PhraseQuery, Query, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST, INDEXED,
};
use tantivy::{doc, IndexReader, IndexWriter, ReloadPolicy, Term};

/// Memory tantivy's single indexing thread buffers before it writes a segment (its minimum is 15 MB).
const WRITER_HEAP_BYTES: usize = 32 * 1024 * 1024;
/// The tantivy file that names the segments; written last when saving.
const META_FILE: &str = "meta.json";

/// A tantivy error, with what was being done.
#[derive(Debug)]
pub(crate) struct LexicalError(pub String);

impl LexicalError {
    fn new(doing: &str, e: impl std::fmt::Display) -> Self {
        LexicalError(format!("{doing}: {e}"))
    }
}

type Result<T> = std::result::Result<T, LexicalError>;

/// BM25 over chunk texts, keyed by chunk id.
pub(crate) struct LexicalIndex {
    index: tantivy::Index,
    id: Field,
    text: Field,
    reader: IndexReader,
    /// Created on the first change (an index that is only searched never starts its thread);
    /// `true` while changes are not yet committed.
    writer: Mutex<(Option<IndexWriter>, bool)>,
}

impl std::fmt::Debug for LexicalIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LexicalIndex").finish_non_exhaustive()
    }
}

fn schema() -> (Schema, Field, Field) {
    let mut builder = Schema::builder();
    let id = builder.add_u64_field("id", FAST | INDEXED);
    // tantivy's default analyzer (split on non-alphanumerics, lower-case, drop >40-byte tokens),
    // without stemming: exact names and option strings are what lexical search is for. Positions
    // are kept for the phrase clause.
    let text = builder.add_text_field(
        "text",
        TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer("default")
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        ),
    );
    (builder.build(), id, text)
}

impl LexicalIndex {
    /// An index of these `(id, text)` chunks, built in memory.
    pub fn build<'a>(chunks: impl Iterator<Item = (u64, &'a str)>) -> Result<Self> {
        let (schema, _, _) = schema();
        let lexical = Self::from_index(tantivy::Index::create_in_ram(schema))?;
        lexical.add(chunks)?;
        lexical.commit()?;
        Ok(lexical)
    }

    /// Reopens an index from the files [`LexicalIndex::files`] gave (already checksummed).
    pub fn from_files(files: Vec<(String, Vec<u8>)>) -> Result<Self> {
        let dir = RamDirectory::create();
        for (name, bytes) in files {
            dir.atomic_write(Path::new(&name), &bytes)
                .map_err(|e| LexicalError::new("loading the lexical index", e))?;
        }
        let index = tantivy::Index::open(dir)
            .map_err(|e| LexicalError::new("opening the lexical index", e))?;
        let (want, _, _) = schema();
        if index.schema() != want {
            return Err(LexicalError(
                "the lexical index has another schema than this version writes".into(),
            ));
        }
        Self::from_index(index)
    }

    fn from_index(index: tantivy::Index) -> Result<Self> {
        let schema = index.schema();
        let field = |name| {
            schema
                .get_field(name)
                .map_err(|e| LexicalError::new("reading the lexical schema", e))
        };
        let (id, text) = (field("id")?, field("text")?);
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(|e| LexicalError::new("opening a lexical reader", e))?;
        Ok(LexicalIndex {
            index,
            id,
            text,
            reader,
            writer: Mutex::new((None, false)),
        })
    }

    fn with_writer<T>(&self, f: impl FnOnce(&mut IndexWriter) -> Result<T>) -> Result<T> {
        let mut guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if guard.0.is_none() {
            let writer = self
                .index
                .writer_with_num_threads(1, WRITER_HEAP_BYTES)
                .map_err(|e| LexicalError::new("starting the lexical writer", e))?;
            guard.0 = Some(writer);
        }
        guard.1 = true;
        f(guard.0.as_mut().expect("just set"))
    }

    /// Adds chunks (visible after the next [`LexicalIndex::commit`]).
    pub fn add<'a>(&self, chunks: impl Iterator<Item = (u64, &'a str)>) -> Result<()> {
        self.with_writer(|w| {
            for (id, text) in chunks {
                w.add_document(doc!(self.id => id, self.text => text))
                    .map_err(|e| LexicalError::new("adding a chunk to the lexical index", e))?;
            }
            Ok(())
        })
    }

    /// Removes chunks by id (visible after the next commit).
    pub fn remove(&self, ids: impl Iterator<Item = u64>) -> Result<()> {
        self.with_writer(|w| {
            for id in ids {
                w.delete_term(Term::from_field_u64(self.id, id));
            }
            Ok(())
        })
    }

    /// Makes pending changes searchable (a no-op without any).
    pub fn commit(&self) -> Result<()> {
        let mut guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if !guard.1 {
            return Ok(());
        }
        if let Some(writer) = guard.0.as_mut() {
            writer
                .commit()
                .map_err(|e| LexicalError::new("committing the lexical index", e))?;
        }
        guard.1 = false;
        drop(guard);
        self.reader
            .reload()
            .map_err(|e| LexicalError::new("reloading the lexical reader", e))
    }

    /// The query's terms in order, as the index analyses text (lower-cased words, numbers).
    fn query_terms(&self, query: &str) -> Result<Vec<Term>> {
        let mut analyzer = self
            .index
            .tokenizer_for_field(self.text)
            .map_err(|e| LexicalError::new("analysing the query", e))?;
        let mut stream = analyzer.token_stream(query);
        let mut terms = Vec::new();
        while stream.advance() {
            terms.push(Term::from_field_text(self.text, &stream.token().text));
        }
        Ok(terms)
    }

    /// The `k` best chunks for `query` by BM25, best first: `(chunk id, score)`.
    ///
    /// The query is plain text, never query syntax (a user's `--no-cache` or `C++` is not an
    /// operator): each of its words is an optional term, and the whole word sequence is an
    /// extra phrase clause, so a chunk holding the exact phrase (a command, an option string)
    /// ranks above one that merely has the words.
    pub fn search(&self, query: &str, k: usize) -> Result<Vec<(u64, f32)>> {
        self.commit()?;
        let terms = self.query_terms(query)?;
        if terms.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        // One optional term per distinct word, and the whole sequence as a phrase.
        let mut seen = std::collections::HashSet::new();
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = terms
            .iter()
            .filter(|t| seen.insert(*t))
            .map(|t| {
                let q: Box<dyn Query> =
                    Box::new(TermQuery::new(t.clone(), IndexRecordOption::WithFreqs));
                (Occur::Should, q)
            })
            .collect();
        if terms.len() >= 2 {
            clauses.push((Occur::Should, Box::new(PhraseQuery::new(terms))));
        }
        let searcher = self.reader.searcher();
        let top = searcher
            .search(&BooleanQuery::new(clauses), &TopDocs::with_limit(k))
            .map_err(|e| LexicalError::new("searching the lexical index", e))?;
        let mut out = Vec::with_capacity(top.len());
        for (score, address) in top {
            let segment = searcher.segment_reader(address.segment_ord);
            let ids = segment
                .fast_fields()
                .u64("id")
                .map_err(|e| LexicalError::new("reading chunk ids", e))?;
            if let Some(id) = ids.first(address.doc_id) {
                out.push((id, score));
            }
        }
        Ok(out)
    }

    /// Number of live (searchable) chunks.
    #[cfg(test)]
    pub fn len(&self) -> Result<u64> {
        self.commit()?;
        Ok(self.reader.searcher().num_docs())
    }

    /// The index as files (name, bytes): what [`LexicalIndex::from_files`] reads back. Pending
    /// changes are committed first.
    #[cfg(test)]
    pub fn files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(self
            .files_except(&|_| false)?
            .into_iter()
            .filter_map(|(name, bytes)| Some((name, bytes?)))
            .collect())
    }

    /// The index's file names, each with its bytes unless `known(name)`: a segment file is
    /// never changed once tantivy wrote it, so one a caller already holds under the same name
    /// need not be read again (the meta file changes with every commit and is always read).
    /// Pending changes are committed first.
    pub fn files_except(
        &self,
        known: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<(String, Option<Vec<u8>>)>> {
        self.commit()?;
        let dir = self.index.directory();
        let metas = self
            .index
            .searchable_segment_metas()
            .map_err(|e| LexicalError::new("listing lexical segments", e))?;
        let mut names: BTreeMap<String, PathBuf> = BTreeMap::new();
        for meta in metas {
            for path in meta.list_files() {
                names.insert(path.to_string_lossy().into_owned(), path);
            }
        }
        let mut out = Vec::with_capacity(names.len() + 1);
        for (name, path) in names {
            // Components a segment does not have (no deletes, no positions) are not written.
            if !dir
                .exists(&path)
                .map_err(|e| LexicalError::new("listing lexical files", e))?
            {
                continue;
            }
            let bytes = if known(&name) {
                None
            } else {
                Some(
                    dir.atomic_read(&path)
                        .map_err(|e| LexicalError::new("reading lexical files", e))?,
                )
            };
            out.push((name, bytes));
        }
        let meta = dir
            .atomic_read(Path::new(META_FILE))
            .map_err(|e| LexicalError::new("reading the lexical meta file", e))?;
        out.push((META_FILE.to_string(), Some(meta)));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(hits: &[(u64, f32)]) -> Vec<u64> {
        hits.iter().map(|h| h.0).collect()
    }

    #[test]
    fn exact_words_and_phrases_rank_first() {
        let chunks = [
            (
                1,
                "Install packages without recommends: apt-get install --no-install-recommends foo.",
            ),
            (
                2,
                "Recommends are installed by default; packages recommend other packages.",
            ),
            (3, "The kernel module loader reads /etc/modprobe.d at boot."),
            (4, "install no recommends"),
        ];
        let lex = LexicalIndex::build(chunks.iter().map(|(i, t)| (*i as u64, *t))).unwrap();
        assert_eq!(lex.len().unwrap(), 4);
        let hits = lex.search("--no-install-recommends", 10).unwrap();
        assert_eq!(hits[0].0, 1, "the exact option string first: {hits:?}");
        assert!(!ids(&hits).contains(&3));
        assert_eq!(ids(&lex.search("modprobe.d", 10).unwrap()), vec![3]);
        assert!(lex.search("zzz qqq", 10).unwrap().is_empty());
        assert!(lex.search("  --  ", 10).unwrap().is_empty());
        // Query syntax is plain text: no error, no operator.
        let syntax = lex.search("recommends:(\"C++\" AND -install)", 10).unwrap();
        assert_eq!(syntax.len(), 3, "every chunk with a word of it: {syntax:?}");
    }

    #[test]
    fn changes_and_files_round_trip() {
        let lex =
            LexicalIndex::build([(1u64, "alpha beta"), (2, "gamma delta")].into_iter()).unwrap();
        lex.remove([1u64].into_iter()).unwrap();
        lex.add([(3u64, "alpha omega")].into_iter()).unwrap();
        assert_eq!(ids(&lex.search("alpha", 10).unwrap()), vec![3]);
        let files = lex.files().unwrap();
        assert!(files.iter().any(|(n, _)| n == META_FILE));
        let back = LexicalIndex::from_files(files).unwrap();
        assert_eq!(back.len().unwrap(), 2);
        assert_eq!(ids(&back.search("alpha", 10).unwrap()), vec![3]);
        assert_eq!(ids(&back.search("gamma", 10).unwrap()), vec![2]);
        // A reopened index takes further changes.
        back.add([(4u64, "gamma ray")].into_iter()).unwrap();
        assert_eq!(back.search("gamma", 10).unwrap().len(), 2);
    }
}
