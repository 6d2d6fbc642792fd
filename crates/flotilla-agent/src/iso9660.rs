//! A small ISO 9660 writer for cloud-init seeds: one root directory of small files, with Joliet
//! names (so that Linux shows `meta-data`, not `META_DAT.`), built in memory.
//!
//! It replaced running xorriso per VM: a subprocess costs ~100 ms of wall time and a fork of the
//! agent, which a node starting many VMs at once (or a simulated fleet) pays thousands of times.
//!
//! Layout (2048-byte sectors): 0-15 system area; 16 primary volume descriptor; 17 Joliet
//! supplementary descriptor; 18 terminator; 19-22 path tables (little- and big-endian, primary
//! and Joliet); 23 primary root directory; 24 Joliet root directory; then the files' data.
//! Primary names are ISO 9660 level-1 style (`META_DAT.;1`); Joliet carries the real ones.

const SECTOR: usize = 2048;
const FIRST_FILE_SECTOR: usize = 25;

fn both_u32(out: &mut [u8], v: u32) {
    out[..4].copy_from_slice(&v.to_le_bytes());
    out[4..8].copy_from_slice(&v.to_be_bytes());
}

fn both_u16(out: &mut [u8], v: u16) {
    out[..2].copy_from_slice(&v.to_le_bytes());
    out[2..4].copy_from_slice(&v.to_be_bytes());
}

/// A field of `len` bytes: `text` as ASCII (primary) or UCS-2 big-endian (Joliet), space-padded.
fn text_field(text: &str, len: usize, joliet: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    if joliet {
        for unit in text.encode_utf16() {
            out.extend_from_slice(&unit.to_be_bytes());
        }
        while out.len() + 2 <= len {
            out.extend_from_slice(&[0, b' ']);
        }
    } else {
        out.extend_from_slice(text.as_bytes());
    }
    out.resize(len, b' ');
    out.truncate(len);
    out
}

/// The primary (level-1) identifier of a file: upper-case 8.3 with `_` for anything else.
fn primary_name(name: &str) -> String {
    let clean = |s: &str, n: usize| -> String {
        s.chars()
            .map(|c| match c.to_ascii_uppercase() {
                c @ ('A'..='Z' | '0'..='9') => c,
                _ => '_',
            })
            .take(n)
            .collect()
    };
    let (stem, ext) = name.rsplit_once('.').unwrap_or((name, ""));
    format!("{}.{};1", clean(stem, 8), clean(ext, 3))
}

struct Entry {
    id: Vec<u8>,
    sector: usize,
    len: usize,
}

/// One directory record (ECMA-119 9.1).
fn record(id: &[u8], sector: usize, len: usize, dir: bool, date: &[u8; 7]) -> Vec<u8> {
    let mut r = vec![0u8; 33 + id.len() + (id.len() + 1) % 2];
    r[0] = r.len() as u8;
    both_u32(&mut r[2..10], sector as u32);
    both_u32(&mut r[10..18], len as u32);
    r[18..25].copy_from_slice(date);
    r[25] = if dir { 2 } else { 0 };
    both_u16(&mut r[28..32], 1);
    r[32] = id.len() as u8;
    r[33..33 + id.len()].copy_from_slice(id);
    r
}

/// A volume descriptor: primary (type 1) or Joliet supplementary (type 2).
fn descriptor(
    joliet: bool,
    label: &str,
    total: usize,
    path_tables: (usize, usize),
    root_sector: usize,
    dates: (&[u8; 7], &[u8; 17]),
) -> Vec<u8> {
    let mut d = vec![0u8; SECTOR];
    d[0] = if joliet { 2 } else { 1 };
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    d[8..40].copy_from_slice(&text_field("LINUX", 32, joliet));
    d[40..72].copy_from_slice(&text_field(label, 32, joliet));
    both_u32(&mut d[80..88], total as u32);
    if joliet {
        d[88..91].copy_from_slice(b"%/E"); // UCS-2 level 3
    }
    both_u16(&mut d[120..124], 1);
    both_u16(&mut d[124..128], 1);
    both_u16(&mut d[128..132], SECTOR as u16);
    both_u32(&mut d[132..140], 10);
    d[140..144].copy_from_slice(&(path_tables.0 as u32).to_le_bytes());
    d[148..152].copy_from_slice(&(path_tables.1 as u32).to_be_bytes());
    d[156..190].copy_from_slice(&record(&[0], root_sector, SECTOR, true, dates.0));
    for (at, len) in [
        (190, 128),
        (318, 128),
        (446, 128),
        (574, 128),
        (702, 37),
        (739, 37),
        (776, 37),
    ] {
        d[at..at + len].copy_from_slice(&text_field("", len, joliet));
    }
    d[574..574 + 128].copy_from_slice(&text_field("FLOTILLA", 128, joliet));
    d[813..830].copy_from_slice(dates.1);
    d[830..847].copy_from_slice(dates.1);
    d[847..863].copy_from_slice(b"0000000000000000");
    d[864..880].copy_from_slice(b"0000000000000000");
    d[881] = 1;
    d
}

/// A path table with the root directory only (ECMA-119 9.4).
fn path_table(root_sector: usize, big_endian: bool) -> Vec<u8> {
    let mut t = vec![0u8; SECTOR];
    t[0] = 1;
    let (sector, parent) = if big_endian {
        ((root_sector as u32).to_be_bytes(), 1u16.to_be_bytes())
    } else {
        ((root_sector as u32).to_le_bytes(), 1u16.to_le_bytes())
    };
    t[2..6].copy_from_slice(&sector);
    t[6..8].copy_from_slice(&parent);
    t
}

fn directory(entries: &[Entry], root_sector: usize, date: &[u8; 7]) -> Vec<u8> {
    let mut d = record(&[0], root_sector, SECTOR, true, date);
    d.extend(record(&[1], root_sector, SECTOR, true, date));
    for e in entries {
        d.extend(record(&e.id, e.sector, e.len, false, date));
    }
    assert!(
        d.len() <= SECTOR,
        "a seed's root directory fits in one sector"
    );
    d.resize(SECTOR, 0);
    d
}

/// An ISO image labelled `label` holding `files` (name, content) in its root directory.
/// Names are short ASCII (as cloud-init's are); the directory must fit in one sector.
pub fn image(label: &str, files: &[(&str, &[u8])], now: chrono::DateTime<chrono::Utc>) -> Vec<u8> {
    use chrono::{Datelike, Timelike};
    let short: [u8; 7] = [
        (now.year() - 1900) as u8,
        now.month() as u8,
        now.day() as u8,
        now.hour() as u8,
        now.minute() as u8,
        now.second() as u8,
        0,
    ];
    let mut long = [0u8; 17];
    long[..16].copy_from_slice(now.format("%Y%m%d%H%M%S00").to_string().as_bytes());

    // Files in name order (the order both directories must list them in), one after another.
    let mut sorted: Vec<&(&str, &[u8])> = files.iter().collect();
    sorted.sort_by_key(|(name, _)| *name);
    let mut sector = FIRST_FILE_SECTOR;
    let mut placed = Vec::new();
    for (name, data) in &sorted {
        placed.push((*name, sector, data.len()));
        sector += data.len().div_ceil(SECTOR).max(1);
    }
    let total = sector;
    let entries = |joliet: bool| -> Vec<Entry> {
        let mut es: Vec<Entry> = placed
            .iter()
            .map(|(name, sector, len)| Entry {
                id: if joliet {
                    name.encode_utf16().flat_map(u16::to_be_bytes).collect()
                } else {
                    primary_name(name).into_bytes()
                },
                sector: *sector,
                len: *len,
            })
            .collect();
        es.sort_by(|a, b| a.id.cmp(&b.id));
        es
    };

    let mut out = vec![0u8; 16 * SECTOR];
    out.extend(descriptor(
        false,
        label,
        total,
        (19, 20),
        23,
        (&short, &long),
    ));
    out.extend(descriptor(
        true,
        label,
        total,
        (21, 22),
        24,
        (&short, &long),
    ));
    let mut terminator = vec![0u8; SECTOR];
    terminator[0] = 255;
    terminator[1..6].copy_from_slice(b"CD001");
    terminator[6] = 1;
    out.extend(terminator);
    out.extend(path_table(23, false));
    out.extend(path_table(23, true));
    out.extend(path_table(24, false));
    out.extend(path_table(24, true));
    out.extend(directory(&entries(false), 23, &short));
    out.extend(directory(&entries(true), 24, &short));
    for (_, data) in &sorted {
        out.extend_from_slice(data);
        let padded = data.len().div_ceil(SECTOR).max(1) * SECTOR;
        out.resize(out.len() + padded - data.len(), 0);
    }
    debug_assert_eq!(out.len(), total * SECTOR);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_names_are_level_one() {
        assert_eq!(primary_name("meta-data"), "META_DAT.;1");
        assert_eq!(primary_name("network-config"), "NETWORK_.;1");
        assert_eq!(primary_name("a.txt"), "A.TXT;1");
    }

    /// xorriso (a real ISO 9660 reader) lists the Joliet names and extracts the same bytes.
    #[test]
    fn xorriso_reads_back_names_label_and_contents() {
        let big = "x".repeat(5000);
        let files: [(&str, &[u8]); 3] = [
            ("user-data", big.as_bytes()),
            ("meta-data", b"instance-id: a\n"),
            ("network-config", b""),
        ];
        let dir = tempfile::tempdir().unwrap();
        let iso = dir.path().join("seed.iso");
        std::fs::write(&iso, image("cidata", &files, chrono::Utc::now())).unwrap();
        let out = dir.path().join("out");
        let status = std::process::Command::new("xorriso")
            .args(["-osirrox", "on", "-indev"])
            .arg(&iso)
            .args(["-extract", "/"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        let report = String::from_utf8_lossy(&status.stderr).to_string();
        assert!(report.contains("Volume id    : 'cidata'"), "{report}");
        for (name, content) in files {
            assert_eq!(std::fs::read(out.join(name)).unwrap(), content, "{name}");
        }
    }
}
