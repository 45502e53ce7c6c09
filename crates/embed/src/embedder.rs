//! The embedder: a BERT-family model with its tokenizer, turning passages and queries into
//! L2-normalised vectors, in padded, masked batches on candle, or packed on AMX tiles.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config as BertConfig;

use crate::bert::BertEncoder;
use crate::packed::PackedBert;
use serde::{Deserialize, Serialize};
use thinkrag_hub::{HubOptions, RepoFiles};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::error::{EmbedError, Result};
use crate::manifest::EmbedderManifest;
use crate::pooling::{l2_normalize, Pooling};

/// What the user named as the embedder.
#[derive(Debug, Clone)]
pub enum EmbedderSource {
    /// A directory with config.json, tokenizer.json and model.safetensors.
    Dir(PathBuf),
    /// A built-in embedder.
    Manifest(Box<EmbedderManifest>),
    /// A hub repository without a manifest.
    Repo {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
    },
}

impl EmbedderSource {
    /// Makes sure the model's files are local (downloading them into the Hugging Face cache when
    /// needed and allowed) and returns their directory.
    pub fn fetch(&self, hub: &HubOptions) -> Result<PathBuf> {
        resolve(self, hub).map(|f| f.dir)
    }

    /// The spec that loads this source again: an absolute directory, a built-in name, or
    /// `owner/name@revision`.
    pub fn spec(&self) -> String {
        match self {
            Self::Dir(dir) => std::path::absolute(dir)
                .unwrap_or_else(|_| dir.clone())
                .display()
                .to_string(),
            Self::Manifest(m) => m.name.clone(),
            Self::Repo { repo, revision } if revision == "main" => repo.clone(),
            Self::Repo { repo, revision } => format!("{repo}@{revision}"),
        }
    }

    /// Interprets `spec`: an existing directory, a built-in name or repo, or `owner/name[@rev]`.
    pub fn parse(spec: &str) -> Result<Self> {
        use thinkrag_hub::ModelSpec;
        let rules = thinkrag_hub::SpecRules {
            kind: "embedder",
            file_extension: None,
            dir_contents: "config.json, tokenizer.json and model.safetensors",
        };
        let unknown = |spec: String, message: String| EmbedError::UnknownModel { spec, message };
        match thinkrag_hub::parse_spec(spec, EmbedderManifest::builtin(), rules) {
            Ok(ModelSpec::Dir(dir)) => Ok(Self::Dir(dir)),
            Ok(ModelSpec::Manifest(m)) => Ok(Self::Manifest(Box::new(m))),
            Ok(ModelSpec::Repo { repo, revision }) => Ok(Self::Repo { repo, revision }),
            // Embedders have no single-file format, so these never parse.
            Ok(ModelSpec::File(_) | ModelSpec::RepoFile { .. }) => Err(unknown(
                spec.into(),
                "embedders are directories, not single files".into(),
            )),
            Err(e) => Err(unknown(e.spec, e.message)),
        }
    }
}

/// Whether queries get the model's instruction prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum QueryInstruction {
    /// The model's own (BGE: on; MiniLM: none).
    #[default]
    ModelDefault,
    /// Never.
    Off,
    /// This prefix instead.
    Custom(String),
}

/// The arithmetic of an embedder's projections on a CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EmbedderPrecision {
    /// bf16 x bf16 -> f32 on AMX tiles where the CPU has them (Intel Sapphire Rapids and later:
    /// 1.5 to 2.5 times faster, embeddings within cosine 0.9999 of f32) and the process has
    /// asked for them with [`crate::request_amx_tiles`] (the thinkrag binary does), f32 elsewhere.
    #[default]
    Auto,
    /// f32 throughout.
    F32,
}

impl std::str::FromStr for EmbedderPrecision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            other => Err(format!(
                "unknown embedder precision {other:?}: expected auto or f32"
            )),
        }
    }
}

/// How to load and run an embedder.
#[derive(Debug, Clone)]
pub struct EmbedderOptions {
    /// Where it runs.
    pub device: Device,
    /// Most passages per forward pass.
    pub batch_size: usize,
    /// Most tokens per forward pass, padding included (passages x the longest one's tokens), as
    /// text-embeddings-inference sizes its batches: long passages go in small batches, short ones
    /// in large ones, and memory per batch stays bounded.
    pub max_batch_tokens: usize,
    /// The query prefix.
    pub query_instruction: QueryInstruction,
    /// Overrides the model's pooling (needed only for a directory that does not say).
    pub pooling: Option<Pooling>,
    /// Hub access.
    pub hub: HubOptions,
    /// The projections' arithmetic on a CPU.
    pub precision: EmbedderPrecision,
}

impl Default for EmbedderOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            batch_size: 256,
            max_batch_tokens: 8192,
            query_instruction: QueryInstruction::ModelDefault,
            pooling: None,
            hub: HubOptions::from_env(),
            precision: EmbedderPrecision::Auto,
        }
    }
}

/// What an embedder is, as recorded in an index so that queries use the same one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbedderSpec {
    /// The model's identity: its published name when known (`BAAI/bge-base-en-v1.5`), else the
    /// directory's name.
    pub model: String,
    /// Output dimensions.
    pub dim: usize,
    /// Pooling.
    pub pooling: Pooling,
    /// L2-normalised vectors.
    pub normalized: bool,
    /// Longest input in tokens, special tokens included.
    pub max_tokens: usize,
    /// The prefix put before queries, if any.
    pub query_instruction: Option<String>,
    /// How to load it again: a model directory's absolute path, a built-in name, or a hub repo.
    pub source: String,
}

/// Vectors for a batch of passages.
#[derive(Debug, Clone, Default)]
pub struct Embedded {
    /// One vector per input, in input order.
    pub vectors: Vec<Vec<f32>>,
    /// How many inputs were longer than the model's limit and were cut.
    pub truncated: usize,
}

/// The encoder an embedder runs.
enum Encoder {
    /// Padded, masked batches on candle: on a GPU, and for activations other than GELU.
    Candle(BertEncoder),
    /// Packed tokens on the CPU (AMX tiles or f32).
    Packed(PackedBert),
}

/// A loaded embedding model.
pub struct Embedder {
    model: Encoder,
    tokenizer: Tokenizer,
    device: Device,
    spec: EmbedderSpec,
    batch_size: usize,
    max_batch_tokens: usize,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("spec", &self.spec)
            .finish()
    }
}

/// The local files of an embedder, plus what a manifest says about it.
pub(crate) struct Files {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub weights: PathBuf,
    pub manifest: Option<EmbedderManifest>,
    pub identity: String,
}

pub(crate) fn resolve(source: &EmbedderSource, hub: &HubOptions) -> Result<Files> {
    let from_repo = |repo: &str, revision: &str, manifest: Option<EmbedderManifest>| {
        let files = RepoFiles::new(repo, revision, hub)?;
        let config = files.require("config.json")?;
        let tokenizer = files.require("tokenizer.json")?;
        let weights = files.require("model.safetensors")?;
        // Optional sentence-transformers files that say the pooling and the token limit.
        for optional in ["1_Pooling/config.json", "sentence_bert_config.json"] {
            files.get(optional, false)?;
        }
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok::<_, EmbedError>(Files {
            dir,
            config,
            tokenizer,
            weights,
            identity: manifest
                .as_ref()
                .map(|m| m.display_name.clone())
                .unwrap_or_else(|| repo.to_string()),
            manifest,
        })
    };
    match source {
        EmbedderSource::Manifest(m) => from_repo(&m.hub.repo, &m.hub.revision, Some((**m).clone())),
        EmbedderSource::Repo { repo, revision } => {
            from_repo(repo, revision, EmbedderManifest::find(repo))
        }
        EmbedderSource::Dir(dir) => {
            let need = |file: &str| {
                let p = dir.join(file);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(EmbedError::MissingFile {
                        dir: dir.clone(),
                        file: file.into(),
                        hint: "an embedding model directory needs config.json, tokenizer.json and model.safetensors".into(),
                    })
                }
            };
            let manifest = EmbedderManifest::recognise(dir);
            let identity = match &manifest {
                Some(m) => m.display_name.clone(),
                None => dir
                    .canonicalize()
                    .unwrap_or_else(|_| dir.clone())
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| dir.display().to_string()),
            };
            Ok(Files {
                config: need("config.json")?,
                tokenizer: need("tokenizer.json")?,
                weights: need("model.safetensors")?,
                dir: dir.clone(),
                manifest,
                identity,
            })
        }
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| EmbedError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| EmbedError::Parse {
        path: path.to_path_buf(),
        format: "JSON",
        message: e.to_string(),
    })
}

/// The longest input the model takes: sentence-transformers' `max_seq_length` when present (it is
/// what the reference implementation uses), else the manifest's, else the position table's size.
fn max_tokens(files: &Files, cfg: &BertConfig) -> Result<usize> {
    let st = files.dir.join("sentence_bert_config.json");
    let from_st = if st.is_file() {
        let v: serde_json::Value = read_json(&st)?;
        v.get("max_seq_length")
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
    } else {
        None
    };
    let limit = from_st
        .or(files.manifest.as_ref().map(|m| m.max_tokens))
        .unwrap_or(cfg.max_position_embeddings);
    Ok(limit.clamp(2, cfg.max_position_embeddings))
}

fn check_architecture(path: &Path, identity: &str) -> Result<BertConfig> {
    let raw: serde_json::Value = read_json(path)?;
    let model_type = raw.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    let archs: Vec<&str> = raw
        .get("architectures")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    if model_type != "bert" && !archs.iter().any(|a| a.starts_with("Bert")) {
        return Err(EmbedError::Unsupported {
            model: identity.into(),
            message: format!(
                "{} says model_type {model_type:?} ({}); thinkrag embeds with BERT-family models (BGE, MiniLM)",
                path.display(),
                archs.join(", ")
            ),
        });
    }
    serde_json::from_value(raw).map_err(|e| EmbedError::Parse {
        path: path.to_path_buf(),
        format: "BERT config JSON",
        message: e.to_string(),
    })
}

impl Embedder {
    /// Loads an embedder from a directory, a built-in name or a hub repo.
    pub fn load(source: &EmbedderSource, opts: &EmbedderOptions) -> Result<Self> {
        let files = resolve(source, &opts.hub)?;
        let cfg = check_architecture(&files.config, &files.identity)?;
        let pooling = match opts.pooling {
            Some(p) => p,
            None => match Pooling::from_sentence_transformers(&files.dir)? {
                Some(p) => p,
                None => match &files.manifest {
                    Some(m) => m.pooling,
                    None => {
                        return Err(EmbedError::Unsupported {
                            model: files.identity.clone(),
                            message: format!(
                                "{} has no 1_Pooling/config.json and is not a built-in model, so its pooling is unknown: choose cls (BGE-style) or mean (sentence-transformers style)",
                                files.dir.display()
                            ),
                        })
                    }
                },
            },
        };
        let max_tokens = max_tokens(&files, &cfg)?;
        let tokenizer = configure_tokenizer(&files.tokenizer, max_tokens, cfg.vocab_size, |t| {
            // BERT vocabularies name it [PAD]; the config's id otherwise.
            let token = "[PAD]".to_string();
            (
                t.token_to_id(&token).unwrap_or(cfg.pad_token_id as u32),
                token,
            )
        })?;
        let model = load_weights(&files.weights, &opts.device, |vb| {
            BertEncoder::load(vb, &cfg)
        })?;
        // On the CPU the packed encoder takes over and candle's copy of the weights is dropped.
        let model = match model.packed(opts.precision == EmbedderPrecision::Auto)? {
            Some(packed) => {
                tracing::debug!(
                    tiles = packed.uses_tiles(),
                    "embedder runs on packed tokens"
                );
                Encoder::Packed(packed)
            }
            None => Encoder::Candle(model),
        };
        let model_instruction = files
            .manifest
            .as_ref()
            .and_then(|m| m.query_instruction.clone());
        let query_instruction = match &opts.query_instruction {
            QueryInstruction::ModelDefault => model_instruction,
            QueryInstruction::Off => None,
            QueryInstruction::Custom(s) => Some(s.clone()),
        };
        Ok(Self {
            model,
            tokenizer,
            device: opts.device.clone(),
            spec: EmbedderSpec {
                model: files.identity,
                dim: cfg.hidden_size,
                pooling,
                normalized: true,
                max_tokens,
                query_instruction,
                source: source.spec(),
            },
            batch_size: opts.batch_size.max(1),
            max_batch_tokens: opts.max_batch_tokens.max(1),
        })
    }

    /// Whether the projections run as bf16 on AMX tiles (see [`EmbedderPrecision::Auto`]).
    pub fn uses_amx(&self) -> bool {
        matches!(&self.model, Encoder::Packed(p) if p.uses_tiles())
    }

    /// What this embedder is.
    pub fn spec(&self) -> &EmbedderSpec {
        &self.spec
    }

    /// Output dimensions.
    pub fn dim(&self) -> usize {
        self.spec.dim
    }

    /// Longest input in tokens, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.spec.max_tokens
    }

    /// The model's tokenizer without truncation or padding, for sizing chunks: a truncating one
    /// would under-count long texts.
    pub fn sizing_tokenizer(&self) -> Tokenizer {
        let mut t = self.tokenizer.clone();
        t.with_padding(None);
        // Only fails for a stride >= max_length, which None cannot have.
        let _ = t.with_truncation(None);
        t
    }

    /// Tokens `text` takes, special tokens included, before any truncation.
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        self.sizing_tokenizer()
            .encode(text, true)
            .map(|e| e.len())
            .map_err(|e| EmbedError::Tokenizer {
                path: PathBuf::from("tokenizer.json"),
                message: e.to_string(),
            })
    }

    /// Embeds passages (documents): no instruction prefix. Inputs over the model's limit are cut
    /// to it and counted in [`Embedded::truncated`].
    pub fn embed_passages<S: AsRef<str>>(&self, texts: &[S]) -> Result<Embedded> {
        let texts: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        self.embed(&texts)
    }

    /// Embeds one query, with the model's query instruction when it has one.
    pub fn embed_query(&self, query: &str) -> Result<Vec<f32>> {
        let text = match &self.spec.query_instruction {
            Some(prefix) => format!("{prefix}{query}"),
            None => query.to_string(),
        };
        let mut out = self.embed(&[text.as_str()])?;
        Ok(out.vectors.pop().unwrap_or_default())
    }

    fn embed(&self, texts: &[&str]) -> Result<Embedded> {
        if texts.is_empty() {
            return Ok(Embedded::default());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EmbedError::Tokenizer {
                path: PathBuf::from("tokenizer.json"),
                message: e.to_string(),
            })?;
        let truncated = encodings
            .iter()
            .filter(|e| !e.get_overflowing().is_empty())
            .count();
        // Longest first, so each batch pads to lengths close to its own: padding is wasted work.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(real_len(&encodings[i])));
        let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        let widths: Vec<usize> = order.iter().map(|&i| real_len(&encodings[i])).collect();
        for range in plan_batches(&widths, self.max_batch_tokens, self.batch_size) {
            let batch = &order[range];
            let model = match &self.model {
                Encoder::Candle(model) => model,
                Encoder::Packed(packed) => {
                    let seqs: Vec<&[u32]> = batch
                        .iter()
                        .map(|&i| &encodings[i].get_ids()[..real_len(&encodings[i])])
                        .collect();
                    let states = packed.forward(&seqs);
                    let h = packed.hidden;
                    let mut offset = 0;
                    for (&i, seq) in batch.iter().zip(&seqs) {
                        let rows = &states[offset * h..(offset + seq.len()) * h];
                        vectors[i] = self.spec.pooling.pool_rows(rows, h);
                        offset += seq.len();
                    }
                    continue;
                }
            };
            let width = batch
                .iter()
                .map(|&i| real_len(&encodings[i]))
                .max()
                .unwrap_or(1)
                .max(1);
            let mut ids: Vec<u32> = Vec::with_capacity(batch.len() * width);
            let mut mask: Vec<u32> = Vec::with_capacity(batch.len() * width);
            for &i in batch {
                let e = &encodings[i];
                ids.extend(e.get_ids().iter().take(width));
                mask.extend(e.get_attention_mask().iter().take(width));
            }
            let shape = (batch.len(), width);
            let ids = Tensor::from_vec(ids, shape, &self.device)?;
            let mask = Tensor::from_vec(mask, shape, &self.device)?;
            let types = ids.zeros_like()?;
            let hidden = model.forward(&ids, &types, &mask)?;
            let pooled = self.spec.pooling.pool(&hidden, &mask)?;
            let rows = l2_normalize(&pooled)?.to_vec2::<f32>()?;
            for (&i, row) in batch.iter().zip(rows) {
                vectors[i] = row;
            }
        }
        Ok(Embedded { vectors, truncated })
    }
}

/// Tokens that are not padding (the tokenizer pads every encoding to the longest in the call).
/// Cuts passages sorted longest first (`widths`: their token counts) into batches of at most
/// `max_count` passages and `max_tokens` tokens with padding (count x the batch's first, longest,
/// width); a passage longer than `max_tokens` alone makes a batch. Returns index ranges into
/// `widths`, in order.
pub fn plan_batches(
    widths: &[usize],
    max_tokens: usize,
    max_count: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < widths.len() {
        let width = widths[start].max(1);
        let fit = (max_tokens / width).clamp(1, max_count.max(1));
        let end = (start + fit).min(widths.len());
        out.push(start..end);
        start = end;
    }
    out
}

fn real_len(e: &tokenizers::Encoding) -> usize {
    e.get_attention_mask().iter().filter(|&&m| m == 1).count()
}

/// Builds a model from a memory-mapped safetensors file as f32 on `device`; any failure (a
/// truncated file, a missing or misshapen tensor) is a [`EmbedError::Weights`] naming the file.
pub(crate) fn load_weights<M>(
    path: &Path,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<M> {
    let weights_err = |e: candle_core::Error| EmbedError::Weights {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    // SAFETY: the file is memory-mapped read-only; candle copies what it needs into tensors,
    // and a file changed underneath is a user error we cannot guard against anyway.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(std::slice::from_ref(&path), DType::F32, device)
    }
    .map_err(weights_err)?;
    build(vb).map_err(weights_err)
}

/// The model's tokenizer set to cut at `max_tokens` (the longer side of a pair first) and pad
/// to the longest input: a tokenizer.json often carries its own settings (all-MiniLM-L6-v2's
/// pads and cuts at 128, while the model takes 256), which must not decide what the model sees.
/// Padding keeps the tokenizer's own pad token, else `default_pad` gives one.
pub(crate) fn configure_tokenizer(
    path: &Path,
    max_tokens: usize,
    vocab_size: usize,
    default_pad: impl FnOnce(&Tokenizer) -> (u32, String),
) -> Result<Tokenizer> {
    let err = |message: String| EmbedError::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let mut tokenizer = Tokenizer::from_file(path).map_err(|e| err(e.to_string()))?;
    if tokenizer.get_vocab_size(true) > vocab_size {
        return Err(err(format!(
            "has {} tokens but the model's config.json has a vocabulary of {vocab_size}: the tokenizer belongs to another model",
            tokenizer.get_vocab_size(true),
        )));
    }
    let (pad_id, pad_token) = match tokenizer.get_padding() {
        Some(p) => (p.pad_id, p.pad_token.clone()),
        None => default_pad(&tokenizer),
    };
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        direction: PaddingDirection::Right,
        pad_to_multiple_of: None,
        pad_id,
        pad_type_id: 0,
        pad_token,
    }));
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_tokens,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .map_err(|e| err(e.to_string()))?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_bounded_by_tokens_and_count_and_cover_every_passage() {
        // Sorted longest first, as `embed` orders them.
        let widths = [512, 300, 256, 256, 200, 64, 64, 64, 64, 30, 12, 12, 5, 1];
        for (max_tokens, max_count) in [(8192, 256), (600, 256), (256, 3), (1, 1), (100_000, 4)] {
            let plan = plan_batches(&widths, max_tokens, max_count);
            let mut next = 0;
            for r in &plan {
                assert_eq!(r.start, next, "contiguous");
                assert!(!r.is_empty() && r.len() <= max_count);
                let padded = r.len() * widths[r.start];
                assert!(
                    padded <= max_tokens || r.len() == 1,
                    "{r:?} holds {padded} tokens"
                );
                next = r.end;
            }
            assert_eq!(next, widths.len(), "every passage once");
        }
        // Short passages share large batches; long ones take small ones.
        let plan = plan_batches(&widths, 600, 256);
        assert_eq!(plan[0], 0..1);
        assert!(plan.last().unwrap().len() >= 5, "{plan:?}");
        assert!(plan_batches(&[], 10, 10).is_empty());
    }
}
