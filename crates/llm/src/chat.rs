//! Chat messages and the model's own chat template (from `tokenizer_config.json`), rendered with
//! minijinja the way transformers renders it (Jinja2 with `trim_blocks` and `lstrip_blocks`, plus the
//! Python string methods the DeepSeek template calls, such as `content.split('</think>')`).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions before the conversation (DeepSeek advises against them for R1).
    System,
    /// The user.
    User,
    /// The model. Its content may hold reasoning and `</think>`: the template keeps only the answer.
    Assistant,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What is said.
    pub content: String,
}

impl Message {
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
        }
    }
}

/// Drops the oldest `turns` user/assistant exchanges of `messages` (a system message stays), to
/// fit a conversation into the context window.
pub fn drop_oldest_turns(messages: &mut Vec<Message>, turns: usize) {
    for _ in 0..turns {
        let Some(i) = messages.iter().position(|m| m.role == Role::User) else {
            break;
        };
        let end = messages[i + 1..]
            .iter()
            .position(|m| m.role == Role::User)
            .map_or(messages.len(), |j| i + 1 + j);
        messages.drain(i..end);
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` (the `chat_template` string of `tokenizer_config.json`).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        // transformers compiles chat templates with these two flags; without them whitespace differs.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Template(format!("cannot compile: {e}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the model's turn begins
    /// (for DeepSeek-R1: `<｜Assistant｜><think>\n`).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| Error::Template(format!("cannot render: {e}")))
    }
}
