//! Speed benchmark on a LLaMA of a given preset shape with random weights: training steps of
//! LLaMA-Adapter (K=10, L=30 or all but two layers), LoRA r=8 on q,v and prefix tuning (10
//! virtual tokens); a forward pass without gradients; and KV-cached greedy decoding at batch 1.
//!
//! ```sh
//! cargo run --release -p peft-benches --example train_bench -- train adaption-prompt --preset tiny
//! cargo build --release -p peft-benches --features cuda --example train_bench
//! train_bench train adaption-prompt --preset llama-7b --dtype bf16 --batch 4 --seq 512 --steps 10
//! train_bench decode --preset llama-7b --dtype bf16 --new-tokens 128
//! train_bench train adaption-prompt --preset llama-7b --dtype bf16 --devices 4
//! ```
//! With `--devices N` training is data-parallel over devices 0..N (CUDA; on the CPU build N
//! replicas share the CPU): each replica runs `--batch` rows, the adapter's gradients are
//! summed onto device 0 through Burn's collectives (`peft_train::DataParallel`), and the line
//! also reports the time of one gradient reduction with every replica idle.
//! Prints one JSON line per measurement. Each measurement runs a few untimed warm-up steps first
//! (kernel compilation and autotuning on CUDA) and synchronises the device before stopping the
//! clock. Run one measurement per process when peak memory is sampled from outside (the backend
//! keeps its memory pool for the life of the process).

use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::DType;
use clap::{Parser, Subcommand, ValueEnum};
use peft_core::{Adapter, AdaptionPromptConfig, LoraConfig, PrefixTuningConfig};
use peft_llama::{generate, GenerationConfig, Llama, LlamaConfig, Quantization, TokenBatch};
use peft_train::{causal_lm_loss, AdamWConfig, Batch, DataParallel};

#[cfg(feature = "cuda")]
type Inner = burn::backend::Cuda<f32>;
#[cfg(not(feature = "cuda"))]
type Inner = burn::backend::NdArray<f32>;
type B = Autodiff<Inner>;

#[derive(Parser, Debug)]
struct Args {
    #[command(subcommand)]
    what: What,
    /// A `LlamaConfig` preset (`llama-7b`, ...) or `tiny` (a stories260k-sized model).
    #[arg(long, global = true, default_value = "tiny")]
    preset: String,
    /// Storage type of the frozen base weights.
    #[arg(long, global = true, value_enum, default_value = "f32")]
    dtype: Precision,
    /// Rows per batch (training and forward).
    #[arg(long, global = true, default_value_t = 4)]
    batch: usize,
    /// Tokens per row (training and forward).
    #[arg(long, global = true, default_value_t = 512)]
    seq: usize,
    /// Timed steps.
    #[arg(long, global = true, default_value_t = 10)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, global = true, default_value_t = 3)]
    warmup: usize,
    /// Devices for data-parallel training (replicas on devices 0..N).
    #[arg(long, global = true, default_value_t = 1)]
    devices: usize,
    /// Hold the decoder projections quantized (`nf4`, `q8_0`; QLoRA's frozen base), each
    /// quantized as it is created so no dense copy of the model ever exists.
    #[arg(long, global = true, default_value = "none")]
    quantize: Quantization,
    /// Keep only this many decoder layers of the preset (a shallower model of the same width,
    /// e.g. to fit a dense baseline in memory).
    #[arg(long, global = true)]
    layers: Option<usize>,
}

/// The frozen base the flags describe: random weights, dense or quantized layer by layer.
fn base_model<Bk: Backend>(args: &Args, config: &LlamaConfig, device: &Bk::Device) -> Llama<Bk> {
    match args.quantize {
        Quantization::To(format) => config
            .init_quantized::<Bk>(device, args.dtype.dtype(), format)
            .expect("the preset's widths suit the format"),
        Quantization::Dense => config.init::<Bk>(device, args.dtype.dtype()),
        Quantization::KeepGguf => panic!("--quantize gguf needs a GGUF file; use nf4 or q8_0"),
    }
}

/// The process's peak resident memory in bytes (Linux `VmHWM`), if the system reports it.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The peak resident memory of building the model (its transient copies included), read once
/// the model is built; the peak is then reset (Linux `clear_refs` 5) so that the reported
/// `peak_rss_bytes` is that of the measured work with the model in memory.
static LOAD_PEAK_RSS: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();

fn start_measuring_peak() {
    LOAD_PEAK_RSS.get_or_init(peak_rss_bytes);
    // Best effort: without it the peak includes the build's transient copies.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[derive(Subcommand, Debug)]
enum What {
    /// Training steps (forward, backward, AdamW on the adapter).
    Train {
        #[arg(value_enum)]
        method: Method,
    },
    /// Forward passes without gradients (base model with zero-gate adaption prompts).
    Forward,
    /// Greedy decoding at batch 1 with the KV cache (zero-gate adaption prompts).
    Decode {
        /// Prompt length.
        #[arg(long, default_value_t = 32)]
        prompt_tokens: usize,
        /// Tokens generated.
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Method {
    AdaptionPrompt,
    Lora,
    Prefix,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

fn token_batch(config: &LlamaConfig, batch: usize, seq: usize) -> (TokenBatch, Vec<i64>) {
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| (i * 7919 % (config.vocab_size - 3) + 3) as u32)
        .collect();
    let labels = ids.iter().map(|&i| i as i64).collect();
    (
        TokenBatch {
            ids,
            batch,
            seq,
            mask: None,
        },
        labels,
    )
}

fn adapted_layers(config: &LlamaConfig) -> usize {
    30.min(config.num_hidden_layers.saturating_sub(2)).max(1)
}

/// Times `steps` calls of `step` after `warmup` untimed ones; seconds per call.
fn time<S>(mut state: S, warmup: usize, steps: usize, mut step: impl FnMut(S) -> S) -> f64 {
    for _ in 0..warmup {
        state = step(state);
    }
    let started = Instant::now();
    for _ in 0..steps {
        state = step(state);
    }
    drop(state);
    started.elapsed().as_secs_f64() / steps.max(1) as f64
}

fn train<A>(args: &Args, name: &str, base: &Llama<B>, adapter: A)
where
    A: Adapter<B> + AutodiffModule<B> + Clone + Send + 'static,
{
    if args.devices > 1 {
        return train_parallel(args, name, base, adapter);
    }
    let device = base.device();
    let (tokens, labels) = token_batch(&base.config, args.batch, args.seq);
    let mut optimizer = AdamWConfig::llama_adapter()
        .init::<B>()
        .expect("valid optimiser settings");
    let trainable = adapter.num_trainable_parameters();
    let mut last_loss = f32::NAN;
    // Host time of each phase of each step: when the calling thread returns from it. The
    // backend queues device work, so all but `wait` are the host's own (plus any wait for the
    // device inside them); `wait` is the loss read and the device sync that end the step.
    let mut phases: Vec<[f64; 5]> = Vec::new();
    let seconds = time(adapter, args.warmup, args.steps, |adapter: A| {
        let mut clock = Instant::now();
        let mut lap = || {
            let elapsed = clock.elapsed().as_secs_f64();
            clock = Instant::now();
            elapsed
        };
        let logits = base
            .forward(&tokens, adapter.hooks(base).as_ref(), None)
            .expect("valid batch");
        let forward = lap();
        let loss = causal_lm_loss(logits, &labels).expect("labels match");
        let loss_time = lap();
        let grads = GradientsParams::from_grads(loss.loss.clone().backward(), &adapter);
        let backward = lap();
        let (adapter, _) = optimizer.step(1e-3, adapter, grads);
        let step = lap();
        last_loss = loss.loss.into_scalar();
        <B as Backend>::sync(&device).expect("device sync");
        phases.push([forward, loss_time, backward, step, lap()]);
        adapter
    });
    let timed = &phases[phases.len() - args.steps.min(phases.len())..];
    let mean = |i: usize| timed.iter().map(|p| p[i]).sum::<f64>() / timed.len().max(1) as f64 * 1e3;
    let host_ms = serde_json::json!({
        "forward": mean(0), "loss": mean(1), "backward": mean(2), "optimizer": mean(3),
        "wait": mean(4),
    });
    report_with(
        args,
        base.projection_bytes(),
        name,
        trainable,
        seconds,
        last_loss,
        serde_json::json!({ "host_ms": host_ms }),
    );
}

/// Data-parallel training steps: one replica per device, `--batch` rows each.
fn train_parallel<A>(args: &Args, name: &str, base: &Llama<B>, adapter: A)
where
    A: Adapter<B> + AutodiffModule<B> + Clone + Send + 'static,
{
    let replicas = (1..args.devices)
        .map(|index| {
            let device = device_of(index);
            // The same random weights on every device.
            B::seed(&device, 0);
            base_model::<B>(args, &base.config, &device)
        })
        .collect();
    let mut parallel = DataParallel::<B, A>::start(&base.device(), replicas).expect("replicas");
    let (tokens, labels) = token_batch(&base.config, args.batch, args.seq);
    let shard = Batch {
        real_tokens: tokens.ids.len(),
        target_tokens: args.batch * (args.seq - 1),
        tokens,
        labels,
        features: None,
    };
    let mut optimizer = AdamWConfig::llama_adapter()
        .init::<B>()
        .expect("valid optimiser settings");
    let trainable = adapter.num_trainable_parameters();
    let device = base.device();
    let mut last_loss = f64::NAN;
    let mut reduce_seconds = Vec::new();
    let weight = 1.0 / args.devices as f64;
    let template = adapter.clone();
    let seconds = time(adapter, args.warmup, args.steps, |adapter: A| {
        let work = vec![vec![(shard.clone(), weight)]; args.devices];
        let (grads, totals) = parallel
            .gradients(base, &adapter, work, 0)
            .expect("data-parallel step");
        let (adapter, _) = optimizer.step(1e-3, adapter, grads);
        last_loss = totals.loss;
        reduce_seconds.push(totals.reduce_seconds);
        <B as Backend>::sync(&device).expect("device sync");
        adapter
    });
    let idle_reduce = parallel.time_reduction(&template, 20).expect("reduction");
    // The timed steps only (the warm-up ones come first).
    let timed = &reduce_seconds[reduce_seconds.len() - args.steps.min(reduce_seconds.len())..];
    let in_step = timed.iter().sum::<f64>() / timed.len().max(1) as f64;
    report_with(
        args,
        base.projection_bytes(),
        name,
        trainable,
        seconds,
        last_loss as f32,
        serde_json::json!({
            "devices": args.devices,
            "reduce_ms_idle": idle_reduce * 1e3,
            "reduce_ms_in_step": in_step * 1e3,
        }),
    );
}

/// Device `index` of the backend.
fn device_of(index: usize) -> burn::tensor::Device<B> {
    #[cfg(feature = "cuda")]
    {
        burn::backend::cuda::CudaDevice { index }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = index;
        Default::default()
    }
}

fn report(
    args: &Args,
    projection_bytes: usize,
    name: &str,
    trainable: usize,
    seconds: f64,
    loss: f32,
) {
    report_with(
        args,
        projection_bytes,
        name,
        trainable,
        seconds,
        loss,
        serde_json::json!({}),
    );
}

/// Which product the projections and attention use: cuBLAS (CUDA build, unless `PEFT_CUBLAS=0`
/// or the library is missing) or the backend's own.
fn matmul_route() -> &'static str {
    #[cfg(feature = "cuda")]
    if peft_ops::cublas::enabled() {
        return "cublas";
    }
    "burn"
}

/// The storage and memory fields every line carries: the quantization, the layers, the
/// projections' bytes as stored and the process's peak resident memory (host; device memory is
/// sampled from outside, see `scripts/gpu_bench.sh`).
fn memory_fields(args: &Args, projection_bytes: usize, line: &mut serde_json::Value) {
    let quantize = match args.quantize {
        Quantization::To(format) => format.name(),
        _ => "none".into(),
    };
    if let Some(line) = line.as_object_mut() {
        line.insert("quantize".into(), quantize.into());
        if let Some(layers) = args.layers {
            line.insert("layers".into(), layers.into());
        }
        line.insert("projection_bytes".into(), projection_bytes.into());
        line.insert("peak_rss_bytes".into(), peak_rss_bytes().into());
        let load_peak = LOAD_PEAK_RSS.get().copied().flatten();
        line.insert("load_peak_rss_bytes".into(), load_peak.into());
    }
}

/// One JSON line; `extra`'s fields are added to the common ones.
fn report_with(
    args: &Args,
    projection_bytes: usize,
    name: &str,
    trainable: usize,
    seconds: f64,
    loss: f32,
    extra: serde_json::Value,
) {
    let devices = args.devices.max(1);
    let tokens = (args.batch * args.seq * devices) as f64;
    let mut line = serde_json::json!({
        "bench": name, "preset": args.preset, "dtype": format!("{:?}", args.dtype),
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "devices": devices,
        "trainable": trainable, "ms_per_step": seconds * 1e3,
        "tokens_per_second": tokens / seconds, "last_loss": loss,
        "backend": Inner::name(&Default::default()), "matmul": matmul_route(),
    });
    memory_fields(args, projection_bytes, &mut line);
    if let (Some(line), serde_json::Value::Object(extra)) = (line.as_object_mut(), extra) {
        line.extend(extra);
    }
    println!("{line}");
}

fn main() {
    let args = Args::parse();
    let mut config = if args.preset == "tiny" {
        LlamaConfig::new(512, 64, 172, 5, 8, 4, 8).with_tie_word_embeddings(true)
    } else {
        LlamaConfig::preset(&args.preset).expect("known preset")
    };
    if let Some(layers) = args.layers {
        config.num_hidden_layers = layers;
    }
    let device = Default::default();
    let layers = adapted_layers(&config);
    let prompt_config = AdaptionPromptConfig::new().with_adapter_layers(layers);
    match &args.what {
        What::Train { method } => {
            let base = base_model::<B>(&args, &config, &device);
            start_measuring_peak();
            match method {
                Method::AdaptionPrompt => {
                    let adapter = prompt_config.init::<B>(&base, &device).unwrap();
                    train(&args, "train/adaption-prompt", &base, adapter);
                }
                Method::Lora => {
                    let adapter = LoraConfig::new().init::<B>(&base, &device).unwrap();
                    train(&args, "train/lora-q-v-r8", &base, adapter);
                }
                Method::Prefix => {
                    let adapter = PrefixTuningConfig::new()
                        .with_num_virtual_tokens(10)
                        .init::<B>(&base, &device)
                        .unwrap();
                    train(&args, "train/prefix-10", &base, adapter);
                }
            }
        }
        What::Forward => {
            let base = base_model::<Inner>(&args, &config, &device);
            start_measuring_peak();
            let adapter = prompt_config.init::<Inner>(&base, &device).unwrap();
            let (tokens, _) = token_batch(&config, args.batch, args.seq);
            let seconds = time((), args.warmup, args.steps, |()| {
                let logits = base
                    .forward(&tokens, adapter.hooks(&base).as_ref(), None)
                    .expect("valid batch");
                drop(logits);
                Inner::sync(&device).expect("device sync");
            });
            report(
                &args,
                base.projection_bytes(),
                "forward/adaption-prompt",
                0,
                seconds,
                f32::NAN,
            );
        }
        What::Decode {
            prompt_tokens,
            new_tokens,
        } => {
            let base = base_model::<Inner>(&args, &config, &device);
            start_measuring_peak();
            let adapter = prompt_config.init::<Inner>(&base, &device).unwrap();
            let (tokens, _) = token_batch(&config, 1, *prompt_tokens);
            let generation = GenerationConfig {
                max_new_tokens: *new_tokens,
                eos_token_ids: Vec::new(),
                ..GenerationConfig::default()
            };
            let hooks = adapter.hooks(&base);
            let seconds = time((), args.warmup.min(1), args.steps.clamp(1, 3), |()| {
                let out = generate(
                    &base,
                    hooks.as_ref(),
                    std::slice::from_ref(&tokens.ids),
                    &generation,
                )
                .expect("generation");
                assert_eq!(out[0].generated_ids.len(), *new_tokens);
            });
            let mut line = serde_json::json!({
                "bench": "decode/adaption-prompt", "preset": args.preset,
                "dtype": format!("{:?}", args.dtype), "batch": 1,
                "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                "ms_per_token": seconds * 1e3 / *new_tokens as f64,
                "tokens_per_second": *new_tokens as f64 / seconds,
                "backend": Inner::name(&device), "matmul": matmul_route(),
            });
            memory_fields(&args, base.projection_bytes(), &mut line);
            println!("{line}");
        }
    }
}
