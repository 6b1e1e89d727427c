//! Heap profiles in pprof's format (feature `pprof`): the profile as `go tool pprof` reads it, a gzipped
//! `profile.proto` with Go's four heap sample types, and the hosted stack hook.
//!
//! See `lib.rs` for an overview of the allocator and `malloc/profile/mod.rs` for the sampling and records.
//!
//! ```no_run
//! # #[cfg(feature = "pprof")] {
//! #[global_allocator]
//! static GLOBAL: goheap::Hosted = goheap::Hosted::new();
//! // ... run the program; then:
//! GLOBAL.write_heap_profile("heap.pb.gz").unwrap();
//! // go tool pprof -top heap.pb.gz
//! # }
//! ```
//!
//! The profile is what Go's `runtime/pprof` writes for `pprof.Lookup("heap")`: sample types
//! `alloc_objects/count`, `alloc_space/bytes`, `inuse_objects/count`, `inuse_space/bytes`, period type
//! `space/bytes` with the sampling rate as period, one sample per bucket (stack × object size) with a numeric
//! label `bytes` = the object size, and the values scaled as Go's `scaleHeapSample` scales them. Locations
//! hold the call sites (return address − 1); with symbolization (hosted) each location has its function
//! names, inlined frames included, so pprof needs no binary; without (a kernel's profile) pprof shows
//! addresses, or resolves them against the mapping's file when it can read it. `drop_frames` hides the
//! allocator's own frames (and those of the Rust allocation shims) as Go hides the runtime's.
//!
//! The messages are declared here with prost's derive (field numbers from pprof's `profile.proto`), so no
//! build step needs `protoc`.

use crate::cpu::CpuProvider;
use crate::malloc::{Malloc, ProfileRecord, MAX_STACK_DEPTH};
use crate::source::PageSource;
use std::collections::HashMap;
use std::io::Write;
use std::string::{String, ToString};
use std::vec::Vec;

/// pprof's `Profile` message (the fields a heap profile uses).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Profile {
    /// What each value of a sample measures.
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    /// The samples.
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    /// Mapped binaries.
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    /// Code locations.
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    /// Functions.
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    /// Strings; entry 0 is "".
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    /// Regex (string index) of frames to drop with everything they call.
    #[prost(int64, tag = "7")]
    pub drop_frames: i64,
    /// Time of collection (ns since the epoch).
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    /// Kind of events between samples.
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    /// Events between samples (the sampling rate).
    #[prost(int64, tag = "12")]
    pub period: i64,
    /// Free-form comments (string indices).
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    /// The sample type shown by default (string index).
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

/// pprof's `ValueType`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueType {
    /// String index of the type (e.g. "inuse_space").
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    /// String index of the unit (e.g. "bytes").
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

/// pprof's `Sample`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    /// Location ids, leaf first.
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    /// One value per sample type.
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    /// Labels.
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

/// pprof's `Label`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    /// String index of the key.
    #[prost(int64, tag = "1")]
    pub key: i64,
    /// String index of a string value.
    #[prost(int64, tag = "2")]
    pub str: i64,
    /// A numeric value.
    #[prost(int64, tag = "3")]
    pub num: i64,
    /// String index of the numeric value's unit.
    #[prost(int64, tag = "4")]
    pub num_unit: i64,
}

/// pprof's `Mapping`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Mapping {
    /// Unique nonzero id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Start address.
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    /// End address.
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    /// File offset of the start.
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    /// String index of the file name.
    #[prost(int64, tag = "5")]
    pub filename: i64,
    /// String index of the build id.
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    /// Locations carry function names.
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    /// Locations carry file names.
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    /// Locations carry line numbers.
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
    /// Locations carry inlined frames.
    #[prost(bool, tag = "10")]
    pub has_inline_frames: bool,
}

/// pprof's `Location`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Location {
    /// Unique nonzero id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Its mapping's id.
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    /// The instruction address.
    #[prost(uint64, tag = "3")]
    pub address: u64,
    /// Functions at the address, innermost (inlined) first.
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

/// pprof's `Line`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Line {
    /// The function's id.
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    /// Source line.
    #[prost(int64, tag = "2")]
    pub line: i64,
}

/// pprof's `Function`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Function {
    /// Unique nonzero id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// String index of the (demangled) name.
    #[prost(int64, tag = "2")]
    pub name: i64,
    /// String index of the raw symbol name.
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    /// String index of the source file.
    #[prost(int64, tag = "4")]
    pub filename: i64,
    /// First line of the function.
    #[prost(int64, tag = "5")]
    pub start_line: i64,
}

/// One source frame at an address (a symbolizer's answer; inlined frames first).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    /// Demangled function name.
    pub function: String,
    /// Source file, if known.
    pub file: String,
    /// Source line, 0 if unknown.
    pub line: i64,
}

/// Frames pprof drops with everything they call: the allocator's own, the Rust allocation shims and the
/// unwinder. pprof drops, in each sample, the outermost frame that fully matches and everything below it, so
/// the pattern must match no frame of the program above the allocation (`std::sys::backtrace::*` of the test
/// harness, say: hence `backtrace::.*` anchored at the start).
pub const DROP_FRAMES: &str = r".*goheap::(malloc|hosted)::.*|__rust_(alloc|alloc_zeroed|realloc|dealloc)|__rdl_.*|__rg_.*|<?alloc::alloc::.*|backtrace::.*";

/// A function name as pprof shows it best: a method's `<Type>::method` or `<Type as Trait>::method` (how
/// demanglers write them) becomes `Type::method`. pprof would otherwise strip the bracketed part as
/// template arguments, show `::method`, and match [`DROP_FRAMES`] against that. The full name stays in the
/// function's `system_name`.
pub fn clean_name(name: &str) -> String {
    let Some(rest) = name.strip_prefix('<') else { return name.to_string() };
    let mut depth = 1;
    for (i, c) in rest.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => {
                depth -= 1;
                if depth == 0 {
                    let inner = &rest[..i];
                    let ty = inner.split_once(" as ").map_or(inner, |(ty, _)| ty);
                    return std::format!("{ty}{}", &rest[i + 1..]);
                }
            }
            _ => {}
        }
    }
    name.to_string()
}

/// What to put in the profile besides the records.
#[derive(Default)]
pub struct EncodeOptions<'a> {
    /// Resolves a code address (a call site) to its frames; `None`: addresses only.
    pub symbolize: Option<&'a dyn Fn(u64) -> Vec<Frame>>,
    /// The mapping's file name (the executable, or a kernel's ELF), for pprof's own symbolization.
    pub mapping_file: Option<String>,
    /// Collection time, ns since the epoch (0: unknown).
    pub time_nanos: i64,
    /// A comment line.
    pub comment: Option<String>,
}

impl core::fmt::Debug for EncodeOptions<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("EncodeOptions")
            .field("symbolize", &self.symbolize.is_some())
            .field("mapping_file", &self.mapping_file)
            .field("time_nanos", &self.time_nanos)
            .field("comment", &self.comment)
            .finish()
    }
}

/// Interns strings for the string table.
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        Strings { table: std::vec![String::new()], index: HashMap::from([(String::new(), 0)]) }
    }
    fn get(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

/// The heap profile of `records` sampled at `rate` as pprof's `Profile` message.
pub fn build(records: &[ProfileRecord], rate: usize, opts: &EncodeOptions<'_>) -> Profile {
    let mut st = Strings::new();
    let mut p = Profile::default();
    for (t, u) in
        [("alloc_objects", "count"), ("alloc_space", "bytes"), ("inuse_objects", "count"), ("inuse_space", "bytes")]
    {
        p.sample_type.push(ValueType { r#type: st.get(t), unit: st.get(u) });
    }
    p.period_type = Some(ValueType { r#type: st.get("space"), unit: st.get("bytes") });
    p.period = rate as i64;
    p.default_sample_type = st.get("inuse_space");
    p.drop_frames = st.get(DROP_FRAMES);
    p.time_nanos = opts.time_nanos;
    if let Some(c) = &opts.comment {
        p.comment.push(st.get(c));
    }
    let symbolized = opts.symbolize.is_some();
    p.mapping.push(Mapping {
        id: 1,
        memory_start: 0,
        memory_limit: u64::MAX,
        file_offset: 0,
        filename: opts.mapping_file.as_deref().map_or(0, |f| st.get(f)),
        build_id: 0,
        has_functions: symbolized,
        has_filenames: symbolized,
        has_line_numbers: symbolized,
        has_inline_frames: symbolized,
    });
    let mut locs: HashMap<u64, u64> = HashMap::new();
    let mut funcs: HashMap<(String, String), u64> = HashMap::new();
    let (bytes_key, bytes_unit) = (st.get("bytes"), st.get("bytes"));
    for r in records {
        let mut ids = Vec::with_capacity(MAX_STACK_DEPTH);
        for &ret in r.stack() {
            // A return address: the call is the instruction before it.
            let pc = (ret as u64).saturating_sub(1);
            let id = match locs.get(&pc) {
                Some(&id) => id,
                None => {
                    let id = p.location.len() as u64 + 1;
                    let mut loc = Location { id, mapping_id: 1, address: pc, line: Vec::new() };
                    if let Some(sym) = opts.symbolize {
                        for fr in sym(pc) {
                            let n = funcs.len() as u64 + 1;
                            let fid = *funcs.entry((fr.function.clone(), fr.file.clone())).or_insert_with(|| {
                                let name = st.get(&clean_name(&fr.function));
                                let system_name = st.get(&fr.function);
                                let filename = st.get(&fr.file);
                                p.function.push(Function { id: n, name, system_name, filename, start_line: 0 });
                                n
                            });
                            loc.line.push(Line { function_id: fid, line: fr.line });
                        }
                    }
                    p.location.push(loc);
                    locs.insert(pc, id);
                    id
                }
            };
            ids.push(id);
        }
        let v = r.scaled(rate);
        p.sample.push(Sample {
            location_id: ids,
            value: v.to_vec(),
            label: std::vec![Label { key: bytes_key, str: 0, num: r.size as i64, num_unit: bytes_unit }],
        });
    }
    p.string_table = st.table;
    p
}

/// `profile` as pprof's file format: the protobuf, gzipped.
pub fn to_gzipped_bytes(profile: &Profile) -> Vec<u8> {
    use prost::Message;
    let raw = profile.encode_to_vec();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).expect("writing to a Vec cannot fail");
    gz.finish().expect("writing to a Vec cannot fail")
}

/// Reads a profile file (gzipped or plain protobuf), as pprof does.
pub fn decode(bytes: &[u8]) -> Result<Profile, std::io::Error> {
    use prost::Message;
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut out)?;
        out
    } else {
        bytes.to_vec()
    };
    Profile::decode(raw.as_slice()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The hosted symbolizer: the `backtrace` crate's resolver (DWARF debug info when the binary has it, else
/// the symbol table), inlined frames first.
pub fn symbolize(pc: u64) -> Vec<Frame> {
    let mut out = Vec::new();
    backtrace::resolve(pc as usize as *mut core::ffi::c_void, |s| {
        let function = s.name().map_or_else(|| std::format!("{pc:#x}"), |n| std::format!("{n:#}"));
        let file = s.filename().map(|f| f.display().to_string()).unwrap_or_default();
        out.push(Frame { function, file, line: s.lineno().map_or(0, i64::from) });
    });
    if out.is_empty() {
        out.push(Frame { function: std::format!("{pc:#x}"), ..Frame::default() });
    }
    out
}

/// The hosted stack hook (installed by [`crate::Hosted`] at its first allocation): unwinds with the
/// `backtrace` crate (DWARF CFI, so it needs no frame pointers) into `frames`, innermost first.
pub fn capture_stack(frames: &mut [usize]) -> usize {
    let mut n = 0;
    // SAFETY: `trace_unsynchronized` is `trace` without the crate's global lock, which could be held across a
    // `fork()` by another thread (the child would then hang in its first sample); on Linux the unwinder
    // behind it (libgcc's `_Unwind_Backtrace`) is thread-safe, which is what the lock is for elsewhere.
    unsafe {
        backtrace::trace_unsynchronized(|f| {
            if n < frames.len() && !f.ip().is_null() {
                frames[n] = f.ip() as usize;
                n += 1;
            }
            n < frames.len()
        })
    };
    n
}

impl<S: PageSource, P: CpuProvider> Malloc<S, P> {
    /// The heap profile as pprof's `Profile` message, symbolized in this process.
    pub fn heap_profile_pprof(&self) -> Profile {
        let mut records = Vec::new();
        self.heap_profile(|r| records.push(*r));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
        let exe = std::env::current_exe().ok().map(|p| p.display().to_string());
        let sym: &dyn Fn(u64) -> Vec<Frame> = &symbolize;
        build(
            &records,
            self.profile_rate(),
            &EncodeOptions {
                symbolize: Some(sym),
                mapping_file: exe,
                time_nanos: now,
                comment: Some("goheap heap profile".to_string()),
            },
        )
    }

    /// Writes the heap profile to `path` as a gzipped `profile.proto` (`go tool pprof -top PATH` reads it).
    pub fn write_heap_profile(&self, path: impl AsRef<std::path::Path>) -> std::io::Result<()> {
        std::fs::write(path, to_gzipped_bytes(&self.heap_profile_pprof()))
    }
}
