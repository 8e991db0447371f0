//! [`LogReader`]: iterates over a log's records; [`ReplayIndex`]: the records per queue.
//!
//! A crash of the recorder can leave an incomplete last frame, or a last frame whose bytes did
//! not all reach the disk. The reader stops cleanly there and reports the bytes it dropped
//! ([`TornTail`]). Damage that a crash cannot explain - a checksum mismatch with more data
//! after the frame, a valid frame holding an undecodable record, a bad header - is a typed
//! [`RecordError`].
//!
//! One thing cannot be told apart: a damaged length field that points past the end of the file
//! looks exactly like an incomplete last frame, and is reported as a torn tail (with the number
//! of bytes dropped, so a large number stands out).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use super::format::{
    frame_crc_ok, Codec, IndexKeying, LogHeader, Record, FRAME_HEADER_LEN, HEADER_LEN,
    MAX_FRAME_PAYLOAD,
};
use super::RecordError;

/// Where a log's readable prefix ends, when bytes after it were dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornTail {
    /// File offset of the first dropped byte (the start of the torn frame).
    pub offset: u64,
    /// Number of bytes dropped.
    pub dropped_bytes: u64,
}

/// Reads a log's records in file order.
pub struct LogReader<R> {
    src: R,
    header: LogHeader,
    file_len: u64,
    /// File offset of the next frame.
    pos: u64,
    payload: Vec<u8>,
    payload_pos: usize,
    frame_offset: u64,
    codec: Codec,
    done: bool,
    tail: Option<TornTail>,
    frames: u64,
}

impl LogReader<BufReader<File>> {
    /// Opens the log at `path` and validates its header.
    pub fn open(path: &Path) -> Result<Self, RecordError> {
        let f = File::open(path)?;
        let len = f.metadata()?.len();
        LogReader::new(BufReader::with_capacity(256 * 1024, f), len)
    }
}

impl<R: Read> LogReader<R> {
    /// Reads and validates the header from `src`, a log of `file_len` bytes.
    pub fn new(mut src: R, file_len: u64) -> Result<Self, RecordError> {
        let n = usize::try_from(file_len.min(HEADER_LEN as u64)).unwrap_or(HEADER_LEN);
        let mut h = vec![0u8; n];
        src.read_exact(&mut h)?;
        let header = LogHeader::decode(&h)?;
        Ok(Self {
            src,
            codec: Codec::new(header.block_size),
            header,
            file_len,
            pos: HEADER_LEN as u64,
            payload: Vec::new(),
            payload_pos: 0,
            frame_offset: 0,
            done: false,
            tail: None,
            frames: 0,
        })
    }

    /// The log's header.
    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// The torn tail found at the end, once iteration has reached it.
    pub fn torn_tail(&self) -> Option<TornTail> {
        self.tail
    }

    /// Valid frames read so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// File offset of the frame the last record came from.
    pub fn frame_offset(&self) -> u64 {
        self.frame_offset
    }

    /// The next record, or `None` at the end of the readable prefix.
    pub fn next_record(&mut self) -> Result<Option<Record>, RecordError> {
        Ok(self.next_record_sized()?.map(|(r, _)| r))
    }

    /// The next record and the number of payload bytes its encoding took.
    pub fn next_record_sized(&mut self) -> Result<Option<(Record, usize)>, RecordError> {
        while self.payload_pos >= self.payload.len() {
            if self.done || !self.next_frame()? {
                self.done = true;
                return Ok(None);
            }
        }
        let start = self.payload_pos;
        let rec = self
            .codec
            .decode(&self.payload, &mut self.payload_pos)
            .map_err(|reason| {
                self.done = true;
                RecordError::BadRecord {
                    offset: self.frame_offset,
                    reason,
                }
            })?;
        Ok(Some((rec, self.payload_pos - start)))
    }

    /// Loads the next frame; false at the end of the readable prefix.
    fn next_frame(&mut self) -> Result<bool, RecordError> {
        let remaining = self.file_len.saturating_sub(self.pos);
        if remaining == 0 {
            return Ok(false);
        }
        let offset = self.pos;
        if remaining < FRAME_HEADER_LEN as u64 {
            self.torn(offset, remaining);
            return Ok(false);
        }
        let mut fh = [0u8; FRAME_HEADER_LEN];
        self.src.read_exact(&mut fh)?;
        let len_bytes = [fh[0], fh[1], fh[2], fh[3]];
        let len = u32::from_le_bytes(len_bytes);
        let crc = u32::from_le_bytes([fh[4], fh[5], fh[6], fh[7]]);
        let after_header = remaining - FRAME_HEADER_LEN as u64;
        if len > MAX_FRAME_PAYLOAD || u64::from(len) > after_header {
            // The frame runs past the end of the file: the recorder died while writing it.
            self.torn(offset, remaining);
            return Ok(false);
        }
        // `len` is bounded by the file's size here, so this allocation is too.
        self.payload.clear();
        self.payload.resize(len as usize, 0);
        self.src.read_exact(&mut self.payload)?;
        let frame_end = offset + FRAME_HEADER_LEN as u64 + u64::from(len);
        if !frame_crc_ok(len_bytes, crc, &self.payload) {
            let tail_zero = fh.iter().all(|&b| b == 0) && self.payload.iter().all(|&b| b == 0);
            if frame_end == self.file_len || (tail_zero && self.rest_is_zero()?) {
                // Last frame, partly written; or a file extended with zeros by a crash.
                self.torn(offset, remaining);
                return Ok(false);
            }
            return Err(RecordError::CorruptFrame {
                offset,
                reason: format!(
                    "checksum mismatch, and {} more bytes follow it",
                    self.file_len - frame_end
                ),
            });
        }
        self.pos = frame_end;
        self.frame_offset = offset;
        self.payload_pos = 0;
        self.codec.reset();
        self.frames += 1;
        Ok(true)
    }

    fn rest_is_zero(&mut self) -> Result<bool, RecordError> {
        let mut buf = [0u8; 8192];
        loop {
            let n = self.src.read(&mut buf)?;
            if n == 0 {
                return Ok(true);
            }
            if buf.get(..n).is_some_and(|b| b.iter().any(|&x| x != 0)) {
                return Ok(false);
            }
        }
    }

    fn torn(&mut self, offset: u64, dropped: u64) {
        log::warn!("record log: torn tail at byte {offset}, {dropped} bytes dropped");
        self.tail = Some(TornTail {
            offset,
            dropped_bytes: dropped,
        });
        self.pos = self.file_len;
    }
}

impl<R: Read> Iterator for LogReader<R> {
    type Item = Result<Record, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_record() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => None,
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Turns the per-queue request index into a unique key, the same way for the recorded stream
/// of calls (in log order) and the replayed one (in call order).
///
/// The virtio layer may call the device more than once for one request (a discard with several
/// ranges, a write followed by the flush of a write-through cache), all with the same index:
/// those calls get sub-numbers 0, 1, ... A device call is identified by
/// `(queue, epoch, index, sub)`.
///
/// With [`IndexKeying::Continuous`] (what the recorder writes) indices never repeat within a
/// log, the epoch is always 0, and sub-numbers are counted per index, so the calls of
/// different requests may interleave (requests of one queue run in parallel). With
/// [`IndexKeying::PerConnection`] (the first logs) the index restarts at 0 when a frontend
/// reconnects: a smaller index than the previous one starts a new epoch, and `sub` counts
/// calls in a row with the same index.
#[derive(Debug, Clone, Default)]
pub struct QueueEpoch {
    keying: IndexKeying,
    last: Option<u64>,
    epoch: u32,
    sub: u32,
    /// Continuous keying: calls seen so far per recent index.
    subs: HashMap<u64, u32>,
    max_index: u64,
}

/// The key of one device call within its queue: `(epoch, index, sub)`.
pub type CallKey = (u32, u64, u32);

/// Indices further than this below the highest one seen can no longer get calls: the requests
/// in flight on a queue are at most a queue's size (32768) apart.
const SUB_WINDOW: u64 = 1 << 16;

impl QueueEpoch {
    /// Keys calls numbered as `keying` says.
    pub fn new(keying: IndexKeying) -> Self {
        QueueEpoch {
            keying,
            ..QueueEpoch::default()
        }
    }

    /// The key of the next call with this index, given the calls seen before on this queue.
    pub fn key(&mut self, index: u64) -> CallKey {
        if self.keying == IndexKeying::Continuous {
            let sub = match self.subs.get_mut(&index) {
                Some(s) => {
                    *s = s.saturating_add(1);
                    *s
                }
                None => {
                    self.subs.insert(index, 0);
                    0
                }
            };
            self.max_index = self.max_index.max(index);
            if self.subs.len() as u64 > 2 * SUB_WINDOW {
                let floor = self.max_index.saturating_sub(SUB_WINDOW);
                self.subs.retain(|&i, _| i >= floor);
            }
            return (0, index, sub);
        }
        match self.last {
            Some(l) if index == l => self.sub = self.sub.saturating_add(1),
            Some(l) if index < l => {
                self.epoch = self.epoch.saturating_add(1);
                self.sub = 0;
            }
            _ => self.sub = 0,
        }
        self.last = Some(index);
        (self.epoch, index, self.sub)
    }
}

/// The records of one queue, each encoded on its own, sorted by key (log order for
/// per-connection logs; index order otherwise).
#[derive(Debug, Default)]
struct QueueRecords {
    keys: Vec<CallKey>,
    offsets: Vec<usize>,
    bytes: Vec<u8>,
    epochs: QueueEpoch,
}

impl QueueRecords {
    /// Sorts the records by key; records with equal keys stay in log order.
    fn sort(&mut self) {
        let mut both: Vec<(CallKey, usize)> = self
            .keys
            .iter()
            .copied()
            .zip(self.offsets.iter().copied())
            .collect();
        // Offsets grow in log order, so sorting by (key, offset) is a stable sort by key.
        both.sort_unstable();
        (self.keys, self.offsets) = both.into_iter().unzip();
    }

    /// Continuous indices: puts the records in index order and numbers the calls of each
    /// index 0, 1, ... in log order. Unlike [`QueueEpoch`], this needs no bound on how far
    /// apart in the log the calls of one request are (with per-thread streams they can be a
    /// whole frame of another thread apart, any number of requests).
    fn number_calls(&mut self) {
        if self.keys.windows(2).any(|w| w.first() > w.last()) {
            self.sort();
        }
        let mut prev: Option<(u64, u32)> = None;
        for k in &mut self.keys {
            let sub = match prev {
                Some((i, s)) if i == k.1 => s.saturating_add(1),
                _ => 0,
            };
            k.2 = sub;
            prev = Some((k.1, sub));
        }
    }
}

/// A log's records grouped per queue in index order, for replay. Records are kept encoded
/// (a few bytes each in block-id mode) and decoded on lookup.
pub struct ReplayIndex {
    header: LogHeader,
    queues: Vec<QueueRecords>,
    records: u64,
    tail: Option<TornTail>,
}

impl ReplayIndex {
    /// Reads every record of `reader`. Fails on any error but a torn tail.
    pub fn build<R: Read>(mut reader: LogReader<R>) -> Result<Self, RecordError> {
        let header = *reader.header();
        let mut queues: Vec<QueueRecords> = Vec::new();
        let mut codec = Codec::new(header.block_size);
        let mut records = 0u64;
        while let Some(r) = reader.next_record()? {
            let q = usize::from(r.queue);
            if queues.len() <= q {
                queues.resize_with(q + 1, || QueueRecords {
                    epochs: QueueEpoch::new(header.indices),
                    ..QueueRecords::default()
                });
            }
            let Some(qr) = queues.get_mut(q) else {
                continue;
            };
            // Continuous keys get their sub-numbers below, once every record is in.
            let key = match header.indices {
                IndexKeying::Continuous => (0, r.index, 0),
                IndexKeying::PerConnection => qr.epochs.key(r.index),
            };
            qr.keys.push(key);
            qr.offsets.push(qr.bytes.len());
            codec.reset();
            codec.encode(&r, &mut qr.bytes)?;
            records += 1;
        }
        for q in &mut queues {
            if header.indices == IndexKeying::Continuous {
                q.number_calls();
            } else if q.keys.windows(2).any(|w| w.first() > w.last()) {
                // Per-connection logs are in key order already, but for a damaged log (a stable
                // sort keeps its repeated keys in log order).
                q.sort();
            }
        }
        Ok(Self {
            header,
            queues,
            records,
            tail: reader.torn_tail(),
        })
    }

    /// Opens and indexes the log at `path`.
    pub fn open(path: &Path) -> Result<Self, RecordError> {
        Self::build(LogReader::open(path)?)
    }

    /// The log's header.
    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// Total number of records.
    pub fn len(&self) -> u64 {
        self.records
    }

    /// True when the log holds no record.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// The torn tail dropped when the log was read, if any.
    pub fn torn_tail(&self) -> Option<TornTail> {
        self.tail
    }

    /// Number of queues that have records (the highest queue index + 1).
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Number of records of `queue`.
    pub fn queue_len(&self, queue: u16) -> usize {
        self.queues
            .get(usize::from(queue))
            .map_or(0, |q| q.keys.len())
    }

    /// The record of the device call `key` on `queue`, and its position in the queue.
    pub fn get(&self, queue: u16, key: CallKey) -> Option<(usize, Record)> {
        let q = self.queues.get(usize::from(queue))?;
        let pos = q.keys.binary_search(&key).ok()?;
        Some((pos, self.decode_at(q, pos)?))
    }

    /// The key of the `pos`-th record of `queue`.
    pub fn key_at(&self, queue: u16, pos: usize) -> Option<CallKey> {
        self.queues.get(usize::from(queue))?.keys.get(pos).copied()
    }

    /// The `pos`-th record of `queue`.
    pub fn nth(&self, queue: u16, pos: usize) -> Option<Record> {
        let q = self.queues.get(usize::from(queue))?;
        self.decode_at(q, pos)
    }

    fn decode_at(&self, q: &QueueRecords, pos: usize) -> Option<Record> {
        let mut at = *q.offsets.get(pos)?;
        // Re-decoding bytes this index encoded itself cannot fail.
        Codec::new(self.header.block_size)
            .decode(&q.bytes, &mut at)
            .ok()
    }

    /// Calls `f` with every record, queue by queue.
    pub fn for_each(&self, mut f: impl FnMut(&Record)) {
        for q in &self.queues {
            for pos in 0..q.keys.len() {
                if let Some(r) = self.decode_at(q, pos) {
                    f(&r);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(keying: IndexKeying, calls: &[u64]) -> Vec<CallKey> {
        let mut e = QueueEpoch::new(keying);
        calls.iter().map(|&i| e.key(i)).collect()
    }

    #[test]
    fn continuous_keys_count_calls_per_index_whatever_the_order() {
        // Request 5 makes two calls, interleaved with requests 6 and 4 running in parallel.
        assert_eq!(
            keys(IndexKeying::Continuous, &[5, 6, 5, 4, 7, 6]),
            vec![
                (0, 5, 0),
                (0, 6, 0),
                (0, 5, 1),
                (0, 4, 0),
                (0, 7, 0),
                (0, 6, 1)
            ]
        );
    }

    #[test]
    fn per_connection_keys_start_an_epoch_when_the_index_goes_back() {
        assert_eq!(
            keys(IndexKeying::PerConnection, &[0, 1, 1, 2, 0, 0, 1]),
            vec![
                (0, 0, 0),
                (0, 1, 0),
                (0, 1, 1),
                (0, 2, 0),
                (1, 0, 0),
                (1, 0, 1),
                (1, 1, 0)
            ]
        );
    }

    #[test]
    fn continuous_keys_forget_indices_far_behind_and_stay_bounded() {
        let mut e = QueueEpoch::new(IndexKeying::Continuous);
        for i in 0..(5 * SUB_WINDOW) {
            assert_eq!(e.key(i), (0, i, 0));
        }
        assert!(e.subs.len() as u64 <= 2 * SUB_WINDOW + 1);
        // A second call of a recent index is still numbered 1.
        assert_eq!(e.key(5 * SUB_WINDOW - 3), (0, 5 * SUB_WINDOW - 3, 1));
    }
}
