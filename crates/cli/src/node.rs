//! `virtman node show|ban|unban NAME`: a node as the coordinator sees it, and
//! the answer to a stolen key.
//!
//! ```text
//!   ban NAME ─► POST /v1/nodes/NAME/ban ─► the node leaves every session,
//!       its calls get 403, agents refuse its connections from their next heartbeat
//! ```

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::remote::{Remote, runtime};

/// Arguments of `virtman node`.
#[derive(Debug, Args)]
#[command(after_help = "\
A banned node is refused by the coordinator (403 on every call), leaves every
session at once (its children are given other parents), and every agent
refuses its connections from its next heartbeat on. Use it when a node's key
is stolen, until its certificate expires. Banning and unbanning need an
operator certificate (`virtman pki issue --operator`) or the token.

Examples:
  virtman node ban host7 --coordinator https://10.0.0.5:7600 --tls ~/.config/virtman/tls
  virtman node show host7 --json
  virtman node unban host7")]
pub struct NodeArgs {
    #[command(subcommand)]
    command: NodeCommand,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Print a node's sessions and whether it is banned.
    Show {
        /// The node's name.
        name: String,
        /// Print the API's NodeState as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ban a node: refused by the coordinator and by every agent.
    Ban {
        /// The node's name (it need not have joined yet).
        name: String,
    },
    /// Lift a node's ban.
    Unban {
        /// The node's name.
        name: String,
    },
}

/// Runs the subcommand.
pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    let (client, url) = args.remote.client()?;
    let url = &url;
    runtime()?.block_on(async {
        match &args.command {
            NodeCommand::Show { name, json } => {
                let state = client
                    .node(name)
                    .await
                    .with_context(|| format!("reading node {name:?} from {url}"))?;
                if *json {
                    println!("{}", serde_json::to_string_pretty(&state)?);
                } else {
                    let ban = if state.banned { "  BANNED" } else { "" };
                    println!("{}{ban}", state.node);
                    for s in &state.sessions {
                        println!(
                            "  {}  depth {}  {:.0}%  parents {}",
                            s.image,
                            s.view.depth,
                            s.view.progress * 100.0,
                            s.view.parents.join(", ")
                        );
                    }
                    for image in &state.dead_in {
                        println!("  {image}  declared dead");
                    }
                }
            }
            NodeCommand::Ban { name } => {
                client
                    .ban(name)
                    .await
                    .with_context(|| format!("banning {name:?} at {url}"))?;
                println!("banned {name}");
            }
            NodeCommand::Unban { name } => {
                client
                    .unban(name)
                    .await
                    .with_context(|| format!("lifting the ban of {name:?} at {url}"))?;
                println!("unbanned {name}");
            }
        }
        Ok(())
    })
}
