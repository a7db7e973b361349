//! Hugging Face PEFT's adapter directories, both ways: `adapter_config.json` and
//! `adapter_model.safetensors` (metadata `{"format": "pt"}`), with PEFT's key names and shapes.
//!
//! Files written here load in Python with `PeftModel.from_pretrained` and give our logits;
//! directories PEFT writes load here and give its logits. Tested by this crate's
//! `tests/parity.rs` (PEFT's own files against its logits and gradients) and
//! `tests/adapter_files.rs` (round trips, every malformed file), and by the repository's
//! `scripts/check_rust_adapters.py` (our files loaded by PEFT in Python).

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use peft_io::files::{read_json, write_dir_atomic_dropping};
use peft_io::TensorMap;
use serde_json::{json, Value};

use crate::adapter::{Adapter, NamedTensor};
use crate::error::{PeftError, Result};
use crate::model::AdaptableModel;

/// The configuration file of a PEFT adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The tensor file of a PEFT adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

fn format_error(path: &Path, message: impl Into<String>) -> PeftError {
    PeftError::Format {
        path: path.into(),
        message: message.into(),
    }
}

/// A PEFT directory's `adapter_config.json` as a method reads it ([`FromPeft`]): typed fields
/// whose errors name the file and the key.
#[derive(Debug, Clone, Copy)]
pub struct PeftConfigFile<'a> {
    /// The parsed JSON.
    pub value: &'a Value,
    /// Where it was read from.
    pub path: &'a Path,
}

impl PeftConfigFile<'_> {
    /// An error about this file.
    pub fn error(&self, message: impl Into<String>) -> PeftError {
        format_error(self.path, message)
    }

    /// A field that must be present and not null.
    ///
    /// # Errors
    /// The field is missing or null.
    pub fn field(&self, key: &str) -> Result<&Value> {
        self.value
            .get(key)
            .filter(|v| !v.is_null())
            .ok_or_else(|| self.error(format!("`{key}` is missing")))
    }

    /// An optional field (absent and null are `None`).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    /// A non-negative integer field.
    ///
    /// # Errors
    /// Missing or not a non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.field(key)?
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| self.error(format!("`{key}` must be a non-negative integer")))
    }

    /// A number field.
    ///
    /// # Errors
    /// Missing or not a number.
    pub fn f64(&self, key: &str) -> Result<f64> {
        self.field(key)?
            .as_f64()
            .ok_or_else(|| self.error(format!("`{key}` must be a number")))
    }

    /// A boolean field, `default` when absent or null.
    ///
    /// # Errors
    /// Present and not a boolean.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(self.error(format!("`{key}` must be true or false"))),
        }
    }

    /// Fails on a setting this crate does not implement, rather than ignoring it: `key`, when
    /// present, must satisfy `allowed`.
    ///
    /// # Errors
    /// The setting is present with a value `allowed` refuses.
    pub fn refuse(&self, key: &str, allowed: impl Fn(&Value) -> bool) -> Result<()> {
        match self.value.get(key) {
            Some(value) if !allowed(value) => {
                Err(self.error(format!("`{key}` = {value} is not supported by this crate")))
            }
            _ => Ok(()),
        }
    }
}

/// A method whose adapters load from PEFT's files. Each method implements it in its own file,
/// beside its [`Adapter::peft_config`]; this module keeps only the directory layout.
pub trait FromPeft<B: Backend>: Sized {
    /// The `peft_type` it reads (`LORA`).
    const PEFT_TYPE: &'static str;

    /// Builds the adapter for `model` from the configuration and the file's tensors. Every tensor
    /// it takes is checked for shape and finiteness by [`TensorMap::take_f32`]; those it leaves
    /// are reported as unexpected.
    ///
    /// # Errors
    /// A setting the method does not implement or that does not fit `model`, a missing or
    /// mis-shaped tensor.
    fn from_peft(
        config: &PeftConfigFile<'_>,
        tensors: &mut TensorMap,
        model: &dyn AdaptableModel<B>,
        device: &B::Device,
    ) -> Result<Self>;
}

/// A tensor from host values.
pub(crate) fn tensor<B: Backend, const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Reads the `peft_type` of an adapter directory's configuration.
///
/// # Errors
/// Missing or malformed `adapter_config.json`.
pub fn read_peft_type(dir: &Path) -> Result<String> {
    let path = dir.join(CONFIG_FILE);
    let config = read_json(&path)?;
    let file = PeftConfigFile {
        value: &config,
        path: &path,
    };
    Ok(file
        .field("peft_type")?
        .as_str()
        .ok_or_else(|| format_error(&path, "`peft_type` must be a string"))?
        .to_string())
}

/// Loads a PEFT adapter directory as method `A` (a built-in one or one's own) for `model`.
///
/// # Errors
/// A missing or malformed file, a `peft_type` other than `A`'s, a `task_type` other than the
/// model's, what `A::from_peft` refuses, and every tensor of the file `A` does not take.
pub fn load_peft_as<B: Backend, A: FromPeft<B>>(
    dir: &Path,
    model: &dyn AdaptableModel<B>,
    device: &B::Device,
) -> Result<A> {
    let config_path = dir.join(CONFIG_FILE);
    let config = read_json(&config_path)?;
    let file = PeftConfigFile {
        value: &config,
        path: &config_path,
    };
    if let (Some(task), Some(expected)) = (
        config.get("task_type").and_then(Value::as_str),
        model.task_type(),
    ) {
        if task != expected {
            return Err(file.error(format!(
                "task_type `{task}` is not {expected}, this model's task"
            )));
        }
    }
    let peft_type = file
        .field("peft_type")?
        .as_str()
        .ok_or_else(|| file.error("`peft_type` must be a string"))?;
    if peft_type != A::PEFT_TYPE {
        return Err(file.error(format!(
            "peft_type `{peft_type}`, expected `{}`",
            A::PEFT_TYPE
        )));
    }
    let weights = dir.join(WEIGHTS_FILE);
    let mut tensors = TensorMap::new(weights.display().to_string());
    tensors.add_safetensors(&weights)?;
    let adapter = A::from_peft(&file, &mut tensors, model, device)?;
    tensors.finish()?;
    Ok(adapter)
}

/// The configuration PEFT would write for `adapter`: the fields every method shares
/// (`peft_type`, `task_type`, `base_model_name_or_path`, ...) and the method's own
/// ([`Adapter::peft_config`]).
///
/// # Errors
/// What the method's [`Adapter::peft_config`] refuses (a per-head gated adaption prompt, a method
/// with no PEFT form).
pub fn peft_config<B: Backend, A: Adapter<B>>(
    adapter: &A,
    model: &dyn AdaptableModel<B>,
) -> Result<Value> {
    let mut config = json!({
        "peft_type": adapter.method().peft_type(),
        "task_type": model.task_type(),
        "inference_mode": true,
        "base_model_name_or_path": model.name_or_path(),
        "revision": null,
        "auto_mapping": null,
    });
    let own = adapter.peft_config(model)?;
    if let (Value::Object(target), Value::Object(own)) = (&mut config, own) {
        target.extend(own);
    }
    if let Value::Object(map) = &mut config {
        map.insert("peft_version".into(), json!("0.21.2"));
    }
    Ok(config)
}

/// Serialises named tensors as a safetensors file with PEFT's metadata.
///
/// # Errors
/// Shapes that do not match the values.
pub fn safetensors_bytes(tensors: &[NamedTensor], path: &Path) -> Result<Vec<u8>> {
    let buffers: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for (tensor, buffer) in tensors.iter().zip(&buffers) {
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            tensor.shape.clone(),
            buffer,
        )
        .map_err(|e| format_error(path, format!("tensor '{}': {e}", tensor.key)))?;
        views.push((tensor.key.clone(), view));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata)).map_err(|e| format_error(path, e.to_string()))
}

/// Saves `adapter` as a PEFT directory, created if needed and replaced as a whole: a crash
/// leaves the old adapter or the new one (see [`peft_io::files::write_dir_atomic`]).
///
/// # Errors
/// See [`peft_config`]; I/O errors.
pub fn save_peft<B: Backend, A: Adapter<B>>(
    adapter: &A,
    model: &dyn AdaptableModel<B>,
    dir: &Path,
) -> Result<()> {
    save_peft_dropping(adapter, model, dir, &[])
}

/// [`save_peft`], removing the files `drop` (another format's adapter) in the same step.
pub(crate) fn save_peft_dropping<B: Backend, A: Adapter<B>>(
    adapter: &A,
    model: &dyn AdaptableModel<B>,
    dir: &Path,
    drop: &[&str],
) -> Result<()> {
    let config = peft_config(adapter, model)?;
    let tensors = adapter.peft_tensors()?;
    let weights = dir.join(WEIGHTS_FILE);
    let bytes = safetensors_bytes(&tensors, &weights)?;
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialise");
    Ok(write_dir_atomic_dropping(
        dir,
        &[(WEIGHTS_FILE, &bytes), (CONFIG_FILE, text.as_bytes())],
        drop,
    )?)
}
