//! GGUF files as llama.cpp writes and reads them: the model configuration, tokenizer and chat
//! template from a file's metadata, and the export of a loaded (quantized) model to a file that
//! thinkrag and llama.cpp both load.
//!
//! The tokenizer is rebuilt by hand from `tokenizer.ggml.*` because no crate turns GGUF vocabulary
//! arrays into a `tokenizers` pipeline: GGUF keeps tokens, types and merges, and names the
//! pre-tokenizer (`qwen2`, `llama-bpe`), whose regex and byte-level steps we restore here.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use serde_json::{json, Value as Json};

use crate::config::{Architecture, GenerationConfig, ModelConfig, TokenIds};
use crate::error::{Error, Result};
use crate::model::llama::{permuted_heads, reorder_rope_rows, RopeRows};
use crate::model::weights::gguf_name;
use crate::model::{CausalLm, Weight};
use crate::tokenizer::TextTokenizer;

/// Qwen2's pre-tokenizer split, as its tokenizer.json and llama.cpp's `qwen2` pre-type have it.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's split (numbers in runs of up to three digits), as its tokenizer.json and llama.cpp's
/// `llama-bpe` pre-type have it; the DeepSeek Llama distills keep it.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` values whose split is [`QWEN2_SPLIT`] (llama.cpp maps them to one type).
const QWEN2_PRE: [&str; 2] = ["qwen2", "deepseek-r1-qwen"];

/// `tokenizer.ggml.pre` values whose split is [`LLAMA3_SPLIT`].
const LLAMA3_PRE: [&str; 2] = ["llama-bpe", "llama3"];

/// A byte-level BPE pre-tokenizer GGUF can name: its `tokenizer.ggml.pre`, split and normalizer.
struct PreTokenizer {
    pre: &'static str,
    split: &'static str,
    /// Qwen2 normalizes to NFC; Llama 3 does not normalize.
    nfc: bool,
}

const QWEN2_PRE_TOKENIZER: PreTokenizer = PreTokenizer {
    pre: "qwen2",
    split: QWEN2_SPLIT,
    nfc: true,
};

const LLAMA3_PRE_TOKENIZER: PreTokenizer = PreTokenizer {
    pre: "llama-bpe",
    split: LLAMA3_SPLIT,
    nfc: false,
};

// llama.cpp's token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// Reads a GGUF header (metadata and tensor directory) from `reader`, holding `file_len` bytes,
/// and checks the directory against the file: every tensor's element count and byte size fit
/// in memory arithmetic, and its data lies inside the file. candle's reader panics on some
/// damaged headers (an alignment of 0; dimensions whose product overflows, found by fuzzing),
/// so it runs behind `catch_unwind` and a damaged file is an error that names it, never a
/// crash. Tensors read through the returned directory cannot ask for more bytes than the file
/// holds.
pub fn read_content<R: std::io::Read + std::io::Seek>(
    reader: &mut R,
    path: &Path,
) -> Result<gguf_file::Content> {
    let err = |message: String| Error::Weights {
        path: path.to_path_buf(),
        message,
    };
    let file_len = reader
        .seek(std::io::SeekFrom::End(0))
        .and_then(|len| reader.seek(std::io::SeekFrom::Start(0)).map(|_| len))
        .map_err(|e| Error::io(path, e))?;
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gguf_file::Content::read(reader)
    }));
    let content = match read {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(err(format!("not a readable GGUF file ({e})"))),
        Err(_) => {
            return Err(err(
                "not a readable GGUF file (its header is malformed)".into()
            ))
        }
    };
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        let elems = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| err(format!("tensor {name} has impossible dimensions {dims:?}")))?;
        let block = info.ggml_dtype.block_size();
        if elems % block != 0 {
            return Err(err(format!(
                "tensor {name} has {elems} elements, not a multiple of its type's block of {block}"
            )));
        }
        let bytes = (elems / block)
            .checked_mul(info.ggml_dtype.type_size())
            .ok_or_else(|| err(format!("tensor {name} has impossible dimensions {dims:?}")))?;
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|start| start.checked_add(bytes as u64));
        if end.is_none_or(|end| end > file_len) {
            return Err(err(format!(
                "tensor {name} ({bytes} bytes at offset {}) lies past the end of the file ({file_len} bytes): the file is truncated",
                info.offset
            )));
        }
    }
    Ok(content)
}

/// What a GGUF file's metadata says about its model.
#[derive(Debug, Clone)]
pub struct GgufModelInfo {
    /// The configuration, as config.json would have it.
    pub config: ModelConfig,
    /// BOS and EOS as generation_config.json would have them.
    pub generation: GenerationConfig,
    /// The file's `general.name`, if any.
    pub name: Option<String>,
}

fn meta<'a>(c: &'a gguf_file::Content, key: &str, path: &Path) -> Result<&'a Value> {
    c.metadata.get(key).ok_or_else(|| Error::Unsupported {
        path: path.to_path_buf(),
        message: format!("the GGUF metadata has no {key}"),
    })
}

fn meta_usize(c: &gguf_file::Content, key: &str, path: &Path) -> Result<usize> {
    let v = meta(c, key, path)?;
    v.to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
        .map(|x| x as usize)
        .map_err(|e| bad_meta(path, key, e))
}

fn meta_f64(c: &gguf_file::Content, key: &str, path: &Path) -> Result<f64> {
    let v = meta(c, key, path)?;
    v.to_f32()
        .map(f64::from)
        .or_else(|_| v.to_f64())
        .map_err(|e| bad_meta(path, key, e))
}

fn bad_meta(path: &Path, key: &str, e: impl std::fmt::Display) -> Error {
    Error::Parse {
        path: path.to_path_buf(),
        format: "GGUF",
        message: format!("{key}: {e}"),
    }
}

fn opt_string(c: &gguf_file::Content, key: &str) -> Option<String> {
    c.metadata
        .get(key)
        .and_then(|v| v.to_string().ok().cloned())
}

/// Reads the model configuration from a GGUF file's metadata (`qwen2` or `llama`). A Llama 3.1+
/// file's RoPE scaling is its `rope_freqs.weight` tensor, which the model reads with the weights.
pub fn model_info(c: &gguf_file::Content, path: &Path) -> Result<GgufModelInfo> {
    let arch_name = opt_string(c, "general.architecture").unwrap_or_default();
    let Some(arch) = Architecture::from_name(&arch_name) else {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            message: format!(
                "general.architecture is {arch_name:?}; thinkrag runs qwen2 and llama (the DeepSeek-R1 distills)"
            ),
        });
    };
    let key = |k: &str| format!("{}.{k}", arch.name());
    let embed = c
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| Error::Unsupported {
            path: path.to_path_buf(),
            message: "no token_embd.weight tensor".into(),
        })?;
    let (vocab_size, hidden) = embed
        .shape
        .dims2()
        .map_err(|e| bad_meta(path, "token_embd.weight", e))?;
    let bos = meta_usize(c, "tokenizer.ggml.bos_token_id", path).ok();
    let eos = meta_usize(c, "tokenizer.ggml.eos_token_id", path).ok();
    let heads = meta_usize(c, &key("attention.head_count"), path)?;
    let mut config = json!({
        "vocab_size": vocab_size,
        "hidden_size": meta_usize(c, &key("embedding_length"), path).unwrap_or(hidden),
        "intermediate_size": meta_usize(c, &key("feed_forward_length"), path)?,
        "num_hidden_layers": meta_usize(c, &key("block_count"), path)?,
        "num_attention_heads": heads,
        "num_key_value_heads": meta_usize(c, &key("attention.head_count_kv"), path).unwrap_or(heads),
        "max_position_embeddings": meta_usize(c, &key("context_length"), path)?,
        "rope_theta": meta_f64(c, &key("rope.freq_base"), path).unwrap_or(10000.0),
        "rms_norm_eps": meta_f64(c, &key("attention.layer_norm_rms_epsilon"), path)?,
        "tie_word_embeddings": !c.tensor_infos.contains_key("output.weight"),
        "bos_token_id": bos,
        "eos_token_id": eos,
    });
    match arch {
        Architecture::Qwen2 => {
            config["architectures"] = json!(["Qwen2ForCausalLM"]);
            config["model_type"] = json!("qwen2");
            config["use_sliding_window"] = json!(false);
        }
        Architecture::Llama => {
            config["architectures"] = json!(["LlamaForCausalLM"]);
            config["model_type"] = json!("llama");
            if let Ok(d) = meta_usize(c, &key("attention.key_length"), path) {
                config["head_dim"] = json!(d);
            }
        }
    }
    let config = ModelConfig::from_value(config, path)?;
    let generation = GenerationConfig {
        bos_token_id: bos.map(|b| b as u32),
        eos_token_id: eos.map(|e| TokenIds::One(e as u32)),
        ..GenerationConfig::default()
    };
    Ok(GgufModelInfo {
        config,
        generation,
        name: opt_string(c, "general.name"),
    })
}

/// Rebuilds the tokenizer (and the `tokenizer_config.json` content: BOS/EOS text, chat template)
/// from `tokenizer.ggml.*` metadata. `None` when the file carries no tokenizer.
pub fn tokenizer_from_metadata(
    c: &gguf_file::Content,
    path: &Path,
) -> Result<Option<(tokenizers::Tokenizer, Json)>> {
    let err = |message: String| Error::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let Some(tokens) = c.metadata.get("tokenizer.ggml.tokens") else {
        return Ok(None);
    };
    let model = opt_string(c, "tokenizer.ggml.model").unwrap_or_default();
    if model != "gpt2" {
        return Err(err(format!(
            "tokenizer.ggml.model is {model:?}; only byte-level BPE (gpt2) is supported: put the model's tokenizer.json beside the GGUF file"
        )));
    }
    let pre = opt_string(c, "tokenizer.ggml.pre").unwrap_or_else(|| "qwen2".into());
    let pre_tokenizer = if QWEN2_PRE.contains(&pre.as_str()) {
        QWEN2_PRE_TOKENIZER
    } else if LLAMA3_PRE.contains(&pre.as_str()) {
        LLAMA3_PRE_TOKENIZER
    } else {
        return Err(err(format!(
            "tokenizer.ggml.pre is {pre:?}, not a pre-tokenizer thinkrag knows (qwen2, llama-bpe): put the model's tokenizer.json beside the GGUF file"
        )));
    };
    let strings = |v: &Value, key: &str| -> Result<Vec<String>> {
        v.to_vec()
            .map_err(|e| bad_meta(path, key, e))?
            .iter()
            .map(|t| t.to_string().cloned().map_err(|e| bad_meta(path, key, e)))
            .collect()
    };
    let tokens = strings(tokens, "tokenizer.ggml.tokens")?;
    let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| bad_meta(path, "tokenizer.ggml.token_type", e))?
            .iter()
            .map(|t| t.to_i32().unwrap_or(TOKEN_NORMAL))
            .collect(),
        None => vec![TOKEN_NORMAL; tokens.len()],
    };
    let merges = match c.metadata.get("tokenizer.ggml.merges") {
        Some(v) => strings(v, "tokenizer.ggml.merges")?,
        None => Vec::new(),
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, text) in tokens.iter().enumerate() {
        match types.get(id).copied().unwrap_or(TOKEN_NORMAL) {
            TOKEN_UNUSED => {}
            t @ (TOKEN_CONTROL | TOKEN_USER_DEFINED) => added.push(json!({
                "id": id, "content": text, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": t == TOKEN_CONTROL,
            })),
            _ => {
                vocab.insert(text.clone(), json!(id));
            }
        }
    }
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": if pre_tokenizer.nfc { json!({"type": "NFC"}) } else { Json::Null },
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pre_tokenizer.split}, "behavior": "Isolated", "invert": false},
            byte_level,
        ]},
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });
    let tokenizer: tokenizers::Tokenizer = spec.to_string().parse().map_err(|e| {
        err(format!(
            "cannot rebuild the tokenizer from GGUF metadata: {e}"
        ))
    })?;
    let text_of = |key: &str| {
        meta_usize(c, key, path)
            .ok()
            .and_then(|id| tokens.get(id).cloned())
    };
    let tok_cfg = json!({
        "bos_token": text_of("tokenizer.ggml.bos_token_id"),
        "eos_token": text_of("tokenizer.ggml.eos_token_id"),
        "chat_template": opt_string(c, "tokenizer.chat_template"),
    });
    Ok(Some((tokenizer, tok_cfg)))
}

/// Metadata describing `tokenizer` the way llama.cpp's converter writes it, for a model whose
/// logits are `vocab_size` wide (ids without a token are written as unused `[PAD<id>]`).
fn tokenizer_metadata(
    tokenizer: &TextTokenizer,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>> {
    let err = |message: String| Error::Tokenizer {
        path: tokenizer.path().to_path_buf(),
        message,
    };
    let spec: Json = serde_json::from_str(
        &tokenizer
            .inner()
            .to_string(false)
            .map_err(|e| err(e.to_string()))?,
    )
    .map_err(|e| err(e.to_string()))?;
    let model = &spec["model"];
    if model["type"] != "BPE" {
        return Err(err(
            "only byte-level BPE tokenizers can be written to GGUF".into()
        ));
    }
    let split = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"].as_str();
    let pre_tokenizer = [QWEN2_PRE_TOKENIZER, LLAMA3_PRE_TOKENIZER]
        .into_iter()
        .find(|p| Some(p.split) == split)
        .ok_or_else(|| {
            err("the pre-tokenizer is neither Qwen2's nor Llama 3's: llama.cpp would tokenize differently".into())
        })?;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut put = |id: u64, text: &str, ty: i32| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            err(format!(
                "token id {id} is beyond the model's {vocab_size} logits"
            ))
        })?;
        *slot = Some((text.to_string(), ty));
        Ok(())
    };
    for (text, id) in model["vocab"].as_object().into_iter().flatten() {
        put(id.as_u64().unwrap_or(u64::MAX), text, TOKEN_NORMAL)?;
    }
    for t in spec["added_tokens"].as_array().into_iter().flatten() {
        let ty = if t["special"] == true {
            TOKEN_CONTROL
        } else {
            TOKEN_USER_DEFINED
        };
        put(
            t["id"].as_u64().unwrap_or(u64::MAX),
            t["content"].as_str().unwrap_or_default(),
            ty,
        )?;
    }
    let (texts, types): (Vec<Value>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| match t {
            Some((text, ty)) => (Value::String(text), Value::I32(ty)),
            None => (
                Value::String(format!("[PAD{id}]")),
                Value::I32(TOKEN_UNUSED),
            ),
        })
        .unzip();
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::Array(pair) => Value::String(format!(
                "{} {}",
                pair.first().and_then(Json::as_str).unwrap_or_default(),
                pair.get(1).and_then(Json::as_str).unwrap_or_default()
            )),
            other => Value::String(other.as_str().unwrap_or_default().to_string()),
        })
        .collect();
    let special = tokenizer.special();
    let mut out = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            Value::String(pre_tokenizer.pre.into()),
        ),
        ("tokenizer.ggml.tokens".into(), Value::Array(texts)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32(special.bos),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(special.eos[0]),
        ),
        (
            "tokenizer.ggml.padding_token_id".into(),
            Value::U32(special.eos[0]),
        ),
        // The chat template writes BOS itself.
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    if let Some(t) = tokenizer.chat_template_source() {
        out.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }
    Ok(out)
}

/// Writes `model` (as loaded: quantized matrices stay in their format, full-precision ones are
/// written in f32) and its tokenizer to a GGUF file that thinkrag and llama.cpp load. Writes to a
/// temporary file beside `path` and renames it, so an interrupted export leaves no half file.
pub fn export(model: &CausalLm, tokenizer: &TextTokenizer, name: &str, path: &Path) -> Result<()> {
    let cfg = model.config();
    let arch = cfg.architecture.name();
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.quantization_version".into(), Value::U32(2)),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(cfg.rope.theta as f32),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
    ];
    let counts = [
        ("block_count", cfg.num_hidden_layers),
        ("context_length", cfg.max_position_embeddings),
        ("embedding_length", cfg.hidden_size),
        ("feed_forward_length", cfg.intermediate_size),
        ("attention.head_count", cfg.num_attention_heads),
        ("attention.head_count_kv", cfg.num_key_value_heads),
        ("attention.key_length", cfg.head_dim),
        ("attention.value_length", cfg.head_dim),
        ("rope.dimension_count", cfg.head_dim),
        ("vocab_size", cfg.vocab_size),
    ];
    for (key, n) in counts {
        metadata.push((format!("{arch}.{key}"), Value::U32(n as u32)));
    }
    metadata.extend(tokenizer_metadata(tokenizer, cfg.vocab_size)?);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (hf, w) in model.named_weights() {
        let gguf = gguf_name(&hf).ok_or_else(|| Error::Unsupported {
            path: path.to_path_buf(),
            message: format!("no GGUF name for {hf}"),
        })?;
        let q = match w {
            Weight::Quantized(q) => {
                let data = q.data()?;
                let storage = candle_core::quantized::QStorage::from_data(
                    data,
                    &candle_core::Device::Cpu,
                    q.dtype(),
                )?;
                QTensor::new(storage, q.shape().clone())?
            }
            Weight::Dense(t) => QTensor::quantize(
                &t.to_device(&candle_core::Device::Cpu)?
                    .to_dtype(candle_core::DType::F32)?,
                GgmlDType::F32,
            )?,
        };
        // llama.cpp runs Llama with interleaved RoPE: its converter reorders the rows of every
        // query and key head, and so must we (unless they came from a GGUF in that order).
        let heads = permuted_heads(&hf, cfg.num_attention_heads, cfg.num_key_value_heads);
        let q = match (cfg.architecture, heads) {
            (Architecture::Llama, Some(heads)) if !model.interleaved_rope() => {
                reorder_rope_rows(&q, heads, RopeRows::ToGguf, &candle_core::Device::Cpu)?
            }
            _ => q,
        };
        tensors.push((gguf, q));
    }
    if cfg.architecture == Architecture::Llama {
        if let Some(f) = cfg.rope_freq_factors() {
            let n = f.len();
            let t = candle_core::Tensor::from_vec(f, n, &candle_core::Device::Cpu)?;
            tensors.push((
                "rope_freqs.weight".into(),
                QTensor::quantize(&t, GgmlDType::F32)?,
            ));
        }
    }
    let tmp = path.with_extension("gguf.partial");
    let write = || -> Result<()> {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = std::io::BufWriter::new(file);
        let meta_refs: Vec<(&str, &Value)> =
            metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut w, &meta_refs, &tensor_refs)?;
        use std::io::Write;
        w.flush().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Counts of each block type among a GGUF file's tensors, for messages (`{"q4k": 169, ...}`).
pub fn tensor_types(c: &gguf_file::Content) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for info in c.tensor_infos.values() {
        *out.entry(format!("{:?}", info.ggml_dtype).to_ascii_lowercase())
            .or_insert(0) += 1;
    }
    out
}
