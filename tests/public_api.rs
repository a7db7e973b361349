//! The library as a user's crate sees it: only the public API of `peft-core` and `peft-train`,
//! a small attention model of one's own (neither LLaMA nor CLIP), every built-in method on it,
//! and a method of one's own in `PeftModel`, `fit` and PEFT's files. A change to the public
//! interface that would break such a crate fails here.

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{relu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData};
use peft_core::prelude::*;
use peft_core::{
    host_values, NamedTensor, PeftConfigFile, PeftError, PeftMethod, PrefixTuning, TensorMap,
};
use peft_train::{fit, FitConfig, Quiet};

type B = NdArray<f32>;
type AD = Autodiff<NdArray<f32>>;

const WIDTH: usize = 8;
const HEADS: usize = 2;
const HEAD_DIM: usize = WIDTH / HEADS;
const FFN: usize = 16;
const CLASSES: usize = 3;
const TOKENS: usize = 5;

// ---------------------------------------------------------------------------------------------
// A model of one's own: pre-activation-free attention + MLP layers, mean pooling, a classifier.
// ---------------------------------------------------------------------------------------------

#[derive(Module, Debug)]
struct Attention<B: Backend> {
    query: Linear<B>,
    key: Linear<B>,
    value: Linear<B>,
    output: Linear<B>,
}

#[derive(Module, Debug)]
struct Layer<B: Backend> {
    attn: Attention<B>,
    up: Linear<B>,
    down: Linear<B>,
}

#[derive(Module, Debug)]
struct Encoder<B: Backend> {
    layers: Vec<Layer<B>>,
    classifier: Linear<B>,
}

fn split<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 4> {
    let [batch, tokens, _] = x.dims();
    x.reshape([batch, tokens, HEADS, HEAD_DIM]).swap_dims(1, 2)
}

impl<B: Backend> Encoder<B> {
    fn new(layers: usize, device: &B::Device) -> Self {
        let linear = |i, o| LinearConfig::new(i, o).init(device);
        Self {
            layers: (0..layers)
                .map(|_| Layer {
                    attn: Attention {
                        query: linear(WIDTH, WIDTH),
                        key: linear(WIDTH, WIDTH),
                        value: linear(WIDTH, WIDTH),
                        output: linear(WIDTH, WIDTH),
                    },
                    up: linear(WIDTH, FFN),
                    down: linear(FFN, WIDTH),
                })
                .collect(),
            classifier: linear(WIDTH, CLASSES),
        }
        .no_grad()
    }

    fn forward(&self, x: Tensor<B, 3>, hooks: &dyn LayerHooks<B>) -> Tensor<B, 2> {
        let [batch, tokens, _] = x.dims();
        let mut x = x;
        for (i, layer) in self.layers.iter().enumerate() {
            let a = &layer.attn;
            let site = |name| Site::in_layer(i, name);
            let q = split(hooks.adapt_linear(site("attn.query"), &x, a.query.forward(x.clone())));
            let mut k = split(hooks.adapt_linear(site("attn.key"), &x, a.key.forward(x.clone())));
            let mut v =
                split(hooks.adapt_linear(site("attn.value"), &x, a.value.forward(x.clone())));
            if let Some((pk, pv)) = hooks.prefix_key_values(i, batch) {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            let scores = q.clone().matmul(k.swap_dims(2, 3)) / (HEAD_DIM as f64).sqrt();
            let mut context = softmax(scores, 3).matmul(v);
            if let Some(branch) = hooks.attention_branch(i, &q) {
                context = context + branch;
            }
            let merged = context.swap_dims(1, 2).reshape([batch, tokens, WIDTH]);
            let out = hooks.adapt_linear(
                site("attn.output"),
                &merged,
                a.output.forward(merged.clone()),
            );
            x = x + out;
            let h = relu(hooks.adapt_linear(site("up"), &x, layer.up.forward(x.clone())));
            x = x.clone() + hooks.adapt_linear(site("down"), &h, layer.down.forward(h.clone()));
        }
        let pooled = x.mean_dim(1);
        let logits = hooks.adapt_linear(
            Site::top_level("classifier"),
            &pooled,
            self.classifier.forward(pooled.clone()),
        );
        logits.squeeze_dim(1)
    }
}

impl<B: Backend> AdaptableModel<B> for Encoder<B> {
    fn geometry(&self) -> ModelGeometry {
        ModelGeometry {
            num_hidden_layers: self.layers.len(),
            hidden_size: WIDTH,
            num_attention_heads: HEADS,
            num_key_value_heads: HEADS,
            head_dim: HEAD_DIM,
            intermediate_size: FFN,
        }
    }

    fn linear_sites(&self) -> Vec<LinearSite> {
        let per_layer = [
            ("attn.query", WIDTH, WIDTH),
            ("attn.key", WIDTH, WIDTH),
            ("attn.value", WIDTH, WIDTH),
            ("attn.output", WIDTH, WIDTH),
            ("up", WIDTH, FFN),
            ("down", FFN, WIDTH),
        ];
        let mut sites: Vec<LinearSite> = (0..self.layers.len())
            .flat_map(|i| {
                per_layer
                    .iter()
                    .map(move |&(name, inp, out)| LinearSite::in_layer("layers", i, name, inp, out))
            })
            .collect();
        sites.push(LinearSite::top_level("classifier", WIDTH, CLASSES).as_output_head());
        sites
    }

    fn linear_mut(&mut self, path: &str) -> Option<&mut Linear<B>> {
        if path == "classifier" {
            return Some(&mut self.classifier);
        }
        let (index, name) = path.strip_prefix("layers.")?.split_once('.')?;
        let layer = self.layers.get_mut(index.parse::<usize>().ok()?)?;
        Some(match name {
            "attn.query" => &mut layer.attn.query,
            "attn.key" => &mut layer.attn.key,
            "attn.value" => &mut layer.attn.value,
            "attn.output" => &mut layer.attn.output,
            "up" => &mut layer.up,
            "down" => &mut layer.down,
            _ => return None,
        })
    }

    fn insertion_points(&self) -> &'static [InsertionPoint] {
        &[
            InsertionPoint::Linear,
            InsertionPoint::PrefixKeyValues,
            InsertionPoint::AttentionBranch,
        ]
    }

    fn dtype(&self) -> DType {
        self.classifier.weight.val().dtype()
    }

    fn attention_path(&self, layer: usize) -> String {
        format!("layers.{layer}.attn")
    }

    fn project_key_values(
        &self,
        layer: usize,
        x: Tensor<B, 3>,
    ) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let a = &self.layers.get(layer)?.attn;
        Some((split(a.key.forward(x.clone())), split(a.value.forward(x))))
    }
}

// ---------------------------------------------------------------------------------------------
// A task the frozen model has not seen, and helpers.
// ---------------------------------------------------------------------------------------------

struct Task {
    teacher: Tensor<AD, 2>,
    /// Every example of this class instead of the teacher's labels: a task the attention
    /// methods can learn too (they shift what attention returns, a per-input linear map of the
    /// mean of the tokens is beyond them).
    constant: Option<i64>,
}

impl Task {
    fn new(device: &burn::tensor::Device<AD>) -> Self {
        Self {
            teacher: Tensor::random([WIDTH, CLASSES], Distribution::Normal(0.0, 1.0), device),
            constant: None,
        }
    }

    fn constant(self, class: i64) -> Self {
        Self {
            constant: Some(class),
            ..self
        }
    }

    fn batch(&self, size: usize) -> (Tensor<AD, 3>, Tensor<AD, 1, Int>) {
        let device = self.teacher.device();
        let x = Tensor::<AD, 3>::random(
            [size, TOKENS, WIDTH],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let pooled = x.clone().mean_dim(1).squeeze_dim::<2>(1);
        let labels = match self.constant {
            Some(class) => Tensor::full([size], class, &device),
            None => pooled.matmul(self.teacher.clone()).argmax(1).squeeze_dim(1),
        };
        (x, labels)
    }
}

/// Trains `adapter` on the task with `fit` and returns it with its mean loss over the first and
/// the last 10 steps (one batch's loss is noisy).
fn train<A: Adapter<AD> + AutodiffModule<AD>>(
    base: &Encoder<AD>,
    adapter: A,
    task: &Task,
    steps: usize,
    lr: f64,
) -> (A, f64, f64) {
    let loss_fn = CrossEntropyLossConfig::new().init(&task.teacher.device());
    let (adapter, summary) = fit(
        adapter,
        (0..).map(|_| task.batch(32)),
        |adapter: &A, (x, labels)| -> Result<Tensor<AD, 1>, PeftError> {
            adapter.check_compatible(base)?;
            Ok(loss_fn.forward(base.forward(x, adapter.hooks(base).as_ref()), labels))
        },
        &FitConfig::new(steps).with_lr(lr),
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(summary.steps, steps);
    let mean = |losses: &[f64]| losses.iter().sum::<f64>() / losses.len() as f64;
    (
        adapter,
        mean(&summary.losses[..10]),
        mean(&summary.losses[steps - 10..]),
    )
}

use peft_io::scratch::ScratchDir as TempDir;

fn setup(seed: u64) -> (Encoder<AD>, Task, burn::tensor::Device<AD>) {
    let device = Default::default();
    AD::seed(&device, seed);
    (Encoder::new(2, &device), Task::new(&device), device)
}

/// Logits of the inference-backend model with `hooks` on a fixed input.
fn logits(base: &Encoder<B>, hooks: &dyn LayerHooks<B>) -> Vec<f32> {
    let values: Vec<f32> = (0..3 * TOKENS * WIDTH)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
        .collect();
    let x = Tensor::from_data(
        TensorData::new(values, [3, TOKENS, WIDTH]),
        &Default::default(),
    );
    host_values(base.forward(x, hooks))
}

// ---------------------------------------------------------------------------------------------
// The built-in methods on the user's model.
// ---------------------------------------------------------------------------------------------

#[test]
fn lora_by_module_path_trains_with_fit_and_reloads_exactly_from_a_peft_directory() {
    let (base, task, device) = setup(1);
    let lora = LoraConfig::new()
        .with_r(4)
        .with_target_modules(TargetModules::names(&[
            "attn.query",
            "attn.value",
            "classifier",
        ]))
        .init::<AD>(&base, &device)
        .unwrap();
    let paths: Vec<&str> = lora.modules.iter().map(|m| m.site.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "layers.0.attn.query",
            "layers.0.attn.value",
            "layers.1.attn.query",
            "layers.1.attn.value",
            "classifier"
        ]
    );
    let (lora, first, last) = train(&base, lora, &task, 60, 1e-2);
    assert!(last < 0.7 * first, "loss {first} -> {last}");

    let (base, adapter) = (base.valid(), AnyAdapter::from(lora.valid()));
    let dir = TempDir::new("lora");
    assert_eq!(
        save_adapter(&adapter, &base, dir.path(), None).unwrap(),
        peft_core::AdapterFormat::Peft
    );
    let loaded = load_adapter::<B>(dir.path(), &base, &LoadOptions::default(), &device).unwrap();
    let keys: Vec<String> = loaded.named_tensors().into_iter().map(|t| t.key).collect();
    assert!(
        keys.contains(&"base_model.model.classifier.lora_B.weight".to_string()),
        "{keys:?}"
    );
    assert_eq!(
        logits(&base, loaded.hooks(&base).as_ref()),
        logits(&base, adapter.hooks(&base).as_ref())
    );
}

#[test]
fn a_merged_lora_computes_what_the_adapter_did_and_unmerges_to_the_base() {
    let (base, _, device) = setup(2);
    let base = base.valid();
    let lora = LoraConfig::new()
        .with_target_modules(TargetModules::AllLinear)
        .init::<B>(&base, &device)
        .unwrap()
        .map(&mut peft_core::Randomise(0.2));
    let before = logits(&base, &NoHooks);
    let adapted = logits(&base, lora.hooks(&base).as_ref());
    let mut model = PeftModel::with_adapter(base, AnyAdapter::from(lora)).unwrap();
    model.merge_active().unwrap();
    let merged = logits(model.base(), &NoHooks);
    model.unmerge().unwrap();
    let unmerged = logits(model.base(), &NoHooks);
    for (name, got, want) in [
        ("merged", &merged, &adapted),
        ("unmerged", &unmerged, &before),
    ] {
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((g - w).abs() <= 1e-5 + 1e-5 * w.abs(), "{name}: {g} vs {w}");
        }
    }
    assert_ne!(adapted, before);
}

#[test]
fn prefix_tuning_and_adaption_prompts_attach_to_the_users_attention_and_train() {
    let (base, task, device) = setup(3);
    let task = task.constant(2);
    let prompts = AdaptionPromptConfig::new()
        .with_adapter_len(3)
        .with_adapter_layers(2)
        .init::<AD>(&base, &device)
        .unwrap();
    // Zero-initialised gates: exactly the base model before training.
    let (inference, untrained) = (base.valid(), prompts.valid());
    assert_eq!(
        logits(&inference, untrained.hooks(&inference).as_ref()),
        logits(&inference, &NoHooks)
    );
    let (prompts, first, last) = train(&base, prompts, &task, 80, 2e-2);
    assert!(
        last < 0.8 * first,
        "adaption prompt: loss {first} -> {last}"
    );

    let prefix: PrefixTuning<AD> = PrefixTuningConfig::new()
        .with_num_virtual_tokens(2)
        .init::<AD>(&base, &device)
        .unwrap();
    let (prefix, first, last) = train(&base, prefix, &task, 80, 2e-2);
    assert!(last < 0.8 * first, "prefix: loss {first} -> {last}");

    // Both round-trip through PEFT directories with the user's module paths.
    for (name, adapter) in [
        ("prompts", AnyAdapter::from(prompts.valid())),
        ("prefix", AnyAdapter::from(prefix.valid())),
    ] {
        let dir = TempDir::new(name);
        save_adapter(&adapter, &inference, dir.path(), None).unwrap();
        let loaded =
            load_adapter::<B>(dir.path(), &inference, &LoadOptions::default(), &device).unwrap();
        assert_eq!(
            logits(&inference, loaded.hooks(&inference).as_ref()),
            logits(&inference, adapter.hooks(&inference).as_ref()),
            "{name}"
        );
    }
}

#[test]
fn an_adapter_saved_for_another_model_is_refused_naming_what_is_missing() {
    let (base, _, device) = setup(4);
    let base = base.valid();
    let lora = LoraConfig::new().with_target_modules(TargetModules::names(&["up"]));
    let adapter = AnyAdapter::from(lora.init::<B>(&base, &device).unwrap());
    let dir = TempDir::new("mismatch");
    save_adapter(&adapter, &base, dir.path(), None).unwrap();
    let deeper = Encoder::<B>::new(3, &device);
    let error = load_adapter::<B>(dir.path(), &deeper, &LoadOptions::default(), &device)
        .expect_err("a 2-layer adapter on a 3-layer model")
        .to_string();
    assert!(error.contains("layers.2.up.lora_A.weight"), "{error}");
    // And a target the model does not have is an error, not an adapter that adapts nothing.
    let error = LoraConfig::new()
        .with_target_modules(TargetModules::names(&["q_proj"]))
        .init::<B>(&base, &device)
        .expect_err("q_proj does not exist here")
        .to_string();
    assert!(error.contains("q_proj"), "{error}");
}

// ---------------------------------------------------------------------------------------------
// A method of one's own: a learned scale on the output of chosen linear sites (like PEFT's
// (IA)³), with PEFT-style files of its own `peft_type`.
// ---------------------------------------------------------------------------------------------

#[derive(Module, Debug)]
struct OutputScaling<B: Backend> {
    /// One vector per site, `[out]`; the output is multiplied by `1 + scale`.
    scales: Vec<Param<Tensor<B, 1>>>,
    /// The sites, by module path, with the layer and in-layer name the hooks see.
    sites: Vec<(String, Option<usize>, String)>,
}

impl<B: Backend> OutputScaling<B> {
    fn new(
        model: &dyn AdaptableModel<B>,
        names: &[&str],
        device: &B::Device,
    ) -> Result<Self, PeftError> {
        let sites = LoraConfig::new()
            .with_target_modules(TargetModules::names(names))
            .targets(&model.linear_sites())?;
        Ok(Self {
            scales: sites
                .iter()
                .map(|s| Param::from_tensor(Tensor::zeros([s.out_features], device)))
                .collect(),
            sites: sites
                .into_iter()
                .map(|s| (s.path, s.layer, s.name))
                .collect(),
        })
    }
}

struct ScalingHooks<'a, B: Backend>(&'a OutputScaling<B>);

impl<B: Backend> LayerHooks<B> for ScalingHooks<'_, B> {
    fn adapt_linear(
        &self,
        site: Site<'_>,
        _input: &Tensor<B, 3>,
        output: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let found = self
            .0
            .sites
            .iter()
            .position(|(_, layer, name)| *layer == site.layer && name == site.name);
        match found {
            Some(i) => output.clone() + output * self.0.scales[i].val().unsqueeze::<3>(),
            None => output,
        }
    }
}

impl<B: Backend> Adapter<B> for OutputScaling<B> {
    fn method(&self) -> PeftMethod {
        PeftMethod::Other("OUTPUT_SCALING")
    }

    fn check_compatible(&self, model: &dyn AdaptableModel<B>) -> Result<(), PeftError> {
        let sites = model.linear_sites();
        for (path, _, _) in &self.sites {
            if !sites.iter().any(|s| &s.path == path) {
                return Err(PeftError::Incompatible(format!(
                    "the model has no linear site `{path}`"
                )));
            }
        }
        Ok(())
    }

    fn hooks<'a>(&'a self, _model: &dyn AdaptableModel<B>) -> Box<dyn LayerHooks<B> + 'a> {
        Box::new(ScalingHooks(self))
    }

    fn named_tensors(&self) -> Vec<NamedTensor> {
        self.sites
            .iter()
            .zip(&self.scales)
            .map(|((path, _, _), scale)| NamedTensor {
                key: format!("base_model.model.{path}.scale"),
                shape: scale.val().dims().to_vec(),
                values: host_values(scale.val()),
            })
            .collect()
    }

    fn peft_config(&self, _model: &dyn AdaptableModel<B>) -> Result<serde_json::Value, PeftError> {
        let paths: Vec<&str> = self.sites.iter().map(|(p, _, _)| p.as_str()).collect();
        Ok(serde_json::json!({ "target_modules": paths }))
    }
}

impl<B: Backend> FromPeft<B> for OutputScaling<B> {
    const PEFT_TYPE: &'static str = "OUTPUT_SCALING";

    fn from_peft(
        file: &PeftConfigFile<'_>,
        tensors: &mut TensorMap,
        model: &dyn AdaptableModel<B>,
        device: &B::Device,
    ) -> Result<Self, PeftError> {
        let paths: Vec<String> = serde_json::from_value(file.field("target_modules")?.clone())
            .map_err(|e| file.error(format!("`target_modules`: {e}")))?;
        let names: Vec<&str> = paths.iter().map(String::as_str).collect();
        let mut adapter = Self::new(model, &names, device)?;
        for ((path, _, _), scale) in adapter.sites.iter().zip(adapter.scales.iter_mut()) {
            let width = scale.val().dims()[0];
            let values = tensors.take_f32(&format!("base_model.model.{path}.scale"), &[width])?;
            *scale =
                Param::from_tensor(Tensor::from_data(TensorData::new(values, [width]), device));
        }
        Ok(adapter)
    }
}

#[test]
fn a_method_of_ones_own_enters_peft_model_fit_and_peft_files() {
    let (base, task, device) = setup(5);
    let scaling =
        OutputScaling::new(&base, &["attn.value", "down", "classifier"], &device).unwrap();
    assert_eq!(
        scaling.num_trainable_parameters(),
        2 * WIDTH + 2 * WIDTH + CLASSES
    );
    // PeftModel holds it as its adapter type, with no built-in enum involved.
    let model: PeftModel<AD, Encoder<AD>, OutputScaling<AD>> =
        PeftModel::with_adapter(base.clone(), scaling).unwrap();
    let scaling = model.adapter("default").unwrap().clone();
    let (trained, first, last) = train(&base, scaling, &task, 60, 5e-2);
    assert!(last < first, "own method: loss {first} -> {last}");

    // PEFT-style files through the generic save and load.
    let (inference, trained) = (base.valid(), trained.valid());
    let dir = TempDir::new("own-method");
    save_peft(&trained, &inference, dir.path()).unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "OUTPUT_SCALING");
    let loaded: OutputScaling<B> = load_peft_as(dir.path(), &inference, &device).unwrap();
    assert_eq!(
        logits(&inference, loaded.hooks(&inference).as_ref()),
        logits(&inference, trained.hooks(&inference).as_ref())
    );
    assert_ne!(
        logits(&inference, loaded.hooks(&inference).as_ref()),
        logits(&inference, &NoHooks)
    );
    // A built-in loader reading it says which method it is rather than guessing.
    let error = load_adapter::<B>(dir.path(), &inference, &LoadOptions::default(), &device)
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("OUTPUT_SCALING"), "{error}");
    // And loading it as another method is refused by name.
    let error = load_peft_as::<B, peft_core::Lora<B>>(dir.path(), &inference, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("OUTPUT_SCALING") && error.contains("LORA"),
        "{error}"
    );
}
