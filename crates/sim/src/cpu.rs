//! The CPU model: pools of cores shared by processor sharing on virtual time.
//!
//! ```text
//!   job (CPU seconds of work) ──submit──► pool (C cores, n jobs running)
//!       every running job progresses at rate min(1, C / n) core
//!       (a job is one thread's work: it never uses more than one core)
//!   virtual clock V of the pool: dV/dt = min(1, C / n)
//!       a job submitted at V0 with work w finishes when V = V0 + w
//!       ─► a heap of finish tags; only the smallest is scheduled
//! ```
//!
//! Every job of a pool runs at the same rate, so one virtual clock per pool
//! orders all of them: submitting or finishing a job settles V, changes n,
//! and reschedules the pool's next completion (an event carrying the pool's
//! version; stale ones are ignored). Each event costs O(log jobs). Ties are
//! broken by submission order, so the model stays deterministic.
//!
//! Pools: in the default layout every host and every origin has its own pool
//! (`CpuModel::host_cores` cores each, a real deployment); with
//! `CpuModel::shared_cores` set, every node's jobs go into one pool (a local
//! cluster where every process shares one machine's cores).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// A job's finish tag on its pool's virtual clock (ns of CPU work).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tag(f64);
impl Eq for Tag {}
impl PartialOrd for Tag {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Tag {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[derive(Debug)]
struct Pool {
    cores: f64,
    /// (finish tag, submission sequence, job handle)
    jobs: BinaryHeap<Reverse<(Tag, u64, u32)>>,
    /// Work (ns) done by every job that ran since the pool was last idle.
    vclock: f64,
    /// Virtual time (ns) `vclock` was settled at.
    last: u64,
    /// Bumped whenever the scheduled completion changes.
    version: u32,
}

impl Pool {
    fn rate(&self) -> f64 {
        let n = self.jobs.len() as f64;
        if n == 0.0 {
            0.0
        } else {
            (self.cores / n).min(1.0)
        }
    }

    fn settle(&mut self, now: u64) {
        let dt = now.saturating_sub(self.last) as f64;
        self.vclock += dt * self.rate();
        self.last = now;
    }

    /// The time of the next completion, with a new version.
    fn schedule(&mut self, now: u64) -> Option<u64> {
        self.version = self.version.wrapping_add(1);
        let Reverse((Tag(tag), _, _)) = *self.jobs.peek()?;
        let left = (tag - self.vclock).max(0.0);
        let dt = (left / self.rate()).ceil();
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let dt = if dt.is_finite() {
            dt.min(1e18) as u64
        } else {
            0
        };
        Some(now + dt)
    }
}

/// A completion the engine must schedule: (time ns, pool, version).
pub(crate) type CpuWake = (u64, u32, u32);

/// The pools and their running jobs.
#[derive(Debug)]
pub(crate) struct Cpu {
    pools: Vec<Pool>,
    seq: u64,
    /// CPU work submitted, ns.
    pub work_ns: f64,
    /// Jobs submitted.
    pub jobs: u64,
}

impl Cpu {
    /// `pools` pools of `cores` cores each.
    pub fn new(pools: usize, cores: f64) -> Self {
        Self {
            pools: (0..pools)
                .map(|_| Pool {
                    cores,
                    jobs: BinaryHeap::new(),
                    vclock: 0.0,
                    last: 0,
                    version: 0,
                })
                .collect(),
            seq: 0,
            work_ns: 0.0,
            jobs: 0,
        }
    }

    /// Starts a job of `work_ns` on `pool` at `now`; `handle` comes back
    /// when it finishes. Returns the pool's new wake-up to schedule.
    pub fn submit(&mut self, pool: u32, work_ns: f64, handle: u32, now: u64) -> Option<CpuWake> {
        let p = self.pools.get_mut(pool as usize)?;
        p.settle(now);
        if p.jobs.is_empty() {
            // Idle: restart the clock, so it never grows without bound.
            p.vclock = 0.0;
        }
        self.seq += 1;
        self.jobs += 1;
        self.work_ns += work_ns;
        p.jobs.push(Reverse((
            Tag(p.vclock + work_ns.max(0.0)),
            self.seq,
            handle,
        )));
        let at = p.schedule(now)?;
        Some((at, pool, p.version))
    }

    /// The pool's wake-up at `now` (if `version` is current): the handles
    /// of the jobs that finished, in order, and the next wake-up.
    pub fn wake(
        &mut self,
        pool: u32,
        version: u32,
        now: u64,
        done: &mut Vec<u32>,
    ) -> Option<CpuWake> {
        let p = self.pools.get_mut(pool as usize)?;
        if p.version != version {
            return None;
        }
        p.settle(now);
        // Within a nanosecond of rounding: the wake-up time was rounded up.
        let eps = 1.0 + p.vclock.abs() * 1e-12;
        while let Some(&Reverse((Tag(tag), _, h))) = p.jobs.peek() {
            if tag > p.vclock + eps {
                break;
            }
            p.jobs.pop();
            done.push(h);
        }
        let at = p.schedule(now)?;
        Some((at, pool, p.version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the pool until idle; returns (handle, finish time).
    fn drain(cpu: &mut Cpu, mut wake: Vec<CpuWake>) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        while let Some(i) = (0..wake.len()).min_by_key(|&i| (wake[i].0, i)) {
            let (t, pool, v) = wake.swap_remove(i);
            let mut done = Vec::new();
            if let Some(w) = cpu.wake(pool, v, t, &mut done) {
                wake.push(w);
            }
            out.extend(done.into_iter().map(|h| (h, t)));
        }
        out
    }

    #[test]
    fn one_job_runs_at_one_core() {
        let mut cpu = Cpu::new(1, 2.0);
        let w = cpu.submit(0, 1000.0, 7, 0).unwrap();
        assert_eq!(drain(&mut cpu, vec![w]), vec![(7, 1000)]);
    }

    #[test]
    fn processor_sharing_on_two_cores() {
        // Four equal jobs on two cores: each at half a core, all done at 2x.
        let mut cpu = Cpu::new(1, 2.0);
        let mut wakes = Vec::new();
        for h in 0..4 {
            wakes.extend(cpu.submit(0, 1000.0, h, 0));
        }
        let done = drain(&mut cpu, wakes);
        assert_eq!(done.len(), 4);
        assert!(done.iter().all(|&(_, t)| t == 2000), "{done:?}");
        // A short job and a long one on one core: the short one finishes at
        // 2 x its work, the long one at the sum.
        let mut cpu = Cpu::new(1, 1.0);
        let a = cpu.submit(0, 100.0, 1, 0);
        let b = cpu.submit(0, 300.0, 2, 0);
        let done = drain(&mut cpu, a.into_iter().chain(b).collect());
        assert_eq!(done, vec![(1, 200), (2, 400)]);
        // A job arriving later shares from then on.
        let mut cpu = Cpu::new(1, 1.0);
        let a = cpu.submit(0, 1000.0, 1, 0).unwrap();
        let b = cpu.submit(0, 200.0, 2, 500).unwrap();
        // At 500: job 1 has 500 left, job 2 200; sharing, job 2 done at 900,
        // job 1 has 300 left then, done at 1200.
        let done = drain(&mut cpu, vec![a, b]);
        assert_eq!(done, vec![(2, 900), (1, 1200)]);
    }
}
