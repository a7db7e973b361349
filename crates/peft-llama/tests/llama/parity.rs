//! The LLaMA implementation against Hugging Face `transformers` (fixtures from
//! `scripts/make_fixtures.py`). Tolerance on logits: rtol 1e-4, atol 1e-5 on real positions.

use crate::common;

use burn::backend::NdArray;
use common::{assert_close, fixtures, inputs, real_positions, stories260k, Fixture};
use peft_llama::{
    generate, GenerationConfig, LlamaConfig, LlamaError, LlamaLoader, LlamaTokenizer, NoHooks,
    TokenBatch,
};

type B = NdArray<f32>;

fn logits_of(dir: &std::path::Path, tokens: &TokenBatch) -> (Vec<f32>, usize) {
    let model = LlamaLoader::new(dir)
        .load::<B>(&Default::default())
        .unwrap();
    let logits = model.forward(tokens, &NoHooks, None).unwrap();
    (peft_core_free_host(logits), model.config.vocab_size)
}

fn peft_core_free_host(t: burn::tensor::Tensor<B, 3>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn check_base_logits(model: &str, weights: &str) {
    let tokens = inputs(model);
    let (logits, vocab) = logits_of(&fixtures().join(model).join(weights), &tokens);
    let (expected, _) =
        Fixture::open(fixtures().join(model).join("base_logits.safetensors")).f32("logits");
    assert_close(
        &real_positions(&logits, &tokens, vocab),
        &real_positions(&expected, &tokens, vocab),
        1e-4,
        1e-5,
        &format!("{model}/{weights} logits"),
    );
    // Padding positions too: their positions and masks follow transformers' conventions.
    assert_close(
        &logits,
        &expected,
        1e-4,
        1e-5,
        &format!("{model}/{weights} logits incl. padding"),
    );
}

#[test]
fn mha_logits_match_transformers_on_a_right_padded_batch() {
    check_base_logits("tiny-mha", "model");
}

#[test]
fn gqa_with_llama3_rope_scaling_and_tied_embeddings_matches_transformers() {
    check_base_logits("tiny-gqa", "model");
}

#[test]
fn explicit_head_dim_wider_than_hidden_matches_transformers() {
    check_base_logits("tiny-headdim", "model");
}

#[test]
fn sharded_safetensors_load_the_same_model() {
    check_base_logits("tiny-mha", "model-sharded");
}

#[test]
fn meta_pth_layout_gives_the_same_logits_as_hf_layout() {
    for model in ["tiny-mha", "tiny-gqa"] {
        let tokens = inputs(model);
        let (hf, vocab) = logits_of(&fixtures().join(model).join("model"), &tokens);
        let (meta, _) = logits_of(&fixtures().join(model).join("meta"), &tokens);
        // Same weights, permuted rows: equal up to summation order.
        assert_close(
            &real_positions(&meta, &tokens, vocab),
            &real_positions(&hf, &tokens, vocab),
            1e-5,
            1e-6,
            model,
        );
    }
}

#[test]
fn meta_params_reproduce_the_hf_config_except_tied_embeddings_and_rope_scaling() {
    let loader = LlamaLoader::new(fixtures().join("tiny-mha/meta"));
    let (config, _, _) = loader.read().unwrap();
    let hf = LlamaConfig::from_hf_file(fixtures().join("tiny-mha/model/config.json")).unwrap();
    assert_eq!(
        (
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
            config.num_attention_heads
        ),
        (
            hf.hidden_size,
            hf.intermediate_size,
            hf.num_hidden_layers,
            hf.num_attention_heads
        )
    );
}

#[test]
fn stories260k_logits_match_transformers() {
    let file = Fixture::open(fixtures().join("stories260k/logits.safetensors"));
    let (ids, shape) = file.i64("input_ids");
    let (expected, _) = file.f32("logits");
    let tokens = TokenBatch {
        ids: ids.iter().map(|&i| i as u32).collect(),
        batch: shape[0],
        seq: shape[1],
        mask: None,
    };
    let (logits, _) = logits_of(&stories260k(), &tokens);
    assert_close(&logits, &expected, 1e-4, 1e-5, "stories260k logits");
}

#[test]
fn stories260k_greedy_matches_transformers() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("stories260k/greedy.json")).unwrap(),
    )
    .unwrap();
    let ids = |key: &str| -> Vec<u32> {
        reference[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let tokenizer = LlamaTokenizer::from_dir(stories260k()).unwrap();
    let prompt = tokenizer
        .encode(reference["prompt"].as_str().unwrap(), true)
        .unwrap();
    assert_eq!(prompt, ids("prompt_ids"));
    let model = LlamaLoader::new(stories260k())
        .load::<B>(&Default::default())
        .unwrap();
    let config = GenerationConfig {
        max_new_tokens: 40,
        eos_token_ids: vec![2],
        ..Default::default()
    };
    let result = generate(&model, &NoHooks, &[prompt], &config).unwrap();
    assert_eq!(result[0].generated_ids, ids("generated_ids"));
    let all: Vec<u32> = result[0]
        .prompt_ids
        .iter()
        .chain(&result[0].generated_ids)
        .copied()
        .collect();
    assert_eq!(
        tokenizer.decode(&all).unwrap(),
        reference["text"].as_str().unwrap()
    );
}

#[test]
fn tokenizer_matches_transformers_on_varied_text() {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("stories260k/tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    let tokenizer = LlamaTokenizer::from_dir(stories260k()).unwrap();
    assert_eq!((tokenizer.bos_id(), tokenizer.eos_id()), (Some(1), Some(2)));
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tokenizer.encode(text, true).unwrap(), expected, "{text:?}");
        assert_eq!(
            tokenizer.decode(&expected).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
    }
}

#[test]
fn cached_decoding_equals_recomputation_for_a_ragged_batch_with_sampling() {
    let model = LlamaLoader::new(stories260k())
        .load::<B>(&Default::default())
        .unwrap();
    let prompts = vec![
        vec![1, 403, 407, 261, 378],
        vec![1, 403],
        vec![1, 261, 376, 298],
    ];
    for temperature in [0.0, 0.9] {
        let config = GenerationConfig {
            max_new_tokens: 12,
            temperature,
            top_p: 0.9,
            top_k: 50,
            seed: 7,
            ..Default::default()
        };
        let cached = generate(&model, &NoHooks, &prompts, &config).unwrap();
        let recomputed = generate(
            &model,
            &NoHooks,
            &prompts,
            &GenerationConfig {
                use_cache: false,
                ..config.clone()
            },
        )
        .unwrap();
        assert_eq!(cached, recomputed, "temperature {temperature}");
    }
}

#[test]
fn batched_generation_equals_one_prompt_at_a_time() {
    let model = LlamaLoader::new(stories260k())
        .load::<B>(&Default::default())
        .unwrap();
    let prompts = vec![vec![1, 403, 407, 261, 378], vec![1, 261, 376]];
    let config = GenerationConfig {
        max_new_tokens: 10,
        ..Default::default()
    };
    let batched = generate(&model, &NoHooks, &prompts, &config).unwrap();
    for (prompt, result) in prompts.iter().zip(&batched) {
        let alone = generate(&model, &NoHooks, std::slice::from_ref(prompt), &config).unwrap();
        assert_eq!(&alone[0], result);
    }
}

#[test]
fn missing_tensor_is_an_error_naming_it() {
    let dir = tempdir("missing");
    std::fs::copy(
        fixtures().join("tiny-mha/model/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    // A safetensors file with only the embeddings.
    let bytes = std::fs::read(fixtures().join("tiny-mha/model/model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = file.tensor("model.embed_tokens.weight").unwrap();
    let only = vec![("model.embed_tokens.weight".to_string(), view)];
    safetensors::serialize_to_file(only, None, &dir.join("model.safetensors")).unwrap();
    let err = LlamaLoader::new(&dir)
        .load::<B>(&Default::default())
        .unwrap_err();
    assert!(
        matches!(&err, LlamaError::MissingTensor { key, .. } if key == "model.layers.0.self_attn.q_proj.weight"),
        "{err}"
    );
}

#[test]
fn config_for_another_model_size_is_a_shape_error_naming_the_tensor() {
    let dir = tempdir("mismatch");
    std::fs::copy(
        fixtures().join("tiny-mha/model/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(fixtures().join("tiny-mha/model/config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"intermediate_size\": 64", "\"intermediate_size\": 96"),
    )
    .unwrap();
    let err = LlamaLoader::new(&dir)
        .load::<B>(&Default::default())
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("model.layers.0.mlp.gate_proj.weight") && message.contains("96"),
        "{message}"
    );
}

#[test]
fn truncated_weights_are_an_error_naming_the_file() {
    let dir = tempdir("truncated");
    std::fs::copy(
        fixtures().join("tiny-mha/model/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(fixtures().join("tiny-mha/model/model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let err = LlamaLoader::new(&dir)
        .load::<B>(&Default::default())
        .unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("peft-llama-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
