//! Writing PyTorch `.pth` state dicts: what `torch.save({name: tensor, ...}, f)` writes for a dict
//! of contiguous float32 CPU tensors, loadable with `torch.load(f, weights_only=True)` and with
//! `burn-store`'s `PytorchReader` (so with [`crate::TensorMap::add_pth`]).
//!
//! # The archive
//! PyTorch's zip format (torch ≥ 1.6): an uncompressed zip whose entries all live under one
//! folder named after the file (`adapter.pth` → `adapter/`; torch's own reader insists on a
//! single folder, not on its name), in torch's order, each entry's data starting at a multiple of
//! 64 bytes of the file as torch aligns them (so `torch.load(..., mmap=True)` works too):
//!
//! | entry | contents |
//! | --- | --- |
//! | `data.pkl` | the pickled dict (below) |
//! | `.format_version` | `1` |
//! | `.storage_alignment` | `64` |
//! | `byteorder` | `little` |
//! | `data/<k>` | the values of the `k`-th tensor, raw little-endian f32 |
//! | `version` | `3` and a newline: the archive version torch writes |
//!
//! torch also writes `.data/serialization_id`, a per-save random identifier that `torch.load`
//! does not need; it is left out so that the bytes are a function of the tensors alone.
//!
//! # The pickle
//! Protocol 2, and only what Python's pickler emits for this one shape of object:
//!
//! ```text
//! {name: torch._utils._rebuild_tensor_v2(
//!            persistent_load(("storage", torch.FloatStorage, "<k>", "cpu", numel)),
//!            0, shape, stride, False, collections.OrderedDict()),
//!  ...}
//! ```
//!
//! Opcodes: `PROTO`, `EMPTY_DICT`, `MARK` … `SETITEMS` (batches of 1000 items, a lone item with
//! `SETITEM`), `BINUNICODE`, `GLOBAL`, `BINPERSID`, `REDUCE`, `EMPTY_TUPLE` / `TUPLE1..3` /
//! `TUPLE`, `BININT1` / `BININT2` / `BININT` / `LONG1`, `NEWFALSE`, `STOP`, and the memo
//! opcodes (`BINPUT` / `LONG_BINPUT`, `BINGET` / `LONG_BINGET`) where Python puts them, so that
//! `data.pkl` is byte for byte the one `torch.save` writes for the same dict (checked by
//! `scripts/check_rust_adapters.py`). Everything in it is allowed by `weights_only=True`.

use std::collections::HashSet;
use std::io::{Cursor, Write};
use std::path::Path;

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

use crate::error::{CheckpointError, Result};
use crate::NamedTensor;

/// The alignment of every entry's data in the archive, as torch's `storage_alignment`.
const ALIGNMENT: u16 = 64;

/// Python's `Pickler._BATCHSIZE`: dict items per `SETITEMS`.
const BATCH: usize = 1000;

/// A protocol-2 pickle writer that numbers memo entries as Python's pickler does.
#[derive(Default)]
struct Pickler {
    out: Vec<u8>,
    memo_len: u32,
    /// Memo indices of objects torch pickles once and then refers to.
    rebuild: Option<u32>,
    storage: Option<u32>,
    float_storage: Option<u32>,
    cpu: Option<u32>,
    ordered_dict: Option<u32>,
}

impl Pickler {
    fn memoize(&mut self) {
        let index = self.memo_len;
        match u8::try_from(index) {
            Ok(short) => self.out.extend([b'q', short]),
            Err(_) => {
                self.out.push(b'r');
                self.out.extend(index.to_le_bytes());
            }
        }
        self.memo_len += 1;
    }

    fn get(&mut self, index: u32) {
        match u8::try_from(index) {
            Ok(short) => self.out.extend([b'h', short]),
            Err(_) => {
                self.out.push(b'j');
                self.out.extend(index.to_le_bytes());
            }
        }
    }

    /// Writes an object Python memoizes on first use, or refers to it after that.
    fn once(&mut self, slot: fn(&mut Self) -> &mut Option<u32>, write: impl FnOnce(&mut Self)) {
        match *slot(self) {
            Some(index) => self.get(index),
            None => {
                write(self);
                *slot(self) = Some(self.memo_len);
                self.memoize();
            }
        }
    }

    fn string(&mut self, text: &str) {
        self.out.push(b'X');
        // Checked by the caller: names longer than 4 GiB are refused.
        self.out.extend((text.len() as u32).to_le_bytes());
        self.out.extend(text.as_bytes());
        self.memoize();
    }

    fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        for part in [module, name] {
            self.out.extend(part.as_bytes());
            self.out.push(b'\n');
        }
    }

    fn int(&mut self, value: u64) {
        if let Ok(byte) = u8::try_from(value) {
            self.out.extend([b'K', byte]);
        } else if let Ok(short) = u16::try_from(value) {
            self.out.push(b'M');
            self.out.extend(short.to_le_bytes());
        } else if let Ok(int) = i32::try_from(value) {
            self.out.push(b'J');
            self.out.extend(int.to_le_bytes());
        } else {
            // LONG1: little-endian two's complement, as short as possible with a clear sign bit.
            let mut bytes = value.to_le_bytes().to_vec();
            while bytes.len() > 1
                && bytes[bytes.len() - 1] == 0
                && bytes[bytes.len() - 2] & 0x80 == 0
            {
                bytes.pop();
            }
            self.out.extend([0x8a, bytes.len() as u8]);
            self.out.extend(bytes);
        }
    }

    /// A tuple of integers (`shape`, `stride`).
    fn int_tuple(&mut self, items: &[usize]) {
        match items.len() {
            0 => return self.out.push(b')'),
            1..=3 => {
                items.iter().for_each(|&i| self.int(i as u64));
                self.out.push(0x85 + items.len() as u8 - 1);
            }
            _ => {
                self.out.push(b'(');
                items.iter().for_each(|&i| self.int(i as u64));
                self.out.push(b't');
            }
        }
        self.memoize();
    }

    /// `_rebuild_tensor_v2(persistent_load(("storage", FloatStorage, key, "cpu", numel)),
    /// 0, shape, stride, False, OrderedDict())` for a contiguous tensor.
    fn tensor(&mut self, storage_key: &str, shape: &[usize], numel: usize) {
        self.once(
            |p| &mut p.rebuild,
            |p| p.global("torch._utils", "_rebuild_tensor_v2"),
        );
        self.out.push(b'(');
        self.out.push(b'(');
        self.once(|p| &mut p.storage, |p| p.string_unmemoized("storage"));
        self.once(
            |p| &mut p.float_storage,
            |p| p.global("torch", "FloatStorage"),
        );
        self.string(storage_key);
        self.once(|p| &mut p.cpu, |p| p.string_unmemoized("cpu"));
        self.int(numel as u64);
        self.out.push(b't');
        self.memoize();
        self.out.push(b'Q');
        self.int(0);
        self.int_tuple(shape);
        self.int_tuple(&contiguous_strides(shape));
        self.out.push(0x89);
        self.once(
            |p| &mut p.ordered_dict,
            |p| p.global("collections", "OrderedDict"),
        );
        self.out.extend([b')', b'R']);
        self.memoize();
        self.out.push(b't');
        self.memoize();
        self.out.push(b'R');
        self.memoize();
    }

    fn string_unmemoized(&mut self, text: &str) {
        self.out.push(b'X');
        self.out.extend((text.len() as u32).to_le_bytes());
        self.out.extend(text.as_bytes());
    }
}

/// torch's strides of a contiguous tensor: a dimension of size 0 counts as 1.
fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1].max(1);
    }
    strides
}

/// The `data.pkl` of a state dict whose tensor `i` is stored under the key `i`.
fn pickle(tensors: &[NamedTensor]) -> Vec<u8> {
    let mut pickler = Pickler::default();
    pickler.out.extend([0x80, 2, b'}']);
    pickler.memoize();
    for (batch_index, batch) in tensors.chunks(BATCH).enumerate() {
        if batch.len() > 1 {
            pickler.out.push(b'(');
        }
        for (offset, tensor) in batch.iter().enumerate() {
            pickler.string(&tensor.key);
            let key = (batch_index * BATCH + offset).to_string();
            pickler.tensor(&key, &tensor.shape, tensor.values.len());
        }
        pickler.out.push(if batch.len() > 1 { b'u' } else { b's' });
    }
    pickler.out.push(b'.');
    pickler.out
}

/// The folder torch puts every entry in: the file name without its extension.
fn archive_folder(path: &Path) -> String {
    path.file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty() && !s.contains(['/', '\\']))
        .unwrap_or("archive")
        .to_string()
}

/// The bytes `torch.save` writes for the state dict `tensors` (float32, contiguous, in this
/// order), to be stored at `path` (which names the archive's folder and error messages).
///
/// # Errors
/// [`CheckpointError::Format`] naming the tensor when a shape does not match the number of values,
/// when two tensors share a key, or when a key is longer than a pickle string can be.
pub fn state_dict_bytes(tensors: &[NamedTensor], path: &Path) -> Result<Vec<u8>> {
    let format = |message: String| CheckpointError::Format {
        path: path.into(),
        message,
    };
    let mut keys = HashSet::with_capacity(tensors.len());
    for tensor in tensors {
        let numel = tensor
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d));
        if numel != Some(tensor.values.len()) {
            return Err(format(format!(
                "tensor '{}' has shape {:?} but {} values",
                tensor.key,
                tensor.shape,
                tensor.values.len()
            )));
        }
        if !keys.insert(tensor.key.as_str()) {
            return Err(format(format!(
                "tensor '{}' appears twice in the state dict",
                tensor.key
            )));
        }
        if u32::try_from(tensor.key.len()).is_err() {
            return Err(format(format!(
                "a tensor key of {} bytes is too long for a pickle",
                tensor.key.len()
            )));
        }
    }

    let folder = archive_folder(path);
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    // `DEFAULT` dates every entry 1980-01-01 as torch does, so the bytes do not depend on the clock.
    let options = SimpleFileOptions::DEFAULT
        .compression_method(CompressionMethod::Stored)
        .with_alignment(ALIGNMENT);
    let mut entry = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let large = u32::try_from(bytes.len()).is_err();
        zip.start_file(format!("{folder}/{name}"), options.large_file(large))?;
        zip.write_all(bytes)
    };
    let written = (|| {
        entry("data.pkl", &pickle(tensors))?;
        entry(".format_version", b"1")?;
        entry(".storage_alignment", ALIGNMENT.to_string().as_bytes())?;
        entry("byteorder", b"little")?;
        for (index, tensor) in tensors.iter().enumerate() {
            let bytes: Vec<u8> = tensor.values.iter().flat_map(|v| v.to_le_bytes()).collect();
            entry(&format!("data/{index}"), &bytes)?;
        }
        entry("version", b"3\n")
    })();
    written.map_err(|e| format(format!("writing the archive: {e}")))?;
    let bytes = zip
        .finish()
        .map_err(|e| format(format!("writing the archive: {e}")))?;
    Ok(bytes.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(key: &str, shape: &[usize]) -> NamedTensor {
        let numel = shape.iter().product();
        NamedTensor {
            key: key.into(),
            shape: shape.to_vec(),
            values: (0..numel).map(|i| i as f32 * 0.5).collect(),
        }
    }

    /// The `data.pkl` torch 2.15 writes for
    /// `{"a.weight": torch.zeros(2, 3), "b": torch.zeros(1, 4, 1, 1)}`.
    const TORCH_PICKLE: &[u8] = b"\x80\x02}q\x00(X\x08\x00\x00\x00a.weightq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K\x06tq\x07QK\x00K\x02K\x03\x86q\x08K\x03K\x01\x86q\t\x89ccollections\nOrderedDict\nq\n)Rq\x0btq\x0cRq\rX\x01\x00\x00\x00bq\x0eh\x02((h\x03h\x04X\x01\x00\x00\x001q\x0fh\x06K\x04tq\x10QK\x00(K\x01K\x04K\x01K\x01tq\x11(K\x04K\x01K\x01K\x01tq\x12\x89h\n)Rq\x13tq\x14Rq\x15u.";

    #[test]
    fn pickle_equals_what_torch_writes() {
        assert_eq!(
            pickle(&[tensor("a.weight", &[2, 3]), tensor("b", &[1, 4, 1, 1])]),
            TORCH_PICKLE
        );
    }

    #[test]
    fn a_lone_item_uses_setitem_and_large_ints_use_wider_opcodes() {
        let bytes = pickle(&[tensor("w", &[300, 70000])]);
        assert_eq!(bytes[bytes.len() - 2..], *b"s.");
        assert!(
            bytes.windows(3).any(|w| w == [b'M', 0x2c, 0x01]),
            "300 as BININT2"
        );
        let numel = (300u32 * 70000).to_le_bytes();
        assert!(
            bytes.windows(5).any(|w| w[0] == b'J' && w[1..] == numel),
            "numel as BININT"
        );
    }

    #[test]
    fn strides_are_torch_contiguous_strides() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), [12, 4, 1]);
        assert_eq!(contiguous_strides(&[2, 0, 4]), [4, 4, 1]);
        assert_eq!(contiguous_strides(&[]), Vec::<usize>::new());
    }

    #[test]
    fn archive_entries_live_in_one_folder_with_aligned_data() {
        let bytes =
            state_dict_bytes(&[tensor("x", &[3, 5])], Path::new("dir/adapter.pth")).unwrap();
        let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
        let names: Vec<String> = archive.file_names().map(str::to_string).collect();
        assert_eq!(
            names,
            [
                "adapter/data.pkl",
                "adapter/.format_version",
                "adapter/.storage_alignment",
                "adapter/byteorder",
                "adapter/data/0",
                "adapter/version"
            ]
        );
        for index in 0..archive.len() {
            let file = archive.by_index(index).unwrap();
            assert_eq!(file.compression(), CompressionMethod::Stored);
            assert_eq!(
                file.data_start().unwrap() % u64::from(ALIGNMENT),
                0,
                "{}",
                file.name()
            );
        }
    }

    #[test]
    fn mismatched_shapes_and_duplicate_keys_are_refused() {
        let mut bad = tensor("x", &[2, 2]);
        bad.values.pop();
        let message = state_dict_bytes(&[bad], Path::new("a.pth"))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("'x'") && message.contains("[2, 2]") && message.contains("3 values"),
            "{message}"
        );
        let message = state_dict_bytes(&[tensor("x", &[1]), tensor("x", &[1])], Path::new("a.pth"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("'x' appears twice"), "{message}");
    }
}
