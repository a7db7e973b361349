//! Loading checkpoints: Hugging Face safetensors (single file or sharded) and Meta's original
//! `consolidated.00.pth` + `params.json`, in f32, f16 or bf16, through `burn-store`.

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use peft_io::CheckpointError;
pub use peft_io::{transpose, TensorMap};
use peft_ops::quant::{FrozenLinear, QuantFormat, QuantizedLinear, QuantizedMatrix};

use crate::config::LlamaConfig;
use crate::error::{LlamaError, Result};
use crate::model::{Attention, DecoderLayer, Llama, Mlp, RmsNorm};
use crate::rope::RotaryEmbedding;

/// The floating-point type the frozen weights are stored in on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// 32-bit float.
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl WeightDtype {
    /// The Burn dtype.
    pub fn dtype(self) -> DType {
        match self {
            WeightDtype::F32 => DType::F32,
            WeightDtype::F16 => DType::F16,
            WeightDtype::Bf16 => DType::BF16,
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!("unknown dtype `{other}` (f32, f16, bf16)")),
        }
    }
}

/// The Meta-layout row of each row of a Hugging Face-layout query/key weight
/// `[heads · head_dim, in]`: rotary pairs interleaved (Meta, llama.cpp) versus first halves then
/// second halves (Hugging Face's rotate-half).
pub fn meta_to_hf_order(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut order = vec![0; heads * head_dim];
    for head in 0..heads {
        for pair in 0..half {
            for component in 0..2 {
                order[head * head_dim + component * half + pair] =
                    head * head_dim + 2 * pair + component;
            }
        }
    }
    order
}

/// Reorders the rows of a Meta-layout query/key weight `[heads · head_dim, in]` (rotary pairs
/// interleaved) into Hugging Face's rotate-half layout (first halves, then second halves).
pub fn meta_to_hf_rows(values: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(values.len());
    for meta_row in meta_to_hf_order(heads, head_dim) {
        out.extend_from_slice(&values[meta_row * cols..(meta_row + 1) * cols]);
    }
    out
}

/// How the loader stores the decoder's projections (attention q/k/v/o, feed-forward
/// gate/up/down); embeddings, norms and the output head are always dense.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// Dense, in the loader's dtype (GGUF blocks dequantized).
    #[default]
    Dense,
    /// A GGUF file's quantized blocks kept as the file holds them (Q8_0, Q4_0, Q4_1, Q4_K,
    /// Q5_K, Q6_K); its dense tensors stay dense.
    KeepGguf,
    /// Quantized to this format on load (NF4 or Q8_0); a GGUF file's quantized blocks are kept
    /// as they are rather than quantized a second time.
    To(QuantFormat),
}

impl std::str::FromStr for Quantization {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "dense" => Ok(Self::Dense),
            "gguf" => Ok(Self::KeepGguf),
            other => QuantFormat::parse_target(other)
                .map(Self::To)
                .map_err(|_| format!("unknown quantization `{other}` (nf4, q8_0, gguf, none)")),
        }
    }
}

/// Naming convention of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointLayout {
    /// Hugging Face `transformers` names and rotate-half query/key rows.
    HuggingFace,
    /// Meta's original names and interleaved query/key rows.
    Meta,
    /// A llama.cpp GGUF file: its own names, query/key rows permuted as Meta's, any block type.
    Gguf,
}

/// Whether `path` names a GGUF file (by its `.gguf` extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Loads a [`Llama`] from a checkpoint directory.
#[derive(Debug, Clone)]
pub struct LlamaLoader {
    dir: PathBuf,
    dtype: WeightDtype,
    quantization: Quantization,
}

fn key_for(layout: CheckpointLayout, hf: &str) -> String {
    match layout {
        CheckpointLayout::HuggingFace => return hf.to_string(),
        CheckpointLayout::Gguf => return crate::gguf::gguf_name(hf),
        CheckpointLayout::Meta => {}
    }
    // model.layers.{i}.{part} → layers.{i}.{meta part}
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        let (index, part) = rest.split_once('.').unwrap_or((rest, ""));
        let meta = match part {
            "self_attn.q_proj.weight" => "attention.wq.weight",
            "self_attn.k_proj.weight" => "attention.wk.weight",
            "self_attn.v_proj.weight" => "attention.wv.weight",
            "self_attn.o_proj.weight" => "attention.wo.weight",
            "mlp.gate_proj.weight" => "feed_forward.w1.weight",
            "mlp.down_proj.weight" => "feed_forward.w2.weight",
            "mlp.up_proj.weight" => "feed_forward.w3.weight",
            "input_layernorm.weight" => "attention_norm.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            other => other,
        };
        return format!("layers.{index}.{meta}");
    }
    match hf {
        "model.embed_tokens.weight" => "tok_embeddings.weight",
        "model.norm.weight" => "norm.weight",
        "lm_head.weight" => "output.weight",
        other => other,
    }
    .to_string()
}

struct Builder<'a, B: Backend> {
    tensors: &'a mut TensorMap,
    layout: CheckpointLayout,
    config: &'a LlamaConfig,
    device: &'a B::Device,
    dtype: DType,
    quantization: Quantization,
}

impl<B: Backend> Builder<'_, B> {
    /// A frozen parameter: the base model never receives gradients.
    fn param<const D: usize>(&self, values: Vec<f32>, shape: [usize; D]) -> Param<Tensor<B, D>> {
        Param::from_tensor(self.tensor(values, shape)).set_require_grad(false)
    }

    fn tensor<const D: usize>(&self, values: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
        let data = TensorData::new(values, shape);
        match self.dtype {
            // Full precision: the backend's float type (f32, or f64 on an f64 backend).
            DType::F32 => Tensor::from_data(data, self.device),
            dtype => Tensor::from_data(data.convert_dtype(dtype), (self.device, dtype)),
        }
    }

    fn norm(&mut self, hf: &str, width: usize) -> Result<RmsNorm<B>> {
        let values = self.tensors.take_f32(&key_for(self.layout, hf), &[width])?;
        Ok(RmsNorm {
            weight: self.param(values, [width]),
            eps: self.config.rms_norm_eps,
        })
    }

    /// A weight `[out, in]` as row-major f32 host values, its query/key rows in Hugging Face's
    /// order.
    fn weight_values(
        &mut self,
        hf: &str,
        out: usize,
        inp: usize,
        rotary_heads: Option<usize>,
    ) -> Result<Vec<f32>> {
        let weight_key = format!("{hf}.weight");
        let mut values = self
            .tensors
            .take_f32(&key_for(self.layout, &weight_key), &[out, inp])?;
        if let Some(heads) = self.permuted_heads(rotary_heads) {
            values = meta_to_hf_rows(&values, heads, self.config.head_dim, inp);
        }
        Ok(values)
    }

    /// The heads of a query/key projection (`rotary_heads`) whose rows the checkpoint holds in
    /// Meta's interleaved order and the loader must reorder: Meta's own files, and GGUF files of
    /// the architectures llama.cpp permutes. `None` for every other projection and checkpoint.
    fn permuted_heads(&self, rotary_heads: Option<usize>) -> Option<usize> {
        let permuted = match self.layout {
            CheckpointLayout::Meta => true,
            CheckpointLayout::Gguf => crate::gguf::permutes_query_key_rows(self.config),
            CheckpointLayout::HuggingFace => false,
        };
        rotary_heads.filter(|_| permuted)
    }

    /// The bias of a projection, if it has one; a query/key bias in its rows' order.
    fn bias(
        &mut self,
        hf: &str,
        out: usize,
        bias: bool,
        rotary_heads: Option<usize>,
    ) -> Result<Option<Param<Tensor<B, 1>>>> {
        if !bias {
            return Ok(None);
        }
        let bias_key = key_for(self.layout, &format!("{hf}.bias"));
        let mut values = self.tensors.take_f32(&bias_key, &[out])?;
        if let Some(heads) = self.permuted_heads(rotary_heads) {
            values = meta_to_hf_rows(&values, heads, self.config.head_dim, 1);
        }
        Ok(Some(self.param(values, [out])))
    }

    /// A dense projection stored PyTorch-style `[out, in]`: kept in that memory layout and used
    /// through a transposed view (`[in, out]` to Burn), which Burn's CUDA matmul runs faster
    /// than a row-major `[in, out]` copy (gate/up projections of LLaMA-7B 4.9 → 3.1 ms on an
    /// H100, `examples/op_profile.rs`); loading no longer transposes on the host.
    fn linear(
        &mut self,
        hf: &str,
        out: usize,
        inp: usize,
        rotary_heads: Option<usize>,
        bias: bool,
    ) -> Result<Linear<B>> {
        let values = self.weight_values(hf, out, inp, rotary_heads)?;
        let weight = self.tensor(values, [out, inp]).transpose();
        Ok(Linear {
            weight: Param::from_tensor(weight).set_require_grad(false),
            bias: self.bias(hf, out, bias, rotary_heads)?,
        })
    }

    /// A decoder projection, dense or quantized as the loader's [`Quantization`] says. A
    /// quantized weight is quantized from host values, never held dense on the device.
    fn projection(
        &mut self,
        hf: &str,
        out: usize,
        inp: usize,
        rotary_heads: Option<usize>,
        bias: bool,
    ) -> Result<FrozenLinear<B>> {
        if self.quantization != Quantization::Dense && self.layout == CheckpointLayout::Gguf {
            let key = key_for(self.layout, &format!("{hf}.weight"));
            if let Some(matrix) = self.tensors.take_gguf_blocks(&key, [out, inp])? {
                let matrix = match self.permuted_heads(rotary_heads) {
                    Some(heads) => {
                        matrix.permute_rows(&meta_to_hf_order(heads, self.config.head_dim))?
                    }
                    None => matrix,
                };
                return Ok(FrozenLinear::Quantized(QuantizedLinear::new(
                    matrix,
                    self.bias(hf, out, bias, rotary_heads)?,
                )));
            }
        }
        match self.quantization {
            Quantization::To(format) => {
                let values = self.weight_values(hf, out, inp, rotary_heads)?;
                let matrix =
                    QuantizedMatrix::quantize(format, &values, out, inp).map_err(|e| match e {
                        CheckpointError::Quantization(message) => {
                            LlamaError::Quantization(format!("{hf}.weight: {message}"))
                        }
                        other => other.into(),
                    })?;
                Ok(FrozenLinear::Quantized(QuantizedLinear::new(
                    matrix,
                    self.bias(hf, out, bias, rotary_heads)?,
                )))
            }
            Quantization::Dense | Quantization::KeepGguf => Ok(FrozenLinear::Dense(self.linear(
                hf,
                out,
                inp,
                rotary_heads,
                bias,
            )?)),
        }
    }

    fn build(mut self) -> Result<Llama<B>> {
        let c = self.config;
        let (d, v) = (c.hidden_size, c.vocab_size);
        let embed_key = key_for(self.layout, "model.embed_tokens.weight");
        let embed = self.tensors.take_f32(&embed_key, &[v, d])?;
        let embed_tokens = self.param(embed, [v, d]);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = |name: &str| format!("model.layers.{i}.{name}");
            let (qkv_bias, mlp_bias) = (c.attention_bias, c.mlp_bias);
            let head_norm = |builder: &mut Self, name: &str| {
                c.qk_norm
                    .then(|| builder.norm(&p(name), c.head_dim))
                    .transpose()
            };
            let self_attn = Attention {
                q_proj: self.projection(
                    &p("self_attn.q_proj"),
                    c.query_width(),
                    d,
                    Some(c.num_attention_heads),
                    qkv_bias,
                )?,
                k_proj: self.projection(
                    &p("self_attn.k_proj"),
                    c.kv_width(),
                    d,
                    Some(c.num_key_value_heads),
                    qkv_bias,
                )?,
                v_proj: self.projection(&p("self_attn.v_proj"), c.kv_width(), d, None, qkv_bias)?,
                o_proj: self.projection(
                    &p("self_attn.o_proj"),
                    d,
                    c.query_width(),
                    None,
                    c.o_proj_bias,
                )?,
                num_heads: c.num_attention_heads,
                num_kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                q_norm: head_norm(&mut self, "self_attn.q_norm.weight")?,
                k_norm: head_norm(&mut self, "self_attn.k_norm.weight")?,
                sliding: c.is_sliding(i),
            };
            let f = c.intermediate_size;
            let mlp = Mlp {
                gate_proj: self.projection(&p("mlp.gate_proj"), f, d, None, mlp_bias)?,
                up_proj: self.projection(&p("mlp.up_proj"), f, d, None, mlp_bias)?,
                down_proj: self.projection(&p("mlp.down_proj"), d, f, None, mlp_bias)?,
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: self.norm(&p("input_layernorm.weight"), d)?,
                post_attention_layernorm: self.norm(&p("post_attention_layernorm.weight"), d)?,
            });
        }
        let norm = self.norm("model.norm.weight", d)?;
        let head_key = key_for(self.layout, "lm_head.weight");
        let lm_head = if c.tie_word_embeddings {
            // Some exporters write the tied head anyway; it duplicates the embeddings.
            self.tensors.discard(&head_key);
            None
        } else {
            Some(self.linear("lm_head", v, d, None, false)?)
        };
        Ok(Llama {
            embed_tokens,
            layers,
            norm,
            lm_head,
            config: c.clone(),
            rope: RotaryEmbedding::new(c),
            name_or_path: None,
        })
    }
}

impl LlamaLoader {
    /// A loader for the checkpoint directory `dir` (Hugging Face or Meta layout), or for a GGUF
    /// file (a path ending in `.gguf`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            dtype: WeightDtype::F32,
            quantization: Quantization::Dense,
        }
    }

    /// Stores the decoder's projections as `quantization` says (QLoRA-style frozen base:
    /// `Quantization::To(QuantFormat::Nf4)`); embeddings, norms and the output head stay dense
    /// in the loader's dtype.
    pub fn with_quantization(mut self, quantization: Quantization) -> Self {
        self.quantization = quantization;
        self
    }

    /// Converts the weights to `dtype` on load.
    pub fn with_dtype(mut self, dtype: WeightDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// Which layout the directory holds.
    ///
    /// # Errors
    /// Neither `config.json` with safetensors nor `params.json` with `consolidated.00.pth`.
    pub fn layout(&self) -> Result<CheckpointLayout> {
        if is_gguf(&self.dir) {
            Ok(CheckpointLayout::Gguf)
        } else if self.dir.join("config.json").is_file() {
            Ok(CheckpointLayout::HuggingFace)
        } else if self.dir.join("params.json").is_file() {
            Ok(CheckpointLayout::Meta)
        } else {
            Err(LlamaError::io(
                self.dir.join("config.json"),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no config.json (Hugging Face) or params.json (Meta) in the model directory",
                ),
            ))
        }
    }

    /// Reads the configuration and every weight file into a [`TensorMap`] without building the
    /// model.
    ///
    /// # Errors
    /// Unreadable configuration or weight files.
    pub fn read(&self) -> Result<(LlamaConfig, TensorMap, CheckpointLayout)> {
        let layout = self.layout()?;
        let mut tensors = TensorMap::new(self.dir.display().to_string());
        match layout {
            CheckpointLayout::Gguf => {
                let file = std::rc::Rc::new(peft_io::gguf::GgufFile::open(&self.dir)?);
                let config = LlamaConfig::from_gguf(&file)?;
                for tensor in &file.tensors {
                    tensors.add_gguf(tensor.name.clone(), &file, tensor)?;
                }
                // Read into the configuration (RoPE frequency factors).
                tensors.discard("rope_freqs.weight");
                Ok((config, tensors, layout))
            }
            CheckpointLayout::HuggingFace => {
                let config = LlamaConfig::from_hf_file(self.dir.join("config.json"))?;
                let index = self.dir.join("model.safetensors.index.json");
                if index.is_file() {
                    for shard in shard_files(&index)? {
                        tensors.add_safetensors(&self.dir.join(shard))?;
                    }
                } else {
                    tensors.add_safetensors(&self.dir.join("model.safetensors"))?;
                }
                Ok((config, tensors, layout))
            }
            CheckpointLayout::Meta => {
                let second = self.dir.join("consolidated.01.pth");
                if second.exists() {
                    return Err(LlamaError::WeightFile {
                        path: second,
                        message: "model-parallel Meta checkpoints (several consolidated.*.pth) \
                                  are not supported; convert them to one shard first"
                            .into(),
                    });
                }
                tensors.add_pth(&self.dir.join("consolidated.00.pth"))?;
                // LLaMA-1 checkpoints carry the RoPE frequencies, which the model recomputes.
                tensors.discard("rope.freqs");
                let params = self.dir.join("params.json");
                let text =
                    std::fs::read_to_string(&params).map_err(|e| LlamaError::io(&params, e))?;
                let vocab = tensors.shape("tok_embeddings.weight").map(|s| s[0]);
                let ffn = tensors
                    .shape("layers.0.feed_forward.w1.weight")
                    .map(|s| s[0]);
                let config =
                    LlamaConfig::from_meta_json(&text, &params.display().to_string(), vocab, ffn)?;
                Ok((config, tensors, layout))
            }
        }
    }

    /// Loads the model onto `device`.
    ///
    /// # Errors
    /// Unreadable files, every missing, unexpected, mis-shaped or non-finite tensor, and
    /// [`Quantization::KeepGguf`] for a checkpoint that is not a GGUF file.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<Llama<B>> {
        if self.quantization == Quantization::KeepGguf && self.layout()? != CheckpointLayout::Gguf {
            return Err(LlamaError::Quantization(format!(
                "{}: keeping GGUF blocks needs a .gguf file; quantize a dense checkpoint with \
                 nf4 or q8_0 instead",
                self.dir.display()
            )));
        }
        let (config, mut tensors, layout) = self.read()?;
        let model = Builder {
            tensors: &mut tensors,
            layout,
            config: &config,
            device,
            dtype: self.dtype.dtype(),
            quantization: self.quantization,
        }
        .build()?;
        tensors.finish()?;
        Ok(Llama {
            name_or_path: Some(self.dir.display().to_string()),
            ..model
        })
    }
}

fn shard_files(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| LlamaError::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| LlamaError::Json {
        path: index.into(),
        message: e.to_string(),
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| LlamaError::Json {
            path: index.into(),
            message: "no `weight_map` object".into(),
        })?;
    let mut files: Vec<String> = Vec::new();
    for (key, file) in map {
        let file = file.as_str().ok_or_else(|| LlamaError::Json {
            path: index.into(),
            message: format!("weight_map entry '{key}' is not a file name"),
        })?;
        if file.contains('/') || file.contains("..") {
            return Err(LlamaError::Json {
                path: index.into(),
                message: format!(
                    "weight_map entry '{key}' points outside the model directory: {file}"
                ),
            });
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    files.sort();
    Ok(files)
}

/// The model's tensors under Hugging Face names and PyTorch layouts (`[out, in]` weights),
/// as f32 host values with shapes; the tied output head is omitted as `transformers` does.
pub fn hf_tensors<B: Backend>(model: &Llama<B>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("float tensor data converts to f32")
    }
    // A linear's weight (dequantized if quantized), then its bias if it has one.
    let linear =
        |out: &mut Vec<(String, Vec<usize>, Vec<f32>)>, name: String, linear: &FrozenLinear<B>| {
            let (weight, bias) = linear.host_weight();
            let (rows, cols) = (linear.out_features(), linear.in_features());
            out.push((format!("{name}.weight"), vec![rows, cols], weight));
            if let Some(bias) = bias {
                out.push((format!("{name}.bias"), vec![rows], bias));
            }
        };
    let norm = |name: String, norm: &RmsNorm<B>| {
        let width = norm.weight.dims()[0];
        (name, vec![width], host(norm.weight.val()))
    };
    let c = &model.config;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, c.hidden_size],
        host(model.embed_tokens.val()),
    )];
    for (i, layer) in model.layers.iter().enumerate() {
        let p = |name: &str| format!("model.layers.{i}.{name}");
        let attention = &layer.self_attn;
        linear(&mut out, p("self_attn.q_proj"), &attention.q_proj);
        linear(&mut out, p("self_attn.k_proj"), &attention.k_proj);
        linear(&mut out, p("self_attn.v_proj"), &attention.v_proj);
        linear(&mut out, p("self_attn.o_proj"), &attention.o_proj);
        if let Some(q_norm) = &attention.q_norm {
            out.push(norm(p("self_attn.q_norm.weight"), q_norm));
        }
        if let Some(k_norm) = &attention.k_norm {
            out.push(norm(p("self_attn.k_norm.weight"), k_norm));
        }
        linear(&mut out, p("mlp.gate_proj"), &layer.mlp.gate_proj);
        linear(&mut out, p("mlp.up_proj"), &layer.mlp.up_proj);
        linear(&mut out, p("mlp.down_proj"), &layer.mlp.down_proj);
        out.push(norm(p("input_layernorm.weight"), &layer.input_layernorm));
        out.push(norm(
            p("post_attention_layernorm.weight"),
            &layer.post_attention_layernorm,
        ));
    }
    out.push(norm("model.norm.weight".into(), &model.norm));
    if let Some(head) = &model.lm_head {
        linear(
            &mut out,
            "lm_head".into(),
            &FrozenLinear::Dense(head.clone()),
        );
    }
    out
}

/// Writes the model's weights as one Hugging Face `model.safetensors` (float32), through a
/// temporary file and a rename.
///
/// # Errors
/// I/O errors.
pub fn save_hf_safetensors<B: Backend>(model: &Llama<B>, path: &Path) -> Result<()> {
    let tensors = hf_tensors(model);
    let buffers: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), buffer) in tensors.iter().zip(&buffers) {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), buffer)
                .map_err(|e| LlamaError::WeightFile {
                    path: path.into(),
                    message: format!("{name}: {e}"),
                })?;
        views.push((name.clone(), view));
    }
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes =
        safetensors::serialize(views, Some(metadata)).map_err(|e| LlamaError::WeightFile {
            path: path.into(),
            message: e.to_string(),
        })?;
    let temporary = path.with_extension("safetensors.partial");
    let written =
        std::fs::write(&temporary, bytes).and_then(|()| std::fs::rename(&temporary, path));
    if written.is_err() {
        // A failed save leaves nothing behind (removing a file never created fails harmlessly).
        let _ = std::fs::remove_file(&temporary);
    }
    written.map_err(|e| LlamaError::io(path, e))
}
