//! Checking a PyTorch `.pth` file before `burn-store` reads it: the pickle may refer only to
//! tensor storage, and no length it declares may exceed the bytes that are really there.
//!
//! `burn-store`'s pickle reader never runs Python, but it trusts the file: it allocates a
//! string's declared length before reading it (a 60-byte `data.pkl` can ask for 4 GiB), reads
//! whole archive entries into memory however far they decompress, and turns any `GLOBAL` into an
//! object. This module walks every pickle opcode first, without building anything, and refuses:
//!
//! - a `GLOBAL`, `INST` or `STACK_GLOBAL` naming anything but the callables and classes
//!   `torch.save` writes for a state dict of tensors ([`ALLOWED_GLOBALS`]), and the extension
//!   registry opcodes (`EXT1/2/4`), which name callables indirectly; with no other way to reach a
//!   callable, `REDUCE`, `BUILD` and `NEWOBJ` can only apply allowed ones;
//! - a length (string, bytes, long integer, frame) longer than the rest of the stream;
//! - memo references that would make a copying reader (burn-store copies an entry on every
//!   `GET`) build far more objects than the pickle has bytes (a "billion laughs" pickle bomb), and
//!   values nested deeper than 256 levels (readers that recurse would overflow their stack);
//! - an unknown opcode, or a stream that ends before `STOP`;
//! - in a zip archive: a compressed entry (`torch.save` stores every entry uncompressed, so its
//!   size is bounded by the file's) or an entry larger than the file.
//!
//! Formats: the zip archive of PyTorch ≥ 1.6 (every `*.pkl` entry is checked), the legacy
//! sequence of pickles of PyTorch 0.1.10–1.5 (the five pickles before the raw storages), and a
//! bare pickle. The tar format of PyTorch < 0.1.10 is refused.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::error::{CheckpointError, Result};

/// `module.name` of every global a state dict of tensors may refer to.
pub const ALLOWED_GLOBALS: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._tensor._rebuild_from_type_v2",
    "torch.BFloat16Storage",
    "torch.BoolStorage",
    "torch.ByteStorage",
    "torch.CharStorage",
    "torch.DoubleStorage",
    "torch.FloatStorage",
    "torch.HalfStorage",
    "torch.IntStorage",
    "torch.LongStorage",
    "torch.ShortStorage",
];

/// The start of a legacy (PyTorch 0.1.10–1.5) file: `PROTO 2`, the magic number as `LONG1`.
const LEGACY_MAGIC: [u8; 4] = [0x80, 0x02, 0x8a, 0x0a];

/// Pickles before the raw storages in the legacy format: magic number, protocol version,
/// system info, the object, the storage keys.
const LEGACY_PICKLES: usize = 5;

/// Longest `GLOBAL` / `INST` line kept; Python identifiers of real modules are far shorter.
const MAX_NAME: usize = 1024;

/// Checks the pickle(s) of the `.pth` file at `path` as described in the [module docs](self).
///
/// # Errors
/// [`CheckpointError::WeightFile`] naming the file, the pickle, the byte offset and what is wrong;
/// [`CheckpointError::Io`] when the file cannot be read.
pub fn check_pth(path: &Path) -> Result<()> {
    let refuse = |message: String| CheckpointError::WeightFile {
        path: path.into(),
        message,
    };
    let io = |e: std::io::Error| CheckpointError::io(path, e);
    let file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut reader = BufReader::new(file);

    if let Ok(mut archive) = zip::ZipArchive::new(&mut reader) {
        for index in 0..archive.len() {
            let entry = archive
                .by_index_raw(index)
                .map_err(|e| refuse(format!("zip entry {index}: {e}")))?;
            let name = entry.name().to_string();
            if entry.compression() != zip::CompressionMethod::Stored {
                return Err(refuse(format!(
                    "zip entry '{name}' is compressed ({:?}); torch.save stores entries \
                     uncompressed",
                    entry.compression()
                )));
            }
            if entry.size() > file_len {
                return Err(refuse(format!(
                    "zip entry '{name}' declares {} bytes, more than the whole file ({file_len})",
                    entry.size()
                )));
            }
            drop(entry);
            if name.ends_with(".pkl") {
                let entry = archive
                    .by_index(index)
                    .map_err(|e| refuse(format!("zip entry '{name}': {e}")))?;
                let size = entry.size();
                let mut stream = Stream::new(BufReader::new(entry), size);
                scan_pickle(&mut stream).map_err(|e| refuse(e.message(&name)))?;
            }
        }
        return Ok(());
    }

    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut head = [0u8; 262];
    let head_len = read_up_to(&mut reader, &mut head).map_err(io)?;
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    if head_len == 262 && &head[257..262] == b"ustar" {
        return Err(refuse(
            "a tar archive (PyTorch < 0.1.10); re-save it with a recent PyTorch".into(),
        ));
    }
    let mut stream = Stream::new(reader, file_len);
    if head[..head_len.min(4)] == LEGACY_MAGIC {
        for number in 1..=LEGACY_PICKLES {
            scan_pickle(&mut stream)
                .map_err(|e| refuse(e.message(&format!("legacy pickle {number}"))))?;
        }
    } else {
        scan_pickle(&mut stream).map_err(|e| refuse(e.message("the pickle")))?;
    }
    Ok(())
}

fn read_up_to(reader: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// What is wrong with a pickle, and the offset of the opcode where it was found.
#[derive(Debug)]
struct Refusal {
    offset: u64,
    message: String,
}

impl Refusal {
    fn message(&self, pickle: &str) -> String {
        format!("{pickle}, byte {}: {}", self.offset, self.message)
    }
}

type Scan<T> = std::result::Result<T, Refusal>;

/// A byte stream that knows how many bytes are left.
struct Stream<R> {
    reader: R,
    remaining: u64,
    offset: u64,
}

impl<R: Read> Stream<R> {
    fn new(reader: R, len: u64) -> Self {
        Self {
            reader,
            remaining: len,
            offset: 0,
        }
    }

    fn fail<T>(&self, message: impl Into<String>) -> Scan<T> {
        Err(Refusal {
            offset: self.offset,
            message: message.into(),
        })
    }

    fn truncated<T>(&self) -> Scan<T> {
        self.fail("the pickle ends before its STOP opcode")
    }

    fn byte(&mut self) -> Scan<u8> {
        let mut one = [0u8];
        self.bytes(&mut one)?;
        Ok(one[0])
    }

    fn bytes(&mut self, out: &mut [u8]) -> Scan<()> {
        if (out.len() as u64) > self.remaining || self.reader.read_exact(out).is_err() {
            return self.truncated();
        }
        self.remaining -= out.len() as u64;
        self.offset += out.len() as u64;
        Ok(())
    }

    fn uint(&mut self, width: usize) -> Scan<u64> {
        let mut buffer = [0u8; 8];
        self.bytes(&mut buffer[..width])?;
        Ok(u64::from_le_bytes(buffer))
    }

    /// Checks a declared length against the bytes left, then reads them (keeping at most
    /// `keep` of them; `None` when there were more).
    fn counted(&mut self, what: &str, len: u64, keep: usize) -> Scan<Option<Vec<u8>>> {
        if len > self.remaining {
            return self.fail(format!(
                "{what} declares {len} bytes but only {} remain",
                self.remaining
            ));
        }
        let mut kept = Vec::new();
        let mut left = len;
        let mut chunk = [0u8; 4096];
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            self.bytes(&mut chunk[..n])?;
            if kept.len() + n <= keep {
                kept.extend_from_slice(&chunk[..n]);
            }
            left -= n as u64;
        }
        Ok((len as usize <= keep).then_some(kept))
    }

    /// A newline-terminated argument, newline excluded (`None` when longer than `keep`).
    fn line(&mut self, keep: usize) -> Scan<Option<Vec<u8>>> {
        let mut kept = Vec::new();
        let mut long = false;
        loop {
            let byte = self.byte()?;
            if byte == b'\n' {
                return Ok((!long).then_some(kept));
            }
            if kept.len() < keep {
                kept.push(byte);
            } else {
                long = true;
            }
        }
    }
}

fn allowed(module: &str, name: &str) -> bool {
    ALLOWED_GLOBALS
        .iter()
        .any(|g| g.strip_prefix(module).and_then(|r| r.strip_prefix('.')) == Some(name))
}

/// What the check knows of a value on the pickle machine's stack: how many objects a reader
/// that copies memo entries (as burn-store does) would build for it, how deeply it nests, and
/// its text when it is a string (the operands of `STACK_GLOBAL`).
#[derive(Clone, Default)]
struct Value {
    size: u64,
    depth: u32,
    text: Option<String>,
}

impl Value {
    fn leaf(text: Option<String>) -> Self {
        Self {
            size: 1,
            depth: 0,
            text,
        }
    }

    fn containing(items: &[Value]) -> Self {
        let mut value = Self::leaf(None);
        value.absorb(items);
        value
    }

    fn absorb(&mut self, items: &[Value]) {
        for item in items {
            self.size = self.size.saturating_add(item.size);
            self.depth = self.depth.max(item.depth.saturating_add(1));
        }
        self.text = None;
    }
}

/// Deepest nesting accepted; a state dict nests a handful of levels, and readers that recurse
/// (burn-store's conversion, dropping the objects) would overflow the stack on deep ones.
const MAX_DEPTH: u32 = 256;

/// The pickle machine's stack and marks, as far as the check follows them.
struct Machine {
    stack: Vec<Value>,
    marks: Vec<usize>,
}

impl Machine {
    fn pop(&mut self, what: &str) -> std::result::Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| format!("{what} on an empty stack: a malformed pickle"))
    }

    fn pop_n(&mut self, n: usize, what: &str) -> std::result::Result<Vec<Value>, String> {
        if self.stack.len() < n {
            return Err(format!("{what} on a stack too short: a malformed pickle"));
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn pop_mark(&mut self, what: &str) -> std::result::Result<Vec<Value>, String> {
        match self.marks.pop() {
            Some(mark) if mark <= self.stack.len() => Ok(self.stack.split_off(mark)),
            _ => Err(format!("{what} without a MARK: a malformed pickle")),
        }
    }

    fn top(&mut self, what: &str) -> std::result::Result<&mut Value, String> {
        self.stack
            .last_mut()
            .ok_or_else(|| format!("{what} on an empty stack: a malformed pickle"))
    }
}

/// Walks one pickle up to and including its `STOP`, following the stack without building
/// anything.
fn scan_pickle<R: Read>(stream: &mut Stream<R>) -> Scan<()> {
    let mut machine = Machine {
        stack: Vec::new(),
        marks: Vec::new(),
    };
    let mut memo: HashMap<u64, Value> = HashMap::new();
    let text = |bytes: Option<Vec<u8>>| bytes.and_then(|b| String::from_utf8(b).ok());
    loop {
        let start = stream.offset;
        let at = |message: String| Refusal {
            offset: start,
            message,
        };
        let opcode = stream.byte()?;
        let m = &mut machine;
        let step: std::result::Result<(), String> = match opcode {
            b'.' => return Ok(()),
            // PROTO, FRAME: nothing on the stack.
            0x80 => {
                stream.byte()?;
                Ok(())
            }
            0x95 => {
                let len = stream.uint(8)?;
                if len > stream.remaining {
                    Err(format!(
                        "FRAME declares {len} bytes but only {} remain",
                        stream.remaining
                    ))
                } else {
                    Ok(())
                }
            }
            b'(' => {
                m.marks.push(m.stack.len());
                Ok(())
            }
            b'0' => m.pop("POP").map(drop),
            b'1' => m.pop_mark("POP_MARK").map(drop),
            b'2' => m.top("DUP").cloned().map(|v| m.stack.push(v)),
            // Memo stores and reads.
            b'q' | b'r' | b'p' | 0x94 => {
                let index = match opcode {
                    b'q' => Some(stream.uint(1)?),
                    b'r' => Some(stream.uint(4)?),
                    b'p' => text(stream.line(32)?).and_then(|s| s.parse().ok()),
                    _ => Some(memo.len() as u64),
                };
                match index {
                    Some(index) => m.top("PUT").cloned().map(|v| {
                        memo.insert(index, v);
                    }),
                    None => Err("PUT with a malformed memo index".into()),
                }
            }
            b'h' | b'j' | b'g' => {
                let index = match opcode {
                    b'h' => Some(stream.uint(1)?),
                    b'j' => Some(stream.uint(4)?),
                    _ => text(stream.line(32)?).and_then(|s| s.parse().ok()),
                };
                match index.and_then(|i| memo.get(&i)) {
                    Some(value) => {
                        m.stack.push(value.clone());
                        Ok(())
                    }
                    None => Err("GET of a memo entry never PUT: a malformed pickle".into()),
                }
            }
            // Globals: the only way to name a callable or class.
            b'c' | b'i' => {
                let module = text(stream.line(MAX_NAME)?);
                let name = text(stream.line(MAX_NAME)?);
                match (module, name) {
                    (Some(module), Some(name)) if allowed(&module, &name) => {
                        if opcode == b'i' {
                            m.pop_mark("INST")
                                .map(|items| m.stack.push(Value::containing(&items)))
                        } else {
                            m.stack.push(Value::leaf(None));
                            Ok(())
                        }
                    }
                    (Some(module), Some(name)) => Err(forbidden(&module, &name)),
                    _ => Err("a GLOBAL with an unreadable or overlong name".into()),
                }
            }
            0x93 => m.pop_n(2, "STACK_GLOBAL").and_then(|operands| {
                match (&operands[0].text, &operands[1].text) {
                    (Some(module), Some(name)) if allowed(module, name) => {
                        m.stack.push(Value::leaf(None));
                        Ok(())
                    }
                    (Some(module), Some(name)) => Err(forbidden(module, name)),
                    _ => Err("STACK_GLOBAL whose module and name are not literal strings".into()),
                }
            }),
            0x82..=0x84 => Err(
                "an extension-registry global (EXT1/EXT2/EXT4), which names a \
                                callable indirectly; only tensor storage is allowed"
                    .into(),
            ),
            // Strings and bytes with a declared length.
            b'X' | b'T' | b'B' | b'U' | b'C' | 0x8c | 0x8d | 0x8e | 0x96 => {
                let width = match opcode {
                    b'U' | b'C' | 0x8c => 1,
                    b'X' | b'T' | b'B' => 4,
                    _ => 8,
                };
                let len = stream.uint(width)?;
                let kept = stream.counted(&opcode_name(opcode), len, MAX_NAME)?;
                let is_text = matches!(opcode, b'X' | 0x8c | 0x8d);
                m.stack
                    .push(Value::leaf(if is_text { text(kept) } else { None }));
                Ok(())
            }
            // Numbers and constants.
            b'K' | b'M' | b'J' | b'G' => {
                let width = match opcode {
                    b'K' => 1,
                    b'M' => 2,
                    b'J' => 4,
                    _ => 8,
                };
                stream.uint(width)?;
                m.stack.push(Value::leaf(None));
                Ok(())
            }
            0x8a | 0x8b => {
                let len = stream.uint(if opcode == 0x8a { 1 } else { 4 })?;
                stream.counted(&opcode_name(opcode), len, 0)?;
                m.stack.push(Value::leaf(None));
                Ok(())
            }
            b'I' | b'L' | b'F' | b'S' | b'P' => {
                stream.line(0)?;
                m.stack.push(Value::leaf(None));
                Ok(())
            }
            b'V' => {
                let value = text(stream.line(MAX_NAME)?);
                m.stack.push(Value::leaf(value));
                Ok(())
            }
            b'N' | 0x88 | 0x89 | b')' | b']' | b'}' | 0x8f | 0x97 => {
                m.stack.push(Value::leaf(None));
                Ok(())
            }
            0x98 => m.top("READONLY_BUFFER").map(drop),
            // Building containers and objects.
            b't' | b'l' | b'd' | 0x91 | b'o' => m
                .pop_mark(&opcode_name(opcode))
                .map(|items| m.stack.push(Value::containing(&items))),
            0x85..=0x87 => m
                .pop_n(usize::from(opcode - 0x84), "TUPLE1/2/3")
                .map(|items| m.stack.push(Value::containing(&items))),
            b'Q' | b'R' | 0x81 | 0x92 => {
                let n = match opcode {
                    b'Q' => 1,
                    b'R' | 0x81 => 2,
                    _ => 3,
                };
                m.pop_n(n, &opcode_name(opcode))
                    .map(|items| m.stack.push(Value::containing(&items)))
            }
            b'a' | b's' | b'b' => {
                let n = if opcode == b's' { 2 } else { 1 };
                m.pop_n(n, &opcode_name(opcode))
                    .and_then(|items| m.top(&opcode_name(opcode)).map(|top| top.absorb(&items)))
            }
            b'e' | b'u' | 0x90 => m
                .pop_mark(&opcode_name(opcode))
                .and_then(|items| m.top(&opcode_name(opcode)).map(|top| top.absorb(&items))),
            other => Err(format!("unknown pickle opcode 0x{other:02x}")),
        };
        step.map_err(at)?;
        if let Some(top) = machine.stack.last() {
            // Objects a copying reader builds grow with the bytes read, unless memo references
            // multiply them (each GET copies its entry: "billion laughs").
            let limit = 64 * stream.offset + 4096;
            if top.size > limit {
                return Err(at(format!(
                    "the pickle's memo references would copy more than {limit} objects: a \
                     pickle bomb"
                )));
            }
            if top.depth > MAX_DEPTH {
                return Err(at(format!("values nested deeper than {MAX_DEPTH} levels")));
            }
        }
    }
}

fn forbidden(module: &str, name: &str) -> String {
    format!(
        "the pickle refers to `{module}.{name}`, which is not tensor storage; a .pth here may \
         name only {} (nothing was executed)",
        ALLOWED_GLOBALS.join(", ")
    )
}

fn opcode_name(opcode: u8) -> String {
    match opcode {
        b'X' => "BINUNICODE",
        b'T' => "BINSTRING",
        b'B' => "BINBYTES",
        b'U' => "SHORT_BINSTRING",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x96 => "BYTEARRAY8",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b't' => "TUPLE",
        b'l' => "LIST",
        b'd' => "DICT",
        0x91 => "FROZENSET",
        b'o' => "OBJ",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        b'a' => "APPEND",
        b's' => "SETITEM",
        b'b' => "BUILD",
        b'e' => "APPENDS",
        b'u' => "SETITEMS",
        0x90 => "ADDITEMS",
        _ => return format!("opcode 0x{opcode:02x}"),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(bytes: &[u8]) -> Scan<()> {
        scan_pickle(&mut Stream::new(bytes, bytes.len() as u64))
    }

    #[test]
    fn a_plain_state_dict_pickle_passes() {
        // {"w": _rebuild_tensor_v2(persistent_load(("storage", FloatStorage, "0", "cpu", 2)), ...)}
        let pickle = b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K\x02tq\x07QK\x00K\x02\x85q\x08K\x01\x85q\t\x89ccollections\nOrderedDict\nq\n)Rq\x0btq\x0cRq\rs.";
        scan(pickle).unwrap();
    }

    #[test]
    fn os_system_is_refused_by_name() {
        let refusal = scan(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00echo\x85R.").unwrap_err();
        assert!(refusal.message.contains("`os.system`"), "{refusal:?}");
        assert_eq!(refusal.offset, 2);
    }

    #[test]
    fn stack_global_is_checked_through_the_memo() {
        // Protocol 4: "builtins" and "eval" memoized, fetched back, then STACK_GLOBAL.
        let pickle = b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94h\x00h\x01\x93.";
        let refusal = scan(pickle).unwrap_err();
        assert!(refusal.message.contains("`builtins.eval`"), "{refusal:?}");
        let allowed = b"\x80\x04\x8c\x0bcollections\x8c\x0bOrderedDict\x93)R.";
        scan(allowed).unwrap();
        let computed = b"\x80\x04\x8c\x0bcollections](\x93.";
        assert!(scan(computed).unwrap_err().message.contains("not literal"));
    }

    #[test]
    fn declared_lengths_beyond_the_stream_are_refused_before_reading() {
        let refusal = scan(b"\x80\x02X\xff\xff\x00\xff.").unwrap_err();
        assert!(
            refusal
                .message
                .contains("BINUNICODE declares 4278255615 bytes"),
            "{refusal:?}"
        );
        assert!(scan(b"\x80\x02\x8b\x00\x00\x00\x80.")
            .unwrap_err()
            .message
            .contains("LONG4"));
    }

    #[test]
    fn memo_bombs_and_deep_nesting_are_refused() {
        // x0 = []; x(i+1) = [x(i), x(i)]: 2^40 objects for a reader that copies memo entries.
        let mut bomb = b"\x80\x02]q\x00".to_vec();
        for i in 0..40u8 {
            bomb.extend([b'(', b'h', i, b'h', i, b'l', b'q', i + 1]);
        }
        bomb.push(b'.');
        let refusal = scan(&bomb).unwrap_err();
        assert!(refusal.message.contains("pickle bomb"), "{refusal:?}");

        let mut deep = vec![0x80, 2];
        deep.extend(std::iter::repeat_n(b']', 300));
        deep.extend(std::iter::repeat_n(b'a', 299));
        deep.push(b'.');
        let refusal = scan(&deep).unwrap_err();
        assert!(refusal.message.contains("deeper than 256"), "{refusal:?}");
    }

    #[test]
    fn truncation_and_unknown_opcodes_are_refused() {
        assert!(scan(b"\x80\x02}").unwrap_err().message.contains("STOP"));
        assert!(scan(b"\x80\x02\xff.")
            .unwrap_err()
            .message
            .contains("unknown pickle opcode 0xff"));
    }
}
