//! Qwen2, the architecture of every DeepSeek-R1-Distill-Qwen size, on candle-core/candle-nn.
//!
//! Written here rather than taken from candle-transformers because its `qwen2` has the defects listed
//! in the model notes: RoPE tables in the model dtype, a mask dtype bug on warm-cache prefill in
//! f16/bf16, a sliding window applied when the config disables it, and a concatenating KV cache
//! without prefix reuse. Attention shares each KV head between its query heads by reshaping the
//! queries instead of copying keys and values (`repeat_kv`), which would multiply the bytes read per
//! decoded token by the group size.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};

use crate::config::Qwen2Config;
use crate::error::Result;
use crate::model::kv_cache::KvCache;
use crate::model::linear::Dense as Linear;

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position's, `(vocab,)`: all generation needs, and it spares the lm_head matmul
    /// over the whole prompt (151,936 x 1,536 per position).
    Last,
    /// Every position's, `(seq, vocab)`: for parity tests and scoring.
    All,
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// Rotary position tables for a run of positions, always computed and applied in f32.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// A Qwen2 causal language model.
pub struct Qwen2 {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    cfg: Qwen2Config,
    dtype: DType,
    device: Device,
}

fn linear(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

fn rms_norm(vb: &VarBuilder, size: usize, eps: f64) -> Result<RmsNorm> {
    Ok(RmsNorm::new(vb.get(size, "weight")?, eps))
}

impl Attention {
    fn new(cfg: &Qwen2Config, layer: usize, vb: &VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let head_dim = cfg.head_dim();
        let kv = cfg.num_key_value_heads * head_dim;
        Ok(Self {
            q_proj: linear(&vb.pp("q_proj"), h, h, true)?,
            k_proj: linear(&vb.pp("k_proj"), h, kv, true)?,
            v_proj: linear(&vb.pp("v_proj"), h, kv, true)?,
            o_proj: linear(&vb.pp("o_proj"), h, h, false)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim,
            window: cfg.window_of_layer(layer),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        layer: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let dtype = x.dtype();
        let q = self.q_proj.forward(x)?;
        let k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        let q = q
            .reshape((b, s, self.heads, self.head_dim))?
            .transpose(1, 2)?;
        let k = k
            .reshape((b, s, self.kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        let v = v
            .reshape((b, s, self.kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        let q = apply_rope(&q, rope)?;
        let k = apply_rope(&k, rope)?;
        let (k, v) = cache.append(layer, &k, &v)?;
        let (k, v) = match self.window {
            // Decode with a window only needs its last `w` keys; prefill handles it in the mask.
            Some(w) if s == 1 && k.dim(2)? > w => {
                let start = k.dim(2)? - w;
                (k.narrow(2, start, w)?, v.narrow(2, start, w)?)
            }
            _ => (k, v),
        };
        let kv_len = k.dim(2)?;
        let group = self.heads / self.kv_heads;
        // Heads h*group..(h+1)*group share KV head h: fold them into the query rows of one matmul.
        let q = q
            .contiguous()?
            .reshape((b, self.kv_heads, group * s, self.head_dim))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        // Softmax in f32 whatever the model dtype, as the reference implementation does.
        let scores = scores.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(mask) => scores
                .reshape((b, self.kv_heads, group, s, kv_len))?
                .broadcast_add(mask)?
                .reshape((b, self.kv_heads, group * s, kv_len))?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let out = probs.matmul(&v)?; // (b, kv_heads, group * s, head_dim)
        let out = out
            .reshape((b, self.heads, s, self.head_dim))?
            .transpose(1, 2)?
            .reshape((b, s, self.heads * self.head_dim))?;
        Ok(self.o_proj.forward(&out)?)
    }
}

fn apply_rope(x: &Tensor, rope: &Rope) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    Ok(candle_nn::rotary_emb::rope(&x, &rope.cos, &rope.sin)?.to_dtype(dtype)?)
}

impl Mlp {
    fn new(cfg: &Qwen2Config, vb: &VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear(&vb.pp("gate_proj"), h, i, false)?,
            up_proj: linear(&vb.pp("up_proj"), h, i, false)?,
            down_proj: linear(&vb.pp("down_proj"), i, h, false)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        let up = self.up_proj.forward(x)?;
        Ok(self.down_proj.forward(&(gate * up)?)?)
    }
}

impl DecoderLayer {
    fn new(cfg: &Qwen2Config, layer: usize, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            input_layernorm: rms_norm(
                &vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            self_attn: Attention::new(cfg, layer, &vb.pp("self_attn"))?,
            post_attention_layernorm: rms_norm(
                &vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::new(cfg, &vb.pp("mlp"))?,
        })
    }
}

impl Qwen2 {
    /// Builds the model from weights with Hugging Face names (`model.layers.0.self_attn.q_proj.weight`
    /// ...). `progress(done, total)` is called as layers load: with mmapped weights converted to
    /// another dtype, loading is real work worth showing.
    pub fn new(
        cfg: &Qwen2Config,
        vb: VarBuilder,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let total = cfg.num_hidden_layers + 2;
        let vbm = vb.pp("model");
        let embed_weight = vbm.get((cfg.vocab_size, cfg.hidden_size), "embed_tokens.weight")?;
        let embed_tokens = Embedding::new(embed_weight.clone(), cfg.hidden_size);
        progress(1, total);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            layers.push(DecoderLayer::new(cfg, i, &vbm.pp(format!("layers.{i}")))?);
            progress(i + 2, total);
        }
        let norm = rms_norm(&vbm.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            Linear::new(embed_weight, None)
        } else {
            linear(&vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size, false)?
        };
        progress(total, total);
        let head_dim = cfg.head_dim();
        // As the reference computes it: base^(2i/d) in f32, so tables agree to the last bit or two.
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0f32 / (cfg.rope_theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &Qwen2Config {
        &self.cfg
    }

    /// The dtype of the weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty KV cache for this model holding at most `max_len` positions.
    pub fn new_cache(&self, max_len: usize) -> KvCache {
        KvCache::new(
            self.cfg.num_hidden_layers,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim(),
            max_len.min(self.cfg.max_position_embeddings),
            self.dtype,
            &self.device,
        )
    }

    fn rope(&self, start: usize, len: usize) -> Result<Rope> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for pos in start..start + len {
            for &f in &self.inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (len, half), &self.device)?,
            sin: Tensor::from_vec(sin, (len, half), &self.device)?,
        })
    }

    /// Additive mask `(seq, kv_len)` in f32 for queries at `start..start+seq`: causal, and windowed
    /// only when the config asks for a window. `None` for a single query, which sees every cached
    /// key (a windowed decode step narrows the keys instead).
    fn mask(&self, start: usize, seq: usize, window: Option<usize>) -> Result<Option<Tensor>> {
        let kv_len = start + seq;
        if seq == 1 {
            return Ok(None);
        }
        let mut m = vec![0f32; seq * kv_len];
        for i in 0..seq {
            let q = start + i;
            for (j, cell) in m[i * kv_len..(i + 1) * kv_len].iter_mut().enumerate() {
                let visible = j <= q && window.is_none_or(|w| q - j < w);
                if !visible {
                    *cell = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (seq, kv_len), &self.device)?))
    }

    /// Runs `ids` through the model after the positions already in `cache`, appends their keys and
    /// values to it, and returns the logits (f32) of the last or of every position.
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache, which: Logits) -> Result<Tensor> {
        let seq = ids.len();
        if seq == 0 {
            return Err(candle_core::Error::Msg("forward over zero tokens".into()).into());
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(crate::Error::invalid(
                "token id",
                bad,
                format!("below the model's vocab_size {}", self.cfg.vocab_size),
            ));
        }
        let start = cache.len();
        cache.reserve(seq)?;
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let mut x = self.embed_tokens.forward(&input)?;
        let rope = self.rope(start, seq)?;
        let mut masks: Vec<(Option<usize>, Option<Tensor>)> = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let window = layer.self_attn.window;
            let mask = match masks.iter().find(|(w, _)| *w == window) {
                Some((_, m)) => m.clone(),
                None => {
                    let m = self.mask(start, seq, window)?;
                    masks.push((window, m.clone()));
                    m
                }
            };
            let residual = &x;
            let h = layer.input_layernorm.forward(&x)?;
            let h = layer
                .self_attn
                .forward(&h, &rope, mask.as_ref(), i, cache)?;
            let x1 = (residual + h)?;
            let h = layer.post_attention_layernorm.forward(&x1)?;
            let h = layer.mlp.forward(&h)?;
            x = (x1 + h)?;
        }
        cache.advance(seq);
        let x = match which {
            Logits::Last => x.narrow(1, seq - 1, 1)?,
            Logits::All => x,
        };
        let x = self.norm.forward(&x)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        Ok(match which {
            Logits::Last => logits.squeeze(0)?.squeeze(0)?,
            Logits::All => logits.squeeze(0)?,
        })
    }

    /// The logits tensor's width (the config's `vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
}
