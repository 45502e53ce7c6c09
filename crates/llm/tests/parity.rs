//! Parity with Hugging Face transformers on the committed tiny random Qwen2 (grouped-query
//! attention, q/k/v biases, DeepSeek special tokens and chat template) and Llama (llama3 RoPE
//! scaling, no biases, Llama 3's tokenizer split and added tokens, a transformers 5 config.json):
//! prompt rendering and tokenization, logits of a cold prefill, of cached decode steps and of a
//! second-turn prefill on a warm cache, and greedy continuations. Every test runs on both.

mod common;

use std::ops::ControlFlow;

use candle_core::DType;
use common::*;
use thinkrag_llm::{DTypeChoice, GenerationParams, Message, Role, SamplingParams};

const TOL: f32 = 1e-4;

for_each_fixture!(
    prompt_renders_and_tokenizes_like_transformers,
    special_tokens_follow_generation_config,
    cold_prefill_and_cached_decode_match_transformers,
    greedy_continuation_is_identical,
    warm_cache_second_turn_matches_transformers_and_a_cold_prefill,
    warm_multi_token_prefill_works_in_every_dtype,
    cache_truncated_and_extended_equals_cold,
);

fn messages(v: &serde_json::Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).expect("reference messages deserialize")
}

fn prompt_renders_and_tokenizes_like_transformers() {
    let e = engine(DTypeChoice::F32);
    let r = reference_json();
    let turn1 = messages(&r["turn1_messages"]);
    assert_eq!(turn1.last().unwrap().role, Role::User);
    let text = e.tokenizer().render_chat(&turn1, true).unwrap();
    assert_eq!(text, r["prompt_text"].as_str().unwrap());
    let prompt = ids(&reference()["prompt_ids"]);
    assert_eq!(e.encode_messages(&turn1).unwrap(), prompt);
    let bos = e.tokenizer().special().bos;
    assert_eq!(prompt[0], bos);
    assert_ne!(prompt[1], bos, "no double BOS");

    let turn2 = messages(&r["turn2_messages"]);
    let text2 = e.tokenizer().render_chat(&turn2, true).unwrap();
    assert_eq!(text2, r["turn2_text"].as_str().unwrap());
    assert!(
        !text2.contains(r["turn1_reasoning"].as_str().unwrap_or("\u{0}")),
        "past reasoning is not fed back"
    );
    assert_eq!(
        e.encode_messages(&turn2).unwrap(),
        ids(&reference()["turn2_ids"])
    );

    for case in r["tokenization"].as_array().unwrap() {
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let text = case["text"].as_str().unwrap();
        assert_eq!(e.tokenizer().encode(text).unwrap(), want, "{text:?}");
        assert_eq!(e.tokenizer().decode(&want), text, "round trip of {text:?}");
    }
}

fn special_tokens_follow_generation_config() {
    let e = engine(DTypeChoice::F32);
    let r = reference_json();
    let s = e.tokenizer().special();
    let sp = &r["special_ids"];
    assert_eq!(s.bos as u64, sp["bos"].as_u64().unwrap());
    assert_eq!(s.eos, vec![sp["eos"].as_u64().unwrap() as u32]);
    assert_eq!(
        s.think_close.unwrap() as u64,
        sp["think_close"].as_u64().unwrap()
    );
    assert_eq!(
        e.tokenizer().size() as u64,
        r["tokenizer_size"].as_u64().unwrap()
    );
    assert!(
        e.model().vocab_size() > e.tokenizer().size(),
        "fixture has padded logits like the real model"
    );
}

fn cold_prefill_and_cached_decode_match_transformers() {
    let e = engine(DTypeChoice::F32);
    let r = reference();
    let prompt = ids(&r["prompt_ids"]);
    let mut session = e.new_session();
    let logits = session.feed_all(e.model(), &prompt).unwrap();
    let d = max_abs_diff(&logits, &r["prefill_logits"]);
    assert!(d < TOL, "prefill logits differ by {d}");

    let steps = ids(&r["decode_ids"]);
    let want = &r["decode_logits"];
    for (i, &id) in steps.iter().enumerate() {
        let got = session.feed(e.model(), &[id]).unwrap();
        let d = max_abs_diff(&got, &want.get(i).unwrap());
        assert!(d < TOL, "decode step {i} logits differ by {d}");
    }
}

fn greedy_continuation_is_identical() {
    let e = engine(DTypeChoice::F32);
    let r = reference();
    let prompt = ids(&r["prompt_ids"]);
    let want = ids(&r["greedy_ids"]);
    let params = GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens: want.len(),
        ..GenerationParams::default()
    };
    let mut session = e.new_session();
    let g = e
        .generate_in(&mut session, &prompt, &params, &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    let n = g.tokens.len().min(want.len());
    assert!(n > 0);
    assert_eq!(&g.tokens[..n], &want[..n]);
}

fn warm_cache_second_turn_matches_transformers_and_a_cold_prefill() {
    let e = engine(DTypeChoice::F32);
    let r = reference();
    let turn2 = ids(&r["turn2_ids"]);
    let prefix = ids(&r["turn2_prefix_len"])[0] as usize;
    assert!(prefix > 0 && prefix < turn2.len());
    // Turn 1 as generated: the prompt, then reasoning, </think>, the answer.
    let mut turn1 = ids(&r["prompt_ids"]);
    turn1.extend(ids(&r["turn1_assistant_ids"]));
    let mut session = e.new_session();
    session.feed(e.model(), &turn1).unwrap();
    let shared = thinkrag_llm::engine::common_prefix(session.tokens(), &turn2);
    assert_eq!(
        shared, prefix,
        "the cache keeps what transformers' cache can keep"
    );
    session.truncate(shared);
    let warm = session.feed_all(e.model(), &turn2[shared..]).unwrap();
    let d = max_abs_diff(&warm, &r["turn2_warm_logits"]);
    assert!(
        d < TOL,
        "warm second-turn logits differ from transformers by {d}"
    );

    let mut cold = e.new_session();
    let cold_logits = cold.feed_all(e.model(), &turn2).unwrap();
    let d = max_abs_diff(&cold_logits, &r["turn2_cold_logits"]);
    assert!(
        d < TOL,
        "cold second-turn logits differ from transformers by {d}"
    );
    let tail = cold_logits.narrow(0, shared, turn2.len() - shared).unwrap();
    let d = max_abs_diff(&warm, &tail);
    assert!(d < TOL, "warm prefill differs from cold prefill by {d}");
}

/// The defect candle-transformers' qwen2 has in half precision: a multi-token prefill on a warm
/// cache must work in every dtype and agree with a cold prefill to that dtype's precision.
fn warm_multi_token_prefill_works_in_every_dtype() {
    let r = reference();
    let turn2 = ids(&r["turn2_ids"]);
    let split = turn2.len() / 2;
    for dtype in [DTypeChoice::F32, DTypeChoice::Bf16, DTypeChoice::F16] {
        let e = engine(dtype);
        let mut warm = e.new_session();
        warm.feed(e.model(), &turn2[..split]).unwrap();
        let w = warm.feed_all(e.model(), &turn2[split..]).unwrap();
        let mut cold = e.new_session();
        let c = cold.feed_all(e.model(), &turn2).unwrap();
        let c = c.narrow(0, split, turn2.len() - split).unwrap();
        assert_eq!(w.dtype(), DType::F32, "logits come back in f32");
        let d = max_abs_diff(&w, &c);
        let tol = if dtype == DTypeChoice::F32 { TOL } else { 0.1 };
        assert!(d < tol, "{dtype}: warm vs cold differ by {d}");
        // And the half-precision model stays close to the f32 reference: within 3% of the logits'
        // range (bf16 keeps 8 bits of mantissa; the fixture's logits reach about 17).
        let reference_cold = r["turn2_cold_logits"]
            .narrow(0, split, turn2.len() - split)
            .unwrap();
        let scale = max_abs(&reference_cold);
        let d = max_abs_diff(&w, &reference_cold);
        assert!(
            d < 0.03 * scale,
            "{dtype}: differs from the f32 reference by {d} (scale {scale})"
        );
    }
}

fn cache_truncated_and_extended_equals_cold() {
    let e = engine(DTypeChoice::F32);
    let r = reference();
    let prompt = ids(&r["prompt_ids"]);
    let mut s = e.new_session();
    s.feed(e.model(), &prompt).unwrap();
    // Go down a wrong path, then back to a prefix, then forward again.
    s.feed(e.model(), &[5, 6, 7, 8]).unwrap();
    s.truncate(prompt.len() - 3);
    let again = s.feed_all(e.model(), &prompt[prompt.len() - 3..]).unwrap();
    let cold = r["prefill_logits"].narrow(0, prompt.len() - 3, 3).unwrap();
    let d = max_abs_diff(&again, &cold);
    assert!(d < TOL, "{d}");
}
