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

/// The most blocks one merged relocation covers (2 MiB of 4 KiB blocks).
const MAX_MERGED_BLOCKS: u64 = 512;

/// Sorts relocation requests by LBA and joins those whose ranges follow each other (up to
/// `max_blocks` blocks per result), so that one relocation writes one longer run with one
/// journal record. A joined request's extents are the concatenation of its parts', with
/// physically contiguous runs at the seams merged, as the map itself would report them
/// (the relocation only commits if the map still resolves to exactly these extents).
/// Exact repeats are dropped; overlapping requests are kept apart (the later one then finds
/// the map changed and does nothing).
fn merge_adjacent(mut reqs: Vec<(Lba, Vec<Extent>)>, max_blocks: u64) -> Vec<(Lba, Vec<Extent>)> {
    reqs.sort_by_key(|(lba, _)| lba.0);
    // The same range read twice before the thread got to it.
    reqs.dedup();
    let mut out: Vec<(Lba, Vec<Extent>, u64)> = Vec::with_capacity(reqs.len());
    for (lba, ex) in reqs {
        let blocks: u64 = ex.iter().map(Extent::blocks).sum();
        if let Some((start, cur, n)) = out.last_mut() {
            if start.0.checked_add(*n) == Some(lba.0) && *n + blocks <= max_blocks {
                for e in ex {
                    match (cur.last_mut(), e) {
                        (
                            Some(Extent::Mapped { pba, blocks: b }),
                            Extent::Mapped {
                                pba: next,
                                blocks: nb,
                            },
                        ) if pba.0.checked_add(*b) == Some(next.0) => *b += nb,
                        _ => cur.push(e),
                    }
                }
                *n += blocks;
                continue;
            }
        }
        out.push((lba, ex, blocks));
    }
    out.into_iter().map(|(lba, ex, _)| (lba, ex)).collect()
}

/// Whether the map still resolves `lba..` to exactly `extents` (what the read saw).
fn is_current(img: &Image, lba: Lba, extents: &[Extent]) -> bool {
    let blocks: u64 = extents.iter().map(Extent::blocks).sum();
    matches!(img.resolve(lba, blocks), Ok(now) if now == extents)
}

/// Relocates a batch of requests: drops those the map no longer matches, joins adjacent
/// ranges ([`merge_adjacent`]) and relocates each result. A stale request (its range was
/// relocated or written since the read) would otherwise make the whole merged relocation it
/// joins find the map changed and do nothing.
fn relocate_batch(img: &Image, mut batch: Vec<(Lba, Vec<Extent>)>) {
    batch.retain(|(lba, ex)| is_current(img, *lba, ex));
    for (lba, ex) in merge_adjacent(batch, MAX_MERGED_BLOCKS) {
        match img.relocate_extents(lba, &ex) {
            Ok(true) => log::trace!("relocated {} runs at LBA {}", ex.len(), lba.0),
            Ok(false) => {}
            Err(e) => log::debug!("relocation at LBA {} failed: {e}", lba.0),
        }
    }
}

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
                while let Ok(first) = rx.recv() {
                    // Take every request already waiting, so that the ranges a sequential
                    // reader asked for one after the other become one relocation.
                    let mut batch = vec![first];
                    while batch.len() < RELOCATION_QUEUE {
                        match rx.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    relocate_batch(&img, batch);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::CreateOptions;
    use crate::units::{BlockSize, Pba};

    fn m(pba: u64, blocks: u64) -> Extent {
        Extent::Mapped {
            pba: Pba(pba),
            blocks,
        }
    }

    #[test]
    fn adjacent_ranges_merge_in_lba_order_and_seams_coalesce() {
        let reqs = vec![
            (Lba(8), vec![m(100, 4), m(7, 4)]),
            (Lba(0), vec![m(50, 2), m(90, 6)]),
            (Lba(16), vec![m(11, 8)]),
        ];
        let got = merge_adjacent(reqs, 512);
        assert_eq!(
            got,
            vec![(Lba(0), vec![m(50, 2), m(90, 6), m(100, 4), m(7, 12)])],
            "0..8 then 8..16 then 16..24; 96..100 and 100.. and 7..11 and 11.. are contiguous"
        );
    }

    #[test]
    fn gaps_overlaps_and_the_size_limit_keep_requests_apart() {
        let reqs = vec![
            (Lba(0), vec![m(10, 8)]),
            (Lba(9), vec![m(30, 8)]),  // gap at 8
            (Lba(9), vec![m(30, 8)]),  // repeated: dropped
            (Lba(12), vec![m(40, 2)]), // overlaps 9..17
            (Lba(17), vec![m(60, 8)]), // does not follow 12..14: a new start
            (Lba(25), vec![m(80, 8)]), // follows 17..25
            (Lba(33), vec![m(90, 8)]), // would take 17.. past 16 blocks
        ];
        let got = merge_adjacent(reqs, 16);
        assert_eq!(
            got,
            vec![
                (Lba(0), vec![m(10, 8)]),
                (Lba(9), vec![m(30, 8)]),
                (Lba(12), vec![m(40, 2)]),
                (Lba(17), vec![m(60, 8), m(80, 8)]),
                (Lba(33), vec![m(90, 8)]),
            ]
        );
    }

    /// Regression (a flaky test): a request made stale by an earlier relocation of its range
    /// joined the fresh requests for the ranges after it, and the merged relocation then found
    /// the map changed and relocated none of them.
    #[test]
    fn a_stale_request_does_not_spoil_the_merged_relocation() {
        let dir = tempfile::tempdir().unwrap();
        let opts = CreateOptions {
            size: 1 << 20,
            block_size: BlockSize::new(4096).unwrap(),
            base: None,
        };
        let img = Image::create(&dir.path().join("r.rrow"), &opts).unwrap();
        // 64 blocks written whole, then every other one overwritten: 64 runs.
        img.write_at(0, &vec![1u8; 64 * 4096]).unwrap();
        for b in (0..64u64).step_by(2) {
            img.write_at(b * 4096, &[2u8; 4096]).unwrap();
        }
        let reqs: Vec<(Lba, Vec<Extent>)> = (0..4u64)
            .map(|i| (Lba(i * 16), img.resolve(Lba(i * 16), 16).unwrap()))
            .collect();
        assert!(reqs.iter().all(|(_, ex)| ex.len() == 16));
        // The first range is relocated on its own; its request, read before that, is stale.
        assert!(img.relocate_extents(reqs[0].0, &reqs[0].1).unwrap());
        relocate_batch(&img, reqs);
        let runs = img.resolve(Lba(0), 64).unwrap();
        assert!(runs.len() <= 2, "{runs:?}");
        let mut got = vec![0u8; 64 * 4096];
        img.read_at(0, &mut got).unwrap();
        for (b, chunk) in got.chunks(4096).enumerate() {
            let want = if b % 2 == 0 { 2 } else { 1 };
            assert!(chunk.iter().all(|&x| x == want), "block {b}");
        }
    }
}
