//! A cross-encoder reranker: reads a query and a passage together and scores how well the passage
//! answers it (bge-reranker-base / -v2-m3 class: XLM-RoBERTa with a one-label classification
//! head, candle-transformers' model). Slower than comparing embeddings, so it reorders a few dozen
//! retrieved candidates rather than searching.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::xlm_roberta::{Config, XLMRobertaForSequenceClassification};
use thinkrag_hub::HubOptions;
use tokenizers::Tokenizer;

use crate::embedder::{configure_tokenizer, load_weights, resolve, EmbedderSource};
use crate::error::{EmbedError, Result};

/// How a reranker is loaded and run.
#[derive(Debug, Clone)]
pub struct RerankerOptions {
    /// Where it runs.
    pub device: Device,
    /// Most pairs per forward pass.
    pub batch_size: usize,
    /// Where hub models are downloaded from and cached.
    pub hub: HubOptions,
}

impl Default for RerankerOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            batch_size: 16,
            hub: HubOptions::from_env(),
        }
    }
}

/// A loaded cross-encoder.
pub struct Reranker {
    model: XLMRobertaForSequenceClassification,
    tokenizer: Tokenizer,
    device: Device,
    batch_size: usize,
    max_tokens: usize,
    identity: String,
}

impl std::fmt::Debug for Reranker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reranker")
            .field("model", &self.identity)
            .field("max_tokens", &self.max_tokens)
            .finish_non_exhaustive()
    }
}

/// `config.json` as transformers 4 and 5 write it: candle's config type has no defaults, and
/// transformers 5 leaves out `position_embedding_type` (absolute) and the dropout rates.
fn read_config(path: &Path, identity: &str) -> Result<(Config, usize)> {
    let text = std::fs::read_to_string(path).map_err(|e| EmbedError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let parse_err = |message: String| EmbedError::Parse {
        path: path.to_path_buf(),
        format: "XLM-RoBERTa config JSON",
        message,
    };
    let mut value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| parse_err("not a JSON object".into()))?;
    let architectures: Vec<&str> = obj
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if !architectures.is_empty() && !architectures.contains(&"XLMRobertaForSequenceClassification")
    {
        return Err(EmbedError::Unsupported {
            model: identity.to_string(),
            message: format!(
                "its architecture is {architectures:?}; the reranker runs XLMRobertaForSequenceClassification cross-encoders (bge-reranker-base, bge-reranker-v2-m3)"
            ),
        });
    }
    let labels = obj
        .get("id2label")
        .and_then(|l| l.as_object())
        .map_or(1, |l| l.len().max(1));
    if labels != 1 {
        return Err(EmbedError::Unsupported {
            model: identity.to_string(),
            message: format!("it has {labels} labels; a reranker has one (its relevance score)"),
        });
    }
    for (key, default) in [
        ("position_embedding_type", serde_json::json!("absolute")),
        ("attention_probs_dropout_prob", serde_json::json!(0.1)),
        ("hidden_dropout_prob", serde_json::json!(0.1)),
        ("layer_norm_eps", serde_json::json!(1e-5)),
        ("type_vocab_size", serde_json::json!(1)),
        ("pad_token_id", serde_json::json!(1)),
    ] {
        obj.entry(key).or_insert(default);
    }
    if obj.get("position_embedding_type").and_then(|v| v.as_str()) != Some("absolute") {
        return Err(EmbedError::Unsupported {
            model: identity.to_string(),
            message: "only absolute position embeddings are supported".into(),
        });
    }
    let cfg: Config = serde_json::from_value(value).map_err(|e| parse_err(e.to_string()))?;
    // XLM-R's positions start after the padding index.
    let positions = cfg
        .max_position_embeddings
        .saturating_sub(cfg.pad_token_id as usize + 1);
    Ok((cfg, positions))
}

/// The longest input the tokenizer config allows (`model_max_length`), if it says.
fn tokenizer_max_length(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let n = v.get("model_max_length")?.as_f64()?;
    // transformers writes a huge sentinel when there is no limit.
    (1.0..1e9).contains(&n).then_some(n as usize)
}

impl Reranker {
    /// Loads a reranker from a directory (config.json, tokenizer.json, model.safetensors) or a
    /// hub repo (`BAAI/bge-reranker-base`).
    pub fn load(source: &EmbedderSource, opts: &RerankerOptions) -> Result<Self> {
        let files = resolve(source, &opts.hub)?;
        let (cfg, positions) = read_config(&files.config, &files.identity)?;
        let max_tokens = tokenizer_max_length(&files.dir)
            .map_or(positions, |n| n.min(positions))
            .max(4);
        let tokenizer = configure_tokenizer(&files.tokenizer, max_tokens, cfg.vocab_size, |t| {
            let id = cfg.pad_token_id;
            (id, t.id_to_token(id).unwrap_or_else(|| "<pad>".into()))
        })?;
        let model = load_weights(&files.weights, &opts.device, |vb| {
            XLMRobertaForSequenceClassification::new(1, &cfg, vb)
        })?;
        Ok(Self {
            model,
            tokenizer,
            device: opts.device.clone(),
            batch_size: opts.batch_size.max(1),
            max_tokens,
            identity: files.identity,
        })
    }

    /// The model's name (hub repo or directory).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Longest query + passage input in tokens; longer pairs are cut, the longer side first.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The relevance score (the classifier's logit: higher is more relevant) of each passage
    /// for `query`, in the passages' order.
    pub fn score(&self, query: &str, passages: &[&str]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(passages.len());
        for batch in passages.chunks(self.batch_size) {
            let pairs: Vec<(String, String)> = batch
                .iter()
                .map(|p| (query.to_string(), p.to_string()))
                .collect();
            let encodings =
                self.tokenizer
                    .encode_batch(pairs, true)
                    .map_err(|e| EmbedError::Tokenizer {
                        path: self.identity.clone().into(),
                        message: e.to_string(),
                    })?;
            let len = encodings.first().map_or(0, |e| e.get_ids().len());
            let mut ids = Vec::with_capacity(batch.len() * len);
            let mut mask = Vec::with_capacity(batch.len() * len);
            for e in &encodings {
                ids.extend_from_slice(e.get_ids());
                mask.extend_from_slice(e.get_attention_mask());
            }
            let shape = (encodings.len(), len);
            let ids = Tensor::from_vec(ids, shape, &self.device)?;
            let mask = Tensor::from_vec(mask, shape, &self.device)?;
            let types = ids.zeros_like()?;
            let logits = self.model.forward(&ids, &mask, &types)?;
            out.extend(
                logits
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(out)
    }

    /// Reorders `items` by the score of their text for `query`, best first, and keeps the first
    /// `keep`; each comes back with its score. Ties keep the retrieval order.
    pub fn rerank<T>(
        &self,
        query: &str,
        items: Vec<T>,
        text: impl Fn(&T) -> &str,
        keep: usize,
    ) -> Result<Vec<(T, f32)>> {
        let scores = {
            let texts: Vec<&str> = items.iter().map(&text).collect();
            self.score(query, &texts)?
        };
        let mut scored: Vec<(usize, T, f32)> = items
            .into_iter()
            .zip(scores)
            .enumerate()
            .map(|(i, (t, s))| (i, t, s))
            .collect();
        scored.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
        Ok(scored
            .into_iter()
            .take(keep)
            .map(|(_, t, s)| (t, s))
            .collect())
    }
}
