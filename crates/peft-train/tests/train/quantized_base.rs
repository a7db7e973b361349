//! Training over a quantized frozen base (QLoRA): an adapter trained over an NF4 base is the
//! adapter trained over that base's dequantized dense copy, for every method. The quantized
//! product never forms the dense weight, so this checks that its forward and its input
//! gradient feed the optimiser what the dense computation does, step after step.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::DType;
use peft_core::{Adapter, AdaptionPromptConfig, AnyAdapter, LoraConfig, PrefixTuningConfig};
use peft_llama::{Llama, LlamaConfig, QuantFormat};
use peft_train::{train, BatchingConfig, Example, Quiet, TrainerConfig, IGNORE_INDEX};

type B = Autodiff<NdArray<f32>>;

/// 48 wide, 4 query and 2 key/value heads, 2 layers: NF4 blocks of 64 run across rows.
fn dense_base() -> Llama<B> {
    <B as burn::tensor::backend::Backend>::seed(&Default::default(), 3);
    LlamaConfig::new(48, 32, 48, 4, 4, 2, 8).init::<B>(&Default::default(), DType::F32)
}

/// 16 examples of 6 to 15 tokens; the first third of each is prompt (masked).
fn examples() -> Vec<Example> {
    (0..16)
        .map(|i| {
            let len = 6 + (i * 5) % 10;
            let ids: Vec<u32> = (0..len)
                .map(|t| ((i * 11 + t * 7) % 45 + 3) as u32)
                .collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(t, &id)| if t < len / 3 { IGNORE_INDEX } else { id as i64 })
                .collect();
            Example::new(ids, labels)
        })
        .collect()
}

fn adapter(method: &str, base: &Llama<B>) -> AnyAdapter<B> {
    let device = Default::default();
    <B as burn::tensor::backend::Backend>::seed(&device, 17);
    match method {
        "adaption_prompt" => AdaptionPromptConfig::new()
            .with_adapter_len(3)
            .with_adapter_layers(2)
            .init(base, &device)
            .unwrap()
            .into(),
        "lora" => LoraConfig::new()
            .with_r(4)
            .with_lora_dropout(0.0)
            .init(base, &device)
            .unwrap()
            .into(),
        "prefix" => PrefixTuningConfig::new()
            .with_num_virtual_tokens(3)
            .init(base, &device)
            .unwrap()
            .into(),
        other => panic!("unknown method {other}"),
    }
}

/// Two epochs of four optimiser steps; returns the trained tensors and the last loss.
fn trained(method: &str, base: &Llama<B>) -> (Vec<(String, Vec<f32>)>, f64) {
    let config = TrainerConfig::new()
        .with_epochs(2)
        .with_batch_size(2)
        .with_grad_accum(2)
        .with_lr(Some(5e-2))
        .with_warmup_epochs(0.5)
        .with_batching(BatchingConfig::new(2).with_max_seq_len(16));
    let (adapter, summary) = train(
        base,
        adapter(method, base),
        &examples(),
        &[],
        &config,
        &mut Quiet,
    )
    .unwrap();
    let tensors = adapter
        .named_tensors()
        .into_iter()
        .map(|t| (t.key, t.values))
        .collect();
    (tensors, summary.last_loss)
}

fn largest_difference(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|((ka, va), (kb, vb))| {
            assert_eq!(ka, kb);
            va.iter().zip(vb).map(|(x, y)| (x - y).abs())
        })
        .fold(0.0, f32::max)
}

#[test]
fn an_adapter_trained_over_an_nf4_base_is_the_one_trained_over_its_dense_twin() {
    let _serial = crate::serial();
    let nf4 = dense_base().quantize(QuantFormat::Nf4).unwrap();
    assert_eq!(nf4.quant_format(), Some(QuantFormat::Nf4));
    let twin = nf4.clone().dequantize();
    assert_eq!(twin.quant_format(), None);
    // 4-bit storage: a seventh of the f32 projections (codes, absmax codes, second-level scales).
    assert!(
        nf4.projection_bytes() * 6 < twin.projection_bytes(),
        "{} vs {}",
        nf4.projection_bytes(),
        twin.projection_bytes()
    );
    for method in ["lora", "adaption_prompt", "prefix"] {
        let (over_nf4, loss_nf4) = trained(method, &nf4);
        let (over_twin, loss_twin) = trained(method, &twin);
        let (over_original, _) = trained(method, &dense_base());
        let initial: Vec<(String, Vec<f32>)> = adapter(method, &twin)
            .named_tensors()
            .into_iter()
            .map(|t| (t.key, t.values))
            .collect();
        let moved = largest_difference(&over_nf4, &initial);
        let apart = largest_difference(&over_nf4, &over_twin);
        let from_original = largest_difference(&over_nf4, &over_original);
        eprintln!(
            "{method}: moved {moved:.3e}, NF4 vs dense twin {apart:.3e}, vs the unquantized \
             base {from_original:.3e}; last loss {loss_nf4:.6} vs {loss_twin:.6}"
        );
        assert!(moved > 1e-2, "{method}: the adapter barely moved ({moved})");
        // Bit for bit when written (the tiles span whole rows, so each dot product sums in the
        // dense order); the bound leaves room for a backend that reorders a sum.
        assert!(
            apart <= 1e-4 * moved.max(1.0),
            "{method}: {apart} apart after moving {moved}"
        );
        assert!(
            (loss_nf4 - loss_twin).abs() < 1e-5,
            "{loss_nf4} vs {loss_twin}"
        );
        // The comparison has power: the unquantized base trains a visibly different adapter.
        assert!(
            from_original > 100.0 * apart,
            "{method}: NF4 rounding changed the adapter by only {from_original}"
        );
    }
}
