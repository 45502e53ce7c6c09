//! The model's tokenizer (`tokenizer.json`) together with what `tokenizer_config.json` and
//! `generation_config.json` say about it: special token ids, BOS handling and the chat template.
//! It checks that the tokenizer belongs to the model instead of letting ids run off the logits.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::chat::{ChatTemplate, Message};
use crate::config::{read_json, GenerationConfig, ModelConfig};
use crate::error::{Error, Result};

/// The token that closes DeepSeek-R1's reasoning.
pub const THINK_CLOSE: &str = "</think>";
/// The token that opens DeepSeek-R1's reasoning (written by the generation prompt, not the model).
pub const THINK_OPEN: &str = "<think>";

/// Ids the engine treats specially.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence (from generation_config.json: config.json's is wrong for the R1 distills).
    pub bos: u32,
    /// Any of these ends generation.
    pub eos: Vec<u32>,
    /// `<think>`, if the tokenizer has it.
    pub think_open: Option<u32>,
    /// `</think>`, if the tokenizer has it: reasoning and answer are split on this id.
    pub think_close: Option<u32>,
}

/// A tokenizer bound to its model.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    template_source: Option<String>,
    special: SpecialTokens,
    size: usize,
    path: PathBuf,
    /// The texts of the added tokens (`<｜User｜>`, `</think>`...), longest first: inside message
    /// text they must stay text.
    added: Vec<String>,
    /// Choices made where the model's files disagree, for the user.
    notes: Vec<String>,
}

/// Wraps control-token text found in message content while the template renders; never in real
/// text (a private-use character, removed from content first).
const MARK: char = '\u{E000}';

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("special", &self.special)
            .finish_non_exhaustive()
    }
}

/// `bos_token` and friends are either a string or an AddedToken object with `content`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of named templates of which `default` is the chat one.
fn chat_template_source(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| items.first())
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and, when given, `tokenizer_config.json`, and checks them against the
    /// model's configuration.
    pub fn load(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
        generation: &GenerationConfig,
        model: &ModelConfig,
    ) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| Error::Tokenizer {
                path: tokenizer_json.to_path_buf(),
                message: format!("cannot load: {e}"),
            })?;
        let tok_cfg: Value = match tokenizer_config {
            Some(p) => read_json(p)?,
            None => Value::Null,
        };
        Self::from_parts(inner, &tok_cfg, generation, model, tokenizer_json)
    }

    /// Binds an in-memory tokenizer to its model. `tok_cfg` is `tokenizer_config.json`'s content
    /// (or `null`); `path` names where it all came from, for messages.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        tok_cfg: &Value,
        generation: &GenerationConfig,
        model: &ModelConfig,
        path: &Path,
    ) -> Result<Self> {
        let err = |message: String| Error::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        let size = inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1);
        if size == 0 {
            return Err(err("the vocabulary is empty".into()));
        }
        if size > model.vocab_size {
            return Err(err(format!(
                "has {size} ids but the model's logits are only {} wide: this tokenizer does not belong to this model",
                model.vocab_size
            )));
        }
        let id_of = |text: &str| inner.token_to_id(text);
        let bos_text = token_text(tok_cfg.get("bos_token"));
        let eos_text = token_text(tok_cfg.get("eos_token"));
        // The chat template writes tokenizer_config.json's bos_token, so that is the BOS a
        // transformers prompt starts with; generation_config.json's id (config.json's last, which
        // is wrong for the Qwen distills) only when the tokenizer config names none.
        let mut notes = Vec::new();
        let template_bos = bos_text.as_deref().and_then(id_of);
        if let (Some(t), Some(g)) = (template_bos, generation.bos_token_id) {
            if t != g {
                notes.push(format!(
                    "generation_config.json says BOS is id {g} but tokenizer_config.json's bos_token {:?} is id {t}: prompts start with id {t}, as transformers' chat template writes them",
                    bos_text.as_deref().unwrap_or_default()
                ));
            }
        }
        let bos = template_bos
            .or(generation.bos_token_id)
            .or(model.bos_token_id)
            .ok_or_else(|| err("no BOS token id in generation_config.json, tokenizer_config.json or config.json".into()))?;
        let mut eos: Vec<u32> = generation
            .eos_token_id
            .as_ref()
            .or(model.eos_token_id.as_ref())
            .map(|e| e.to_vec())
            .unwrap_or_default();
        if let Some(id) = eos_text.as_deref().and_then(id_of) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        if eos.is_empty() {
            return Err(err(
                "no EOS token id in generation_config.json, tokenizer_config.json or config.json"
                    .into(),
            ));
        }
        for (what, id) in std::iter::once(("BOS", bos)).chain(eos.iter().map(|&e| ("EOS", e))) {
            if id as usize >= size {
                return Err(err(format!(
                    "{what} id {id} is not in the tokenizer (it has {size} ids): the tokenizer does not match the model's generation_config.json"
                )));
            }
        }
        let special = SpecialTokens {
            bos,
            eos,
            think_open: id_of(THINK_OPEN),
            think_close: id_of(THINK_CLOSE),
        };
        let bos_string = bos_text.unwrap_or_else(|| inner.id_to_token(bos).unwrap_or_default());
        let eos_string =
            eos_text.unwrap_or_else(|| inner.id_to_token(special.eos[0]).unwrap_or_default());
        let template_source = chat_template_source(tok_cfg.get("chat_template"));
        let template = template_source
            .as_deref()
            .map(|src| ChatTemplate::new(src, &bos_string, &eos_string))
            .transpose()?;
        let mut added: Vec<String> = inner
            .get_added_tokens_decoder()
            .into_values()
            .map(|t| t.content)
            .filter(|c| c.chars().count() > 1)
            .collect();
        added.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        added.dedup();
        Ok(Self {
            inner,
            template,
            template_source,
            special,
            size,
            path: path.to_path_buf(),
            added,
            notes,
        })
    }

    /// The chat template's Jinja source, if the model has one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.template_source.as_deref()
    }

    /// Where the tokenizer came from (a tokenizer.json, or a GGUF file).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The special ids.
    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// What was chosen where the model's files disagree (empty when they agree).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Ids the tokenizer can produce: `0..size`. Logits beyond (151,665..151,936 for the real
    /// model) are padding and must never be sampled.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The underlying Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Encodes text as is: no BOS or other special tokens are added (the chat template writes them),
    /// but special-token text in `text` (`<｜User｜>`, `</think>`) becomes those tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot encode: {e}"),
            })
    }

    /// Decodes ids to text, special tokens included. A trailing incomplete UTF-8 character decodes to
    /// U+FFFD; the streaming decoder waits for the rest.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    /// Renders a conversation with the model's chat template. Without a template (a base model),
    /// the turns are joined plainly after BOS.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        match &self.template {
            Some(t) => t.render(messages, add_generation_prompt),
            None => Ok(messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n\n")),
        }
    }

    /// Renders and encodes a conversation, with exactly one BOS at the start. Only the template's
    /// own markup becomes control tokens: text in the messages that spells one (`<｜User｜>`,
    /// `</think>`, `<｜end▁of▁sentence｜>` in a document, a question or a chat message) is encoded
    /// as the characters it holds, so retrieved text cannot forge turns or end the reasoning.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let mut any = false;
        let marked: Vec<Message> = messages
            .iter()
            .map(|m| {
                // Marks in the text itself go first: removing them can join a `</think>` (found
                // by fuzzing: `</th\u{E000}ink>`), which the next step must see.
                let content = m.content.replace(MARK, "");
                // Reasoning echoed back in an assistant turn goes, as R1's template drops it, before
                // marking (the template would otherwise split inside a mark).
                let content = match (m.role, content.rfind(THINK_CLOSE)) {
                    (crate::chat::Role::Assistant, Some(at)) => &content[at + THINK_CLOSE.len()..],
                    _ => content.as_str(),
                };
                let (content, found) = self.mark_control_text(content);
                any |= found;
                Message {
                    content,
                    ..m.clone()
                }
            })
            .collect();
        let text = self.render_chat(&marked, add_generation_prompt)?;
        if !any {
            return Ok(self.with_single_bos(self.encode(&text)?));
        }
        // Pieces alternate: template and plain text, then one marked control-token text, ...
        // A template that cut a message apart would unbalance the marks and turn its own markup
        // into text: refuse rather than encode something else than what it rendered.
        if text.matches(MARK).count() % 2 != 0 {
            return Err(Error::Template(
                "the chat template split a message's text where it spells a control token; \
                 the conversation cannot be encoded safely"
                    .into(),
            ));
        }
        let mut ids = Vec::new();
        for (i, piece) in text.split(MARK).enumerate() {
            if i % 2 == 0 {
                ids.extend(self.encode(piece)?);
            } else {
                ids.extend(self.encode_control_text(piece)?);
            }
        }
        Ok(self.with_single_bos(ids))
    }

    /// `text` without private-use marks, with each added-token text in it wrapped in [`MARK`]s;
    /// and whether there was any.
    fn mark_control_text(&self, text: &str) -> (String, bool) {
        let text = text.replace(MARK, "");
        if !self.added.iter().any(|a| text.contains(a.as_str())) {
            return (text, false);
        }
        let mut out = String::with_capacity(text.len() + 16);
        let mut rest = text.as_str();
        'scan: while let Some(c) = rest.chars().next() {
            for a in &self.added {
                if let Some(after) = rest.strip_prefix(a.as_str()) {
                    out.push(MARK);
                    out.push_str(a);
                    out.push(MARK);
                    rest = after;
                    continue 'scan;
                }
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        (out, true)
    }

    /// Encodes the text of a control token as ordinary text: its first character apart from the
    /// rest (added tokens only match whole), the rest likewise while it still spells one.
    fn encode_control_text(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            if !self.added.iter().any(|a| rest.contains(a.as_str())) {
                ids.extend(self.encode(rest)?);
                break;
            }
            let first = rest.chars().next().map_or(0, char::len_utf8);
            ids.extend(self.encode(&rest[..first])?);
            rest = &rest[first..];
        }
        Ok(ids)
    }

    /// Ensures the sequence starts with exactly one BOS: templates that write it themselves must not
    /// get a second one, plain prompts must get one.
    pub fn with_single_bos(&self, mut ids: Vec<u32>) -> Vec<u32> {
        let bos = self.special.bos;
        let leading = ids.iter().take_while(|&&id| id == bos).count();
        match leading {
            0 => ids.insert(0, bos),
            1 => {}
            n => {
                ids.drain(..n - 1);
            }
        }
        ids
    }

    /// Whether the rendered generation prompt leaves the model inside its reasoning (it ends with
    /// `<think>`), so that the first generated tokens are reasoning.
    pub fn prompt_opens_reasoning(&self, prompt_ids: &[u32]) -> bool {
        let Some(open) = self.special.think_open else {
            return false;
        };
        // The prompt ends `<think>` or `<think>\n`: look at the last few ids.
        prompt_ids.iter().rev().take(3).any(|&id| id == open)
    }
}
