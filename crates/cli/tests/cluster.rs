//! Hierarchical attaching end to end, with real processes on loopback: a
//! coordinator, an origin agent and several member agents (`virtman` binaries),
//! VMs created with `virtman vm create`, and the image read back through each
//! VM's snapshot export with the virtman NBD client. Every link runs TLS with
//! a cluster PKI, as operators would run it: the coordinator on HTTPS knowing
//! agents by their certificates, base exports open only to session members.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{BIN, CHUNK, Cluster, metric, node_dir, read_vm};
use virtman_nbd::{Client, ClientConfig, Endpoint};
use virtman_pki::Role;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaves_read_the_image_through_the_tree_and_the_origin_sends_each_chunk_a_few_times() {
    let c = Cluster::start(6, 8 << 20);
    let mut reads = tokio::task::JoinSet::new();
    for i in 1..=6 {
        let sock = c.vm_create(i, &format!("vm{i}"));
        let (size, export) = (c.image.len(), format!("vm{i}"));
        reads.spawn(read_vm(sock, export, size, Arc::default()));
    }
    while let Some(r) = reads.join_next().await {
        assert!(
            r.unwrap() == c.image,
            "a VM read bytes that differ from the image"
        );
    }
    // The tree is within its bound and everyone is in it.
    c.wait_for(
        |c| {
            c.tree()
                .is_some_and(|t| t["nodes"].as_array().unwrap().len() == 7)
        },
        "every host in the tree",
    );
    let tree = c.tree().unwrap();
    assert!(tree["max_depth"].as_u64().unwrap() <= tree["depth_bound"].as_u64().unwrap());
    // The origin sent each chunk about once: to its one relay head, not
    // once per host (a few more only if a parent timed out under load).
    let origin = c.control("origin").status().await.unwrap();
    let sent = origin.images[0].sent.unwrap();
    let chunks = (c.image.len() / CHUNK) as u64;
    assert_eq!(sent.chunks_sent, chunks);
    assert!(
        sent.max_per_chunk <= 2,
        "origin sent a chunk {} times",
        sent.max_per_chunk
    );
    assert!(
        sent.bytes <= c.image.len() as u64 * 5 / 4,
        "origin sent {} bytes for a {}-byte image",
        sent.bytes,
        c.image.len()
    );
    let text = c.control("origin").metrics().await.unwrap();
    assert_eq!(
        metric(&text, "virtman_origin_max_sends_per_chunk", "image=\"img\""),
        u64::from(sent.max_per_chunk)
    );
    // Leaves at depth 2 fetched from parents, not from the origin.
    for i in 1..=6 {
        let s = c.control(&format!("a{i}")).status().await.unwrap();
        let img = &s.images[0];
        assert!((img.progress - 1.0).abs() < 1e-9);
        let depth = tree["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == format!("a{i}"))
            .unwrap()["depth"]
            .as_u64()
            .unwrap();
        if depth >= 2 {
            assert_eq!(
                img.from_origins, 0,
                "a{i} at depth {depth} fetched from the origin"
            );
        }
    }
    // On a host, VIRTMAN_DATA_DIR is enough: `status` finds the agent, and
    // `tree` the coordinator the agent uses.
    let a1 = c.dir.path().join("a1");
    let out = Command::new(BIN)
        .args(["tree", "img", "--json", "--tls"])
        .arg(node_dir(c.dir.path(), "operator", Role::Operator))
        .env("VIRTMAN_DATA_DIR", &a1)
        .env_remove("VIRTMAN_COORDINATOR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let via_agent: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(via_agent["image"], "img");
    assert_eq!(via_agent["nodes"].as_array().unwrap().len(), 7);
    let out = Command::new(BIN)
        .arg("status")
        .env("VIRTMAN_DATA_DIR", &a1)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("node a1 "),
        "{text}"
    );
    assert!(text.contains("(coordinator reachable)"), "{text}");
    // `agent set` changes a running agent's caps; bad rates are refused and
    // change nothing.
    let set = |args: &[&str]| {
        Command::new(BIN)
            .args(["agent", "set"])
            .args(args)
            .env("VIRTMAN_DATA_DIR", &a1)
            .output()
            .unwrap()
    };
    let out = set(&["--upload-rate", "100M"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("upload   12.5 MB/s") && text.contains("download no cap"),
        "{text}"
    );
    for bad in ["0", "-5M", "fast"] {
        let out = set(&["--download-rate", bad]);
        assert!(!out.status.success(), "--download-rate {bad} accepted");
    }
    let caps = c.control("a1").caps().await.unwrap();
    assert_eq!((caps.upload, caps.download), (Some(12_500_000), None));
    let out = set(&["--upload-rate", "off"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("upload   no cap"));
    assert_eq!(c.control("a1").caps().await.unwrap().upload, None);
}

/// A parent stopped (SIGSTOP: alive to the kernel, silent to everyone) in
/// the middle of a VM's read: no read waits for the request timeout (2 s);
/// each is hedged to another source within the hedge delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_stopped_mid_read_stalls_no_read_for_long() {
    let c = Cluster::start(2, 16 << 20);
    c.vm_create(1, "vm1");
    let sock = c.vm_create(2, "vm2");
    let tree = c.tree().unwrap();
    let a2 = tree["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "a2")
        .unwrap()
        .clone();
    assert_eq!(a2["parents"][0], "a1", "{tree}");
    let client = Client::connect(
        &Endpoint::Unix(sock),
        &ClientConfig {
            export: "vm2".into(),
            request_timeout: Duration::from_secs(60),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    let mut out = Vec::with_capacity(c.image.len());
    let mut longest = Duration::ZERO;
    let stopped_at = 2 << 20;
    while out.len() < c.image.len() {
        if out.len() == stopped_at {
            c.agents[0].as_ref().unwrap().signal("-STOP");
        }
        let started = Instant::now();
        let got = client.read(out.len() as u64, CHUNK as u64).await.unwrap();
        if out.len() >= stopped_at {
            longest = longest.max(started.elapsed());
        }
        out.extend_from_slice(&got);
    }
    c.agents[0].as_ref().unwrap().signal("-CONT");
    assert!(out == c.image, "wrong bytes");
    assert!(
        longest < Duration::from_secs(1),
        "a read waited {longest:?} on the stopped parent"
    );
    let s = c.control("a2").status().await.unwrap();
    assert!(s.images[0].from_origins > 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_middle_agent_killed_mid_read_fails_no_read_and_the_tree_is_repaired() {
    let mut c = Cluster::start(6, 16 << 20);
    let socks: Vec<PathBuf> = (1..=6).map(|i| c.vm_create(i, &format!("vm{i}"))).collect();
    let tree = c.tree().unwrap();
    // A member at depth 1 with children: the one to kill.
    let nodes = tree["nodes"].as_array().unwrap().clone();
    let victim = nodes
        .iter()
        .find(|n| n["depth"] == 1 && n["children"].as_u64().unwrap() > 0)
        .map(|n| n["node"].as_str().unwrap().to_owned())
        .expect("a middle node");
    let victim_i: usize = victim[1..].parse().unwrap();
    // Kill the middle agent once the reads are well under way.
    c.kill_mid_read(&socks, victim_i, 6 << 20).await;
    // The kill really hit readers: some survivor failed over from the victim.
    let mut failovers = 0;
    for i in (1..=6).filter(|&i| i != victim_i) {
        failovers += c.control(&format!("a{i}")).status().await.unwrap().images[0].failovers;
    }
    assert!(
        failovers > 0,
        "no fetch ever failed over: the kill came too late"
    );
    // The coordinator declares the victim dead and nobody keeps it as a parent.
    c.wait_for(
        |c| {
            let t = c.tree().unwrap();
            let nodes = t["nodes"].as_array().unwrap();
            nodes.iter().all(|n| {
                n["node"] != victim.as_str()
                    && n["parents"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|p| p != victim.as_str())
            }) && t["stats"]["deaths"].as_u64().unwrap() >= 1
        },
        "the tree to be repaired",
    );
    let t = c.tree().unwrap();
    assert!(t["max_depth"].as_u64().unwrap() <= t["depth_bound"].as_u64().unwrap());
    // The operator can follow it at info, one line each: the death, the
    // reports acted on, each repair with the old and new parents; and each
    // agent's own parent change.
    let log = c.coordinator.as_ref().unwrap().log.lock().unwrap().clone();
    let has = |what: &str, with: &str| {
        log.lines()
            .any(|l| l.contains(" INFO ") && l.contains(what) && l.contains(with))
    };
    assert!(has("declared dead", &format!("node={victim}")), "{log}");
    assert!(
        has("parents changed", &format!("old=[\"{victim}\"")) || has("parents changed", &victim),
        "{log}"
    );
    let repaired = log
        .lines()
        .filter(|l| l.contains("parents changed") && l.contains(&victim))
        .count();
    assert!(repaired >= 1, "{log}");
    let survivors_logged = (1..=6)
        .filter(|&i| i != victim_i)
        .filter_map(|i| c.agents[i - 1].as_ref())
        .any(|a| {
            let l = a.log.lock().unwrap();
            l.lines().any(|l| {
                l.contains(" INFO ") && l.contains("parents changed") && l.contains(&victim)
            })
        });
    assert!(
        survivors_logged,
        "no agent logged leaving {victim} as a parent"
    );
}

/// Whole-agent crash consistency, CI-sized: an agent is SIGKILLed at random
/// moments while its VM writes and flushes; after each restart every flushed
/// write is there (a write not yet flushed may be there or not: a process
/// crash keeps what reached the kernel), every byte never written is the
/// image's, and the host is in its tree again. Five kills here;
/// `bench/crash.sh` runs it with 100 (`VIRTMAN_CRASH_KILLS`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_at_random_moments_keeps_every_flushed_write() {
    let mut c = Cluster::start(1, 8 << 20);
    let sock = c.vm_create(1, "vm1");
    let kills = std::env::var("VIRTMAN_CRASH_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(5);
    crash_rounds(&mut c, &sock, kills, 7).await;
    c.wait_for(
        |c| {
            c.tree().is_some_and(|t| {
                t["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|n| n["node"] == "a1")
            })
        },
        "a1 back in the tree",
    );
}

/// `kills` rounds of: check the disk, write and flush at random, SIGKILL
/// the agent in the middle, start it again.
async fn crash_rounds(c: &mut Cluster, sock: &Path, kills: usize, seed: u64) {
    let block = 4096usize;
    let blocks = c.image.len() / block;
    // What each block must hold (the image, then flushed writes), and what
    // it may hold instead (writes not flushed before a crash).
    let mut expected = c.image.clone();
    let mut maybe: std::collections::HashMap<usize, Vec<Vec<u8>>> = Default::default();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..=kills {
        // A killed agent leaves its socket file behind: connect until the
        // restarted one answers.
        let config = ClientConfig {
            export: "vm1".into(),
            request_timeout: Duration::from_secs(30),
            ..ClientConfig::default()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            match Client::connect(&Endpoint::Unix(sock.to_owned()), &config).await {
                Ok(client) => break client,
                Err(e) => {
                    assert!(Instant::now() < deadline, "round {round}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let disk = client.read(0, c.image.len() as u64).await.unwrap();
        for b in 0..blocks {
            let (at, end) = (b * block, (b + 1) * block);
            let got = &disk[at..end];
            let ok = got == &expected[at..end]
                || maybe
                    .get(&b)
                    .is_some_and(|m| m.iter().any(|v| v[..] == *got));
            assert!(
                ok,
                "round {round}: block {b} holds neither what was flushed nor a later write"
            );
            // Whatever survived is the new baseline.
            expected[at..end].copy_from_slice(got);
        }
        maybe.clear();
        if round == kills {
            break;
        }
        let agent = c.agents[0].as_ref().unwrap();
        let writes = 8 + (next() % 24) as usize;
        let kill_at = (next() % writes as u64) as usize;
        let mut pending: Vec<(usize, Vec<u8>)> = Vec::new();
        for w in 0..writes {
            let b = (next() % blocks as u64) as usize;
            let data = vec![((round * 31 + w) as u8) | 1; block];
            pending.push((b, data.clone()));
            if w == kill_at {
                // Killed with this write in flight.
                let write = client.write((b * block) as u64, bytes::Bytes::from(data), false);
                let kill = async {
                    tokio::time::sleep(Duration::from_micros(next() % 2000)).await;
                    agent.signal("-KILL");
                };
                let _ = tokio::join!(write, kill);
                break;
            }
            client
                .write((b * block) as u64, bytes::Bytes::from(data), false)
                .await
                .unwrap();
            if next() % 3 == 0 {
                client.flush().await.unwrap();
                for (b, d) in pending.drain(..) {
                    expected[b * block..(b + 1) * block].copy_from_slice(&d);
                }
            }
        }
        for (b, d) in pending {
            maybe.entry(b).or_default().push(d);
        }
        drop(client);
        c.agents[0].take().unwrap().stop_killed();
        c.agents[0] = Some(c.start_agent(1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_resumes_without_refetching_what_it_held() {
    let mut c = Cluster::start(1, 8 << 20);
    let sock = c.vm_create(1, "vm1");
    // Read the first half through the VM, then restart the agent.
    let half = c.image.len() / 2;
    {
        let client = Client::connect(
            &Endpoint::Unix(sock.clone()),
            &ClientConfig {
                export: "vm1".into(),
                ..ClientConfig::default()
            },
        )
        .await
        .unwrap();
        assert!(client.read(0, half as u64).await.unwrap()[..] == c.image[..half]);
        client.disconnect().await.unwrap();
    }
    let before = c.control("a1").status().await.unwrap();
    assert!((before.images[0].progress - 0.5).abs() < 1e-9, "{before:?}");
    c.agents[0].take().unwrap().stop();
    c.agents[0] = Some(c.start_agent(1));
    // The VM is still there, and its data too.
    c.wait_for(
        |_| std::fs::metadata(&sock).is_ok(),
        "the restarted agent's VM socket",
    );
    let progress = Arc::default();
    let all = read_vm(sock, "vm1".into(), c.image.len(), progress).await;
    assert!(all == c.image);
    let text = c.control("a1").metrics().await.unwrap();
    let fetched: u64 = text
        .lines()
        .filter(|l| l.starts_with("virtman_fetched_bytes_total"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(
        fetched,
        (c.image.len() - half) as u64,
        "refetched what it held"
    );

    // Evicting the image is refused while its VM exists, then drops the cache
    // and leaves the tree.
    let cli = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .arg("--data-dir")
            .arg(c.data_dir(1))
            .output()
            .unwrap()
    };
    let out = cli(&["image", "evict", "img"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("used by VMs"),
        "{out:?}"
    );
    // The reader's connection may take a moment to close on the agent's side.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = cli(&["vm", "rm", "vm1"]);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "vm rm kept failing: {out:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = cli(&["image", "evict", "img"]);
    assert!(out.status.success(), "{out:?}");
    let s = c.control("a1").status().await.unwrap();
    assert!(
        s.images.is_empty() && s.vms.is_empty() && s.cache_used == 0,
        "{s:?}"
    );
    let t = c.tree().unwrap();
    assert!(
        t["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["node"] != "a1"),
        "{t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_errors_and_a_coordinator_outage_do_not_stop_the_vms() {
    let mut c = Cluster::start(2, 4 << 20);
    let vm_create = |i: usize, vm: &str, image: &str| {
        Command::new(BIN)
            .args(["vm", "create", vm, "--image", image, "--data-dir"])
            .arg(c.data_dir(i))
            .output()
            .unwrap()
    };
    let out = vm_create(1, "x", "no-such-image");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown image"),
        "{out:?}"
    );
    let sock1 = c.vm_create(1, "vm1");
    let out = vm_create(1, "vm1", "img");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{out:?}"
    );
    let out = vm_create(1, "bad/name", "img");
    assert!(!out.status.success());
    let sock2 = c.vm_create(2, "vm2");

    // The coordinator dies; the agents keep serving with the parents they have.
    drop(c.coordinator.take());
    let (a, b) = tokio::join!(
        read_vm(sock1, "vm1".into(), c.image.len(), Arc::default()),
        read_vm(sock2, "vm2".into(), c.image.len(), Arc::default()),
    );
    assert!(a == c.image && b == c.image);
    // Within a few heartbeats, the status says the coordinator is down.
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.control("a1").status().await.unwrap().coordinator_ok {
        assert!(
            Instant::now() < deadline,
            "status never reported the coordinator down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // VMs can be listed and removed meanwhile; an unknown one is a clear error.
    let out = Command::new(BIN)
        .args(["vm", "rm", "nope", "--data-dir"])
        .arg(c.data_dir(1))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no VM named"),
        "{out:?}"
    );
}

#[test]
fn a_real_vm_boots_two_levels_below_the_origin_and_its_writes_stay_in_its_snapshot() {
    use virtman_testkit::guest::{self, BOOTS_FILE, BootOptions, Drive, MARKER};
    let assets = guest::assets().unwrap();
    let image = std::fs::read(&assets.disk_template).unwrap();
    // Five hosts: the origin and a1..a4.
    let c = Cluster::with_image(4, image.clone());
    // a1 and a2 join first and sit under the origin; a3 lands at depth 2.
    c.vm_create(1, "vm1");
    c.vm_create(2, "vm2");
    let sock = c.vm_create(3, "vm3");
    let tree = c.tree().unwrap();
    let a3 = tree["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "a3")
        .unwrap()
        .clone();
    assert_eq!(a3["depth"], 2, "{tree}");

    let uri = format!("nbd+unix:///vm3?socket={}", sock.display());
    let opts = BootOptions {
        boot_id: "tree-1".into(),
        ..BootOptions::default()
    };
    let result = guest::boot(&Drive::Nbd(uri.clone()), &assets, &opts).unwrap();
    assert_eq!(result.marker, MARKER, "console:\n{}", result.console);

    // The guest's write is in vm3's snapshot, and nowhere else.
    let dir = tempfile::tempdir().unwrap();
    let copy = |uri: &str, name: &str| {
        let out = dir.path().join(name);
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", uri])
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success());
        out
    };
    let vm3 = copy(&uri, "vm3.raw");
    assert_eq!(
        guest::read_disk_file(&vm3, BOOTS_FILE).unwrap(),
        "boot tree-1\n"
    );
    let vm1_sock = c.data_dir(1).join("vms.sock");
    let vm1 = copy(
        &format!("nbd+unix:///vm1?socket={}", vm1_sock.display()),
        "vm1.raw",
    );
    assert_eq!(guest::read_disk_file(&vm1, BOOTS_FILE).unwrap(), "");
    assert!(std::fs::read(c.dir.path().join("img.raw")).unwrap() == image);

    // `virtman vm boot` runs qemu on a VM's snapshot in the foreground.
    let out = Command::new("timeout")
        .arg("120")
        .arg(BIN)
        .args(["vm", "boot", "vm1", "--kernel"])
        .arg(&assets.kernel)
        .arg("--initrd")
        .arg(&assets.initrd)
        .args([
            "--append",
            "console=ttyS0 panic=-1 quiet virtman.id=cli-boot",
        ])
        .args(["--memory", "256", "--data-dir"])
        .arg(c.data_dir(1))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vm boot failed: {console}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        console.contains(MARKER) && console.contains("VIRTMAN-DONE"),
        "{console}"
    );
    let vm1_after = copy(
        &format!("nbd+unix:///vm1?socket={}", vm1_sock.display()),
        "vm1-after.raw",
    );
    assert_eq!(
        guest::read_disk_file(&vm1_after, BOOTS_FILE).unwrap(),
        "boot cli-boot\n"
    );
}

#[test]
fn an_agent_with_an_absurd_commit_interval_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "t0ken").unwrap();
    let mut args = Cluster::agent_args(dir.path(), "http://127.0.0.1:9", "a1");
    args.extend(["--commit-interval".into(), "11m".into()]);
    let out = Command::new(BIN).args(&args).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("commit interval"), "{err}");
}
