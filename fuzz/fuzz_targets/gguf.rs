//! GGUF header and tensor-table parsing: candle's reader, then thinkrag's reading of the model
//! description and tokenizer from the metadata. Errors are fine; panics, aborts (a length field
//! that asks for terabytes) and hangs are findings.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use libfuzzer_sys::fuzz_target;
use thinkrag_llm::gguf;

fuzz_target!(|data: &[u8]| {
    let Ok(content) = Content::read(&mut Cursor::new(data)) else {
        return;
    };
    let path = Path::new("fuzz.gguf");
    let _ = gguf::tensor_types(&content);
    let _ = gguf::model_info(&content, path);
    let _ = gguf::tokenizer_from_metadata(&content, path);
});
