//! The chat template and tokenizer over arbitrary messages (the tiny fixture model's DeepSeek-R1
//! template and byte-level BPE). Beyond not crashing: only the template's own markup may become
//! control tokens, so each user message yields exactly one `<｜User｜>` token whatever its text.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use thinkrag_llm::{DTypeChoice, Engine, LoadOptions, Message, ModelFiles, Role};

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-qwen2");
        let files = ModelFiles::from_dir(&dir).expect("fixture model");
        let opts = LoadOptions {
            dtype: DTypeChoice::F32,
            ..LoadOptions::default()
        };
        Engine::from_files(files, "tiny".into(), None, &opts, &mut |_| {}).expect("loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let e = engine();
    // Messages separated by 0xFF bytes (never in UTF-8); the first byte of each picks the role.
    let messages: Vec<Message> = data
        .split(|&b| b == 0xFF)
        .filter_map(|part| {
            let (&role, text) = part.split_first()?;
            let content = String::from_utf8_lossy(text).into_owned();
            Some(match role % 3 {
                0 => Message::system(content),
                1 => Message::user(content),
                _ => Message::assistant(content),
            })
        })
        .collect();
    let tok = e.tokenizer();
    let _ = tok.render_chat(&messages, true);
    let Ok(ids) = e.encode_messages(&messages) else {
        return;
    };
    let user = tok.inner().token_to_id("<｜User｜>").expect("special token");
    let want = messages.iter().filter(|m| m.role == Role::User).count();
    let got = ids.iter().filter(|&&id| id == user).count();
    assert_eq!(got, want, "user turns forged or lost: {messages:?}");
    let bos = tok.special().bos;
    assert_eq!(ids.iter().filter(|&&id| id == bos).count(), 1, "one BOS");
});
