//! Prompts rendered from the model's own Jinja chat template (GGUF `tokenizer.chat_template`
//! or `tokenizer_config.json`), the way Hugging Face and llama.cpp render them.

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;

use super::{ModelError, Result};

/// ChatML, for checkpoints that ship no template.
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One turn of a conversation.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    /// A system turn (instructions to the model).
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: "system".into(),
            content: content.into(),
        }
    }
    /// A user turn.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
    /// An assistant turn (an earlier answer).
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: "assistant".into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Compile `source` (or ChatML when `None`).
    pub fn new(source: Option<String>, bos: Option<&str>, eos: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        // Hugging Face renders with trim_blocks and lstrip_blocks; so must we, or whitespace
        // (and so the token ids) differ.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source.unwrap_or_else(|| CHATML.to_string()))
            .map_err(|e| ModelError::Template(e.to_string()))?;
        Ok(Self {
            env,
            bos: bos.unwrap_or_default().to_string(),
            eos: eos.unwrap_or_default().to_string(),
        })
    }

    /// The prompt text for `messages`, ending with the assistant's turn opener when
    /// `add_generation_prompt` is set.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| ModelError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback_renders_turns_and_the_generation_prompt() -> Result<()> {
        let t = ChatTemplate::new(None, None, None)?;
        let s = t.render(&[Message::system("S"), Message::user("Q")], true)?;
        assert_eq!(
            s,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
        );
        Ok(())
    }

    #[test]
    fn templates_can_use_python_string_methods_and_raise() -> Result<()> {
        let src = "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('no') }}{% endif %}\
                   {{ bos_token }}{{ messages[0]['content'].strip() }}";
        let t = ChatTemplate::new(Some(src.into()), Some("<s>"), None)?;
        assert_eq!(t.render(&[Message::user("  hi  ")], false)?, "<s>hi");
        let bad = Message {
            role: "bad".into(),
            content: String::new(),
        };
        assert!(t.render(&[bad], false).is_err());
        Ok(())
    }
}
