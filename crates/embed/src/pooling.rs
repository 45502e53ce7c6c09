//! Pooling: how a BERT's per-token states become one sentence vector, and L2 normalisation.
//! The choice is the model's (CLS for BGE, mean for MiniLM), read from `1_Pooling/config.json`
//! when the model directory has one.

use std::path::Path;

use candle_core::{DType, Tensor, D};
use serde::Deserialize;

use crate::error::{EmbedError, Result};

/// How token states are pooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The state of the first token (`[CLS]`).
    Cls,
    /// The mean of the states of the real (unmasked) tokens.
    Mean,
}

impl Pooling {
    /// The name stored in indexes and printed (`cls`, `mean`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cls => "cls",
            Self::Mean => "mean",
        }
    }

    /// Pools one sequence's token states (`rows`: its tokens' `hidden`-wide states, no padding)
    /// and L2-normalises the result.
    pub(crate) fn pool_rows(self, rows: &[f32], hidden: usize) -> Vec<f32> {
        let tokens = rows.len() / hidden;
        let mut v = match self {
            Self::Cls => rows[..hidden].to_vec(),
            Self::Mean => {
                let mut sum = vec![0f32; hidden];
                for row in rows.chunks_exact(hidden) {
                    for (s, x) in sum.iter_mut().zip(row) {
                        *s += x;
                    }
                }
                sum.iter_mut().for_each(|s| *s /= tokens.max(1) as f32);
                sum
            }
        };
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= norm);
        v
    }

    /// Reads sentence-transformers' `1_Pooling/config.json`; `Ok(None)` when the file is absent.
    pub fn from_sentence_transformers(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("1_Pooling").join("config.json");
        if !path.is_file() {
            return Ok(None);
        }
        #[derive(Deserialize)]
        struct Cfg {
            #[serde(default)]
            pooling_mode_cls_token: bool,
            #[serde(default)]
            pooling_mode_mean_tokens: bool,
            #[serde(default)]
            pooling_mode_max_tokens: bool,
            #[serde(default)]
            pooling_mode_mean_sqrt_len_tokens: bool,
        }
        let text = std::fs::read_to_string(&path).map_err(|e| EmbedError::io(&path, e))?;
        let cfg: Cfg = serde_json::from_str(&text).map_err(|e| EmbedError::Parse {
            path: path.clone(),
            format: "JSON",
            message: e.to_string(),
        })?;
        match (
            cfg.pooling_mode_cls_token,
            cfg.pooling_mode_mean_tokens,
            cfg.pooling_mode_max_tokens || cfg.pooling_mode_mean_sqrt_len_tokens,
        ) {
            (true, false, false) => Ok(Some(Self::Cls)),
            (false, true, false) => Ok(Some(Self::Mean)),
            _ => Err(EmbedError::Unsupported {
                model: dir.display().to_string(),
                message: format!(
                    "{} asks for a pooling other than CLS or mean alone; thinkrag supports those two",
                    path.display()
                ),
            }),
        }
    }

    /// Pools `hidden` (batch, seq, dim) under `mask` (batch, seq; 1 for real tokens).
    pub fn pool(self, hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
            Self::Mean => {
                let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
                let sum = hidden.broadcast_mul(&mask)?.sum(1)?;
                // sentence-transformers clamps the token count at 1e-9 so an empty mask gives 0s.
                let count = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
                sum.broadcast_div(&count)
            }
        }
    }
}

impl std::str::FromStr for Pooling {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cls" => Ok(Self::Cls),
            "mean" => Ok(Self::Mean),
            other => Err(format!("unknown pooling {other:?}: expected cls or mean")),
        }
    }
}

/// Divides each row by its L2 norm (as torch's `F.normalize`, eps 1e-12).
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}
