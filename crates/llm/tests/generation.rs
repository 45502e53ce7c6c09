//! The generation loop on the tiny fixture model: stop strings, the thinking budget, seeds,
//! streaming events that add up to the result, multi-turn conversations that reuse the KV cache.
//! Every test runs twice: on the f32 weights, and on the Q8_0 GGUF export of the same model
//! (tokenizer and chat template from its metadata), since one implementation serves both.

mod common;

use std::ops::ControlFlow;

use common::*;
use thinkrag_llm::{
    Conversation, DTypeChoice, Event, Generation, GenerationParams, Message, SamplingParams,
    StopReason,
};

fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens,
        ..GenerationParams::default()
    }
}

/// The generation tests, for one way of loading the model.
macro_rules! generation_tests {
    ($suite:ident, $load:expr) => {
        mod $suite {
            use super::*;

            fn subject() -> thinkrag_llm::Engine {
                $load
            }

            /// Generates and returns the result with the concatenated streamed reasoning and answer.
            fn run(params: &GenerationParams, prompt: &str) -> (Generation, String, String, usize) {
                let e = subject();
                let mut reasoning = String::new();
                let mut answer = String::new();
                let mut done = 0;
                let g = e
                    .generate(&[Message::user(prompt)], params, &mut |ev| {
                        match ev {
                            Event::Reasoning(t) => reasoning.push_str(t),
                            Event::Answer(t) => answer.push_str(t),
                            Event::Done(_) => done += 1,
                        }
                        ControlFlow::Continue(())
                    })
                    .unwrap();
                (g, reasoning, answer, done)
            }

            #[test]
            fn streamed_events_add_up_to_the_result() {
                let params = GenerationParams {
                    max_thinking_tokens: Some(6),
                    ..greedy(30)
                };
                let (g, reasoning, answer, done) = run(&params, "How many people live in Seattle?");
                assert_eq!(done, 1, "exactly one Done event");
                assert_eq!(g.reasoning, reasoning);
                assert_eq!(g.text, answer);
                assert_eq!(g.usage.completion_tokens, g.tokens.len());
                assert!(g.stop_reason.is_some());
            }

            #[test]
            fn thinking_budget_closes_the_reasoning_and_the_model_answers() {
                let e = subject();
                let close = e.tokenizer().special().think_close.unwrap();
                let params = GenerationParams {
                    max_thinking_tokens: Some(5),
                    ..greedy(20)
                };
                let (g, ..) = run(&params, "What is 2 + 2?");
                // Five reasoning tokens, then the forced </think> (counted as reasoning), then the answer.
                assert_eq!(g.tokens[5], close, "{:?}", g.tokens);
                assert_eq!(g.usage.reasoning_tokens, 6);
                assert!(g.usage.answer_tokens >= 1);
                // A budget of 0 answers at once: empty reasoning.
                let params = GenerationParams {
                    max_thinking_tokens: Some(0),
                    ..greedy(10)
                };
                let (g, reasoning, ..) = run(&params, "What is 2 + 2?");
                assert_eq!(g.tokens[0], close);
                assert!(reasoning.is_empty() && g.reasoning.is_empty());
            }

            #[test]
            fn a_forced_close_at_the_budget_never_exceeds_max_tokens() {
                let e = subject();
                let close = e.tokenizer().special().think_close.unwrap();
                // The budget runs out on the last allowed token or the one before: the forced
                // `</think>` (and what follows it) still counts against max_tokens.
                for budget in [7, 8, 9] {
                    let params = GenerationParams {
                        max_thinking_tokens: Some(budget),
                        ..greedy(8)
                    };
                    let (g, ..) = run(&params, "What is 2 + 2?");
                    assert!(g.tokens.len() <= 8, "budget {budget}: {:?}", g.tokens);
                    assert_eq!(g.usage.completion_tokens, g.tokens.len());
                    if budget < 8 {
                        assert_eq!(g.tokens[budget], close, "budget {budget}: {:?}", g.tokens);
                    }
                }
            }

            #[test]
            fn length_stop_without_think_close_is_all_reasoning() {
                let e = subject();
                let close = e.tokenizer().special().think_close.unwrap();
                // EOS is ignored so that only the length can end it (the tiny Llama's Q8_0
                // build ends this turn with EOS within 12 tokens).
                let params = GenerationParams {
                    ignore_eos: true,
                    ..greedy(12)
                };
                let (g, ..) = run(&params, "Tell me about Miami.");
                // The premise, asserted rather than assumed: the tiny model's greedy 12 tokens
                // never close the reasoning (if a new fixture does, pick another prompt).
                assert!(!g.tokens.contains(&close), "premise broken: {:?}", g.tokens);
                assert_eq!(g.stop_reason, Some(StopReason::Length));
                assert!(g.text.is_empty());
                assert_eq!(g.usage.answer_tokens, 0);
                assert_eq!(g.usage.reasoning_tokens, 12);
            }

            #[test]
            fn a_stop_string_ends_generation_and_never_appears() {
                let (full, ..) = run(&greedy(40), "Tell me about Chicago.");
                let text = full.reasoning.clone();
                let chars: Vec<char> = text.chars().collect();
                assert!(chars.len() > 10, "the tiny model writes enough: {text:?}");
                // A stop string from the middle of what greedy decoding writes, likely spanning tokens.
                let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
                let cut = text.find(&stop).unwrap();
                let params = GenerationParams {
                    stop: vec![stop.clone()],
                    ..greedy(40)
                };
                let (g, reasoning, ..) = run(&params, "Tell me about Chicago.");
                assert_eq!(g.stop_reason, Some(StopReason::Stop));
                assert_eq!(g.reasoning, text[..cut]);
                assert_eq!(reasoning, text[..cut]);
                assert!(!g.reasoning.contains(&stop));
            }

            #[test]
            fn same_seed_same_tokens_different_seed_different_tokens() {
                let sampled = |seed| {
                    let params = GenerationParams {
                        sampling: SamplingParams {
                            temperature: 1.0,
                            top_p: 1.0,
                            seed: Some(seed),
                            ..SamplingParams::default()
                        },
                        max_tokens: 24,
                        ..GenerationParams::default()
                    };
                    run(&params, "Name a city.").0.tokens
                };
                assert_eq!(sampled(11), sampled(11));
                assert_ne!(sampled(11), sampled(12));
            }

            #[test]
            fn the_caller_can_cancel() {
                let e = subject();
                let mut events = 0;
                let g = e
                    .generate(
                        &[Message::user("Tell me about Austin.")],
                        &greedy(30),
                        &mut |ev| {
                            if matches!(ev, Event::Reasoning(_) | Event::Answer(_)) {
                                events += 1;
                                return ControlFlow::Break(());
                            }
                            ControlFlow::Continue(())
                        },
                    )
                    .unwrap();
                assert_eq!(g.stop_reason, Some(StopReason::Cancelled));
                assert_eq!(events, 1);
            }

            #[test]
            fn max_tokens_never_passes_the_context_window() {
                let e = subject();
                let prompt = e.encode_messages(&[Message::user("Hi")]).unwrap();
                let mut session = e.new_session();
                let window = e.context_window();
                // Fill the session so that only 3 positions are left.
                let filler: Vec<u32> =
                    std::iter::repeat_n(prompt[1], window - prompt.len() - 3).collect();
                let mut long = prompt[..1].to_vec();
                long.extend(&filler);
                long.extend(&prompt[1..]);
                let g = e
                    .generate_in(&mut session, &long, &greedy(100), &mut |_| {
                        ControlFlow::Continue(())
                    })
                    .unwrap();
                assert_eq!(g.stop_reason, Some(StopReason::Length));
                assert!(session.len() <= window);
                assert!(g.usage.completion_tokens <= 4);
            }

            #[test]
            fn conversation_keeps_answers_only_and_reuses_the_shared_prefix() {
                let e = subject();
                let mut conv = Conversation::new(&e);
                let params = GenerationParams {
                    max_thinking_tokens: Some(4),
                    ..greedy(12)
                };
                let noop = &mut |_: Event<'_>| ControlFlow::Continue(());
                let first = conv
                    .send(&e, "What is the population of Austin?", &params, noop)
                    .unwrap();
                assert_eq!(first.usage.cached_prompt_tokens, 0);
                let second = conv.send(&e, "And Seattle?", &params, noop).unwrap();
                // Turn 2's prompt shares turn 1's prompt up to `<｜Assistant｜>` (the history has no
                // `<think>\n`): only the rest is prefilled.
                let turn1_prompt = first.usage.prompt_tokens;
                assert_eq!(
                    second.usage.cached_prompt_tokens,
                    turn1_prompt - 2,
                    "{:?}",
                    second.usage
                );
                assert!(second.usage.cached_prompt_tokens < second.usage.prompt_tokens);
                // `</think>` in the later turn splits reasoning from answer as in the first.
                assert_eq!(
                    second.usage.reasoning_tokens, 5,
                    "4 reasoning tokens and the forced </think>"
                );
                assert!(second.usage.answer_tokens > 0);
                // The history fed to the model has no reasoning.
                let rendered = e.tokenizer().render_chat(conv.messages(), true).unwrap();
                if !first.reasoning.trim().is_empty() {
                    assert!(!rendered.contains(first.reasoning.trim()), "{rendered}");
                }
                // Reusing the cache changes nothing: a fresh session on the same prompt gives the same tokens.
                let history = &conv.messages()[..3];
                let cold = e.generate(history, &params, noop).unwrap();
                assert_eq!(cold.tokens, second.tokens);
                let third = conv.send(&e, "Which is larger?", &params, noop).unwrap();
                assert!(third.usage.cached_prompt_tokens > second.usage.cached_prompt_tokens);
                assert_eq!(conv.messages().len(), 6);
            }

            #[test]
            fn a_forked_conversation_never_writes_into_the_original() {
                let e = subject();
                let params = GenerationParams {
                    max_thinking_tokens: Some(4),
                    ..greedy(8)
                };
                let noop = &mut |_: Event<'_>| ControlFlow::Continue(());
                let mut original = Conversation::new(&e);
                original
                    .send(&e, "What is the population of Austin?", &params, noop)
                    .unwrap();
                // A reference for the original's next turn, from a conversation of its own.
                let mut witness = Conversation::new(&e);
                witness
                    .send(&e, "What is the population of Austin?", &params, noop)
                    .unwrap();
                let expected = witness.send(&e, "And Seattle?", &params, noop).unwrap();
                // The fork starts over with another question: it rewrites the positions right
                // after BOS, which the original's next turn reuses from its cache without
                // recomputing, so shared buffers would change the original's answer.
                let mut fork = original.try_clone().unwrap();
                fork.reset();
                fork.send(&e, "Name three rivers in Texas, please.", &params, noop)
                    .unwrap();
                assert_eq!(fork.messages().len(), 2);
                assert_eq!(original.messages().len(), 2);
                let got = original.send(&e, "And Seattle?", &params, noop).unwrap();
                assert_eq!(got.tokens, expected.tokens);
                assert_eq!(got.usage, expected.usage);

                // The same, one level down, compared on logits.
                let prompt = e
                    .encode_messages(&[Message::user("Hello there, how are you doing today?")])
                    .unwrap();
                assert!(prompt.len() >= 8, "{prompt:?}");
                let logits =
                    |t: candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mut a = e.new_session();
                a.feed(e.model(), &prompt).unwrap();
                let mut b = e.new_session();
                b.feed(e.model(), &prompt).unwrap();
                let mut c = a.try_clone().unwrap();
                a.feed(e.model(), &prompt[1..3]).unwrap();
                // c rewrites positions 2..6, inside the prefix a reads on its next step.
                c.truncate(2);
                c.feed(e.model(), &prompt[4..8]).unwrap();
                let from_a = logits(a.feed(e.model(), &prompt[5..6]).unwrap());
                b.feed(e.model(), &prompt[1..3]).unwrap();
                let from_b = logits(b.feed(e.model(), &prompt[5..6]).unwrap());
                assert_eq!(from_a, from_b, "a's cache was overwritten by c's positions");
            }
        }
    };
}

generation_tests!(f32_safetensors, engine(DTypeChoice::F32));
generation_tests!(q8_0_gguf, gguf_engine(thinkrag_llm::Quantization::Q8_0));
generation_tests!(llama_f32_safetensors, {
    set_fixture(Fixture::Llama);
    engine(DTypeChoice::F32)
});
generation_tests!(llama_q8_0_gguf, {
    set_fixture(Fixture::Llama);
    gguf_engine(thinkrag_llm::Quantization::Q8_0)
});

for_each_fixture!(random_weights_of_a_config_load_and_run);

fn random_weights_of_a_config_load_and_run() {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture_dir().join(f), dir.path().join(f)).unwrap();
    }
    let cfg = thinkrag_llm::ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    thinkrag_llm::synth::write_random_weights(
        &cfg,
        &dir.path().join("model.safetensors"),
        thinkrag_llm::synth::SynthDType::Bf16,
        3,
    )
    .unwrap();
    let files = thinkrag_llm::ModelFiles::from_dir(dir.path()).unwrap();
    let e = thinkrag_llm::Engine::from_files(
        files,
        "synth".into(),
        None,
        &thinkrag_llm::LoadOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let g = e
        .generate(&[Message::user("Hi")], &greedy(4), &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(g.usage.completion_tokens, 4);
}

/// A generation_config.json whose BOS disagrees with the tokenizer's: the model loads, prompts
/// start with the BOS the chat template writes (as transformers renders them), and a note says so.
#[test]
fn disagreeing_bos_files_load_with_a_note_and_the_templates_bos() {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fixture_dir()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let want = ids(&reference()["prompt_ids"]);
    let gen_path = dir.path().join("generation_config.json");
    let mut gen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&gen_path).unwrap()).unwrap();
    let eos = gen["eos_token_id"].as_u64().unwrap();
    assert_ne!(want[0] as u64, eos);
    gen["bos_token_id"] = eos.into();
    std::fs::write(&gen_path, gen.to_string()).unwrap();
    let mut notes = Vec::new();
    let e = thinkrag_llm::Engine::from_files(
        thinkrag_llm::ModelFiles::from_dir(dir.path()).unwrap(),
        "bos".into(),
        None,
        &thinkrag_llm::LoadOptions::default(),
        &mut |p| {
            if let thinkrag_llm::LoadProgress::Note(n) = p {
                notes.push(n)
            }
        },
    )
    .unwrap();
    let r = reference_json();
    let turn1: Vec<Message> = serde_json::from_value(r["turn1_messages"].clone()).unwrap();
    assert_eq!(e.encode_messages(&turn1).unwrap(), want);
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains(&format!("BOS is id {eos}"))
            && notes[0].contains(&format!("id {}", want[0])),
        "{}",
        notes[0]
    );
}

/// A sequence sizes its cache once for the prompt and the start of the answer: growing by
/// doubling would hold the old and new buffers at once (0.8 GB for the 8B model near 4k).
#[test]
fn a_sequence_reserves_its_prompt_and_the_answers_start_before_prefill() {
    let e = engine(DTypeChoice::F32);
    let prompt = ids(&reference()["prompt_ids"]);
    for (max_tokens, answer) in [(4096, 512), (7, 7)] {
        let mut seq =
            thinkrag_llm::sequence::Sequence::new(&e, prompt.clone(), greedy(max_tokens)).unwrap();
        assert_eq!(seq.cache_bytes(), 0, "nothing before the prefill");
        seq.prefill(&e, usize::MAX).unwrap();
        let capacity = seq.session().cache().capacity();
        let want = (prompt.len() + answer).min(e.context_window());
        assert!(
            capacity >= want && capacity < want + 256,
            "capacity {capacity} for {} prompt tokens and {answer} answer tokens",
            prompt.len()
        );
    }
}
