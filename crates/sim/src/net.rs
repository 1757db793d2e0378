//! The network model: per-node uplinks and downlinks shared max-min fairly.
//!
//! ```text
//!   node A uplink ──┐                     ┌──► node C downlink
//!   (cap up[A])     ├── pair A→C (FIFO) ──┤
//!                   └── pair A→D ─────────┼──► node D downlink
//!   node B uplink ───── pair B→C ─────────┘
//!
//!   a pair = the connection(s) between a source and one receiver: it sends
//!   its queued transfers one after the other at the pair's rate; the rates
//!   of all busy pairs are max-min fair over the links (progressive filling):
//!     repeat: the link with the least (free capacity / busy pairs on it) is
//!             the bottleneck; its pairs get that share; take it off their
//!             other link; until every busy pair has a rate
//! ```
//!
//! Rates change only when a pair becomes busy or idle (a pair that goes on to
//! its next queued transfer keeps its rate). Max-min rates split over the
//! connected components of busy pairs (pairs linked by shared links), so a
//! recomputation walks out from the links that changed and redoes only their
//! components: exact, and cheap while busy pairs form small clusters (a
//! tree), as costly as a global pass when they do not (one busy origin).
//! Optionally (`rate_interval` above zero) recomputations are coalesced to
//! one per interval; in between, a pair that becomes busy takes the capacity
//! still free on both its links (never more than a link can carry). A pair whose rate
//! changes keeps the bytes already sent: its remaining bytes are settled at
//! the old rate and its completion rescheduled (the old event carries a stale
//! version and is ignored).
//!
//! Bytes are counted at both ends (sent by the source, received by the
//! receiver) as transfers complete or are cut off by a death.
//!
//! Optionally (`burst` above zero) every link is a token bucket like the
//! `tc tbf` shaping of `virtman storm --netns` (rate, and a bucket of
//! `burst` bytes): an idle link refills its bucket at its rate; a pair that
//! becomes busy while both its links are idle sends the first bytes its
//! links' buckets hold at once, the rest at its max-min rate. Busy links
//! neither refill nor spend their buckets (an approximation: a real bucket
//! refills by whatever the link leaves unused). Real NICs have no such
//! bucket, so it is off by default.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

/// One queued transfer: the reply to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transfer {
    /// The request it answers.
    pub req: u32,
    /// That request's generation (stale if the slot was reused).
    pub req_gen: u32,
    /// Bytes on the wire.
    pub bytes: u64,
}

#[derive(Debug)]
struct Pair {
    src: u32,
    dst: u32,
    queue: VecDeque<Transfer>,
    /// Bytes per second; 0 while waiting for a recomputation.
    rate: f64,
    /// Bytes of the head transfer not sent as of `last`.
    remaining: f64,
    /// Virtual time (ns) `remaining` was settled at.
    last: u64,
    /// Bumped whenever the scheduled completion changes.
    version: u32,
    /// Position in `Net::active` while busy.
    active: Option<u32>,
    /// Positions in the busy lists of its uplink and downlink.
    at_up: u32,
    at_down: u32,
    /// The recomputation that last collected it.
    mark: u64,
}

/// A completion the engine must schedule: (time ns, pair, version).
pub(crate) type Completion = (u64, u32, u32);

/// Total-order wrapper for the progressive-filling heap.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Share(f64);
impl Eq for Share {}
impl PartialOrd for Share {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Share {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The links, the pairs and their rates.
#[derive(Debug)]
pub(crate) struct Net {
    nodes: usize,
    /// Capacity in bytes/s: uplinks at `0..nodes`, downlinks at `nodes..2*nodes`.
    cap: Vec<f64>,
    used: Vec<f64>,
    /// Busy pairs on each link.
    on_link: Vec<Vec<u32>>,
    /// Links whose set of busy pairs changed since the last recomputation.
    changed: Vec<u32>,
    pairs: Vec<Pair>,
    index: HashMap<(u32, u32, u32), u32>,
    by_node: Vec<Vec<u32>>,
    active: Vec<u32>,
    interval: u64,
    last_recompute: Option<u64>,
    /// A recomputation is wanted and has not been handed to the engine.
    dirty: bool,
    /// A recomputation event is pending in the engine's queue.
    scheduled: bool,
    /// Bytes sent per node and received per node.
    pub sent: Vec<u64>,
    pub received: Vec<u64>,
    /// Recomputations done.
    pub recomputes: u64,
    /// Token bucket size of every link, bytes (0: no bucket).
    burst: f64,
    /// Bytes in each link's bucket as of `idle_since` (or while busy).
    tokens: Vec<f64>,
    /// When each link last became idle (`u64::MAX` while busy).
    idle_since: Vec<u64>,
    // Scratch of the recomputation, kept to avoid reallocating.
    local: Vec<u32>,
}

impl Net {
    /// A network of `nodes` nodes with capacities in bits per second.
    pub fn new(up_bps: &[f64], down_bps: &[f64], interval_ns: u64) -> Self {
        let nodes = up_bps.len();
        let mut cap: Vec<f64> = up_bps.iter().map(|b| b / 8.0).collect();
        cap.extend(down_bps.iter().map(|b| b / 8.0));
        Self {
            nodes,
            used: vec![0.0; 2 * nodes],
            on_link: vec![Vec::new(); 2 * nodes],
            changed: Vec::new(),
            cap,
            pairs: Vec::new(),
            index: HashMap::new(),
            by_node: vec![Vec::new(); nodes],
            active: Vec::new(),
            interval: interval_ns,
            last_recompute: None,
            dirty: false,
            scheduled: false,
            sent: vec![0; nodes],
            received: vec![0; nodes],
            recomputes: 0,
            burst: 0.0,
            tokens: vec![0.0; 2 * nodes],
            idle_since: vec![0; 2 * nodes],
            local: vec![u32::MAX; 2 * nodes],
        }
    }

    /// Gives every link a token bucket of `bytes` (full at time zero).
    pub fn set_burst(&mut self, bytes: u64) {
        self.burst = bytes_f64(bytes);
        self.tokens.iter_mut().for_each(|t| *t = self.burst);
    }

    /// Tokens of idle link `l` at `now` (refilled since it went idle).
    fn refill(&mut self, l: usize, now: u64) -> f64 {
        let since = self.idle_since[l];
        if since != u64::MAX {
            let t = self.tokens[l] + self.cap[l] * ns_to_s(now.saturating_sub(since));
            self.tokens[l] = t.min(self.burst);
            self.idle_since[l] = now;
        }
        self.tokens[l]
    }

    /// The pair from `src` to `dst` for `tag` (an image or a VM), made on first use.
    pub fn pair(&mut self, src: u32, dst: u32, tag: u32) -> u32 {
        if let Some(&p) = self.index.get(&(src, dst, tag)) {
            return p;
        }
        let id = u32::try_from(self.pairs.len()).unwrap_or(u32::MAX);
        self.pairs.push(Pair {
            src,
            dst,
            queue: VecDeque::new(),
            rate: 0.0,
            remaining: 0.0,
            last: 0,
            version: 0,
            active: None,
            at_up: 0,
            at_down: 0,
            mark: 0,
        });
        self.index.insert((src, dst, tag), id);
        if let Some(v) = self.by_node.get_mut(src as usize) {
            v.push(id);
        }
        if src != dst
            && let Some(v) = self.by_node.get_mut(dst as usize)
        {
            v.push(id);
        }
        id
    }

    fn links(&self, p: &Pair) -> (usize, usize) {
        (p.src as usize, self.nodes + p.dst as usize)
    }

    /// Queues a transfer on a pair; a pair that was idle becomes busy.
    pub fn enqueue(&mut self, pair: u32, t: Transfer, now: u64, out: &mut Vec<Completion>) {
        let Some(p) = self.pairs.get_mut(pair as usize) else {
            return;
        };
        p.queue.push_back(t);
        if p.queue.len() == 1 {
            p.remaining = bytes_f64(t.bytes);
            p.last = now;
            self.activate(pair, now, out);
        }
    }

    fn activate(&mut self, pair: u32, now: u64, out: &mut Vec<Completion>) {
        let Some(p) = self.pairs.get(pair as usize) else {
            return;
        };
        let (u, d) = self.links(p);
        if self.burst > 0.0 {
            let idle = self.on_link[u].is_empty() && self.on_link[d].is_empty();
            let (tu, td) = (self.refill(u, now), self.refill(d, now));
            if idle {
                let remaining = self.pairs[pair as usize].remaining;
                let b = tu.min(td).min(remaining).max(0.0);
                self.tokens[u] -= b;
                self.tokens[d] -= b;
                self.pairs[pair as usize].remaining = remaining - b;
            }
            self.idle_since[u] = u64::MAX;
            self.idle_since[d] = u64::MAX;
        }
        let free = |l: usize| (self.cap[l] - self.used[l]).max(0.0);
        let mut rate = free(u).min(free(d));
        if rate < self.cap[u].min(self.cap[d]) * 1e-9 {
            rate = 0.0;
        }
        self.used[u] += rate;
        self.used[d] += rate;
        let at_up = u32::try_from(self.on_link[u].len()).unwrap_or(u32::MAX);
        self.on_link[u].push(pair);
        let at_down = u32::try_from(self.on_link[d].len()).unwrap_or(u32::MAX);
        self.on_link[d].push(pair);
        self.changed.push(u32::try_from(u).unwrap_or(u32::MAX));
        self.changed.push(u32::try_from(d).unwrap_or(u32::MAX));
        let pos = u32::try_from(self.active.len()).unwrap_or(u32::MAX);
        self.active.push(pair);
        if let Some(p) = self.pairs.get_mut(pair as usize) {
            p.at_up = at_up;
            p.at_down = at_down;
            p.rate = rate;
            p.active = Some(pos);
            p.version = p.version.wrapping_add(1);
            if rate > 0.0 {
                out.push((now + ns_for(p.remaining, rate), pair, p.version));
            }
        }
        self.dirty = true;
    }

    fn deactivate(&mut self, pair: u32, now: u64) {
        let Some(p) = self.pairs.get_mut(pair as usize) else {
            return;
        };
        let Some(pos) = p.active.take() else {
            return;
        };
        let rate = p.rate;
        p.rate = 0.0;
        p.version = p.version.wrapping_add(1);
        let (u, d) = (p.src as usize, self.nodes + p.dst as usize);
        let (at_up, at_down) = (p.at_up as usize, p.at_down as usize);
        for (l, at) in [(u, at_up), (d, at_down)] {
            let list = &mut self.on_link[l];
            if at < list.len() {
                list.swap_remove(at);
                if let Some(&moved) = list.get(at)
                    && let Some(m) = self.pairs.get_mut(moved as usize)
                {
                    let at = u32::try_from(at).unwrap_or(u32::MAX);
                    if l < self.nodes {
                        m.at_up = at;
                    } else {
                        m.at_down = at;
                    }
                }
            }
            self.used[l] = if self.on_link[l].is_empty() {
                0.0
            } else {
                (self.used[l] - rate).max(0.0)
            };
            if self.on_link[l].is_empty() {
                self.idle_since[l] = now;
            }
            self.changed.push(u32::try_from(l).unwrap_or(u32::MAX));
        }
        let pos = pos as usize;
        self.active.swap_remove(pos);
        if let Some(&moved) = self.active.get(pos)
            && let Some(m) = self.pairs.get_mut(moved as usize)
        {
            m.active = u32::try_from(pos).ok();
        }
        self.dirty = true;
    }

    /// The head transfer of `pair` finished sending at `now` (if `version`
    /// is current): counts its bytes, starts the next one, returns it.
    pub fn complete(
        &mut self,
        pair: u32,
        version: u32,
        now: u64,
        out: &mut Vec<Completion>,
    ) -> Option<(Transfer, u32, u32)> {
        let p = self.pairs.get_mut(pair as usize)?;
        if p.version != version || p.active.is_none() {
            return None;
        }
        let t = p.queue.pop_front()?;
        let (src, dst) = (p.src, p.dst);
        if let Some(next) = p.queue.front() {
            p.remaining = bytes_f64(next.bytes);
            p.last = now;
            p.version = p.version.wrapping_add(1);
            if p.rate > 0.0 {
                out.push((now + ns_for(p.remaining, p.rate), pair, p.version));
            }
        } else {
            self.deactivate(pair, now);
        }
        self.count(src, dst, t.bytes);
        Some((t, src, dst))
    }

    fn count(&mut self, src: u32, dst: u32, bytes: u64) {
        if let Some(s) = self.sent.get_mut(src as usize) {
            *s += bytes;
        }
        if let Some(r) = self.received.get_mut(dst as usize) {
            *r += bytes;
        }
    }

    /// Cuts every pair `node` sends or receives on (it died): returns the
    /// transfers lost with their (src, dst); the bytes of the head transfer
    /// already sent are counted at both ends.
    pub fn abort_node(&mut self, node: u32, now: u64) -> Vec<(Transfer, u32, u32)> {
        let ids = self.by_node.get(node as usize).cloned().unwrap_or_default();
        let mut lost = Vec::new();
        for id in ids {
            let Some(p) = self.pairs.get_mut(id as usize) else {
                continue;
            };
            if p.queue.is_empty() {
                continue;
            }
            let elapsed = now.saturating_sub(p.last);
            let sent_head = (p.remaining - p.rate * ns_to_s(elapsed)).max(0.0);
            let (src, dst) = (p.src, p.dst);
            let head_bytes = p.queue.front().map_or(0, |t| t.bytes);
            let drained: Vec<Transfer> = p.queue.drain(..).collect();
            p.remaining = 0.0;
            // Partial head: bytes_f64(head) - remaining_now were on the wire.
            let partial = bytes_f64(head_bytes) - sent_head;
            self.deactivate(id, now);
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let partial = partial.clamp(0.0, bytes_f64(head_bytes)).floor() as u64;
            self.count(src, dst, partial);
            lost.extend(drained.into_iter().map(|t| (t, src, dst)));
        }
        lost
    }

    /// If rates need recomputing and no recomputation is pending, the time
    /// the engine should schedule one at (and it is then marked pending).
    pub fn wants_recompute(&mut self, now: u64) -> Option<u64> {
        if !self.dirty || self.scheduled {
            return None;
        }
        self.scheduled = true;
        let at = self
            .last_recompute
            .map_or(now, |l| (l + self.interval).max(now));
        Some(at)
    }

    /// Max-min fair rates for every busy pair (progressive filling), then
    /// reschedules the pairs whose rate changed.
    pub fn recompute(&mut self, now: u64, out: &mut Vec<Completion>) {
        self.scheduled = false;
        self.dirty = false;
        self.last_recompute = Some(now);
        self.recomputes += 1;
        #[cfg(debug_assertions)]
        self.check_feasible();
        // Max-min rates split over connected components (pairs sharing links,
        // transitively): only the components of the links that changed can
        // get new rates. Collect their busy pairs.
        let mark = self.recomputes;
        let mut comp: Vec<u32> = Vec::new();
        let mut stack: Vec<u32> = std::mem::take(&mut self.changed);
        let mut seen_links: Vec<u32> = Vec::new();
        while let Some(l) = stack.pop() {
            let li = l as usize;
            if self.local[li] != u32::MAX {
                continue;
            }
            self.local[li] = 0;
            seen_links.push(l);
            for &pid in &self.on_link[li] {
                let p = &mut self.pairs[pid as usize];
                if p.mark == mark {
                    continue;
                }
                p.mark = mark;
                comp.push(pid);
                let (u, d) = (p.src as usize, self.nodes + p.dst as usize);
                let other = if u == li { d } else { u };
                if self.local[other] == u32::MAX {
                    stack.push(u32::try_from(other).unwrap_or(u32::MAX));
                }
            }
        }
        for &l in &seen_links {
            self.local[l as usize] = u32::MAX;
        }
        let n = comp.len();
        if n == 0 {
            return;
        }
        // Local numbering of the links in use, and CSR lists of their pairs.
        let mut links: Vec<usize> = Vec::new();
        let mut count: Vec<u32> = Vec::new();
        let mut ends: Vec<(u32, u32)> = Vec::with_capacity(n);
        for &pid in &comp {
            let p = &self.pairs[pid as usize];
            let (u, d) = (p.src as usize, self.nodes + p.dst as usize);
            let mut local_of = |l: usize| {
                if self.local[l] == u32::MAX {
                    self.local[l] = u32::try_from(links.len()).unwrap_or(u32::MAX);
                    links.push(l);
                    count.push(0);
                }
                let i = self.local[l];
                count[i as usize] += 1;
                i
            };
            let lu = local_of(u);
            let ld = local_of(d);
            ends.push((lu, ld));
        }
        let m = links.len();
        let mut start = vec![0u32; m + 1];
        for i in 0..m {
            start[i + 1] = start[i] + count[i];
        }
        let mut fill = start.clone();
        let mut members = vec![0u32; 2 * n];
        for (i, &(lu, ld)) in ends.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            for l in [lu, ld] {
                members[fill[l as usize] as usize] = i;
                fill[l as usize] += 1;
            }
        }
        let mut rem: Vec<f64> = links.iter().map(|&l| self.cap[l]).collect();
        let mut left: Vec<u32> = count.clone();
        let mut ver = vec![0u32; m];
        let mut heap: BinaryHeap<Reverse<(Share, u32, u32)>> = BinaryHeap::with_capacity(m);
        for i in 0..m {
            heap.push(Reverse((
                Share(rem[i] / f64::from(left[i])),
                u32::try_from(i).unwrap_or(u32::MAX),
                0,
            )));
        }
        let mut rate = vec![f64::NAN; n];
        while let Some(Reverse((Share(share), l, v))) = heap.pop() {
            let li = l as usize;
            if v != ver[li] || left[li] == 0 {
                continue;
            }
            left[li] = 0;
            for k in start[li]..start[li + 1] {
                let i = members[k as usize] as usize;
                if !rate[i].is_nan() {
                    continue;
                }
                rate[i] = share;
                let (lu, ld) = ends[i];
                let other = if lu == l { ld } else { lu } as usize;
                if left[other] > 0 {
                    rem[other] = (rem[other] - share).max(0.0);
                    left[other] -= 1;
                    ver[other] += 1;
                    if left[other] > 0 {
                        heap.push(Reverse((
                            Share(rem[other] / f64::from(left[other])),
                            u32::try_from(other).unwrap_or(u32::MAX),
                            ver[other],
                        )));
                    }
                }
            }
        }
        // Apply: settle and reschedule the pairs whose rate changed.
        for &l in &links {
            self.used[l] = 0.0;
            self.local[l] = u32::MAX;
        }
        for (i, &pid) in comp.iter().enumerate() {
            let r = if rate[i].is_nan() { 0.0 } else { rate[i] };
            let p = &mut self.pairs[pid as usize];
            self.used[p.src as usize] += r;
            self.used[self.nodes + p.dst as usize] += r;
            let old = p.rate;
            if (r - old).abs() <= 1e-9 * r.max(old) {
                continue;
            }
            let elapsed = now.saturating_sub(p.last);
            p.remaining = (p.remaining - old * ns_to_s(elapsed)).max(0.0);
            p.last = now;
            p.rate = r;
            p.version = p.version.wrapping_add(1);
            if r > 0.0 {
                out.push((now + ns_for(p.remaining, r), pid, p.version));
            }
        }
    }
}

#[cfg(any(test, debug_assertions))]
impl Net {
    /// Debug builds: no link carries more than its capacity, `used` is right.
    #[cfg(any(test, debug_assertions))]
    fn check_feasible(&self) {
        let mut sum = vec![0.0f64; self.cap.len()];
        for &pid in &self.active {
            let p = &self.pairs[pid as usize];
            sum[p.src as usize] += p.rate;
            sum[self.nodes + p.dst as usize] += p.rate;
        }
        for (l, s) in sum.iter().enumerate() {
            assert!(
                *s <= self.cap[l] * (1.0 + 1e-6) + 1.0,
                "link {l} carries {s} > {}",
                self.cap[l]
            );
            assert!(
                (*s - self.used[l]).abs() <= self.cap[l] * 1e-6 + 1.0,
                "link {l}: used {} vs {s}",
                self.used[l]
            );
        }
    }
}

#[allow(clippy::cast_precision_loss)]
fn bytes_f64(b: u64) -> f64 {
    b as f64
}

#[allow(clippy::cast_precision_loss)]
fn ns_to_s(ns: u64) -> f64 {
    ns as f64 * 1e-9
}

/// Nanoseconds to send `bytes` at `rate` bytes/s, rounded up.
fn ns_for(bytes: f64, rate: f64) -> u64 {
    let ns = (bytes / rate * 1e9).ceil();
    if ns.is_finite() && ns >= 0.0 {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let v = ns.min(1e18) as u64;
        v
    } else {
        0
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn run_until_idle(net: &mut Net, now: &mut u64, mut out: Vec<Completion>) -> Vec<(u64, u32)> {
        // A tiny event loop over the net alone: recompute when asked, complete in time order.
        let mut pending: BinaryHeap<Reverse<(u64, u32, u32)>> = BinaryHeap::new();
        let mut done = Vec::new();
        loop {
            if let Some(at) = net.wants_recompute(*now) {
                *now = at.max(*now);
                net.recompute(*now, &mut out);
            }
            for c in out.drain(..) {
                pending.push(Reverse(c));
            }
            let Some(Reverse((t, p, v))) = pending.pop() else {
                break;
            };
            *now = t;
            if let Some((tr, _, _)) = net.complete(p, v, t, &mut out) {
                done.push((t, tr.req));
            }
        }
        done
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

        /// After a recomputation, rates are max-min fair: no link carries
        /// more than its capacity, and every busy pair crosses a saturated
        /// link on which no other pair gets more than it does.
        #[test]
        fn rates_are_max_min_fair(
            caps in proptest::collection::vec((1u32..100, 1u32..100), 2..8),
            flows in proptest::collection::vec((0usize..8, 0usize..8), 1..24),
        ) {
            let up: Vec<f64> = caps.iter().map(|c| f64::from(c.0) * 8e6).collect();
            let down: Vec<f64> = caps.iter().map(|c| f64::from(c.1) * 8e6).collect();
            let n = caps.len();
            let mut net = Net::new(&up, &down, 0);
            let mut out = Vec::new();
            for (i, &(s, d)) in flows.iter().enumerate() {
                let (s, d) = (s % n, d % n);
                if s == d {
                    continue;
                }
                let p = net.pair(s as u32, d as u32, 0);
                net.enqueue(p, Transfer { req: i as u32, req_gen: 0, bytes: 1 << 20 }, 0, &mut out);
            }
            net.recompute(0, &mut out);
            net.check_feasible();
            let link_of = |p: &Pair| [p.src as usize, n + p.dst as usize];
            let mut load = vec![0.0f64; 2 * n];
            let mut top = vec![0.0f64; 2 * n];
            for &pid in &net.active {
                let p = &net.pairs[pid as usize];
                for l in link_of(p) {
                    load[l] += p.rate;
                    top[l] = top[l].max(p.rate);
                }
            }
            for &pid in &net.active {
                let p = &net.pairs[pid as usize];
                proptest::prop_assert!(p.rate > 0.0);
                let bottleneck = link_of(p).into_iter().any(|l| {
                    load[l] >= net.cap[l] * (1.0 - 1e-9) && p.rate >= top[l] * (1.0 - 1e-9)
                });
                proptest::prop_assert!(bottleneck, "pair {}->{} at {} has no bottleneck", p.src, p.dst, p.rate);
            }
        }
    }

    #[test]
    fn one_flow_gets_the_whole_link() {
        let mut net = Net::new(&[8e9, 8e9], &[8e9, 8e9], 0); // 1 GB/s
        let p = net.pair(0, 1, 0);
        let mut out = Vec::new();
        net.enqueue(
            p,
            Transfer {
                req: 1,
                req_gen: 0,
                bytes: 1_000_000,
            },
            0,
            &mut out,
        );
        assert_eq!(out, vec![(1_000_000, p, 1)]);
        let mut now = 0;
        let done = run_until_idle(&mut net, &mut now, out);
        assert_eq!(done, vec![(1_000_000, 1)]);
        assert_eq!(net.sent[0], 1_000_000);
        assert_eq!(net.received[1], 1_000_000);
    }

    #[test]
    fn token_bucket_sends_a_burst_after_a_pause() {
        // 1 GB/s links with 1 MB buckets: 3 MB on an idle link take 2 ms (the
        // first MB goes at once); 3 MB more right after take 3 ms (empty
        // bucket); after 1 ms idle the bucket is full again.
        let mut net = Net::new(&[8e9, 8e9], &[8e9, 8e9], 0);
        net.set_burst(1_000_000);
        let p = net.pair(0, 1, 0);
        let t = |req| Transfer {
            req,
            req_gen: 0,
            bytes: 3_000_000,
        };
        let mut out = Vec::new();
        net.enqueue(p, t(1), 0, &mut out);
        let mut now = 0;
        let done = run_until_idle(&mut net, &mut now, std::mem::take(&mut out));
        assert_eq!(done, vec![(2_000_000, 1)]);
        net.enqueue(p, t(2), now, &mut out);
        let done = run_until_idle(&mut net, &mut now, std::mem::take(&mut out));
        assert_eq!(done, vec![(5_000_000, 2)]);
        now += 1_000_000;
        net.enqueue(p, t(3), now, &mut out);
        let done = run_until_idle(&mut net, &mut now, std::mem::take(&mut out));
        assert_eq!(done, vec![(8_000_000, 3)]);
        assert_eq!(net.sent[0], 9_000_000);
    }

    #[test]
    fn max_min_redistributes_what_a_slow_receiver_leaves() {
        // Node 0 sends to 1 (downlink 1/4 of the uplink) and 2 (fast): 1 gets
        // 0.25, 2 gets the remaining 0.75, not 0.5 each.
        let up = [4e9 * 8.0, 8e9, 8e9];
        let down = [8e9, 1e9 * 8.0, 8e9 * 8.0];
        let mut net = Net::new(&up, &down, 0);
        let a = net.pair(0, 1, 0);
        let b = net.pair(0, 2, 0);
        let mut out = Vec::new();
        net.enqueue(
            a,
            Transfer {
                req: 1,
                req_gen: 0,
                bytes: 1_000_000_000,
            },
            0,
            &mut out,
        );
        net.enqueue(
            b,
            Transfer {
                req: 2,
                req_gen: 0,
                bytes: 3_000_000_000,
            },
            0,
            &mut out,
        );
        out.clear();
        net.recompute(0, &mut out);
        let ra = net.pairs[a as usize].rate;
        let rb = net.pairs[b as usize].rate;
        assert!((ra - 1e9).abs() < 1.0, "{ra}");
        assert!((rb - 3e9).abs() < 1.0, "{rb}");
        let mut now = 0;
        let done = run_until_idle(&mut net, &mut now, out);
        // Both finish at 1 s.
        assert!(
            done.iter().all(|&(t, _)| t.abs_diff(1_000_000_000) < 10),
            "{done:?}"
        );
    }
}
