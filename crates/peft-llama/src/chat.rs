//! Chat templates: the Jinja template a model ships (`chat_template.jinja`, `tokenizer_config.json`'s
//! `chat_template`, or a GGUF file's `tokenizer.chat_template`), rendered as `transformers`'
//! `apply_chat_template` renders it.
//!
//! The engine is `minijinja` with `transformers`' settings: `trim_blocks` and `lstrip_blocks`,
//! loop controls, Python's string and dict methods (`.strip()`, `.startswith()`, `.items()`),
//! `raise_exception(message)`, `strftime_now(format)` and a `tojson` filter that writes JSON as
//! Python's `json.dumps` does (`", "` and `": "` separators, non-ASCII kept). The template sees
//! `messages`, `add_generation_prompt`, `bos_token` and `eos_token`.
//!
//! ```
//! use peft_llama::chat::{ChatMessage, ChatTemplate};
//! let template = ChatTemplate::new(
//!     "{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}\n{% endfor %}\
//!      {% if add_generation_prompt %}<|assistant|>{% endif %}",
//!     "example",
//! );
//! let text = template.render(&[ChatMessage::new("user", " Hi! ")], true)?;
//! assert_eq!(text, "<|user|>Hi!\n<|assistant|>");
//! # Ok::<(), peft_llama::LlamaError>(())
//! ```

use std::path::Path;

use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind};

use crate::error::{LlamaError, Result};
use crate::tokenizer::LlamaTokenizer;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (or whatever roles the template knows).
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A message of `role` saying `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's chat template with the special tokens it refers to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    origin: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// `json.dumps(value, ensure_ascii=False)` with an optional `indent`, as `transformers`' `tojson`
/// (keys in the order the template's dicts hold them).
fn to_json(value: &Value, indent: Option<usize>) -> std::result::Result<String, Error> {
    let mut out = String::new();
    write_json(value, indent, 0, &mut out)?;
    Ok(out)
}

fn write_json(
    value: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let separator = if indent.is_some() { "," } else { ", " };
    let quote = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&value.to_string()),
        ValueKind::String => out.push_str(&quote(value.as_str().unwrap_or_default())),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                write_json(item, indent, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                out.push_str(&quote(&key.to_string()));
                out.push_str(": ");
                write_json(&value.get_item(key)?, indent, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson cannot write a {} value", value.kind()),
            ))
        }
    }
    Ok(())
}

impl ChatTemplate {
    /// A template from its Jinja source; `origin` names it in errors.
    pub fn new(source: impl Into<String>, origin: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            origin: origin.into(),
            bos_token: None,
            eos_token: None,
        }
    }

    /// Sets the `bos_token` and `eos_token` strings the template may use.
    pub fn with_special_tokens(mut self, bos: Option<String>, eos: Option<String>) -> Self {
        self.bos_token = bos;
        self.eos_token = eos;
        self
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from (a file, or a GGUF file's metadata).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The template a model ships, if it ships one: a GGUF file's `tokenizer.chat_template`, or
    /// a directory's `chat_template.jinja` or `tokenizer_config.json` `chat_template` (a string,
    /// or a list of named templates of which `default` is taken). The special tokens are the
    /// tokenizer's BOS and EOS.
    ///
    /// # Errors
    /// An unreadable file or a malformed `tokenizer_config.json`.
    pub fn from_model(path: impl AsRef<Path>, tokenizer: &LlamaTokenizer) -> Result<Option<Self>> {
        let token = |id: Option<u32>| id.and_then(|id| tokenizer.token(id));
        Ok(Self::locate(path)?.map(|template| {
            template.with_special_tokens(token(tokenizer.bos_id()), token(tokenizer.eos_id()))
        }))
    }

    /// The template a model ships (see [`ChatTemplate::from_model`]), without its special
    /// tokens.
    ///
    /// # Errors
    /// An unreadable file or a malformed `tokenizer_config.json`.
    pub fn locate(path: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = path.as_ref();
        if crate::weights::is_gguf(path) {
            return Ok(Self::from_gguf(&peft_io::gguf::GgufFile::open(path)?));
        }
        let jinja = path.join("chat_template.jinja");
        if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| LlamaError::io(&jinja, e))?;
            return Ok(Some(Self::new(text, jinja.display().to_string())));
        }
        let file = path.join("tokenizer_config.json");
        if !file.is_file() {
            return Ok(None);
        }
        let config = peft_io::files::read_json(&file)?;
        let text = match config.get("chat_template") {
            Some(serde_json::Value::String(text)) => Some(text.as_str()),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str()),
            _ => None,
        };
        Ok(text.map(|text| Self::new(text, file.display().to_string())))
    }

    /// The template a GGUF file carries (`tokenizer.chat_template`), without special tokens.
    pub fn from_gguf(file: &peft_io::gguf::GgufFile) -> Option<Self> {
        crate::gguf::chat_template(file)
            .map(|text| Self::new(text, format!("{} (GGUF)", file.path().display())))
    }

    fn environment(&self) -> Environment<'_> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            strftime_utc(&format, now)
        });
        env.add_filter(
            "tojson",
            |value: Value,
             indent: Option<usize>,
             kwargs: minijinja::value::Kwargs|
             -> std::result::Result<Value, Error> {
                let indent = match indent {
                    Some(indent) => Some(indent),
                    None => kwargs.get::<Option<usize>>("indent")?,
                };
                kwargs.assert_all_used()?;
                Ok(Value::from_safe_string(to_json(&value, indent)?))
            },
        );
        env
    }

    /// Renders `messages`; with `add_generation_prompt`, the template's opening of the
    /// assistant's turn follows.
    ///
    /// # Errors
    /// A template that does not parse, or that raises (`raise_exception`) or fails on these
    /// messages.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let error = |e: Error| {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                message.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            LlamaError::Template {
                origin: self.origin.clone(),
                message,
            }
        };
        let env = self.environment();
        let template = env.template_from_str(&self.source).map_err(error)?;
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        template.render(context).map_err(error)
    }

    /// The token ids of the rendered conversation, as `apply_chat_template(messages,
    /// tokenize=True)` gives them: the text encoded without adding special tokens (the template
    /// writes its own).
    ///
    /// # Errors
    /// See [`ChatTemplate::render`]; the tokenizer fails.
    pub fn encode(
        &self,
        tokenizer: &LlamaTokenizer,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        tokenizer.encode(&self.render(messages, add_generation_prompt)?, false)
    }
}

/// `time.strftime(format)` for the UTC time `secs` since the epoch, for the directives chat
/// templates use (`%d %b %Y`, `%Y-%m-%d`, `%H:%M`); others are kept as written.
fn strftime_utc(format: &str, secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = (secs / 86_400) as i64;
    let (hour, minute, second) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let name = MONTHS[(month - 1) as usize];
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_dates_as_python() {
        // 2024-02-29 13:05:09 UTC
        assert_eq!(
            strftime_utc("%d %b %Y %H:%M:%S %B %%", 1_709_211_909),
            "29 Feb 2024 13:05:09 February %"
        );
        assert_eq!(strftime_utc("%Y-%m-%d", 0), "1970-01-01");
    }

    #[test]
    fn tojson_writes_as_python_json_dumps() {
        let value = Value::from_serialize(serde_json::json!({"a": [1, "é"], "b": {}, "c": null}));
        assert_eq!(
            to_json(&value, None).unwrap(),
            r#"{"a": [1, "é"], "b": {}, "c": null}"#
        );
        assert_eq!(
            to_json(&value, Some(2)).unwrap(),
            "{\n  \"a\": [\n    1,\n    \"é\"\n  ],\n  \"b\": {},\n  \"c\": null\n}"
        );
    }

    #[test]
    fn raise_exception_is_an_error_naming_the_template() {
        let template = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}",
            "strict",
        );
        let err = template
            .render(&[ChatMessage::new("assistant", "hi")], false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("strict") && err.contains("first must be user"),
            "{err}"
        );
    }
}
