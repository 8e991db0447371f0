//! Retention while serving: a background thread that reclaims the history older than the
//! last `keep_seqs` operations (`rr-row serve --retain-seqs N`), shared by
//! [`super::image_dev::ImageDevice`] and [`super::record_dev::RecordingDevice`].
//!
//! Every [`CHECK_EVERY`] the thread looks at the image's seq; once it has moved on by at least
//! a quarter of the window (and [`MIN_STEP`] operations) since the last plan, or no operation
//! came since its previous look (a quiet guest's last states are given back too), it plans a
//! reclaim keeping every state from `seq - keep_seqs` on ([`Image::plan_reclaim`], which only
//! walks the journal written since its previous plan) - but never past the last durable state
//! (it flushes the image itself if the guest has not for [`SYNC_AFTER`]) - and commits it
//! without syncing ([`Image::commit_reclaim_unsynced`]: a sync of its own would write out
//! every dirty page of the image). Once a sync of the image has made the reclaim records
//! durable (the periodic one, a guest flush, or its own after [`SYNC_AFTER`]) it punches the
//! holes, longest runs of at least [`MIN_PUNCH`] first, for at most [`PUNCH_SHARE`] of the
//! time since its previous plan: shorter runs stay reclaimed but allocated until neighbours
//! join them (or an offline `rr-row reclaim` punches every reclaimed block). While
//! recording, the keep-from seq never passes the state the recording started in (the `floor`),
//! so every block the log being written can name stays. Logs of earlier sessions are not
//! known to the daemon: their blocks are only safe if `keep_seqs` reaches back to them (or
//! retention is off, the default).

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::image::{Image, ImageError, ReclaimPlan};
use crate::units::Seq;

/// How often the thread looks at the image's seq.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Shortest run of reclaimed blocks the thread punches: versions superseded at random are
/// single blocks at first; they wait, reclaimed but allocated, until neighbours join them.
pub const MIN_PUNCH: u64 = 256 << 10;

/// Share of the time between two passes the thread may spend punching holes, longest runs
/// first (see `Image::punch_reclaimed_runs_of`: punching every superseded 4 KiB block, one
/// `fallocate` each, cost 4 KiB random writes 70% of their throughput).
pub const PUNCH_SHARE: f64 = 0.5;

/// Most time one pass punches for.
pub const MAX_PUNCH: Duration = Duration::from_secs(3);

/// How long a committed reclaim waits for a sync of the image (the periodic one, or a guest
/// flush) before the thread syncs it itself, to punch its holes.
pub const SYNC_AFTER: Duration = Duration::from_secs(5);

/// Fewest operations between two plans (each plan walks the journal written since the last).
pub const MIN_STEP: u64 = 1024;

/// Why retention could not start.
#[derive(Debug, thiserror::Error)]
pub enum RetainError {
    /// Making earlier reclaims reusable failed.
    #[error("cannot reuse the reclaimed blocks: {0}")]
    Image(#[from] ImageError),
    /// The thread could not be spawned.
    #[error("cannot start the retention thread: {0}")]
    Spawn(#[from] std::io::Error),
}

/// The retention thread; stopped and joined on drop.
pub struct Retainer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

/// A reclaim committed but not yet durable: its holes wait.
struct Pending {
    plan: ReclaimPlan,
    ticket: u64,
    at: Instant,
}

/// The thread's state between passes.
struct State {
    /// Durable reclaims go to the allocator (reuse) instead of being punched.
    reuse: bool,
    keep_seqs: u64,
    floor: Option<Seq>,
    /// Seq and time of the last plan.
    last: u64,
    last_at: Instant,
    /// Seq at the last look.
    seen: u64,
    /// When this thread last flushed the image itself.
    flushed_at: Instant,
    pending: Option<Pending>,
}

impl State {
    /// The state of a thread starting on `image` now.
    fn new(image: &Image, keep_seqs: u64, floor: Option<Seq>, reuse: bool) -> State {
        let seq = image.seq().0;
        State {
            reuse,
            keep_seqs,
            floor,
            last: seq,
            last_at: Instant::now(),
            seen: seq,
            flushed_at: Instant::now(),
            pending: None,
        }
    }

    /// Once the pending reclaim's records are durable (syncing the image itself when no write
    /// has done so for [`SYNC_AFTER`]), hands its runs to the allocator (reuse) or punches
    /// their holes.
    fn settle_pending(&mut self, image: &Image, budget: Duration) -> Result<(), ImageError> {
        let Some(p) = &self.pending else {
            return Ok(());
        };
        if !image.is_durable(p.ticket) {
            if p.at.elapsed() < SYNC_AFTER {
                return Ok(());
            }
            image.sync_journal()?;
        }
        if let Some(p) = self.pending.take() {
            if self.reuse {
                let n = image.reuse_reclaimed(&p.plan.runs)?;
                log::info!("retention: {n} given-back blocks now serve new writes");
            } else {
                image.punch_reclaimed_runs_of(&p.plan, MIN_PUNCH, budget)?;
            }
        }
        Ok(())
    }

    /// One look at the image.
    fn step(&mut self, image: &Image) -> Result<(), ImageError> {
        let seq = image.seq().0;
        let budget = self.last_at.elapsed().mul_f64(PUNCH_SHARE).min(MAX_PUNCH);
        self.settle_pending(image, budget)?;
        // A quiet image (no operation since the last look) is planned for at once: what it
        // has left to give back would otherwise wait for a step's worth of new operations.
        let quiet = seq == self.seen;
        self.seen = seq;
        if self.pending.is_some()
            || (!quiet && seq < self.last.saturating_add((self.keep_seqs / 4).max(MIN_STEP)))
        {
            return Ok(());
        }
        // Only durable states: the reclaim records are not synced here (see
        // `Image::commit_reclaim_unsynced`), so recovery must never fall back before them. A
        // guest that seldom flushes gets a flush from here now and then.
        let target = seq.saturating_sub(self.keep_seqs);
        if target > image.durable_seq().0 && self.flushed_at.elapsed() >= SYNC_AFTER {
            image.flush()?;
            self.flushed_at = Instant::now();
        }
        let mut keep_from = target.min(image.durable_seq().0);
        if let Some(f) = self.floor {
            keep_from = keep_from.min(f.0);
        }
        if keep_from <= image.history_horizon().0 {
            // Nothing durable to give back yet (the guest has not flushed): look again next
            // time, even if the guest writes nothing more, rather than waiting for another
            // step's worth of operations.
            return Ok(());
        }
        self.last = seq;
        self.last_at = Instant::now();
        let plan = image.plan_reclaim(Seq(keep_from), &[])?;
        if plan.blocks == 0 {
            return Ok(());
        }
        let ticket = image.commit_reclaim_unsynced(&plan)?;
        log::info!(
            "retention: gave back {} MiB of versions only states before seq {keep_from} needed",
            plan.bytes >> 20
        );
        self.pending = Some(Pending {
            plan,
            ticket,
            at: Instant::now(),
        });
        Ok(())
    }
}

impl Retainer {
    /// Starts reclaiming `image`'s history older than the last `keep_seqs` operations, never
    /// past seq `floor`. With `reuse`, reclaimed slots go to the image's allocator for new
    /// writes (those reclaimed before the start too) instead of having holes punched over
    /// them. `None` for read-only images.
    pub fn start(
        image: &Arc<Image>,
        keep_seqs: u64,
        floor: Option<Seq>,
        reuse: bool,
    ) -> Result<Option<Self>, RetainError> {
        if image.is_read_only() {
            return Ok(None);
        }
        if reuse {
            image.set_reuse_reclaimed(true);
            let n = image.reuse_all_reclaimed()?;
            if n > 0 {
                log::info!(
                    "retention: {} MiB reclaimed earlier ready for reuse",
                    (n * u64::from(image.block_size().bytes())) >> 20
                );
            }
        }
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (img, flag) = (Arc::clone(image), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("rr-row-retain".into())
            .spawn(move || {
                let mut state = State::new(&img, keep_seqs, floor, reuse);
                let mut failed = false;
                let (m, cv) = &*flag;
                let mut stopped = m.lock().unwrap_or_else(|e| e.into_inner());
                while !*stopped {
                    stopped = cv
                        .wait_timeout(stopped, CHECK_EVERY)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    if *stopped {
                        break;
                    }
                    drop(stopped);
                    match state.step(&img) {
                        Ok(()) => failed = false,
                        Err(e) if !failed => {
                            log::warn!("retention: {e}");
                            failed = true;
                        }
                        Err(_) => {}
                    }
                    stopped = m.lock().unwrap_or_else(|e| e.into_inner());
                }
            })?;
        Ok(Some(Retainer {
            stop,
            thread: Some(thread),
        }))
    }

    /// Stops the thread (after the reclaim it may be running) and waits for it.
    pub fn stop(&mut self) {
        let (m, cv) = &*self.stop;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Retainer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::CreateOptions;
    use crate::units::BlockSize;

    fn image(dir: &std::path::Path) -> Image {
        let opts = CreateOptions {
            size: 1 << 20,
            block_size: BlockSize::new(4096).unwrap(),
            base: None,
        };
        Image::create(&dir.join("r.rrow"), &opts).unwrap()
    }

    fn write_ops(image: &Image, n: u64) {
        let buf = vec![7u8; 4096];
        for i in 0..n {
            image.write_at((i % 256) * 4096, &buf).unwrap();
        }
    }

    /// Regression (a CI failure): a step that found nothing durable used to count as a plan,
    /// so once the guest flushed and went quiet, nothing was given back until it had written
    /// another step's worth of operations.
    #[test]
    fn a_step_without_durable_states_does_not_use_up_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let image = image(dir.path());
        let mut st = State::new(&image, 256, None, false);
        write_ops(&image, 4 * MIN_STEP);
        // Nothing synced yet: nothing to give back.
        st.step(&image).unwrap();
        assert_eq!(image.history_horizon(), Seq(0));
        assert!(st.pending.is_none());
        // The guest flushes and writes nothing more: the next look gives back.
        image.flush().unwrap();
        st.step(&image).unwrap();
        assert_eq!(image.history_horizon(), Seq(4 * MIN_STEP - 256));
        assert!(st.pending.is_some());
    }

    /// Once the guest goes quiet, what is left to give back (less than a step) is given back
    /// at the next look instead of waiting for more operations.
    #[test]
    fn a_quiet_image_is_caught_up_without_a_full_step() {
        let dir = tempfile::tempdir().unwrap();
        let image = image(dir.path());
        let mut st = State::new(&image, 256, None, false);
        write_ops(&image, 2 * MIN_STEP);
        image.flush().unwrap();
        st.step(&image).unwrap();
        assert_eq!(image.history_horizon(), Seq(2 * MIN_STEP - 256));
        // Less than a step more, then a flush: the pending reclaim settles, and with the
        // image quiet the rest is planned.
        write_ops(&image, MIN_STEP / 2);
        image.flush().unwrap();
        st.step(&image).unwrap();
        assert!(st.pending.is_none());
        assert_eq!(image.history_horizon(), Seq(2 * MIN_STEP - 256));
        st.step(&image).unwrap();
        assert_eq!(
            image.history_horizon(),
            Seq(2 * MIN_STEP + MIN_STEP / 2 - 256)
        );
    }
}
