//! LLaMA checkpoints in GGUF files (llama.cpp, Ollama): the configuration from the metadata,
//! Hugging Face names for the tensors, and the tokenizer and chat template the file carries.
//!
//! The container and the dequantisation are `peft_io::gguf`'s; this module knows what a LLaMA
//! GGUF means. llama.cpp stores the query and key rows of the `llama` architecture permuted for
//! its interleaved RoPE; the loader undoes that (see [`crate::weights`]).

use std::collections::BTreeMap;

use peft_io::gguf::{GgufArray, GgufFile, GgufValue};
use serde_json::{json, Value};

use crate::config::{Family, LlamaConfig};
use crate::error::{LlamaError, Result};

/// The GGUF architectures this crate loads: `llama` (LLaMA 1/2/3, Mistral, SmolLM2, TinyLlama as
/// llama.cpp converts them), `qwen2` (Qwen2/2.5) and `qwen3`.
pub const ARCHITECTURES: [&str; 3] = ["llama", "qwen2", "qwen3"];

/// The family of a supported GGUF architecture.
fn family(arch: &str) -> Family {
    match arch {
        "qwen2" => Family::Qwen2,
        "qwen3" => Family::Qwen3,
        _ => Family::Llama,
    }
}

/// Whether llama.cpp stored this architecture's query and key rows permuted for its
/// interleaved RoPE (its converter does so for `llama` only; Qwen's rows are as in the
/// Hugging Face checkpoint, rotated by halves).
pub fn permutes_query_key_rows(config: &LlamaConfig) -> bool {
    config.family == Family::Llama
}

fn origin(file: &GgufFile) -> String {
    file.path().display().to_string()
}

fn meta<'a>(file: &'a GgufFile, key: &str) -> Option<&'a GgufValue> {
    file.get(key)
}

fn required_u64(file: &GgufFile, key: &str) -> Result<usize> {
    meta(file, key)
        .and_then(GgufValue::as_u64)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| {
            LlamaError::config(
                origin(file),
                format!("GGUF metadata `{key}` is missing or not a non-negative integer"),
            )
        })
}

fn optional_u64(file: &GgufFile, key: &str) -> Result<Option<usize>> {
    match meta(file, key) {
        None => Ok(None),
        Some(_) => required_u64(file, key).map(Some),
    }
}

fn optional_f64(file: &GgufFile, key: &str) -> Result<Option<f64>> {
    match meta(file, key) {
        None => Ok(None),
        Some(value) => value.as_f64().map(Some).ok_or_else(|| {
            LlamaError::config(
                origin(file),
                format!("GGUF metadata `{key}` is not a number"),
            )
        }),
    }
}

/// A token id the metadata gives under `key` (`tokenizer.ggml.bos_token_id`), if any.
///
/// # Errors
/// A value that is not a non-negative integer.
pub(crate) fn token_id(file: &GgufFile, key: &str) -> Result<Option<u32>> {
    Ok(optional_u64(file, key)?.and_then(|id| u32::try_from(id).ok()))
}

/// The architecture the file declares (`general.architecture`), refused unless supported.
///
/// # Errors
/// A missing or unsupported architecture.
pub fn architecture(file: &GgufFile) -> Result<&str> {
    let arch = meta(file, "general.architecture")
        .and_then(GgufValue::as_str)
        .ok_or_else(|| {
            LlamaError::config(origin(file), "GGUF metadata has no `general.architecture`")
        })?;
    if ARCHITECTURES.contains(&arch) {
        Ok(arch)
    } else {
        Err(LlamaError::config(
            origin(file),
            format!(
                "GGUF architecture `{arch}` is not supported; supported: {}",
                ARCHITECTURES.join(", ")
            ),
        ))
    }
}

impl LlamaConfig {
    /// The configuration a LLaMA GGUF file's metadata describes (`llama.*` keys, the tokenizer's
    /// special ids, whether an `output.weight` exists).
    ///
    /// # Errors
    /// An unsupported architecture, missing or malformed keys, RoPE scaling this crate does not
    /// implement, or inconsistent sizes.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = architecture(file)?;
        let key = |name: &str| format!("{arch}.{name}");
        let hidden = required_u64(file, &key("embedding_length"))?;
        let heads = required_u64(file, &key("attention.head_count"))?;
        let kv_heads = optional_u64(file, &key("attention.head_count_kv"))?.unwrap_or(heads);
        let head_dim =
            match optional_u64(file, &key("attention.key_length"))? {
                Some(d) => d,
                None if heads > 0 && hidden.is_multiple_of(heads) => hidden / heads,
                None => return Err(LlamaError::config(
                    origin(file),
                    "embedding_length is not a multiple of head_count and no key_length is given",
                )),
            };
        let tokens = meta(file, "tokenizer.ggml.tokens")
            .and_then(GgufValue::as_array)
            .map(GgufArray::len);
        let embed_rows = file.tensor("token_embd.weight").map(|t| t.shape[0]);
        let vocab_size = match optional_u64(file, &key("vocab_size"))? {
            Some(v) => v,
            None => tokens.or(embed_rows).ok_or_else(|| {
                LlamaError::config(origin(file), "GGUF file does not say its vocabulary size")
            })?,
        };
        if let Some(kind) = meta(file, &key("rope.scaling.type")).and_then(GgufValue::as_str) {
            if kind != "none" {
                return Err(LlamaError::config(
                    origin(file),
                    format!("GGUF RoPE scaling `{kind}` is not supported (only none)"),
                ));
            }
        }
        // Llama-3.1+ scaling as llama.cpp writes it: the divisor of each inverse frequency.
        let rope_freq_factors = match file.tensor("rope_freqs.weight") {
            Some(tensor) => Some(file.read_f32(tensor)?),
            None => None,
        };
        let eos = token_id(file, "tokenizer.ggml.eos_token_id")?;
        let family = family(arch);
        // Qwen2 has q/k/v biases and no output bias; a `llama` file may carry LLaMA's
        // `attention_bias` (all four) and `mlp_bias`. The tensors say which.
        let has = |name: &str| file.tensor(name).is_some();
        let qkv_bias = has("blk.0.attn_q.bias");
        let config = LlamaConfig::new(
            vocab_size,
            hidden,
            required_u64(file, &key("feed_forward_length"))?,
            required_u64(file, &key("block_count"))?,
            heads,
            kv_heads,
            head_dim,
        )
        .with_rms_norm_eps(
            optional_f64(file, &key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        )
        .with_rope_theta(optional_f64(file, &key("rope.freq_base"))?.unwrap_or(10000.0))
        .with_max_position_embeddings(optional_u64(file, &key("context_length"))?.unwrap_or(2048))
        .with_tie_word_embeddings(file.tensor("output.weight").is_none())
        .with_bos_token_id(token_id(file, "tokenizer.ggml.bos_token_id")?)
        .with_eos_token_ids(eos.into_iter().collect())
        .with_family(family)
        .with_attention_bias(qkv_bias)
        .with_o_proj_bias(has("blk.0.attn_output.bias"))
        .with_mlp_bias(has("blk.0.ffn_up.bias"))
        .with_qk_norm(family == Family::Qwen3 || has("blk.0.attn_q_norm.weight"))
        .with_rope_freq_factors(rope_freq_factors);
        config.validate(&origin(file))?;
        Ok(config)
    }
}

/// The GGUF name of a Hugging Face LLaMA tensor name (`model.layers.3.self_attn.q_proj.weight`
/// → `blk.3.attn_q.weight`); names it does not know map to themselves.
pub fn gguf_name(hf: &str) -> String {
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        let (index, part) = rest.split_once('.').unwrap_or((rest, ""));
        let (module, suffix) = part.rsplit_once('.').unwrap_or((part, ""));
        let name = match module {
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            "input_layernorm" => "attn_norm",
            "post_attention_layernorm" => "ffn_norm",
            "self_attn.q_norm" => "attn_q_norm",
            "self_attn.k_norm" => "attn_k_norm",
            other => other,
        };
        return format!("blk.{index}.{name}.{suffix}");
    }
    match hf {
        "model.embed_tokens.weight" => "token_embd.weight",
        "model.norm.weight" => "output_norm.weight",
        "lm_head.weight" => "output.weight",
        other => other,
    }
    .to_string()
}

/// The Hugging Face files a GGUF checkpoint implies besides its weights, by file name:
/// `config.json` ([`LlamaConfig::to_hf_json`]), `generation_config.json` (BOS/EOS ids),
/// `tokenizer.json` (the tokenizer [`tokenizer_json`] builds) and `tokenizer_config.json`
/// (special-token strings and the chat template). With a `model.safetensors` beside them
/// (`weights::save_hf_safetensors`) they make a directory `transformers` and this crate load as
/// the same model and tokenizer: what `peft merge` writes from a GGUF base.
///
/// # Errors
/// Malformed metadata, an unsupported tokenizer, or a configuration `config.json` cannot
/// express (see [`LlamaConfig::to_hf_json`]).
pub fn hf_side_files(file: &GgufFile) -> Result<Vec<(&'static str, String)>> {
    let config = LlamaConfig::from_gguf(file)?;
    let tokenizer = tokenizer_json(file)?;
    let token = |id: Option<u32>| -> Option<String> {
        let id = id? as usize;
        match meta(file, "tokenizer.ggml.tokens").and_then(GgufValue::as_array) {
            Some(GgufArray::String(tokens)) => tokens.get(id).cloned(),
            _ => None,
        }
    };
    let mut tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(config.bos_token_id),
        "eos_token": token(config.eos_token_ids.first().copied()),
        "add_bos_token": tokenizer["post_processor"].is_object(),
        "clean_up_tokenization_spaces": false,
        "model_max_length": config.max_position_embeddings,
    });
    if let Some(template) = chat_template(file) {
        tokenizer_config["chat_template"] = template.into();
    }
    let generation = json!({
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids,
    });
    let pretty = |value: &Value| {
        serde_json::to_string_pretty(value).map_err(|e| LlamaError::Tokenizer(e.to_string()))
    };
    Ok(vec![
        ("config.json", pretty(&config.to_hf_json()?)?),
        ("generation_config.json", pretty(&generation)?),
        ("tokenizer.json", tokenizer.to_string()),
        ("tokenizer_config.json", pretty(&tokenizer_config)?),
    ])
}

/// The chat template the file carries (`tokenizer.chat_template`), if any.
pub fn chat_template(file: &GgufFile) -> Option<String> {
    meta(file, "tokenizer.chat_template")
        .and_then(GgufValue::as_str)
        .map(str::to_string)
}

/// Pre-tokenizer splits by `tokenizer.ggml.pre`, as llama.cpp applies them.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A regex split (isolating each match) followed by the byte-level mapping.
fn split_then_bytes(pattern: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
        byte_level(false)]})
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn byte_level_pre_tokenizer(file: &GgufFile) -> Result<Value> {
    let pre = meta(file, "tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        // llama.cpp's `smollm`: every digit alone, then GPT-2's split (as SmolLM's tokenizer.json).
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama3" | "llama-v3" | "llama-bpe" => split_then_bytes(LLAMA3_SPLIT),
        // Qwen2's split: as Llama-3's, but digits one at a time.
        "qwen2" => split_then_bytes(QWEN2_SPLIT),
        other => {
            return Err(LlamaError::Tokenizer(format!(
                "{}: GGUF pre-tokenizer `{other}` is not supported (supported: default, gpt-2, \
                 smollm, llama-bpe/llama3, qwen2)",
                origin(file)
            )))
        }
    })
}

/// Merges a SentencePiece vocabulary implies when the file lists none: every split of a token
/// into two tokens, best score first (as `transformers` rebuilds them from a GGUF).
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let ids: BTreeMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(String, String, f32)> = Vec::new();
    for (token, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(usize, usize, &str, &str)> = Vec::new();
        for (at, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(at);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                local.push((l, r, left, right));
            }
        }
        local.sort_by_key(|&(l, r, _, _)| (l, r));
        merges.extend(
            local
                .into_iter()
                .map(|(_, _, l, r)| (l.to_string(), r.to_string(), score)),
        );
    }
    // Best score first; ties by longer pieces first, keeping the order above (a stable sort).
    merges.sort_by(|a, b| {
        let key = |m: &(String, String, f32)| (m.2, m.0.chars().count(), m.1.chars().count());
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}

/// The tokenizer the file describes, as a `tokenizer.json` value for the `tokenizers` crate:
/// byte-level BPE (`tokenizer.ggml.model = gpt2`) or SentencePiece BPE (`llama`), control
/// tokens special, user-defined tokens matched whole, BOS added when `add_bos_token` says so.
///
/// # Errors
/// Missing or malformed tokenizer metadata, or an unsupported model or pre-tokenizer.
pub fn tokenizer_json(file: &GgufFile) -> Result<Value> {
    let bad = |what: &str| LlamaError::Tokenizer(format!("{}: GGUF {what}", origin(file)));
    let kind = meta(file, "tokenizer.ggml.model")
        .and_then(GgufValue::as_str)
        .ok_or_else(|| bad("metadata has no `tokenizer.ggml.model`"))?;
    let tokens = match meta(file, "tokenizer.ggml.tokens").and_then(GgufValue::as_array) {
        Some(GgufArray::String(tokens)) => tokens,
        _ => {
            return Err(bad(
                "`tokenizer.ggml.tokens` is missing or not a list of strings",
            ))
        }
    };
    let types = match meta(file, "tokenizer.ggml.token_type").and_then(GgufValue::as_array) {
        Some(array) => array
            .as_i64s()
            .filter(|t| t.len() == tokens.len())
            .ok_or_else(|| bad("`tokenizer.ggml.token_type` does not give one type per token"))?,
        None => vec![1; tokens.len()],
    };
    let merges: Option<Vec<(String, String)>> =
        match meta(file, "tokenizer.ggml.merges").and_then(GgufValue::as_array) {
            Some(GgufArray::String(merges)) => Some(
                merges
                    .iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(l, r)| (l.to_string(), r.to_string()))
                            .ok_or_else(|| bad(&format!("merge `{m}` is not two tokens")))
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(_) => return Err(bad("`tokenizer.ggml.merges` is not a list of strings")),
            None => None,
        };
    let bool_meta = |key: &str| meta(file, key).and_then(GgufValue::as_bool);
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    if vocab.len() != tokens.len() {
        return Err(bad("`tokenizer.ggml.tokens` lists a token twice"));
    }
    let (pre_tokenizer, decoder, model, add_bos_default) = match kind {
        "gpt2" => {
            let merges = merges.ok_or_else(|| bad("byte-level BPE without merges"))?;
            let model = json!({"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges});
            let decoder = json!({"type": "ByteLevel", "add_prefix_space": true,
                "trim_offsets": true, "use_regex": true});
            (byte_level_pre_tokenizer(file)?, decoder, model, false)
        }
        "llama" => {
            let merges = match merges {
                Some(merges) => merges,
                None => {
                    let scores = meta(file, "tokenizer.ggml.scores")
                        .and_then(GgufValue::as_array)
                        .and_then(GgufArray::as_f32s)
                        .filter(|s| s.len() == tokens.len())
                        .ok_or_else(|| {
                            bad("SentencePiece vocabulary without merges or one score per token")
                        })?;
                    merges_from_scores(tokens, &scores)
                }
            };
            let prepend = if bool_meta("tokenizer.ggml.add_space_prefix").unwrap_or(true) {
                "first"
            } else {
                "never"
            };
            let pre = json!({"type": "Metaspace", "replacement": "\u{2581}",
                "prepend_scheme": prepend, "split": false});
            let decoder = json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]});
            let model = json!({"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges});
            (pre, decoder, model, true)
        }
        other => {
            return Err(bad(&format!(
                "tokenizer model `{other}` is not supported (gpt2, llama)"
            )))
        }
    };
    // Control tokens (type 3) are special; user-defined ones (4) are matched whole.
    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &kind))| kind == 3 || kind == 4)
        .map(|(id, (token, &kind))| {
            json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": kind == 3})
        })
        .collect();
    let bos = token_id(file, "tokenizer.ggml.bos_token_id")?;
    let add_bos = bool_meta("tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default);
    let post_processor = match (add_bos, bos) {
        (true, Some(id)) => {
            let token = tokens
                .get(id as usize)
                .ok_or_else(|| bad(&format!("bos_token_id {id} is outside the vocabulary")))?;
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": token, "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": token, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": token, "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {token.as_str(): {"id": token, "ids": [id], "tokens": [token]}}})
        }
        _ => Value::Null,
    };
    Ok(
        json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
        "decoder": decoder, "model": model}),
    )
}
