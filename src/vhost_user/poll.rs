//! Adaptive polling of a queue between batches.
//!
//! After a batch completes, a queue's worker may spin for a short window watching the available
//! ring instead of going back to sleep on the kick eventfd. A request that arrives inside the
//! window is picked up without the two wake-ups a kick costs (the guest's `write` to the
//! eventfd and the worker's return from `epoll_wait`, each an IPI to an idle vCPU on a
//! virtualised host), and while the worker polls it does not publish a new `avail_event`, so
//! with VIRTIO_RING_F_EVENT_IDX the driver does not kick at all.
//!
//! Spinning costs CPU, so the window adapts like QEMU's AioContext polling
//! (`util/aio-posix.c`, `adjust_polling_time`): `idle` is the time from the end of a batch to
//! the arrival of the next request (polled or kicked). If it fits in the current window,
//! nothing changes; if it is longer than the largest window, polling could not have caught it,
//! and the window shrinks (halves, down to zero); in between, the window grows (doubles from
//! [`GROW_START`], up to the largest window). A queue that is idle for long stretches therefore
//! stops spinning after a few batches, and a queue with a steady QD1 stream polls.
//!
//! Once the window is zero the worker sleeps after every batch, and the idle time it observes
//! then includes its own wake-up and the driver's (two wake-ups of halted vCPUs): a QD1 stream
//! whose turnaround polling would catch can look longer than the largest window, and the window
//! never grows back (measured: QD1 runs stuck at a 30 us p50 against 15 us with polling, in
//! one run out of three). So a zero window probes: every [`PROBE_EVERY`]th batch polls for the
//! largest window, and a request caught by a probe restores it.

use std::time::Duration;

/// First non-zero window when polling starts to grow.
pub const GROW_START: Duration = Duration::from_micros(4);

/// A zero window polls for the largest window once every this many batches.
pub const PROBE_EVERY: u32 = 32;

/// The adaptive polling window of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollWindow {
    max: Duration,
    current: Duration,
    /// Batches since the last probe (only counted while the window is zero).
    since_probe: u32,
}

impl PollWindow {
    /// A window that may grow to `max` (zero turns polling off); it starts at `max`.
    pub fn new(max: Duration) -> Self {
        PollWindow {
            max,
            current: max,
            since_probe: 0,
        }
    }

    /// How long to poll after the batch that just ended: the current window, or the largest
    /// one for a probe (every [`PROBE_EVERY`]th batch while the window is zero).
    pub fn next_window(&mut self) -> Duration {
        if self.current.is_zero() && !self.max.is_zero() {
            self.since_probe += 1;
            if self.since_probe >= PROBE_EVERY {
                self.since_probe = 0;
                return self.max;
            }
        }
        self.current
    }

    /// A request arrived `idle` after the batch while polling: a probe that caught one (longer
    /// than the current window) restores the largest window; otherwise as [`observe`](Self::observe).
    pub fn caught(&mut self, idle: Duration) {
        if idle > self.current && idle <= self.max {
            self.current = self.max;
        } else {
            self.observe(idle);
        }
    }

    /// How long to poll after the next batch.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// Whether polling is configured at all.
    pub fn enabled(&self) -> bool {
        !self.max.is_zero()
    }

    /// Adapts the window to an observed idle time (end of a batch to the next request).
    pub fn observe(&mut self, idle: Duration) {
        if idle <= self.current {
            // Polling caught it (or would have): the sweet spot.
        } else if idle > self.max {
            self.current /= 2;
            if self.current < GROW_START {
                self.current = Duration::ZERO;
            }
        } else if self.current < self.max {
            self.current = if self.current.is_zero() {
                GROW_START
            } else {
                self.current * 2
            }
            .min(self.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn zero_max_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        assert!(!w.enabled());
        for idle in [0, 1, 3, 100] {
            w.observe(us(idle));
            assert_eq!(w.current(), Duration::ZERO);
        }
    }

    #[test]
    fn long_idle_times_shrink_the_window_to_zero() {
        let mut w = PollWindow::new(us(64));
        let mut seen = vec![w.current()];
        while !w.current().is_zero() {
            w.observe(us(1000));
            seen.push(w.current());
        }
        assert_eq!(seen, vec![us(64), us(32), us(16), us(8), us(4), us(0)]);
    }

    #[test]
    fn idle_times_within_the_max_grow_it_back_but_not_past_the_max() {
        let mut w = PollWindow::new(us(50));
        for _ in 0..10 {
            w.observe(us(1000));
        }
        assert_eq!(w.current(), Duration::ZERO);
        let mut seen = Vec::new();
        for _ in 0..6 {
            w.observe(us(40));
            seen.push(w.current());
        }
        assert_eq!(seen, vec![us(4), us(8), us(16), us(32), us(50), us(50)]);
    }

    #[test]
    fn a_zero_window_probes_and_a_caught_probe_restores_polling() {
        let mut w = PollWindow::new(us(64));
        for _ in 0..10 {
            w.observe(us(1000));
        }
        assert_eq!(w.current(), Duration::ZERO);
        let windows: Vec<Duration> = (0..PROBE_EVERY).map(|_| w.next_window()).collect();
        assert!(windows[..PROBE_EVERY as usize - 1]
            .iter()
            .all(|d| d.is_zero()));
        assert_eq!(windows[PROBE_EVERY as usize - 1], us(64));
        // The probe caught a request 20 us after the batch: polling is back at its largest.
        w.caught(us(20));
        assert_eq!(w.current(), us(64));
        assert_eq!(w.next_window(), us(64));
        // A probe that catches nothing leaves the window at zero (the sleep is observed as
        // usual, longer than the largest window).
        let mut w = PollWindow::new(us(64));
        for _ in 0..10 {
            w.observe(us(1000));
        }
        for _ in 0..PROBE_EVERY {
            w.next_window();
        }
        w.observe(us(200));
        assert_eq!(w.current(), Duration::ZERO);
        // Polling off stays off.
        let mut off = PollWindow::new(Duration::ZERO);
        assert!((0..100).all(|_| off.next_window().is_zero()));
    }

    #[test]
    fn idle_times_inside_the_window_change_nothing() {
        let mut w = PollWindow::new(us(32));
        w.observe(us(1000));
        assert_eq!(w.current(), us(16));
        for idle in [0, 5, 16] {
            w.observe(us(idle));
            assert_eq!(w.current(), us(16));
        }
    }
}
