//! The scan queue: lanes in priority order, one entry per digest, and completion
//! notifications for whoever waits on a job.
//!
//! Invariants:
//! - A digest is queued or running at most once, however many times it is asked for; a
//!   request in a higher-priority lane moves a queued digest up (never down), and a
//!   full scan replaces a queued re-match of the same digest.
//! - Workers always take from the highest-priority non-empty lane: manual requests, then
//!   new images, then re-matches after a DB change. Within a lane, first in, first out.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::{Notify, oneshot};

use crate::digest::Digest;
use crate::worker::ScanOutcome;

/// Priority lanes, highest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    /// Asked for by an operator.
    Manual = 0,
    /// New or changed images, failed scans due for a retry.
    New = 1,
    /// Re-matching cached SBOMs after a DB change.
    Rematch = 2,
}

impl Lane {
    pub const ALL: [Lane; 3] = [Lane::Manual, Lane::New, Lane::Rematch];

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Manual => "manual",
            Lane::New => "new",
            Lane::Rematch => "rematch",
        }
    }
}

/// What a job does with its digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// syft from the registry, then grype.
    Scan,
    /// grype on the cached SBOM: no registry traffic.
    Rematch,
}

/// One unit of work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub digest: Digest,
    pub kind: JobKind,
    pub lane: Lane,
}

struct Entry {
    kind: JobKind,
    lane: Lane,
    waiters: Vec<oneshot::Sender<ScanOutcome>>,
}

#[derive(Default)]
struct Inner {
    lanes: [VecDeque<Digest>; 3],
    queued: HashMap<Digest, Entry>,
    running: HashMap<Digest, Vec<oneshot::Sender<ScanOutcome>>>,
    closed: bool,
}

/// The queue shared by the watcher (producer) and the workers (consumers).
#[derive(Default)]
pub struct ScanQueue {
    inner: Mutex<Inner>,
    notify: Notify,
}

impl ScanQueue {
    pub fn new() -> Self {
        ScanQueue::default()
    }

    /// Queues `digest` (or merges with the queued or running entry); the receiver gets
    /// the outcome when the job finishes.
    pub fn push(
        &self,
        digest: Digest,
        kind: JobKind,
        lane: Lane,
    ) -> oneshot::Receiver<ScanOutcome> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        if let Some(waiters) = inner.running.get_mut(&digest) {
            waiters.push(tx);
            return rx;
        }
        let moved = match inner.queued.get_mut(&digest) {
            Some(entry) => {
                entry.waiters.push(tx);
                if kind == JobKind::Scan {
                    entry.kind = JobKind::Scan;
                }
                if lane < entry.lane {
                    let from = entry.lane;
                    entry.lane = lane;
                    Some(from)
                } else {
                    None
                }
            }
            None => {
                inner.queued.insert(
                    digest.clone(),
                    Entry {
                        kind,
                        lane,
                        waiters: vec![tx],
                    },
                );
                inner.lanes[lane as usize].push_back(digest);
                self.notify.notify_one();
                return rx;
            }
        };
        if let Some(from) = moved {
            inner.lanes[from as usize].retain(|d| d != &digest);
            inner.lanes[lane as usize].push_back(digest);
        }
        rx
    }

    /// Takes the next job (highest lane first) and marks it running; waits while empty.
    /// `None` once the queue is closed.
    pub async fn next(&self) -> Option<Job> {
        loop {
            let notified = self.notify.notified();
            if let Some(job) = self.try_next() {
                return Some(job);
            }
            if self.lock().closed {
                return None;
            }
            notified.await;
        }
    }

    /// Takes the next job without waiting.
    pub fn try_next(&self) -> Option<Job> {
        let mut inner = self.lock();
        for lane in Lane::ALL {
            if let Some(digest) = inner.lanes[lane as usize].pop_front() {
                let entry = inner.queued.remove(&digest)?;
                inner.running.insert(digest.clone(), entry.waiters);
                return Some(Job {
                    digest,
                    kind: entry.kind,
                    lane: entry.lane,
                });
            }
        }
        None
    }

    /// Reports a running job's outcome to its waiters.
    pub fn complete(&self, digest: &Digest, outcome: ScanOutcome) {
        let waiters = self.lock().running.remove(digest).unwrap_or_default();
        for w in waiters {
            let _ = w.send(outcome.clone());
        }
        // Wake anyone waiting for the queue to drain.
        self.notify.notify_waiters();
    }

    /// Jobs queued per lane (not counting running ones).
    pub fn depth(&self) -> [(Lane, usize); 3] {
        let inner = self.lock();
        Lane::ALL.map(|l| (l, inner.lanes[l as usize].len()))
    }

    /// Jobs running now.
    pub fn running(&self) -> usize {
        self.lock().running.len()
    }

    /// True when nothing of `lane` is queued or running.
    pub fn lane_idle(&self, lane: Lane) -> bool {
        let inner = self.lock();
        inner.lanes[lane as usize].is_empty()
            && !inner.queued.values().any(|e| e.lane == lane)
            && inner.running.is_empty()
    }

    /// Stops handing out jobs: `next` returns `None` once the lanes are empty or now,
    /// and queued jobs' waiters get [`ScanOutcome::Cancelled`].
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        for lane in inner.lanes.iter_mut() {
            lane.clear();
        }
        for (_, entry) in inner.queued.drain() {
            for w in entry.waiters {
                let _ = w.send(ScanOutcome::Cancelled);
            }
        }
        drop(inner);
        self.notify.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the queue inconsistent in a way
        // that matters more than stopping: recover the guard.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(i: usize) -> Digest {
        Digest::parse(&format!("sha256:{i:064x}")).unwrap()
    }

    #[test]
    fn a_new_image_goes_ahead_of_200_rematches() {
        let q = ScanQueue::new();
        for i in 0..200 {
            drop(q.push(d(i), JobKind::Rematch, Lane::Rematch));
        }
        drop(q.push(d(1000), JobKind::Scan, Lane::New));
        let first = q.try_next().unwrap();
        assert_eq!(first.digest, d(1000));
        assert_eq!(first.kind, JobKind::Scan);
        assert_eq!(
            q.try_next().unwrap().digest,
            d(0),
            "re-matches keep their order"
        );
        drop(q.push(d(2000), JobKind::Scan, Lane::Manual));
        assert_eq!(
            q.try_next().unwrap().digest,
            d(2000),
            "manual goes first of all"
        );
    }

    #[test]
    fn a_digest_is_queued_once_and_moves_up_not_down() {
        let q = ScanQueue::new();
        let _a = q.push(d(1), JobKind::Rematch, Lane::Rematch);
        let _b = q.push(d(2), JobKind::Rematch, Lane::Rematch);
        let _c = q.push(d(1), JobKind::Scan, Lane::New);
        let _e = q.push(d(1), JobKind::Rematch, Lane::Rematch);
        assert_eq!(
            q.depth(),
            [(Lane::Manual, 0), (Lane::New, 1), (Lane::Rematch, 1)]
        );
        let job = q.try_next().unwrap();
        assert_eq!(
            (job.digest, job.kind, job.lane),
            (d(1), JobKind::Scan, Lane::New)
        );
        assert_eq!(q.try_next().unwrap().digest, d(2));
        assert!(q.try_next().is_none());
    }

    #[tokio::test]
    async fn every_waiter_gets_the_outcome_and_a_burst_coalesces() {
        let q = ScanQueue::new();
        let receivers: Vec<_> = (0..1000)
            .map(|_| q.push(d(7), JobKind::Scan, Lane::Manual))
            .collect();
        assert_eq!(q.depth()[0], (Lane::Manual, 1), "1,000 requests, one job");
        let job = q.next().await.unwrap();
        let late = q.push(d(7), JobKind::Scan, Lane::Manual);
        assert!(
            q.try_next().is_none(),
            "running digests are not handed out twice"
        );
        q.complete(
            &job.digest,
            ScanOutcome::Scanned {
                result_file: None,
                matches: 3,
            },
        );
        for rx in receivers.into_iter().chain([late]) {
            assert!(matches!(
                rx.await.unwrap(),
                ScanOutcome::Scanned { matches: 3, .. }
            ));
        }
        assert!(q.lane_idle(Lane::Manual));
    }

    #[tokio::test]
    async fn close_cancels_waiters_and_ends_next() {
        let q = ScanQueue::new();
        let rx = q.push(d(1), JobKind::Scan, Lane::New);
        q.close();
        assert_eq!(rx.await.unwrap(), ScanOutcome::Cancelled);
        assert!(q.next().await.is_none());
    }
}
