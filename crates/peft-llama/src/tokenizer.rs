//! The model's tokenizer (`tokenizer.json`, or a GGUF file's metadata) through the `tokenizers`
//! crate.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{LlamaError, Result};

/// A LLaMA tokenizer with its special tokens.
#[derive(Clone)]
pub struct LlamaTokenizer {
    inner: Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
}

impl std::fmt::Debug for LlamaTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn special_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl LlamaTokenizer {
    /// Loads `tokenizer.json` from a model directory; BOS/EOS come from
    /// `tokenizer_config.json` when present, else `<s>` / `</s>`.
    ///
    /// # Errors
    /// A missing or malformed tokenizer file.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&path)
            .map_err(|e| LlamaError::Tokenizer(format!("{}: {e}", path.display())))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| LlamaError::Json {
                path: config_path.clone(),
                message: e.to_string(),
            })?,
            Err(_) => serde_json::Value::Null,
        };
        let bos = special_token(&config, "bos_token").unwrap_or_else(|| "<s>".into());
        let eos = special_token(&config, "eos_token").unwrap_or_else(|| "</s>".into());
        Ok(Self {
            bos: inner.token_to_id(&bos),
            eos: inner.token_to_id(&eos),
            inner,
        })
    }

    /// The tokenizer of a model directory (`tokenizer.json`) or of a GGUF file (built from its
    /// `tokenizer.ggml.*` metadata, see [`crate::gguf::tokenizer_json`]).
    ///
    /// # Errors
    /// See [`LlamaTokenizer::from_dir`] and [`LlamaTokenizer::from_gguf`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if crate::weights::is_gguf(path) {
            Self::from_gguf(&peft_io::gguf::GgufFile::open(path)?)
        } else {
            Self::from_dir(path)
        }
    }

    /// The tokenizer a GGUF file describes; BOS/EOS from `tokenizer.ggml.bos_token_id` and
    /// `eos_token_id`.
    ///
    /// # Errors
    /// Missing, malformed or unsupported tokenizer metadata.
    pub fn from_gguf(file: &peft_io::gguf::GgufFile) -> Result<Self> {
        let json = crate::gguf::tokenizer_json(file)?;
        let inner: Tokenizer = json.to_string().parse().map_err(|e| {
            LlamaError::Tokenizer(format!("{}: GGUF tokenizer: {e}", file.path().display()))
        })?;
        Ok(Self {
            bos: crate::gguf::token_id(file, "tokenizer.ggml.bos_token_id")?,
            eos: crate::gguf::token_id(file, "tokenizer.ggml.eos_token_id")?,
            inner,
        })
    }

    /// Beginning-of-sequence id.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence id.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The token string of `id`, if the vocabulary has it.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; with `add_special_tokens` the tokenizer's template applies (for
    /// LLaMA: BOS first), exactly as `tokenizer(text)` in `transformers`.
    ///
    /// # Errors
    /// The tokenizer fails on the text.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| LlamaError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    ///
    /// # Errors
    /// An id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| LlamaError::Tokenizer(e.to_string()))
    }
}
