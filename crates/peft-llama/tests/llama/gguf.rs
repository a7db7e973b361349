//! GGUF checkpoints (fixtures from `scripts/make_gguf_fixtures.py`, written by llama.cpp's Python
//! `gguf` package) against `transformers` loading the same files: logits (rtol 1e-4 / atol 1e-4,
//! f32 against float64 references), greedy tokens, and the tokenizers built from the metadata
//! against the reference tokenizers (SentencePiece from stories260k, a byte-level BPE, the same
//! BPE under Qwen2's pre-tokenizer). Architectures `llama` (Q/K rows permuted by llama.cpp),
//! `qwen2` (q/k/v biases, tied head) and `qwen3` (q/k norms, head width 128 of a 64-wide model).

use crate::common::{assert_close, fixtures, Fixture};

use burn::backend::NdArray;
use peft_io::gguf::GgufFile;
use peft_llama::{
    generate, Family, GenerationConfig, Llama, LlamaLoader, LlamaTokenizer, NoHooks, TokenBatch,
};
use std::path::PathBuf;

type B = NdArray<f32>;

fn gguf(name: &str) -> PathBuf {
    fixtures().join("gguf").join(name)
}

fn load(name: &str) -> Llama<B> {
    LlamaLoader::new(gguf(&format!("{name}.gguf")))
        .load::<B>(&Default::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn gguf_models_match_transformers_logits_and_greedy_tokens() {
    let expected = Fixture::open(gguf("expected.safetensors"));
    for (name, tied) in [
        ("stories-spm", true),
        ("tiny-bpe", false),
        ("tiny-qwen2", true),
        ("tiny-qwen3", false),
    ] {
        let model = load(name);
        assert_eq!(model.config.tie_word_embeddings, tied, "{name}");
        let c = &model.config;
        match name {
            "tiny-qwen2" => assert!(
                c.family == Family::Qwen2 && c.attention_bias && !c.o_proj_bias && !c.qk_norm
            ),
            "tiny-qwen3" => assert!(
                c.family == Family::Qwen3 && c.qk_norm && c.head_dim == 128 && !c.attention_bias
            ),
            _ => assert!(c.family == Family::Llama && !c.attention_bias && !c.qk_norm),
        }
        let (ids, shape) = expected.i64(&format!("{name}.input_ids"));
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let tokens = TokenBatch {
            ids: ids.clone(),
            batch: shape[0],
            seq: shape[1],
            mask: None,
        };
        let logits = model.forward(&tokens, &NoHooks, None).unwrap();
        let (want, _) = expected.f32(&format!("{name}.logits"));
        let got = logits
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap();
        assert_close(&got, &want, 1e-4, 1e-4, &format!("{name} logits"));
        let (greedy, _) = expected.i64(&format!("{name}.greedy"));
        let config = GenerationConfig {
            max_new_tokens: greedy.len(),
            eos_token_ids: vec![],
            ..Default::default()
        };
        let prompt = ids[..shape[1]].to_vec();
        let got = generate(&model, &NoHooks, &[prompt], &config).unwrap();
        let want: Vec<u32> = greedy.iter().map(|&t| t as u32).collect();
        assert_eq!(got[0].generated_ids, want, "{name} greedy");
    }
}

/// Llama-3.1+ scaling as llama.cpp stores it (`rope_freqs.weight`, no scaling metadata) against
/// transformers' LlamaForCausalLM with `rope_scaling = llama3` on the same weights, over 24
/// positions of a model whose original context is 16 (the scaling moves these logits by up to 42).
#[test]
fn a_gguf_with_rope_frequency_factors_matches_llama3_scaling() {
    let expected = Fixture::open(gguf("expected.safetensors"));
    let model = load("tiny-llama3");
    let factors = model.config.rope_freq_factors.clone().unwrap();
    assert_eq!(factors.len(), 8);
    assert!(factors.contains(&8.0) && factors[factors.len() - 1] == 8.0);
    let (ids, shape) = expected.i64("tiny-llama3.input_ids");
    let tokens = TokenBatch {
        ids: ids.iter().map(|&i| i as u32).collect(),
        batch: shape[0],
        seq: shape[1],
        mask: None,
    };
    let logits = model.forward(&tokens, &NoHooks, None).unwrap();
    let got = logits.into_data().into_vec::<f32>().unwrap();
    let (want, _) = expected.f32("tiny-llama3.logits");
    assert_close(&got, &want, 1e-4, 1e-4, "tiny-llama3 logits");
}

#[test]
fn gguf_tokenizers_encode_as_the_reference_tokenizers() {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gguf("tokenizer_cases.json")).unwrap())
            .unwrap();
    for name in ["stories-spm", "tiny-bpe", "tiny-qwen2", "tiny-qwen3"] {
        let tokenizer = LlamaTokenizer::load(gguf(&format!("{name}.gguf"))).unwrap();
        let case = &cases[name];
        let ids = case["ids"].as_object().unwrap();
        assert!(ids.len() >= 8);
        for (text, want) in ids {
            let want: Vec<u32> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(
                tokenizer.encode(text, false).unwrap(),
                want,
                "{name}: {text:?}"
            );
            if !text.contains('<') && !text.starts_with(' ') {
                // Decoding gives the text back (special-token literals aside; SentencePiece's
                // decoder drops one leading space, as transformers' does).
                assert_eq!(tokenizer.decode(&want).unwrap(), *text, "{name} decode");
            }
        }
        let prefix: Vec<u32> = case["add_special_tokens_prefix"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let (text, plain) = ids.iter().next().unwrap();
        let with_specials = tokenizer.encode(text, true).unwrap();
        assert_eq!(
            with_specials.len(),
            prefix.len() + plain.as_array().unwrap().len()
        );
        assert_eq!(with_specials[..prefix.len()], prefix[..], "{name}");
    }
    // The chat template travels in the file.
    let file = GgufFile::open(gguf("tiny-bpe.gguf")).unwrap();
    let template = peft_llama::gguf::chat_template(&file).unwrap();
    assert!(template.contains("<|im_start|>") && template.contains("add_generation_prompt"));
    assert!(
        peft_llama::gguf::chat_template(&GgufFile::open(gguf("stories-spm.gguf")).unwrap())
            .is_none()
    );
}

#[test]
fn broken_gguf_models_are_refused_naming_the_file_and_the_problem() {
    let dir = std::env::temp_dir().join(format!("peft-gguf-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = std::fs::read(gguf("tiny-bpe.gguf")).unwrap();
    let load_err = |bytes: &[u8], file: &str| {
        let path = dir.join(file);
        std::fs::write(&path, bytes).unwrap();
        LlamaLoader::new(&path)
            .load::<B>(&Default::default())
            .expect_err("a broken GGUF must be refused")
            .to_string()
    };
    let cut = load_err(&bytes[..bytes.len() - 100], "cut.gguf");
    assert!(cut.contains("cut.gguf") && cut.contains("lies at"), "{cut}");
    let header = load_err(&bytes[..5000], "header.gguf");
    assert!(header.contains("header.gguf"), "{header}");
    // Another architecture: the error names it and what is supported.
    let needle = b"llama";
    let at = bytes.windows(5).position(|w| w == needle).unwrap();
    let mut other = bytes.clone();
    other[at..at + 5].copy_from_slice(b"gemma");
    let arch = load_err(&other, "arch.gguf");
    assert!(
        arch.contains("`gemma`") && arch.contains("supported: llama"),
        "{arch}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
