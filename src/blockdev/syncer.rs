//! The engine's periodic sync on a background thread, shared by
//! [`super::image_dev::ImageDevice`] and [`super::record_dev::RecordingDevice`].
//!
//! A guest that never flushes still gets its data synced after every
//! [`DEFAULT_UNSYNCED_LIMIT`](crate::image::DEFAULT_UNSYNCED_LIMIT) bytes written (so recovery
//! never has more to verify). Run inline, that `fdatasync` of a gigabyte stalls the request
//! that crossed the limit, and with it the whole batch of its queue, for as long as the disk
//! takes. With a [`Syncer`] the request only asks, and this thread syncs while requests go on
//! ([`Image::set_deferred_sync`]; a request still syncs itself at twice the limit).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::image::Image;

/// How often the thread looks at its stop flag while no sync is due.
const STOP_POLL: Duration = Duration::from_millis(500);

/// The background sync thread; stopped and joined on drop (periodic syncs are then inline
/// again).
pub struct Syncer {
    image: Arc<Image>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Starts syncing `image` in the background whenever its unsynced limit is crossed.
    /// `None` for read-only images.
    pub fn start(image: &Arc<Image>) -> std::io::Result<Option<Self>> {
        if image.is_read_only() {
            return Ok(None);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (img, flag) = (Arc::clone(image), Arc::clone(&stop));
        image.set_deferred_sync(true);
        let thread = std::thread::Builder::new()
            .name("rr-row-sync".into())
            .spawn(move || {
                let mut failed = false;
                while !flag.load(Ordering::SeqCst) {
                    match img.wait_sync_due(STOP_POLL) {
                        Ok(true) => log::debug!("periodic sync done"),
                        Ok(false) => {}
                        Err(e) if !failed => {
                            // The engine refuses further changes after a failed sync; the
                            // requests report that themselves.
                            log::warn!("periodic sync failed: {e}");
                            failed = true;
                        }
                        Err(_) => {}
                    }
                }
            });
        match thread {
            Ok(t) => Ok(Some(Syncer {
                image: Arc::clone(image),
                stop,
                thread: Some(t),
            })),
            Err(e) => {
                image.set_deferred_sync(false);
                Err(e)
            }
        }
    }

    /// Stops the thread and waits for it; periodic syncs are inline from then on.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the thread (its wait ends once syncs are no longer deferred).
        self.image.set_deferred_sync(false);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.stop();
    }
}
