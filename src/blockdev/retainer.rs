//! Retention while serving: a background thread that reclaims the history older than the
//! last `keep_seqs` operations (`rr-row serve --retain-seqs N`), shared by
//! [`super::image_dev::ImageDevice`] and [`super::record_dev::RecordingDevice`].
//!
//! Every [`CHECK_EVERY`] the thread looks at the image's seq; once it has moved on by at least
//! a quarter of the window (and [`MIN_STEP`] operations) since the last plan, it plans a
//! reclaim keeping every state from `seq - keep_seqs` on ([`Image::plan_reclaim`], which only
//! walks the journal written since its previous plan), commits it and punches the holes. While
//! recording, the keep-from seq never passes the state the recording started in (the `floor`),
//! so every block the log being written can name stays. Logs of earlier sessions are not
//! known to the daemon: their blocks are only safe if `keep_seqs` reaches back to them (or
//! retention is off, the default).

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::image::Image;
use crate::units::Seq;

/// How often the thread looks at the image's seq.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Fewest operations between two plans (each plan walks the journal written since the last).
pub const MIN_STEP: u64 = 1024;

/// The retention thread; stopped and joined on drop.
pub struct Retainer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

/// What the thread does each time it looks; returns the seq it planned at, if it did.
fn step(image: &Image, keep_seqs: u64, floor: Option<Seq>, last: u64) -> Option<u64> {
    let seq = image.seq().0;
    let window_step = (keep_seqs / 4).max(MIN_STEP);
    if seq < last.saturating_add(window_step) {
        return None;
    }
    let mut keep_from = seq.saturating_sub(keep_seqs);
    if let Some(f) = floor {
        keep_from = keep_from.min(f.0);
    }
    if keep_from <= image.history_horizon().0 {
        return Some(seq);
    }
    let run = || -> Result<u64, crate::image::ImageError> {
        let plan = image.plan_reclaim(Seq(keep_from), &[])?;
        if plan.blocks > 0 {
            image.commit_reclaim(&plan)?;
            image.punch_reclaimed(&plan, &mut |_, _| {})?;
        }
        Ok(plan.bytes)
    };
    match run() {
        Ok(bytes) if bytes > 0 => log::info!(
            "retention: gave back {} MiB of versions only states before seq {keep_from} needed",
            bytes >> 20
        ),
        Ok(_) => {}
        Err(e) => log::warn!("retention: reclaim before seq {keep_from} failed: {e}"),
    }
    Some(seq)
}

impl Retainer {
    /// Starts reclaiming `image`'s history older than the last `keep_seqs` operations, never
    /// past seq `floor`. `None` for read-only images.
    pub fn start(
        image: &Arc<Image>,
        keep_seqs: u64,
        floor: Option<Seq>,
    ) -> std::io::Result<Option<Self>> {
        if image.is_read_only() {
            return Ok(None);
        }
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (img, flag) = (Arc::clone(image), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("rr-row-retain".into())
            .spawn(move || {
                let mut last = img.seq().0;
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
                    if let Some(s) = step(&img, keep_seqs, floor, last) {
                        last = s;
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
