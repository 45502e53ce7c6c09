//! Quantized weight formats: the names users give (`--quantize q4k`), the candle/GGML block type each
//! maps to, and the fallback for matrices whose rows a block type cannot split (llama.cpp's rule).

use std::fmt;
use std::str::FromStr;

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// A weight format a model's matrices can be quantized to at load time (or are stored in, in a
/// GGUF file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quantization {
    /// 8-bit, blocks of 32 with an f16 scale (8.5 bits per weight).
    Q8_0,
    /// 4-bit, blocks of 32 with an f16 scale (4.5 bits per weight).
    Q4_0,
    /// 4-bit with scale and minimum, blocks of 32 (5 bits per weight).
    Q4_1,
    /// 5-bit, blocks of 32 (5.5 bits per weight).
    Q5_0,
    /// 5-bit with scale and minimum, blocks of 32 (6 bits per weight).
    Q5_1,
    /// k-quant 2-bit, super-blocks of 256 (2.6 bits per weight).
    Q2K,
    /// k-quant 3-bit, super-blocks of 256 (3.4 bits per weight).
    Q3K,
    /// k-quant 4-bit, super-blocks of 256 (4.5 bits per weight).
    Q4K,
    /// k-quant 5-bit, super-blocks of 256 (5.5 bits per weight).
    Q5K,
    /// k-quant 6-bit, super-blocks of 256 (6.6 bits per weight).
    Q6K,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the output head and for the value and MLP-down
    /// projections of the layers llama.cpp gives more bits (about 4.9 bits per weight).
    Q4KM,
    /// llama.cpp's Q5_K_M mix: Q5_K, with Q6_K where Q4_K_M has it (about 5.7 bits per weight).
    Q5KM,
}

impl Quantization {
    /// Every format, in the order `--help` lists them.
    pub const ALL: [Quantization; 12] = [
        Self::Q8_0,
        Self::Q6K,
        Self::Q5KM,
        Self::Q5K,
        Self::Q4KM,
        Self::Q4K,
        Self::Q3K,
        Self::Q2K,
        Self::Q5_1,
        Self::Q5_0,
        Self::Q4_1,
        Self::Q4_0,
    ];

    /// The GGML block type (of most matrices, for a mix).
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q2K => GgmlDType::Q2K,
            Self::Q3K => GgmlDType::Q3K,
            Self::Q4K | Self::Q4KM => GgmlDType::Q4K,
            Self::Q5K | Self::Q5KM => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// The name users type and GGUF file names carry.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q2K => "q2k",
            Self::Q3K => "q3k",
            Self::Q4K => "q4k",
            Self::Q5K => "q5k",
            Self::Q6K => "q6k",
            Self::Q4KM => "q4_k_m",
            Self::Q5KM => "q5_k_m",
        }
    }

    /// The block type a `(rows, k)` matrix gets: this one when `k` splits into its blocks, else
    /// the first of Q8_0 or f32 that fits, as llama.cpp falls back for such tensors.
    pub fn for_row_length(self, k: usize) -> GgmlDType {
        fits(self.ggml(), k)
    }

    /// The block type of the matrix with Hugging Face name `name` in a model of `layers` layers
    /// and row length `k`: for a mix, the type llama.cpp's `llama_tensor_get_type` gives that
    /// tensor (checked against llama-quantize's output in the tests), else [`Self::ggml`].
    pub fn for_tensor(self, name: &str, layers: usize, k: usize) -> GgmlDType {
        if !matches!(self, Self::Q4KM | Self::Q5KM) {
            return self.for_row_length(k);
        }
        let layer = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        let more_bits = layer.is_some_and(|i| use_more_bits(i, layers));
        let wanted = if name == "lm_head.weight" {
            GgmlDType::Q6K
        } else if name.ends_with("self_attn.v_proj.weight") {
            if more_bits {
                GgmlDType::Q6K
            } else if layers == 80 && self == Self::Q4KM {
                // llama.cpp's 70B rule: eight query heads share each value head, so the value
                // projection is small and gets Q5_K for little size.
                GgmlDType::Q5K
            } else {
                self.ggml()
            }
        } else if name.ends_with("mlp.down_proj.weight") && more_bits {
            GgmlDType::Q6K
        } else {
            self.ggml()
        };
        fits(wanted, k)
    }
}

/// llama.cpp's choice of the layers that get more bits in its _M mixes: the first and last
/// eighth, and every third layer between.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    let eighth = layers / 8;
    match layer.checked_sub(eighth) {
        None => true,
        Some(_) if layer >= 7 * layers / 8 => true,
        Some(past) => past % 3 == 2,
    }
}

/// `wanted` when rows of length `k` split into its blocks, else Q8_0 or f32 (llama.cpp's fallback).
fn fits(wanted: GgmlDType, k: usize) -> GgmlDType {
    if k.is_multiple_of(wanted.block_size()) {
        wanted
    } else if k.is_multiple_of(GgmlDType::Q8_0.block_size()) {
        GgmlDType::Q8_0
    } else {
        GgmlDType::F32
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Quantization {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        // llama.cpp spells the k-quants `Q4_K` and its mixes `Q4_K_M`; accept those too.
        let norm = s.to_ascii_lowercase().replace(['-', '_'], "");
        Self::ALL
            .into_iter()
            .find(|q| q.name().replace('_', "") == norm)
            .ok_or_else(|| {
                Error::invalid(
                    "quantization",
                    s,
                    format!("one of {}", Self::ALL.map(|q| q.name()).join(", ")),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The types llama-quantize (llama.cpp from llama-cpp-python 0.3.36) chose for a Q4_K_M of the
    /// 1.5B shape (28 layers), read back from its output with gguf-py: Q6_K for output.weight and
    /// for attn_v and ffn_down in these layers, Q4_K for everything else.
    const LLAMA_QUANTIZE_Q6K_LAYERS_28: [usize; 14] =
        [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27];

    #[test]
    fn q4_k_m_is_the_mix_llama_quantize_writes() {
        let q = Quantization::Q4KM;
        for layer in 0..28 {
            let want = if LLAMA_QUANTIZE_Q6K_LAYERS_28.contains(&layer) {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q4K
            };
            for t in ["self_attn.v_proj", "mlp.down_proj"] {
                let name = format!("model.layers.{layer}.{t}.weight");
                assert_eq!(q.for_tensor(&name, 28, 1536), want, "{name}");
            }
            for t in [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
            ] {
                let name = format!("model.layers.{layer}.{t}.weight");
                assert_eq!(q.for_tensor(&name, 28, 1536), GgmlDType::Q4K, "{name}");
            }
        }
        assert_eq!(q.for_tensor("lm_head.weight", 28, 1536), GgmlDType::Q6K);
        assert_eq!(
            q.for_tensor("model.embed_tokens.weight", 28, 1536),
            GgmlDType::Q4K
        );
        // bartowski's DeepSeek-R1-Distill-Llama-8B-Q4_K_M.gguf (32 layers): 33 Q6_K and 193 Q4_K
        // matrices, as a llama.cpp load log lists them.
        let names: Vec<String> = (0..32)
            .flat_map(|l| {
                [
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                    "mlp.gate_proj",
                    "mlp.up_proj",
                    "mlp.down_proj",
                ]
                .map(|t| format!("model.layers.{l}.{t}.weight"))
            })
            .chain([
                "lm_head.weight".to_string(),
                "model.embed_tokens.weight".to_string(),
            ])
            .collect();
        let count = |t| {
            names
                .iter()
                .filter(|n| q.for_tensor(n, 32, 4096) == t)
                .count()
        };
        assert_eq!((count(GgmlDType::Q6K), count(GgmlDType::Q4K)), (33, 193));
        // Rows a k-quant block cannot split fall back, as for the plain formats.
        assert_eq!(q.for_tensor("lm_head.weight", 28, 96), GgmlDType::Q8_0);
        assert_eq!(
            Quantization::Q4K.for_tensor("lm_head.weight", 28, 1536),
            GgmlDType::Q4K
        );
    }

    #[test]
    fn parses_our_names_and_llama_cpp_spellings() {
        for q in Quantization::ALL {
            assert_eq!(q.name().parse::<Quantization>().unwrap(), q);
        }
        assert_eq!(
            "Q4_K_M".parse::<Quantization>().unwrap(),
            Quantization::Q4KM
        );
        assert_eq!("q4_k".parse::<Quantization>().unwrap(), Quantization::Q4K);
        assert_eq!(
            "Q5_K_M".parse::<Quantization>().unwrap(),
            Quantization::Q5KM
        );
        assert_eq!("q8_0".parse::<Quantization>().unwrap(), Quantization::Q8_0);
        assert_eq!("Q6_K".parse::<Quantization>().unwrap(), Quantization::Q6K);
        let err = "q7".parse::<Quantization>().unwrap_err().to_string();
        assert!(err.contains("q8_0") && err.contains("q4k"), "{err}");
    }

    #[test]
    fn rows_a_block_cannot_split_fall_back() {
        assert_eq!(Quantization::Q4K.for_row_length(1536), GgmlDType::Q4K);
        assert_eq!(Quantization::Q4K.for_row_length(64), GgmlDType::Q8_0);
        assert_eq!(Quantization::Q8_0.for_row_length(40), GgmlDType::F32);
    }
}
