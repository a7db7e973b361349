//! Data-parallel training on CPU: k replicas with micro-batches of b examples each must train the
//! same adapter as one replica with micro-batches of k·b (float tolerance), through Burn's
//! collectives; errors on any replica must surface, not hang.
//!
//! The replicas share the one ndarray device, so this checks the sharding, the loss weights, the
//! reduction and the single optimiser step; moving tensors between GPUs is the collective's.
//!
//! Needs the `parallel` feature (the workspace's `cargo test` has it through `peft-cli`).
#![cfg(feature = "parallel")]

use peft_core::Adapter;
use std::path::PathBuf;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::DType;
use peft_core::{AdaptionPromptConfig, AnyAdapter, LoraConfig, PrefixTuningConfig};
use peft_llama::{Llama, LlamaConfig};
use peft_train::{
    train_data_parallel, BatchStrategy, BatchingConfig, Example, Quiet, TrainError, TrainerConfig,
    IGNORE_INDEX,
};

type B = Autodiff<NdArray<f32>>;

fn config() -> LlamaConfig {
    LlamaConfig::new(48, 32, 48, 4, 4, 2, 8)
}

fn base() -> Llama<B> {
    <B as burn::tensor::backend::Backend>::seed(&Default::default(), 7);
    config().init::<B>(&Default::default(), DType::F32)
}

/// 24 examples of 5 to 16 tokens; the first third of each is prompt (masked).
fn examples() -> Vec<Example> {
    (0..24)
        .map(|i| {
            let len = 5 + (i * 7) % 12;
            let ids: Vec<u32> = (0..len)
                .map(|t| ((i * 13 + t * 5) % 45 + 3) as u32)
                .collect();
            let prompt = len / 3;
            let labels = ids
                .iter()
                .enumerate()
                .map(|(t, &id)| if t < prompt { IGNORE_INDEX } else { id as i64 })
                .collect();
            Example::new(ids, labels)
        })
        .collect()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("peft-dp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn adapter(method: &str, base: &Llama<B>) -> AnyAdapter<B> {
    let device = Default::default();
    <B as burn::tensor::backend::Backend>::seed(&device, 11);
    match method {
        "adaption_prompt" => AnyAdapter::AdaptionPrompt(
            AdaptionPromptConfig::new()
                .with_adapter_len(3)
                .with_adapter_layers(2)
                .init(base, &device)
                .unwrap(),
        ),
        "lora" => AnyAdapter::Lora(
            LoraConfig::new()
                .with_r(4)
                .with_lora_dropout(0.0)
                .init(base, &device)
                .unwrap(),
        ),
        "prefix" => AnyAdapter::PrefixTuning(
            PrefixTuningConfig::new()
                .with_num_virtual_tokens(3)
                .init(base, &device)
                .unwrap(),
        ),
        other => panic!("unknown method {other}"),
    }
}

fn trainer(batch_size: usize, devices: usize, strategy: BatchStrategy) -> TrainerConfig {
    TrainerConfig::new()
        .with_epochs(2)
        .with_batch_size(batch_size)
        .with_devices(devices)
        .with_grad_accum(2)
        .with_lr(Some(5e-2))
        .with_warmup_epochs(0.5)
        .with_batching(
            BatchingConfig::new(batch_size)
                .with_max_seq_len(16)
                .with_strategy(strategy),
        )
}

/// Trains with `devices` replicas of micro-batches of `batch_size`; returns the adapter's
/// tensors and the summary's last loss.
fn run(
    method: &str,
    batch_size: usize,
    devices: usize,
    strategy: BatchStrategy,
    name: &str,
) -> (Vec<(String, Vec<f32>)>, f64, usize) {
    let base = base();
    let replicas = (1..devices).map(|_| base.clone()).collect();
    let output = scratch(name);
    let (adapter, summary) = train_data_parallel(
        &base,
        replicas,
        adapter(method, &base),
        &examples(),
        &[],
        &trainer(batch_size, devices, strategy).with_output(Some(output.clone())),
        &mut Quiet,
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(&output);
    let tensors = adapter
        .named_tensors()
        .into_iter()
        .map(|t| (t.key, t.values))
        .collect();
    (tensors, summary.last_loss, summary.steps)
}

fn assert_same(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)], what: &str) {
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f32;
    for ((ka, va), (kb, vb)) in a.iter().zip(b) {
        assert_eq!(ka, kb);
        for (x, y) in va.iter().zip(vb) {
            let error = (x - y).abs() / (1e-5 + 1e-4 * y.abs());
            worst = worst.max(error);
            assert!(
                (x - y).abs() <= 1e-5 + 1e-4 * y.abs(),
                "{what}: {ka}: {x} vs {y}"
            );
        }
    }
    eprintln!("{what}: worst |a-b| / (atol + rtol·|b|) = {worst:.3}");
}

/// The adapter moved away from its initialisation (so agreeing is not trivial).
fn assert_trained(trained: &[(String, Vec<f32>)], method: &str) {
    let initial = adapter(method, &base()).named_tensors();
    let moved = trained
        .iter()
        .zip(&initial)
        .map(|((_, t), i)| {
            t.iter()
                .zip(&i.values)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max)
        })
        .fold(0.0, f32::max);
    assert!(moved > 1e-3, "{method}: the adapter barely moved ({moved})");
}

#[test]
fn replicas_with_batch_b_train_the_adapter_of_one_device_with_batch_kb() {
    let _serial = crate::serial();
    for method in ["adaption_prompt", "lora", "prefix"] {
        let (one, one_loss, one_steps) = run(method, 4, 1, BatchStrategy::LengthGrouped, "one");
        assert_trained(&one, method);
        for devices in [2, 4] {
            let (dp, dp_loss, dp_steps) = run(
                method,
                4 / devices,
                devices,
                BatchStrategy::LengthGrouped,
                "dp",
            );
            assert_eq!(dp_steps, one_steps, "{method}: same number of steps");
            assert!(
                (dp_loss - one_loss).abs() <= 1e-5 * one_loss.abs(),
                "{method} × {devices}: last loss {dp_loss} vs {one_loss}"
            );
            assert_same(&dp, &one, &format!("{method} × {devices} devices"));
        }
    }
}

#[test]
fn uneven_last_micro_batch_and_padding_to_max_length_still_agree() {
    let _serial = crate::serial();
    // 24 examples in micro-batches of 3·3 = 9: the last one has 6, so the third replica's
    // shard is empty there.
    let (one, _, _) = run(
        "adaption_prompt",
        9,
        1,
        BatchStrategy::FixedLength,
        "uneven-one",
    );
    let (dp, _, _) = run(
        "adaption_prompt",
        3,
        3,
        BatchStrategy::FixedLength,
        "uneven-dp",
    );
    assert_same(&dp, &one, "uneven");
}

#[test]
fn a_failing_replica_stops_training_with_its_error() {
    let _serial = crate::serial();
    let base = base();
    // The second replica's model has a smaller vocabulary: its shards' labels are out of range.
    let small = LlamaConfig::new(8, 32, 48, 4, 4, 2, 8).init::<B>(&Default::default(), DType::F32);
    let output = scratch("failing");
    let error = train_data_parallel(
        &base,
        vec![small],
        adapter("adaption_prompt", &base),
        &examples(),
        &[],
        &trainer(2, 2, BatchStrategy::LengthGrouped).with_output(Some(output.clone())),
        &mut Quiet,
    )
    .unwrap_err();
    let _ = std::fs::remove_dir_all(&output);
    let message = error.to_string();
    assert!(
        message.contains("vocabulary") || message.contains("replica"),
        "{message}"
    );
    // The collective is usable again afterwards.
    let (tensors, _, _) = run(
        "adaption_prompt",
        2,
        2,
        BatchStrategy::LengthGrouped,
        "after",
    );
    assert!(!tensors.is_empty());
}

#[test]
fn devices_must_match_the_replicas_given() {
    let _serial = crate::serial();
    let base = base();
    let error = train_data_parallel(
        &base,
        vec![base.clone()],
        adapter("lora", &base),
        &examples(),
        &[],
        &trainer(2, 3, BatchStrategy::LengthGrouped),
        &mut Quiet,
    )
    .unwrap_err();
    assert!(matches!(error, TrainError::Config { .. }), "{error}");
    assert!(error.to_string().contains("3 devices"), "{error}");
}
