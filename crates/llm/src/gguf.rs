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
use candle_core::quantized::GgmlDType;
use serde_json::{json, Value as Json};

use crate::config::{Architecture, GenerationConfig, ModelConfig, TokenIds};
use crate::error::{Error, Result};
use crate::model::llama::{gguf_rope_row_order, permuted_heads};
use crate::model::weights::{gguf_name, ROPE_FREQS};
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

/// The metadata llama.cpp's converter writes for a model of `cfg`'s shape named `name`, with
/// `tokenizer`'s vocabulary and chat template.
pub(crate) fn model_metadata(
    cfg: &ModelConfig,
    tokenizer: &TextTokenizer,
    name: &str,
) -> Result<Vec<(String, Value)>> {
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
    Ok(metadata)
}

/// The per-frequency RoPE divisors llama.cpp stores as the tensor `rope_freqs.weight` of a Llama
/// 3.1+ file; `None` for other models.
pub(crate) fn gguf_rope_freqs(cfg: &ModelConfig) -> Option<Vec<f32>> {
    match cfg.architecture {
        Architecture::Llama => cfg.rope_freq_factors(),
        _ => None,
    }
}

/// Writes `model` (as loaded: quantized matrices stay in their format, full-precision ones are
/// written in f32) and its tokenizer to a GGUF file that thinkrag and llama.cpp load. Writes to a
/// temporary file beside `path` and renames it, so an interrupted export leaves no half file.
pub fn export(model: &CausalLm, tokenizer: &TextTokenizer, name: &str, path: &Path) -> Result<()> {
    let cfg = model.config();
    let metadata = model_metadata(cfg, tokenizer, name)?;
    // Streamed tensor by tensor from the model's own memory (or mapping): a copy of every weight
    // at once would double the memory `thinkrag quantize` needs (40 GB for a 32B Q4_K_M).
    let mut weights = model.named_weights();
    if let Some(f) = gguf_rope_freqs(cfg) {
        let n = f.len();
        let t = candle_core::Tensor::from_vec(f, n, &candle_core::Device::Cpu)?;
        weights.push((ROPE_FREQS.into(), Weight::Dense(t)));
    }
    let mut entries = Vec::with_capacity(weights.len());
    for (hf, w) in &weights {
        let name = gguf_name(hf).ok_or_else(|| Error::Unsupported {
            path: path.to_path_buf(),
            message: format!("no GGUF name for {hf}"),
        })?;
        let (dims, dtype) = match w {
            Weight::Quantized(q) => (q.shape().dims().to_vec(), q.dtype()),
            Weight::Dense(t) => (t.dims().to_vec(), GgmlDType::F32),
        };
        entries.push(TensorEntry { name, dims, dtype });
    }
    write_streaming(path, &metadata, &entries, |i, w| {
        let io = |e| Error::write(path, e);
        let (hf, weight) = &weights[i];
        let bytes: std::borrow::Cow<[u8]> = match weight {
            Weight::Quantized(q) => q.data()?,
            Weight::Dense(t) => {
                let t = t
                    .to_device(&candle_core::Device::Cpu)?
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                std::borrow::Cow::Owned(t.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
        };
        // llama.cpp runs Llama with interleaved RoPE: its converter reorders the rows of every
        // query and key head, and so must we (unless they came from a GGUF in that order).
        let heads = permuted_heads(hf, cfg.num_attention_heads, cfg.num_key_value_heads);
        match (cfg.architecture, heads) {
            (Architecture::Llama, Some(heads)) if !model.qk_rows_in_gguf_order() => {
                let rows = entries[i].dims[0];
                let order = gguf_rope_row_order(rows, heads).ok_or_else(|| Error::Unsupported {
                    path: path.to_path_buf(),
                    message: format!("{hf}: {rows} rows do not split into {heads} RoPE heads"),
                })?;
                // GGUF row `g` holds Hugging Face row `hf_row` where order[hf_row] = g.
                let mut inverse = vec![0; rows];
                for (hf_row, &g) in order.iter().enumerate() {
                    inverse[g] = hf_row;
                }
                let row_bytes = bytes.len() / rows;
                for &r in &inverse {
                    w.write_all(&bytes[r * row_bytes..(r + 1) * row_bytes])
                        .map_err(io)?;
                }
                Ok(())
            }
            _ => w.write_all(&bytes).map_err(io),
        }
    })
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

/// A tensor of a file written by [`write_streaming`]: its GGUF name, shape (outermost dimension
/// first, as candle's shapes) and block type.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// The GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// The shape, outermost dimension first.
    pub dims: Vec<usize>,
    /// The block type.
    pub dtype: GgmlDType,
}

impl TensorEntry {
    /// Bytes its data takes in the file (without alignment padding).
    pub fn bytes(&self) -> usize {
        self.dims.iter().product::<usize>() / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// GGUF's default alignment of tensor data.
const ALIGNMENT: usize = 32;

fn padding(n: usize) -> usize {
    (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT
}

/// GGUF's id of a block type.
fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// GGUF's id of a metadata value's type.
fn value_type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_str(w: &mut dyn std::io::Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut dyn std::io::Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes()),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => write_str(w, s),
        Value::Array(items) => {
            let kind = items.first().map_or(4, value_type_id);
            if items.iter().any(|x| value_type_id(x) != kind) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a GGUF array holds values of one type",
                ));
            }
            w.write_all(&kind.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|x| write_value(w, x))
        }
    }
}

/// Counts what passes through it, to check that a tensor's writer wrote exactly its bytes.
struct Counting<W> {
    inner: W,
    written: usize,
}

impl<W: std::io::Write> std::io::Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a GGUF file (version 3, llama.cpp's layout) one tensor at a time: `fill(i, w)` writes
/// exactly [`TensorEntry::bytes`] of `tensors[i]`, so no more than one tensor (or what `fill`
/// holds) is in memory. Written by hand because candle's `gguf_file::write` takes every tensor in
/// memory at once (40 GB for a 70B Q4_K_M). Writes to a temporary file beside `path` and renames
/// it, so an interrupted write leaves no half file.
pub fn write_streaming(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorEntry],
    mut fill: impl FnMut(usize, &mut dyn std::io::Write) -> Result<()>,
) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("gguf.partial");
    let mut write = || -> Result<()> {
        let io = |e| Error::write(path, e);
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = Counting {
            inner: std::io::BufWriter::with_capacity(8 << 20, file),
            written: 0,
        };
        w.write_all(&0x4655_4747u32.to_le_bytes()).map_err(io)?; // "GGUF"
        w.write_all(&3u32.to_le_bytes()).map_err(io)?;
        w.write_all(&(tensors.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&(metadata.len() as u64).to_le_bytes())
            .map_err(io)?;
        for (key, value) in metadata {
            write_str(&mut w, key).map_err(io)?;
            w.write_all(&value_type_id(value).to_le_bytes())
                .map_err(io)?;
            write_value(&mut w, value).map_err(io)?;
        }
        let mut offset = 0usize;
        for t in tensors {
            write_str(&mut w, &t.name).map_err(io)?;
            w.write_all(&(t.dims.len() as u32).to_le_bytes())
                .map_err(io)?;
            for &d in t.dims.iter().rev() {
                w.write_all(&(d as u64).to_le_bytes()).map_err(io)?;
            }
            w.write_all(&ggml_type_id(t.dtype).to_le_bytes())
                .map_err(io)?;
            w.write_all(&(offset as u64).to_le_bytes()).map_err(io)?;
            offset += t.bytes() + padding(t.bytes());
        }
        let pad = padding(w.written);
        w.write_all(&[0u8; ALIGNMENT][..pad]).map_err(io)?;
        for (i, t) in tensors.iter().enumerate() {
            let before = w.written;
            fill(i, &mut w)?;
            let wrote = w.written - before;
            if wrote != t.bytes() {
                return Err(Error::Weights {
                    path: tmp.clone(),
                    message: format!(
                        "{} is {} bytes but {wrote} were written for it",
                        t.name,
                        t.bytes()
                    ),
                });
            }
            w.write_all(&[0u8; ALIGNMENT][..padding(wrote)])
                .map_err(io)?;
        }
        w.flush().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;

    #[test]
    fn streamed_file_is_byte_for_byte_what_candle_writes() {
        let dev = candle_core::Device::Cpu;
        let values: Vec<f32> = (0..512 * 3)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let x = candle_core::Tensor::from_vec(values, (3, 512), &dev).unwrap();
        let tensors: Vec<(String, QTensor)> = [
            ("a.weight", GgmlDType::Q4K),
            ("b.weight", GgmlDType::Q8_0),
            ("c.weight", GgmlDType::Q6K),
            ("d.weight", GgmlDType::F32),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_string(), QTensor::quantize(&x, t).unwrap()))
        .collect();
        let metadata: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("llama.block_count".into(), Value::U32(2)),
            ("llama.rope.freq_base".into(), Value::F32(5e5)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(vec![Value::String("a".into()), Value::String("bc".into())]),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(vec![Value::I32(1), Value::I32(3)]),
            ),
            ("empty".into(), Value::Array(Vec::new())),
            ("x.u64".into(), Value::U64(1 << 40)),
            ("x.f64".into(), Value::F64(0.25)),
        ];
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.gguf");
        let entries: Vec<TensorEntry> = tensors
            .iter()
            .map(|(n, q)| TensorEntry {
                name: n.clone(),
                dims: q.shape().dims().to_vec(),
                dtype: q.dtype(),
            })
            .collect();
        write_streaming(&ours, &metadata, &entries, |i, w| {
            w.write_all(&tensors[i].1.data()?)
                .map_err(|e| Error::write(Path::new("test"), e))
        })
        .unwrap();
        let mut theirs = std::io::Cursor::new(Vec::new());
        let meta_refs: Vec<(&str, &Value)> =
            metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut theirs, &meta_refs, &tensor_refs).unwrap();
        let (ours, theirs) = (std::fs::read(&ours).unwrap(), theirs.into_inner());
        // candle writes version 2, llama.cpp (and this writer) version 3: the same layout.
        assert_eq!(&ours[4..8], &3u32.to_le_bytes());
        assert_eq!(&theirs[4..8], &2u32.to_le_bytes());
        assert_eq!(ours.len(), theirs.len());
        assert_eq!(ours[..4], theirs[..4]);
        assert!(
            ours[8..] == theirs[8..],
            "the bytes after the version differ"
        );
        assert!(!dir.path().join("ours.gguf.partial").exists());
    }

    #[test]
    fn a_tensor_written_short_is_an_error_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short.gguf");
        let entries = vec![TensorEntry {
            name: "w".into(),
            dims: vec![4, 32],
            dtype: GgmlDType::Q8_0,
        }];
        let err = write_streaming(&path, &[], &entries, |_, w| {
            w.write_all(&[0u8; 10])
                .map_err(|e| Error::write(Path::new("test"), e))
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("w is 136 bytes but 10 were written"),
            "{err}"
        );
        assert!(!path.exists());
        assert!(!dir.path().join("short.gguf.partial").exists());
    }
}
