//! Helpers of the retention (reclaim) tests: reading whole states, and looking at and
//! crafting the on-disk structures a reclaim leaves (journal records of segment 0, header
//! copies, the checkpoint's reclaimed section), laid out as docs/format.md specifies.

use std::os::unix::fs::FileExt;
use std::path::Path;

use rr_row::image::format::{
    encode_record, Checkpoint, Header, Record, HEADER_B_OFFSET, HEADER_SIZE, INCOMPAT_RECLAIM,
    SEG_HEADER_SIZE,
};
use rr_row::image::{Image, ImageError};
use rr_row::units::Seq;

/// Bytes the file occupies on the file system (holes do not count).
pub fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// The whole current disk.
pub fn disk(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(0, &mut buf).unwrap();
    buf
}

/// The whole disk as of `seq` (`state_at` + `read_at`).
pub fn state(img: &Image, seq: u64) -> Result<Vec<u8>, ImageError> {
    let snap = img.state_at(Seq(seq))?;
    let mut buf = vec![0u8; img.size() as usize];
    snap.read_at(0, &mut buf)?;
    Ok(buf)
}

/// One block read by id.
pub fn block(img: &Image, pba: u64) -> Result<Vec<u8>, ImageError> {
    let mut buf = vec![0u8; img.block_size().bytes() as usize];
    img.read_block(rr_row::units::Pba(pba), &mut buf)?;
    Ok(buf)
}

/// A journal record found in the file: where it is and what it says.
#[derive(Debug, Clone, Copy)]
pub struct RawRecord {
    /// Byte offset of the record in the file.
    pub pos: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Kind code (1 write ... 7 relocate, 8 reclaim).
    pub kind: u8,
    /// Its seq field.
    pub seq: u64,
}

impl RawRecord {
    /// Byte offset just past the record.
    pub fn end(&self) -> u64 {
        self.pos + self.len
    }
}

/// The header copy in use (the valid one with the highest generation).
pub fn current_header(file: &[u8]) -> Header {
    let a = Header::decode(&file[..HEADER_SIZE]);
    let b = Header::decode(&file[HEADER_B_OFFSET as usize..HEADER_B_OFFSET as usize + HEADER_SIZE]);
    match (a, b) {
        (Ok(a), Ok(b)) => {
            if b.generation > a.generation {
                b
            } else {
                a
            }
        }
        (Ok(a), Err(_)) => a,
        (Err(_), Ok(b)) => b,
        (Err(a), Err(b)) => panic!("no valid header copy: {a:?} / {b:?}"),
    }
}

/// Writes `hdr` (re-encoded, so with a fresh crc) over both header copies.
pub fn write_headers(path: &Path, hdr: &Header) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let b = hdr.encode();
    f.write_all_at(&b, 0).unwrap();
    f.write_all_at(&b, HEADER_B_OFFSET).unwrap();
    f.sync_all().unwrap();
}

/// Byte offset of journal segment 0 (slot 0 of the data area).
pub fn seg0(file: &[u8]) -> u64 {
    let h = current_header(file);
    h.data_offset + h.first_seg_slot * h.block_size.bytes_u64()
}

/// Every record of journal segment 0, in order (the tests keep their journals that short).
pub fn records(file: &[u8]) -> Vec<RawRecord> {
    let h = current_header(file);
    let start = seg0(file);
    let end = start + h.seg_bytes();
    let mut out = Vec::new();
    let mut pos = start + SEG_HEADER_SIZE;
    while pos + 4 <= end {
        let p = pos as usize;
        let len = u64::from(u32::from_le_bytes(file[p..p + 4].try_into().unwrap()));
        if len == 0 {
            break;
        }
        let kind = file[p + 4];
        let seq = u64::from_le_bytes(file[p + 8..p + 16].try_into().unwrap());
        assert_ne!(kind, 5, "the test's journal left segment 0");
        out.push(RawRecord {
            pos,
            len,
            kind,
            seq,
        });
        pos += len;
    }
    out
}

/// Appends `rec` after the last record of segment 0, chained to it (a valid checksum), and
/// returns where it went.
pub fn append_record(path: &Path, rec: &Record) -> RawRecord {
    let file = std::fs::read(path).unwrap();
    let last = *records(&file).last().expect("the journal has records");
    let end = last.end() as usize;
    let prev = u32::from_le_bytes(file[end - 4..end].try_into().unwrap());
    let (bytes, _) = encode_record(rec, prev);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&bytes, end as u64).unwrap();
    f.sync_all().unwrap();
    RawRecord {
        pos: end as u64,
        len: bytes.len() as u64,
        kind: bytes[4],
        seq: rec.seq,
    }
}

/// Byte offset and length of the current checkpoint.
pub fn checkpoint_at(file: &[u8]) -> (u64, u64) {
    let h = current_header(file);
    let c = h.ckpt.expect("the image has a checkpoint");
    (h.data_offset + c.slot * h.block_size.bytes_u64(), c.len)
}

/// The current checkpoint, decoded (with its reclaimed section when the header has the
/// reclaim feature).
pub fn checkpoint(file: &[u8]) -> Checkpoint {
    let h = current_header(file);
    let (off, len) = checkpoint_at(file);
    Checkpoint::decode(
        &file[off as usize..(off + len) as usize],
        &h.uuid,
        h.incompat & INCOMPAT_RECLAIM != 0,
    )
    .unwrap()
}

/// Sets of slot runs as plain slot lists (for comparisons in the tests).
pub fn slots(runs: &[(u64, u64)]) -> std::collections::BTreeSet<u64> {
    runs.iter().flat_map(|&(s, c)| s..s + c).collect()
}
