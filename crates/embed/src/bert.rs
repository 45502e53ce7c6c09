//! The BERT encoder the embedders run (BGE, MiniLM): transformers' `BertModel` without its pooler,
//! on candle (a GPU), with query, key and value in one matmul and candle's fused last-dimension
//! softmax; on the CPU its weights go to the packed encoder (`crate::packed`), which uses this
//! file's vectorisable GELU (a rational erf: libm's `erff` per element was 20% of embedding time
//! in a profile).

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct};

/// erf(x) as a rational function of x (Eigen's and TensorFlow's fast float erf; the input is
/// clamped to [-4, 4], where erf is 1 to float precision): absolute error below 5e-7, and no
/// branch or call, so the loop over a buffer vectorises.
#[inline(always)]
// The coefficients as published (f64 digits), rounded to f32 by the compiler.
#[allow(clippy::excessive_precision)]
fn erf(x: f32) -> f32 {
    const A: [f32; 7] = [
        -1.609_603_3e-2,
        -2.954_599_8e-3,
        -7.349_906_3e-4,
        -5.692_506_4e-5,
        -2.101_024e-6,
        2.770_681_4e-8,
        -2.726_142_3e-10,
    ];
    const B: [f32; 5] = [
        -1.426_473_9e-2,
        -7.373_329e-3,
        -1.682_827e-3,
        -2.133_740_6e-4,
        -1.456_607_2e-5,
    ];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = A[6];
    for a in A[..6].iter().rev() {
        p = p * x2 + a;
    }
    let mut q = B[4];
    for b in B[..4].iter().rev() {
        q = q * x2 + b;
    }
    x * p / q
}

/// GELU with the exact (erf) formulation, as BERT's `gelu`: x/2 (1 + erf(x / sqrt 2)).
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

fn activation(act: HiddenAct, xs: &Tensor) -> Result<Tensor> {
    match act {
        HiddenAct::Gelu => xs.gelu_erf(),
        HiddenAct::GeluApproximate => xs.gelu(),
        HiddenAct::Relu => xs.relu(),
    }
}

struct Layer {
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let h = cfg.hidden_size;
        let attn = vb.pp("attention");
        let part = |name: &str| -> Result<(Tensor, Tensor)> {
            let v = attn.pp("self").pp(name);
            Ok((v.get((h, h), "weight")?, v.get(h, "bias")?))
        };
        let (qw, qb) = part("query")?;
        let (kw, kb) = part("key")?;
        let (vw, vb_) = part("value")?;
        let qkv = Linear::new(
            Tensor::cat(&[qw, kw, vw], 0)?,
            Some(Tensor::cat(&[qb, kb, vb_], 0)?),
        );
        Ok(Self {
            qkv,
            attention_out: linear(h, h, attn.pp("output").pp("dense"))?,
            attention_norm: layer_norm(h, cfg.layer_norm_eps, attn.pp("output").pp("LayerNorm"))?,
            intermediate: linear(h, cfg.intermediate_size, vb.pp("intermediate").pp("dense"))?,
            output: linear(cfg.intermediate_size, h, vb.pp("output").pp("dense"))?,
            output_norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor, cfg: &Config) -> Result<Tensor> {
        let (b, l, h) = xs.dims3()?;
        let heads = cfg.num_attention_heads;
        let d = h / heads;
        let qkv = self.qkv.forward(xs)?;
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, i * h, h)?
                .reshape((b, l, heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, l, h))?;
        let attended = self
            .attention_norm
            .forward(&(self.attention_out.forward(&context)? + xs)?)?;
        let inner = activation(cfg.hidden_act, &self.intermediate.forward(&attended)?)?;
        self.output_norm
            .forward(&(self.output.forward(&inner)? + attended)?)
    }
}

/// A BERT encoder: token states of the last layer.
pub(crate) struct BertEncoder {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
    layers: Vec<Layer>,
    cfg: Config,
}

impl BertEncoder {
    /// Loads the weights under `bert.`, `{model_type}.` or no prefix (sentence-transformers saves
    /// them bare, transformers' pretraining heads under `bert.`).
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let mut prefixes = vec![String::new(), "bert".to_string()];
        if let Some(t) = &cfg.model_type {
            prefixes.push(t.clone());
        }
        let mut last = None;
        for prefix in prefixes {
            let root = if prefix.is_empty() {
                vb.clone()
            } else {
                vb.pp(&prefix)
            };
            match Self::load_at(root, cfg) {
                Ok(model) => return Ok(model),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| candle_core::Error::Msg("no BERT weights found".into())))
    }

    fn load_at(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let e = vb.pp("embeddings");
        let h = cfg.hidden_size;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(vb.pp("encoder").pp(format!("layer.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word: embedding(cfg.vocab_size, h, e.pp("word_embeddings"))?,
            position: embedding(cfg.max_position_embeddings, h, e.pp("position_embeddings"))?,
            token_type: embedding(cfg.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            norm: layer_norm(h, cfg.layer_norm_eps, e.pp("LayerNorm"))?,
            layers,
            cfg: cfg.clone(),
        })
    }

    /// The last layer's states `[batch, len, hidden]` of `ids` (`[batch, len]`), padding masked
    /// out by `mask` (1 = token, 0 = padding).
    pub fn forward(&self, ids: &Tensor, token_types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (_, l) = ids.dims2()?;
        let device: &Device = ids.device();
        let positions = Tensor::arange(0u32, l as u32, device)?;
        let mut xs = (self.word.forward(ids)? + self.token_type.forward(token_types)?)?
            .broadcast_add(&self.position.forward(&positions)?)?;
        xs = self.norm.forward(&xs)?;
        // 0 for tokens, the most negative float for padding: [batch, 1, 1, len].
        let mask = ((1.0 - mask.to_dtype(DType::F32)?)? * f32::MIN as f64)?
            .unsqueeze(1)?
            .unsqueeze(1)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask, &self.cfg)?;
        }
        Ok(xs)
    }

    /// The same encoder over packed tokens on the CPU, its projections on AMX tiles where `tiles`
    /// asks and the CPU has them; `None` on other devices and activations than GELU.
    pub(crate) fn packed(&self, tiles: bool) -> Result<Option<crate::packed::PackedBert>> {
        use crate::packed::{PackedBert, PackedLayer, PackedLinear};
        if !self.word.embeddings().device().is_cpu() {
            return Ok(None);
        }
        let values = |t: &Tensor| -> Result<Vec<f32>> {
            t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
        };
        let norm = |n: &LayerNorm| -> Result<(Vec<f32>, Vec<f32>)> {
            let beta = match n.bias() {
                Some(b) => values(b)?,
                None => vec![0.0; n.weight().elem_count()],
            };
            Ok((values(n.weight())?, beta))
        };
        let packed = |l: &Linear, scale_rows: usize, scale: f32| -> Result<PackedLinear> {
            let (outputs, inputs) = l.weight().dims2()?;
            let mut w = values(l.weight())?;
            let mut b = match l.bias() {
                Some(b) => values(b)?,
                None => vec![0.0; outputs],
            };
            // The attention's 1/sqrt(head size) folded into the query rows.
            for (row, bias) in w
                .chunks_exact_mut(inputs)
                .zip(b.iter_mut())
                .take(scale_rows)
            {
                row.iter_mut().for_each(|v| *v *= scale);
                *bias *= scale;
            }
            Ok(PackedLinear::new(w, b, outputs, inputs, tiles))
        };
        let h = self.cfg.hidden_size;
        let heads = self.cfg.num_attention_heads;
        if heads == 0
            || !h.is_multiple_of(heads)
            || self.cfg.type_vocab_size == 0
            || self.cfg.hidden_act != HiddenAct::Gelu
        {
            return Ok(None);
        }
        let scale = 1.0 / ((h / heads) as f32).sqrt();
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            layers.push(PackedLayer {
                qkv: packed(&layer.qkv, h, scale)?,
                attention_out: packed(&layer.attention_out, 0, 1.0)?,
                attention_norm: norm(&layer.attention_norm)?,
                intermediate: packed(&layer.intermediate, 0, 1.0)?,
                output: packed(&layer.output, 0, 1.0)?,
                output_norm: norm(&layer.output_norm)?,
            });
        }
        Ok(Some(PackedBert {
            word: values(self.word.embeddings())?,
            position: values(self.position.embeddings())?,
            token_type: values(self.token_type.embeddings())?,
            norm: norm(&self.norm)?,
            layers,
            hidden: h,
            heads,
            intermediate: self.cfg.intermediate_size,
            eps: self.cfg.layer_norm_eps as f32,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_and_gelu_match_libm() {
        let mut worst = 0f64;
        for i in -80_000..=80_000 {
            let x = i as f32 / 10_000.0;
            let exact = libm_erf(x as f64);
            worst = worst.max((erf(x) as f64 - exact).abs());
        }
        // The approximation itself is within 7e-8; float arithmetic adds a few ulp.
        assert!(worst < 1e-6, "erf error {worst}");
        let x = [-3.0f32, -1.0, -0.1, 0.0, 0.5, 2.0, 10.0];
        let ours: Vec<f32> = x.iter().map(|&v| gelu(v)).collect();
        let t = Tensor::new(&x, &Device::Cpu).unwrap();
        let candle = t.gelu_erf().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in ours.iter().zip(&candle) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    /// erf in f64 by its Taylor series (|x| < 3) or continued fraction, for the test only.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() < 3.0 {
            let mut sum = x;
            let mut term = x;
            for n in 1..200 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc continued fraction (Lentz), accurate far out.
            let z = x.abs();
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (z + f);
            }
            let erfc = (-z * z).exp() / std::f64::consts::PI.sqrt() / (z + f);
            (1.0 - erfc).copysign(x)
        }
    }
}
