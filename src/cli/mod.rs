//! The `rr-row` command line: clap derive definitions and dispatch. Each command's body lives
//! in its own module; this layer only turns arguments into calls of the library.

pub mod image_cmds;
pub mod log_cmds;
pub mod reclaim;
pub mod serve;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::units::parse_size;

/// RR-Row: a redirect-on-write VM disk for record/replay, served over vhost-user-blk.
#[derive(Debug, Parser)]
#[command(name = "rr-row", version, about, propagate_version = true)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Default of `serve --poll-us`.
pub const DEFAULT_POLL_US: u64 = 64;

/// Largest `serve --poll-us`.
pub const MAX_POLL_US: u64 = 10_000;

/// Output format for commands a machine may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    /// Human-readable text.
    #[default]
    Human,
    /// JSON, one document (or one object per line for dumps).
    Json,
}

/// How the daemon records a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum RecordMode {
    /// Reads are logged as block ids (the RR-Row way).
    #[default]
    BlockId,
    /// Reads are logged with their data (what a Raw/QCow2 disk forces a recorder to do).
    Full,
}

/// What a replay does when the guest's requests stop matching the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OnDivergence {
    /// Fail the divergent request and every later one with IOERR.
    #[default]
    Stop,
    /// Serve the divergent request from the image as of the replay point and go on.
    Continue,
}

/// Whether a queue's worker waits for a batch before it takes the next (`serve --pipeline`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Pipeline {
    /// On with `--direct`, off without.
    #[default]
    Auto,
    /// The worker hands each batch to the queue's request threads and takes the next
    /// requests at once; each thread completes what it ran.
    On,
    /// The worker waits until the whole batch is done and completes it together.
    Off,
}

/// Whether pipelined queues keep reads in flight on a ring of their own (`serve --ring-reads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum RingReadsArg {
    /// The queue's worker submits reads to its io_uring ring and completes them as the disk
    /// finishes them.
    #[default]
    On,
    /// Each read goes to a request thread that waits for the disk.
    Off,
}

/// `rr-row` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new image.
    Create(CreateArgs),
    /// Show an image's metadata.
    Info(InfoArgs),
    /// Verify an image: checksums, journal, map and block references.
    Check(CheckArgs),
    /// Write the disk as of a sequence number as a sparse raw file.
    Export(ExportArgs),
    /// List every version a logical block ever had.
    History(HistoryArgs),
    /// Give history nobody needs any more back to the file system (retention).
    Reclaim(ReclaimArgs),
    /// Serve an image over vhost-user-blk.
    Serve(ServeArgs),
    /// Inspect record logs.
    #[command(subcommand)]
    Log(LogCommand),
}

/// Arguments of `rr-row create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Path of the new image (must not exist).
    pub image: PathBuf,
    /// Virtual disk size, with optional K/M/G/T suffix.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Block size in bytes: a power of two from 512 to 64K.
    #[arg(long, default_value = "4096", value_parser = parse_size)]
    pub block_size: u64,
    /// Read-only raw base image: unwritten blocks read from it.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Arguments of `rr-row info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// The image.
    pub image: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Arguments of `rr-row check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The image.
    pub image: PathBuf,
    /// Repair what can be repaired (drop a torn journal tail, rewrite a damaged header copy).
    #[arg(long)]
    pub repair: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Arguments of `rr-row export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The image.
    pub image: PathBuf,
    /// The raw file to write (created or truncated; sparse where the disk reads zeros).
    pub output: PathBuf,
    /// Sequence number to export (default: the current state).
    #[arg(long)]
    pub at: Option<u64>,
    /// Do not show a progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Arguments of `rr-row history`.
#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// The image.
    pub image: PathBuf,
    /// Logical block address (in image blocks).
    #[arg(long)]
    pub lba: u64,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Which states `rr-row reclaim` keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepFrom {
    /// Only the current state.
    Latest,
    /// Every state from this seq on.
    Seq(u64),
}

fn parse_keep_from(s: &str) -> Result<KeepFrom, String> {
    if s == "latest" {
        return Ok(KeepFrom::Latest);
    }
    s.parse::<u64>()
        .map(KeepFrom::Seq)
        .map_err(|_| format!("'{s}' is neither a sequence number nor 'latest'"))
}

/// Arguments of `rr-row reclaim`.
#[derive(Debug, clap::Args)]
pub struct ReclaimArgs {
    /// The image. It must not be served meanwhile (reclaim opens it read-write, which takes
    /// its lock), except with --dry-run.
    pub image: PathBuf,
    /// Keep every state from this sequence number on ('latest': only the current state).
    /// Versions only older states need are given back: `export --at`, `history` content and
    /// replay of logs recorded before it no longer work, except for --keep-log logs.
    #[arg(long, value_parser = parse_keep_from, value_name = "SEQ|latest")]
    pub keep_from: KeepFrom,
    /// A record log that must stay replayable: every block its reads returned is kept,
    /// however old. Repeatable.
    #[arg(long = "keep-log", value_name = "LOG")]
    pub keep_logs: Vec<PathBuf>,
    /// Show what would be given back, change nothing (opens the image read-only).
    #[arg(long)]
    pub dry_run: bool,
    /// Do not show a progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Arguments of `rr-row serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Path of the vhost-user unix socket to listen on.
    #[arg(long)]
    pub socket: PathBuf,
    /// The image to serve.
    #[arg(long)]
    pub image: PathBuf,
    /// Create the image with this size when it does not exist.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Block size used when the image is created.
    #[arg(long, default_value = "4096", value_parser = parse_size)]
    pub block_size: u64,
    /// Number of virtqueues offered (one worker thread each).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Maximum virtqueue size.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// Threads that execute one queue's requests in parallel (the queue's worker plus
    /// helpers); 1 runs them one after the other. Default 4, or the number of CPUs if that is
    /// smaller; 16 with --direct.
    #[arg(long)]
    pub io_threads: Option<u16>,
    /// After each batch, a queue's worker watches the virtqueue for new requests for up to
    /// this long before it sleeps until the guest's next kick (adaptive: the window shrinks
    /// to nothing on a queue whose requests come further apart, and grows back). Saves the
    /// two wake-ups of a kick at low queue depth, at the cost of spinning a CPU meanwhile.
    /// While a queue polls, a lone request (queue depth 1) also waits for the disk by
    /// polling, for up to this long, instead of sleeping (with --direct, where it waits for
    /// the disk). 0 turns polling off; at most 10000.
    #[arg(long, default_value_t = DEFAULT_POLL_US, value_name = "MICROSECONDS")]
    pub poll_us: u64,
    /// Whether a queue's worker takes new requests while a batch still waits for the disk
    /// (each request thread then completes what it ran), or waits for the whole batch.
    /// `auto`: on with --direct, where requests wait for the disk; off without, where the
    /// worker helps copy in the page cache. Needs --io-threads above 1.
    #[arg(long, value_enum, default_value_t = Pipeline::Auto)]
    pub pipeline: Pipeline,
    /// Pipelined (the --direct default), whether a queue's worker keeps reads in flight on an
    /// io_uring ring of its own and completes each as the disk finishes it (on), or hands
    /// each read to a request thread that waits for the disk (off). Reads relocation on read
    /// takes, and reads while replaying or recording in full mode, always go to the request
    /// threads.
    #[arg(long, value_enum, default_value_t = RingReadsArg::On)]
    pub ring_reads: RingReadsArg,
    /// Serve the disk read-only (VIRTIO_BLK_F_RO; writes fail).
    #[arg(long)]
    pub read_only: bool,
    /// Serial number returned for GET_ID (at most 20 bytes).
    #[arg(long)]
    pub serial: Option<String>,
    /// Socket file mode, octal.
    #[arg(long, default_value = "600")]
    pub socket_mode: String,
    /// Relocate on read: a read whose data blocks are spread over at least this many
    /// physically separate runs has them rewritten, by a background thread, as one contiguous
    /// run (content, seq and old block ids are kept; see docs/format.md). 0 turns it off.
    /// Plain serving and --record in block-id mode (the log names the blocks each read used,
    /// which a relocation never frees); not with --replay (read-only).
    #[arg(long, default_value_t = 4, value_name = "RUNS")]
    pub relocate_on_read: usize,
    /// Defragment while idle: once no request has been served for this many milliseconds, a
    /// background thread looks at the 2 MiB windows written since it last looked (every
    /// window once after the start) and rewrites, as one contiguous run, every 128 KiB
    /// piece whose data blocks lie in 4 or more physical runs (adjacent pieces together),
    /// stopping at the next request. Content, seq and old block ids are kept (history and record logs stay
    /// valid), so the file grows by what it rewrites until a reclaim, and the host's disk
    /// sees that I/O while the guest is idle. 0 (the default) turns it off. Same modes as
    /// --relocate-on-read.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub defrag_idle_ms: u64,

    /// The most the idle defragmenter (--defrag-idle-ms) rewrites, in MiB per second on
    /// average, for hosts whose disk is shared; 0 (the default): no limit.
    #[arg(
        long,
        default_value_t = 0,
        value_name = "MIB_PER_S",
        requires = "defrag_idle_ms"
    )]
    pub defrag_rate: u64,
    /// Retention while serving: a background thread gives back the versions that only states
    /// older than the last N operations need (as `rr-row reclaim --keep-from SEQ-N` would),
    /// checking every second and reclaiming once the seq has moved on by N/4 (at least 1024).
    /// While recording, no state from the one the recording started in is given up. Record
    /// logs of earlier sessions stay replayable only while N reaches back to them. 0 (the
    /// default) keeps every version.
    #[arg(long, default_value_t = 0, value_name = "N", conflicts_with_all = ["replay", "read_only"])]
    pub retain_seqs: u64,
    /// With --retain-seqs: punch holes over reclaimed blocks (runs of 256 KiB or more, as time
    /// allows) instead of reusing them for new writes. Reuse, the default, keeps the file at
    /// its high-water mark and writes into blocks it already has; punching returns space to
    /// the file system but costs a `fallocate` per run (docs/perf-notes.md).
    #[arg(long, requires = "retain_seqs")]
    pub punch_reclaimed: bool,
    /// Keep this much of the image file ahead of its end reserved (`fallocate`, from a
    /// background thread), so that appended writes land inside the file: buffered, they skip
    /// the size update of an extending write; with --direct, ext4 runs them in parallel. 0
    /// turns it off. The file is up to this much longer than its data.
    #[arg(long, value_parser = parse_size, value_name = "SIZE", default_value = "64M")]
    pub preallocate: u64,
    /// Also read the reserved range into the page cache (buffered I/O only), so that small
    /// writes copy into prepared pages: faster random and mixed writes where fresh memory is
    /// dear (a VM whose balloon reports free pages), but the prepared pages are small folios,
    /// which slow later large reads of that data, and the thread takes CPU while writes
    /// stream (docs/perf-notes.md, sections 2 and 31).
    #[arg(long, conflicts_with = "direct")]
    pub preallocate_cached: bool,
    /// Leave superseded block versions (overwritten, discarded or relocated data) in the
    /// host page cache. By default a background thread drops them once a sync has made them
    /// clean, so their pages serve new writes (docs/perf-notes.md); history reads of them
    /// then come from the disk.
    #[arg(long)]
    pub keep_superseded_cached: bool,
    /// Record every completed request to this log.
    #[arg(long, conflicts_with = "replay")]
    pub record: Option<PathBuf>,
    /// What a recorded read costs the log.
    #[arg(long, value_enum, default_value_t, requires = "record")]
    pub record_mode: RecordMode,
    /// Replay a record log: reads are served from the recorded blocks.
    #[arg(long)]
    pub replay: Option<PathBuf>,
    /// What to do when the replayed guest diverges from the log.
    #[arg(long, value_enum, default_value_t, requires = "replay")]
    pub on_divergence: OnDivergence,
    /// Exit after the first frontend disconnects instead of waiting for the next one.
    #[arg(long)]
    pub once: bool,
    /// Read and write data blocks with O_DIRECT, keeping them out of the host page cache
    /// (the journal stays buffered and is synced as usual; see docs/usage.md).
    #[arg(long)]
    pub direct: bool,
}

/// `rr-row log` subcommands.
#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Header, record counts, bytes by kind, and the cost of the same run in full mode.
    Info {
        /// The record log.
        log: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// One line per record.
    Dump {
        /// The record log.
        log: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Create(a) => image_cmds::create(&a),
        Command::Info(a) => image_cmds::info(&a),
        Command::Check(a) => image_cmds::check(&a),
        Command::Export(a) => image_cmds::export(&a),
        Command::History(a) => image_cmds::history(&a),
        Command::Reclaim(a) => reclaim::reclaim(&a),
        Command::Serve(a) => serve::serve(&a),
        Command::Log(LogCommand::Info { log, output }) => log_cmds::info(&log, output),
        Command::Log(LogCommand::Dump { log, output }) => log_cmds::dump(&log, output),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rr-row: {e:#}");
            1
        }
    }
}

/// The error type of command bodies: a message for the user, printed as one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

impl CliError {
    /// Wraps any displayable error, prefixed with context.
    pub fn ctx(context: impl std::fmt::Display, e: impl std::fmt::Display) -> Self {
        CliError(format!("{context}: {e}"))
    }
}

/// A byte-count progress bar on stderr (`label` before the bar), hidden with `--quiet` or when
/// stderr is not a terminal.
pub(crate) fn progress_bar(quiet: bool, total: u64, label: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(total);
    b.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{label}{{bar:40}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b
}

/// The result of a command body: the exit code on success.
pub type CliResult = Result<i32, CliError>;
