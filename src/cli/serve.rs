//! `rr-row serve`: the vhost-user-blk daemon. Validates the arguments, opens (or creates) the
//! image, serves it with [`crate::vhost_user::run`] until SIGINT/SIGTERM (or, with `--once`,
//! until the first frontend leaves), then closes the image so it is flushed and checkpointed.

use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};

use super::{CliError, CliResult, Pipeline, RingReadsArg, ServeArgs, MAX_POLL_US};
use crate::blockdev::image_dev::ImageDevice;
use crate::blockdev::record_dev::RecordingDevice;
use crate::blockdev::relocator::RelocPolicy;
use crate::blockdev::replay_dev::{DivergencePolicy, ReplayingDevice};
use crate::blockdev::BlockDevice;
use crate::image::{CreateOptions, Image, OpenMode, OpenOptions};
use crate::units::BlockSize;
use crate::vhost_user::backend::{MAX_IO_THREADS, MAX_QUEUES};
use crate::vhost_user::{run, stop_on_signals, BackendConfig, DaemonConfig, StopHandle};
use crate::virtio_blk::{serial_bytes, ID_BYTES};

/// Initialises env_logger: `RUST_LOG` decides, `info` by default, to stderr.
fn init_logging() {
    let env = env_logger::Env::default().default_filter_or("info");
    // A second initialisation (e.g. in tests) is harmless.
    let _ = env_logger::Builder::from_env(env).try_init();
}

/// Most request threads per queue when `--io-threads` is not given: the queue's worker and
/// three helpers. On the 2-CPU machine of docs/perf-notes.md (section 6) 2 threads lifted 128
/// KiB sequential reads from 0.7x to 0.83-1.0x qemu-storage-daemon, and 4 did better again
/// (0.91x). Since the workers poll (section 11), more threads than CPUs only contend: the
/// default is this or the number of CPUs, whichever is smaller (section 15).
const DEFAULT_IO_THREADS: u16 = 4;

/// The default `--io-threads` without `--direct`: [`DEFAULT_IO_THREADS`], but no more than
/// the CPUs this process may run on.
fn default_io_threads() -> u16 {
    std::thread::available_parallelism().map_or(DEFAULT_IO_THREADS, |n| {
        u16::try_from(n.get())
            .unwrap_or(u16::MAX)
            .clamp(1, DEFAULT_IO_THREADS)
    })
}

/// Request threads per queue with `--direct`: each waits for the device rather than copying
/// in the page cache, so more of them keep more requests in flight (qemu-storage-daemon keeps
/// a whole batch in flight through io_uring). 16 against 8: 4 KiB random reads and writes at
/// QD32 went from 0.59-0.69x raw to 0.74-0.95x (docs/perf-notes.md, section 17).
const DIRECT_IO_THREADS: u16 = 16;

/// Checks the arguments and turns them into the daemon's configuration.
fn daemon_config(a: &ServeArgs) -> Result<DaemonConfig, CliError> {
    if a.queues == 0 || a.queues > MAX_QUEUES {
        return Err(CliError(format!(
            "--queues {} is out of range (1..={MAX_QUEUES})",
            a.queues
        )));
    }
    if a.queue_size < 2 || !a.queue_size.is_power_of_two() {
        return Err(CliError(format!(
            "--queue-size {} must be a power of two between 2 and 32768",
            a.queue_size
        )));
    }
    let io_threads = match a.io_threads {
        None if a.direct => DIRECT_IO_THREADS,
        None => default_io_threads(),
        Some(n) if n == 0 || n > MAX_IO_THREADS => {
            return Err(CliError(format!(
                "--io-threads {n} is out of range (1..={MAX_IO_THREADS})"
            )))
        }
        Some(n) => n,
    };
    if a.poll_us > MAX_POLL_US {
        return Err(CliError(format!(
            "--poll-us {} is out of range (0..={MAX_POLL_US})",
            a.poll_us
        )));
    }
    if a.pipeline == Pipeline::On && io_threads == 1 {
        warn!("--pipeline on needs --io-threads above 1: the queues are not pipelined");
    }
    let serial = a.serial.as_deref().unwrap_or("");
    if serial.len() > ID_BYTES {
        return Err(CliError(format!(
            "--serial '{serial}' is longer than {ID_BYTES} bytes"
        )));
    }
    let socket_mode = u32::from_str_radix(a.socket_mode.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            CliError(format!(
                "--socket-mode '{}' is not an octal file mode such as 600",
                a.socket_mode
            ))
        })?;
    Ok(DaemonConfig {
        socket: a.socket.clone(),
        socket_mode,
        once: a.once,
        backend: BackendConfig {
            io_threads,
            poll_max: Duration::from_micros(a.poll_us),
            pipeline: match a.pipeline {
                Pipeline::Auto => a.direct,
                Pipeline::On => true,
                Pipeline::Off => false,
            },
            ring_reads: a.ring_reads == RingReadsArg::On,
            ..BackendConfig::new(a.queues, a.queue_size, serial_bytes(serial))
        },
    })
}

/// What the relocation thread does: `--relocate-on-read`, `--defrag-idle-ms` and
/// `--defrag-rate`.
fn reloc_policy(a: &ServeArgs) -> RelocPolicy {
    RelocPolicy {
        on_read_min_runs: a.relocate_on_read,
        idle_after: (a.defrag_idle_ms > 0).then(|| Duration::from_millis(a.defrag_idle_ms)),
        idle_rate: (a.defrag_rate > 0).then(|| a.defrag_rate.saturating_mul(1 << 20)),
    }
}

/// Opens the image, creating it first when it does not exist and `--size` is given.
fn open_image(a: &ServeArgs) -> Result<Image, CliError> {
    let mode = if a.read_only || a.replay.is_some() {
        OpenMode::ReadOnly
    } else {
        OpenMode::ReadWrite
    };
    let path = &a.image;
    if !path.exists() {
        let Some(size) = a.size else {
            return Err(CliError(format!(
                "{}: no such image (give --size to create it)",
                path.display()
            )));
        };
        let block_size = u32::try_from(a.block_size)
            .ok()
            .and_then(BlockSize::new)
            .ok_or_else(|| {
                CliError(format!(
                    "--block-size {} is not a power of two from 512 to 64K",
                    a.block_size
                ))
            })?;
        let opts = CreateOptions {
            size,
            block_size,
            base: None,
        };
        let image = Image::create(path, &opts).map_err(|e| CliError::ctx(path.display(), e))?;
        if mode == OpenMode::ReadWrite && !a.direct {
            return Ok(image);
        }
        image
            .close()
            .map_err(|e| CliError::ctx(path.display(), e))?;
    }
    // A read-only daemon (--read-only, --replay) holds a shared lock, so no reclaim (and no
    // read-write daemon) can change the image under it.
    let opts = OpenOptions {
        direct: a.direct,
        shared_lock: true,
    };
    let image = Image::open_with_options(path, mode, &opts)
        .map_err(|e| CliError::ctx(path.display(), e))?;
    if let Some(size) = a.size {
        if size != image.size() {
            warn!(
                "{} exists with size {}; --size {} is ignored",
                path.display(),
                image.size(),
                size
            );
        }
    }
    Ok(image)
}

/// `rr-row serve`.
pub fn serve(a: &ServeArgs) -> CliResult {
    init_logging();
    let cfg = daemon_config(a)?;
    let image = open_image(a)?;
    if a.replay.is_none() {
        if let Err(e) = image.set_preallocate(a.preallocate, a.preallocate_cached) {
            warn!("{e}; writes work without it, more slowly");
        }
        // With --direct no data block is in the page cache: nothing to drop.
        if let Err(e) = image.set_drop_superseded(!a.keep_superseded_cached && !a.direct) {
            warn!("{e}; superseded versions stay in the page cache");
        }
    }
    info!(
        "image opened: {} ({} bytes, block size {}, seq {}, {})",
        a.image.display(),
        image.size(),
        image.block_size(),
        image.seq(),
        if image.is_read_only() {
            "read-only"
        } else {
            "read-write"
        }
    );
    let stop = StopHandle::new().map_err(|e| CliError::ctx("serve", e))?;
    stop_on_signals(stop.clone()).map_err(|e| CliError::ctx("cannot handle signals", e))?;
    if a.record.is_some() || a.replay.is_some() {
        let image = Arc::new(image);
        let mut clean = true;
        let result = if let Some(log) = &a.record {
            let mode = match a.record_mode {
                super::RecordMode::BlockId => crate::record::RecordMode::BlockId,
                super::RecordMode::Full => crate::record::RecordMode::Full,
            };
            let dev = Arc::new(
                RecordingDevice::new(Arc::clone(&image), log, mode)
                    .map_err(|e| CliError::ctx(log.display(), e))?
                    .with_relocation(reloc_policy(a))
                    .map_err(|e| CliError::ctx("cannot start the relocation thread", e))?
                    .with_background_sync()
                    .map_err(|e| CliError::ctx("cannot start the sync thread", e))?
                    .with_retention(a.retain_seqs, !a.punch_reclaimed)
                    .map_err(|e| CliError(e.to_string()))?,
            );
            let r = run(&cfg, dev.clone() as Arc<dyn BlockDevice>, &stop);
            if let Ok(dev) = Arc::try_unwrap(dev) {
                dev.finish().map_err(|e| CliError::ctx(log.display(), e))?;
            }
            r
        } else if let Some(log) = &a.replay {
            let policy = match a.on_divergence {
                super::OnDivergence::Stop => DivergencePolicy::Stop,
                super::OnDivergence::Continue => DivergencePolicy::Continue,
            };
            let dev = Arc::new(
                ReplayingDevice::open(Arc::clone(&image), log, policy)
                    .map_err(|e| CliError::ctx(log.display(), e))?,
            );
            let r = run(&cfg, dev.clone() as Arc<dyn BlockDevice>, &stop);
            clean = dev.summary().is_clean();
            drop(dev); // logs the summary, releases the image
            r
        } else {
            Ok(())
        };
        let closed = match Arc::try_unwrap(image) {
            Ok(image) => image.close(),
            Err(image) => image.flush(),
        };
        closed.map_err(|e| CliError::ctx("closing the image failed", e))?;
        result.map_err(|e| CliError(e.to_string()))?;
        return Ok(if clean { 0 } else { 2 });
    }
    let dev = Arc::new(
        ImageDevice::with_relocation(image, reloc_policy(a))
            .map_err(|e| CliError::ctx("cannot start the relocation thread", e))?
            .with_background_sync()
            .map_err(|e| CliError::ctx("cannot start the sync thread", e))?
            .with_retention(a.retain_seqs, !a.punch_reclaimed)
            .map_err(|e| CliError(e.to_string()))?,
    );

    let result = run(&cfg, dev.clone() as Arc<dyn BlockDevice>, &stop);

    // Every connection's workers are joined by now, so this is the last reference.
    let closed = match Arc::try_unwrap(dev) {
        Ok(dev) => match dev.into_image() {
            Ok(image) => image.close(),
            Err(image) => image.flush(),
        },
        Err(dev) => dev.image().flush(),
    };
    match (&result, closed) {
        (_, Err(e)) => return Err(CliError::ctx("closing the image failed", e)),
        (Ok(()), Ok(())) => info!("image closed"),
        (Err(_), Ok(())) => {}
    }
    result.map_err(|e| CliError(e.to_string()))?;
    Ok(0)
}
