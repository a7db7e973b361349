//! Adaption prompts, LoRA (q, v) and prefix tuning on one small LLaMA and one batch: forward
//! pass, training step (forward, backward and AdamW), generation per token with the KV cache,
//! and LoRA merged into the weights versus applied as a side branch. The base model without
//! an adapter is measured in the same run as the baseline. Throughput is reported in tokens/s
//! (criterion's elements/s).
//!
//! ```sh
//! cargo bench -p peft-benches                     # CPU (ndarray), f32
//! cargo bench -p peft-benches --features cuda     # the same benches on CUDA
//! ```
//!
//! The model has stories260k's shape (hidden 64, 5 layers, 8 query and 4 key/value heads,
//! vocabulary 512) with random weights, so the benches need no files and finish in CI time.
//! Every measurement synchronises the device before reading the clock, so asynchronous
//! backends are timed to the end of their work.

use std::hint::black_box;
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion};
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use peft_core::{Adapter, AdaptionPromptConfig, LoraConfig, PrefixTuningConfig};
use peft_llama::{KvCache, LayerHooks, Llama, LlamaConfig, NoHooks, TokenBatch};
use peft_train::{causal_lm_loss, AdamWConfig};

/// The backend under test: CPU by default, CUDA with the `cuda` feature.
#[cfg(feature = "cuda")]
type Inner = burn::backend::Cuda<f32>;
/// The backend under test: CPU by default, CUDA with the `cuda` feature.
#[cfg(not(feature = "cuda"))]
type Inner = burn::backend::NdArray<f32>;
/// [`Inner`] with automatic differentiation, for the training step.
type Train = Autodiff<Inner>;

/// Sequences per batch of the forward pass and the training step.
const BATCH: usize = 4;
/// Tokens per sequence of the forward pass and the training step.
const SEQ: usize = 128;
/// Prompt length before generation.
const PROMPT: usize = 32;
/// Tokens generated per timed generation.
const NEW_TOKENS: usize = 16;

fn model_config() -> LlamaConfig {
    LlamaConfig::new(512, 64, 172, 5, 8, 4, 8).with_tie_word_embeddings(true)
}

fn adaption_prompt() -> AdaptionPromptConfig {
    // The paper's K = 10, in all but the bottom two layers.
    AdaptionPromptConfig::new().with_adapter_layers(model_config().num_hidden_layers - 2)
}

fn lora() -> LoraConfig {
    LoraConfig::new().with_lora_alpha(16.0)
}

fn prefix() -> PrefixTuningConfig {
    PrefixTuningConfig::new().with_num_virtual_tokens(10)
}

/// Deterministic token ids `[batch, seq]` spread over the vocabulary (never the specials).
fn token_batch(batch: usize, seq: usize, vocab: usize) -> TokenBatch {
    let ids = (0..batch * seq)
        .map(|i| (i * 7919 % (vocab - 3) + 3) as u32)
        .collect();
    TokenBatch {
        ids,
        batch,
        seq,
        mask: None,
    }
}

fn sync<B: Backend>(device: &B::Device) {
    B::sync(device).expect("the device synchronises");
}

/// Times `iters` calls of `work`, from a synchronised device to a synchronised device.
fn timed<B: Backend>(device: &B::Device, iters: u64, mut work: impl FnMut()) -> Duration {
    sync::<B>(device);
    let started = Instant::now();
    for _ in 0..iters {
        work();
    }
    sync::<B>(device);
    started.elapsed()
}

// Clippy would elide `'a`, but the hooks' return type needs it named (E0106 without it).
#[allow(clippy::needless_lifetimes)]
fn bench_forward<'a>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    base: &'a Llama<Inner>,
    hooks: impl Fn() -> Box<dyn LayerHooks<Inner> + 'a>,
    tokens: &TokenBatch,
) {
    let device = base.device();
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            timed::<Inner>(&device, iters, || {
                // Binding the adapter is part of every pass (adaption prompts project their
                // keys and values here).
                let hooks = hooks();
                black_box(base.forward(tokens, hooks.as_ref(), None).expect("forward"));
            })
        })
    });
}

fn bench_train_step<A>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    base: &Llama<Train>,
    adapter: A,
    tokens: &TokenBatch,
) where
    A: Adapter<Train> + AutodiffModule<Train> + Clone,
{
    let device = base.device();
    let labels: Vec<i64> = tokens.ids.iter().map(|&id| i64::from(id)).collect();
    let mut optimizer = AdamWConfig::llama_adapter()
        .init::<Train>()
        .expect("valid optimiser settings");
    let mut state = Some(adapter);
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut adapter = state
                .take()
                .expect("the adapter is put back after each run");
            let elapsed = timed::<Train>(&device, iters, || {
                let logits = base
                    .forward(tokens, adapter.hooks(base).as_ref(), None)
                    .expect("forward");
                let loss = causal_lm_loss(logits, &labels).expect("loss");
                let grads = GradientsParams::from_grads(loss.loss.backward(), &adapter);
                let (updated, _) = optimizer.step(1e-3, adapter.clone(), grads);
                adapter = updated;
            });
            state = Some(adapter);
            elapsed
        })
    });
}

/// The id of the most likely next token after the last position of `tokens`.
fn greedy_next(
    base: &Llama<Inner>,
    tokens: &TokenBatch,
    hooks: &dyn LayerHooks<Inner>,
    cache: &mut KvCache<Inner>,
) -> u32 {
    let logits = base.forward(tokens, hooks, Some(cache)).expect("forward");
    let last = tokens.seq - 1;
    // Reading the id back is the synchronisation a sampler has on every token too.
    let id: i64 = logits
        .narrow(1, last, 1)
        .argmax(2)
        .reshape([1])
        .into_scalar()
        .elem();
    id as u32
}

fn bench_decode(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    base: &Llama<Inner>,
    hooks: &dyn LayerHooks<Inner>,
) {
    let device = base.device();
    let prompt = token_batch(1, PROMPT, base.config.vocab_size);
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // The prompt fills the cache untimed; then NEW_TOKENS single-token steps.
                let mut cache = KvCache::new(base.config.num_hidden_layers, 1);
                let mut next = greedy_next(base, &prompt, hooks, &mut cache);
                total += timed::<Inner>(&device, 1, || {
                    for _ in 0..NEW_TOKENS {
                        let step = TokenBatch {
                            ids: vec![next],
                            batch: 1,
                            seq: 1,
                            mask: None,
                        };
                        next = greedy_next(base, &step, hooks, &mut cache);
                    }
                });
            }
            total
        })
    });
}

fn peft_methods(c: &mut Criterion) {
    let device = Default::default();
    Inner::seed(&device, 0);
    let config = model_config();
    let tokens = token_batch(BATCH, SEQ, config.vocab_size);

    let base = config.init::<Inner>(&device, DType::F32);
    let prompt = adaption_prompt()
        .init::<Inner>(&base, &device)
        .expect("adaption prompts fit");
    let lora_adapter = lora().init::<Inner>(&base, &device).expect("LoRA fits");
    let prefix_adapter = prefix()
        .init::<Inner>(&base, &device)
        .expect("prefix tuning fits");
    let mut merged = base.clone();
    lora_adapter
        .merge_into(&mut merged)
        .expect("LoRA merges into its base");

    let mut group = c.benchmark_group("forward");
    group.throughput(Throughput::Elements((BATCH * SEQ) as u64));
    bench_forward(&mut group, "base", &base, || Box::new(NoHooks), &tokens);
    bench_forward(
        &mut group,
        "adaption_prompt",
        &base,
        || prompt.hooks(&base),
        &tokens,
    );
    bench_forward(
        &mut group,
        "lora_unmerged",
        &base,
        || lora_adapter.hooks(&base),
        &tokens,
    );
    bench_forward(
        &mut group,
        "lora_merged",
        &merged,
        || Box::new(NoHooks),
        &tokens,
    );
    bench_forward(
        &mut group,
        "prefix",
        &base,
        || prefix_adapter.hooks(&base),
        &tokens,
    );
    group.finish();

    let mut group = c.benchmark_group("decode_per_token");
    group.throughput(Throughput::Elements(NEW_TOKENS as u64));
    bench_decode(&mut group, "base", &base, &NoHooks);
    bench_decode(
        &mut group,
        "adaption_prompt",
        &base,
        prompt.hooks(&base).as_ref(),
    );
    bench_decode(
        &mut group,
        "lora_unmerged",
        &base,
        lora_adapter.hooks(&base).as_ref(),
    );
    bench_decode(&mut group, "lora_merged", &merged, &NoHooks);
    bench_decode(
        &mut group,
        "prefix",
        &base,
        prefix_adapter.hooks(&base).as_ref(),
    );
    group.finish();

    let train_device = Default::default();
    Train::seed(&train_device, 0);
    let train_base = config.init::<Train>(&train_device, DType::F32);
    let mut group = c.benchmark_group("train_step");
    group.throughput(Throughput::Elements((BATCH * SEQ) as u64));
    let train_prompt = adaption_prompt()
        .init::<Train>(&train_base, &train_device)
        .expect("adaption prompts fit");
    bench_train_step(
        &mut group,
        "adaption_prompt",
        &train_base,
        train_prompt,
        &tokens,
    );
    let train_lora = lora()
        .init::<Train>(&train_base, &train_device)
        .expect("LoRA fits");
    bench_train_step(&mut group, "lora", &train_base, train_lora, &tokens);
    let train_prefix = prefix()
        .init::<Train>(&train_base, &train_device)
        .expect("prefix tuning fits");
    bench_train_step(&mut group, "prefix", &train_base, train_prefix, &tokens);
    group.finish();
}

criterion_group! {
    name = benches;
    // CI-sized: ten samples of about three seconds per bench.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = peft_methods
}
criterion_main!(benches);
