//! Criterion micro-benchmarks of the image engine (`rr_row::image::Image`), each next to the
//! same operation on a plain raw file with `pread`/`pwrite` in the same group, so the report
//! shows the ratio directly; plus the engine's hot paths on their own (map lookup, allocation
//! and journal append without data, flush), and the recorder's per-write work (the hash of the
//! data, the record appended to a log).
//!
//! Every file lives in a fresh temporary directory under `target/` (same filesystem as the
//! build, buffered I/O: the host page cache serves both sides). The working sets are small
//! enough to stay in the page cache, so these numbers measure CPU cost per operation (system
//! calls, map and journal work), not the disk. Writes to the engine append (redirect-on-write),
//! so its file grows by every byte written during a benchmark; each benchmark starts from a
//! new image and deletes it afterwards.
//!
//! Run: `cargo bench --bench engine` (a few minutes on 2 cores), or a subset:
//! `cargo bench --bench engine -- read_4k_random`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use rr_row::image::{uring, CreateOptions, Image};
use rr_row::iobuf::IoSeg;
use rr_row::record::format::{hash_segs, BodyRef, WriteHash};
use rr_row::record::{IndexKeying, LogHeader, LogStreams, LogWriter, RecordMode, RecordRef};
use rr_row::units::{BlockSize, Lba, Pba, Seq};

/// Block size of the engine images and of random I/O.
const BS: usize = 4096;
/// Size of sequential requests.
const SEQ: usize = 128 * 1024;
/// Virtual size of the images and raw files under random I/O.
const REGION: u64 = 256 << 20;
/// Virtual size of the fully fragmented image (every block overwritten once, in random order).
const FRAG_REGION: u64 = 64 << 20;

/// A raw file and an engine image of the same virtual size, in a temporary directory.
struct Pair {
    _dir: tempfile::TempDir,
    raw: File,
    img: Image,
    img_path: PathBuf,
}

fn tmp_dir() -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    tempfile::Builder::new()
        .prefix("bench-engine-")
        .tempdir_in(base)
        .expect("temporary directory under target/")
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

impl Pair {
    /// A fresh raw file and image of `size` bytes; with `prefill`, both are written
    /// sequentially in 1 MiB requests first, so reads hit allocated, sequential data.
    fn new(size: u64, prefill: bool) -> Self {
        let dir = tmp_dir();
        let raw_path = dir.path().join("disk.raw");
        let raw = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&raw_path)
            .expect("create raw file");
        raw.set_len(size).expect("size raw file");
        let img_path = dir.path().join("disk.rrimg");
        let img = Image::create(
            &img_path,
            &CreateOptions {
                size,
                block_size: BlockSize::DEFAULT,
                base: None,
            },
        )
        .expect("create image");
        let pair = Pair {
            _dir: dir,
            raw,
            img,
            img_path,
        };
        if prefill {
            let chunk = pattern(1 << 20, 1);
            let mut off = 0;
            while off < size {
                pair.raw.write_all_at(&chunk, off).expect("prefill raw");
                pair.img.write_at(off, &chunk).expect("prefill image");
                off += chunk.len() as u64;
            }
            pair.img.flush().expect("flush image");
            pair.raw.sync_data().expect("sync raw");
        }
        pair
    }

    /// Overwrites every block of the disk once with 4 KiB writes in random order, on both
    /// sides: the engine's map ends up with no two logically adjacent blocks physically
    /// adjacent (the worst case of redirect-on-write); the raw file does not change shape.
    fn fragment(&self, size: u64) {
        let mut blocks: Vec<u64> = (0..size / BS as u64).collect();
        blocks.shuffle(&mut StdRng::seed_from_u64(7));
        let buf = pattern(BS, 2);
        for b in blocks {
            self.raw.write_all_at(&buf, b * BS as u64).expect("raw");
            self.img.write_at(b * BS as u64, &buf).expect("image");
        }
        self.img.flush().expect("flush image");
        self.raw.sync_data().expect("sync raw");
    }
}

fn random_offset(rng: &mut StdRng, size: u64, align: usize) -> u64 {
    rng.gen_range(0..size / align as u64) * align as u64
}

/// 4 KiB random writes: engine (allocate, write data, journal, map update) vs pwrite in place.
fn write_4k_random(c: &mut Criterion) {
    let mut g = c.benchmark_group("write_4k_random");
    g.throughput(Throughput::Bytes(BS as u64));
    let p = Pair::new(REGION, false);
    let buf = pattern(BS, 3);
    let mut rng = StdRng::seed_from_u64(11);
    g.bench_function("raw_pwrite", |b| {
        b.iter(|| {
            p.raw
                .write_all_at(&buf, random_offset(&mut rng, REGION, BS))
                .expect("pwrite")
        })
    });
    g.bench_function("rr_row", |b| {
        b.iter(|| {
            p.img
                .write_at(random_offset(&mut rng, REGION, BS), &buf)
                .expect("write")
        })
    });
    g.finish();
}

/// 4 KiB random reads of prefilled data: engine (map lookup, pread of the PBA) vs pread.
fn read_4k_random(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_4k_random");
    g.throughput(Throughput::Bytes(BS as u64));
    let p = Pair::new(REGION, true);
    let mut buf = vec![0u8; BS];
    let mut rng = StdRng::seed_from_u64(12);
    g.bench_function("raw_pread", |b| {
        b.iter(|| {
            p.raw
                .read_exact_at(&mut buf, random_offset(&mut rng, REGION, BS))
                .expect("pread")
        })
    });
    g.bench_function("rr_row", |b| {
        b.iter(|| {
            p.img
                .read_at(random_offset(&mut rng, REGION, BS), &mut buf)
                .expect("read")
        })
    });
    // The record path: the same read, also returning the extents that supplied the data.
    let mut trace = Vec::with_capacity(4);
    g.bench_function("rr_row_traced", |b| {
        b.iter(|| {
            trace.clear();
            let seg = [IoSeg::from_mut_slice(&mut buf)];
            p.img
                .read_vectored(random_offset(&mut rng, REGION, BS), &seg, Some(&mut trace))
                .expect("read")
        })
    });
    g.finish();
}

/// 128 KiB sequential writes, wrapping around the region.
fn write_128k_seq(c: &mut Criterion) {
    let mut g = c.benchmark_group("write_128k_seq");
    g.throughput(Throughput::Bytes(SEQ as u64));
    let p = Pair::new(REGION, false);
    let buf = pattern(SEQ, 4);
    let mut off = 0u64;
    let mut next = move || {
        let o = off;
        off = (off + SEQ as u64) % REGION;
        o
    };
    g.bench_function("raw_pwrite", |b| {
        b.iter(|| p.raw.write_all_at(&buf, next()).expect("pwrite"))
    });
    g.bench_function("rr_row", |b| {
        b.iter(|| p.img.write_at(next(), &buf).expect("write"))
    });
    g.finish();
}

/// 128 KiB sequential reads: of sequentially written data, and of data whose every block was
/// overwritten in random order (fragmented).
fn read_128k_seq(c: &mut Criterion) {
    for fragmented in [false, true] {
        let name = if fragmented {
            "read_128k_seq_fragmented"
        } else {
            "read_128k_seq"
        };
        let size = if fragmented { FRAG_REGION } else { REGION };
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Bytes(SEQ as u64));
        let p = Pair::new(size, true);
        if fragmented {
            p.fragment(size);
        }
        let mut buf = vec![0u8; SEQ];
        let mut off = 0u64;
        let mut next = move || {
            let o = off;
            off = (off + SEQ as u64) % size;
            o
        };
        g.bench_function("raw_pread", |b| {
            b.iter(|| p.raw.read_exact_at(&mut buf, next()).expect("pread"))
        });
        g.bench_function("rr_row", |b| {
            b.iter(|| p.img.read_at(next(), &mut buf).expect("read"))
        });
        g.finish();
    }
}

/// 128 KiB reads that resolve to exactly `k` extents, one `preadv` per extent against all of
/// them submitted at once through io_uring (`rr_row::image::uring`): what chooses the
/// threshold `uring::DEFAULT_MIN_EXTENTS`.
fn read_128k_extents(c: &mut Criterion) {
    const SIZE: u64 = 16 << 20;
    let mut g = c.benchmark_group("read_128k_extents");
    g.throughput(Throughput::Bytes(SEQ as u64));
    let blocks = (SEQ / BS) as u64;
    for k in [1u64, 2, 3, 4, 6, 8, 16, 32] {
        let p = Pair::new(SIZE, true);
        // Every 128 KiB window in k runs; run j of every window is rewritten in pass j, last
        // run first: consecutive runs of a window lie in different passes, far apart.
        if k > 1 {
            let bounds: Vec<u64> = (0..=k).map(|j| j * blocks / k).collect();
            for j in (0..k as usize).rev() {
                let (a, b) = (bounds[j], bounds[j + 1]);
                let buf = pattern(((b - a) as usize) * BS, 10 + j as u64);
                for w in 0..SIZE / SEQ as u64 {
                    p.img
                        .write_at(w * SEQ as u64 + a * BS as u64, &buf)
                        .expect("rewrite run");
                }
            }
            p.img.flush().expect("flush image");
        }
        let ex = p.img.resolve(Lba(0), blocks).expect("resolve");
        assert_eq!(ex.len() as u64, k, "extents of a window");
        let mut buf = vec![0u8; SEQ];
        let mut off = 0u64;
        for (label, min) in [("preadv", 0usize), ("io_uring", 1)] {
            uring::set_min_extents(min);
            g.bench_function(BenchmarkId::new(label, k), |b| {
                b.iter(|| {
                    let o = off;
                    off = (off + SEQ as u64) % SIZE;
                    p.img.read_at(o, &mut buf).expect("read")
                })
            });
            // The same from the disk: the image's pages dropped from the page cache (they
            // are clean after the flush) before each read, outside the timed part.
            if [1, 4, 8, 32].contains(&k) {
                let file = File::open(&p.img_path).expect("open image");
                g.bench_function(BenchmarkId::new(format!("{label}_cold"), k), |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            drop_cache(&file);
                            let o = off;
                            off = (off + SEQ as u64) % SIZE;
                            let t = std::time::Instant::now();
                            p.img.read_at(o, &mut buf).expect("read");
                            total += t.elapsed();
                        }
                        total
                    })
                });
            }
        }
        uring::set_min_extents(uring::DEFAULT_MIN_EXTENTS);
    }
    g.finish();
}

/// Drops the file's clean pages from the page cache.
fn drop_cache(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise on an open descriptor; no memory is involved.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
}

/// Map lookups (`resolve`): 1 block and 32 blocks, on a sequential and a fragmented map.
fn resolve(c: &mut Criterion) {
    let mut g = c.benchmark_group("resolve");
    let seq = Pair::new(FRAG_REGION, true);
    let frag = Pair::new(FRAG_REGION, true);
    frag.fragment(FRAG_REGION);
    let blocks_total = FRAG_REGION / BS as u64;
    let mut rng = StdRng::seed_from_u64(13);
    for (label, p) in [("sequential", &seq), ("fragmented", &frag)] {
        for n in [1u64, 32] {
            g.bench_with_input(BenchmarkId::new(label, n), &n, |b, &n| {
                b.iter(|| {
                    let lba = rng.gen_range(0..blocks_total - n + 1);
                    p.img.resolve(Lba(lba), n).expect("resolve")
                })
            });
        }
    }
    g.finish();
}

/// Allocation and journal append without data movement: write-zeroes and discard of one
/// block are mapping changes only; a 512-byte write is a read-modify-write into a new block.
fn journal(c: &mut Criterion) {
    let mut g = c.benchmark_group("journal");
    let p = Pair::new(REGION, true);
    let mut rng = StdRng::seed_from_u64(14);
    g.bench_function("write_zeroes_4k", |b| {
        b.iter(|| {
            p.img
                .write_zeroes(random_offset(&mut rng, REGION, BS), BS as u64)
                .expect("write_zeroes")
        })
    });
    g.bench_function("discard_4k", |b| {
        b.iter(|| {
            p.img
                .discard(random_offset(&mut rng, REGION, BS), BS as u64)
                .expect("discard")
        })
    });
    let small = pattern(512, 5);
    g.bench_function("write_512_subblock", |b| {
        b.iter(|| {
            p.img
                .write_at(random_offset(&mut rng, REGION, 512), &small)
                .expect("write")
        })
    });
    g.finish();
}

/// Durability: one 4 KiB write then flush (engine: data + journal + fdatasync) vs pwrite +
/// fdatasync on the raw file.
fn flush(c: &mut Criterion) {
    let mut g = c.benchmark_group("write_4k_flush");
    let p = Pair::new(REGION, false);
    let buf = pattern(BS, 6);
    let mut rng = StdRng::seed_from_u64(15);
    g.bench_function("raw_pwrite_fdatasync", |b| {
        b.iter(|| {
            p.raw
                .write_all_at(&buf, random_offset(&mut rng, REGION, BS))
                .expect("pwrite");
            p.raw.sync_data().expect("fdatasync")
        })
    });
    g.bench_function("rr_row", |b| {
        b.iter(|| {
            p.img
                .write_at(random_offset(&mut rng, REGION, BS), &buf)
                .expect("write");
            p.img.flush().expect("flush")
        })
    });
    g.finish();
    // The image's file size after the run, so the growth shows in the log.
    if let Ok(m) = std::fs::metadata(&p.img_path) {
        eprintln!("write_4k_flush: image file is {} MiB", m.len() >> 20);
    }
}

/// The recorder's work per write beside the engine's: the hash of the data (4 KiB and 128 KiB,
/// in two segments as a guest's chain may give them), and one write record appended to a log
/// (encoding into the thread's frame; a frame goes to the file every 64 KiB of records).
fn record(c: &mut Criterion) {
    let mut g = c.benchmark_group("record");
    let mut rng = StdRng::seed_from_u64(17);
    for (label, len) in [("4k", BS), ("128k", SEQ)] {
        let data = pattern(len, 17);
        let (a, b) = data.split_at(len / 2);
        let segs = [IoSeg::from_slice(a), IoSeg::from_slice(b)];
        g.throughput(Throughput::Bytes(len as u64));
        for (name, alg) in [("xxh3", WriteHash::Xxh3_128), ("blake3", WriteHash::Blake3)] {
            g.bench_function(format!("hash_{label}_{name}"), |b| {
                b.iter(|| hash_segs(alg, &segs))
            });
        }
    }
    let dir = tmp_dir();
    let header = LogHeader {
        version: rr_row::record::format::VERSION,
        mode: RecordMode::BlockId,
        block_size: BlockSize::DEFAULT,
        image_uuid: [1; 16],
        start_seq: Seq(0),
        image_size: REGION,
        created_unix_ns: 0,
        write_hash: WriteHash::default(),
        indices: IndexKeying::Continuous,
        streams: LogStreams::PerThread,
    };
    let log = LogWriter::create(&dir.path().join("bench.rrlog"), &header, Duration::ZERO)
        .expect("create log");
    let blocks = REGION / BS as u64;
    let (mut index, mut pba) = (0u64, 0u64);
    g.throughput(Throughput::Elements(1));
    g.bench_function("append_write_record", |b| {
        b.iter(|| {
            index += 1;
            pba += 1;
            let rec = RecordRef {
                queue: 0,
                index,
                sector: rng.gen_range(0..blocks) * (BS as u64 / 512),
                len: BS as u64,
                status: 0,
                seq: Seq(index),
                body: BodyRef::Write {
                    first_pba: Pba(pba),
                    blocks: 1,
                    hash: [index as u8; 16],
                },
            };
            log.append_ref(&rec).expect("append")
        })
    });
    g.finish();
}

/// The CRC-32C every write's journal record carries over its data (and every header, record
/// and log frame over itself): `rr_row::crc` against the `crc32c` crate it replaced, which
/// computes the same values with the SSE4.2 instruction only.
fn checksum(c: &mut Criterion) {
    let mut g = c.benchmark_group("crc32c");
    for (label, len) in [("4k", BS), ("128k", SEQ)] {
        let data = pattern(len, 19);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(format!("rr_row_{label}"), |b| {
            b.iter(|| rr_row::crc::crc32c(&data))
        });
        g.bench_function(format!("crc32c_crate_{label}"), |b| {
            b.iter(|| crc32c::crc32c(&data))
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args()
}

criterion_group! {
    name = benches;
    config = config();
    targets = write_4k_random, read_4k_random, write_128k_seq, read_128k_seq, read_128k_extents, resolve, journal, flush, record, checksum
}
criterion_main!(benches);
