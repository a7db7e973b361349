//! Named tensors read from checkpoint files (safetensors, PyTorch `.pth`), taken one by one so
//! that whatever a loader did not use can be reported.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use burn_store::pytorch::reader::PickleValue;
use burn_store::pytorch::{PytorchError, PytorchReader};
use burn_store::{ModuleStore, SafetensorsStore, TensorSnapshot};

use crate::error::{CheckpointError, Result};

/// Named tensors read from one or more files, taken one by one so that whatever is left at
/// the end can be reported as unexpected.
pub struct TensorMap {
    origin: String,
    pub(crate) tensors: BTreeMap<String, (TensorSnapshot, PathBuf)>,
    /// The GGUF source of tensors added by [`TensorMap::add_gguf`], for taking their blocks.
    gguf: BTreeMap<String, (std::rc::Rc<crate::gguf::GgufFile>, crate::gguf::GgufTensor)>,
}

impl TensorMap {
    /// An empty map; `origin` names it in error messages.
    pub fn new(origin: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            tensors: BTreeMap::new(),
            gguf: BTreeMap::new(),
        }
    }

    /// The name used in error messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Adds every tensor of a safetensors file.
    ///
    /// # Errors
    /// An unreadable, truncated or corrupt file, or a name already present.
    pub fn add_safetensors(&mut self, path: &Path) -> Result<()> {
        let bad = |message: String| CheckpointError::WeightFile {
            path: path.into(),
            message,
        };
        let metadata = std::fs::metadata(path).map_err(|e| CheckpointError::io(path, e))?;
        if metadata.len() < 8 {
            return Err(bad(format!(
                "{} bytes is too short for a safetensors header",
                metadata.len()
            )));
        }
        let mut store = SafetensorsStore::from_file(path);
        let snapshots = store.get_all_snapshots().map_err(|e| bad(e.to_string()))?;
        for (name, snapshot) in snapshots {
            self.insert(name.clone(), snapshot.clone(), path)?;
        }
        Ok(())
    }

    /// Adds every tensor of a PyTorch `.pth` state dict (read without executing any code).
    ///
    /// # Errors
    /// A pickle that refers to anything but tensor storage or declares more bytes than the
    /// file holds (see [`crate::pickle_check`]), an unreadable or malformed file, a value that is not a tensor (a number, string, list,
    /// `None`, object or empty dict, each named by its key), or a name already present.
    pub fn add_pth(&mut self, path: &Path) -> Result<()> {
        let unreadable = |e: PytorchError| CheckpointError::WeightFile {
            path: path.into(),
            message: e.to_string(),
        };
        // burn-store trusts declared lengths and reads any global; refuse such files first.
        crate::pickle_check::check_pth(path)?;
        let reader = PytorchReader::new(path).map_err(unreadable)?;
        let modern = reader.metadata().is_modern_format();
        let tensors = reader.into_tensors();
        // burn-store keeps the tensors and drops everything else, which would make a `.pth`
        // holding e.g. `"epoch": 3` or a string in place of a weight load as if it were fine.
        // The pickle's structure shows those values. burn-store exposes it for the zip format
        // only (what `torch.save` writes since PyTorch 1.6); older formats are not checked.
        if modern {
            let structure = PytorchReader::read_pickle_data(path, None).map_err(unreadable)?;
            let mut others = Vec::new();
            if let PickleValue::Dict(entries) = &structure {
                non_tensor_values(entries, "", &tensors, &mut others);
            }
            if !others.is_empty() {
                others.sort();
                let list: Vec<String> = others
                    .iter()
                    .map(|(key, what)| format!("key '{key}' holds a non-tensor ({what})"))
                    .collect();
                return Err(CheckpointError::WeightFile {
                    path: path.into(),
                    message: format!(
                        "{}; a state dict here must hold tensors only",
                        list.join(", ")
                    ),
                });
            }
        }
        // A pickle can declare any shape over a small storage; burn-store would allocate the
        // declared size when the tensor is read. No tensor can hold more bytes than the file.
        let file_len = std::fs::metadata(path)
            .map_err(|e| CheckpointError::io(path, e))?
            .len();
        for (name, snapshot) in &tensors {
            let bytes = snapshot
                .shape
                .iter()
                .try_fold(snapshot.dtype.size() as u64, |n, &d| {
                    n.checked_mul(d as u64)
                });
            if bytes.is_none_or(|bytes| bytes > file_len) {
                return Err(CheckpointError::WeightFile {
                    path: path.into(),
                    message: format!(
                        "tensor '{name}' declares shape {:?} of {:?}, more bytes than the whole \
                         file ({file_len})",
                        snapshot.shape.as_slice(),
                        snapshot.dtype
                    ),
                });
            }
        }
        for (name, snapshot) in tensors {
            self.insert(name, snapshot, path)?;
        }
        Ok(())
    }

    /// Adds a tensor of a GGUF file under `name` (the loader's name for it, e.g. a Hugging Face
    /// key), in the GGUF tensor's shape; its data is read and dequantised to f32 only when taken.
    ///
    /// # Errors
    /// A name already present.
    pub fn add_gguf(
        &mut self,
        name: String,
        file: &std::rc::Rc<crate::gguf::GgufFile>,
        tensor: &crate::gguf::GgufTensor,
    ) -> Result<()> {
        let shape = tensor.shape.clone();
        let (reader, source) = (file.clone(), tensor.clone());
        let data = std::rc::Rc::new(move || {
            let values = reader
                .read_f32(&source)
                .map_err(|e| burn_store::TensorSnapshotError::IoError(e.to_string()))?;
            Ok(burn::tensor::TensorData::new(values, source.shape.clone()))
        });
        let snapshot = TensorSnapshot::from_closure(
            data,
            DType::F32,
            shape.into(),
            vec![name.clone()],
            vec![],
            burn::module::ParamId::new(),
        );
        let path = file.path().to_path_buf();
        self.insert(name.clone(), snapshot, &path)?;
        self.gguf.insert(name, (file.clone(), tensor.clone()));
        Ok(())
    }

    /// Takes a GGUF tensor of a quantized block type (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) as a
    /// [`QuantizedMatrix`](crate::quant::QuantizedMatrix) `expected` = `[rows, cols]` holding
    /// the file's blocks; `Ok(None)` (and the tensor left in place) for any other tensor.
    ///
    /// # Errors
    /// A shape other than `expected`, an unreadable file, or blocks that dequantize to a
    /// non-finite value (checked a range of rows at a time).
    pub fn take_gguf_blocks(
        &mut self,
        key: &str,
        expected: [usize; 2],
    ) -> Result<Option<crate::quant::QuantizedMatrix>> {
        use crate::gguf::GgmlType;
        let Some((file, tensor)) = self.gguf.get(key) else {
            return Ok(None);
        };
        if matches!(tensor.kind, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            return Ok(None);
        }
        if tensor.shape != expected {
            return Err(CheckpointError::ShapeMismatch {
                origin: self.origin.clone(),
                key: key.into(),
                expected: expected.to_vec(),
                found: tensor.shape.clone(),
            });
        }
        let [rows, cols] = expected;
        let bytes = file.read_bytes(tensor)?;
        let matrix = crate::quant::QuantizedMatrix::from_ggml(tensor.kind, rows, cols, bytes)
            .map_err(|e| CheckpointError::WeightFile {
                path: file.path().into(),
                message: format!("tensor '{}': {e}", tensor.name),
            })?;
        let per_check = (1 << 20) / cols + 1;
        for start in (0..rows).step_by(per_check) {
            let range = start..(start + per_check).min(rows);
            if matrix.dequantize_rows(range).iter().any(|v| !v.is_finite()) {
                return Err(CheckpointError::NonFinite {
                    origin: self.origin.clone(),
                    key: key.into(),
                });
            }
        }
        self.gguf.remove(key);
        self.tensors.remove(key);
        Ok(Some(matrix))
    }

    fn insert(&mut self, name: String, snapshot: TensorSnapshot, path: &Path) -> Result<()> {
        if let Some((_, first)) = self.tensors.get(&name) {
            return Err(CheckpointError::WeightFile {
                path: path.into(),
                message: format!("tensor '{name}' is also in {}", first.display()),
            });
        }
        self.tensors.insert(name, (snapshot, path.to_path_buf()));
        Ok(())
    }

    /// Whether a tensor of that name is (still) present.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// The shape of a tensor, if present.
    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).map(|(s, _)| s.shape.to_vec())
    }

    /// Names still present.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Removes a tensor without reading it (for tensors a format carries but the model derives).
    pub fn discard(&mut self, key: &str) {
        self.tensors.remove(key);
        self.gguf.remove(key);
    }

    /// Takes a tensor, checks its shape and values, and returns it as f32 in row-major order.
    ///
    /// # Errors
    /// Missing, mis-shaped, unreadable, or non-finite.
    pub fn take_f32(&mut self, key: &str, expected: &[usize]) -> Result<Vec<f32>> {
        self.gguf.remove(key);
        let (snapshot, path) =
            self.tensors
                .remove(key)
                .ok_or_else(|| CheckpointError::MissingTensor {
                    origin: self.origin.clone(),
                    key: key.into(),
                    expected: expected.to_vec(),
                })?;
        let found = snapshot.shape.to_vec();
        if found != expected {
            return Err(CheckpointError::ShapeMismatch {
                origin: self.origin.clone(),
                key: key.into(),
                expected: expected.to_vec(),
                found,
            });
        }
        let data = snapshot
            .to_data()
            .map_err(|e| CheckpointError::WeightFile {
                path: path.clone(),
                message: format!("tensor '{key}': {e:?}"),
            })?;
        let values = match data.dtype {
            DType::F32 => data.into_vec::<f32>(),
            DType::F64 | DType::F16 | DType::BF16 => data.convert::<f32>().into_vec::<f32>(),
            other => {
                return Err(CheckpointError::WeightFile {
                    path,
                    message: format!("tensor '{key}' has dtype {other:?}, expected a float type"),
                })
            }
        }
        .map_err(|e| CheckpointError::WeightFile {
            path: path.clone(),
            message: format!("tensor '{key}': {e:?}"),
        })?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(CheckpointError::NonFinite {
                origin: self.origin.clone(),
                key: key.into(),
            });
        }
        Ok(values)
    }

    /// Fails if any tensor was not taken.
    ///
    /// # Errors
    /// [`CheckpointError::UnexpectedTensors`] listing them.
    pub fn finish(self) -> Result<()> {
        if self.tensors.is_empty() {
            Ok(())
        } else {
            Err(CheckpointError::UnexpectedTensors {
                origin: self.origin,
                keys: self.tensors.into_keys().collect(),
            })
        }
    }
}

/// Collects `(key, what it holds)` for every leaf of a pickled dict that is not one of `tensors`,
/// with keys joined by `.` as burn-store names the tensors of nested dicts.
fn non_tensor_values(
    entries: &HashMap<String, PickleValue>,
    prefix: &str,
    tensors: &HashMap<String, TensorSnapshot>,
    out: &mut Vec<(String, &'static str)>,
) {
    for (key, value) in entries {
        let key = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            PickleValue::Dict(nested) if !nested.is_empty() => {
                non_tensor_values(nested, &key, tensors, out)
            }
            // burn-store shows tensors (and objects, and `None`) as `None` in the structure.
            _ if tensors.contains_key(&key) => {}
            other => out.push((key, pickle_kind(other))),
        }
    }
}

fn pickle_kind(value: &PickleValue) -> &'static str {
    match value {
        PickleValue::None => "None or a Python object",
        PickleValue::Bool(_) => "a boolean",
        PickleValue::Int(_) => "an integer",
        PickleValue::Float(_) => "a float",
        PickleValue::String(_) => "a string",
        PickleValue::List(_) => "a list or tuple",
        PickleValue::Dict(_) => "an empty dict",
        PickleValue::Bytes(_) => "raw bytes",
    }
}

/// Transposes a row-major `[rows, cols]` matrix.
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}
