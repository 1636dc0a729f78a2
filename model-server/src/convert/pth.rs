//! Reader for PyTorch checkpoints in the legacy pickle-stream format (torch < 1.6, or
//! `_use_new_zipfile_serialization=False`), which candle's own `.pth` loaders reject because
//! they only read the zip format.
//!
//! The stream is five pickles followed by the raw storages: the magic number, the protocol
//! version, `sys_info`, the state dict (tensors are `_rebuild_tensor_v2` calls whose storages are
//! persistent ids), the list of storage keys, then for each key an int64 LE element count and
//! the storage's little-endian bytes. The pickles are decoded with candle's `pickle::Stack`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

/// `torch.serialization.MAGIC_NUMBER`.
const MAGIC: u128 = 0x1950A86A20F9469CFC6C;
/// `torch.serialization.PROTOCOL_VERSION`, the only one torch ever wrote.
const PROTOCOL_VERSION: i64 = 1001;

// Opcodes this reader needs to look at itself; everything else is candle's business.
const PROTO: u8 = 0x80;
const LONG1: u8 = 0x8a;
const STOP: u8 = b'.';
const SETITEM: u8 = b's';
const SETITEMS: u8 = b'u';

/// The part of the checkpoint being read, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Magic,
    ProtocolVersion,
    SysInfo,
    StateDict,
    StorageKeys,
    StorageData,
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Magic => "magic number",
            Self::ProtocolVersion => "protocol version",
            Self::SysInfo => "sys_info",
            Self::StateDict => "state dict",
            Self::StorageKeys => "storage key list",
            Self::StorageData => "storage data",
        })
    }
}

/// Why a checkpoint could not be read. An underlying error is the `source()`, not repeated in
/// the message.
#[derive(Debug, thiserror::Error)]
pub enum PthError {
    #[error("reading `{path}`")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "zip-format checkpoint (torch >= 1.6), not the legacy stream: read it with candle_core::pickle::read_all"
    )]
    ZipFormat,
    #[error("not a legacy PyTorch checkpoint: bad magic number")]
    BadMagic,
    #[error("unsupported legacy serialization protocol {0} (expected {PROTOCOL_VERSION})")]
    ProtocolVersion(String),
    #[error("checkpoint was written on a big-endian machine")]
    BigEndian,
    #[error("truncated: the {section} ends early at byte {offset}")]
    Truncated { section: Section, offset: usize },
    #[error("{0} unread bytes after the last storage")]
    TrailingBytes(usize),
    #[error("unsupported pickle opcode 0x{opcode:02x} in the {section} at byte {offset}")]
    Opcode {
        section: Section,
        opcode: u8,
        offset: usize,
    },
    #[error("integer wider than 64 bits in the {section} at byte {offset}")]
    WideInteger { section: Section, offset: usize },
    #[error("malformed pickle in the {section}")]
    Pickle {
        section: Section,
        source: candle_core::Error,
    },
    #[error("unexpected {section}: {reason}")]
    Unexpected { section: Section, reason: String },
    #[error("unknown storage type `{0}`")]
    UnknownStorageType(String),
    #[error("tensor `{name}`: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("tensor `{name}` reads outside its storage `{key}`")]
    OutOfBounds { name: String, key: String },
    #[error("storage `{key}`: {reason}")]
    BadStorage { key: String, reason: String },
    #[error("tensor name `{0}` appears twice")]
    DuplicateName(String),
    #[error("building tensor `{name}`")]
    Tensor {
        name: String,
        source: candle_core::Error,
    },
}

/// Reads every tensor of a legacy-format `.pth` file, in file order, as contiguous CPU tensors.
pub fn read_legacy_pth(path: &Path) -> Result<Vec<(String, Tensor)>, PthError> {
    let bytes = std::fs::read(path).map_err(|source| PthError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_legacy_pth(&bytes)
}

/// Parses a legacy-format checkpoint already in memory; see [`read_legacy_pth`].
pub fn parse_legacy_pth(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, PthError> {
    let mut input = Input { bytes, pos: 0 };
    input.magic()?;

    let version = input.pickle(Section::ProtocolVersion)?.object;
    if version != Object::Int(PROTOCOL_VERSION as i32) {
        return Err(PthError::ProtocolVersion(describe(&version)));
    }
    check_sys_info(input.pickle(Section::SysInfo)?.object)?;

    let mut storages = HashMap::new();
    let tensors = state_dict(input.pickle(Section::StateDict)?)?
        .into_iter()
        .map(|(name, value)| tensor_ref(name, value, &mut storages))
        .collect::<Result<Vec<_>, _>>()?;

    let data = input.storages(&storages)?;
    let trailing = input.remaining().len();
    if trailing != 0 {
        return Err(PthError::TrailingBytes(trailing));
    }

    let mut seen = HashSet::with_capacity(tensors.len());
    tensors
        .into_iter()
        .map(|t| {
            if !seen.insert(t.name.clone()) {
                return Err(PthError::DuplicateName(t.name));
            }
            // `Input::storages` has checked that every declared storage has data.
            let (Some(decl), Some(bytes)) = (storages.get(&t.key), data.get(&t.key)) else {
                return Err(PthError::BadStorage {
                    key: t.key,
                    reason: "no data".into(),
                });
            };
            let tensor = materialise(&t, decl, bytes)?;
            Ok((t.name, tensor))
        })
        .collect()
}

/// Element type and length of a storage, as declared by the tensors that use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StorageDecl {
    dtype: DType,
    numel: usize,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a strided view into a storage.
#[derive(Debug)]
struct TensorRef {
    name: String,
    key: String,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

/// A decoded pickle, and how items were added to the object at the bottom of its stack.
struct Decoded {
    object: Object,
    root_batches: Vec<Batch>,
}

/// One SETITEM/SETITEMS applied to the root object. candle's `Stack` pops the pairs of a
/// SETITEMS off the end of the batch, so each batch lands in the dict reversed.
#[derive(Debug, Clone, Copy)]
enum Batch {
    InOrder(usize),
    Reversed(usize),
}

struct Input<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    fn remaining(&self) -> &'a [u8] {
        self.bytes.get(self.pos..).unwrap_or_default()
    }

    fn take(&mut self, len: usize, section: Section) -> Result<&'a [u8], PthError> {
        let rest = self.remaining();
        let taken = rest.get(..len).ok_or(PthError::Truncated {
            section,
            offset: self.bytes.len(),
        })?;
        self.pos += len;
        Ok(taken)
    }

    /// The magic number is checked by hand: it is an 80-bit integer, which candle's `Stack`
    /// cannot hold (its LONG1 decoding overflows an i64 and panics in debug builds).
    fn magic(&mut self) -> Result<(), PthError> {
        const LEN: usize = 15;
        let rest = self.remaining();
        if rest.starts_with(b"PK\x03\x04") {
            return Err(PthError::ZipFormat);
        }
        let mut expected = [0u8; LEN];
        expected[0] = PROTO;
        expected[2] = LONG1;
        expected[3] = 10;
        expected[4..14].copy_from_slice(&MAGIC.to_le_bytes()[..10]);
        expected[14] = STOP;
        // Any pickle protocol byte is fine; torch wrote 2 by default.
        let matches = rest
            .iter()
            .zip(&expected)
            .enumerate()
            .all(|(i, (got, want))| i == 1 || got == want);
        match (matches, rest.len() >= LEN) {
            (true, true) => {
                self.pos += LEN;
                Ok(())
            }
            (true, false) => Err(PthError::Truncated {
                section: Section::Magic,
                offset: self.bytes.len(),
            }),
            (false, _) => Err(PthError::BadMagic),
        }
    }

    fn pickle(&mut self, section: Section) -> Result<Decoded, PthError> {
        let len = self.pickle_len(section)?;
        let base = self.pos;
        let mut reader = self.take(len, section)?;
        let mut stack = Stack::empty();
        let mut root_batches = Vec::new();
        let pickle_error = |source| PthError::Pickle { section, source };
        loop {
            let Some(&opcode) = reader.first() else {
                // `pickle_len` guarantees a STOP before the end.
                return Err(PthError::Truncated {
                    section,
                    offset: base + len,
                });
            };
            let items = stack.stack();
            match opcode {
                SETITEM if items.len() == 3 => root_batches.push(Batch::InOrder(1)),
                SETITEMS if items.iter().rposition(|o| *o == Object::Mark) == Some(1) => {
                    root_batches.push(Batch::Reversed((items.len() - 2) / 2))
                }
                _ => {}
            }
            if stack.read(&mut reader).map_err(pickle_error)? {
                break;
            }
        }
        let object = stack.finalize().map_err(pickle_error)?;
        Ok(Decoded {
            object,
            root_batches,
        })
    }

    /// Finds the length of the pickle starting here, up to and including its STOP.
    ///
    /// Walking the opcodes first means candle's `Stack` only ever sees complete pickles made of
    /// opcodes it decodes correctly, and that string lengths are bounded by the file size.
    fn pickle_len(&self, section: Section) -> Result<usize, PthError> {
        let bytes = self.remaining();
        let truncated = || PthError::Truncated {
            section,
            offset: self.bytes.len(),
        };
        let mut at = 0usize;
        loop {
            let offset = self.pos + at;
            let opcode = *bytes.get(at).ok_or_else(truncated)?;
            at += 1;
            let argument = match opcode {
                STOP => return Ok(at),
                // PROTO, BININT1, BINPUT, BINGET
                PROTO | b'K' | b'q' | b'h' => 1,
                // BININT2
                b'M' => 2,
                // BININT, LONG_BINPUT, LONG_BINGET
                b'J' | b'r' | b'j' => 4,
                // BINFLOAT
                b'G' => 8,
                // BINUNICODE: u32 LE length, then UTF-8
                b'X' => {
                    let len = bytes.get(at..at + 4).ok_or_else(truncated)?;
                    4 + u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize
                }
                LONG1 => {
                    let len = *bytes.get(at).ok_or_else(truncated)?;
                    if len > 8 {
                        return Err(PthError::WideInteger { section, offset });
                    }
                    1 + usize::from(len)
                }
                // GLOBAL: module and name, each ending in a newline
                b'c' => {
                    let mut lines = bytes[at..].split_inclusive(|&b| b == b'\n');
                    let module = lines.next().filter(|l| l.ends_with(b"\n"));
                    let name = lines.next().filter(|l| l.ends_with(b"\n"));
                    match (module, name) {
                        (Some(module), Some(name)) => module.len() + name.len(),
                        _ => return Err(truncated()),
                    }
                }
                // EMPTY_TUPLE, REDUCE, MARK, TUPLE, BINPERSID, TUPLE1..3, NEWTRUE, NEWFALSE,
                // NONE, SETITEM, SETITEMS, EMPTY_DICT, BUILD, NEWOBJ, EMPTY_LIST, APPEND, APPENDS.
                // DICT (`d`) is left out on purpose: candle decodes it as EMPTY_DICT.
                b')'
                | b'R'
                | b'('
                | b't'
                | b'Q'
                | 0x85..=0x89
                | b'N'
                | SETITEM
                | SETITEMS
                | b'}'
                | b'b'
                | 0x81
                | b']'
                | b'a'
                | b'e' => 0,
                opcode => {
                    return Err(PthError::Opcode {
                        section,
                        opcode,
                        offset,
                    });
                }
            };
            at = at
                .checked_add(argument)
                .filter(|&end| end <= bytes.len())
                .ok_or_else(truncated)?;
        }
    }

    /// Reads the storage key list and each storage's bytes, checked against the declarations.
    fn storages(
        &mut self,
        declared: &HashMap<String, StorageDecl>,
    ) -> Result<HashMap<String, &'a [u8]>, PthError> {
        let keys = match self.pickle(Section::StorageKeys)?.object {
            Object::List(keys) => keys,
            other => {
                return Err(PthError::Unexpected {
                    section: Section::StorageKeys,
                    reason: format!("expected a list, found {}", describe(&other)),
                });
            }
        };
        let mut data = HashMap::with_capacity(keys.len());
        for key in keys {
            let key = key.unicode().map_err(|other| PthError::Unexpected {
                section: Section::StorageKeys,
                reason: format!("expected a string key, found {}", describe(&other)),
            })?;
            let bad = |reason: String| PthError::BadStorage {
                key: key.clone(),
                reason,
            };
            let StorageDecl { dtype, numel } = *declared
                .get(&key)
                .ok_or_else(|| bad("listed, but no tensor uses it".into()))?;
            if data.contains_key(&key) {
                return Err(bad("listed twice".into()));
            }
            let count = self.take(8, Section::StorageData)?;
            let count = i64::from_le_bytes(count.try_into().unwrap_or_default());
            if usize::try_from(count).ok() != Some(numel) {
                return Err(bad(format!(
                    "holds {count} elements, its tensors declare {numel}"
                )));
            }
            let len = numel
                .checked_mul(dtype.size_in_bytes())
                .ok_or_else(|| bad(format!("{numel} elements overflow the address space")))?;
            let bytes = self.take(len, Section::StorageData)?;
            data.insert(key, bytes);
        }
        if let Some(key) = declared.keys().find(|k| !data.contains_key(*k)) {
            return Err(PthError::BadStorage {
                key: key.clone(),
                reason: "used by a tensor but missing from the storage list".into(),
            });
        }
        Ok(data)
    }
}

fn check_sys_info(sys_info: Object) -> Result<(), PthError> {
    let unexpected = |reason: String| PthError::Unexpected {
        section: Section::SysInfo,
        reason,
    };
    let entries = sys_info
        .dict()
        .map_err(|other| unexpected(format!("expected a dict, found {}", describe(&other))))?;
    let little_endian = entries
        .into_iter()
        .find(|(key, _)| *key == Object::Unicode("little_endian".into()))
        .ok_or_else(|| unexpected("no `little_endian` entry".into()))?
        .1;
    match little_endian {
        Object::Bool(true) => Ok(()),
        Object::Bool(false) => Err(PthError::BigEndian),
        other => Err(unexpected(format!(
            "`little_endian` is {}",
            describe(&other)
        ))),
    }
}

/// The state dict's `(name, value)` entries in file order.
fn state_dict(decoded: Decoded) -> Result<Vec<(String, Object)>, PthError> {
    let unexpected = |reason: String| PthError::Unexpected {
        section: Section::StateDict,
        reason,
    };
    let entries = decoded.object.dict().map_err(|other| {
        unexpected(format!(
            "expected an OrderedDict of tensors, found {}",
            describe(&other)
        ))
    })?;

    let mut in_file_order = Vec::with_capacity(entries.len());
    let mut entries = entries.into_iter();
    for batch in decoded.root_batches {
        match batch {
            Batch::InOrder(n) => in_file_order.extend(entries.by_ref().take(n)),
            Batch::Reversed(n) => {
                let mut chunk: Vec<_> = entries.by_ref().take(n).collect();
                chunk.reverse();
                in_file_order.extend(chunk);
            }
        }
    }
    // Whatever is left was merged in by BUILD: the OrderedDict's instance state.
    in_file_order.extend(entries);

    let mut named = Vec::with_capacity(in_file_order.len());
    for (key, value) in in_file_order {
        let name = key
            .unicode()
            .map_err(|other| unexpected(format!("non-string key {}", describe(&other))))?;
        // `state_dict()._metadata` (module versions) is pickled as the OrderedDict's instance
        // state; candle's BUILD merges it into the items. It holds no tensors.
        if name == "_metadata" && matches!(value, Object::Dict(_)) {
            continue;
        }
        named.push((name, value));
    }
    Ok(named)
}

/// Decodes `_rebuild_tensor_v2(storage, offset, size, stride, ...)`, possibly wrapped in
/// `_rebuild_parameter`, and records the storage it points at.
///
/// Not `Object::into_tensor_info`: it indexes argument tuples without checking their length,
/// skips non-tensors silently and ignores `view_metadata`.
fn tensor_ref(
    name: String,
    value: Object,
    storages: &mut HashMap<String, StorageDecl>,
) -> Result<TensorRef, PthError> {
    let bad = |reason: String| PthError::BadTensor {
        name: name.clone(),
        reason,
    };
    let not_a_tensor = |other: Object| bad(format!("not a tensor: {}", describe(&other)));

    let (callable, args) = value.reduce().map_err(not_a_tensor)?;
    let (callable, args) = if is_class(&callable, "torch._utils", "_rebuild_parameter") {
        let data = args.tuple().map_err(not_a_tensor)?.into_iter().next();
        data.ok_or_else(|| bad("`_rebuild_parameter` without data".into()))?
            .reduce()
            .map_err(not_a_tensor)?
    } else {
        (callable, args)
    };
    if !is_class(&callable, "torch._utils", "_rebuild_tensor_v2") {
        return Err(not_a_tensor(callable));
    }
    let mut args = args.tuple().map_err(not_a_tensor)?.into_iter();
    let (Some(storage), Some(offset), Some(size), Some(stride)) =
        (args.next(), args.next(), args.next(), args.next())
    else {
        return Err(bad(
            "`_rebuild_tensor_v2` with fewer than 4 arguments".into()
        ));
    };

    // Legacy persistent id: ('storage', storage_type, key, location, numel, view_metadata).
    let pid = storage
        .persistent_load()
        .map_err(|o| bad(format!("storage {}", describe(&o))))?;
    let pid = pid
        .tuple()
        .map_err(|o| bad(format!("storage id {}", describe(&o))))?;
    let [tag, storage_type, key, _location, numel, view] = <[Object; 6]>::try_from(pid)
        .map_err(|pid| bad(format!("storage id with {} fields, expected 6", pid.len())))?;
    if tag != Object::Unicode("storage".into()) {
        return Err(bad(format!(
            "persistent id {} is not a storage",
            describe(&tag)
        )));
    }
    if view != Object::None {
        return Err(bad(
            "storage views (legacy view_metadata) are not supported".into(),
        ));
    }
    let dtype = storage_dtype(storage_type)?;
    let key = key
        .unicode()
        .map_err(|o| bad(format!("storage key {}", describe(&o))))?;
    let numel = to_usize(numel).ok_or_else(|| bad("storage length is not a count".into()))?;

    let decl = StorageDecl { dtype, numel };
    if let Some(earlier) = storages.insert(key.clone(), decl)
        && earlier != decl
    {
        return Err(PthError::BadStorage {
            key,
            reason: format!("declared as both {earlier:?} and {decl:?}"),
        });
    }

    let offset = to_usize(offset).ok_or_else(|| bad("storage offset is not a count".into()))?;
    let size = to_usizes(size).ok_or_else(|| bad("size is not a tuple of counts".into()))?;
    let stride = to_usizes(stride).ok_or_else(|| bad("stride is not a tuple of counts".into()))?;
    if size.len() != stride.len() {
        return Err(bad(format!(
            "size {size:?} and stride {stride:?} differ in rank"
        )));
    }
    Ok(TensorRef {
        name,
        key,
        offset,
        size,
        stride,
    })
}

fn storage_dtype(storage_type: Object) -> Result<DType, PthError> {
    let (module, name) = storage_type
        .class()
        .map_err(|other| PthError::UnknownStorageType(describe(&other)))?;
    match (module.as_str(), name.as_str()) {
        ("torch", "FloatStorage") => Ok(DType::F32),
        ("torch", "DoubleStorage") => Ok(DType::F64),
        ("torch", "HalfStorage") => Ok(DType::F16),
        ("torch", "BFloat16Storage") => Ok(DType::BF16),
        ("torch", "LongStorage") => Ok(DType::I64),
        ("torch", "IntStorage") => Ok(DType::I32),
        ("torch", "ShortStorage") => Ok(DType::I16),
        ("torch", "ByteStorage") => Ok(DType::U8),
        _ => Err(PthError::UnknownStorageType(format!("{module}.{name}"))),
    }
}

/// Copies a strided view out of its storage into a contiguous tensor.
fn materialise(t: &TensorRef, decl: &StorageDecl, storage: &[u8]) -> Result<Tensor, PthError> {
    let out_of_bounds = || PthError::OutOfBounds {
        name: t.name.clone(),
        key: t.key.clone(),
    };
    let count = t
        .size
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(out_of_bounds)?;
    let bytes = if count == 0 {
        Vec::new()
    } else {
        // The highest element the view touches bounds every index `gather` computes.
        let last = t
            .size
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |at, (&n, &s)| {
                at.checked_add((n - 1).checked_mul(s)?)
            })
            .ok_or_else(out_of_bounds)?;
        if last >= decl.numel {
            return Err(out_of_bounds());
        }
        // Views that repeat elements (stride 0) could make a small file expand without bound;
        // state dicts do not hold them.
        if count > decl.numel {
            return Err(PthError::BadTensor {
                name: t.name.clone(),
                reason: format!("{count} elements from a storage of {}", decl.numel),
            });
        }
        let elem = decl.dtype.size_in_bytes();
        let mut bytes =
            gather(storage, elem, t.offset, &t.size, &t.stride, count).ok_or_else(out_of_bounds)?;
        if cfg!(target_endian = "big") {
            bytes.chunks_exact_mut(elem).for_each(<[u8]>::reverse);
        }
        bytes
    };
    Tensor::from_raw_buffer(&bytes, decl.dtype, &t.size, &Device::Cpu).map_err(|source| {
        PthError::Tensor {
            name: t.name.clone(),
            source,
        }
    })
}

/// Copies the elements of a strided view into row-major order, or `None` if it leaves `storage`.
/// The caller checks that no index overflows.
fn gather(
    storage: &[u8],
    elem: usize,
    offset: usize,
    size: &[usize],
    stride: &[usize],
    count: usize,
) -> Option<Vec<u8>> {
    let (Some((&inner_len, outer_size)), Some((&inner_stride, outer_stride))) =
        (size.split_last(), stride.split_last())
    else {
        return storage
            .get(offset * elem..(offset + 1) * elem)
            .map(<[u8]>::to_vec);
    };
    let mut out = Vec::with_capacity(count * elem);
    let mut index = vec![0usize; outer_size.len()];
    loop {
        let base = offset
            + index
                .iter()
                .zip(outer_stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        if inner_stride == 1 {
            out.extend_from_slice(storage.get(base * elem..(base + inner_len) * elem)?);
        } else {
            for j in 0..inner_len {
                let at = (base + j * inner_stride) * elem;
                out.extend_from_slice(storage.get(at..at + elem)?);
            }
        }
        // Advance the outer index, last dimension fastest.
        let mut dim = outer_size.len();
        loop {
            if dim == 0 {
                return Some(out);
            }
            dim -= 1;
            index[dim] += 1;
            if index[dim] < outer_size[dim] {
                break;
            }
            index[dim] = 0;
        }
    }
}

fn is_class(object: &Object, module: &str, name: &str) -> bool {
    matches!(object, Object::Class { module_name, class_name }
        if module_name == module && class_name == name)
}

fn to_usize(object: Object) -> Option<usize> {
    object
        .int_or_long()
        .ok()
        .and_then(|n| usize::try_from(n).ok())
}

fn to_usizes(object: Object) -> Option<Vec<usize>> {
    object.tuple().ok()?.into_iter().map(to_usize).collect()
}

/// A short rendering of a pickled object: enough to recognise it, never a whole state dict.
fn describe(object: &Object) -> String {
    const MAX: usize = 80;
    let text = format!("{object:?}");
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds protocol-2 pickles opcode by opcode.
    struct Pickle(Vec<u8>);

    impl Pickle {
        fn new() -> Self {
            Self(vec![PROTO, 2])
        }
        fn op(mut self, opcode: u8) -> Self {
            self.0.push(opcode);
            self
        }
        fn int(mut self, n: u8) -> Self {
            self.0.extend([b'K', n]);
            self
        }
        fn str(mut self, s: &str) -> Self {
            self.0.push(b'X');
            self.0.extend((s.len() as u32).to_le_bytes());
            self.0.extend(s.as_bytes());
            self
        }
        fn global(mut self, module: &str, name: &str) -> Self {
            self.0.push(b'c');
            self.0.extend(format!("{module}\n{name}\n").bytes());
            self
        }
        fn ints(self, values: &[u8]) -> Self {
            values.iter().fold(self.op(b'('), |p, &v| p.int(v)).op(b't')
        }
        fn stop(self) -> Vec<u8> {
            self.op(STOP).0
        }
    }

    struct Entry {
        name: &'static str,
        storage_type: &'static str,
        key: &'static str,
        numel: u8,
        offset: u8,
        size: &'static [u8],
        stride: &'static [u8],
    }

    /// A 2x3 float tensor stored transposed, a float vector at an offset and an int64 scalar.
    fn entries() -> Vec<Entry> {
        vec![
            Entry {
                name: "a.weight",
                storage_type: "FloatStorage",
                key: "10",
                numel: 6,
                offset: 0,
                size: &[2, 3],
                stride: &[1, 2],
            },
            Entry {
                name: "a.bias",
                storage_type: "FloatStorage",
                key: "11",
                numel: 4,
                offset: 1,
                size: &[2],
                stride: &[1],
            },
            Entry {
                name: "bn.num_batches_tracked",
                storage_type: "LongStorage",
                key: "12",
                numel: 1,
                offset: 0,
                size: &[],
                stride: &[],
            },
        ]
    }

    fn storages() -> Vec<(&'static str, i64, Vec<u8>)> {
        let floats = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect();
        vec![
            ("10", 6, floats(&[0., 1., 2., 3., 4., 5.])),
            ("11", 4, floats(&[10., 11., 12., 13.])),
            ("12", 1, 7i64.to_le_bytes().to_vec()),
        ]
    }

    /// A legacy stream laid out as torch 1.4 writes it.
    fn stream(
        entries: &[Entry],
        storages: &[(&str, i64, Vec<u8>)],
        little_endian: bool,
    ) -> Vec<u8> {
        let mut out = vec![PROTO, 2, LONG1, 10];
        out.extend(&MAGIC.to_le_bytes()[..10]);
        out.push(STOP);
        out.extend(Pickle::new().op(b'M').op(0xe9).op(0x03).stop());
        out.extend(
            Pickle::new()
                .op(b'}')
                .op(b'(')
                .str("protocol_version")
                .op(b'M')
                .op(0xe9)
                .op(0x03)
                .str("little_endian")
                .op(if little_endian { 0x88 } else { 0x89 })
                .op(b'u')
                .stop(),
        );
        let mut dict = Pickle::new()
            .global("collections", "OrderedDict")
            .op(b')')
            .op(b'R')
            .op(b'(');
        for e in entries {
            dict = dict
                .str(e.name)
                .global("torch._utils", "_rebuild_tensor_v2")
                .op(b'(')
                .op(b'(')
                .str("storage")
                .global("torch", e.storage_type)
                .str(e.key)
                .str("cpu")
                .int(e.numel)
                .op(b'N')
                .op(b't')
                .op(b'Q')
                .int(e.offset)
                .ints(e.size)
                .ints(e.stride)
                .op(0x89)
                .global("collections", "OrderedDict")
                .op(b')')
                .op(b'R')
                .op(b't')
                .op(b'R');
        }
        // torch pickles `state_dict()._metadata` as the OrderedDict's state.
        let dict = dict
            .op(SETITEMS)
            .op(b'}')
            .str("_metadata")
            .global("collections", "OrderedDict")
            .op(b')')
            .op(b'R')
            .op(SETITEM)
            .op(b'b');
        out.extend(dict.stop());
        let keys = storages
            .iter()
            .fold(Pickle::new().op(b']').op(b'('), |p, s| p.str(s.0));
        out.extend(keys.op(b'e').stop());
        for (_, count, data) in storages {
            out.extend(count.to_le_bytes());
            out.extend(data);
        }
        out
    }

    fn valid() -> Vec<u8> {
        stream(&entries(), &storages(), true)
    }

    #[test]
    fn reads_tensors_in_file_order_honouring_offset_and_strides() {
        let tensors = parse_legacy_pth(&valid()).unwrap();
        let names: Vec<_> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a.weight", "a.bias", "bn.num_batches_tracked"]);
        let weight = tensors[0].1.to_vec2::<f32>().unwrap();
        assert_eq!(weight, [[0., 2., 4.], [1., 3., 5.]]);
        assert_eq!(tensors[1].1.to_vec1::<f32>().unwrap(), [11., 12.]);
        assert_eq!(tensors[2].1.dtype(), DType::I64);
        assert_eq!(tensors[2].1.to_scalar::<i64>().unwrap(), 7);
    }

    #[test]
    fn refuses_bad_magic() {
        let mut bytes = valid();
        bytes[6] ^= 1;
        assert!(matches!(parse_legacy_pth(&bytes), Err(PthError::BadMagic)));
        assert!(matches!(
            parse_legacy_pth(b"not a checkpoint"),
            Err(PthError::BadMagic)
        ));
    }

    #[test]
    fn points_zip_checkpoints_to_candle() {
        let err = parse_legacy_pth(b"PK\x03\x04rest of a zip").unwrap_err();
        assert!(matches!(err, PthError::ZipFormat));
    }

    #[test]
    fn every_truncation_is_reported_as_truncated() {
        let bytes = valid();
        for len in 0..bytes.len() {
            match parse_legacy_pth(&bytes[..len]) {
                Err(PthError::Truncated { .. }) => {}
                other => panic!("cut at {len} of {}: {other:?}", bytes.len()),
            }
        }
    }

    #[test]
    fn refuses_trailing_bytes() {
        let mut bytes = valid();
        bytes.extend([0, 0, 0]);
        assert!(matches!(
            parse_legacy_pth(&bytes),
            Err(PthError::TrailingBytes(3))
        ));
    }

    #[test]
    fn refuses_big_endian_checkpoints() {
        let bytes = stream(&entries(), &storages(), false);
        assert!(matches!(parse_legacy_pth(&bytes), Err(PthError::BigEndian)));
    }

    #[test]
    fn refuses_unknown_storage_types() {
        let mut entries = entries();
        entries[0].storage_type = "ComplexFloatStorage";
        let err = parse_legacy_pth(&stream(&entries, &storages(), true)).unwrap_err();
        assert!(
            matches!(&err, PthError::UnknownStorageType(t) if t == "torch.ComplexFloatStorage")
        );
    }

    #[test]
    fn refuses_views_beyond_their_storage() {
        let mut entries = entries();
        entries[1].offset = 3;
        let err = parse_legacy_pth(&stream(&entries, &storages(), true)).unwrap_err();
        assert!(matches!(&err, PthError::OutOfBounds { name, .. } if name == "a.bias"));
    }

    #[test]
    fn refuses_storage_lengths_that_disagree() {
        let mut storages = storages();
        storages[1].1 = 5;
        let err = parse_legacy_pth(&stream(&entries(), &storages, true)).unwrap_err();
        assert!(
            matches!(&err, PthError::BadStorage { key, .. } if key == "11"),
            "{err}"
        );
    }

    #[test]
    fn refuses_storages_missing_from_the_key_list() {
        let mut storages = storages();
        storages.pop();
        let err = parse_legacy_pth(&stream(&entries(), &storages, true)).unwrap_err();
        assert!(
            matches!(&err, PthError::BadStorage { key, .. } if key == "12"),
            "{err}"
        );
    }

    #[test]
    fn refuses_integers_wider_than_64_bits_without_panicking() {
        let mut bytes = valid();
        let version = 15 + 2; // after the magic pickle and PROTO 2
        bytes.splice(version..version + 3, [LONG1, 9, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let err = parse_legacy_pth(&bytes).unwrap_err();
        assert!(matches!(
            err,
            PthError::WideInteger {
                section: Section::ProtocolVersion,
                ..
            }
        ));
    }
}
