//! Where a LLaMA-7B-shaped step spends its time on a backend: the pieces of one decoder layer
//! timed separately, at the benchmark's shape (batch 4 × 512 tokens, hidden 4096, 32 heads of
//! 128), so that speed work goes where the time goes.
//!
//! ```sh
//! cargo build --release -p peft-benches --features cuda --example op_profile
//! op_profile bf16          # or f32 / f16; prints one JSON line per piece
//! ```
//! Each piece runs a few untimed times first (kernel compilation, autotuning), then `ITERS`
//! times; the device is synchronised before the clock stops. `tflops` counts the matmul work
//! only (2·m·n·k per product), so it is the achieved matmul rate where a piece is one product.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor};
use peft_core::{Adapter, AdaptionPromptConfig};
use peft_llama::rope::apply_rotary;
use peft_llama::{LlamaConfig, NoHooks, RmsNorm, TokenBatch};
use peft_ops::tensor::{cast_to, upcast};

#[cfg(feature = "cuda")]
type Inner = burn::backend::Cuda<f32>;
#[cfg(not(feature = "cuda"))]
type Inner = burn::backend::NdArray<f32>;

const ITERS: usize = 10;

fn time(name: &str, flops: f64, mut work: impl FnMut()) {
    let device = Default::default();
    for _ in 0..3 {
        work();
    }
    Inner::sync(&device).expect("sync");
    let started = Instant::now();
    for _ in 0..ITERS {
        work();
    }
    Inner::sync(&device).expect("sync");
    let seconds = started.elapsed().as_secs_f64() / ITERS as f64;
    println!(
        "{}",
        serde_json::json!({
            "piece": name, "ms": seconds * 1e3,
            "tflops": if flops > 0.0 { flops / seconds / 1e12 } else { 0.0 },
        })
    );
}

fn random<const D: usize>(shape: [usize; D], dtype: DType) -> Tensor<Inner, D> {
    cast_to(
        Tensor::random(shape, Distribution::Normal(0.0, 0.02), &Default::default()),
        dtype,
    )
}

fn main() {
    let dtype = match std::env::args().nth(1).as_deref() {
        Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        _ => DType::BF16,
    };
    let (b, s, d, h, hd, f, v) = (
        4usize, 512usize, 4096usize, 32usize, 128usize, 11008usize, 32000usize,
    );
    let rows = (b * s) as f64;
    let x3 = random([b, s, d], dtype);
    let x2 = random([b * s, d], dtype);
    let w = random([d, d], dtype);
    let w_up = random([d, f], dtype);
    let w_vocab = random([d, v], dtype);
    let mm = |m: f64, n: f64, k: f64| 2.0 * m * n * k;

    // The product the model uses (`peft_ops::tensor::matmul`: cuBLAS on the CUDA build unless
    // PEFT_CUBLAS=0), each call including its stream synchronisations.
    let w_sq_t = random([d, d], dtype).transpose();
    time(
        "model::matmul [2048,4096]x[4096,4096]^T",
        mm(rows, d as f64, d as f64),
        || {
            let _ = peft_ops::tensor::matmul(x2.clone(), w_sq_t.clone());
        },
    );
    let w_up_t0 = random([f, d], dtype).transpose();
    time(
        "model::matmul [2048,4096]x[11008,4096]^T",
        mm(rows, f as f64, d as f64),
        || {
            let _ = peft_ops::tensor::matmul(x2.clone(), w_up_t0.clone());
        },
    );
    // What a launch and a device synchronisation cost the host: 100 additions of 16 numbers
    // (the GPU work is negligible), without and with a synchronisation after each.
    let tiny = random([16], DType::F32);
    time("launch: 100 adds of [16]", 0.0, || {
        let mut t = tiny.clone();
        for _ in 0..100 {
            t = t + 1.0;
        }
    });
    let device = Default::default();
    time("launch+sync: 100 x (add of [16], sync)", 0.0, || {
        let mut t = tiny.clone();
        for _ in 0..100 {
            t = t + 1.0;
            Inner::sync(&device).expect("sync");
        }
    });

    time(
        "matmul [4,512,4096]x[4096,4096] (Linear, broadcast)",
        mm(rows, d as f64, d as f64),
        || {
            let _ = x3.clone().matmul(w.clone().unsqueeze::<3>());
        },
    );
    time(
        "matmul [2048,4096]x[4096,4096] (2-D)",
        mm(rows, d as f64, d as f64),
        || {
            let _ = x2.clone().matmul(w.clone());
        },
    );
    time(
        "matmul [2048,4096]x[4096,11008]",
        mm(rows, f as f64, d as f64),
        || {
            let _ = x2.clone().matmul(w_up.clone());
        },
    );
    time(
        "matmul [2048,4096]x[4096,32000] (lm_head)",
        mm(rows, v as f64, d as f64),
        || {
            let _ = x2.clone().matmul(w_vocab.clone());
        },
    );
    let wt = random([d, d], dtype).transpose();
    time(
        "matmul [2048,4096]x[4096,4096]^T (backward's transposed weight)",
        mm(rows, d as f64, d as f64),
        || {
            let _ = x2.clone().matmul(wt.clone());
        },
    );

    // Weights stored [out, in] (PyTorch's layout) and used transposed.
    let w_up_t = random([f, d], dtype).transpose();
    time(
        "matmul [2048,4096]x[11008,4096]^T",
        mm(rows, f as f64, d as f64),
        || {
            let _ = x2.clone().matmul(w_up_t.clone());
        },
    );
    let w_vocab_t = random([v, d], dtype).transpose();
    time(
        "matmul [2048,4096]x[32000,4096]^T (lm_head)",
        mm(rows, v as f64, d as f64),
        || {
            let _ = x2.clone().matmul(w_vocab_t.clone());
        },
    );
    let w_down = random([f, d], dtype);
    let h2 = random([b * s, f], dtype);
    time(
        "matmul [2048,11008]x[11008,4096] (down)",
        mm(rows, d as f64, f as f64),
        || {
            let _ = h2.clone().matmul(w_down.clone());
        },
    );
    let w_down_t = random([d, f], dtype).transpose();
    time(
        "matmul [2048,11008]x[4096,11008]^T (down)",
        mm(rows, d as f64, f as f64),
        || {
            let _ = h2.clone().matmul(w_down_t.clone());
        },
    );

    let q = random([b, h, s, hd], dtype);
    let k = random([b, h, s, hd], dtype);
    let vv = random([b, h, s, hd], dtype);
    let attention_flops = 2.0 * mm((b * h * s) as f64, s as f64, hd as f64);
    time("attention scores q·kᵀ", attention_flops / 2.0, || {
        let _ = q.clone().matmul(k.clone().swap_dims(2, 3));
    });
    let scores = q.clone().matmul(k.clone().swap_dims(2, 3));
    time(
        "softmax over [4,32,512,512] in f32 (upcast + cast back)",
        0.0,
        || {
            let _ = cast_to(softmax(upcast(scores.clone()), 3), dtype);
        },
    );
    time("softmax over [4,32,512,512] in storage dtype", 0.0, || {
        let _ = softmax(scores.clone(), 3);
    });
    time(
        "attention decomposed (scores, mask, f32 softmax, ·v)",
        attention_flops,
        || {
            let scores = q.clone().matmul(k.clone().swap_dims(2, 3)) * (1.0 / (hd as f64).sqrt());
            let p = cast_to(softmax(upcast(scores), 3), dtype);
            let _ = p.matmul(vv.clone());
        },
    );
    let cos = random([b, 1, s, hd], dtype);
    let sin = random([b, 1, s, hd], dtype);
    time("rotary on [4,32,512,128]", 0.0, || {
        let _ = apply_rotary(q.clone(), &cos, &sin);
    });
    time(
        "swap_dims + reshape [4,512,32,128]→[4,32,512,128] contiguous",
        0.0,
        || {
            let _ = x3
                .clone()
                .reshape([b, s, h, hd])
                .swap_dims(1, 2)
                .reshape([b * h, s, hd]);
        },
    );
    let norm = RmsNorm {
        weight: burn::module::Param::from_tensor(random([d], dtype)),
        eps: 1e-6,
    };
    time("RMSNorm on [4,512,4096]", 0.0, || {
        let _ = norm.forward(x3.clone());
    });
    let logits = random([b * s, v], dtype);
    time("log-softmax over [2048,32000] in f32", 0.0, || {
        let _ = burn::tensor::activation::log_softmax(upcast(logits.clone()), 1);
    });

    // Whole layers: a 2-layer minus a 1-layer model is one decoder layer's cost.
    let device = Default::default();
    let ids: Vec<u32> = (0..b * s).map(|i| (i * 7919 % 31997 + 3) as u32).collect();
    let tokens = TokenBatch {
        ids,
        batch: b,
        seq: s,
        mask: None,
    };
    for layers in [1usize, 2] {
        let mut config = LlamaConfig::preset("llama-7b").expect("preset");
        config.num_hidden_layers = layers;
        let model = config.init::<Inner>(&device, dtype);
        time(
            &format!("forward, {layers}-layer LLaMA-7B (embed + layers + norm + lm_head)"),
            0.0,
            || {
                let _ = model.forward(&tokens, &NoHooks, None).expect("forward");
            },
        );
        let model = config.init::<Autodiff<Inner>>(&device, dtype);
        let prompt = AdaptionPromptConfig::new()
            .with_adapter_layers(layers)
            .init::<Autodiff<Inner>>(&model, &device)
            .expect("adapter");
        let labels: Vec<i64> = tokens.ids.iter().map(|&i| i as i64).collect();
        time(
            &format!("train step, {layers}-layer LLaMA-7B, prompts in every layer"),
            0.0,
            || {
                let logits = model
                    .forward(&tokens, prompt.hooks(&model).as_ref(), None)
                    .expect("forward");
                let loss = peft_train::causal_lm_loss(logits, &labels).expect("loss");
                let _ = loss.loss.backward();
            },
        );
    }
}
