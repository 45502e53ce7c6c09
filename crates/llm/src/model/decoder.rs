//! The decoder shared by every supported architecture (Qwen2 and Llama 3 are the same pre-norm
//! transformer: RMSNorm, grouped-query attention with RoPE, a SiLU-gated MLP), on candle-core and
//! candle-nn. What differs comes from [`ModelConfig`]: biases on the query/key/value projections,
//! the RoPE frequencies (Llama 3's scaling), attention windows, tied embeddings.
//!
//! Written here rather than taken from candle-transformers because its `qwen2` has the defects listed
//! in the model notes: RoPE tables in the model dtype, a mask dtype bug on warm-cache prefill in
//! f16/bf16, a sliding window applied when the config disables it, and a concatenating KV cache
//! without prefix reuse. Attention shares each KV head between its query heads by reshaping the
//! queries instead of copying keys and values (`repeat_kv`), which would multiply the bytes read per
//! decoded token by the group size.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::decode_attention::{decode_attention, decode_attention_many};
use crate::model::kv_cache::{widen_rows, KvCache, KvFormat};
use crate::model::linear::{with_cpu_f32_pair, Linear, OutPtr, Weight};
use crate::model::llama::gguf_rope_row_order;
use crate::model::rms_norm::RmsNorm;
use crate::model::vexp;
use crate::model::weights::{WeightSource, ROPE_FREQS};

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
    /// For query and key weights whose rows are in llama.cpp's order (a Llama GGUF, used from
    /// the mapping as stored): where each Hugging Face row of the projections' outputs is, to
    /// gather them back into that order before RoPE.
    gguf_rows: Option<(Tensor, Tensor)>,
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

/// The token embedding table. Quantized tables stay quantized: a lookup dequantizes only the rows
/// it reads (151,936 x 1,536 in f32 would be 930 MB).
struct TokenEmbedding {
    table: Weight,
}

impl TokenEmbedding {
    fn forward(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        Ok(match &self.table {
            Weight::Dense(t) => candle_nn::Embedding::new(t.clone(), t.dim(1)?).forward(ids)?,
            Weight::Quantized(q) => q.embedding(ids)?.to_dtype(dtype)?,
        })
    }
}

/// A causal language model of any supported architecture.
pub struct CausalLm {
    embed_tokens: TokenEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    /// The output projection reuses the embedding table (no `lm_head.weight` of its own).
    tied_lm_head: bool,
    inv_freq: Vec<f32>,
    cfg: ModelConfig,
    dtype: DType,
    /// What new caches store keys and values as (see [`CausalLm::set_kv_format`]).
    kv_format: KvFormat,
    device: Device,
    /// The memory-mapped file the weights live in, if any (a GGUF file on a CPU).
    mapped_files: Vec<std::sync::Arc<memmap2::Mmap>>,
    /// When the weights run in place from a file larger than the memory: the first layer whose
    /// pages go back to the OS after each use (see [`CausalLm::prepare`]); `usize::MAX` for none.
    streamed_from: std::sync::atomic::AtomicUsize,
}

/// Tensor names under a prefix, as Hugging Face writes them (`model.layers.0.self_attn`...).
#[derive(Clone, Copy)]
struct Names<'a> {
    src: &'a dyn WeightSource,
    prefix: &'a str,
}

impl Names<'_> {
    fn name(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.prefix)
        }
    }

    fn linear(&self, module: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let m = self.name(module);
        let weight = self.src.matrix(&format!("{m}.weight"), (out_dim, in_dim))?;
        let bias = if bias {
            Some(self.src.vector(&format!("{m}.bias"), out_dim)?)
        } else {
            None
        };
        Ok(Linear::new(weight, bias))
    }

    fn rms_norm(&self, module: &str, size: usize, eps: f64) -> Result<RmsNorm> {
        let w = self
            .src
            .vector(&format!("{}.weight", self.name(module)), size)?;
        Ok(RmsNorm::new(w, eps))
    }
}

impl Attention {
    fn new(cfg: &ModelConfig, layer: usize, w: Names) -> Result<Self> {
        let h = cfg.hidden_size;
        let head_dim = cfg.head_dim();
        let q = cfg.num_attention_heads * head_dim;
        let kv = cfg.num_key_value_heads * head_dim;
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: w.linear("q_proj", h, q, bias)?,
            k_proj: w.linear("k_proj", h, kv, bias)?,
            v_proj: w.linear("v_proj", h, kv, bias)?,
            o_proj: w.linear("o_proj", q, h, false)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim,
            window: cfg.window_of_layer(layer),
            gguf_rows: if w.src.qk_rows_in_gguf_order() {
                let order = |rows: usize, heads: usize| -> Result<Tensor> {
                    let order = gguf_rope_row_order(rows, heads).ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "{rows} query or key rows do not split into {heads} RoPE heads"
                        ))
                    })?;
                    let order: Vec<u32> = order.into_iter().map(|r| r as u32).collect();
                    Ok(Tensor::new(order, w.src.device())?)
                };
                Some((
                    order(q, cfg.num_attention_heads)?,
                    order(kv, cfg.num_key_value_heads)?,
                ))
            } else {
                None
            },
        })
    }

    /// The query, key and value projections of `x` `(b, s, hidden)` as `(b, heads, s, head_dim)`
    /// and `(b, kv_heads, s, head_dim)`, before RoPE. `rows` picks the small-batch kernels of a
    /// batched decode step (one row per sequence).
    fn project(&self, x: &Tensor, rows: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = x.dims3()?;
        let [mut q, mut k, v] = if rows {
            Linear::forward_rows_many([&self.q_proj, &self.k_proj, &self.v_proj], x)?
        } else {
            [
                self.q_proj.forward(x)?,
                self.k_proj.forward(x)?,
                self.v_proj.forward(x)?,
            ]
        };
        // Moving a few thousand outputs per token costs nothing next to the products, and keeps
        // RoPE, the cache and attention in the reference's order (bit-identical to a model whose
        // weights were reordered instead, without a second copy of them).
        if let Some((q_rows, k_rows)) = &self.gguf_rows {
            q = q.index_select(q_rows, 2)?;
            k = k.index_select(k_rows, 2)?;
        }
        let q = q
            .reshape((b, s, self.heads, self.head_dim))?
            .transpose(1, 2)?;
        let k = k
            .reshape((b, s, self.kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        let v = v
            .reshape((b, s, self.kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        Ok((q, k, v))
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        layer: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (q, k, v) = self.project(x, false)?;
        let out = self.attend(&q, &k, &v, rope, mask, layer, cache)?;
        Ok(self.o_proj.forward(&out)?)
    }

    /// One decode step of several sequences: `x` is `(1, n, hidden)`, row `i` the new token of the
    /// sequence whose cache is `caches[i]` and whose position's RoPE is `ropes[i]`. Projections run
    /// once for all rows; attention runs for each sequence over its own cache, all in one parallel
    /// region.
    fn forward_decode(
        &self,
        x: &Tensor,
        ropes: &[Rope],
        layer: usize,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let (q, k, v) = self.project(x, true)?;
        let mut seqs = Vec::with_capacity(caches.len());
        for (i, cache) in caches.iter_mut().enumerate() {
            let one = |t: &Tensor| t.narrow(2, i, 1);
            seqs.push(self.rope_and_cache(
                &one(&q)?,
                &one(&k)?,
                &one(&v)?,
                &ropes[i],
                layer,
                cache,
            )?);
        }
        let grouped = seqs
            .iter()
            .map(|(q, _, _)| self.grouped_query(q))
            .collect::<Result<Vec<_>>>()?;
        let items: Vec<_> = grouped
            .iter()
            .zip(&seqs)
            .map(|(q, (_, k, v))| (q, k, v))
            .collect();
        let out = match decode_attention_many(&items, self.scale() as f32)? {
            Some(out) => out,
            None => {
                let outs = seqs
                    .iter()
                    .map(|(q, k, v)| self.attention(q, k, v, None))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&outs, 1)?
            }
        };
        Ok(self.o_proj.forward_rows(&out)?)
    }

    /// Attention of projected `q` `(b, heads, s, hd)`, `k`, `v` `(b, kv_heads, s, hd)` over the
    /// cached positions plus these: applies RoPE, appends `k`/`v` to `cache` and returns
    /// `(b, s, heads * hd)` before the output projection.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        layer: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (q, k, v) = self.rope_and_cache(q, k, v, rope, layer, cache)?;
        self.attention(&q, &k, &v, mask)
    }

    /// RoPE on `q` and `k`, `k`/`v` appended to `cache`: the query and the keys and values it
    /// attends to (the cache's views, cut to the sliding window where one applies).
    fn rope_and_cache(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rope: &Rope,
        layer: usize,
        cache: &mut KvCache,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let s = q.dim(2)?;
        let q = apply_rope(q, rope)?;
        let k = apply_rope(k, rope)?;
        let (k, v) = cache.append(layer, &k, v)?;
        let (k, v) = match self.window {
            // Decode with a window only needs its last `w` keys; prefill handles it in the mask.
            Some(w) if s == 1 && k.dim(2)? > w => {
                let start = k.dim(2)? - w;
                (k.narrow(2, start, w)?, v.narrow(2, start, w)?)
            }
            _ => (k, v),
        };
        Ok((q, k, v))
    }

    /// The attention's scale, `1 / sqrt(head_dim)`.
    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// One token's query `(1, heads, 1, hd)` as `(1, kv_heads, group, hd)`, the layout
    /// [`decode_attention`] takes: it already is, as heads `h*group..` share KV head `h`.
    fn grouped_query(&self, q: &Tensor) -> Result<Tensor> {
        let group = self.heads / self.kv_heads;
        Ok(q.reshape((1, self.kv_heads, group, self.head_dim))?)
    }

    /// `softmax(q k^T * scale + mask) v` for `q` `(b, heads, s, hd)` after RoPE and the cache's
    /// `k`, `v`, as `(b, s, heads * hd)`.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, _, s, _) = q.dims4()?;
        if s == 1 && b == 1 {
            if let Some(out) = decode_attention(&self.grouped_query(q)?, k, v, self.scale() as f32)?
            {
                return Ok(out);
            }
        }
        blocked_attention(q, k, v, mask, self.scale(), SCORES_BUDGET)
    }
}

/// `softmax(q k^T * scale + mask) v` for `q` `(b, heads, s, hd)` and the cache's `k`, `v`
/// `(b, kv_heads, kv_len, hd)` (the last `s` positions are the queries'), as `(b, s, heads * hd)`.
/// The scores of a prefill chunk over a long cache are large (32 heads x 512 queries x 4k keys in
/// f32 is 256 MB for the 8B model, and the mask and softmax copy them), so they are made a KV head
/// and a block of queries at a time, at most `budget` bytes. A query block under a causal mask
/// (every mask here is causal) sees no key past its last query: those are left out.
fn blocked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    budget: usize,
) -> Result<Tensor> {
    let (b, heads, s, hd) = q.dims4()?;
    let (kv_heads, kv_len) = (k.dim(1)?, k.dim(2)?);
    let dtype = q.dtype();
    let group = heads / kv_heads;
    // Heads h*group..(h+1)*group share KV head h: they are the query rows of one product.
    let q = q.contiguous()?.reshape((b, kv_heads, group, s, hd))?;
    let start = kv_len - s;
    let rows = (budget / (4 * group * kv_len).max(1)).clamp(1, s);
    let mut outs = Vec::with_capacity(kv_heads);
    for h in 0..kv_heads {
        // A cache narrower than the model (f16 or Q8_0 on a CPU) is widened for this path.
        let k = widen_rows(&k.narrow(1, h, 1)?, hd, dtype)?;
        let v = widen_rows(&v.narrow(1, h, 1)?, hd, dtype)?;
        let mut blocks = Vec::with_capacity(s.div_ceil(rows));
        for from in (0..s).step_by(rows) {
            let n = rows.min(s - from);
            let keys = match mask {
                Some(_) => start + from + n,
                None => kv_len,
            };
            let qb = q
                .narrow(1, h, 1)?
                .narrow(3, from, n)?
                .contiguous()?
                .reshape((b, 1, group * n, hd))?;
            let scores = {
                // Softmax in f32 whatever the model dtype, as the reference implementation does.
                let raw = (qb.matmul(&k.narrow(2, 0, keys)?.t()?)? * scale)?;
                let raw = raw.to_dtype(DType::F32)?;
                match mask {
                    Some(mask) => raw
                        .reshape((b, 1, group, n, keys))?
                        .broadcast_add(&mask.narrow(0, from, n)?.narrow(1, 0, keys)?)?
                        .reshape((b, 1, group * n, keys))?,
                    None => raw,
                }
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
            drop(scores);
            let out = probs.matmul(&v.narrow(2, 0, keys)?)?; // (b, 1, group * n, hd)
            blocks.push(out.reshape((b, group, n, hd))?);
        }
        outs.push(Tensor::cat(&blocks, 2)?);
    }
    let out = Tensor::cat(&outs, 1)?; // (b, heads, s, hd): heads h*group.. are KV head h's
    Ok(out.transpose(1, 2)?.reshape((b, s, heads * hd))?)
}

/// Asks the OS to reclaim the pages of `len` bytes at `offset` of the read-only file mapping
/// `map` now (`MADV_PAGEOUT`, Linux 5.4 and later; elsewhere, or if refused, nothing happens):
/// they are clean file pages, read again from the file when next touched. memmap2 has no
/// `PageOut` advice, so this calls `madvise` directly, on the whole pages inside the range only
/// (a neighbouring tensor's pages stay).
fn page_out(map: &memmap2::Mmap, offset: usize, len: usize) {
    #[cfg(target_os = "linux")]
    {
        use crate::device::{advise_inside, page_size};
        // SAFETY: the range lies inside the mapping, which outlives the call; PAGEOUT on a
        // read-only, file-backed mapping only drops pages, and the addresses stay valid.
        unsafe {
            advise_inside(
                map.as_ptr().wrapping_add(offset),
                len,
                page_size(),
                libc::MADV_PAGEOUT,
            )
        };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (map, offset, len);
}

/// An error naming `what` if it needs more than the `available` bytes (when known).
fn fits_in_memory(what: &str, needed: u64, available: Option<u64>) -> Result<()> {
    match available {
        Some(available) if needed > available => Err(crate::Error::OutOfMemory {
            what: what.to_string(),
            needed_gb: needed as f64 / 1e9,
            available_gb: available as f64 / 1e9,
        }),
        _ => Ok(()),
    }
}

/// The most bytes of f32 attention scores the general (prefill) path holds at once.
const SCORES_BUDGET: usize = 16 << 20;

/// The KV cache type a model gets by default: f16 for quantized projections on a CPU whose decode
/// attention reads f16 straight into its arithmetic (AVX-512, or AVX2 with F16C), the model's
/// own dtype otherwise, so that full-precision models keep the reference's numbers exactly.
/// Measured with `thinkrag bench --kv-cache f32|f16` on 2 threads: the 8B shape (Q4_K_M)
/// decodes at 4,000 positions at 4.26 tokens/s with f16 against 3.72 with f32 (position 100:
/// 5.3 both), and peaks at 6.04 GB against 6.56; the 1.5B shape gains 4-5% there. On an AVX2
/// Zen 3 (2026-12-02), the 1.5B Q4_K_M at 4,000 positions: 0.82-0.88x of its speed at 100 with
/// f16, 0.74x with f32. A quantized model's numbers already differ from
/// the reference's; an f16 cache moves the tiny parity models' logits about half as much as
/// Q8_0 weights do.
fn default_kv_format(layers: &[DecoderLayer], dtype: DType, device: &Device) -> KvFormat {
    let widens_fast = crate::model::decode_attention::widens_f16_fast();
    let quantized = layers
        .first()
        .is_some_and(|l| matches!(l.self_attn.k_proj.weight(), Weight::Quantized(_)));
    if quantized && device.is_cpu() && dtype == DType::F32 && widens_fast {
        KvFormat::F16
    } else {
        KvFormat::of_dtype(dtype).unwrap_or(KvFormat::F32)
    }
}

/// `silu(gate) * up`, element by element, split across candle's barrier pool for f32 CPU tensors
/// of more than 16,384 values (in a batched decode step candle's two ops ran on one thread while
/// the other waited; one decode row of the 1.5B or the 8B is quicker on the calling thread), with
/// candle's formula, `g / (1 + exp(-g)) * u`, on 16 lanes where the CPU has AVX-512 (8 with AVX2)
/// ([`vexp::silu_mul_into`]; libm's `expf` was 2% of a decode step, most of it on one thread).
/// A prefill's rows go through it too.
fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    // Small enough that a batched decode step's values split evenly over the threads.
    const CHUNK: usize = 1024;
    // At most this many values go through on the calling thread alone: one sequence's decode row
    // of the 1.5B (8,960 values, a microsecond or two of arithmetic) took 6-7 microseconds a layer
    // so against 8-12 split over two threads, and the 8B's (14,336) 16-17 against 19-26 (timed in
    // decode steps on a 2-core Zen 4, 2026-12-03): the parallel region's start and end cost more
    // than the half it hands over.
    const SERIAL: usize = 16 << 10;
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(cpu_f32(gate) && cpu_f32(up)) || gate.dims() != up.dims() {
        return Ok((candle_nn::ops::silu(gate)? * up)?);
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let n = gate.elem_count();
    let out = with_cpu_f32_pair(&gate, &up, |g, u| {
        let mut out = vec![0f32; n];
        if n <= SERIAL {
            vexp::silu_mul_into(g, u, &mut out);
            return out;
        }
        let dst = OutPtr(out.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(CHUNK), |chunks| {
            let span = chunks.start * CHUNK..(chunks.end * CHUNK).min(n);
            // SAFETY: chunks are disjoint, so these elements are written by this thread only,
            // and `out` outlives the call.
            let out = unsafe { dst.slice(span.start, span.len()) };
            vexp::silu_mul_into(&g[span.clone()], &u[span], out);
        });
        out
    });
    let Some(out) = out else {
        return Ok((candle_nn::ops::silu(&gate)? * &up)?);
    };
    Ok(Tensor::from_vec(out, gate.dims(), gate.device())?)
}

fn apply_rope(x: &Tensor, rope: &Rope) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    Ok(candle_nn::rotary_emb::rope(&x, &rope.cos, &rope.sin)?.to_dtype(dtype)?)
}

impl Mlp {
    fn new(cfg: &ModelConfig, w: Names) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: w.linear("gate_proj", h, i, false)?,
            up_proj: w.linear("up_proj", h, i, false)?,
            down_proj: w.linear("down_proj", i, h, false)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        // The decode step's fused activation: candle's `silu` takes libm's `expf` a value at a
        // time (about 1.9% of a prefill's samples on a Zen 3).
        Ok(self.down_proj.forward(&silu_mul(&gate, &up)?)?)
    }

    /// As `forward`, with the small-batch kernels of a decode step.
    fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up] = Linear::forward_rows_many([&self.gate_proj, &self.up_proj], x)?;
        Ok(self.down_proj.forward_rows(&silu_mul(&gate, &up)?)?)
    }
}

impl DecoderLayer {
    /// The layer's projections, attention then MLP.
    fn linears(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    fn new(cfg: &ModelConfig, layer: usize, w: Names) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let attn = w.name("self_attn");
        let mlp = w.name("mlp");
        Ok(Self {
            input_layernorm: w.rms_norm("input_layernorm", h, eps)?,
            self_attn: Attention::new(cfg, layer, Names { prefix: &attn, ..w })?,
            post_attention_layernorm: w.rms_norm("post_attention_layernorm", h, eps)?,
            mlp: Mlp::new(cfg, Names { prefix: &mlp, ..w })?,
        })
    }
}

impl CausalLm {
    /// Builds the model from weights with Hugging Face names (`model.layers.0.self_attn.q_proj.weight`
    /// ...), full precision or quantized as `weights` delivers them. `progress(done, total)` is
    /// called as layers load: converting or quantizing mmapped weights is real work worth showing.
    pub fn new(
        cfg: &ModelConfig,
        weights: &dyn WeightSource,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let total = cfg.num_hidden_layers + 2;
        let model = Names {
            src: weights,
            prefix: "model",
        };
        let embed_weight = weights.matrix(
            "model.embed_tokens.weight",
            (cfg.vocab_size, cfg.hidden_size),
        )?;
        progress(1, total);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let prefix = format!("model.layers.{i}");
            layers.push(DecoderLayer::new(
                cfg,
                i,
                Names {
                    prefix: &prefix,
                    ..model
                },
            )?);
            progress(i + 2, total);
        }
        let norm = model.rms_norm("norm", cfg.hidden_size, cfg.rms_norm_eps)?;
        let root = Names {
            src: weights,
            prefix: "",
        };
        let tied_lm_head = cfg.tie_word_embeddings && !weights.contains("lm_head.weight");
        let lm_head = if tied_lm_head {
            Linear::new(embed_weight.clone(), None)
        } else {
            root.linear("lm_head", cfg.hidden_size, cfg.vocab_size, false)?
        };
        let embed_tokens = TokenEmbedding {
            table: embed_weight,
        };
        progress(total, total);
        // A GGUF Llama 3.1+ carries its RoPE scaling as a tensor of per-frequency divisors.
        let mut cfg = cfg.clone();
        if weights.contains(ROPE_FREQS) {
            let half = cfg.head_dim() / 2;
            let factors = weights
                .vector(ROPE_FREQS, half)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            cfg.rope.freq_factors = Some(factors);
            cfg = cfg.checked(Path::new(ROPE_FREQS))?;
        }
        let inv_freq = cfg.rope_inv_freq();
        let kv_format = default_kv_format(&layers, weights.dtype(), weights.device());
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            tied_lm_head,
            inv_freq,
            cfg,
            dtype: weights.dtype(),
            kv_format,
            device: weights.device().clone(),
            mapped_files: weights.mapped_files(),
            streamed_from: std::sync::atomic::AtomicUsize::new(usize::MAX),
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
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
            self.kv_format,
            &self.device,
        )
    }

    /// What the KV caches made from now on store keys and values as.
    pub fn kv_format(&self) -> KvFormat {
        self.kv_format
    }

    /// Sets what new KV caches store. f16 halves the cache's memory (0.5 GiB less for the 8B
    /// shape at 4,096 positions) and the bytes a decode step reads from it; Q8_0 takes 0.56 of
    /// f16's (llama.cpp's `-ctk q8_0 -ctv q8_0`), read directly by the CPU's decode attention;
    /// f32 keeps the reference's numbers exactly. The default is f16 for quantized weights on a
    /// CPU with AVX-512 or AVX2 and F16C (as llama.cpp's default; measured in
    /// `default_kv_format`) and the model's
    /// dtype otherwise. Q8_0 needs a head size that is a multiple of 32: otherwise this is an
    /// error and the format stays as it was.
    pub fn set_kv_format(&mut self, format: KvFormat) -> Result<()> {
        let hd = self.cfg.head_dim();
        if !format.fits_head_dim(hd) {
            return Err(crate::Error::invalid(
                "kv-cache",
                format,
                format!("f32, f16 or bf16: this model's head size, {hd}, is not a multiple of 32"),
            ));
        }
        self.kv_format = format;
        Ok(())
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
        let mut x = self.embed_tokens.forward(&input, self.dtype)?;
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
            self.release_if_streamed(i);
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

    /// One decode step for several sequences at once: `ids[i]` is the next token of the sequence
    /// cached in `caches[i]`. Every weight is read once for the whole batch (the small-batch
    /// kernels of [`Linear::forward_rows`]), attention runs per sequence over its own cache, and
    /// each cache grows by one position. Returns the logits `(n, vocab)` in f32; row `i` is
    /// bit-identical to what a step of sequence `i` alone returns.
    pub fn forward_decode(&self, ids: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let n = ids.len();
        if n == 0 || n != caches.len() {
            return Err(candle_core::Error::Msg(format!(
                "decode step of {n} tokens for {} caches",
                caches.len()
            ))
            .into());
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(crate::Error::invalid(
                "token id",
                bad,
                format!("below the model's vocab_size {}", self.cfg.vocab_size),
            ));
        }
        for cache in caches.iter_mut() {
            cache.reserve(1)?;
        }
        let ropes = caches
            .iter()
            .map(|c| self.rope(c.len(), 1))
            .collect::<Result<Vec<_>>>()?;
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let mut x = self.embed_tokens.forward(&input, self.dtype)?;
        // Each residual add is fused into the norm after it (the next layer's, or the final one):
        // a step's serial work between products is time the memory sits idle.
        let mut h = match self.layers.first() {
            Some(layer) => layer.input_layernorm.forward(&x)?,
            None => self.norm.forward(&x)?,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let a = layer.self_attn.forward_decode(&h, &ropes, i, caches)?;
            let (x1, h1) = layer.post_attention_layernorm.add_forward(&x, &a)?;
            let m = layer.mlp.forward_rows(&h1)?;
            let next = self
                .layers
                .get(i + 1)
                .map_or(&self.norm, |l| &l.input_layernorm);
            (x, h) = next.add_forward(&x1, &m)?;
            self.release_if_streamed(i);
        }
        for cache in caches.iter_mut() {
            cache.advance(1);
        }
        let logits = self.lm_head.forward_rows(&h)?.to_dtype(DType::F32)?;
        Ok(logits.squeeze(0)?)
    }

    /// Every projection of the model (attention, MLP, output head).
    fn linears(&self) -> Vec<&Linear> {
        let mut out: Vec<&Linear> = Vec::with_capacity(self.layers.len() * 7 + 1);
        for l in &self.layers {
            out.extend(l.linears());
        }
        out.push(&self.lm_head);
        out
    }

    /// After layer `i` ran: where the weights run in place and layer `i` is one of those streamed
    /// from the file, hands its pages back to the OS (`MADV_PAGEOUT`), so that they do not push
    /// the layers kept in memory out of the page cache (see [`CausalLm::prepare`]).
    fn release_if_streamed(&self, i: usize) {
        if i < self
            .streamed_from
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        for l in self.layers[i].linears() {
            if let Ok(Some((map, offset, len))) = self.mapping_of(l) {
                page_out(map, offset, len);
            }
        }
    }

    /// The layers whose pages go back to the OS after each use: from the first one whose weights,
    /// with those before it and the output head, pass `budget` bytes of the mapped file.
    fn streamed_layers_from(&self, budget: u64) -> Result<usize> {
        let mapped = |l: &Linear| -> Result<u64> {
            Ok(self.mapping_of(l)?.map_or(0, |(_, _, len)| len as u64))
        };
        let mut used = mapped(&self.lm_head)?;
        for (i, layer) in self.layers.iter().enumerate() {
            for l in layer.linears() {
                used += mapped(l)?;
            }
            if used > budget {
                return Ok(i);
            }
        }
        Ok(self.layers.len())
    }

    /// Readies the weights for the first prompt now, at load. On a CPU a quantized weight is laid
    /// out for its tiled kernels (thinkrag's for Q4_K and Q6_K, else candle's) on the weight's first
    /// product (seconds for the 1.5B model, all of it in the first prompt otherwise); this runs one
    /// product per weight, in parallel across the weights. A weight read from a memory-mapped file
    /// is not read there again once laid out, so its pages go back to the OS (they are reloaded
    /// from the file if ever touched again).
    ///
    /// The layouts are new memory. Where they would take more than `available` bytes (when
    /// known), weights that all lie in memory-mapped files are left there and run in place
    /// ([`Linear::keep_in_place`]), and the returned note says so; other weights are an
    /// [`crate::Error::OutOfMemory`] now rather than the OOM killer halfway. Running in place,
    /// the layers past three quarters of `available` hand their pages back to the OS after each
    /// use, so that the layers before them stay in the page cache from token to token.
    pub fn prepare(&self, available: Option<u64>) -> Result<Option<String>> {
        use rayon::prelude::*;
        if !self.device.is_cpu() {
            return Ok(None);
        }
        // The layouts take up to 6% more than the blocks (Q4_K's f32 super-block scales).
        let needed: usize = self
            .linears()
            .iter()
            .filter_map(|l| match l.weight() {
                Weight::Quantized(q) => Some(q.storage_size_in_bytes() * 106 / 100),
                Weight::Dense(_) => None,
            })
            .sum();
        let what = format!(
            "laying out the {} weights for the CPU kernels",
            self.weights_format()
        );
        if let Err(e) = fits_in_memory(&what, needed as u64, available) {
            let quantized: Vec<&Linear> = self
                .linears()
                .into_iter()
                .filter(|l| matches!(l.weight(), Weight::Quantized(_)))
                .collect();
            for l in &quantized {
                if self.mapping_of(l)?.is_none() {
                    return Err(e); // in the heap: nothing to run from
                }
            }
            quantized.iter().for_each(|l| l.keep_in_place());
            // Read in order every token, a file larger than the page cache would evict each
            // layer before its next use (least recently used goes first), and every token would
            // read the whole file from disk. Layers past three quarters of the memory hand their
            // pages back after each use instead, so the ones before them stay cached and only the
            // rest is read again.
            let keep = available.map_or(0, |a| a - a / 4);
            let from = self.streamed_layers_from(keep)?;
            self.streamed_from
                .store(from, std::sync::atomic::Ordering::Relaxed);
            return Ok(Some(format!(
                "{what} would need {:.1} GB but {:.1} GB is available: the weights run in place from \
                 the mapped file instead, paged in from disk as they are used ({} of {} layers kept \
                 in memory, the rest read from disk every token: many times slower; a smaller \
                 quantization, or a machine with more memory, runs at full speed)",
                needed as f64 / 1e9,
                available.unwrap_or(0) as f64 / 1e9,
                from,
                self.layers.len(),
            )));
        }
        self.linears().par_iter().try_for_each(|l| -> Result<()> {
            let Weight::Quantized(q) = l.weight() else {
                return Ok(());
            };
            let (_, k) = q.shape().dims2()?;
            let x = Tensor::zeros((1, 1, k), DType::F32, &self.device)?;
            l.forward_rows(&x)?;
            if let Some((map, offset, len)) = self.mapping_of(l)? {
                // SAFETY: DONTNEED on a read-only, file-backed mapping only drops page table
                // entries: the addresses stay valid and read the file's bytes again.
                let _ = unsafe {
                    map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
                };
            }
            Ok(())
        })?;
        Ok(None)
    }

    /// Whether the quantized weights run in place from their mapped file rather than laid out
    /// for the tiled kernels (see [`Self::prepare`]).
    pub fn weights_in_place(&self) -> bool {
        self.linears().iter().any(|l| l.runs_in_place())
    }

    /// The memory-mapped file a quantized weight's blocks lie in, with their offset and length
    /// there; `None` for weights in the heap.
    fn mapping_of(&self, l: &Linear) -> Result<Option<(&memmap2::Mmap, usize, usize)>> {
        let Weight::Quantized(q) = l.weight() else {
            return Ok(None);
        };
        let data = q.data()?;
        let start = data.as_ptr() as usize;
        Ok(self.mapped_files.iter().find_map(|map| {
            let base = map.as_ptr() as usize;
            (start >= base && start + data.len() <= base + map.len())
                .then(|| (&**map, start - base, data.len()))
        }))
    }

    /// Whether the query and key weights hold each head's rows in llama.cpp's order for
    /// interleaved RoPE (loaded from a Llama GGUF) rather than Hugging Face's.
    pub fn qk_rows_in_gguf_order(&self) -> bool {
        self.layers
            .first()
            .is_some_and(|l| l.self_attn.gguf_rows.is_some())
    }

    /// Every tensor with its Hugging Face name, as loaded (quantized or not): what an export
    /// writes. Vectors (norms, biases) come as dense weights; the query and key rows are in
    /// llama.cpp's order where [`Self::qk_rows_in_gguf_order`].
    pub fn named_weights(&self) -> Vec<(String, Weight)> {
        let norm = |n: &RmsNorm| Weight::Dense(n.weight().clone());
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.table.clone(),
        )];
        let linear = |out: &mut Vec<(String, Weight)>, name: String, l: &Linear| {
            out.push((format!("{name}.weight"), l.weight().clone()));
            if let Some(b) = l.bias() {
                out.push((format!("{name}.bias"), Weight::Dense(b.clone())));
            }
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                norm(&layer.input_layernorm),
            ));
            let a = &layer.self_attn;
            for (n, l) in [
                ("q_proj", &a.q_proj),
                ("k_proj", &a.k_proj),
                ("v_proj", &a.v_proj),
                ("o_proj", &a.o_proj),
            ] {
                linear(&mut out, format!("{p}.self_attn.{n}"), l);
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                norm(&layer.post_attention_layernorm),
            ));
            let m = &layer.mlp;
            for (n, l) in [
                ("gate_proj", &m.gate_proj),
                ("up_proj", &m.up_proj),
                ("down_proj", &m.down_proj),
            ] {
                linear(&mut out, format!("{p}.mlp.{n}"), l);
            }
        }
        out.push(("model.norm.weight".to_string(), norm(&self.norm)));
        if !self.tied_lm_head {
            linear(&mut out, "lm_head".to_string(), &self.lm_head);
        }
        out
    }

    /// Bytes the weights occupy in memory.
    pub fn weights_size_in_bytes(&self) -> usize {
        self.named_weights()
            .iter()
            .map(|(_, w)| w.size_in_bytes())
            .sum()
    }

    /// Bytes of weights a decode step reads: every projection and the output head, once (the
    /// token embedding contributes one row, left out). Decode speed times this is the rate at
    /// which a step streams weights from memory, which bounds it on a CPU.
    pub fn decode_read_bytes(&self) -> usize {
        self.linears()
            .iter()
            .map(|l| l.weight().size_in_bytes())
            .sum()
    }

    /// How the projection weights are stored: `"f32"`, `"bf16"`, `"q4k"`, or a mix such as
    /// `"q4k+q8_0"` when some matrices fell back to another format.
    pub fn weights_format(&self) -> String {
        let mut kinds: Vec<String> = Vec::new();
        for (name, w) in self.named_weights() {
            if !name.ends_with(".weight") || name.contains("norm") {
                continue;
            }
            let k = match &w {
                Weight::Dense(t) => crate::device::dtype_name(t.dtype()).to_string(),
                Weight::Quantized(q) => format!("{:?}", q.dtype()).to_ascii_lowercase(),
            };
            if !kinds.contains(&k) {
                kinds.push(k);
            }
        }
        kinds.join("+")
    }

    /// The logits tensor's width (the config's `vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention of each query row over the keys its mask lets it see, in f64 with plain loops.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: [usize; 5],
        visible: &dyn Fn(usize, usize) -> bool,
    ) -> Vec<f64> {
        let [heads, kv_heads, s, kv_len, hd] = dims;
        let group = heads / kv_heads;
        let start = kv_len - s;
        let mut out = vec![0f64; s * heads * hd];
        for h in 0..heads {
            let kh = h / group;
            for i in 0..s {
                let qrow = &q[(h * s + i) * hd..][..hd];
                let scores: Vec<Option<f64>> = (0..kv_len)
                    .map(|j| {
                        visible(start + i, j).then(|| {
                            let krow = &k[(kh * kv_len + j) * hd..][..hd];
                            qrow.iter()
                                .zip(krow)
                                .map(|(&a, &b)| a as f64 * b as f64)
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                    })
                    .collect();
                let max = scores.iter().flatten().cloned().fold(f64::MIN, f64::max);
                let total: f64 = scores.iter().flatten().map(|x| (x - max).exp()).sum();
                for (j, sc) in scores.iter().enumerate() {
                    if let Some(sc) = sc {
                        let p = (sc - max).exp() / total;
                        for d in 0..hd {
                            out[(i * heads + h) * hd + d] +=
                                p * v[(kh * kv_len + j) * hd + d] as f64;
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn a_model_beyond_the_available_memory_is_a_clear_error() {
        assert!(fits_in_memory("x", 10, Some(10)).is_ok());
        assert!(fits_in_memory("x", 10, None).is_ok());
        let err = fits_in_memory(
            "laying out the q4k weights",
            44_400_000_000,
            Some(24_700_000_000),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "laying out the q4k weights needs 44.4 GB of memory but 24.7 GB is available: use a smaller model or quantization, or a machine with more memory"
        );
    }

    #[test]
    fn blocked_attention_matches_plain_attention_for_every_block_size() {
        let dev = Device::Cpu;
        let [heads, kv_heads, s, kv_len, hd] = [6, 2, 9, 23, 8];
        let random = |n: usize, seed: u64| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    let x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
                    ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
                })
                .collect()
        };
        let (qv, kv, vv) = (
            random(heads * s * hd, 1),
            random(kv_heads * kv_len * hd, 2),
            random(kv_heads * kv_len * hd, 3),
        );
        let q = Tensor::from_vec(qv.clone(), (1, heads, s, hd), &dev).unwrap();
        let k = Tensor::from_vec(kv.clone(), (1, kv_heads, kv_len, hd), &dev).unwrap();
        let v = Tensor::from_vec(vv.clone(), (1, kv_heads, kv_len, hd), &dev).unwrap();
        let start = kv_len - s;
        let windows: [Option<usize>; 2] = [None, Some(5)];
        for window in windows {
            let visible =
                move |qpos: usize, j: usize| j <= qpos && window.is_none_or(|w| qpos - j < w);
            let m: Vec<f32> = (0..s * kv_len)
                .map(|x| {
                    if visible(start + x / kv_len, x % kv_len) {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            let mask = Tensor::from_vec(m, (s, kv_len), &dev).unwrap();
            let want = reference(&qv, &kv, &vv, [heads, kv_heads, s, kv_len, hd], &visible);
            let scale = 1.0 / (hd as f64).sqrt();
            // A budget of one byte: one query row per block; then blocks of 2 rows, the last one
            // shorter; then one block per KV head.
            for budget in [1, 4 * 3 * kv_len * 2, usize::MAX] {
                let got = blocked_attention(&q, &k, &v, Some(&mask), scale, budget)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert_eq!(got.len(), want.len());
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() < 1e-5,
                        "window {window:?} budget {budget} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }
}
