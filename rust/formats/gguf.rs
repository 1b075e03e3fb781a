//! GGUF files as llama.cpp writes them (see ggml's docs/gguf.md): a header, typed key/value
//! metadata, a tensor table, and the tensor data section. The file is mapped, never read
//! whole; every count, length, offset and size is checked against the file's length before it
//! is used, so a truncated or hostile file is an error, never a panic, a hang or a huge
//! allocation.

use std::fs::File;
use std::sync::Arc;

use memmap2::Mmap;

use crate::kernels::quant::matrix::SharedBytes;

use crate::error::{EllmError, Result};

/// A metadata value. Integers keep their sign; arrays keep their element type.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Array),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    Int(Vec<i64>),
    UInt(Vec<u64>),
    Float(Vec<f64>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    Nested(Vec<Array>),
}

/// GGML tensor types: (type number, name, values per block, bytes per block).
pub const GGML_TYPES: &[(u32, &str, usize, usize)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

pub fn type_name(t: u32) -> Option<&'static str> {
    GGML_TYPES.iter().find(|e| e.0 == t).map(|e| e.1)
}

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    /// As GGUF lists them: fastest-varying first.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Where the bytes start in the file, and how many there are.
    pub start: usize,
    pub nbytes: usize,
}

impl TensorEntry {
    pub fn type_name(&self) -> &'static str {
        type_name(self.ggml_type).expect("checked when read")
    }

    /// Dimensions slowest first, as NumPy and safetensors list them.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

pub struct GgufFile {
    pub path: String,
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorEntry>,
    map: SharedBytes,
    /// `map` is a file mapping (not bytes in memory), whose pages `release` may drop.
    mapped: bool,
}

const MAX_DIMS: u32 = 4;
/// Nested arrays deeper than this are refused (llama.cpp writes none).
const MAX_NESTING: u32 = 2;

fn format_err(path: &str, what: impl std::fmt::Display) -> EllmError {
    EllmError::Format(format!("{path}: {what}"))
}

/// A cursor over the mapped bytes that refuses to read past their end.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let left = self.data.len() - self.pos;
        if n > left as u64 {
            return Err(format_err(
                self.path,
                format!("{} of {n} bytes at offset {} runs past the end of the file (truncated?)", what(), self.pos),
            ));
        }
        let s = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn fixed<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.fixed(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.fixed(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("the length of {}", what()))?;
        let bytes = self.take(len, what)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    /// A count of items of at least `min_size` bytes each, refused if the rest of the file
    /// cannot hold that many (so no allocation is ever larger than the file).
    fn count(&mut self, min_size: u64, what: &dyn Fn() -> String) -> Result<usize> {
        let n = self.u64(&|| format!("the count of {}", what()))?;
        let left = (self.data.len() - self.pos) as u64;
        if n > left / min_size.max(1) {
            return Err(format_err(
                self.path,
                format!(
                    "{} declares {n} items, more than the {left} bytes left in the file can hold (truncated?)",
                    what()
                ),
            ));
        }
        Ok(n as usize)
    }

    fn scalar(&mut self, kind: u32, what: &dyn Fn() -> String) -> Result<Value> {
        Ok(match kind {
            0 => Value::UInt(self.fixed::<1>(what)?[0] as u64),
            1 => Value::Int(self.fixed::<1>(what)?[0] as i8 as i64),
            2 => Value::UInt(u16::from_le_bytes(self.fixed(what)?) as u64),
            3 => Value::Int(i16::from_le_bytes(self.fixed(what)?) as i64),
            4 => Value::UInt(u32::from_le_bytes(self.fixed(what)?) as u64),
            5 => Value::Int(i32::from_le_bytes(self.fixed(what)?) as i64),
            6 => Value::Float(f32::from_le_bytes(self.fixed(what)?) as f64),
            7 => match self.fixed::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format_err(self.path, format!("{} is a bool of value {b}", what()))),
            },
            8 => Value::Str(self.string(what)?),
            10 => Value::UInt(self.u64(what)?),
            11 => Value::Int(i64::from_le_bytes(self.fixed(what)?)),
            12 => Value::Float(f64::from_le_bytes(self.fixed(what)?)),
            _ => return Err(format_err(self.path, format!("{} has unknown value type {kind}", what()))),
        })
    }

    fn value(&mut self, kind: u32, depth: u32, what: &dyn Fn() -> String) -> Result<Value> {
        if kind == 9 {
            Ok(Value::Array(self.array(depth, what)?))
        } else {
            self.scalar(kind, what)
        }
    }

    fn array(&mut self, depth: u32, what: &dyn Fn() -> String) -> Result<Array> {
        if depth >= MAX_NESTING {
            return Err(format_err(self.path, format!("{} nests arrays deeper than {MAX_NESTING}", what())));
        }
        let item = self.u32(&|| format!("the item type of {}", what()))?;
        let min_size = match item {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            _ => return Err(format_err(self.path, format!("{} has unknown item type {item}", what()))),
        };
        let n = self.count(min_size, what)?;
        let element = |i: usize| move || format!("{}[{i}]", what());
        Ok(match item {
            8 => Array::Str((0..n).map(|i| self.string(&element(i))).collect::<Result<_>>()?),
            9 => Array::Nested((0..n).map(|i| self.array(depth + 1, &element(i))).collect::<Result<_>>()?),
            6 | 12 => Array::Float(
                (0..n)
                    .map(|i| match self.scalar(item, &element(i))? {
                        Value::Float(f) => Ok(f),
                        _ => unreachable!("a float type"),
                    })
                    .collect::<Result<_>>()?,
            ),
            7 => Array::Bool(
                (0..n)
                    .map(|i| match self.scalar(item, &element(i))? {
                        Value::Bool(b) => Ok(b),
                        _ => unreachable!("the bool type"),
                    })
                    .collect::<Result<_>>()?,
            ),
            0 | 2 | 4 | 10 => Array::UInt(
                (0..n)
                    .map(|i| match self.scalar(item, &element(i))? {
                        Value::UInt(v) => Ok(v),
                        _ => unreachable!("an unsigned type"),
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => Array::Int(
                (0..n)
                    .map(|i| match self.scalar(item, &element(i))? {
                        Value::Int(v) => Ok(v),
                        _ => unreachable!("a signed type"),
                    })
                    .collect::<Result<_>>()?,
            ),
        })
    }
}

impl GgufFile {
    pub fn open(path: &str) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| EllmError::Io(format!("{path}: {e}")))?;
        // Not populated up front: pages fault in as the loader copies each tensor and `release`
        // drops them after, so the file and its copy are never resident whole at once.
        // SAFETY: the mapping is read-only; a file changed underneath it by another process is
        // outside what any reader of a mapped file can defend against (llama.cpp maps the same way).
        let map =
            unsafe { Mmap::map(&file) }.map_err(|e| EllmError::Io(format!("{path}: cannot map the file: {e}")))?;
        let mut file = Self::parse(path, Arc::new(map))?;
        file.mapped = true;
        Ok(file)
    }

    /// Parse bytes already in memory (`path` names them in errors).
    pub fn parse(path: &str, map: SharedBytes) -> Result<GgufFile> {
        let data: &[u8] = (*map).as_ref();
        let mut c = Cursor { data, pos: 0, path };
        if c.take(4, &|| "the magic".into()).ok() != Some(b"GGUF".as_slice()) {
            return Err(format_err(path, "not a GGUF file (its first bytes are not \"GGUF\")"));
        }
        let version = c.u32(&|| "the version".into())?;
        if !(2..=3).contains(&version) {
            return Err(format_err(path, format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        let n_tensors = c.count(24, &|| "the tensor table".into())?;
        let n_kv = c.count(12, &|| "the metadata".into())?;
        let mut metadata = Vec::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = c.string(&|| format!("metadata key {i}"))?;
            let kind = c.u32(&|| format!("the type of {key}"))?;
            let value = c.value(kind, 0, &|| format!("metadata {key}"))?;
            metadata.push((key, value));
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = c.string(&|| format!("the name of tensor {i}"))?;
            let n_dims = c.u32(&|| format!("the dimension count of {name}"))?;
            if !(1..=MAX_DIMS).contains(&n_dims) {
                return Err(format_err(path, format!("tensor {name} has {n_dims} dimensions (GGUF allows 1 to 4)")));
            }
            let dims = (0..n_dims).map(|_| c.u64(&|| format!("a dimension of {name}"))).collect::<Result<Vec<_>>>()?;
            let ggml_type = c.u32(&|| format!("the type of {name}"))?;
            let offset = c.u64(&|| format!("the data offset of {name}"))?;
            tensors.push((name, dims, ggml_type, offset));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => 32,
            Some((_, Value::UInt(a))) if *a > 0 && a.is_power_of_two() && *a <= 1 << 20 => *a as usize,
            Some((_, v)) => return Err(format_err(path, format!("general.alignment {v:?} is not a power of two"))),
        };
        let data_start = c.pos.next_multiple_of(alignment);
        let data_len = data.len().saturating_sub(data_start);
        let mut entries = Vec::with_capacity(tensors.len());
        for (name, dims, ggml_type, offset) in tensors {
            let Some(&(_, tname, block, size)) = GGML_TYPES.iter().find(|e| e.0 == ggml_type) else {
                return Err(format_err(path, format!("tensor {name} has unknown GGML type {ggml_type}")));
            };
            if dims.contains(&0) {
                // (a zero would also let the product of the other dimensions overflow unchecked)
                return Err(format_err(path, format!("tensor {name} has a zero dimension: {dims:?}")));
            }
            let count = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let Some(count) = count.filter(|&n| n <= data.len() as u64 * 8) else {
                return Err(format_err(
                    path,
                    format!("tensor {name} declares dimensions {dims:?}: it needs more bytes than the file holds"),
                ));
            };
            if dims[0] % block as u64 != 0 {
                return Err(format_err(
                    path,
                    format!("tensor {name}: rows of {} values are not whole {tname} blocks of {block}", dims[0]),
                ));
            }
            let nbytes = count / block as u64 * size as u64;
            if offset % alignment as u64 != 0 {
                return Err(format_err(
                    path,
                    format!("tensor {name}: data offset {offset} is not a multiple of the alignment {alignment}"),
                ));
            }
            if offset.checked_add(nbytes).is_none_or(|end| end > data_len as u64) {
                return Err(format_err(path, format!(
                    "GGUF tensor {name} ({tname}, dimensions {dims:?}) needs {nbytes} bytes at offset {offset} of a {data_len}-byte data section (truncated?)"
                )));
            }
            entries.push(TensorEntry {
                name,
                dims,
                ggml_type,
                start: data_start + offset as usize,
                nbytes: nbytes as usize,
            });
        }
        Ok(GgufFile { path: path.to_string(), version, metadata, tensors: entries, map, mapped: false })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The mapped file (tensors' bytes are `map()[t.start..t.start + t.nbytes]`).
    pub fn map(&self) -> &SharedBytes {
        &self.map
    }

    /// Drop this process's pages of a tensor that has been copied out, so the file's pages and
    /// the copy are not both resident. The bytes stay readable: a later read maps them again
    /// from the page cache.
    pub fn release(&self, t: &TensorEntry) {
        if !self.mapped {
            return;
        }
        let page = 4096;
        let base = (*self.map).as_ref().as_ptr() as usize;
        let (start, end) = ((base + t.start).next_multiple_of(page), (base + t.start + t.nbytes) / page * page);
        if end > start {
            // SAFETY: the range lies inside a private read-only file mapping; MADV_DONTNEED
            // only drops its pages, which fault back in from the file on the next read.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }

    /// A tensor as the engine takes it: `[rows, cols]` with cols its first GGUF dimension and
    /// rows all the others, its bytes in place in the mapping.
    pub fn stored<'a>(&self, t: &'a TensorEntry, check_finite: bool) -> crate::model::weights::StoredTensor<'a> {
        crate::model::weights::StoredTensor {
            name: &t.name,
            type_name: t.type_name(),
            rows: t.dims[1..].iter().product::<u64>() as usize,
            cols: t.dims[0] as usize,
            bytes: self.map.clone(),
            range: t.start..t.start + t.nbytes,
            check_finite,
        }
    }

    pub fn bytes(&self, t: &TensorEntry) -> &[u8] {
        &(*self.map).as_ref()[t.start..t.start + t.nbytes]
    }
}

/// What a fuzzer feeds the reader: parse `data`, and make every tensor it lists into a matrix
/// the way the engine would (as stored and expanded to f32, up to a size that keeps each input
/// fast). Any outcome but a panic, a hang or a huge allocation is fine. Returns whether the
/// file parsed and how many matrices were made (how deep the input got).
pub fn fuzz_one(data: &[u8]) -> (bool, usize) {
    use crate::model::weights::{KeepAs, Matrix};
    let Ok(file) = GgufFile::parse("fuzz.gguf", Arc::new(data.to_vec())) else { return (false, 0) };
    let mut made = 0;
    for entry in &file.tensors {
        if entry.dims.iter().product::<u64>() > 1 << 16 {
            continue;
        }
        for keep in [KeepAs::Stored, KeepAs::F32] {
            if let Ok(m) = Matrix::from_stored(file.stored(entry, true), keep, None) {
                let _ = m.to_f32();
                made += 1;
            }
        }
    }
    (true, made)
}

/// Small valid files for fuzzers to start from: every metadata value type, an array of strings,
/// and tensors of F32, F16 and several block types.
pub fn seed_files() -> Vec<Vec<u8>> {
    fn put_str(b: &mut Vec<u8>, s: &str) {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    }
    let tensors: [(&str, u32, usize); 5] =
        [("w.f32", 0, 4 * 64), ("w.f16", 1, 2 * 64), ("w.q4_0", 2, 36), ("w.q8_0", 8, 68), ("w.q4_k", 12, 144)];
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&4u64.to_le_bytes());
    put_str(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes());
    put_str(&mut b, "llama");
    put_str(&mut b, "llama.block_count");
    b.extend_from_slice(&4u32.to_le_bytes());
    b.extend_from_slice(&2u32.to_le_bytes());
    put_str(&mut b, "tokenizer.ggml.tokens");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&3u64.to_le_bytes());
    for t in ["a", "bc", "<s>"] {
        put_str(&mut b, t);
    }
    put_str(&mut b, "x.f64");
    b.extend_from_slice(&12u32.to_le_bytes());
    b.extend_from_slice(&1.5f64.to_le_bytes());
    let mut offset = 0u64;
    for (name, kind, nbytes) in tensors {
        put_str(&mut b, name);
        let cols: u64 = if kind == 12 { 256 } else { 32 };
        let rows = match kind {
            0 | 1 => 2,
            _ => 64 / cols.min(64),
        };
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&cols.to_le_bytes());
        b.extend_from_slice(&rows.max(1).to_le_bytes());
        b.extend_from_slice(&kind.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        offset += (nbytes as u64).next_multiple_of(32);
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for (i, (_, _, nbytes)) in tensors.iter().enumerate() {
        let start = b.len();
        b.extend((0..*nbytes).map(|j| (j * 7 + i) as u8 & 0x3F));
        b.resize(start + nbytes.next_multiple_of(32), 0);
    }
    vec![b, tests_support::tiny_file()]
}

#[doc(hidden)]
pub mod tests_support {
    /// A GGUF file: one string key, one u32 array, one 2x32 F32 tensor.
    pub fn tiny_file() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes()); // tensors
        b.extend_from_slice(&2u64.to_le_bytes()); // keys
        let key = |b: &mut Vec<u8>, k: &str| {
            b.extend_from_slice(&(k.len() as u64).to_le_bytes());
            b.extend_from_slice(k.as_bytes());
        };
        key(&mut b, "general.architecture");
        b.extend_from_slice(&8u32.to_le_bytes());
        key(&mut b, "llama");
        key(&mut b, "x.list");
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&3u64.to_le_bytes());
        for v in [7u32, 8, 9] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        key(&mut b, "w");
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&32u64.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for i in 0..64 {
            b.extend_from_slice(&(i as f32).to_le_bytes());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::tests_support::tiny_file;

    fn parse(bytes: &[u8]) -> Result<GgufFile> {
        GgufFile::parse("test.gguf", Arc::new(bytes.to_vec()))
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let f = parse(&tiny_file()).unwrap();
        assert_eq!(f.get("general.architecture"), Some(&Value::Str("llama".into())));
        assert_eq!(f.get("x.list"), Some(&Value::Array(Array::UInt(vec![7, 8, 9]))));
        let t = f.tensor("w").unwrap();
        assert_eq!((t.shape(), t.type_name(), t.nbytes), (vec![2, 32], "F32", 256));
        assert_eq!(&f.bytes(t)[4..8], &1.0f32.to_le_bytes());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let full = tiny_file();
        for len in 0..full.len() {
            match parse(&full[..len]) {
                Err(EllmError::Format(_)) => {}
                Err(e) => panic!("length {len}: wrong error {e:?}"),
                Ok(_) => panic!("length {len}: a truncated file was accepted"),
            }
        }
    }

    #[test]
    fn every_corrupted_byte_is_handled() {
        let full = tiny_file();
        for i in 0..full.len() {
            for v in [0u8, 1, 0x7F, 0xFF] {
                let mut b = full.clone();
                b[i] = v;
                let _ = parse(&b); // an error or a file; never a panic or a huge allocation
            }
        }
    }
}

#[cfg(test)]
mod fuzz {
    //! A mutation fuzzer on stable Rust, over the seed files: random byte flips, runs of 0x00 or
    //! 0xFF, truncations, splices of two inputs and repeated chunks. `cargo test` runs a short
    //! campaign; `ELLM_FUZZ_INPUTS=1000000 cargo test --release -- --ignored gguf_fuzz_campaign`
    //! the long one. (`fuzz/` holds the same target for cargo-fuzz's coverage-guided libFuzzer.)
    use rand_core::{Rng, SeedableRng};
    use rand_xoshiro::Xoshiro256PlusPlus;

    use super::{fuzz_one, seed_files};

    fn mutate(r: &mut Xoshiro256PlusPlus, seeds: &[Vec<u8>]) -> Vec<u8> {
        let mut b = seeds[r.next_u32() as usize % seeds.len()].clone();
        for _ in 0..1 + r.next_u32() % 4 {
            let len = b.len().max(1);
            let at = r.next_u32() as usize % len;
            match r.next_u32() % 6 {
                0 => b.truncate(at),
                1 => {
                    if let Some(x) = b.get_mut(at) {
                        *x ^= 1 << (r.next_u32() % 8);
                    }
                }
                2 => {
                    let v = if r.next_u32().is_multiple_of(2) { 0x00 } else { 0xFF };
                    let n = (1 + r.next_u32() % 8) as usize;
                    for x in b.iter_mut().skip(at).take(n) {
                        *x = v;
                    }
                }
                3 => {
                    let other = &seeds[r.next_u32() as usize % seeds.len()];
                    let from = r.next_u32() as usize % other.len().max(1);
                    b.truncate(at);
                    b.extend_from_slice(&other[from.min(other.len())..]);
                }
                4 => {
                    let end = (at + 1 + r.next_u32() as usize % 32).min(b.len());
                    let chunk = b[at.min(end)..end].to_vec();
                    b.splice(at..at, chunk);
                }
                _ => {
                    if let Some(x) = b.get_mut(at) {
                        *x = r.next_u32() as u8;
                    }
                }
            }
        }
        b
    }

    fn campaign(inputs: usize) {
        let seeds = seed_files();
        for s in &seeds {
            assert!(super::GgufFile::parse("seed", std::sync::Arc::new(s.clone())).is_ok(), "a seed must parse");
        }
        let mut r = Xoshiro256PlusPlus::seed_from_u64(0x6767_7566);
        let started = std::time::Instant::now();
        let (mut parsed, mut matrices) = (0, 0);
        for _ in 0..inputs {
            let (ok, made) = fuzz_one(&mutate(&mut r, &seeds));
            parsed += ok as usize;
            matrices += made;
        }
        eprintln!(
            "gguf fuzz: {inputs} inputs in {:.1} s, no panic; {parsed} parsed, {matrices} matrices made",
            started.elapsed().as_secs_f64()
        );
    }

    #[test]
    fn gguf_fuzz_smoke() {
        campaign(20_000);
    }

    #[test]
    #[ignore]
    fn gguf_fuzz_campaign() {
        campaign(std::env::var("ELLM_FUZZ_INPUTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000));
    }
}
