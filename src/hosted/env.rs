//! Knobs from the environment: `GOMEMLIMIT` and the `GODEBUG` keys that apply to goheap (spec sections 6
//! and 7), parsed without allocating.
//!
//! See `lib.rs` for an overview of the allocator and `hosted.rs` for when they are read (at the hosted
//! allocator's first allocation) and how each is applied.
//!
//! - `GOMEMLIMIT`: Go's `parseByteCount` grammar, `^[0-9]+(([KMGT]i)?B)?$`, at most `2^63 - 1` bytes (Go's
//!   `math.MaxInt64`), or `off`. Anything else is malformed (Go throws; goheap reports it and ignores it).
//! - `GODEBUG`: a comma-separated list of `key=value`; later settings of a key override earlier ones, keys
//!   goheap does not know are ignored (as Go does), values are integers (Go's `atoi`: an optional `-` and
//!   digits, within `i32`); a bad value of a known key is reported and that setting ignored.

/// Go's `math.MaxInt64`: the largest byte count `GOMEMLIMIT` accepts.
pub const MAX_BYTE_COUNT: u64 = i64::MAX as u64;

/// Parses a byte count as Go's `parseByteCount` does: decimal digits, then optionally `B`, `KiB`, `MiB`,
/// `GiB` or `TiB`; at most [`MAX_BYTE_COUNT`]. `None` when malformed or too large.
pub fn parse_byte_count(s: &[u8]) -> Option<u64> {
    let (digits, shift) = if let Some(d) = s.strip_suffix(b"iB") {
        let (unit, d) = d.split_last()?;
        let shift = match unit {
            b'K' => 10,
            b'M' => 20,
            b'G' => 30,
            b'T' => 40,
            _ => return None,
        };
        (d, shift)
    } else if let Some(d) = s.strip_suffix(b"B") {
        (d, 0)
    } else {
        (s, 0)
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: u64 = 0;
    for &c in digits {
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    let n = n.checked_mul(1 << shift)?;
    (n <= MAX_BYTE_COUNT).then_some(n)
}

/// The memory limit `GOMEMLIMIT` asks for, in bytes: `usize::MAX` (none) for `off`; `None` when malformed
/// (the caller reports it and leaves the limit alone). A count beyond the address space is no limit.
pub fn parse_memory_limit(s: &[u8]) -> Option<usize> {
    if s == b"off" {
        return Some(usize::MAX);
    }
    parse_byte_count(s).map(|n| usize::try_from(n).unwrap_or(usize::MAX))
}

/// Go's `atoi` for `GODEBUG` values: an optional `-` and decimal digits, within `i32`.
pub fn parse_int(s: &[u8]) -> Option<i32> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: i64 = 0;
    for &c in digits {
        n = n * 10 + i64::from(c - b'0');
        if n > i64::from(i32::MAX) + 1 {
            return None;
        }
    }
    i32::try_from(if neg { -n } else { n }).ok()
}

/// The `GODEBUG` settings goheap applies; `None`: not set (or only with bad values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Godebug {
    /// `efence`: every object on pages of its own, ending at a guard page.
    pub efence: Option<bool>,
    /// `scavtrace`: one line per scavenger cycle in Go's format.
    pub scavtrace: Option<bool>,
    /// `madvdontneed`: `MADV_DONTNEED` (1, the default) or `MADV_FREE` (0) to release memory.
    pub madvdontneed: Option<bool>,
    /// `harddecommit`: released memory is also made inaccessible.
    pub harddecommit: Option<bool>,
    /// `memprofilerate`: the heap-profile sampling rate (`-1`, Go's "unset", leaves it alone).
    pub memprofilerate: Option<usize>,
    /// `clobberfree`: freed objects are filled with a pattern (always on with feature `checks`).
    pub clobberfree: Option<bool>,
}

/// A `GODEBUG` setting of a known key whose value is not valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadSetting<'a> {
    /// The key.
    pub key: &'a [u8],
    /// The value given.
    pub value: &'a [u8],
}

/// Parses `GODEBUG`: known keys into a [`Godebug`], `bad` called for each known key with a bad value
/// (unknown keys and entries without `=` are ignored, as Go ignores them).
pub fn parse_godebug<'a>(s: &'a [u8], mut bad: impl FnMut(BadSetting<'a>)) -> Godebug {
    let mut g = Godebug::default();
    for entry in s.split(|&c| c == b',') {
        let Some(eq) = entry.iter().position(|&c| c == b'=') else { continue };
        let (key, value) = (&entry[..eq], &entry[eq + 1..]);
        let flag = match key {
            b"efence" => &mut g.efence,
            b"scavtrace" => &mut g.scavtrace,
            b"madvdontneed" => &mut g.madvdontneed,
            b"harddecommit" => &mut g.harddecommit,
            b"clobberfree" => &mut g.clobberfree,
            b"memprofilerate" => {
                match parse_int(value) {
                    Some(-1) => {}
                    Some(n) if n >= 0 => g.memprofilerate = Some(n as usize),
                    _ => bad(BadSetting { key, value }),
                }
                continue;
            }
            _ => continue,
        };
        match parse_int(value) {
            Some(n) => *flag = Some(n != 0),
            None => bad(BadSetting { key, value }),
        }
    }
    g
}

/// The value of environment variable `name`, read in place with `getenv` (no allocation). `None` when unset.
///
/// The bytes stay valid while nothing modifies the environment; goheap reads them once at its first
/// allocation and copies nothing out (the caller parses them at once).
pub(crate) fn getenv(name: &core::ffi::CStr) -> Option<&'static [u8]> {
    // SAFETY: `name` is NUL-terminated; `getenv` neither allocates nor keeps the pointer.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: a non-null result points to a NUL-terminated string in the environment block, which outlives
    // the caller's use of it (the caller parses it at once, before anything could call `setenv`).
    Some(unsafe { core::ffi::CStr::from_ptr(p) }.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn byte_counts_follow_go_grammar() {
        assert_eq!(parse_byte_count(b"0"), Some(0));
        assert_eq!(parse_byte_count(b"12345"), Some(12345));
        assert_eq!(parse_byte_count(b"100B"), Some(100));
        assert_eq!(parse_byte_count(b"1KiB"), Some(1 << 10));
        assert_eq!(parse_byte_count(b"512MiB"), Some(512 << 20));
        assert_eq!(parse_byte_count(b"2GiB"), Some(2 << 30));
        assert_eq!(parse_byte_count(b"3TiB"), Some(3 << 40));
        assert_eq!(parse_byte_count(b"007KiB"), Some(7 << 10));
        for bad in [
            &b""[..],
            b"B",
            b"KiB",
            b"iB",
            b"1iB",
            b"1KB",
            b"1MB",
            b"1k",
            b"1KIB",
            b"1PiB",
            b"1 MiB",
            b" 1",
            b"-1",
            b"+1",
            b"1.5GiB",
            b"0x10",
            b"1b",
            b"off ",
        ] {
            assert_eq!(parse_byte_count(bad), None, "{:?}", core::str::from_utf8(bad));
        }
    }

    #[test]
    fn byte_counts_overflow_to_malformed() {
        assert_eq!(parse_byte_count(b"9223372036854775807"), Some(i64::MAX as u64));
        assert_eq!(parse_byte_count(b"9223372036854775807B"), Some(i64::MAX as u64));
        assert_eq!(parse_byte_count(b"9223372036854775808"), None, "above MaxInt64");
        assert_eq!(parse_byte_count(b"18446744073709551616"), None, "above u64");
        assert_eq!(parse_byte_count(b"99999999999999999999999999"), None);
        assert_eq!(parse_byte_count(b"8388607TiB"), Some(8388607 << 40));
        assert_eq!(parse_byte_count(b"8388608TiB"), None, "2^63 bytes");
        assert_eq!(parse_byte_count(b"17179869184GiB"), None, "2^64 bytes: the multiplication overflows");
    }

    #[test]
    fn memory_limit_off_and_values() {
        assert_eq!(parse_memory_limit(b"off"), Some(usize::MAX));
        assert_eq!(parse_memory_limit(b"512MiB"), Some(512 << 20));
        assert_eq!(parse_memory_limit(b"OFF"), None);
        assert_eq!(parse_memory_limit(b"none"), None);
        assert_eq!(parse_memory_limit(b""), None);
    }

    #[test]
    fn ints_are_gos_atoi() {
        assert_eq!(parse_int(b"0"), Some(0));
        assert_eq!(parse_int(b"1"), Some(1));
        assert_eq!(parse_int(b"-1"), Some(-1));
        assert_eq!(parse_int(b"2147483647"), Some(i32::MAX));
        assert_eq!(parse_int(b"-2147483648"), Some(i32::MIN));
        assert_eq!(parse_int(b"2147483648"), None);
        assert_eq!(parse_int(b"99999999999999999999"), None);
        for bad in [&b""[..], b"-", b"+1", b"1x", b"true", b" 1"] {
            assert_eq!(parse_int(bad), None);
        }
    }

    #[test]
    fn godebug_comma_list() {
        let mut bads = Vec::new();
        let g =
            parse_godebug(b"gctrace=1,efence=1,scavtrace=2,madvdontneed=0,harddecommit=1,memprofilerate=4096", |b| {
                bads.push(b)
            });
        assert_eq!(
            g,
            Godebug {
                efence: Some(true),
                scavtrace: Some(true),
                madvdontneed: Some(false),
                harddecommit: Some(true),
                memprofilerate: Some(4096),
                clobberfree: None
            }
        );
        assert!(bads.is_empty());
        // The last setting of a key wins; 0 turns a knob off.
        let g = parse_godebug(b"efence=1,efence=0,memprofilerate=1,memprofilerate=0", |_| panic!("no bad value"));
        assert_eq!((g.efence, g.memprofilerate), (Some(false), Some(0)));
        // -1 is Go's "unset" for memprofilerate.
        assert_eq!(parse_godebug(b"memprofilerate=-1", |_| panic!()).memprofilerate, None);
        assert_eq!(parse_godebug(b"", |_| panic!()), Godebug::default());
    }

    #[test]
    fn godebug_unknown_keys_ignored_bad_values_reported() {
        let mut bads = Vec::new();
        let g = parse_godebug(
            b"nosuchkey=zzz,,efence,=1,http2debug=2,clobberfree=yes,scavtrace=1,memprofilerate=-5,harddecommit=",
            |b| bads.push(b),
        );
        assert_eq!(g, Godebug { scavtrace: Some(true), ..Godebug::default() });
        assert_eq!(
            bads,
            [
                BadSetting { key: b"clobberfree", value: b"yes" },
                BadSetting { key: b"memprofilerate", value: b"-5" },
                BadSetting { key: b"harddecommit", value: b"" },
            ]
        );
    }
}
