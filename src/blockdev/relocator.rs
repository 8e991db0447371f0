//! Background relocation of fragmented ranges, shared by [`super::image_dev::ImageDevice`] and
//! [`super::record_dev::RecordingDevice`].
//!
//! A read that found its data spread over many physical runs hands those extents to a
//! background thread, which relocates them into one contiguous run
//! ([`Image::relocate_extents`]) while the guest's read has long completed: the read itself
//! costs nothing more, and the next read of that range is one system call. A relocation never
//! frees or changes an old block, so record logs that name the old blocks stay valid.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::image::{Extent, Image};
use crate::units::Lba;

/// Relocation requests waiting for the background thread; more are dropped (a later read of
/// the same range asks again).
const RELOCATION_QUEUE: usize = 64;

/// The background relocation thread and its queue; stopped and joined on drop.
pub struct Relocator {
    min_runs: usize,
    block_size: u64,
    tx: Option<SyncSender<(Lba, Vec<Extent>)>>,
    thread: Option<JoinHandle<()>>,
}

impl Relocator {
    /// Starts relocating, for `image`, every range a read found spread over at least
    /// `min_runs` physical runs of data blocks. `None` for read-only images and `min_runs`
    /// below 2.
    pub fn start(image: &Arc<Image>, min_runs: usize) -> std::io::Result<Option<Self>> {
        if min_runs < 2 || image.is_read_only() {
            return Ok(None);
        }
        let (tx, rx) = sync_channel::<(Lba, Vec<Extent>)>(RELOCATION_QUEUE);
        let img = Arc::clone(image);
        let thread = std::thread::Builder::new()
            .name("rr-row-relocate".into())
            .spawn(move || {
                for (lba, ex) in rx {
                    match img.relocate_extents(lba, &ex) {
                        Ok(true) => log::trace!("relocated {} runs at LBA {}", ex.len(), lba.0),
                        Ok(false) => {}
                        Err(e) => log::debug!("relocation at LBA {} failed: {e}", lba.0),
                    }
                }
            })?;
        Ok(Some(Relocator {
            min_runs,
            block_size: image.block_size().bytes_u64(),
            tx: Some(tx),
            thread: Some(thread),
        }))
    }

    /// The fewest runs that make a read's range worth relocating.
    pub fn min_runs(&self) -> usize {
        self.min_runs
    }

    /// Offers the extents `trace` that a completed read at byte `offset` found; queued when
    /// they are enough data-block runs, dropped when the queue is full.
    pub fn offer(&self, offset: u64, trace: &[Extent]) {
        if trace.len() < self.min_runs || !trace.iter().all(|e| matches!(e, Extent::Mapped { .. }))
        {
            return;
        }
        let lba = Lba(offset / self.block_size);
        if let Some(tx) = &self.tx {
            match tx.try_send((lba, trace.to_vec())) {
                Ok(()) | Err(TrySendError::Full(_)) => {}
                Err(TrySendError::Disconnected(_)) => log::debug!("relocation thread gone"),
            }
        }
    }

    /// Stops the thread (after the relocations already queued) and waits for it.
    pub fn stop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Relocator {
    fn drop(&mut self) {
        self.stop();
    }
}
