//! Training-step benchmark on a LLaMA of a given preset shape with random weights:
//! LLaMA-Adapter (K=10, L=30 or all but two layers), LoRA r=8 on q,v, and prefix tuning.
//!
//! ```sh
//! cargo run --release -p peft-cli --example train_bench -- llama-7b bf16 4 512 10
//! cargo run --release -p peft-cli --no-default-features --features cuda --example train_bench -- llama-7b bf16 4 512 10
//! ```
//! Arguments: preset (or `tiny` for a stories260k-sized model), dtype (f32, f16, bf16), batch,
//! sequence length, timed steps. Prints one JSON line per method.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::DType;
use peft_core::{Adapter, AdaptionPromptConfig, LoraConfig, PrefixTuningConfig};
use peft_llama::{Llama, LlamaConfig, TokenBatch};
use peft_train::{causal_lm_loss, AdamWConfig};

#[cfg(feature = "cuda")]
type Inner = burn::backend::Cuda<f32>;
#[cfg(not(feature = "cuda"))]
type Inner = burn::backend::NdArray<f32>;
type B = Autodiff<Inner>;

fn bench<A>(
    name: &str,
    base: &Llama<B>,
    adapter: A,
    tokens: &TokenBatch,
    labels: &[i64],
    steps: usize,
) where
    A: Adapter<B> + AutodiffModule<B> + Clone,
{
    let device = base.device();
    let mut optimizer = AdamWConfig::llama_adapter().init::<B>().unwrap();
    let mut adapter = adapter;
    let trainable = adapter.num_trainable_parameters();
    let mut step = |adapter: A| {
        let logits = base
            .forward(tokens, adapter.hooks(base).as_ref(), None)
            .unwrap();
        let loss = causal_lm_loss(logits, labels).unwrap();
        let grads = GradientsParams::from_grads(loss.loss.backward(), &adapter);
        let (adapter, _) = optimizer.step(1e-3, adapter, grads);
        <B as Backend>::sync(&device).unwrap();
        adapter
    };
    // Warm-up: kernel compilation and autotuning.
    adapter = step(adapter);
    adapter = step(adapter);
    let started = Instant::now();
    for _ in 0..steps {
        adapter = step(adapter);
    }
    let seconds = started.elapsed().as_secs_f64() / steps as f64;
    let count = (tokens.batch * tokens.seq) as f64;
    println!(
        "{}",
        serde_json::json!({
            "method": name, "trainable": trainable, "batch": tokens.batch, "seq": tokens.seq,
            "ms_per_step": seconds * 1e3, "tokens_per_second": count / seconds,
        })
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).map_or("tiny", String::as_str);
    let dtype = match args.get(2).map_or("f32", String::as_str) {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    let batch: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(4);
    let seq: usize = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(512);
    let steps: usize = args.get(5).and_then(|a| a.parse().ok()).unwrap_or(5);
    let config = if preset == "tiny" {
        LlamaConfig::new(512, 64, 172, 5, 8, 4, 8).with_tie_word_embeddings(true)
    } else {
        LlamaConfig::preset(preset).expect("known preset")
    };
    let device = Default::default();
    let base = config.init::<B>(&device, dtype);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| (i * 7919 % (config.vocab_size - 3) + 3) as u32)
        .collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let tokens = TokenBatch {
        ids,
        batch,
        seq,
        mask: None,
    };
    let layers = 30.min(config.num_hidden_layers.saturating_sub(2)).max(1);
    let prompt = AdaptionPromptConfig::new()
        .with_adapter_layers(layers)
        .init::<B>(&config, &device)
        .unwrap();
    bench("adaption-prompt", &base, prompt, &tokens, &labels, steps);
    let lora = LoraConfig::new().init::<B>(&config, &device).unwrap();
    bench("lora-q-v-r8", &base, lora, &tokens, &labels, steps);
    let prefix = PrefixTuningConfig::new()
        .with_num_virtual_tokens(10)
        .init::<B>(&config, &device)
        .unwrap();
    bench("prefix-10", &base, prefix, &tokens, &labels, steps);
    let _ = <B as AutodiffBackend>::InnerBackend::name(&device);
}
