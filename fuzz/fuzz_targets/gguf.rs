//! GGUF header and tensor-table parsing as a model load does it: thinkrag's checked reader
//! (candle's behind it), the model description and tokenizer from the metadata, and each
//! tensor's data as the table places it. Errors are fine; panics, aborts (a length field that
//! asks for terabytes) and hangs are findings.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use thinkrag_llm::gguf;

fuzz_target!(|data: &[u8]| {
    let mut reader = Cursor::new(data);
    let path = Path::new("fuzz.gguf");
    let Ok(content) = gguf::read_content(&mut reader, path) else {
        return;
    };
    let _ = gguf::tensor_types(&content);
    let _ = gguf::model_info(&content, path);
    let _ = gguf::tokenizer_from_metadata(&content, path);
    for info in content.tensor_infos.values().take(16) {
        let _ = info.read(&mut reader, content.tensor_data_offset, &Device::Cpu);
    }
});
