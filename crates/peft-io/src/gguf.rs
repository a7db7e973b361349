//! GGUF files (llama.cpp, Ollama): the container (header, metadata, tensor infos, alignment) and
//! the dequantisation of its tensor blocks to f32.
//!
//! Nothing a header claims is allocated before it is checked against the bytes the file really
//! holds: every string, array and tensor must fit in what is left of the file, arrays nest at most
//! [`MAX_DEPTH`] deep, tensors have at most [`MAX_DIMS`] dimensions and lie inside the data section.
//! Tensor data is read one tensor at a time, when asked for ([`GgufFile::read_f32`]).
//!
//! Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K (block layouts as
//! ggml's `ggml-quants.c` defines them). A file holding any other type is refused when opened,
//! naming the tensor and the type.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::error::{CheckpointError, Result};

/// The four bytes every GGUF file starts with.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Deepest nesting of metadata arrays accepted.
pub const MAX_DEPTH: usize = 4;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Alignment of the data section when `general.alignment` does not say.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The element types of ggml tensors this reader dequantises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of 32: an f16 scale and 32 signed bytes.
    Q8_0,
    /// Blocks of 32: an f16 scale and 32 4-bit values offset by 8.
    Q4_0,
    /// Blocks of 32: f16 scale and minimum, 32 4-bit values.
    Q4_1,
    /// Super-blocks of 256: 8 sub-blocks with 6-bit scales and minimums, 4-bit values.
    Q4_K,
    /// Super-blocks of 256: as Q4_K with a fifth bit per value.
    Q5_K,
    /// Super-blocks of 256: 16 sub-blocks with 8-bit scales, 6-bit values.
    Q6_K,
}

impl GgmlType {
    /// The type of ggml's numeric id, or `None` for the types this reader does not handle.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// ggml's numeric id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::BF16 => 30,
        }
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q8_0 | Self::Q4_0 | Self::Q4_1 => 32,
            Self::Q4_K | Self::Q5_K | Self::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
        }
    }
}

/// The name of a ggml type id, for error messages (`IQ4_XS` rather than `23`).
fn type_name(id: u32) -> String {
    const NAMES: [&str; 42] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
        "NVFP4",
        "Q1_0",
    ];
    match NAMES.get(id as usize) {
        Some(name) => format!("{name} (type {id})"),
        None => format!("unknown type {id}"),
    }
}

/// A metadata array, stored compactly by element type.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    /// `UINT8`
    U8(Vec<u8>),
    /// `INT8`
    I8(Vec<i8>),
    /// `UINT16`
    U16(Vec<u16>),
    /// `INT16`
    I16(Vec<i16>),
    /// `UINT32`
    U32(Vec<u32>),
    /// `INT32`
    I32(Vec<i32>),
    /// `FLOAT32`
    F32(Vec<f32>),
    /// `BOOL`
    Bool(Vec<bool>),
    /// `STRING`
    String(Vec<String>),
    /// `UINT64`
    U64(Vec<u64>),
    /// `INT64`
    I64(Vec<i64>),
    /// `FLOAT64`
    F64(Vec<f64>),
    /// `ARRAY` of arrays.
    Array(Vec<GgufArray>),
}

impl GgufArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U16(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::String(v) => v.len(),
            Self::U64(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::F64(v) => v.len(),
            Self::Array(v) => v.len(),
        }
    }

    /// Whether the array has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as integers, if they are integers (of any width).
    pub fn as_i64s(&self) -> Option<Vec<i64>> {
        Some(match self {
            Self::U8(v) => v.iter().map(|&x| i64::from(x)).collect(),
            Self::I8(v) => v.iter().map(|&x| i64::from(x)).collect(),
            Self::U16(v) => v.iter().map(|&x| i64::from(x)).collect(),
            Self::I16(v) => v.iter().map(|&x| i64::from(x)).collect(),
            Self::U32(v) => v.iter().map(|&x| i64::from(x)).collect(),
            Self::I32(v) => v.iter().map(|&x| i64::from(x)).collect(),
            Self::U64(v) => v
                .iter()
                .map(|&x| i64::try_from(x).ok())
                .collect::<Option<_>>()?,
            Self::I64(v) => v.clone(),
            _ => return None,
        })
    }

    /// The elements as floats, if they are numbers.
    pub fn as_f32s(&self) -> Option<Vec<f32>> {
        match self {
            Self::F32(v) => Some(v.clone()),
            Self::F64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            other => Some(other.as_i64s()?.iter().map(|&x| x as f32).collect()),
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// An unsigned integer (`UINT8/16/32/64`).
    Uint(u64),
    /// A signed integer (`INT8/16/32/64`).
    Int(i64),
    /// A float (`FLOAT32/64`).
    Float(f64),
    /// `BOOL`
    Bool(bool),
    /// `STRING`
    String(String),
    /// `ARRAY`
    Array(GgufArray),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Self::Uint(v) => Some(*v),
            Self::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Self::Float(v) => Some(*v),
            Self::Uint(v) => Some(*v as f64),
            Self::Int(v) => Some(*v as f64),
            _ => None,
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Self::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A tensor's description in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    /// The name (`blk.0.attn_q.weight`).
    pub name: String,
    /// The shape in PyTorch order (outermost first): ggml's `ne` reversed, so that a linear
    /// weight is `[out, in]` as in a Hugging Face checkpoint.
    pub shape: Vec<usize>,
    /// The element type.
    pub kind: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub n_bytes: u64,
}

impl GgufTensor {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An opened GGUF file: its metadata and tensor infos, with the data left on disk.
#[derive(Debug, Clone)]
pub struct GgufFile {
    path: PathBuf,
    /// The format version (2 or 3).
    pub version: u32,
    /// The key-value metadata, by key.
    pub metadata: BTreeMap<String, GgufValue>,
    /// The tensors, in file order.
    pub tensors: Vec<GgufTensor>,
    data_start: u64,
}

/// A reader that knows how many bytes are left, so that no claimed length is trusted.
struct Bounded<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Bounded<R> {
    fn bytes<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        self.claim(N as u64, what)?;
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| format!("{what}: {e}"))?;
        Ok(buf)
    }

    fn claim(&mut self, n: u64, what: &str) -> std::result::Result<(), String> {
        if n > self.remaining {
            return Err(format!(
                "{what} needs {n} bytes but only {} are left in the file (truncated or corrupt)",
                self.remaining
            ));
        }
        self.remaining -= n;
        Ok(())
    }

    fn u8(&mut self, what: &str) -> std::result::Result<u8, String> {
        Ok(self.bytes::<1>(what)?[0])
    }
    fn bool(&mut self, what: &str) -> std::result::Result<bool, String> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!(
                "metadata `{what}`: bool byte {b} is neither 0 nor 1"
            )),
        }
    }
    fn u16(&mut self, what: &str) -> std::result::Result<u16, String> {
        Ok(u16::from_le_bytes(self.bytes(what)?))
    }
    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }
    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// A count of items each at least `min_bytes` long, checked against what is left.
    fn count(&mut self, min_bytes: u64, what: &str) -> std::result::Result<usize, String> {
        let n = self.u64(what)?;
        if n.checked_mul(min_bytes).is_none_or(|b| b > self.remaining) {
            return Err(format!(
                "{what} is {n}, more than the {} bytes left in the file can hold",
                self.remaining
            ));
        }
        usize::try_from(n).map_err(|_| format!("{what} {n} does not fit in memory"))
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.count(1, what)?;
        self.claim(n as u64, what)?;
        let mut buf = vec![0u8; n];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| format!("{what}: {e}"))?;
        String::from_utf8(buf).map_err(|_| format!("{what} is not UTF-8"))
    }
}

/// The smallest encoding of one value of a metadata type, for bounding counts.
fn min_value_bytes(kind: u32) -> u64 {
    match kind {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        // A string is its u64 length; an array its u32 type and u64 count.
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}

fn read_value<R: Read>(
    r: &mut Bounded<R>,
    kind: u32,
    key: &str,
    depth: usize,
) -> std::result::Result<GgufValue, String> {
    Ok(match kind {
        0 => GgufValue::Uint(u64::from(r.u8(key)?)),
        1 => GgufValue::Int(i64::from(r.u8(key)? as i8)),
        2 => GgufValue::Uint(u64::from(r.u16(key)?)),
        3 => GgufValue::Int(i64::from(r.u16(key)? as i16)),
        4 => GgufValue::Uint(u64::from(r.u32(key)?)),
        5 => GgufValue::Int(i64::from(r.u32(key)? as i32)),
        6 => GgufValue::Float(f64::from(f32::from_bits(r.u32(key)?))),
        7 => GgufValue::Bool(r.bool(key)?),
        8 => GgufValue::String(r.string(key)?),
        9 => GgufValue::Array(read_array(r, key, depth + 1)?),
        10 => GgufValue::Uint(r.u64(key)?),
        11 => GgufValue::Int(r.u64(key)? as i64),
        12 => GgufValue::Float(f64::from_bits(r.u64(key)?)),
        other => return Err(format!("metadata `{key}` has unknown value type {other}")),
    })
}

fn read_array<R: Read>(
    r: &mut Bounded<R>,
    key: &str,
    depth: usize,
) -> std::result::Result<GgufArray, String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "metadata `{key}`: arrays nested deeper than {MAX_DEPTH}"
        ));
    }
    let kind = r.u32(key)?;
    let n = r.count(
        min_value_bytes(kind),
        &format!("metadata `{key}` array length"),
    )?;
    macro_rules! collect {
        ($variant:ident, $read:expr) => {{
            let mut values = Vec::with_capacity(n);
            for _ in 0..n {
                values.push($read);
            }
            GgufArray::$variant(values)
        }};
    }
    Ok(match kind {
        0 => collect!(U8, r.u8(key)?),
        1 => collect!(I8, r.u8(key)? as i8),
        2 => collect!(U16, r.u16(key)?),
        3 => collect!(I16, r.u16(key)? as i16),
        4 => collect!(U32, r.u32(key)?),
        5 => collect!(I32, r.u32(key)? as i32),
        6 => collect!(F32, f32::from_bits(r.u32(key)?)),
        7 => collect!(Bool, r.bool(key)?),
        8 => collect!(String, r.string(key)?),
        9 => collect!(Array, read_array(r, key, depth + 1)?),
        10 => collect!(U64, r.u64(key)?),
        11 => collect!(I64, r.u64(key)? as i64),
        12 => collect!(F64, f64::from_bits(r.u64(key)?)),
        other => {
            return Err(format!(
                "metadata `{key}` is an array of unknown type {other}"
            ))
        }
    })
}

impl GgufFile {
    /// Reads the header of the GGUF file at `path` (metadata and tensor infos), checking that
    /// every tensor lies inside the file.
    ///
    /// # Errors
    /// An unreadable file; a wrong magic or version; anything truncated; lengths, counts or
    /// offsets beyond the file; a tensor type outside [`GgmlType`]; duplicate names.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| CheckpointError::io(path, e))?
            .len();
        let mut reader = Bounded {
            inner: BufReader::new(file),
            remaining: file_len,
        };
        Self::parse(&mut reader, path, file_len).map_err(|message| CheckpointError::WeightFile {
            path: path.into(),
            message: format!("GGUF: {message}"),
        })
    }

    /// Reads a GGUF header from memory (the tensor data is not read): for checking a header
    /// without a file, and for fuzzing. [`GgufFile::read_f32`] on the result reads `origin` as a
    /// path.
    ///
    /// # Errors
    /// As [`GgufFile::open`].
    pub fn parse_bytes(bytes: &[u8], origin: impl AsRef<Path>) -> Result<Self> {
        let path = origin.as_ref();
        let mut reader = Bounded {
            inner: bytes,
            remaining: bytes.len() as u64,
        };
        Self::parse(&mut reader, path, bytes.len() as u64).map_err(|message| {
            CheckpointError::WeightFile {
                path: path.into(),
                message: format!("GGUF: {message}"),
            }
        })
    }

    fn parse<R: Read>(
        r: &mut Bounded<R>,
        path: &Path,
        file_len: u64,
    ) -> std::result::Result<Self, String> {
        let magic = r.bytes::<4>("the magic number")?;
        if &magic != MAGIC {
            return Err(format!(
                "not a GGUF file: it starts with {magic:?}, not \"GGUF\""
            ));
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(format!("version {version} is not supported (2 and 3 are)"));
        }
        // A tensor info is at least a name length, a dimension count, a type and an offset.
        let n_tensors = r.count(8 + 4 + 4 + 8, "the tensor count")?;
        // A key-value pair is at least a key length, a type and one byte.
        let n_kv = r.count(8 + 4 + 1, "the metadata count")?;
        let mut metadata = BTreeMap::new();
        for index in 0..n_kv {
            let key = r.string(&format!("metadata key {index}"))?;
            let kind = r.u32(&key)?;
            let value = read_value(r, kind, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(format!("metadata key `{key}` appears twice"));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(value) => value
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| {
                    format!("general.alignment {value:?} is not a positive power of two")
                })?,
        };
        let mut tensors: Vec<GgufTensor> = Vec::with_capacity(n_tensors);
        let mut names = std::collections::HashSet::new();
        for index in 0..n_tensors {
            let name = r.string(&format!("tensor name {index}"))?;
            let n_dims = r.u32(&name)? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(format!(
                    "tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
                ));
            }
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                ne.push(r.u64(&name)?);
            }
            let type_id = r.u32(&name)?;
            let kind = GgmlType::from_id(type_id).ok_or_else(|| {
                format!(
                    "tensor `{name}` has {}, which this reader does not dequantise \
                     (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)",
                    type_name(type_id)
                )
            })?;
            let offset = r.u64(&name)?;
            let count = ne.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
            let count = count.filter(|&c| c > 0 && c <= file_len.saturating_mul(8));
            let Some(count) = count else {
                return Err(format!(
                    "tensor `{name}` claims dimensions {ne:?}, empty or far more values than \
                     the file can hold"
                ));
            };
            let block = kind.block_values() as u64;
            if ne[0] % block != 0 {
                return Err(format!(
                    "tensor `{name}`: its rows of {} values are not whole {kind:?} blocks of {block}",
                    ne[0]
                ));
            }
            let n_bytes = count / block * kind.block_bytes() as u64;
            if offset % alignment != 0 {
                return Err(format!(
                    "tensor `{name}` starts at offset {offset}, not a multiple of the alignment \
                     {alignment}"
                ));
            }
            if !names.insert(name.clone()) {
                return Err(format!("tensor `{name}` appears twice"));
            }
            let shape = ne
                .iter()
                .rev()
                .map(|&d| usize::try_from(d))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| format!("tensor `{name}` has a dimension beyond usize"))?;
            tensors.push(GgufTensor {
                name,
                shape,
                kind,
                offset,
                n_bytes,
            });
        }
        let header_end = file_len - r.remaining;
        let data_start = header_end.div_ceil(alignment) * alignment;
        let data_len = file_len.saturating_sub(data_start);
        for tensor in &tensors {
            if tensor
                .offset
                .checked_add(tensor.n_bytes)
                .is_none_or(|end| end > data_len)
            {
                return Err(format!(
                    "tensor `{}` lies at bytes {}..+{} of a data section of {data_len} bytes \
                     (truncated file or lying offset)",
                    tensor.name, tensor.offset, tensor.n_bytes
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// A tensor's description, by name.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Reads a tensor's data and dequantises it to f32 (row-major, in [`GgufTensor::shape`]).
    ///
    /// # Errors
    /// The file changed or became unreadable since it was opened.
    pub fn read_f32(&self, tensor: &GgufTensor) -> Result<Vec<f32>> {
        Ok(dequantize(tensor.kind, &self.read_bytes(tensor)?))
    }

    /// Reads a tensor's data as the file stores it (its blocks, for a quantized type).
    ///
    /// # Errors
    /// The file changed or became unreadable since it was opened.
    pub fn read_bytes(&self, tensor: &GgufTensor) -> Result<Vec<u8>> {
        let io = |e| CheckpointError::io(&self.path, e);
        let mut file = File::open(&self.path).map_err(io)?;
        file.seek(SeekFrom::Start(self.data_start + tensor.offset))
            .map_err(io)?;
        // n_bytes was checked against the file's length when it was opened.
        let mut bytes = vec![0u8; tensor.n_bytes as usize];
        file.read_exact(&mut bytes).map_err(io)?;
        Ok(bytes)
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Q4_K/Q5_K: the 6-bit scale and minimum of sub-block `j` from the 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        (f32::from(q[j] & 63), f32::from(q[j + 4] & 63))
    } else {
        (
            f32::from((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)),
            f32::from((q[j + 4] >> 4) | ((q[j] >> 6) << 4)),
        )
    }
}

/// Dequantises whole blocks of `kind` to f32. `bytes` must hold whole blocks (a trailing
/// partial block is ignored).
pub fn dequantize(kind: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0.0; bytes.len() / kind.block_bytes() * kind.block_values()];
    dequantize_into(kind, bytes, &mut out);
    out
}

/// [`dequantize`] into `out`, which holds exactly the values of `bytes`' whole blocks.
///
/// # Panics
/// `out` of another length.
pub fn dequantize_into(kind: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let blocks = bytes.chunks_exact(kind.block_bytes());
    let values = kind.block_values();
    assert_eq!(
        out.len(),
        blocks.len() * values,
        "dequantize_into: output length"
    );
    // One loop per kind over fixed-size blocks, so that each block's loop vectorizes.
    let outs = out.chunks_exact_mut(values);
    match kind {
        GgmlType::F32 => blocks
            .zip(outs)
            .for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        GgmlType::F16 => blocks.zip(outs).for_each(|(b, y)| y[0] = f16_at(b, 0)),
        GgmlType::BF16 => blocks
            .zip(outs)
            .for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::Q8_0 => blocks.zip(outs).for_each(|(b, y)| {
            let d = f16_at(b, 0);
            for (y, &q) in y.iter_mut().zip(&b[2..34]) {
                *y = d * f32::from(q as i8);
            }
        }),
        GgmlType::Q4_0 => blocks.zip(outs).for_each(|(b, y)| {
            let d = f16_at(b, 0);
            let (low, high) = y.split_at_mut(16);
            for ((l, h), &q) in low.iter_mut().zip(high).zip(&b[2..18]) {
                *l = d * (f32::from(q & 0xF) - 8.0);
                *h = d * (f32::from(q >> 4) - 8.0);
            }
        }),
        GgmlType::Q4_1 => blocks.zip(outs).for_each(|(b, y)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let (low, high) = y.split_at_mut(16);
            for ((l, h), &q) in low.iter_mut().zip(high).zip(&b[4..20]) {
                *l = d * f32::from(q & 0xF) + m;
                *h = d * f32::from(q >> 4) + m;
            }
        }),
        GgmlType::Q4_K => blocks.zip(outs).for_each(|(b, y)| {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            for (chunk, (qs, y)) in b[16..144]
                .chunks_exact(32)
                .zip(y.chunks_exact_mut(64))
                .enumerate()
            {
                let (s1, m1) = scale_min_k4(2 * chunk, scales);
                let (s2, m2) = scale_min_k4(2 * chunk + 1, scales);
                let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
                let (low, high) = y.split_at_mut(32);
                for ((l, h), &q) in low.iter_mut().zip(high).zip(qs) {
                    *l = d1 * f32::from(q & 0xF) - m1;
                    *h = d2 * f32::from(q >> 4) - m2;
                }
            }
        }),
        GgmlType::Q5_K => blocks.zip(outs).for_each(|(b, y)| {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let qh = &b[16..48];
            for (chunk, (ql, y)) in b[48..176]
                .chunks_exact(32)
                .zip(y.chunks_exact_mut(64))
                .enumerate()
            {
                let (s1, m1) = scale_min_k4(2 * chunk, scales);
                let (s2, m2) = scale_min_k4(2 * chunk + 1, scales);
                let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
                let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
                let high = |h: u8, u: u8| if h & u != 0 { 16.0 } else { 0.0 };
                let (low_y, high_y) = y.split_at_mut(32);
                for (((l, hy), &q), &h) in low_y.iter_mut().zip(high_y).zip(ql).zip(qh) {
                    *l = d1 * (f32::from(q & 0xF) + high(h, u1)) - m1;
                    *hy = d2 * (f32::from(q >> 4) + high(h, u2)) - m2;
                }
            }
        }),
        GgmlType::Q6_K => blocks.zip(outs).for_each(|(b, y)| {
            let d = f16_at(b, 208);
            for half in 0..2 {
                let ql = &b[half * 64..half * 64 + 64];
                let qh = &b[128 + half * 32..128 + half * 32 + 32];
                let sc = &b[192 + half * 8..192 + half * 8 + 8];
                let y = &mut y[half * 128..half * 128 + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let value = |low: u8, shift: u32| {
                        f32::from((low | (((qh[l] >> shift) & 3) << 4)) as i8 - 32)
                    };
                    let scale = |k: usize| d * f32::from(sc[is + k] as i8);
                    y[l] = scale(0) * value(ql[l] & 0xF, 0);
                    y[l + 32] = scale(2) * value(ql[l + 32] & 0xF, 2);
                    y[l + 64] = scale(4) * value(ql[l] >> 4, 4);
                    y[l + 96] = scale(6) * value(ql[l + 32] >> 4, 6);
                }
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TensorMap;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/gguf")
            .join(name)
    }

    #[test]
    fn every_block_type_dequantises_as_gguf_py_does() {
        let file = GgufFile::open(fixture("blocks.gguf")).unwrap();
        assert_eq!(file.version, 3);
        assert_eq!(file.data_start % 64, 0, "general.alignment 64 is honoured");
        assert_eq!(
            file.get("test.note").and_then(GgufValue::as_str),
            Some("one tensor per block type")
        );
        let nested = file
            .get("test.nested")
            .and_then(GgufValue::as_array)
            .unwrap();
        assert!(matches!(nested, GgufArray::Array(items) if items.len() == 2));
        let mut expected = TensorMap::new("blocks_expected");
        expected
            .add_safetensors(&fixture("blocks_expected.safetensors"))
            .unwrap();
        let names = [
            "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k",
        ];
        assert_eq!(file.tensors.len(), names.len());
        for name in names {
            let tensor = file.tensor(name).unwrap();
            assert_eq!(tensor.shape, [2, 512], "{name}");
            let got = file.read_f32(tensor).unwrap();
            let want = expected.take_f32(name, &[2, 512]).unwrap();
            let worst = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
                .fold(0f32, f32::max);
            // The same products as gguf-py's numpy code, in f32: equal up to rounding order.
            assert!(worst <= 1e-6, "{name}: relative error {worst}");
            assert!(want.iter().any(|&v| v != 0.0), "{name} is all zeros");
        }
        expected.finish().unwrap();
    }

    /// A GGUF v3 file by hand: one string metadata entry and one F32 tensor of 8 values.
    struct Builder {
        kv: Vec<u8>,
        n_kv: u64,
        infos: Vec<u8>,
        n_tensors: u64,
        data: Vec<u8>,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                kv: Vec::new(),
                n_kv: 0,
                infos: Vec::new(),
                n_tensors: 0,
                data: Vec::new(),
            }
        }
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        fn kv_string(mut self, key: &str, value: &str) -> Self {
            Self::string(&mut self.kv, key);
            self.kv.extend(8u32.to_le_bytes());
            Self::string(&mut self.kv, value);
            self.n_kv += 1;
            self
        }
        fn kv_raw(mut self, key: &str, kind: u32, value: &[u8]) -> Self {
            Self::string(&mut self.kv, key);
            self.kv.extend(kind.to_le_bytes());
            self.kv.extend(value);
            self.n_kv += 1;
            self
        }
        fn tensor(mut self, name: &str, ne: &[u64], kind: u32, offset: u64) -> Self {
            Self::string(&mut self.infos, name);
            self.infos.extend((ne.len() as u32).to_le_bytes());
            for d in ne {
                self.infos.extend(d.to_le_bytes());
            }
            self.infos.extend(kind.to_le_bytes());
            self.infos.extend(offset.to_le_bytes());
            self.n_tensors += 1;
            self
        }
        fn data(mut self, bytes: &[u8]) -> Self {
            self.data.extend(bytes);
            self
        }
        fn bytes(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(3u32.to_le_bytes());
            out.extend(self.n_tensors.to_le_bytes());
            out.extend(self.n_kv.to_le_bytes());
            out.extend(&self.kv);
            out.extend(&self.infos);
            while !out.len().is_multiple_of(32) {
                out.push(0);
            }
            out.extend(&self.data);
            out
        }
    }

    fn good() -> Builder {
        let values: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
        Builder::new()
            .kv_string("general.architecture", "llama")
            .tensor("w", &[4, 2], 0, 0)
            .data(&values)
    }

    fn refused(bytes: &[u8], needle: &str) {
        let err = GgufFile::parse_bytes(bytes, "hostile.gguf")
            .expect_err("a hostile header must be refused")
            .to_string();
        assert!(
            err.contains(needle) && err.contains("hostile.gguf"),
            "expected an error mentioning {needle:?}, got: {err}"
        );
    }

    #[test]
    fn a_well_formed_file_parses_and_every_truncation_of_it_is_refused() {
        let bytes = good().bytes();
        let file = GgufFile::parse_bytes(&bytes, "good.gguf").unwrap();
        assert_eq!(file.tensors[0].shape, [2, 4]);
        assert_eq!(file.tensors[0].n_bytes, 32);
        for len in 0..bytes.len() {
            assert!(
                GgufFile::parse_bytes(&bytes[..len], "cut.gguf").is_err(),
                "a file cut to {len} of {} bytes was accepted",
                bytes.len()
            );
        }
    }

    #[test]
    fn lying_headers_are_refused_with_errors_naming_the_problem() {
        let mut bad_magic = good().bytes();
        bad_magic[0] = b'X';
        refused(&bad_magic, "not a GGUF file");
        let mut version = good().bytes();
        version[4] = 9;
        refused(&version, "version 9");
        // Counts far beyond the file: refused before anything is allocated for them.
        let mut huge_tensors = good().bytes();
        huge_tensors[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        refused(&huge_tensors, "tensor count");
        let mut huge_kv = good().bytes();
        huge_kv[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
        refused(&huge_kv, "metadata count");
        let mut huge_string = good().bytes();
        huge_string[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        refused(&huge_string, "metadata key 0");
        let mut array = 4u32.to_le_bytes().to_vec();
        array.extend(u64::MAX.to_le_bytes());
        refused(
            &good().kv_raw("a", 9, &array).bytes(),
            "metadata `a` array length",
        );
        refused(
            &good().kv_raw("t", 13, &[]).bytes(),
            "unknown value type 13",
        );
        refused(&good().kv_raw("b", 7, &[2]).bytes(), "bool byte 2");
        // Arrays nested past the limit.
        let mut nested = Vec::new();
        for _ in 0..=MAX_DEPTH + 1 {
            nested.extend(9u32.to_le_bytes());
            nested.extend(1u64.to_le_bytes());
        }
        nested.extend(4u32.to_le_bytes());
        nested.extend(0u64.to_le_bytes());
        refused(&good().kv_raw("n", 9, &nested).bytes(), "nested deeper");
        refused(
            &good()
                .kv_raw("general.alignment", 4, &3u32.to_le_bytes())
                .bytes(),
            "power of two",
        );
        refused(
            &good().kv_string("general.architecture", "x").bytes(),
            "appears twice",
        );
        // Tensors: offsets and sizes outside the data, unknown types, shapes.
        refused(
            &good().tensor("far", &[8], 0, 1 << 40).bytes(),
            "tensor `far` lies at",
        );
        refused(
            &good().tensor("w", &[8], 0, 0).bytes(),
            "tensor `w` appears twice",
        );
        refused(
            &good().tensor("iq", &[256], 23, 0).bytes(),
            "IQ4_XS (type 23)",
        );
        refused(
            &good().tensor("big", &[u64::MAX, 2], 0, 0).bytes(),
            "tensor `big` claims",
        );
        refused(
            &good().tensor("zero", &[0], 0, 0).bytes(),
            "tensor `zero` claims",
        );
        refused(
            &good().tensor("dims", &[1; 5], 0, 0).bytes(),
            "5 dimensions",
        );
        refused(
            &good().tensor("odd", &[33], 8, 0).bytes(),
            "not whole Q8_0 blocks",
        );
        refused(
            &good().tensor("skew", &[2], 0, 4).bytes(),
            "not a multiple of the alignment",
        );
    }
}
