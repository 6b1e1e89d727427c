//! The kernel's heap profile on the host: `cargo xtask run -- --profile` (or `cargo xtask profile`) finds the
//! dump the demo kernel prints over serial (`kernel-demo/src/profile.rs`: goheap's wire format in base64
//! between markers), resolves its return addresses against the kernel ELF with `addr2line` (binutils; the
//! addresses alone when it is missing), and writes pprof's gzipped `profile.proto` with goheap's encoder
//! (`goheap::hosted::pprof`).

use std::path::{Path, PathBuf};
use std::process::Command;

use goheap::hosted::pprof::{self, EncodeOptions, Frame};
use goheap::malloc::{wire_rate, ProfileRecord};

/// Marker lines of the dump (as `kernel-demo/src/profile.rs` prints them).
pub const BEGIN: &str = "-----BEGIN GOHEAP HEAP PROFILE-----";
pub const END: &str = "-----END GOHEAP HEAP PROFILE-----";

/// A dump found in serial output: the kernel's load offset, the sampling rate and the records.
#[derive(Debug)]
pub struct Dump {
    pub image_offset: u64,
    pub rate: usize,
    pub records: Vec<ProfileRecord>,
}

/// Decodes standard base64 (with or without padding); `None` on a character outside the alphabet.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' | b' ' => continue,
            _ => return None,
        };
        acc = acc << 6 | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// Finds and decodes the dump in `serial` (the last one, if several).
pub fn parse_dump(serial: &str) -> Result<Dump, String> {
    let start = serial.rfind(BEGIN).ok_or("no heap profile in the kernel's output (no begin marker)")?;
    let rest = &serial[start + BEGIN.len()..];
    let (first, body) = rest.split_once('\n').ok_or("truncated heap profile")?;
    let image_offset = first
        .trim()
        .strip_prefix("image_offset=0x")
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .ok_or_else(|| format!("bad begin marker line: {first:?}"))?;
    let end = body.find(END).ok_or("truncated heap profile (no end marker)")?;
    let bytes = base64_decode(&body[..end]).ok_or("the heap profile is not valid base64")?;
    let rate = wire_rate(&bytes).ok_or("the heap profile has no goheap wire header")?;
    let mut records = Vec::new();
    let mut at = 16;
    while at < bytes.len() {
        let (r, n) = ProfileRecord::from_wire(&bytes[at..]).ok_or(format!("bad record at byte {at}"))?;
        records.push(r);
        at += n;
    }
    Ok(Dump { image_offset, rate, records })
}

/// Resolves call-site addresses (already made file-relative) with `addr2line -a -f -C -i`: the frames of
/// each, inlined first. `None` when `addr2line` cannot be run.
fn addr2line(elf: &Path, pcs: &[u64]) -> Option<std::collections::HashMap<u64, Vec<Frame>>> {
    let out = Command::new("addr2line")
        .args(["-a", "-f", "-C", "-i", "-e"])
        .arg(elf)
        .args(pcs.iter().map(|pc| format!("{pc:#x}")))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut map = std::collections::HashMap::new();
    let mut lines = text.lines().peekable();
    while let Some(addr) = lines.next() {
        let Some(pc) = addr.strip_prefix("0x").and_then(|h| u64::from_str_radix(h, 16).ok()) else { continue };
        let mut frames = Vec::new();
        while let Some(l) = lines.peek() {
            if l.starts_with("0x") {
                break;
            }
            let function = lines.next().unwrap_or_default().to_string();
            let loc = lines.next().unwrap_or_default();
            let (file, line) = loc.rsplit_once(':').unwrap_or((loc, "0"));
            let line = line.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
            frames.push(Frame { function, file: if file == "??" { String::new() } else { file.into() }, line });
        }
        map.insert(pc, frames);
    }
    Some(map)
}

/// The pprof file of `dump`, symbolized against `elf` when `addr2line` works.
pub fn to_pprof(dump: &Dump, elf: &Path) -> pprof::Profile {
    let mut pcs: Vec<u64> = dump
        .records
        .iter()
        .flat_map(|r| r.stack().iter().map(|&ret| (ret as u64).saturating_sub(1 + dump.image_offset)))
        .collect();
    pcs.sort_unstable();
    pcs.dedup();
    let symbols = addr2line(elf, &pcs);
    if symbols.is_none() {
        crate::say!("addr2line not available: the profile has addresses only (pprof can resolve them with the ELF)");
    }
    let off = dump.image_offset;
    let sym = |pc: u64| -> Vec<Frame> {
        symbols
            .as_ref()
            .and_then(|m| m.get(&pc.wrapping_sub(off)))
            .cloned()
            .filter(|f| !f.is_empty())
            .unwrap_or_else(|| vec![Frame { function: format!("{pc:#x}"), ..Frame::default() }])
    };
    let sym_ref: &dyn Fn(u64) -> Vec<Frame> = &sym;
    pprof::build(
        &dump.records,
        dump.rate,
        &EncodeOptions {
            symbolize: Some(sym_ref),
            mapping_file: Some(elf.display().to_string()),
            time_nanos: 0,
            comment: Some("goheap demo kernel heap profile (cargo xtask profile)".into()),
        },
    )
}

/// Writes the profile found in `serial` to `out`; prints `go tool pprof -top` of it when Go is installed.
pub fn save(serial: &str, elf: &Path, out: &Path) -> Result<(), String> {
    let dump = parse_dump(serial)?;
    let prof = to_pprof(&dump, elf);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(out, pprof::to_gzipped_bytes(&prof)).map_err(|e| format!("{}: {e}", out.display()))?;
    crate::say!(
        "wrote the kernel's heap profile ({} buckets, rate {}) to {}; view it with: go tool pprof -top {}",
        dump.records.len(),
        dump.rate,
        out.display(),
        out.display()
    );
    if let Ok(o) = Command::new("go").args(["tool", "pprof", "-top", "-sample_index=alloc_space"]).arg(out).output() {
        if o.status.success() {
            print!("{}", String::from_utf8_lossy(&o.stdout));
        }
    }
    Ok(())
}

/// Where `cargo xtask run -- --profile` writes the profile unless `--profile-out FILE` says otherwise.
pub fn default_out() -> PathBuf {
    crate::root().join("target").join("kernel-heap.pb.gz")
}

#[cfg(test)]
mod tests {
    use super::*;
    use goheap::malloc::{wire_header, MAX_STACK_DEPTH, WIRE_RECORD_MAX};

    fn b64(src: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for c in src.chunks(3) {
            let w = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                s.push(if i <= c.len() { A[(w >> (18 - 6 * i)) as usize & 63] as char } else { '=' });
            }
        }
        s
    }

    fn record(size: usize, allocs: u64, frees: u64, stack: &[usize]) -> ProfileRecord {
        let mut st = [0; MAX_STACK_DEPTH];
        st[..stack.len()].copy_from_slice(stack);
        ProfileRecord {
            size,
            allocs,
            alloc_bytes: allocs * size as u64,
            frees,
            free_bytes: frees * size as u64,
            depth: stack.len(),
            stack: st,
        }
    }

    /// A dump as the kernel prints it (57-byte lines, noise around it) decodes to the same records, and the
    /// pprof built from it carries the four heap sample types scaled at the dump's rate.
    #[test]
    fn serial_dump_round_trips_into_pprof() {
        let recs = [record(256, 64, 0, &[0x1000, 0x2000, 0x3000]), record(1000, 500, 500, &[0x1100, 0x2000])];
        let mut bytes = wire_header(16384).to_vec();
        let mut buf = [0u8; WIRE_RECORD_MAX];
        for r in &recs {
            let n = r.to_wire(&mut buf);
            bytes.extend_from_slice(&buf[..n]);
        }
        let mut serial = String::from("boot noise\nheap profile: 2 buckets\n");
        serial.push_str(&format!("{BEGIN} image_offset=0x8000000000\n"));
        for chunk in bytes.chunks(57) {
            serial.push_str(&b64(chunk));
            serial.push('\n');
        }
        serial.push_str(END);
        serial.push_str("\ngoheap demo kernel: profile done\n");
        let d = parse_dump(&serial).unwrap();
        assert_eq!((d.image_offset, d.rate), (0x80_0000_0000, 16384));
        assert_eq!(d.records, recs);
        let p = to_pprof(&d, Path::new("/nonexistent/kernel"));
        assert_eq!(p.sample.len(), 2);
        assert_eq!(p.period, 16384);
        // 64 samples of 256 B at 16 KiB: scale 1/(1-exp(-256/16384)) = 64.5.
        let want = 64.0 / (1.0 - (-256.0f64 / 16384.0).exp());
        assert!((p.sample[0].value[0] as f64 - want).abs() < 1.0, "{:?}", p.sample[0].value);
        assert_eq!(p.sample[1].value[2..], [0, 0], "freed bucket shows in-use objects");
        assert_eq!(p.location.len(), 4, "locations are not shared between stacks");
        assert!(parse_dump("no profile here").is_err());
    }
}
