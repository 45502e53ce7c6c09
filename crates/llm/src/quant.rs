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
}

impl Quantization {
    /// Every format, in the order `--help` lists them.
    pub const ALL: [Quantization; 10] = [
        Self::Q8_0,
        Self::Q6K,
        Self::Q5K,
        Self::Q4K,
        Self::Q3K,
        Self::Q2K,
        Self::Q5_1,
        Self::Q5_0,
        Self::Q4_1,
        Self::Q4_0,
    ];

    /// The GGML block type.
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q2K => GgmlDType::Q2K,
            Self::Q3K => GgmlDType::Q3K,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
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
        }
    }

    /// The block type a `(rows, k)` matrix gets: this one when `k` splits into its blocks, else
    /// the first of Q8_0 or f32 that fits, as llama.cpp falls back for such tensors.
    pub fn for_row_length(self, k: usize) -> GgmlDType {
        let wanted = self.ggml();
        if k.is_multiple_of(wanted.block_size()) {
            wanted
        } else if k.is_multiple_of(GgmlDType::Q8_0.block_size()) {
            GgmlDType::Q8_0
        } else {
            GgmlDType::F32
        }
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
        let norm = s.to_ascii_lowercase().replace(['-', '_'], "");
        // llama.cpp spells the k-quants `Q4_K` (and `Q4_K_M` for its mix); accept those too.
        let norm = norm.strip_suffix('m').unwrap_or(&norm).to_string();
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

    #[test]
    fn parses_our_names_and_llama_cpp_spellings() {
        for q in Quantization::ALL {
            assert_eq!(q.name().parse::<Quantization>().unwrap(), q);
        }
        assert_eq!("Q4_K_M".parse::<Quantization>().unwrap(), Quantization::Q4K);
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
