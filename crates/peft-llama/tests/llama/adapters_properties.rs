//! Properties every adapter must have, on the real stories260k model (GQA) and the tiny fixtures.

use crate::common;

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use common::{assert_close, fixtures, stories260k};
use peft_core::load_peft;
use peft_core::Randomise;
use peft_core::{
    Adapter, AdaptionPromptConfig, AnyAdapter, GateShape, LoraConfig, PeftError, PeftMethod,
    PeftModel, PrefixTuningConfig, TargetModules,
};
use peft_llama::{
    GenerationConfig, Llama, LlamaConfig, LlamaLoader, NoHooks, PeftLlama, PrefixFromTokens,
    TokenBatch,
};

type B = NdArray<f32>;
type AD = Autodiff<NdArray<f32>>;

fn model<Bk: Backend>() -> Llama<Bk> {
    LlamaLoader::new(stories260k())
        .load::<Bk>(&Default::default())
        .unwrap()
}

fn tokens() -> TokenBatch {
    TokenBatch::right_padded(&[vec![1, 403, 407, 261, 378, 432], vec![1, 261, 376]], 0).unwrap()
}

fn host<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn all_methods<Bk: Backend>(config: &Llama<Bk>, randomise: bool) -> Vec<AnyAdapter<Bk>> {
    let device = Default::default();
    let prompt = AdaptionPromptConfig::new()
        .with_adapter_len(4)
        .with_adapter_layers(3)
        .init::<Bk>(config, &device)
        .unwrap();
    let lora = LoraConfig::new()
        .with_r(4)
        .with_lora_alpha(8.0)
        .with_target_modules(TargetModules::AllLinear)
        .init::<Bk>(config, &device)
        .unwrap();
    let prefix = PrefixTuningConfig::new()
        .with_num_virtual_tokens(3)
        .init::<Bk>(config, &device)
        .unwrap();
    if randomise {
        vec![
            AnyAdapter::AdaptionPrompt(prompt.map(&mut Randomise(0.5))),
            AnyAdapter::Lora(lora.map(&mut Randomise(0.1))),
            AnyAdapter::PrefixTuning(prefix.map(&mut Randomise(0.5))),
        ]
    } else {
        vec![prompt.into(), lora.into(), prefix.into()]
    }
}

#[test]
fn zero_gate_leaves_base_logits_unchanged() {
    let base = model::<B>();
    let reference = host(base.forward(&tokens(), &NoHooks, None).unwrap());
    for gate_shape in [GateShape::PerHead, GateShape::Scalar] {
        let adapter = AdaptionPromptConfig::new()
            .with_adapter_len(10)
            .with_adapter_layers(3)
            .with_gate_shape(gate_shape)
            .init::<B>(&base, &Default::default())
            .unwrap();
        let adapted = host(
            base.forward(&tokens(), adapter.hooks(&base).as_ref(), None)
                .unwrap(),
        );
        assert_eq!(
            adapted, reference,
            "{gate_shape:?}: bit-identical to the base model"
        );
    }
}

#[test]
fn prefix_initialised_from_tokens_equals_reading_those_tokens_first() {
    let base = model::<AD>();
    let prefix_ids = vec![1, 403, 407, 261];
    let input = vec![1, 261, 376, 432, 378];
    let adapter = PrefixTuningConfig::new()
        .with_num_virtual_tokens(prefix_ids.len())
        .init_from_tokens(&base, &prefix_ids)
        .unwrap();
    assert!(adapter.embedding.val().is_require_grad(), "prefixes train");
    let adapted = host(
        base.forward(
            &TokenBatch::right_padded(std::slice::from_ref(&input), 0).unwrap(),
            adapter.hooks(&base).as_ref(),
            None,
        )
        .unwrap(),
    );
    let joined: Vec<u32> = prefix_ids.iter().chain(&input).copied().collect();
    let reference = base
        .forward(
            &TokenBatch::right_padded(&[joined], 0).unwrap(),
            &NoHooks,
            None,
        )
        .unwrap()
        .narrow(1, prefix_ids.len(), input.len());
    assert_close(&adapted, &host(reference), 1e-4, 1e-5, "prefix from tokens");
    let wrong = PrefixTuningConfig::new()
        .with_num_virtual_tokens(3)
        .init_from_tokens(&base, &prefix_ids)
        .unwrap_err();
    assert!(wrong.to_string().contains("needs 3 token ids"), "{wrong}");
    let projected = PrefixTuningConfig::new()
        .with_num_virtual_tokens(4)
        .with_prefix_projection(true)
        .init_from_tokens(&base, &prefix_ids)
        .unwrap_err();
    assert!(
        projected.to_string().contains("prefix_projection"),
        "{projected}"
    );
}

#[test]
fn zero_initialised_lora_leaves_base_logits_unchanged() {
    let base = model::<B>();
    let reference = host(base.forward(&tokens(), &NoHooks, None).unwrap());
    let lora = LoraConfig::new()
        .init::<B>(&base, &Default::default())
        .unwrap();
    assert_eq!(
        host(
            base.forward(&tokens(), lora.hooks(&base).as_ref(), None)
                .unwrap()
        ),
        reference
    );
}

struct GradientCheck<'a> {
    grads: &'a <AD as AutodiffBackend>::Gradients,
    with: usize,
    without: usize,
}
impl ModuleVisitor<AD> for GradientCheck<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
        match param.val().grad(self.grads) {
            Some(_) => self.with += 1,
            None => self.without += 1,
        }
    }
}

#[test]
fn only_adapter_params_receive_gradients() {
    let base = model::<AD>();
    for adapter in all_methods::<AD>(&base, true) {
        let logits = base
            .forward(&tokens(), adapter.hooks(&base).as_ref(), None)
            .unwrap();
        let grads = logits.powi_scalar(2).mean().backward();
        let mut on_base = GradientCheck {
            grads: &grads,
            with: 0,
            without: 0,
        };
        base.visit(&mut on_base);
        assert_eq!(
            on_base.with,
            0,
            "{}: base parameters received gradients",
            adapter.method()
        );
        let mut on_adapter = GradientCheck {
            grads: &grads,
            with: 0,
            without: 0,
        };
        match &adapter {
            AnyAdapter::Lora(a) => a.visit(&mut on_adapter),
            AnyAdapter::PrefixTuning(a) => a.visit(&mut on_adapter),
            AnyAdapter::AdaptionPrompt(a) => a.visit(&mut on_adapter),
        }
        assert_eq!(
            on_adapter.without,
            0,
            "{}: an adapter parameter got no gradient",
            adapter.method()
        );
        assert!(on_adapter.with > 0);
    }
}

#[test]
fn kv_cached_generation_equals_recomputation_for_every_method() {
    let base = model::<B>();
    let prompts = vec![vec![1, 403, 407, 261, 378], vec![1, 261]];
    for adapter in all_methods::<B>(&base, true) {
        let hooks = adapter.hooks(&base);
        let config = GenerationConfig {
            max_new_tokens: 8,
            temperature: 0.8,
            seed: 3,
            ..Default::default()
        };
        let cached = peft_llama::generate(&base, hooks.as_ref(), &prompts, &config).unwrap();
        let recomputed = peft_llama::generate(
            &base,
            hooks.as_ref(),
            &prompts,
            &GenerationConfig {
                use_cache: false,
                ..config
            },
        )
        .unwrap();
        assert_eq!(cached, recomputed, "{}", adapter.method());
        // The adapter changes the output (otherwise the comparison proves little).
        let plain = peft_llama::generate(
            &base,
            &NoHooks,
            &prompts,
            &GenerationConfig {
                max_new_tokens: 8,
                temperature: 0.8,
                seed: 3,
                ..Default::default()
            },
        )
        .unwrap();
        assert_ne!(cached, plain, "{} changed nothing", adapter.method());
    }
}

#[test]
fn merge_then_unmerge_roundtrips() {
    let base = model::<B>();
    let reference = host(base.forward(&tokens(), &NoHooks, None).unwrap());
    let lora = LoraConfig::new()
        .with_target_modules(TargetModules::AllLinear)
        .init::<B>(&base, &Default::default())
        .unwrap()
        .map(&mut Randomise(0.1));
    let mut model = PeftModel::new(base);
    model.add_adapter("lora", lora).unwrap();
    let unmerged = host(model.forward(&tokens(), None).unwrap());
    assert!(
        unmerged
            .iter()
            .zip(&reference)
            .any(|(a, b)| (a - b).abs() > 1e-2),
        "the LoRA must change the logits"
    );
    model.merge_active().unwrap();
    assert_close(
        &host(model.forward(&tokens(), None).unwrap()),
        &unmerged,
        1e-4,
        1e-4,
        "merged vs unmerged",
    );
    model.unmerge().unwrap();
    assert_close(
        &host(model.forward(&tokens(), None).unwrap()),
        &unmerged,
        1e-4,
        1e-4,
        "unmerged again",
    );
    model.disable_adapters().unwrap();
    assert_close(
        &host(model.forward(&tokens(), None).unwrap()),
        &reference,
        1e-5,
        1e-5,
        "base restored",
    );
}

#[test]
fn named_adapters_switch_and_a_merged_lora_refuses_to_switch() {
    let base = model::<B>();
    let reference = host(base.forward(&tokens(), &NoHooks, None).unwrap());
    let mut adapters = all_methods::<B>(&base, true).into_iter();
    let (prompt, lora, prefix) = (
        adapters.next().unwrap(),
        adapters.next().unwrap(),
        adapters.next().unwrap(),
    );
    let expected: Vec<Vec<f32>> = [&prompt, &lora, &prefix]
        .iter()
        .map(|a| {
            host(
                base.forward(&tokens(), a.hooks(&base).as_ref(), None)
                    .unwrap(),
            )
        })
        .collect();
    let mut model = PeftModel::new(base);
    model.add_adapter("instructions", prompt).unwrap();
    model.add_adapter("lora", lora).unwrap();
    model.add_adapter("prefix", prefix).unwrap();
    assert_eq!(model.active_adapter(), Some("instructions"));
    for (name, expected) in ["instructions", "lora", "prefix"].iter().zip(&expected) {
        model.set_adapter(name).unwrap();
        assert_eq!(
            &host(model.forward(&tokens(), None).unwrap()),
            expected,
            "{name}"
        );
    }
    model.disable_adapters().unwrap();
    assert_eq!(host(model.forward(&tokens(), None).unwrap()), reference);
    model.enable_adapters();

    assert!(
        matches!(model.merge_active(), Err(PeftError::Unsupported(_))),
        "prefix tuning is not mergeable"
    );
    model.set_adapter("lora").unwrap();
    model.merge_active().unwrap();
    assert!(matches!(model.set_adapter("prefix"), Err(PeftError::Merged(name)) if name == "lora"));
    assert!(matches!(
        model.disable_adapters(),
        Err(PeftError::Merged(_))
    ));
    assert!(matches!(
        model.set_adapter("missing"),
        Err(PeftError::UnknownAdapter { .. })
    ));
    model.unmerge().unwrap();
    model.set_adapter("prefix").unwrap();
}

#[test]
fn paper_parameter_count_for_llama_7b_from_the_config_alone() {
    let llama_7b = LlamaConfig::preset("llama-7b").unwrap();
    // LLaMA-Adapter: K = 10, L = 30, one gate per head: 1,228,800 prompt values + 960 gates.
    assert_eq!(
        AdaptionPromptConfig::new().num_trainable_parameters(&llama_7b.geometry()),
        1_229_760
    );
    // The paper's Alpaca-LoRA comparison: r = 8 on q and v (4.2M).
    assert_eq!(
        LoraConfig::new()
            .num_trainable_parameters(&llama_7b.linear_sites())
            .unwrap(),
        4_194_304
    );
}

#[test]
fn parameter_counts_from_config_equal_allocated_counts() {
    let base = model::<B>();
    for adapter in all_methods::<B>(&base, false) {
        let from_config = match &adapter {
            AnyAdapter::AdaptionPrompt(a) => {
                a.config.num_trainable_parameters(&base.config.geometry())
            }
            AnyAdapter::Lora(a) => a
                .config
                .num_trainable_parameters(&base.config.linear_sites())
                .unwrap(),
            AnyAdapter::PrefixTuning(a) => {
                a.config.num_trainable_parameters(&base.config.geometry())
            }
        };
        assert_eq!(
            from_config,
            adapter.num_trainable_parameters(),
            "{}",
            adapter.method()
        );
    }
    let projected = PrefixTuningConfig::new()
        .with_num_virtual_tokens(3)
        .with_prefix_projection(true)
        .with_encoder_hidden_size(16);
    assert_eq!(
        projected.num_trainable_parameters(&base.config.geometry()),
        projected
            .init::<B>(&base, &Default::default())
            .unwrap()
            .num_params()
    );
}

#[test]
fn adapter_for_another_model_is_refused_naming_the_mismatch() {
    let gqa = LlamaConfig::from_hf_file(fixtures().join("tiny-gqa/model/config.json"))
        .unwrap()
        .init::<B>(&Default::default(), burn::tensor::DType::F32);
    for case in ["lora", "prefix", "adaption_prompt"] {
        let err = load_peft::<B>(
            &fixtures().join("tiny-mha/adapters").join(case),
            &gqa,
            &Default::default(),
        )
        .unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("shape") || message.contains("expected") || message.contains("width"),
            "{case}: {message}"
        );
    }
    let prompt = AdaptionPromptConfig::new().with_adapter_layers(6);
    assert!(prompt
        .init::<B>(&model::<B>(), &Default::default())
        .unwrap_err()
        .to_string()
        .contains("6"));
}

#[test]
fn methods_report_their_peft_type() {
    let base = model::<B>();
    let types: Vec<&str> = all_methods::<B>(&base, false)
        .iter()
        .map(|a| a.method().peft_type())
        .collect();
    assert_eq!(types, ["ADAPTION_PROMPT", "LORA", "PREFIX_TUNING"]);
    assert_eq!(PeftMethod::AdaptionPrompt.to_string(), "adaption-prompt");
}
