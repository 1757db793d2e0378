//! `virtman tree IMAGE`: print a session's relay tree, as text or JSON.
//!
//! ```text
//!   debian: 5 nodes (4 members), fan-out 2 (origins 1), 2 parents per node, depth 3 of at most 4
//!   origin:0  10.0.0.1:10809  origin
//!   └── h1  10.0.1.1:10809  depth 1  40%  parents origin:0
//!       ├── h2  10.0.1.2:10809  depth 2  35%  parents h1, origin:0
//!       │   └── h4  10.0.1.4:10809  depth 3  5%  parents h2, h3
//!       └── h3  10.0.1.3:10809  depth 2  10%  parents h1, origin:0
//! ```
//!
//! Nodes hang under their tree (first) parent; the other parents are listed.
//! In a striped forest a node hangs under the first parent of the stripe it
//! relays (its home), so each stripe's relays form a tree below the origin;
//! each line names that stripe and where the node receives the others from:
//!
//! ```text
//!   debian: 4 nodes (3 members), 2 stripes, fan-out 2 (origins 1), ...
//!   origin:0  10.0.0.1:10809  origin
//!   ├── h1  10.0.1.1:10809  stripe 0  depth 1  40%  parents origin:0  receives 1 from h2
//!   └── h2  10.0.1.2:10809  stripe 1  depth 1  35%  parents origin:0  receives 0 from h1
//! ```

use std::collections::BTreeMap;
use std::fmt::Write;

use anyhow::Context;
use clap::Args;
use virtman_coordinator::api::{NodeView, TreeView};

use crate::remote::{Remote, runtime};

/// Arguments of `virtman tree`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  virtman tree debian-12
  virtman tree debian-12 --coordinator http://10.0.0.5:7600 --json | jq '.nodes[].depth'
  virtman tree debian-12 --coordinator https://10.0.0.5:7600 --tls ~/.config/virtman/tls")]
pub struct TreeArgs {
    /// The image whose session to print.
    pub image: String,

    #[command(flatten)]
    pub remote: Remote,

    /// Print the tree as JSON (the API's TreeView) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Fetches and prints the tree.
pub fn run(args: TreeArgs) -> anyhow::Result<()> {
    let (client, url) = args.remote.client()?;
    let rt = runtime()?;
    let tree = rt.block_on(client.tree(&args.image));
    let tree = tree.with_context(|| format!("reading the tree of {:?} from {url}", args.image))?;
    let text = if args.json {
        let mut s = serde_json::to_string_pretty(&tree).context("encoding JSON")?;
        s.push('\n');
        s
    } else {
        // With several coordinators, who answered: the leader, by its own
        // account (the client went where the redirect said).
        let leader = client
            .only(client.current_url())
            .ok()
            .and_then(|c| rt.block_on(c.coordinator_status()).ok())
            .filter(|s| s.store == "etcd")
            .and_then(|s| s.leader);
        let mut text = render(&tree);
        if let Some(l) = leader {
            text = format!("led by {} at {} (term {})\n{text}", l.name, l.url, l.term);
        }
        text
    };
    print!("{text}");
    Ok(())
}

fn line(n: &NodeView) -> String {
    let mut s = format!("{}  {}", n.node, n.addr);
    if n.origin {
        s.push_str("  origin");
        return s;
    }
    let striped = n.stripe_parents.len() > 1;
    if striped {
        let _ = write!(s, "  stripe {}", n.home);
    }
    let _ = write!(s, "  depth {}  {:.0}%", n.depth, n.progress * 100.0);
    if n.complete {
        s.push_str("  complete");
    }
    if n.parents.is_empty() {
        s.push_str("  (root)");
    } else {
        let _ = write!(s, "  parents {}", n.parents.join(", "));
    }
    if striped {
        let others: Vec<String> = (0u32..)
            .zip(&n.stripe_parents)
            .filter(|(i, _)| *i != n.home)
            .map(|(i, list)| match list.is_empty() {
                true => format!("{i} from none"),
                false => format!("{i} from {}", list.join(", ")),
            })
            .collect();
        let _ = write!(s, "  receives {}", others.join("; "));
    }
    if n.silent_ms > 0 {
        let _ = write!(s, "  silent {:.1}s", n.silent_ms as f64 / 1000.0);
    }
    s
}

/// The tree as indented text, children under their tree parent.
pub fn render(tree: &TreeView) -> String {
    let members = tree.nodes.iter().filter(|n| !n.origin).count();
    let stripes = tree
        .nodes
        .iter()
        .map(|n| n.stripe_parents.len())
        .max()
        .unwrap_or(0);
    let forest = match stripes {
        0 | 1 => String::new(),
        s => format!(" {s} stripes,"),
    };
    let mut out = format!(
        "{}: {} nodes ({members} members),{forest} fan-out {} (origins {}), {} parents per node, depth {} of at most {}\n",
        tree.image,
        tree.nodes.len(),
        tree.fanout,
        tree.origin_fanout,
        tree.parents_per_node,
        tree.max_depth,
        tree.depth_bound
    );
    let mut children: BTreeMap<&str, Vec<&NodeView>> = BTreeMap::new();
    let mut roots = Vec::new();
    for n in &tree.nodes {
        match n.parents.first() {
            Some(p) => children.entry(p.as_str()).or_default().push(n),
            None => roots.push(n),
        }
    }
    fn walk(
        out: &mut String,
        n: &NodeView,
        prefix: &str,
        children: &BTreeMap<&str, Vec<&NodeView>>,
        depth_left: usize,
    ) {
        let Some(kids) = children.get(n.node.as_str()) else {
            return;
        };
        if depth_left == 0 {
            return;
        }
        for (i, k) in kids.iter().enumerate() {
            let last = i + 1 == kids.len();
            let _ = writeln!(
                out,
                "{prefix}{}{}",
                if last { "└── " } else { "├── " },
                line(k)
            );
            let next = format!("{prefix}{}", if last { "    " } else { "│   " });
            walk(out, k, &next, children, depth_left - 1);
        }
    }
    for r in roots {
        let _ = writeln!(out, "{}", line(r));
        walk(&mut out, r, "", &children, tree.nodes.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtman_coordinator::api::SessionStats;

    fn stats() -> SessionStats {
        SessionStats {
            joins: 3,
            leaves: 0,
            deaths: 0,
            reports: 0,
            parent_changes: 0,
            rebalance_moves: 0,
            promotions: 0,
        }
    }

    fn node(name: &str, parents: &[&str], depth: u32, origin: bool) -> NodeView {
        NodeView {
            node: name.into(),
            addr: format!("{name}:1"),
            origin,
            complete: false,
            depth,
            parents: parents.iter().map(|p| (*p).to_owned()).collect(),
            home: 0,
            stripe_parents: Vec::new(),
            children: 0,
            secondary_children: 0,
            progress: 0.5,
            silent_ms: 0,
            epoch: 1,
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn children_hang_under_their_tree_parent() {
        let tree = TreeView {
            image: "img".into(),
            fanout: 2,
            origin_fanout: 2,
            parents_per_node: 2,
            depth_bound: 3,
            max_depth: 2,
            nodes: vec![
                node("origin:0", &[], 0, true),
                node("a", &["origin:0"], 1, false),
                node("b", &["origin:0"], 1, false),
                node("c", &["a", "b"], 2, false),
            ],
            stats: stats(),
        };
        let text = render(&tree);
        let expected = "\
img: 4 nodes (3 members), fan-out 2 (origins 2), 2 parents per node, depth 2 of at most 3
origin:0  origin:0:1  origin
├── a  a:1  depth 1  50%  parents origin:0
│   └── c  c:1  depth 2  50%  parents a, b
└── b  b:1  depth 1  50%  parents origin:0
";
        assert_eq!(text, expected);
    }

    #[test]
    fn a_forest_shows_each_nodes_stripe_and_where_it_receives_the_others() {
        let member = |name: &str, home: u32, lists: [&[&str]; 2]| NodeView {
            home,
            parents: lists[home as usize]
                .iter()
                .map(|p| (*p).to_owned())
                .collect(),
            stripe_parents: lists
                .iter()
                .map(|l| l.iter().map(|p| (*p).to_owned()).collect())
                .collect(),
            ..node(name, &[], 1, false)
        };
        let tree = TreeView {
            image: "img".into(),
            fanout: 2,
            origin_fanout: 1,
            parents_per_node: 2,
            depth_bound: 3,
            max_depth: 2,
            nodes: vec![
                node("origin:0", &[], 0, true),
                member("a", 0, [&["origin:0"], &["b"]]),
                member("b", 1, [&["a"], &["origin:0"]]),
                NodeView {
                    depth: 2,
                    ..member("c", 0, [&["a"], &[]])
                },
            ],
            stats: stats(),
        };
        let text = render(&tree);
        let expected = "\
img: 4 nodes (3 members), 2 stripes, fan-out 2 (origins 1), 2 parents per node, depth 2 of at most 3
origin:0  origin:0:1  origin
├── a  a:1  stripe 0  depth 1  50%  parents origin:0  receives 1 from b
│   └── c  c:1  stripe 0  depth 2  50%  parents a  receives 1 from none
└── b  b:1  stripe 1  depth 1  50%  parents origin:0  receives 0 from a
";
        assert_eq!(text, expected);
    }
}
