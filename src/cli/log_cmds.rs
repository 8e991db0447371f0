//! `rr-row log info|dump`: record log inspection.
//!
//! `info` summarises a log: its header, records and bytes per kind, and what the same run
//! would have cost in `full` mode (every read's data in the log, what a recorder needs over a
//! Raw or QCow2 disk), computed by re-encoding each record the way a full-mode recorder would
//! and framing it the same way. `dump` prints one line per record.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::{json, Value};

use crate::record::format::{Codec, LogHeader, Record, FRAME_HEADER_LEN, HEADER_LEN};
use crate::record::writer::FRAME_TARGET;
use crate::record::{LogExtent, LogReader, ReadBody, RecordBody, RecordMode, TornTail};

use super::{CliError, CliResult, OutputFormat};

/// Per-kind totals.
#[derive(Debug, Default, Clone, Copy)]
struct KindStats {
    count: u64,
    /// Encoded record bytes in the log.
    log_bytes: u64,
    /// Sum of the requests' lengths.
    data_bytes: u64,
    /// Records whose status is not OK.
    failed: u64,
}

/// Simulates the framing of a full-mode recorder over the same records.
struct FullModeSim {
    codec: Codec,
    scratch: Vec<u8>,
    payload: u64,
    frames: u64,
    records_bytes: u64,
}

impl FullModeSim {
    fn new(header: &LogHeader) -> Self {
        Self {
            codec: Codec::new(header.block_size),
            scratch: Vec::new(),
            payload: 0,
            frames: 0,
            records_bytes: 0,
        }
    }

    /// Adds the size `r` would have in a full-mode log: no extents, the data instead.
    fn add(&mut self, r: &Record) -> Result<(), CliError> {
        self.scratch.clear();
        let data_len = match &r.body {
            RecordBody::Read(_) => {
                let stripped = Record {
                    body: RecordBody::Read(ReadBody::default()),
                    ..r.clone()
                };
                self.codec
                    .encode(&stripped, &mut self.scratch)
                    .map_err(|e| CliError::ctx("full-mode estimate", e))?;
                if r.status == 0 {
                    r.len
                } else {
                    0
                }
            }
            _ => {
                self.codec
                    .encode(r, &mut self.scratch)
                    .map_err(|e| CliError::ctx("full-mode estimate", e))?;
                0
            }
        };
        let size = (self.scratch.len() as u64).saturating_add(data_len);
        self.records_bytes = self.records_bytes.saturating_add(size);
        self.payload = self.payload.saturating_add(size);
        if self.payload >= FRAME_TARGET as u64 {
            self.end_frame();
        }
        Ok(())
    }

    fn end_frame(&mut self) {
        if self.payload > 0 {
            self.frames += 1;
            self.payload = 0;
            self.codec.reset();
        }
    }

    fn total(&mut self) -> u64 {
        self.end_frame();
        (HEADER_LEN as u64)
            .saturating_add(self.records_bytes)
            .saturating_add(self.frames.saturating_mul(FRAME_HEADER_LEN as u64))
    }
}

fn open(log: &Path) -> Result<LogReader<std::io::BufReader<std::fs::File>>, CliError> {
    LogReader::open(log).map_err(|e| CliError::ctx(format!("record log {}", log.display()), e))
}

fn uuid_str(u: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*u).hyphenated().to_string()
}

/// `YYYY-MM-DDTHH:MM:SSZ` for nanoseconds since the Unix epoch (UTC).
fn utc_time(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS.get(u).copied().unwrap_or("PiB"))
}

fn header_json(h: &LogHeader) -> Value {
    json!({
        "version": h.version,
        "mode": h.mode.name(),
        "image_uuid": uuid_str(&h.image_uuid),
        "start_seq": h.start_seq.get(),
        "block_size": h.block_size.bytes(),
        "write_hash": h.write_hash.name(),
        "request_indices": indices_name(h.indices),
        "streams": streams_name(h.streams),
        "image_size": h.image_size,
        "created_unix_ns": h.created_unix_ns,
        "created": utc_time(h.created_unix_ns),
    })
}

fn tail_json(t: Option<TornTail>) -> Value {
    match t {
        Some(t) => json!({ "offset": t.offset, "dropped_bytes": t.dropped_bytes }),
        None => Value::Null,
    }
}

/// `rr-row log info`.
pub fn info(log: &Path, output: OutputFormat) -> CliResult {
    let mut r = open(log)?;
    let header = *r.header();
    let file_bytes = std::fs::metadata(log)
        .map_err(|e| CliError::ctx(format!("record log {}", log.display()), e))?
        .len();
    let mut kinds: BTreeMap<&'static str, KindStats> = BTreeMap::new();
    let mut queues: BTreeMap<u16, u64> = BTreeMap::new();
    let mut seq_range: Option<(u64, u64)> = None;
    let mut sim = FullModeSim::new(&header);
    let mut mapped_blocks = 0u64;
    let mut records = 0u64;
    // Damage in the middle ends the walk; what came before it is still reported.
    let mut damage: Option<CliError> = None;
    loop {
        let (rec, size) = match r.next_record_sized() {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(e) => {
                damage = Some(CliError::ctx(format!("record log {}", log.display()), e));
                break;
            }
        };
        records += 1;
        let k = kinds.entry(rec.kind_name()).or_default();
        k.count += 1;
        k.log_bytes += size as u64;
        k.data_bytes = k.data_bytes.saturating_add(rec.len);
        if rec.status != 0 {
            k.failed += 1;
        }
        *queues.entry(rec.queue).or_default() += 1;
        let s = rec.seq.get();
        seq_range = Some(seq_range.map_or((s, s), |(a, b)| (a.min(s), b.max(s))));
        if let RecordBody::Read(b) = &rec.body {
            for e in &b.extents {
                if let LogExtent::Mapped { blocks, .. } = e {
                    mapped_blocks = mapped_blocks.saturating_add(*blocks);
                }
            }
        }
        sim.add(&rec)?;
    }
    let tail = r.torn_tail();
    let frames = r.frames();
    let record_bytes: u64 = kinds.values().map(|k| k.log_bytes).sum();
    let framing = file_bytes.saturating_sub(record_bytes);
    let full_estimate = match header.mode {
        RecordMode::BlockId => Some(sim.total()),
        RecordMode::Full => None,
    };

    match output {
        OutputFormat::Json => {
            let kinds_json: serde_json::Map<String, Value> = kinds
                .iter()
                .map(|(name, k)| {
                    (
                        (*name).to_string(),
                        json!({
                            "count": k.count,
                            "failed": k.failed,
                            "log_bytes": k.log_bytes,
                            "request_bytes": k.data_bytes,
                        }),
                    )
                })
                .collect();
            let v = json!({
                "path": log.display().to_string(),
                "header": header_json(&header),
                "file_bytes": file_bytes,
                "frames": frames,
                "records": records,
                "framing_bytes": framing,
                "torn_tail": tail_json(tail),
                "queues": queues.iter().map(|(q, n)| json!({"queue": q, "records": n})).collect::<Vec<_>>(),
                "seq_first": seq_range.map(|r| r.0),
                "seq_last": seq_range.map(|r| r.1),
                "read_mapped_blocks": mapped_blocks,
                "kinds": kinds_json,
                "full_mode_bytes": full_estimate,
                "ratio_to_full_mode": full_estimate.map(|f| file_bytes as f64 / f.max(1) as f64),
                "damage": damage.as_ref().map(|e| e.to_string()),
            });
            println!("{v}");
        }
        OutputFormat::Human => {
            let uuid = uuid_str(&header.image_uuid);
            println!("log:            {}", log.display());
            println!("format version: {}", header.version);
            println!("record mode:    {}", header.mode.name());
            println!("image uuid:     {uuid}");
            println!("start seq:      {}", header.start_seq);
            println!("block size:     {}", header.block_size);
            println!("write hash:     {}", header.write_hash.name());
            println!("indices:        {}", indices_name(header.indices));
            println!("streams:        {}", streams_name(header.streams));
            println!(
                "image size:     {} ({} bytes)",
                human_bytes(header.image_size),
                header.image_size
            );
            println!("created:        {}", utc_time(header.created_unix_ns));
            println!(
                "file size:      {} ({file_bytes} bytes), {frames} frames",
                human_bytes(file_bytes)
            );
            let qs: Vec<String> = queues.iter().map(|(q, n)| format!("q{q}: {n}")).collect();
            println!("records:        {records} ({})", qs.join(", "));
            if let Some((a, b)) = seq_range {
                println!("seq range:      {a}..={b}");
            }
            match tail {
                Some(t) => println!(
                    "torn tail:      {} bytes dropped at byte {} (the recorder stopped mid-frame)",
                    t.dropped_bytes, t.offset
                ),
                None => println!("torn tail:      none"),
            }
            if let Some(e) = &damage {
                println!("damage:         {e}");
                println!("                (everything below counts the records before it)");
            }
            println!();
            println!(
                "{:<14}{:>12}{:>8}{:>14}{:>10}{:>16}",
                "kind", "records", "failed", "log bytes", "B/record", "request bytes"
            );
            for (name, k) in &kinds {
                println!(
                    "{:<14}{:>12}{:>8}{:>14}{:>10.1}{:>16}",
                    name,
                    k.count,
                    k.failed,
                    k.log_bytes,
                    k.log_bytes as f64 / k.count.max(1) as f64,
                    k.data_bytes
                );
            }
            println!("{:<14}{:>12}{:>8}{:>14}", "framing", "", "", framing);
            println!("{:<14}{:>12}{:>8}{:>14}", "total", records, "", file_bytes);
            println!();
            match full_estimate {
                Some(f) => println!(
                    "same run in full mode: {} ({f} bytes); this log is {:.3}% of it ({:.1}x smaller)",
                    human_bytes(f),
                    100.0 * file_bytes as f64 / f.max(1) as f64,
                    f as f64 / file_bytes.max(1) as f64
                ),
                None => println!("this log is in full mode: it carries the read data itself"),
            }
        }
    }
    match damage {
        Some(e) => Err(e),
        None => Ok(0),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn extent_json(e: &LogExtent) -> Value {
    match *e {
        LogExtent::Mapped { pba, blocks } => {
            json!({"mapped": {"pba": pba.get(), "blocks": blocks}})
        }
        LogExtent::Zero { blocks } => json!({"zero": {"blocks": blocks}}),
        LogExtent::Base { lba, blocks } => json!({"base": {"lba": lba.get(), "blocks": blocks}}),
    }
}

/// One dump line of a record.
fn dump_line(r: &Record, output: OutputFormat) -> String {
    match output {
        OutputFormat::Json => {
            let mut v = json!({
                "queue": r.queue,
                "index": r.index,
                "kind": r.kind_name(),
                "sector": r.sector,
                "len": r.len,
                "status": r.status,
                "seq": r.seq.get(),
            });
            if let Some(o) = v.as_object_mut() {
                match &r.body {
                    RecordBody::Read(b) => {
                        if !b.extents.is_empty() {
                            o.insert(
                                "extents".into(),
                                b.extents.iter().map(extent_json).collect(),
                            );
                        }
                        if let Some(d) = &b.data {
                            o.insert(
                                "data_blake3".into(),
                                blake3::hash(d).to_hex().as_str().into(),
                            );
                        }
                    }
                    RecordBody::Write {
                        first_pba,
                        blocks,
                        hash,
                    } => {
                        o.insert("first_pba".into(), first_pba.get().into());
                        o.insert("blocks".into(), (*blocks).into());
                        o.insert("hash".into(), hex(hash).into());
                    }
                    RecordBody::WriteZeroes { unmap } => {
                        o.insert("unmap".into(), (*unmap).into());
                    }
                    RecordBody::Rejected { req_type } => {
                        o.insert("req_type".into(), (*req_type).into());
                    }
                    RecordBody::Flush | RecordBody::Discard => {}
                }
            }
            v.to_string()
        }
        OutputFormat::Human => r.to_string(),
    }
}

/// `rr-row log dump`.
pub fn dump(log: &Path, output: OutputFormat) -> CliResult {
    let mut r = open(log)?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let broken_pipe = |e: std::io::Error| e.kind() == std::io::ErrorKind::BrokenPipe;
    if output == OutputFormat::Human {
        let h = r.header();
        let line = format!(
            "# record log v{} mode={} image={} start_seq={} block_size={}",
            h.version,
            h.mode.name(),
            uuid_str(&h.image_uuid),
            h.start_seq,
            h.block_size
        );
        if let Err(e) = writeln!(out, "{line}") {
            return if broken_pipe(e) {
                Ok(0)
            } else {
                Err(CliError::ctx("dump", "stdout"))
            };
        }
    }
    loop {
        let rec = match r.next_record() {
            Ok(Some(rec)) => rec,
            Ok(None) => break,
            Err(e) => {
                let _ = out.flush();
                return Err(CliError::ctx(format!("record log {}", log.display()), e));
            }
        };
        if let Err(e) = writeln!(out, "{}", dump_line(&rec, output)) {
            if broken_pipe(e) {
                return Ok(0);
            }
            return Err(CliError("dump: cannot write to stdout".into()));
        }
    }
    if out.flush().is_err() {
        return Ok(0);
    }
    if let Some(t) = r.torn_tail() {
        eprintln!(
            "rr-row: record log {}: torn tail, {} bytes dropped at byte {}",
            log.display(),
            t.dropped_bytes,
            t.offset
        );
    }
    Ok(0)
}

/// How `log info` names the way a log numbers requests (docs/record-log.md).
fn indices_name(k: crate::record::IndexKeying) -> &'static str {
    match k {
        crate::record::IndexKeying::Continuous => "continuous",
        crate::record::IndexKeying::PerConnection => "per-connection",
    }
}

/// How `log info` names the way a log's frames are organised (docs/record-log.md).
fn streams_name(s: crate::record::LogStreams) -> &'static str {
    match s {
        crate::record::LogStreams::Single => "single",
        crate::record::LogStreams::PerThread => "per-thread",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_are_civil_dates() {
        assert_eq!(utc_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            utc_time(1_709_210_096 * 1_000_000_000),
            "2024-02-29T12:34:56Z"
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
    }
}
