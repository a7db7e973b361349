//! Every adapter against its reference (fixtures from `scripts/make_fixtures.py`):
//! Hugging Face `peft` for LoRA, prefix tuning and PEFT's adaption prompt, and a
//! re-implementation of the official LLaMA-Adapter code for per-head tanh gates.
//!
//! Logits: rtol 1e-4 / atol 1e-5 in f32, on every position of a right-padded batch.
//! Gradients of the masked causal-LM loss w.r.t. every adapter tensor: rtol 1e-4 / atol 1e-6,
//! computed on the f64 CPU backend (the fixtures are f64-exact; in f32 the same comparison
//! needs atol 1e-5, see fixtures/README.md).

use crate::common;

use peft_core::Adapter;
use std::path::PathBuf;

use burn::backend::{Autodiff, NdArray};
use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use common::{assert_close, fixtures, inputs, Fixture};
use peft_core::load_peft;
use peft_core::official_format::{load_official, official_tensors};
use peft_core::{gradients_as_module, AnyAdapter, NamedTensor, PrefixProjection, PrefixTuning};
use peft_llama::{Llama, LlamaLoader, TokenBatch};

type B32 = NdArray<f32>;
type B64 = Autodiff<NdArray<f64>>;

const MODELS: [&str; 2] = ["tiny-mha", "tiny-gqa"];

fn case_dir(model: &str, case: &str) -> PathBuf {
    fixtures().join(model).join("adapters").join(case)
}

fn base<B: Backend>(model: &str) -> Llama<B> {
    LlamaLoader::new(fixtures().join(model).join("model"))
        .load::<B>(&Default::default())
        .unwrap()
}

fn load_case<B: Backend>(model: &str, case: &str, base: &Llama<B>) -> AnyAdapter<B> {
    let dir = case_dir(model, case);
    let device = Default::default();
    if case == "official_adapter" {
        AnyAdapter::AdaptionPrompt(
            load_official(&dir.join("adapter.pth"), 4, base, &device).unwrap(),
        )
    } else {
        load_peft(&dir, base, &device).unwrap()
    }
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// Mean cross-entropy of `logits[:, t]` against `ids[:, t+1]` over targets that are real tokens.
fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, tokens: &TokenBatch) -> Tensor<B, 1> {
    let [batch, seq, vocab] = logits.dims();
    let device = logits.device();
    let mut targets = Vec::new();
    let mut weights = Vec::new();
    for row in 0..batch {
        for column in 1..seq {
            targets.push(tokens.ids[row * seq + column] as i64);
            weights.push(if tokens.is_real(row, column) {
                1.0f32
            } else {
                0.0
            });
        }
    }
    let count: f32 = weights.iter().sum();
    let targets =
        Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [batch, seq - 1, 1]), &device);
    let weights = Tensor::<B, 3>::from_data(TensorData::new(weights, [batch, seq - 1, 1]), &device);
    let log_probs = log_softmax(logits.narrow(1, 0, seq - 1), 2);
    debug_assert_eq!(log_probs.dims()[2], vocab);
    (log_probs.gather(2, targets) * weights).sum().neg() / count
}

fn check_logits(model: &str, case: &str, adapter: &AnyAdapter<B32>, base: &Llama<B32>, key: &str) {
    let tokens = inputs(model);
    let logits = host(
        base.forward(&tokens, adapter.hooks(base).as_ref(), None)
            .unwrap(),
    );
    let (expected, _) = Fixture::open(case_dir(model, case).join("expected.safetensors")).f32(key);
    assert_close(
        &logits,
        &expected,
        1e-4,
        1e-5,
        &format!("{model}/{case} {key}"),
    );
}

fn check_gradients(model: &str, case: &str, gradients: Vec<NamedTensor>) {
    let expected = Fixture::open(case_dir(model, case).join("expected.safetensors"));
    let expected_keys: Vec<String> = expected
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("grad.") && !k.starts_with("grad.prompt_encoder"))
        .collect();
    assert_eq!(
        gradients
            .iter()
            .map(|g| format!("grad.{}", g.key))
            .collect::<std::collections::BTreeSet<_>>(),
        expected_keys.iter().cloned().collect(),
        "{model}/{case}: gradient keys"
    );
    for gradient in gradients {
        let (values, shape) = expected.f32(&format!("grad.{}", gradient.key));
        assert_eq!(gradient.shape, shape, "{model}/{case} {}", gradient.key);
        assert_close(
            &gradient.values,
            &values,
            1e-4,
            1e-6,
            &format!("{model}/{case} grad {}", gradient.key),
        );
    }
}

fn gradients_of(model: &str, case: &str) -> Vec<NamedTensor> {
    let base = base::<B64>(model);
    let adapter = load_case(model, case, &base);
    let tokens = inputs(model);
    let loss_and_grads = |adapter: &AnyAdapter<B64>| {
        let logits = base
            .forward(&tokens, adapter.hooks(&base).as_ref(), None)
            .unwrap();
        let loss = causal_lm_loss(logits, &tokens);
        let (expected, _) =
            Fixture::open(case_dir(model, case).join("expected.safetensors")).f32("loss");
        assert_close(
            &host(loss.clone()),
            &expected,
            1e-6,
            1e-7,
            &format!("{model}/{case} loss"),
        );
        loss.backward()
    };
    match &adapter {
        AnyAdapter::Lora(a) => {
            let a = a.clone().train_all();
            let grads = loss_and_grads(&AnyAdapter::Lora(a.clone()));
            AnyAdapter::Lora(gradients_as_module(&a, &grads)).named_tensors()
        }
        AnyAdapter::PrefixTuning(a) => {
            let a = a.clone().train_all();
            let grads = loss_and_grads(&AnyAdapter::PrefixTuning(a.clone()));
            AnyAdapter::PrefixTuning(gradients_as_module(&a, &grads)).named_tensors()
        }
        AnyAdapter::AdaptionPrompt(a) => {
            let a = a.clone().train_all();
            let grads = loss_and_grads(&AnyAdapter::AdaptionPrompt(a.clone()));
            let gradients = gradients_as_module(&a, &grads);
            if case == "official_adapter" {
                official_tensors(&gradients, &base.config.geometry()).unwrap()
            } else {
                AnyAdapter::AdaptionPrompt(gradients).named_tensors()
            }
        }
    }
}

/// Marks every parameter of an adapter as trainable (the base stays frozen).
trait TrainAll {
    fn train_all(self) -> Self;
}

impl<M: burn::module::Module<B64>> TrainAll for M {
    fn train_all(self) -> Self {
        struct RequireGrad;
        impl burn::module::ModuleMapper<B64> for RequireGrad {
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<B64, D>>,
            ) -> Param<Tensor<B64, D>> {
                param.set_require_grad(true)
            }
        }
        self.map(&mut RequireGrad)
    }
}

macro_rules! parity_case {
    ($logits:ident, $grads:ident, $case:literal) => {
        #[test]
        fn $logits() {
            for model in MODELS {
                let base = base::<B32>(model);
                let adapter = load_case(model, $case, &base);
                check_logits(model, $case, &adapter, &base, "logits");
            }
        }

        #[test]
        fn $grads() {
            for model in MODELS {
                check_gradients(model, $case, gradients_of(model, $case));
            }
        }
    };
}

parity_case!(
    lora_q_v_logits_match_peft,
    lora_q_v_gradients_match_peft,
    "lora"
);
parity_case!(
    rslora_all_linear_logits_match_peft,
    rslora_all_linear_gradients_match_peft,
    "lora_all"
);
parity_case!(
    prefix_tuning_logits_match_peft,
    prefix_tuning_gradients_match_peft,
    "prefix"
);
parity_case!(
    saved_projected_prefix_logits_match_peft,
    saved_projected_prefix_gradients_match_peft,
    "prefix_projection"
);
parity_case!(
    peft_adaption_prompt_logits_match_peft,
    peft_adaption_prompt_gradients_match_peft,
    "adaption_prompt"
);
parity_case!(
    official_per_head_tanh_adapter_logits_match_reference,
    official_per_head_tanh_adapter_gradients_match_reference,
    "official_adapter"
);

fn linear_from_torch<B: Backend>(file: &Fixture, prefix: &str) -> Linear<B> {
    let device = Default::default();
    let (weight, shape) = file.f32(&format!("{prefix}.weight"));
    let (bias, _) = file.f32(&format!("{prefix}.bias"));
    let (out, inp) = (shape[0], shape[1]);
    let weight = peft_llama::weights::transpose(&weight, out, inp);
    Linear {
        weight: Param::from_tensor(Tensor::from_data(
            TensorData::new(weight, [inp, out]),
            &device,
        )),
        bias: Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(bias, [out]),
            &device,
        ))),
    }
}

fn projected_prefix<B: Backend>(model: &str, base: &Llama<B>) -> PrefixTuning<B> {
    let AnyAdapter::PrefixTuning(saved) = load_case(model, "prefix_projection", base) else {
        unreachable!()
    };
    let file =
        Fixture::open(case_dir(model, "prefix_projection").join("encoder_params.safetensors"));
    let (embedding, shape) = file.f32("embedding.weight");
    let device = Default::default();
    PrefixTuning {
        embedding: Param::from_tensor(Tensor::from_data(
            TensorData::new(embedding, [shape[0], shape[1]]),
            &device,
        )),
        projection: Some(PrefixProjection {
            first: linear_from_torch(&file, "transform.0"),
            second: linear_from_torch(&file, "transform.2"),
        }),
        config: saved.config.clone().with_prefix_projection(true),
        ..saved
    }
}

#[test]
fn prefix_projection_training_form_matches_peft() {
    for model in MODELS {
        let base = base::<B32>(model);
        let adapter = AnyAdapter::PrefixTuning(projected_prefix(model, &base));
        check_logits(model, "prefix_projection", &adapter, &base, "logits_train");
    }
}

#[test]
fn prefix_projection_mlp_gradients_match_peft() {
    for model in MODELS {
        let base = base::<B64>(model);
        let prefix = projected_prefix(model, &base).train_all();
        let tokens = inputs(model);
        let logits = base
            .forward(
                &tokens,
                peft_core::Adapter::hooks(&prefix, &base).as_ref(),
                None,
            )
            .unwrap();
        let grads = causal_lm_loss(logits, &tokens).backward();
        let g = gradients_as_module(&prefix, &grads);
        let expected =
            Fixture::open(case_dir(model, "prefix_projection").join("expected.safetensors"));
        let projection = g.projection.as_ref().unwrap();
        let torch_weight = |linear: &Linear<<B64 as AutodiffBackend>::InnerBackend>| {
            let [inp, out] = linear.weight.dims();
            peft_llama::weights::transpose(&host(linear.weight.val()), inp, out)
        };
        let pairs = [
            ("embedding.weight", host(g.embedding.val())),
            ("transform.0.weight", torch_weight(&projection.first)),
            (
                "transform.0.bias",
                host(projection.first.bias.as_ref().unwrap().val()),
            ),
            ("transform.2.weight", torch_weight(&projection.second)),
            (
                "transform.2.bias",
                host(projection.second.bias.as_ref().unwrap().val()),
            ),
        ];
        for (name, values) in pairs {
            let (reference, _) = expected.f32(&format!("grad.prompt_encoder.{name}"));
            assert_close(&values, &reference, 1e-4, 1e-6, &format!("{model} {name}"));
        }
    }
}
