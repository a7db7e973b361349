//! LoRA on a Burn model of one's own: a small sequence classifier (residual MLP blocks, mean
//! pooling, a classification head) that is neither LLaMA nor CLIP.
//!
//! ```sh
//! cargo run --release -p peft-examples --example custom_model
//! ```
//!
//! It implements `peft-core`'s model interface (the `impl AdaptableModel` block below), attaches
//! LoRA to its `dense` layers and its `head` by module path, trains it with `peft-train`'s
//! [`fit`] on a task the frozen model has never seen, saves the adapter as a PEFT directory and
//! loads it back.

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Int, Tensor};
use peft_core::prelude::*;
use peft_train::{fit, FitConfig, Quiet};

/// One residual block: `x + out(relu(dense(x)))`, applied to every token.
#[derive(Module, Debug)]
struct Block<B: Backend> {
    dense: Linear<B>,
    out: Linear<B>,
}

/// The model: blocks, mean over the tokens, and a head with one logit per class.
#[derive(Module, Debug)]
struct Classifier<B: Backend> {
    blocks: Vec<Block<B>>,
    head: Linear<B>,
}

const WIDTH: usize = 16;
const HIDDEN: usize = 32;
const CLASSES: usize = 3;

impl<B: Backend> Classifier<B> {
    fn new(layers: usize, device: &B::Device) -> Self {
        let blocks = (0..layers)
            .map(|_| Block {
                dense: LinearConfig::new(WIDTH, HIDDEN).init(device),
                out: LinearConfig::new(HIDDEN, WIDTH).init(device),
            })
            .collect();
        let model = Self {
            blocks,
            head: LinearConfig::new(WIDTH, CLASSES).init(device),
        };
        model.no_grad() // the frozen base
    }

    /// `x` `[batch, tokens, WIDTH]` → logits `[batch, CLASSES]`, calling the adapter's hooks
    /// after every linear layer.
    fn forward(&self, x: Tensor<B, 3>, hooks: &dyn LayerHooks<B>) -> Tensor<B, 2> {
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            let h = hooks.adapt_linear(
                Site::in_layer(i, "dense"),
                &x,
                block.dense.forward(x.clone()),
            );
            let h = relu(h);
            let out =
                hooks.adapt_linear(Site::in_layer(i, "out"), &h, block.out.forward(h.clone()));
            x = x + out;
        }
        let pooled = x.mean_dim(1); // [batch, 1, WIDTH]
        let logits = hooks.adapt_linear(
            Site::top_level("head"),
            &pooled,
            self.head.forward(pooled.clone()),
        );
        logits.squeeze_dim(1)
    }
}

// ---- The model interface: everything `peft-core` needs to know about this model. ----
impl<B: Backend> AdaptableModel<B> for Classifier<B> {
    fn geometry(&self) -> ModelGeometry {
        ModelGeometry {
            num_hidden_layers: self.blocks.len(),
            hidden_size: WIDTH,
            num_attention_heads: 1, // no attention: one "head" as wide as the model
            num_key_value_heads: 1,
            head_dim: WIDTH,
            intermediate_size: HIDDEN,
        }
    }

    fn linear_sites(&self) -> Vec<LinearSite> {
        let mut sites = Vec::new();
        for i in 0..self.blocks.len() {
            sites.push(LinearSite::in_layer("blocks", i, "dense", WIDTH, HIDDEN));
            sites.push(LinearSite::in_layer("blocks", i, "out", HIDDEN, WIDTH));
        }
        sites.push(LinearSite::top_level("head", WIDTH, CLASSES).as_output_head());
        sites
    }

    fn linear_mut(&mut self, path: &str) -> Option<&mut Linear<B>> {
        if path == "head" {
            return Some(&mut self.head);
        }
        let (index, name) = path.strip_prefix("blocks.")?.split_once('.')?;
        let block = self.blocks.get_mut(index.parse::<usize>().ok()?)?;
        match name {
            "dense" => Some(&mut block.dense),
            "out" => Some(&mut block.out),
            _ => None,
        }
    }

    fn insertion_points(&self) -> &'static [InsertionPoint] {
        &[InsertionPoint::Linear] // no attention: LoRA only
    }

    fn dtype(&self) -> DType {
        self.head.weight.val().dtype()
    }

    fn attention_path(&self, layer: usize) -> String {
        format!("blocks.{layer}")
    }

    fn project_key_values(
        &self,
        _: usize,
        _: Tensor<B, 3>,
    ) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        None
    }
}
// ---- End of the model interface. ----

/// A batch of the new task: random token features, labelled by a fixed random "teacher" the
/// frozen model knows nothing about.
fn batch<B: Backend>(
    teacher: &Tensor<B, 2>,
    size: usize,
    device: &B::Device,
) -> (Tensor<B, 3>, Tensor<B, 1, Int>) {
    let x = Tensor::<B, 3>::random([size, 6, WIDTH], Distribution::Normal(0.0, 1.0), device);
    let labels = x
        .clone()
        .mean_dim(1)
        .squeeze_dim::<2>(1)
        .matmul(teacher.clone())
        .argmax(1)
        .squeeze_dim(1);
    (x, labels)
}

fn accuracy<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>) -> f64 {
    let total = labels.dims()[0] as f64;
    let correct: i64 = logits
        .argmax(1)
        .squeeze_dim::<1>(1)
        .equal(labels)
        .int()
        .sum()
        .into_scalar()
        .elem();
    correct as f64 / total
}

use burn::tensor::ElementConversion;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    type AD = Autodiff<NdArray<f32>>;
    type B = NdArray<f32>;
    let device = Default::default();
    AD::seed(&device, 7);
    let base = Classifier::<AD>::new(2, &device);
    let teacher =
        Tensor::<AD, 2>::random([WIDTH, CLASSES], Distribution::Normal(0.0, 1.0), &device);

    // LoRA on every block's `dense` layer and on the head, by module path.
    let lora = LoraConfig::new()
        .with_r(4)
        .with_lora_alpha(8.0)
        .with_target_modules(TargetModules::names(&["dense", "head"]))
        .init::<AD>(&base, &device)?;
    println!(
        "{} trainable parameters on {} sites",
        lora.num_trainable_parameters(),
        lora.modules.len()
    );

    let (test_x, test_labels) = batch(&teacher, 512, &device);
    let before = accuracy(base.forward(test_x.clone(), &NoHooks), test_labels.clone());
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let batches = (0..).map(|_| batch(&teacher, 64, &device));
    let (lora, summary) = fit(
        lora,
        batches,
        |adapter, (x, labels)| -> Result<Tensor<AD, 1>, peft_core::PeftError> {
            let logits = base.forward(x, adapter.hooks(&base).as_ref());
            Ok(loss_fn.forward(logits, labels))
        },
        &FitConfig::new(150).with_lr(1e-2).with_warmup_steps(10),
        &mut Quiet,
    )?;
    let after = accuracy(
        base.forward(test_x.clone(), lora.hooks(&base).as_ref()),
        test_labels.clone(),
    );
    println!(
        "loss {:.4} -> {:.4} in {} steps ({:.1} s); held-out accuracy {:.1}% -> {:.1}%",
        summary.losses[0],
        summary.losses[summary.losses.len() - 1],
        summary.steps,
        summary.seconds,
        100.0 * before,
        100.0 * after
    );

    // Save as a PEFT directory (keys `base_model.model.blocks.0.dense.lora_A.weight`, ...) and
    // load it back onto the inference backend.
    let (base, adapter) = (base.valid(), AnyAdapter::from(lora.valid()));
    let dir = std::env::temp_dir().join("peft-rs-custom-model");
    let format = save_adapter(&adapter, &base, &dir, None)?;
    let loaded = load_adapter::<B>(&dir, &base, &LoadOptions::default(), &device)?;
    let x = test_x.inner();
    let saved = base.forward(x.clone(), adapter.hooks(&base).as_ref());
    let reloaded = base.forward(x, loaded.hooks(&base).as_ref());
    let same = saved.into_data() == reloaded.into_data();
    println!(
        "saved as {format:?} in {}; reloaded adapter gives the same logits: {same}",
        dir.display()
    );
    if !same {
        return Err("the reloaded adapter differs".into());
    }
    Ok(())
}
