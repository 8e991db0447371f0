//! The vhost-user-blk backend: [`BlkBackend`] implements
//! [`vhost_user_backend::VhostUserBackend`] (the `&self` flavour, so every queue's worker thread
//! runs requests in parallel) over any [`BlockDevice`].
//!
//! One backend lives for one frontend connection: request counters, negotiated features and the
//! once-per-kind warning state start fresh with each connection, while the device is shared.
//!
//! Each queue has its own worker thread (`queues_per_thread`). On a kick the worker takes every
//! available chain and executes them, sharing them with the queue's [`BatchPool`] helpers when
//! `io_threads > 1` (so one queue has several requests in flight), lets the device write out what
//! it buffered ([`BlockDevice::end_of_batch`]), adds them all to the used ring and signals the
//! guest once per batch (when `needs_notification` says so). Pipelined
//! ([`BackendConfig::pipeline`]), it instead hands the batch's parts to the helpers and goes back
//! to the ring at once, and each helper completes and signals the part it ran. With
//! VIRTIO_RING_F_EVENT_IDX it keeps draining until `enable_notification()` reports that no new
//! chain arrived meanwhile, so no kick is lost.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::poll::PollWindow;
use super::pool::BatchPool;
use super::ring_reads::{Done, RingReads};
use crate::blockdev::{BatchReq, BlockDevice, BlockError, RequestCtx};
use crate::virtio_blk::execute::{
    finish, finish_pending, parse_read, parse_write, peek_type, prepare, BatchKind, ChainError,
    Completion, ExecuteError, ExecuteParams, Pending, EXECUTE_ERROR_KINDS,
};
use crate::virtio_blk::request::{Limits, Request, REQUEST_ERROR_KINDS};
use crate::virtio_blk::{process_chain, BlkConfig, ConfigParams, ID_BYTES};

/// Guest memory as the vhost-user backend crates share it.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// The most queues a backend can have (one bit per queue in `queues_per_thread`).
pub const MAX_QUEUES: u16 = 64;

/// Static settings of a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Number of request queues (1..=[`MAX_QUEUES`]).
    pub num_queues: u16,
    /// Largest queue size the frontend may set (a power of two).
    pub queue_size: u16,
    /// GET_ID answer.
    pub serial: [u8; ID_BYTES],
    /// Logical block size presented to the guest (`blk_size`).
    pub logical_block_size: u32,
    /// Maximum discard / write-zeroes segments per request.
    pub max_dwz_segments: u32,
    /// Maximum sectors per discard / write-zeroes segment.
    pub max_dwz_sectors: u32,
    /// Threads that execute one queue's requests (its worker plus `io_threads - 1` helpers);
    /// 1 runs a queue's requests one after the other.
    pub io_threads: u16,
    /// Longest time a queue's worker polls the available ring after a batch before it
    /// sleeps until the next kick (adaptive, see [`super::poll`]); zero never polls. Only
    /// with VIRTIO_RING_F_EVENT_IDX.
    pub poll_max: Duration,
    /// Whether a queue's worker hands a batch to its helpers and goes back to the available
    /// ring at once, each helper completing (and signalling) what it ran, instead of waiting
    /// for the whole batch. Pays where requests wait for the disk (`O_DIRECT`): the disk
    /// then always has the next requests, not waves of batches. A batch of one request with
    /// nothing else in flight still runs on the worker. Needs `io_threads > 1`.
    pub pipeline: bool,
    /// Pipelined, whether a queue's worker keeps the reads the device can plan
    /// ([`BlockDevice::plan_read`]) in flight on an io_uring ring of its own and completes
    /// them as the disk finishes them ([`super::ring_reads`]), instead of handing each to a
    /// helper that waits for it. The daemon must register each queue's ring with the queue's
    /// event loop ([`BlkBackend::ring_read_fds`]) for it to be used.
    pub ring_reads: bool,
}

impl BackendConfig {
    /// Defaults for everything but the queue shape and serial.
    pub fn new(num_queues: u16, queue_size: u16, serial: [u8; ID_BYTES]) -> Self {
        BackendConfig {
            num_queues,
            queue_size,
            serial,
            logical_block_size: 512,
            max_dwz_segments: 32,
            max_dwz_sectors: 1 << 22,
            io_threads: 1,
            poll_max: Duration::ZERO,
            pipeline: false,
            ring_reads: false,
        }
    }

    /// Whether the queues are pipelined: [`pipeline`](Self::pipeline) asked for, and helpers
    /// to hand batches to (`io_threads > 1`).
    pub fn pipelined(&self) -> bool {
        self.pipeline && self.io_threads > 1
    }
}

/// Errors of the backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The queue count is out of range.
    #[error("queue count {0} is not in 1..={MAX_QUEUES}")]
    QueueCount(u16),
    /// The queue size is not a power of two in 2..=32768.
    #[error("queue size {0} is not a power of two between 2 and 32768")]
    QueueSize(u16),
    /// The per-queue thread count is out of range.
    #[error("I/O threads per queue {0} is not in 1..={MAX_IO_THREADS}")]
    IoThreads(u16),
    /// A request thread could not be started.
    #[error("cannot start a request thread: {0}")]
    Thread(#[source] io::Error),
}

/// The most threads that may execute one queue's requests.
pub const MAX_IO_THREADS: u16 = 64;

/// Bit of the once-per-kind warning mask for an error.
fn warn_bit(e: &ChainError) -> u32 {
    match e {
        ChainError::Malformed(r) => r.kind_index(),
        ChainError::Execute(x) => REQUEST_ERROR_KINDS + x.kind_index(),
    }
}

const _: () = assert!(REQUEST_ERROR_KINDS + EXECUTE_ERROR_KINDS <= WARN_RING);

/// Once-per-kind warning state of one connection, shared with the request threads.
#[derive(Default)]
struct Warnings(AtomicU64);

impl Warnings {
    /// True the first time `bit` is raised on this connection.
    fn first(&self, bit: u32) -> bool {
        let b = 1u64 << bit;
        self.0.fetch_or(b, Ordering::AcqRel) & b == 0
    }

    /// Logs request `index` of `queue` if its completion says it failed ([`Self::report`]).
    fn completed(&self, queue: u16, index: u64, c: &Completion) {
        if let Some(e) = &c.error {
            self.report(queue, index, e, c.status.is_none());
        }
    }

    /// Logs a failed chain: at warn the first time its kind is seen on this connection, at
    /// debug afterwards.
    fn report(&self, queue: u16, index: u64, e: &ChainError, dropped: bool) {
        let first = self.first(warn_bit(e));
        let what = if dropped {
            "dropped (no status byte)"
        } else {
            "failed"
        };
        if first {
            let device_failure = matches!(
                e,
                ChainError::Execute(ExecuteError::Device(
                    BlockError::Io(_) | BlockError::Image(_)
                ))
            );
            if device_failure {
                error!("queue {queue} request #{index} {what}: {e} (repeats are logged at debug)");
            } else {
                warn!("queue {queue} request #{index} {what}: {e} (repeats are logged at debug)");
            }
        } else {
            debug!("queue {queue} request #{index} {what}: {e}");
        }
    }
}

/// Warning bits past the request error kinds.
const WARN_RING: u32 = 60;
const WARN_BROKEN: u32 = 61;
const WARN_ADD_USED: u32 = 62;
const WARN_AVAIL: u32 = 63;

/// What a request thread needs to execute one chain of a batch (on the queue's worker or one
/// of its pool's helpers).
struct Executor {
    dev: Arc<dyn BlockDevice>,
    warnings: Arc<Warnings>,
    params: ExecuteParams,
    queue: u16,
}

/// One item of a batch for the pool: a chain, or (for a device that prefers them together)
/// the batch's reads or its writes, with the guest memory they were taken from and, for
/// writes, the request each chain was parsed into when the batch was sorted.
enum Work {
    One(RequestCtx, Chain),
    Batch(
        BatchKind,
        QueueMem,
        Vec<(RequestCtx, Chain, Option<Request>)>,
    ),
}

impl Executor {
    fn work(&self, w: Work) -> Vec<Completion> {
        match w {
            Work::One(ctx, chain) => vec![self.run(ctx, chain)],
            Work::Batch(kind, mem, chains) => self.run_batch(kind, &mem, chains),
        }
    }

    fn run(&self, ctx: RequestCtx, chain: Chain) -> Completion {
        let c = process_chain(chain, &*self.dev, &ctx, &self.params);
        self.report(&ctx, &c);
        c
    }

    /// Reads with one [`BlockDevice::read_many`], or writes with one
    /// [`BlockDevice::write_many`]; a chain that is not a well-formed request of that kind
    /// inside the device (or that must go alone) is answered on its own, as always.
    fn run_batch(
        &self,
        kind: BatchKind,
        mem: &GuestMemoryMmap,
        chains: Vec<(RequestCtx, Chain, Option<Request>)>,
    ) -> Vec<Completion> {
        let mut out = Vec::with_capacity(chains.len());
        let mut prepared = Vec::with_capacity(chains.len());
        for (ctx, chain, parsed) in chains {
            match prepare(&chain, parsed, mem, &*self.dev, ctx, &self.params, kind) {
                Some(r) => prepared.push(r),
                None => out.push(self.run(ctx, chain)),
            }
        }
        let reqs: Vec<BatchReq<'_>> = prepared
            .iter()
            .map(|r| BatchReq {
                ctx: &r.ctx,
                offset: r.offset,
                segs: &r.segs,
            })
            .collect();
        let results = match kind {
            _ if reqs.is_empty() => Vec::new(),
            BatchKind::Read => self.dev.read_many(&reqs),
            BatchKind::Write => self.dev.write_many(&reqs),
        };
        let mut results = results.into_iter();
        for r in &prepared {
            // A device that answered fewer requests than it was given fails the rest.
            let res = results.next().unwrap_or(Err(BlockError::Unsupported));
            let c = finish(r, res, mem, &*self.dev);
            self.report(&r.ctx, &c);
            out.push(c);
        }
        out
    }

    fn report(&self, ctx: &RequestCtx, c: &Completion) {
        self.warnings.completed(self.queue, ctx.index, c);
    }
}

/// A vhost-user-blk backend over a [`BlockDevice`], for one frontend connection.
pub struct BlkBackend {
    dev: Arc<dyn BlockDevice>,
    cfg: BackendConfig,
    limits: Limits,
    config: Mutex<BlkConfig>,
    mem: RwLock<GuestMem>,
    event_idx: AtomicBool,
    write_through: AtomicBool,
    acked_features: AtomicU64,
    next_index: RequestCounters,
    warnings: Arc<Warnings>,
    pools: Vec<BatchPool>,
    /// Per queue: its polling window and when it last went idle (only its worker locks it).
    polls: Vec<Mutex<QueuePoll>>,
    /// Per queue: whether its worker, or its helpers, hold chains not completed yet.
    in_flight: Vec<Arc<InFlight>>,
    /// Per queue: the guest memory its chains hold (only its worker locks it).
    queue_mems: Vec<QueueMemSlot>,
    /// Per queue: its ring of reads in flight ([`BackendConfig::ring_reads`]; only its
    /// worker locks it), and whether the daemon registered the ring's eventfd with the
    /// queue's event loop (the ring is used only then).
    ring_reads: Vec<(Mutex<Option<RingReads<RingItem>>>, AtomicBool)>,
}

/// A read in flight on a queue's ring: its context, its chain (which keeps the guest memory
/// the read goes into mapped, and answers the request the ordinary way if the ring's read
/// does not stand), and what completing it takes.
type RingItem = (RequestCtx, Chain, Pending);

impl Drop for BlkBackend {
    /// The rings first: each waits for the reads it has in flight before the chains and the
    /// device they read into and from go.
    fn drop(&mut self) {
        self.ring_reads.clear();
    }
}

/// The most reads of a batch in one part with [`BackendConfig::pipeline`]: a part completes
/// when the slowest of its reads is done, so smaller parts give the guest its reads back
/// sooner, while each part is still one submission to the disk. 8 against whole batches, 4 KiB
/// random reads at QD32 with `--direct`: 1.01x and 1.05x raw against 0.92x and 1.01x (1
/// queue), 1.01x and 1.07x against 0.96x and 0.99x (2 queues); 4 gave less on the 70/30 mix
/// (docs/perf-notes.md, section 27).
const PIPELINED_READ_PART: usize = 8;

/// The most bytes of reads in one part (a read larger than this is a part of its own): large
/// reads held back until their part's slowest one is done leave the disk idle between waves.
/// With `--direct`, 128 KiB reads after random overwrite (each many disk reads) gained 10-20%
/// from it; sequential 128 KiB reads one per part ran 12% faster in one A/B and within the
/// noise in two more, while one 4 KiB read per part cost 17% at QD32 (docs/perf-notes.md,
/// section 34); with this limit 4 KiB reads still go eight to a part.
const PIPELINED_READ_PART_BYTES: u64 = 64 << 10;

/// Cuts a batch's reads, in order, into parts of at most [`PIPELINED_READ_PART`] reads and
/// [`PIPELINED_READ_PART_BYTES`] bytes (`len` gives a read's length); a read longer than
/// that is a part alone.
fn read_parts<T>(reads: Vec<T>, len: impl Fn(&T) -> u64) -> Vec<Vec<T>> {
    let mut parts = Vec::new();
    let mut part: Vec<T> = Vec::new();
    let mut bytes = 0u64;
    for r in reads {
        let n = len(&r);
        if !part.is_empty()
            && (part.len() >= PIPELINED_READ_PART
                || bytes.saturating_add(n) > PIPELINED_READ_PART_BYTES)
        {
            parts.push(std::mem::take(&mut part));
            bytes = 0;
        }
        bytes = bytes.saturating_add(n);
        part.push(r);
    }
    if !part.is_empty() {
        parts.push(part);
    }
    parts
}

/// How long `GET_VRING_BASE` waits for a queue's requests in flight to complete before it
/// fails (a host disk that hangs longer than this).
const STOP_WAIT: Duration = Duration::from_secs(30);

/// Whether a queue's worker (or, with [`BackendConfig::pipeline`], its helpers) holds chains it
/// took from the available ring and has not put in the used ring yet: a count of holders, the
/// worker's batch being one and every item handed to a helper another.
/// [`VhostUserBackend::stop_vring`] (the frontend's `GET_VRING_BASE`) waits until it does not: the
/// ring state reported then must account for every request taken, and nothing may be written to
/// the used ring after it (the frontend may be migrating, and guest memory written after that is
/// not logged).
///
/// The worker raises and lowers the count once per batch, so lowering it wakes the condition
/// variable only when a stop is waiting: std's `notify_all` is a `futex` system call even with
/// nobody to wake, one more per request at queue depth 1.
#[derive(Debug, Default)]
struct InFlight {
    state: Mutex<InFlightState>,
    idle: Condvar,
}

#[derive(Debug, Default)]
struct InFlightState {
    /// Holders of chains: the worker's batch, and items handed to helpers.
    holders: usize,
    /// Stops waiting in [`InFlight::wait_idle`].
    waiting: usize,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, InFlightState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `n` more holders.
    fn hold(&self, n: usize) {
        let mut st = self.lock();
        st.holders += n;
    }

    /// One holder less.
    fn release(&self) {
        let wake = {
            let mut st = self.lock();
            st.holders = st.holders.saturating_sub(1);
            st.holders == 0 && st.waiting > 0
        };
        // A waiter registers under the lock before it checks `holders`: none is missed.
        if wake {
            self.idle.notify_all();
        }
    }

    /// The number of holders now.
    fn holders(&self) -> usize {
        self.lock().holders
    }

    /// Waits until nothing is in flight, at most `limit`; says whether that happened.
    fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut st = self.lock();
        st.waiting += 1;
        let idle = loop {
            if st.holders == 0 {
                break true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break false;
            }
            st = self
                .idle
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        };
        st.waiting -= 1;
        idle
    }
}

/// Releases one hold on a queue's in-flight count when a batch or item is done (or given up,
/// or its handler panicked).
struct Completing<'a>(&'a InFlight);

impl Drop for Completing<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Lets the device write out what the batch (or item) buffered, then puts its completions in
/// the used ring and signals the guest if `needs_notification` says so. In that order: the
/// journal records reach the kernel in one write before the guest sees any of the requests
/// complete, so a killed daemon keeps every completed request.
fn complete(
    dev: &dyn BlockDevice,
    vring: &VringRwLock<GuestMem>,
    mem: &GuestMemoryMmap,
    completions: &[Completion],
    queue: u16,
    warnings: &Warnings,
) -> io::Result<()> {
    dev.end_of_batch();
    {
        let mut state = vring.get_mut();
        let q = state.get_queue_mut();
        // A chain whose handler panicked (a bug, logged by the pool) is not completed.
        for c in completions {
            if let Err(e) = q.add_used(mem, c.head_index, c.used_len) {
                if warnings.first(WARN_ADD_USED) {
                    warn!("queue {queue}: cannot complete chain {}: {e}", c.head_index);
                }
            }
        }
    }
    if vring.needs_notification().unwrap_or(true) {
        vring.signal_used_queue()?;
    }
    Ok(())
}

/// Hands `work` to the queue's helpers, each item completed (and signalled) by the helper
/// that runs it, and holding the queue's in-flight count until then.
fn hand_over(
    pool: &BatchPool,
    exec: Arc<Executor>,
    vring: &VringRwLock<GuestMem>,
    mem: QueueMem,
    in_flight: &Arc<InFlight>,
    work: Vec<Work>,
) {
    debug!(
        "queue {}: {} items handed to the request threads",
        exec.queue,
        work.len()
    );
    in_flight.hold(work.len());
    let held = Arc::clone(in_flight);
    let vring = vring.clone();
    pool.spawn(
        work,
        Arc::new(move |w: Work| {
            let _done = Completing(held.as_ref());
            let completions = exec.work(w);
            if let Err(e) = complete(
                &*exec.dev,
                &vring,
                &mem,
                &completions,
                exec.queue,
                &exec.warnings,
            ) {
                if exec.warnings.first(WARN_ADD_USED) {
                    warn!("queue {}: cannot signal the guest: {e}", exec.queue);
                }
            }
        }),
    );
}

/// Per-queue request counters ([`RequestCtx::index`]). The daemon keeps one set for its whole
/// run, so indices count on across frontend reconnections and a queue and an index name one
/// request of the run (what a record log relies on, docs/record-log.md).
#[derive(Debug, Clone)]
pub struct RequestCounters(Arc<Vec<AtomicU64>>);

impl RequestCounters {
    /// Counters for `queues` queues, all at 0.
    pub fn new(queues: u16) -> Self {
        RequestCounters(Arc::new((0..queues).map(|_| AtomicU64::new(0)).collect()))
    }

    /// The next index of `queue`, or None for a queue it has no counter for.
    fn next(&self, queue: u16) -> Option<u64> {
        self.0
            .get(usize::from(queue))
            .map(|c| c.fetch_add(1, Ordering::Relaxed))
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// A chain as popped from a queue, with the guest memory it refers to.
type Chain = DescriptorChain<QueueMem>;

/// Guest memory as a queue's chains hold it: the queue's own copy of the region table (the
/// regions themselves, and their mappings, are shared), with its reference count on a cache
/// line of its own.
///
/// virtio-queue's `AvailIter` gives every chain a clone of the memory handle it pops with, and
/// the chain drops it when done: two atomic updates of the handle's reference count per
/// request, on the queue's worker and on the request thread that completes it. vm-memory's own
/// handle (`GuestMemoryLoadGuard`, an `Arc<GuestMemoryMmap>`) keeps that count on the cache
/// line of the region table that every guest-address lookup reads, and shares it between
/// queues, so lookups missed whenever another CPU had just taken or dropped a chain (10% of a
/// recording daemon's samples in `to_region_addr`; docs/perf-notes.md, section 35).
#[derive(Clone)]
struct QueueMem(Arc<AlignedMem>);

/// A region table aligned so that, inside its `Arc`, it does not share a cache line (nor the
/// adjacent-line prefetch pair) with the reference counts before it.
#[repr(align(128))]
struct AlignedMem(GuestMemoryMmap);

impl QueueMem {
    fn new(mem: &GuestMemoryMmap) -> Self {
        QueueMem(Arc::new(AlignedMem(mem.clone())))
    }
}

impl std::ops::Deref for QueueMem {
    type Target = GuestMemoryMmap;

    fn deref(&self) -> &GuestMemoryMmap {
        &self.0 .0
    }
}

/// A queue's [`QueueMem`], with the memory snapshot it was copied from (kept, so that the
/// snapshot's address cannot be reused by a later one while it is compared with).
type QueueMemSlot = Mutex<Option<(Arc<GuestMemoryMmap>, QueueMem)>>;

impl BlkBackend {
    /// A backend serving `dev` with guest memory `mem` (the same object given to the
    /// `VhostUserDaemon`), numbering requests from 0.
    pub fn new(
        dev: Arc<dyn BlockDevice>,
        cfg: BackendConfig,
        mem: GuestMem,
    ) -> Result<Self, BackendError> {
        let counters = RequestCounters::new(cfg.num_queues);
        Self::with_counters(dev, cfg, mem, counters)
    }

    /// As [`new`](Self::new), numbering requests on from `counters` (which must have one
    /// counter per queue).
    pub fn with_counters(
        dev: Arc<dyn BlockDevice>,
        cfg: BackendConfig,
        mem: GuestMem,
        counters: RequestCounters,
    ) -> Result<Self, BackendError> {
        if cfg.num_queues == 0 || cfg.num_queues > MAX_QUEUES {
            return Err(BackendError::QueueCount(cfg.num_queues));
        }
        if !cfg.queue_size.is_power_of_two() || cfg.queue_size < 2 {
            return Err(BackendError::QueueSize(cfg.queue_size));
        }
        if cfg.io_threads == 0 || cfg.io_threads > MAX_IO_THREADS {
            return Err(BackendError::IoThreads(cfg.io_threads));
        }
        let pools = (0..cfg.num_queues)
            .map(|q| BatchPool::new(&format!("q{q}-io"), usize::from(cfg.io_threads - 1)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(BackendError::Thread)?;
        let seg_max = u32::from(cfg.queue_size) - 2;
        let limits = Limits {
            seg_max,
            max_dwz_segments: cfg.max_dwz_segments,
            max_dwz_sectors: cfg.max_dwz_sectors,
        };
        let config = BlkConfig::new(&ConfigParams {
            capacity_bytes: dev.capacity(),
            logical_block_size: cfg.logical_block_size,
            physical_block_size: dev.block_size(),
            seg_max,
            num_queues: cfg.num_queues,
            writeback: true,
            max_dwz_sectors: cfg.max_dwz_sectors,
            max_dwz_segments: cfg.max_dwz_segments,
        });
        if counters.len() != usize::from(cfg.num_queues) {
            return Err(BackendError::QueueCount(cfg.num_queues));
        }
        let polls = (0..cfg.num_queues)
            .map(|_| {
                Mutex::new(QueuePoll {
                    window: PollWindow::new(cfg.poll_max),
                    idle_since: None,
                })
            })
            .collect();
        let in_flight = (0..cfg.num_queues).map(|_| Arc::default()).collect();
        let queue_mems = (0..cfg.num_queues).map(|_| Mutex::new(None)).collect();
        let want_rings = cfg.ring_reads && cfg.pipelined() && dev.prefers_batched_reads();
        let ring_reads = (0..cfg.num_queues)
            .map(|q| {
                let ring = want_rings
                    .then(|| match RingReads::new() {
                        Ok(r) => Some(r),
                        Err(e) => {
                            info!("queue {q}: no io_uring ring for reads ({e}); request threads serve them");
                            None
                        }
                    })
                    .flatten();
                (Mutex::new(ring), AtomicBool::new(false))
            })
            .collect();
        Ok(BlkBackend {
            dev,
            cfg,
            limits,
            config: Mutex::new(config),
            mem: RwLock::new(mem),
            event_idx: AtomicBool::new(false),
            // Until FLUSH is negotiated the device must write through (virtio 1.2, 5.2.6.2).
            write_through: AtomicBool::new(true),
            acked_features: AtomicU64::new(0),
            next_index: counters,
            warnings: Arc::default(),
            pools,
            polls,
            in_flight,
            queue_mems,
            ring_reads,
        })
    }

    /// The event the queues' rings of reads are registered under in each worker's event loop
    /// (past the queues' and the exit event's).
    pub fn ring_event(&self) -> u16 {
        self.cfg.num_queues + 1
    }

    /// Per queue with a ring of reads ([`BackendConfig::ring_reads`]): the queue and the
    /// ring's completion eventfd, which the daemon registers with the queue's event loop
    /// under [`ring_event`](Self::ring_event) and then reports with
    /// [`ring_registered`](Self::ring_registered).
    pub fn ring_read_fds(&self) -> Vec<(u16, std::os::fd::RawFd)> {
        self.ring_reads
            .iter()
            .enumerate()
            .filter_map(|(q, (ring, _))| {
                let ring = ring.lock().unwrap_or_else(PoisonError::into_inner);
                Some((u16::try_from(q).ok()?, ring.as_ref()?.event_fd()))
            })
            .collect()
    }

    /// The queue's ring of reads now wakes its worker: from here on the worker uses it.
    pub fn ring_registered(&self, queue: u16) {
        if let Some((_, on)) = self.ring_reads.get(usize::from(queue)) {
            on.store(true, Ordering::Release);
        }
    }

    /// Whether `queue`'s worker puts reads on its ring.
    fn ring_on(&self, queue: u16) -> bool {
        self.ring_reads
            .get(usize::from(queue))
            .is_some_and(|(_, on)| on.load(Ordering::Acquire))
    }

    /// The guest memory `queue`'s chains are to hold: its [`QueueMem`], made anew when the
    /// frontend's memory table has changed since the queue's last batch.
    fn queue_mem(&self, queue: u16) -> io::Result<QueueMem> {
        let current = self
            .mem
            .read()
            .map_err(|_| io::Error::other("guest memory lock poisoned"))?
            .memory();
        let mut slot = self
            .queue_mems
            .get(usize::from(queue))
            .ok_or_else(|| io::Error::other("queue index out of range"))?
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((from, mem)) = slot.as_ref() {
            if std::ptr::eq(Arc::as_ptr(from), &*current) {
                return Ok(mem.clone());
            }
        }
        let from = current.into_inner();
        let mem = QueueMem::new(&from);
        *slot = Some((from, mem.clone()));
        Ok(mem)
    }

    /// The virtio feature bits offered.
    pub fn device_features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE)
            | (1 << VIRTIO_BLK_F_MQ)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.dev.is_read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features.load(Ordering::Acquire) & (1u64 << bit) != 0
    }

    fn exec_params(&self) -> ExecuteParams {
        ExecuteParams {
            limits: self.limits,
            serial: self.cfg.serial,
            write_through: self.write_through.load(Ordering::Acquire),
        }
    }

    /// Executes every available chain of one queue, completes them, and signals the guest once.
    /// A lone request run on this thread waits for the disk polling for up to `disk_poll`
    /// (zero: sleeping). Returns false when the available ring is unusable (the guest
    /// corrupted it): the queue is then left alone, and draining must stop.
    fn process_queue(
        &self,
        vring: &VringRwLock<GuestMem>,
        queue: u16,
        disk_poll: Duration,
    ) -> io::Result<bool> {
        let mem = self.queue_mem(queue)?;
        let in_flight = self
            .in_flight
            .get(usize::from(queue))
            .ok_or_else(|| io::Error::other("queue index out of range"))?;
        let chains: Vec<_> = {
            let mut state = vring.get_mut();
            let q = state.get_queue_mut();
            // Stopped (GET_VRING_BASE): take nothing more.
            if !q.ready() {
                return Ok(false);
            }
            let chains: Vec<_> = match q.iter(mem.clone()) {
                Ok(iter) => iter.collect(),
                Err(e) => {
                    // A corrupt available ring: the guest broke the queue; leave it stalled.
                    if self.warnings.first(WARN_AVAIL) {
                        warn!("queue {queue}: cannot read the available ring: {e}");
                    }
                    return Ok(false);
                }
            };
            // Held while the ring is locked: a stop that marks the queue not ready after
            // this waits for these chains; one before it left them in the ring.
            if !chains.is_empty() {
                in_flight.hold(1);
            }
            chains
        };
        if chains.is_empty() {
            return Ok(true);
        }
        let _completing = Completing(in_flight.as_ref());
        let params = self.exec_params();
        let pool = self
            .pools
            .get(usize::from(queue))
            .ok_or_else(|| io::Error::other("queue index out of range"))?;
        let mut items: Vec<(RequestCtx, Chain)> = Vec::with_capacity(chains.len());
        for chain in chains {
            let index = self
                .next_index
                .next(queue)
                .ok_or_else(|| io::Error::other("queue index out of range"))?;
            items.push((RequestCtx { queue, index }, chain));
        }
        // Reads go on the queue's ring, unless one request is all there is in flight (queue
        // depth 1: it runs here, and waits for the disk polling, below).
        let lone_request = items.len() == 1 && in_flight.holders() == 1;
        if !lone_request && self.ring_on(queue) {
            items = self.submit_ring_reads(vring, queue, &mem, items, &params, in_flight)?;
            if items.is_empty() {
                return Ok(true);
            }
        }
        // A device that does better with batches (O_DIRECT: every transfer waits for the
        // disk; small buffered writes: adjacent new blocks take one system call) gets the
        // batch's reads together and its writes together, each as one item of the pool that
        // one thread serves with one `read_many` or `write_many`. Those items go first, so
        // that the other threads take the single requests while they run.
        let mut work: Vec<Work> = Vec::with_capacity(items.len());
        let pipelined = self.cfg.pipelined();
        let batch_reads = self.dev.prefers_batched_reads();
        // A device that batches no write, not even an empty one, batches none: its chains
        // need not be parsed twice. In write-through mode every write must be flushed on its
        // own before it completes: they stay single requests, spread over the pool.
        let batch_writes = !params.write_through && self.dev.prefers_batched_writes(0);
        if items.len() > 1 && (batch_reads || batch_writes) {
            let mut reads = Vec::new();
            let mut writes = Vec::new();
            let mut singles = Vec::new();
            for (ctx, chain) in items {
                // Only the header's type decides for reads (a read the batch cannot take is
                // answered on its own by `prepare`'s caller); a write's length needs the
                // whole chain parsed, and the parsed request goes with it to `prepare`.
                match peek_type(&chain) {
                    // Pipelined, a read's length decides its part: it is parsed here, and
                    // the parsed request goes with it to `prepare`.
                    Some(VIRTIO_BLK_T_IN) if batch_reads && pipelined => {
                        match parse_read(&chain, &params) {
                            Some(req) => reads.push((ctx, chain, Some(req))),
                            None => singles.push(Work::One(ctx, chain)),
                        }
                    }
                    Some(VIRTIO_BLK_T_IN) if batch_reads => reads.push((ctx, chain, None)),
                    Some(VIRTIO_BLK_T_OUT) if batch_writes => {
                        match parse_write(&chain, &params)
                            .filter(|r| self.dev.prefers_batched_writes(r.data_len))
                        {
                            Some(req) => writes.push((ctx, chain, Some(req))),
                            None => singles.push(Work::One(ctx, chain)),
                        }
                    }
                    _ => singles.push(Work::One(ctx, chain)),
                }
            }
            // Pipelined, a batch's reads go in parts (`read_parts`), each completed when its
            // own reads are done rather than with the slowest of them all; a part of one
            // read too goes as a batch, with the request parsed above.
            for (kind, group) in [(BatchKind::Read, reads), (BatchKind::Write, writes)] {
                if pipelined && kind == BatchKind::Read && group.len() > 1 {
                    for part in read_parts(group, |(_, _, r)| r.as_ref().map_or(0, |r| r.data_len))
                    {
                        work.push(Work::Batch(kind, mem.clone(), part));
                    }
                } else if group.len() > 1 {
                    work.push(Work::Batch(kind, mem.clone(), group));
                } else {
                    singles.extend(group.into_iter().map(|(ctx, c, _)| Work::One(ctx, c)));
                }
            }
            work.extend(singles);
        } else {
            work.extend(items.into_iter().map(|(ctx, c)| Work::One(ctx, c)));
        }
        // A lone request (queue depth 1) runs on this thread, which then waits for its disk
        // transfer polling for `disk_poll` instead of sleeping until the disk's interrupt
        // wakes it (docs/perf-notes.md, section 30). A batch, or this thread's share of one,
        // sleeps: the kernel may need the CPU a spinning worker would hold to carry out the
        // transfers (writes into reserved space run on io_uring's worker threads).
        let lone = work.len() == 1 && matches!(work.first(), Some(Work::One(..)));
        self.dev
            .poll_completions_here(if lone { disk_poll } else { Duration::ZERO });
        let exec = self.executor(queue, params);
        // Pipelined: every item goes to a helper, which completes it on its own, and the
        // worker goes back to the ring. A lone item with nothing else in flight (queue depth
        // 1) still runs here: a hand-over would only add a wake-up to its latency.
        let alone = work.len() == 1 && in_flight.holders() == 1;
        if pipelined && !alone {
            hand_over(pool, exec, vring, mem, in_flight, work);
            return Ok(true);
        }
        // Requests of one batch run in parallel on the queue's pool; they are all completed
        // together below, with one signal.
        let completions: Vec<Completion> = pool
            .run(work, Arc::new(move |w: Work| exec.work(w)))
            .into_iter()
            .flatten()
            .flatten()
            .collect();
        complete(&*self.dev, vring, &mem, &completions, queue, &self.warnings)?;
        Ok(true)
    }

    /// What `queue`'s request threads (and its worker) need to execute its chains.
    fn executor(&self, queue: u16, params: ExecuteParams) -> Arc<Executor> {
        Arc::new(Executor {
            dev: Arc::clone(&self.dev),
            warnings: Arc::clone(&self.warnings),
            params,
            queue,
        })
    }

    /// Puts every read of `items` that the device plans ([`BlockDevice::plan_read`]) on the
    /// queue's ring, each holding the queue's in-flight count until it completes; returns the
    /// other items, for the usual way. Reads the plan served whole (no disk transfer left)
    /// are completed here.
    fn submit_ring_reads(
        &self,
        vring: &VringRwLock<GuestMem>,
        queue: u16,
        mem: &QueueMem,
        items: Vec<(RequestCtx, Chain)>,
        params: &ExecuteParams,
        in_flight: &Arc<InFlight>,
    ) -> io::Result<Vec<(RequestCtx, Chain)>> {
        let Some((slot, _)) = self.ring_reads.get(usize::from(queue)) else {
            return Ok(items);
        };
        let mut guard = slot.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(ring) = guard.as_mut() else {
            return Ok(items);
        };
        let mut rest = Vec::with_capacity(items.len());
        let mut completions = Vec::new();
        for (ctx, chain) in items {
            let planned = match peek_type(&chain) {
                Some(VIRTIO_BLK_T_IN) => parse_read(&chain, params)
                    .and_then(|req| {
                        prepare(
                            &chain,
                            Some(req),
                            mem,
                            &*self.dev,
                            ctx,
                            params,
                            BatchKind::Read,
                        )
                    })
                    .and_then(|p| match self.dev.plan_read(&ctx, p.offset, &p.segs) {
                        Ok(Some(plan)) => Some((p.pending(), plan)),
                        // Not for the ring, or an error the ordinary read reports.
                        Ok(None) | Err(_) => None,
                    }),
                _ => None,
            };
            let Some((pending, plan)) = planned else {
                rest.push((ctx, chain));
                continue;
            };
            if plan.transfers.is_empty() {
                // Served while planning (zeroed blocks): nothing for the disk. Done as a ring
                // read would be (the recorder logs it), or read again the ordinary way.
                if !self.dev.plan_done(&ctx, &plan) {
                    rest.push((ctx, chain));
                    continue;
                }
                let c = finish_pending(&pending, Ok(()), &**mem, &*self.dev);
                self.warnings.completed(queue, ctx.index, &c);
                completions.push(c);
                continue;
            }
            in_flight.hold(1);
            // SAFETY: the plan's iovecs point into guest memory of `chain`'s memory handle
            // (checked by `prepare`), which the ring keeps with the read until its last
            // transfer completed; the handle keeps every region of that memory mapped. The
            // descriptors are the device's, which `self` holds, and `Drop for BlkBackend`
            // drops the rings (waiting for their transfers) before anything else.
            if let Err(((ctx, chain, _), _)) = unsafe { ring.submit((ctx, chain, pending), plan) } {
                in_flight.release();
                rest.push((ctx, chain));
                continue;
            }
            // Each read goes to the disk as soon as it is planned, not with the batch's
            // others: one submission of a whole batch reaches the disk as one burst, which
            // the disk here served a fifth slower than the same reads one after another
            // (docs/perf-notes.md, section 40).
            if let Err(e) = ring.flush() {
                // The entries stay queued: the next flush (next read, or reaping) submits
                // them.
                if self.warnings.first(WARN_RING) {
                    warn!("queue {queue}: cannot submit reads to the ring: {e}");
                }
            }
        }
        let on_ring = ring.len();
        drop(guard);
        debug!("queue {queue}: {on_ring} reads on the ring");
        if !completions.is_empty() {
            complete(&*self.dev, vring, mem, &completions, queue, &self.warnings)?;
        }
        Ok(rest)
    }

    /// Completes the reads of `queue`'s ring whose transfers are all done; a read that did
    /// not complete whole, or that the device does not vouch for ([`BlockDevice::plan_done`]:
    /// a reclaim may have given its blocks back meanwhile), goes to
    /// the helpers to be read again the ordinary way.
    fn reap_ring(&self, vring: &VringRwLock<GuestMem>, queue: u16) -> io::Result<()> {
        let Some((slot, _)) = self.ring_reads.get(usize::from(queue)) else {
            return Ok(());
        };
        // Everything that can fail first: completions taken from the ring must all complete.
        let in_flight = self
            .in_flight
            .get(usize::from(queue))
            .ok_or_else(|| io::Error::other("queue index out of range"))?;
        let pool = self
            .pools
            .get(usize::from(queue))
            .ok_or_else(|| io::Error::other("queue index out of range"))?;
        let mut done: Vec<Done<RingItem>> = Vec::new();
        {
            let mut guard = slot.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(ring) = guard.as_mut() else {
                return Ok(());
            };
            if !ring.completed() {
                return Ok(());
            }
            ring.reap(&mut done);
            // Entries a failed flush left queued.
            let _ = ring.flush();
        }
        if done.is_empty() {
            return Ok(());
        }
        let mem = self.queue_mem(queue);
        let mut completions = Vec::with_capacity(done.len());
        let mut again = Vec::new();
        for Done { item, plan, whole } in done {
            let (ctx, chain, pending) = item;
            if whole && self.dev.plan_done(&ctx, &plan) {
                let c = finish_pending(&pending, Ok(()), chain.memory(), &*self.dev);
                self.warnings.completed(queue, ctx.index, &c);
                completions.push(c);
            } else {
                again.push(Work::One(ctx, chain));
            }
        }
        let n = completions.len() + again.len();
        // Without the queue's memory handle (a poisoned lock, not reached) the reads cannot
        // be handed over or put in the used ring: they are given up, as a batch is when the
        // used ring cannot be written, and the guest's driver times them out.
        let mem = match mem {
            Ok(m) => m,
            Err(e) => {
                for _ in 0..n {
                    in_flight.release();
                }
                return Err(e);
            }
        };
        if !again.is_empty() {
            debug!("queue {queue}: {} ring reads read again", again.len());
            let exec = self.executor(queue, self.exec_params());
            hand_over(pool, exec, vring, mem.clone(), in_flight, again);
        }
        let res = if completions.is_empty() {
            Ok(())
        } else {
            complete(&*self.dev, vring, &mem, &completions, queue, &self.warnings)
        };
        // Released once the used ring has them (a stop waits for that).
        for _ in 0..n {
            in_flight.release();
        }
        res
    }

    /// Processes a queue after a kick; with EVENT_IDX keeps draining until
    /// `enable_notification()` says nothing arrived meanwhile, so no kick is lost. After each
    /// batch the worker first polls the available ring for the queue's adaptive window
    /// ([`super::poll`]), without publishing a new `avail_event`, so a driver that submits
    /// within the window does not kick.
    fn drain(&self, vring: &VringRwLock<GuestMem>, queue: u16) -> io::Result<()> {
        if !self.event_idx.load(Ordering::Acquire) {
            self.process_queue(vring, queue, Duration::ZERO)?;
            return Ok(());
        }
        let poll = self
            .polls
            .get(usize::from(queue))
            .ok_or_else(|| io::Error::other("queue index out of range"))?;
        // Only this queue's worker takes the lock; a panic while holding it left plain data.
        let mut poll = poll.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(since) = poll.idle_since.take() {
            poll.window.observe(since.elapsed());
        }
        loop {
            vring.disable_notification().map_err(io::Error::other)?;
            // A lone request the worker runs itself polls for the disk's completion for the
            // largest window while the queue polls at all (a steady stream keeps its window
            // open, an idle queue closes it): the window's current length follows the
            // guest's turnaround, not the disk's.
            let disk_poll = if poll.window.current().is_zero() {
                Duration::ZERO
            } else {
                self.cfg.poll_max
            };
            if !self.process_queue(vring, queue, disk_poll)? {
                return Ok(());
            }
            self.reap_ring(vring, queue)?;
            let idle_from = Instant::now();
            let window = poll.window.next_window();
            if !window.is_zero() && self.poll_avail(vring, queue, idle_from, window) {
                poll.window.caught(idle_from.elapsed());
                continue;
            }
            if !vring.enable_notification().map_err(io::Error::other)? {
                poll.idle_since = Some(idle_from);
                return Ok(());
            }
            poll.window.observe(idle_from.elapsed());
        }
    }

    /// Spins until the available ring holds a chain the queue has not taken yet, or until
    /// `window` has passed since `from`; says whether one arrived. A ring it cannot read
    /// counts as empty (the next `enable_notification` reports the error). Reads of the
    /// queue's io_uring ring that complete meanwhile are completed at once.
    fn poll_avail(
        &self,
        vring: &VringRwLock<GuestMem>,
        queue: u16,
        from: Instant,
        window: Duration,
    ) -> bool {
        let Ok(mem) = self.mem.read().map(|m| m.memory()) else {
            return false;
        };
        let ring = self.ring_on(queue);
        loop {
            if ring && self.reap_ring(vring, queue).is_err() {
                return false;
            }
            let pending = {
                let state = vring.get_ref();
                let q = state.get_queue();
                match q.avail_idx(&*mem, Ordering::Acquire) {
                    Ok(idx) => idx.0 != q.next_avail(),
                    Err(_) => return false,
                }
            };
            if pending {
                return true;
            }
            if from.elapsed() >= window {
                return false;
            }
            std::hint::spin_loop();
        }
    }
}

/// The polling state of one queue.
#[derive(Debug)]
struct QueuePoll {
    window: PollWindow,
    /// When the queue's worker last went to sleep waiting for a kick.
    idle_since: Option<Instant>,
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMem>;

    fn num_queues(&self) -> usize {
        usize::from(self.cfg.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        self.device_features()
    }

    fn acked_features(&self, features: u64) {
        let previous = self.acked_features.swap(features, Ordering::AcqRel);
        if previous == features {
            // A repeated SET_FEATURES (e.g. around migration logging) changes nothing, and must
            // not undo a cache mode the driver chose through the config space.
            return;
        }
        // Without FLUSH the driver cannot make writes durable: the device must write through.
        let flush = features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        self.write_through.store(!flush, Ordering::Release);
        if let Ok(mut c) = self.config.lock() {
            c.writeback = u8::from(flush);
        }
        info!(
            "negotiated features {features:#x}: event_idx={} indirect={} mq={} flush={} discard={} write_zeroes={} ro={}",
            features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            features & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0,
            features & (1 << VIRTIO_BLK_F_MQ) != 0,
            flush,
            features & (1 << VIRTIO_BLK_F_DISCARD) != 0,
            features & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0,
            features & (1 << VIRTIO_BLK_F_RO) != 0,
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        match self.config.lock() {
            Ok(c) => c.read_window(offset, size),
            Err(_) => Vec::new(),
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if !self.acked(VIRTIO_BLK_F_CONFIG_WCE) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "configuration is read-only without VIRTIO_BLK_F_CONFIG_WCE",
            ));
        }
        let writeback = {
            let mut c = self
                .config
                .lock()
                .map_err(|_| io::Error::other("config lock poisoned"))?;
            c.write_window(offset, buf)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            c.writeback != 0
        };
        let was_through = self.write_through.swap(!writeback, Ordering::AcqRel);
        if !writeback && !was_through {
            // Entering write-through: make what the cache held durable now.
            self.dev
                .flush(&super::INTERNAL_CTX)
                .map_err(io::Error::other)?;
        }
        info!(
            "driver switched the cache to {}",
            if writeback {
                "write-back"
            } else {
                "write-through"
            }
        );
        Ok(())
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        *self
            .mem
            .write()
            .map_err(|_| io::Error::other("guest memory lock poisoned"))? = mem;
        // No queue keeps the old table (and its mappings) alive until its next batch: chains
        // in flight hold their own handle.
        for slot in &self.queue_mems {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
        Ok(())
    }

    /// `GET_VRING_BASE`: the queue is already marked not ready (its worker takes nothing
    /// more); waits until the chains its worker took are in the used ring, so the ring base
    /// the frontend gets accounts for all of them and nothing is written to the ring after.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let Some(f) = usize::try_from(queue_index)
            .ok()
            .and_then(|i| self.in_flight.get(i))
        else {
            return Ok(());
        };
        if f.wait_idle(STOP_WAIT) {
            return Ok(());
        }
        error!(
            "queue {queue_index}: requests still in flight after {} s; cannot stop the ring",
            STOP_WAIT.as_secs()
        );
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("queue {queue_index}: requests still in flight"),
        ))
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.cfg.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without an exit event the worker threads could never be joined.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock<GuestMem>],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unexpected event set {evset:?}"),
            ));
        }
        // One queue per worker thread: the thread index is the queue index.
        let queue = u16::try_from(thread_id)
            .map_err(|_| io::Error::other("worker thread index out of range"))?;
        if device_event == self.ring_event() {
            // Reads of the queue's ring completed.
            if let Some((slot, _)) = self.ring_reads.get(thread_id) {
                if let Some(ring) = slot.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
                    ring.clear_event();
                }
            }
            // The thread's vrings are its queue's alone.
            let vring = vrings
                .first()
                .ok_or_else(|| io::Error::other("worker thread without a queue"))?;
            if let Err(e) = self.reap_ring(vring, queue) {
                if self.warnings.first(WARN_BROKEN) {
                    warn!("queue {queue}: {e}");
                }
            }
            return Ok(());
        }
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("unknown device event {device_event}")))?;
        if let Err(e) = self.drain(vring, queue) {
            // The guest broke its rings (e.g. an unmapped used ring). Keep the worker alive, so
            // the queue works again if the driver resets it, and say so once.
            if self.warnings.first(WARN_BROKEN) {
                warn!("queue {queue}: {e}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn reads_go_in_parts_of_eight_or_of_their_bytes() {
        const K: u64 = 1024;
        let cut = |lens: &[u64]| -> Vec<Vec<u64>> { read_parts(lens.to_vec(), |&n| n) };
        // 4 KiB reads: eight to a part.
        let small = vec![4 * K; 20];
        let parts = cut(&small);
        assert_eq!(
            parts.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![8, 8, 4]
        );
        // Large reads: one to a part; two of 32 KiB fill one.
        assert_eq!(cut(&[128 * K; 3]), vec![vec![128 * K]; 3]);
        assert_eq!(
            cut(&[32 * K, 32 * K, 32 * K]),
            vec![vec![32 * K, 32 * K], vec![32 * K]]
        );
        // Mixed, in order: a large read closes the small ones' part and stands alone.
        assert_eq!(
            cut(&[4 * K, 4 * K, 1024 * K, 4 * K, 60 * K, 8 * K]),
            vec![
                vec![4 * K, 4 * K],
                vec![1024 * K],
                vec![4 * K, 60 * K],
                vec![8 * K]
            ]
        );
        // Lengths that would overflow, and zero-length reads (counted, not weighed).
        assert_eq!(cut(&[u64::MAX, u64::MAX]).len(), 2);
        assert_eq!(
            cut(&[0; 9]).iter().map(Vec::len).collect::<Vec<_>>(),
            vec![8, 1]
        );
        assert!(cut(&[]).is_empty());
        // Every read exactly once, in order.
        let flat: Vec<u64> = cut(&small).into_iter().flatten().collect();
        assert_eq!(flat, small);
    }

    #[test]
    fn a_stop_waits_for_the_mark_to_clear_and_no_longer() {
        let f = Arc::new(InFlight::default());
        // Nothing in flight: no wait.
        assert!(f.wait_idle(Duration::from_secs(10)));
        f.hold(1);
        // Held: the wait gives up at its limit.
        assert!(!f.wait_idle(Duration::from_millis(20)));
        assert_eq!(f.lock().waiting, 0);
        // Cleared while a stop waits: the stop returns at once, long before its limit.
        let waiter = {
            let f = Arc::clone(&f);
            std::thread::spawn(move || {
                let t = Instant::now();
                (f.wait_idle(Duration::from_secs(30)), t.elapsed())
            })
        };
        while f.lock().waiting == 0 {
            std::thread::yield_now();
        }
        f.release();
        assert_eq!(f.holders(), 0);
        let (idle, waited) = waiter.join().unwrap();
        assert!(idle);
        assert!(waited < Duration::from_secs(10), "{waited:?}");
        assert_eq!(f.lock().waiting, 0);
    }
}
