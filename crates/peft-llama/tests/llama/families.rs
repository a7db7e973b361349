//! The LLaMA-family decoders beside LLaMA against `transformers` and `peft` (fixtures from
//! `scripts/make_family_fixtures.py`): Mistral with a sliding window on every layer, Qwen2 with
//! q/k/v biases, tied embeddings and sliding windows on its top layers, Qwen3 with q/k norms and
//! a head width apart from `hidden / heads`, and LLaMA with attention and MLP biases.
//!
//! Logits at every real position of a right-padded batch: rtol 1e-4 / atol 1e-5 in f32 against
//! float64 references. Greedy continuations: token-exact (the references' smallest top-1/top-2
//! margin is 1.2e-3, far above the f32 error).

use crate::common::{assert_close, fixtures, real_positions, Fixture};

use burn::backend::NdArray;
use burn::tensor::Tensor;
use peft_core::load_peft;
use peft_llama::Family;
use peft_llama::{generate, GenerationConfig, Llama, LlamaLoader, NoHooks, PeftLlama, TokenBatch};
use std::path::PathBuf;

type B = NdArray<f32>;

const FAMILIES: [(&str, Family); 4] = [
    ("mistral", Family::Mistral),
    ("qwen2", Family::Qwen2),
    ("qwen3", Family::Qwen3),
    ("llama-bias", Family::Llama),
];

fn dir(family: &str) -> PathBuf {
    fixtures().join("families").join(family)
}

fn inputs(family: &str) -> TokenBatch {
    let file = Fixture::open(dir(family).join("inputs.safetensors"));
    let (ids, shape) = file.i64("input_ids");
    let (mask, _) = file.i64("attention_mask");
    TokenBatch {
        ids: ids.iter().map(|&i| i as u32).collect(),
        batch: shape[0],
        seq: shape[1],
        mask: Some(mask.iter().map(|&m| m != 0).collect()),
    }
}

fn load(family: &str) -> Llama<B> {
    LlamaLoader::new(dir(family).join("model"))
        .load::<B>(&Default::default())
        .unwrap_or_else(|e| panic!("{family}: {e}"))
}

fn host(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn check(family: &str, key: &str, logits: Tensor<B, 3>, tokens: &TokenBatch) {
    let vocab = logits.dims()[2];
    let expected = Fixture::open(dir(family).join("expected.safetensors"));
    let (want, _) = expected.f32(key);
    assert_close(
        &real_positions(&host(logits), tokens, vocab),
        &real_positions(&want, tokens, vocab),
        1e-4,
        1e-5,
        &format!("{family} {key}"),
    );
}

#[test]
fn each_family_is_read_from_its_config_with_its_switches() {
    for (family, kind) in FAMILIES {
        let config = load(family).config;
        assert_eq!(config.family, kind, "{family}");
        let sliding: Vec<bool> = (0..3).map(|l| config.is_sliding(l)).collect();
        match family {
            "mistral" => {
                assert_eq!(config.sliding_window, Some(4));
                assert_eq!(sliding, [true, true, true]);
            }
            "qwen2" => {
                assert!(config.attention_bias && !config.o_proj_bias && config.tie_word_embeddings);
                assert_eq!(config.sliding_window, Some(5));
                assert_eq!(sliding, [false, true, true]);
            }
            "qwen3" => assert!(config.qk_norm && config.head_dim == 16 && !config.attention_bias),
            _ => assert!(config.attention_bias && config.o_proj_bias && config.mlp_bias),
        }
    }
}

#[test]
fn each_family_matches_transformers_logits() {
    for (family, _) in FAMILIES {
        let tokens = inputs(family);
        let logits = load(family).forward(&tokens, &NoHooks, None).unwrap();
        check(family, "base_logits", logits, &tokens);
    }
}

#[test]
fn each_family_decodes_greedily_as_transformers_with_and_without_cache() {
    for (family, _) in FAMILIES {
        let model = load(family);
        let tokens = inputs(family);
        let expected = Fixture::open(dir(family).join("expected.safetensors"));
        for (row, length) in [(0, 6), (1, 8)] {
            let prompt = tokens.ids[row * tokens.seq..row * tokens.seq + length].to_vec();
            let (want, _) = expected.i64(&format!("greedy_row{row}"));
            let want: Vec<u32> = want.iter().map(|&t| t as u32).collect();
            for use_cache in [true, false] {
                let config = GenerationConfig {
                    max_new_tokens: want.len(),
                    eos_token_ids: vec![],
                    use_cache,
                    ..Default::default()
                };
                let got =
                    generate(&model, &NoHooks, std::slice::from_ref(&prompt), &config).unwrap();
                assert_eq!(
                    got[0].generated_ids, want,
                    "{family} row {row} cache {use_cache}"
                );
            }
        }
    }
}

#[test]
fn lora_prefix_and_adaption_prompt_files_match_their_references_on_each_family() {
    let device = Default::default();
    for (family, _) in FAMILIES {
        let tokens = inputs(family);
        for case in ["lora", "prefix", "adaption_prompt"] {
            let base = load(family);
            let adapter = load_peft(&dir(family).join("adapters").join(case), &base, &device)
                .unwrap_or_else(|e| panic!("{family} {case}: {e}"));
            let model = peft_core::PeftModel::with_adapter(base, adapter).unwrap();
            let logits = model.forward(&tokens, None).unwrap();
            check(family, &format!("{case}_logits"), logits, &tokens);
        }
    }
}
