//! A quantized frozen base (QLoRA-style): the decoder's projections held in NF4 (double
//! quantization, quantized at load time) or Q8_0, or in a GGUF file's own blocks.
//!
//! - Against transformers + bitsandbytes 0.50.2 (`fixtures/quant/`, f32 compute): the NF4 model's
//!   logits bare and with PEFT's LoRA and adaption prompt, rtol 1e-4 / atol 1e-4.
//! - Against the same model made dense from the dequantized weights: every format (NF4, Q8_0,
//!   every GGUF block type) gives the same logits, rtol 1e-5 / atol 1e-5 (only the order of the
//!   sums differs: the quantized product goes tile by tile).
//! - Merging a LoRA into a quantized base is refused, naming the site and the format, and leaves
//!   the model as it was.

use crate::common::{assert_close, fixtures, inputs, Fixture};

use burn::backend::NdArray;
use burn::tensor::Tensor;
use peft_core::{load_peft, AdaptableModel, Adapter};
use peft_llama::{Llama, LlamaLoader, NoHooks, QuantFormat, Quantization, TokenBatch};

type B = NdArray<f32>;

fn tiny_gqa(quantization: Quantization) -> Llama<B> {
    tiny("tiny-gqa", quantization)
}

fn tiny(name: &str, quantization: Quantization) -> Llama<B> {
    LlamaLoader::new(fixtures().join(name).join("model"))
        .with_quantization(quantization)
        .load::<B>(&Default::default())
        .unwrap()
}

fn host<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn logits(model: &Llama<B>, tokens: &TokenBatch, adapter: Option<&str>) -> Vec<f32> {
    logits_of("tiny-gqa", model, tokens, adapter)
}

fn logits_of(name: &str, model: &Llama<B>, tokens: &TokenBatch, adapter: Option<&str>) -> Vec<f32> {
    match adapter {
        None => host(model.forward(tokens, &NoHooks, None).unwrap()),
        Some(case) => {
            let dir = fixtures().join(name).join("adapters").join(case);
            let adapter = load_peft(&dir, model, &Default::default()).unwrap();
            let hooks = adapter.hooks(model);
            let out = model.forward(tokens, hooks.as_ref(), None).unwrap();
            host(out)
        }
    }
}

#[test]
fn nf4_base_matches_bitsandbytes_bare_and_with_peft_adapters() {
    let model = tiny_gqa(Quantization::To(QuantFormat::Nf4));
    assert_eq!(model.quant_format(), Some(QuantFormat::Nf4));
    let sites = model.linear_sites();
    assert!(sites.iter().all(|s| s.quantized.as_deref() == Some("nf4")));
    let tokens = inputs("tiny-gqa");
    let reference = Fixture::open(fixtures().join("quant").join("tiny-gqa-nf4.safetensors"));
    let dense = logits(&tiny_gqa(Quantization::Dense), &tokens, None);
    for (adapter, key) in [
        (None, "base_logits"),
        (Some("lora"), "lora_logits"),
        (Some("adaption_prompt"), "adaption_prompt_logits"),
    ] {
        let got = logits(&model, &tokens, adapter);
        let (want, _) = reference.f32(key);
        assert_close(&got, &want, 1e-4, 1e-4, &format!("nf4 {key}"));
        if adapter.is_none() {
            // The reference really is quantized: it differs from the dense model.
            let moved = dense
                .iter()
                .zip(&want)
                .map(|(d, w)| (d - w).abs())
                .fold(0f32, f32::max);
            assert!(moved > 1e-3, "NF4 moved the logits by only {moved}");
        }
    }
}

#[test]
fn every_format_computes_what_its_dequantized_dense_twin_computes() {
    // tiny-gqa's 48- and 80-wide rows take NF4 (blocks over the flattened matrix); Q8_0 needs
    // rows of whole 32-value blocks: tiny-mha (32 and 64 wide).
    for (name, format) in [
        ("tiny-gqa", QuantFormat::Nf4),
        ("tiny-mha", QuantFormat::Nf4),
        ("tiny-mha", QuantFormat::Ggml(peft_io::gguf::GgmlType::Q8_0)),
    ] {
        let tokens = inputs(name);
        let model = tiny(name, Quantization::To(format));
        let twin = model.clone().dequantize();
        assert_eq!(twin.quant_format(), None);
        for adapter in [None, Some("lora"), Some("adaption_prompt"), Some("prefix")] {
            let got = logits_of(name, &model, &tokens, adapter);
            let want = logits_of(name, &twin, &tokens, adapter);
            let what = format!("{name} {} {adapter:?}", format.name());
            assert_close(&got, &want, 1e-5, 1e-5, &what);
        }
        // 4.13 bits per weight for NF4, 8.5 for Q8_0, against 32 for the f32 model.
        let ratio = twin.projection_bytes() as f64 / model.projection_bytes() as f64;
        let expected = if format == QuantFormat::Nf4 { 7.5 } else { 3.7 };
        assert!(
            ratio > expected,
            "{name} {}: {ratio:.2}× smaller",
            format.name()
        );
    }
}

#[test]
fn gguf_blocks_kept_as_they_are_compute_what_the_dequantized_file_computes() {
    let path = fixtures().join("gguf").join("tiny-bpe.gguf");
    let dense = LlamaLoader::new(&path)
        .load::<B>(&Default::default())
        .unwrap();
    let kept = LlamaLoader::new(&path)
        .with_quantization(Quantization::KeepGguf)
        .load::<B>(&Default::default())
        .unwrap();
    // Every block type of the file (Q4_K with the query rows permuted, Q5_K keys, Q6_K, Q8_0,
    // Q4_0, Q4_1) stays in its blocks.
    let formats: Vec<String> = kept
        .projections()
        .map(|p| p.quant_format().map(QuantFormat::name).unwrap_or_default())
        .collect();
    for name in ["q4_k", "q5_k", "q6_k", "q8_0", "q4_0", "q4_1"] {
        assert!(
            formats.iter().any(|f| f == name),
            "{name} not kept: {formats:?}"
        );
    }
    let tokens = TokenBatch {
        ids: (0..24).map(|i| (i * 7 % 256) as u32).collect(),
        batch: 2,
        seq: 12,
        mask: None,
    };
    let want = host(dense.forward(&tokens, &NoHooks, None).unwrap());
    let got = host(kept.forward(&tokens, &NoHooks, None).unwrap());
    assert_close(&got, &want, 1e-5, 1e-5, "GGUF blocks kept");
    // With `To(nf4)` the file's blocks are kept too, never quantized a second time.
    let nf4 = LlamaLoader::new(&path)
        .with_quantization(Quantization::To(QuantFormat::Nf4))
        .load::<B>(&Default::default())
        .unwrap();
    assert_eq!(host(nf4.forward(&tokens, &NoHooks, None).unwrap()), got);
}

#[test]
fn merging_a_lora_into_a_quantized_base_is_refused_and_changes_nothing() {
    let mut model = tiny_gqa(Quantization::To(QuantFormat::Nf4));
    let dir = fixtures().join("tiny-gqa").join("adapters").join("lora");
    let adapter = load_peft(&dir, &model, &Default::default()).unwrap();
    let tokens = inputs("tiny-gqa");
    let before = host(model.forward(&tokens, &NoHooks, None).unwrap());
    let err = adapter.merge_into(&mut model).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.0.self_attn.q_proj") && err.contains("held quantized (nf4)"),
        "{err}"
    );
    assert!(err.contains("dense checkpoint"), "{err}");
    assert_eq!(
        host(model.forward(&tokens, &NoHooks, None).unwrap()),
        before
    );
    // Its dense twin takes the merge.
    let mut twin = model.dequantize();
    adapter.merge_into(&mut twin).unwrap();
}

#[test]
fn formats_that_cannot_hold_a_weight_are_refused_by_name() {
    let err = "q4_k".parse::<Quantization>().unwrap_err();
    assert!(err.contains("nf4, q8_0, gguf"), "{err}");
    // tiny-gqa's rows are 48 wide: not whole Q8_0 blocks of 32.
    let err = LlamaLoader::new(fixtures().join("tiny-gqa").join("model"))
        .with_quantization(Quantization::To(QuantFormat::Ggml(
            peft_io::gguf::GgmlType::Q8_0,
        )))
        .load::<B>(&Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.weight") && err.contains("blocks of 32"),
        "{err}"
    );
    assert!(
        !err.contains("quantization: quantization"),
        "one prefix: {err}"
    );
    let model = tiny_gqa(Quantization::Dense);
    let err = model
        .quantize(QuantFormat::Ggml(peft_io::gguf::GgmlType::Q8_0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("blocks of 32") && err.contains("48"), "{err}");
    // Keeping GGUF blocks asks for a GGUF file.
    let err = LlamaLoader::new(fixtures().join("tiny-gqa").join("model"))
        .with_quantization(Quantization::KeepGguf)
        .load::<B>(&Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs a .gguf file"), "{err}");
}

/// `LlamaConfig::init_quantized` (projections quantized as they are drawn, for 7B-shaped
/// benchmarks that do not fit dense) is the dense random model quantized afterwards.
#[test]
fn a_random_model_quantized_while_drawn_is_the_dense_one_quantized_after() {
    use burn::tensor::backend::Backend;
    let config = peft_llama::LlamaConfig::new(40, 64, 96, 2, 4, 2, 8);
    let device = Default::default();
    let tokens = TokenBatch::from_rows(&[vec![1, 5, 9, 33, 7]]).unwrap();
    for format in [
        QuantFormat::Nf4,
        QuantFormat::Ggml(peft_io::gguf::GgmlType::Q8_0),
    ] {
        // The backend's generator is one per process and other tests of this binary draw from it
        // on other threads: a draw between the two seeds would make the models differ. A real
        // difference fails every attempt; a race, rare already, not three in a row.
        let logits = || {
            B::seed(&device, 9);
            let drawn = config
                .init_quantized::<B>(&device, burn::tensor::DType::F32, format)
                .unwrap();
            B::seed(&device, 9);
            let after = config
                .init::<B>(&device, burn::tensor::DType::F32)
                .quantize(format)
                .unwrap();
            assert_eq!(drawn.quant_format(), Some(format));
            assert_eq!(drawn.projection_bytes(), after.projection_bytes());
            (
                host(drawn.forward(&tokens, &NoHooks, None).unwrap()),
                host(after.forward(&tokens, &NoHooks, None).unwrap()),
            )
        };
        let (drawn, after) = (0..3)
            .map(|_| logits())
            .find(|(drawn, after)| drawn == after)
            .unwrap_or_else(logits);
        assert_eq!(drawn, after, "{format:?}");
    }
    // Widths a format cannot hold are an error, not a panic.
    let narrow = peft_llama::LlamaConfig::new(40, 48, 96, 2, 4, 2, 8);
    let err = narrow
        .init_quantized::<B>(
            &device,
            burn::tensor::DType::F32,
            QuantFormat::Ggml(peft_io::gguf::GgmlType::Q8_0),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("blocks of 32"), "{err}");
}
