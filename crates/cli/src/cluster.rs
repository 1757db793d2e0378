//! `virtman cluster up|down`: a local cluster of separate processes.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use virtman_storm::{Cluster, ClusterConfig};

/// Arguments of `virtman cluster`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Start a coordinator, an origin serving an image, and M agents on
    /// 127.0.0.1, each a separate process; they keep running until `down`.
    #[command(after_help = "\
Example:
  virtman cluster up --hosts 4 --image debian.raw
  virtman cluster up --hosts 4 --store /var/lib/virtman/images --name debian12
  virtman vm create vm1 --image img --data-dir virtman-cluster/host1
  virtman tree img --coordinator $(jq -r .coordinator virtman-cluster/cluster.json) \\
      --tls virtman-cluster/pki/operator
  virtman cluster down")]
    Up {
        /// Member hosts (agents besides the origin).
        #[arg(long, default_value_t = 4)]
        hosts: usize,
        /// A raw image for the origin to serve (imported as --name, default
        /// `img`).
        #[arg(long, required_unless_present = "store", conflicts_with = "store")]
        image: Option<PathBuf>,
        /// An image store (`virtman image import --store`) the origin serves
        /// as it is, without importing anything: --name picks the image the
        /// cluster is for (default: the store's only image).
        #[arg(long, value_name = "DIR")]
        store: Option<PathBuf>,
        /// The image's name in the cluster.
        #[arg(long)]
        name: Option<String>,
        /// The cluster's directory.
        #[arg(long, default_value = "virtman-cluster")]
        dir: PathBuf,
        /// Fan-out of the relay tree.
        #[arg(long, default_value_t = 2)]
        fanout: u32,
        /// Tree children of the origin: 1 feeds one relay head, so each chunk
        /// leaves the origin about once.
        #[arg(long, default_value_t = 1)]
        origin_fanout: u32,
        /// Parents per host.
        #[arg(long, default_value_t = 2)]
        parents: u32,
        /// Stripes of a striped forest: chunk i follows stripe i mod S's tree
        /// and each host relays one stripe (use --fanout S); 1 is one tree.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
        stripes: u32,
        /// Cache capacity per host.
        #[arg(long, default_value = "2G")]
        cache_size: String,
        /// A boot trace to store as the image's boot profile at the origin,
        /// so that hosts prefetch its chunks ahead of their VMs.
        #[arg(long, value_name = "TRACE")]
        profile: Option<PathBuf>,
        /// Put every host in its own network namespace with a shaped link
        /// (root only; needs iproute2).
        #[arg(long)]
        netns: bool,
        /// Link rate with --netns (tc tbf syntax).
        #[arg(long, default_value = "1gbit")]
        link_rate: String,
        /// Latency added to every fetch with --netns (in user space).
        #[arg(long, default_value = "0.2ms")]
        link_delay: String,
        /// Run the links between hosts without TLS (by default the cluster
        /// gets its own CA in DIR/pki and every base export is TLS-only).
        #[arg(long)]
        no_tls: bool,
        /// Coordinators: more than one share a local etcd of as many members
        /// (Debian's etcd-server), one leading, the others redirecting to it.
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=7))]
        coordinators: u32,
    },
    /// Stop every process of the cluster and remove its directory.
    Down {
        /// The cluster's directory.
        #[arg(long, default_value = "virtman-cluster")]
        dir: PathBuf,
    },
}

/// The name of the one image in `store`; an error naming what is there
/// otherwise.
fn only_image(store: &std::path::Path) -> anyhow::Result<String> {
    let names: Vec<String> = virtman_image::ImageStore::open(store)
        .and_then(|s| s.list())
        .with_context(|| format!("reading the image store {}", store.display()))?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        [] => anyhow::bail!("the image store {} holds no image", store.display()),
        many => anyhow::bail!(
            "the image store {} holds {} images ({}): say which with --name",
            store.display(),
            many.len(),
            many.join(", ")
        ),
    }
}

/// Runs `virtman cluster`.
pub fn run(args: ClusterArgs) -> anyhow::Result<()> {
    match args.command {
        ClusterCommand::Up {
            hosts,
            image,
            store,
            name,
            dir,
            fanout,
            origin_fanout,
            parents,
            stripes,
            cache_size,
            profile,
            netns,
            link_rate,
            link_delay,
            no_tls,
            coordinators,
        } => {
            let bin = std::env::current_exe().context("finding the virtman binary")?;
            let image_name = match (&name, &store) {
                (Some(n), _) => n.clone(),
                (None, None) => "img".to_owned(),
                (None, Some(s)) => only_image(s)?,
            };
            let c = Cluster::up(&ClusterConfig {
                bin,
                dir: dir.clone(),
                hosts,
                image: image.unwrap_or_default(),
                image_name,
                store,
                fanout,
                origin_fanout,
                parents,
                stripes,
                cache_size,
                profile_trace: profile,
                net: netns.then(|| virtman_storm::cluster::NetConfig {
                    rate: link_rate.clone(),
                    delay: link_delay.clone(),
                }),
                tls: !no_tls,
                liars: Vec::new(),
                agent_args: Vec::new(),
                coordinators: coordinators as usize,
            })?;
            let state = c.detach();
            println!("coordinator {}", state.coordinator);
            for m in &state.members {
                println!(
                    "{:<12} pid {:<8} {:<22} {}",
                    m.name,
                    m.pid,
                    m.addr,
                    m.data_dir.display()
                );
            }
            match &state.operator_tls {
                Some(tls) => println!(
                    "tree with: virtman tree {} --coordinator {} --tls {}",
                    state.image,
                    state.coordinator,
                    tls.display()
                ),
                None => println!(
                    "tree with: virtman tree {} --coordinator {}",
                    state.image, state.coordinator
                ),
            }
            println!("stop with: virtman cluster down --dir {}", dir.display());
        }
        ClusterCommand::Down { dir } => {
            let state = Cluster::down(&dir)?;
            println!(
                "stopped {} processes, removed {}",
                state.members.len(),
                dir.display()
            );
        }
    }
    Ok(())
}
