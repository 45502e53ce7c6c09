//! Choosing the next token from logits: repetition penalty over recent tokens, temperature (0 is
//! greedy), top-k, top-p and min-p, with a seeded RNG so that a seed and an input give the same
//! tokens. Hand-written because candle-transformers' `LogitsProcessor` has no min-p, no penalty
//! window and cannot exclude the padding ids past the tokenizer.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// How tokens are drawn. [`SamplingParams::validate`] states every valid range.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token (greedy). 0.0..=2.0.
    pub temperature: f64,
    /// Nucleus sampling: the smallest set of tokens whose mass reaches `top_p`. (0, 1]; 1 is off.
    pub top_p: f64,
    /// Only the `top_k` most likely tokens; 0 is off.
    pub top_k: usize,
    /// Drops tokens less likely than `min_p` times the most likely one. [0, 1); 0 is off.
    pub min_p: f64,
    /// Divides positive (multiplies negative) logits of recently seen tokens. 0.1..=10; 1 is off.
    pub repetition_penalty: f64,
    /// How many recent tokens the penalty looks at. 1..=32768.
    pub repetition_window: usize,
    /// Whether the prompt's tokens count as seen (off by default: in RAG the prompt is the documents,
    /// and the answer should be free to quote them).
    pub penalize_prompt: bool,
    /// RNG seed; `None` draws one at random.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.6,
            top_p: 0.95,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repetition_window: 64,
            penalize_prompt: false,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            ..Self::default()
        }
    }

    /// Rejects out-of-range values with the valid range in the message.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !(0.0..=2.0).contains(&t) || t.is_nan() {
            return Err(Error::invalid("temperature", t, "0.0..=2.0 (0 = greedy)"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(
                "top_p",
                self.top_p,
                "greater than 0 and at most 1.0",
            ));
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return Err(Error::invalid(
                "min_p",
                self.min_p,
                "0.0 (off) up to but excluding 1.0",
            ));
        }
        if !(0.1..=10.0).contains(&self.repetition_penalty) {
            return Err(Error::invalid(
                "repetition_penalty",
                self.repetition_penalty,
                "0.1..=10.0 (1.0 = off)",
            ));
        }
        if !(1..=32768).contains(&self.repetition_window) {
            return Err(Error::invalid(
                "repetition_window",
                self.repetition_window,
                "1..=32768 tokens",
            ));
        }
        if self.top_k > 1_000_000 {
            return Err(Error::invalid("top_k", self.top_k, "0 (off) ..= 1000000"));
        }
        Ok(())
    }
}

/// Draws tokens according to [`SamplingParams`].
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    allowed: usize,
    rng: StdRng,
    // Reused buffers: sampling runs once per token over ~152k logits.
    probs: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler that only ever returns ids below `allowed` (the tokenizer's size).
    pub fn new(params: SamplingParams, allowed: usize) -> Result<Self> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Self {
            params,
            allowed,
            rng,
            probs: Vec::new(),
        })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `recent` are the tokens the repetition penalty looks at (the caller
    /// passes the window).
    pub fn sample(&mut self, logits: &[f32], recent: &[u32]) -> Result<u32> {
        let n = self.allowed.min(logits.len());
        if n == 0 {
            return Err(Error::invalid(
                "logits",
                "empty",
                "at least one allowed token",
            ));
        }
        let rp = self.params.repetition_penalty as f32;
        if rp == 1.0 || recent.is_empty() {
            return self.sample_from(logits[..n].iter().copied());
        }
        let seen: std::collections::HashSet<u32> = recent.iter().copied().collect();
        self.sample_from(logits[..n].iter().enumerate().map(|(i, &x)| {
            if !seen.contains(&(i as u32)) {
                x
            } else if x > 0.0 {
                x / rp
            } else {
                x * rp
            }
        }))
    }

    fn sample_from(&mut self, logits: impl Iterator<Item = f32>) -> Result<u32> {
        let p = self.params.clone();
        self.probs.clear();
        self.probs
            .extend(logits.enumerate().map(|(i, x)| (x, i as u32)));
        if self.probs.iter().any(|(x, _)| x.is_nan()) {
            return Err(Error::Candle(candle_core::Error::Msg(
                "the model produced NaN logits (with f16 this model overflows: load it in f32 or bf16)".into(),
            )));
        }
        if p.temperature == 0.0 {
            // First maximum wins ties, as torch.argmax does.
            let mut best = 0usize;
            for (i, (x, _)) in self.probs.iter().enumerate() {
                if *x > self.probs[best].0 {
                    best = i;
                }
            }
            return Ok(self.probs[best].1);
        }
        let inv_t = 1.0 / p.temperature as f32;
        let max = self
            .probs
            .iter()
            .map(|(x, _)| *x)
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Err(Error::Candle(candle_core::Error::Msg(
                "every token has probability 0".into(),
            )));
        }
        let mut sum = 0f32;
        for (x, _) in self.probs.iter_mut() {
            *x = ((*x - max) * inv_t).exp();
            sum += *x;
        }
        for (x, _) in self.probs.iter_mut() {
            *x /= sum;
        }
        let by_prob = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let mut kept = self.probs.len();
        if p.top_k > 0 && p.top_k < kept {
            self.probs.select_nth_unstable_by(p.top_k - 1, by_prob);
            kept = p.top_k;
        }
        // Sort only a prefix when it already holds the nucleus: the usual case, and it avoids
        // sorting 152k entries per token. Exact: the fallback sorts everything.
        let mut sorted = kept.min(1024);
        if sorted < kept {
            self.probs[..kept].select_nth_unstable_by(sorted - 1, by_prob);
        }
        self.probs[..sorted].sort_unstable_by(by_prob);
        let mass: f32 = self.probs[..sorted].iter().map(|(x, _)| x).sum();
        if sorted < kept && (p.top_p >= 1.0 || mass < p.top_p as f32) {
            self.probs[..kept].sort_unstable_by(by_prob);
            sorted = kept;
        }
        let mut keep = sorted;
        if p.top_p < 1.0 {
            let mut cum = 0f32;
            for (i, (x, _)) in self.probs[..sorted].iter().enumerate() {
                cum += x;
                if cum >= p.top_p as f32 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = self.probs[0].0 * p.min_p as f32;
            keep = self.probs[..keep]
                .iter()
                .take_while(|(x, _)| *x >= floor)
                .count()
                .max(1);
        }
        let total: f32 = self.probs[..keep].iter().map(|(x, _)| x).sum();
        let mut r = self.rng.random::<f32>() * total;
        for &(x, id) in &self.probs[..keep] {
            if r < x {
                return Ok(id);
            }
            r -= x;
        }
        Ok(self.probs[keep - 1].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(p: SamplingParams, allowed: usize) -> Sampler {
        Sampler::new(p, allowed).unwrap()
    }

    #[test]
    fn greedy_takes_the_argmax_below_the_allowed_range() {
        let mut s = sampler(SamplingParams::greedy(), 3);
        // id 3 is padding past the tokenizer: never chosen though it is the largest.
        assert_eq!(s.sample(&[0.1, 2.0, 0.5, 9.0], &[]).unwrap(), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..500).map(|i| ((i * 37 % 101) as f32) / 20.0).collect();
        let params = SamplingParams {
            seed: Some(7),
            temperature: 1.0,
            top_p: 0.9,
            ..SamplingParams::default()
        };
        let draw = |p: SamplingParams| {
            let mut s = sampler(p, 500);
            (0..50)
                .map(|_| s.sample(&logits, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(params.clone()), draw(params.clone()));
        let other = SamplingParams {
            seed: Some(8),
            ..params.clone()
        };
        assert_ne!(draw(params), draw(other));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let p = SamplingParams {
            top_k: 1,
            temperature: 1.5,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = sampler(p, 4);
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 1.0, 3.0, 2.9], &[]).unwrap(), 2);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // Probabilities ~ [0.0, 0.5, 0.5, ~0]: top_p 0.5 keeps only the first maximum (id 1).
        let logits = [-20.0, 5.0, 5.0, -20.0];
        let p = SamplingParams {
            top_p: 0.5,
            temperature: 1.0,
            seed: Some(3),
            ..Default::default()
        };
        let mut s = sampler(p, 4);
        for _ in 0..20 {
            assert_eq!(s.sample(&logits, &[]).unwrap(), 1);
        }
        let p = SamplingParams {
            min_p: 0.5,
            temperature: 1.0,
            seed: Some(3),
            ..Default::default()
        };
        let mut s = sampler(p, 4);
        for _ in 0..50 {
            let id = s.sample(&logits, &[]).unwrap();
            assert!(id == 1 || id == 2);
        }
    }

    #[test]
    fn top_p_beyond_the_sorted_prefix_is_exact() {
        // A flat distribution over 5000 ids: the nucleus is larger than the 1024 pre-sorted ones.
        let logits = vec![0.0f32; 5000];
        let p = SamplingParams {
            top_p: 0.9,
            temperature: 1.0,
            seed: Some(5),
            ..Default::default()
        };
        let mut s = sampler(p, 5000);
        let ids: std::collections::HashSet<u32> =
            (0..2000).map(|_| s.sample(&logits, &[]).unwrap()).collect();
        assert!(
            ids.iter().any(|&i| i >= 1024),
            "ids beyond the first 1024 are drawn"
        );
        assert!(ids.iter().all(|&i| i < 4500), "the last 10% of ties is cut");
    }

    #[test]
    fn repetition_penalty_demotes_recent_tokens() {
        let mut s = sampler(
            SamplingParams {
                repetition_penalty: 2.0,
                ..SamplingParams::greedy()
            },
            3,
        );
        assert_eq!(s.sample(&[1.0, 1.5, 0.5], &[1]).unwrap(), 0);
        assert_eq!(s.sample(&[1.0, 1.5, 0.5], &[]).unwrap(), 1);
        let many: Vec<u32> = std::iter::repeat_n(1, 100).collect();
        assert_eq!(s.sample(&[1.0, 1.5, 0.5], &many).unwrap(), 0);
    }

    #[test]
    fn out_of_range_values_are_rejected_with_the_range() {
        let cases = [
            SamplingParams {
                temperature: -0.1,
                ..Default::default()
            },
            SamplingParams {
                temperature: f64::NAN,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                min_p: 1.0,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                repetition_window: 0,
                ..Default::default()
            },
        ];
        // Each names its parameter, the value given and the valid range.
        let want = [
            ("temperature", "-0.1", "0.0..=2.0"),
            ("temperature", "NaN", "0.0..=2.0"),
            ("top_p", "0", "greater than 0 and at most 1.0"),
            ("top_p", "1.5", "greater than 0 and at most 1.0"),
            ("min_p", "1", "up to but excluding 1.0"),
            ("repetition_penalty", "0", "0.1..=10.0"),
            ("repetition_window", "0", "1..=32768"),
        ];
        assert_eq!(cases.len(), want.len());
        for (c, (name, value, range)) in cases.iter().zip(want) {
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains(name) && e.contains(value) && e.contains(range),
                "{e} should name {name}, {value} and {range}"
            );
        }
    }

    #[test]
    fn nan_logits_are_an_error_not_a_token() {
        let mut s = sampler(SamplingParams::greedy(), 2);
        assert!(s.sample(&[f32::NAN, 1.0], &[]).is_err());
    }
}
