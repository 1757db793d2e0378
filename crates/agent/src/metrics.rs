//! Prometheus metrics of an agent, read from its live counters at scrape time.
//!
//! | metric | labels | what |
//! | --- | --- | --- |
//! | `virtman_fetched_bytes_total` | image, source, origin | bytes fetched from each parent or origin |
//! | `virtman_fetch_failovers_total` | image | fetches that moved on to another source after one failed |
//! | `virtman_fetch_hedges_total`, `_hedge_wins_total` | image | fetches also sent to the next source after the hedge delay; those it answered first |
//! | `virtman_fetch_lies_total` | image | chunks a source sent wrong |
//! | `virtman_fetch_seconds` | image | histogram of chunk fetch latency (all attempts of one fetch) |
//! | `virtman_cache_hits_total`, `_misses_total` | image | chunk pieces read locally / needing a fetch |
//! | `virtman_cache_evicted_chunks_total` | image | chunks evicted |
//! | `virtman_cache_disk_errors_total` | image | failed reads, writes and syncs of the cache's disk (the chunks are fetched again or served from memory) |
//! | `virtman_prefetched_chunks_total`, `_bytes_total` | image | chunks fetched by prefetch (boot profile, pin, CMD_CACHE hints) |
//! | `virtman_cache_held_chunks`, `virtman_image_chunks` | image | chunks a read serves without fetching (stored or all-zero), of the image's (the same figure as `virtman status` and the tree) |
//! | `virtman_cache_used_bytes`, `_capacity_bytes` | | the cache group's usage |
//! | `virtman_served_bytes_total` | to=children\|others\|vms | bytes served over the base exports to child hosts (clients that select `x-virtman:present`) and to other readers, and over the VM exports |
//! | `virtman_origin_sent_bytes_total` | image | bytes an origin sent |
//! | `virtman_origin_max_sends_per_chunk` | image | the most times an origin sent one chunk |
//! | `virtman_cap_bytes_per_second` | direction=upload\|download | the bandwidth caps in force (absent: none) |
//! | `virtman_fetch_class_bytes_total` | class=demand\|prefetch\|preheat | bytes asked of parents and origins, by why |
//! | `virtman_cap_wait_seconds_total` | direction, class | time spent waiting for a cap |

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::agent::Agent;
use crate::caps::Caps;
use virtman_cache::FetchClass;

/// Reads an agent's counters on every scrape.
#[derive(Debug)]
pub struct AgentCollector {
    agent: Arc<Agent>,
}

impl AgentCollector {
    /// A collector for `agent`.
    pub fn new(agent: Arc<Agent>) -> AgentCollector {
        AgentCollector { agent }
    }
}

fn gauge(v: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let a = &self.agent;
        let members = a.member_stats();

        let mut m = enc.encode_descriptor(
            "fetched_bytes",
            "Bytes fetched from each parent or origin",
            None,
            MetricType::Counter,
        )?;
        for s in &members {
            for (source, origin, bytes) in &s.by_source {
                let labels = [
                    ("image", s.image.as_str()),
                    ("source", source.as_str()),
                    ("origin", if *origin { "true" } else { "false" }),
                ];
                ConstCounter::new(*bytes).encode(m.encode_family(&labels)?)?;
            }
        }
        type Get = fn(&crate::agent::MemberStats) -> u64;
        let per_image: [(&str, &str, Get); 10] = [
            (
                "fetch_failovers",
                "Fetches that moved on to another source after one failed",
                |s| s.failovers,
            ),
            (
                "fetch_hedges",
                "Fetches also sent to the next source after the hedge delay",
                |s| s.hedges,
            ),
            (
                "fetch_hedge_wins",
                "Hedged fetches the next source answered first",
                |s| s.hedge_wins,
            ),
            (
                "fetch_lies",
                "Chunks a source sent that did not match the manifest",
                |s| s.lies,
            ),
            (
                "cache_hits",
                "Chunk pieces read from the local cache",
                |s| s.hits,
            ),
            ("cache_misses", "Chunk pieces that needed a fetch", |s| {
                s.misses
            }),
            ("cache_evicted_chunks", "Chunks evicted", |s| s.evicted),
            (
                "cache_disk_errors",
                "Failed reads, writes and syncs of the cache's disk (chunks fetched again or served from memory)",
                |s| s.disk_errors,
            ),
            (
                "prefetched_chunks",
                "Chunks fetched by prefetch (boot profile, pin, hints)",
                |s| s.prefetched_chunks,
            ),
            (
                "prefetched_bytes",
                "Bytes of chunks fetched by prefetch",
                |s| s.prefetched_bytes,
            ),
        ];
        for (name, help, get) in per_image {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &members {
                ConstCounter::new(get(s))
                    .encode(m.encode_family(&[("image", s.image.as_str())])?)?;
            }
        }
        let gauges: [(&str, &str, Get); 2] = [
            (
                "cache_held_chunks",
                "Chunks a read serves without fetching (stored or all-zero)",
                |s| s.held_chunks,
            ),
            ("image_chunks", "Chunks of the image", |s| s.chunks),
        ];
        for (name, help, get) in gauges {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for s in &members {
                gauge(get(s)).encode(m.encode_family(&[("image", s.image.as_str())])?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "fetch_seconds",
            "Latency of one chunk fetch, all attempts included",
            None,
            MetricType::Histogram,
        )?;
        for s in &members {
            s.latency
                .encode(m.encode_family(&[("image", s.image.as_str())])?)?;
        }

        let usage = a.cache_usage();
        gauge(usage.used).encode(enc.encode_descriptor(
            "cache_used_bytes",
            "Bytes of present chunks in the cache group",
            None,
            MetricType::Gauge,
        )?)?;
        gauge(usage.capacity).encode(enc.encode_descriptor(
            "cache_capacity_bytes",
            "Capacity of the cache group",
            None,
            MetricType::Gauge,
        )?)?;

        let mut m = enc.encode_descriptor(
            "served_bytes",
            "Bytes served over the base exports (children) and VM exports",
            None,
            MetricType::Counter,
        )?;
        let served = a.served();
        for (to, n) in [
            ("children", served.children),
            ("others", served.others),
            ("vms", served.vms),
        ] {
            ConstCounter::new(n).encode(m.encode_family(&[("to", to)])?)?;
        }

        let origins = a.origin_stats();
        let mut m = enc.encode_descriptor(
            "origin_sent_bytes",
            "Bytes an origin sent",
            None,
            MetricType::Counter,
        )?;
        for (image, c) in &origins {
            ConstCounter::new(c.bytes).encode(m.encode_family(&[("image", image.as_str())])?)?;
        }
        let mut m = enc.encode_descriptor(
            "origin_max_sends_per_chunk",
            "The most times an origin sent any one chunk",
            None,
            MetricType::Gauge,
        )?;
        for (image, c) in &origins {
            gauge(u64::from(c.max_per_chunk))
                .encode(m.encode_family(&[("image", image.as_str())])?)?;
        }
        encode_caps(a.caps(), &mut enc)
    }
}

/// The caps, what each class fetched and how long each waited.
fn encode_caps(caps: &Caps, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let rates = caps.rates();
    let mut m = enc.encode_descriptor(
        "cap_bytes_per_second",
        "Bandwidth caps (absent: no cap)",
        None,
        MetricType::Gauge,
    )?;
    for (direction, r) in [("upload", rates.upload), ("download", rates.download)] {
        if let Some(r) = r {
            gauge(r).encode(m.encode_family(&[("direction", direction)])?)?;
        }
    }
    let classes = [
        ("demand", FetchClass::Demand),
        ("prefetch", FetchClass::Prefetch),
        ("preheat", FetchClass::Preheat),
    ];
    let mut m = enc.encode_descriptor(
        "fetch_class_bytes",
        "Bytes asked of parents and origins, by why (hedges and retries included)",
        None,
        MetricType::Counter,
    )?;
    for (name, class) in classes {
        ConstCounter::new(caps.fetched(class)).encode(m.encode_family(&[("class", name)])?)?;
    }
    let mut m = enc.encode_descriptor(
        "cap_wait_seconds",
        "Time spent waiting for a bandwidth cap: replies to children (upload), fetches by class (download)",
        None,
        MetricType::Counter,
    )?;
    ConstCounter::new(caps.upload_waited().as_secs_f64())
        .encode(m.encode_family(&[("direction", "upload"), ("class", "all")])?)?;
    for (name, class) in classes {
        ConstCounter::new(caps.download_waited(class).as_secs_f64())
            .encode(m.encode_family(&[("direction", "download"), ("class", name)])?)?;
    }
    Ok(())
}
