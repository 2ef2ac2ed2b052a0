//! `refract cluster …`: a cluster's members from the command line.

use clap::{Args, Subcommand};
use serde_json::Value;

use super::ClientArgs;

#[derive(Debug, Subcommand)]
pub(super) enum ClusterCommand {
    /// Members, leader, term, and how far each member is.
    Status(StatusArgs),
    /// Add a node as a learner (a read replica that does not vote); returns once it caught up.
    AddLearner(LearnerArgs),
    /// Set the voters: learners named become voters, voters left out become learners.
    Voters(VotersArgs),
    /// Take a node out of the cluster.
    Remove(RemoveArgs),
}

#[derive(Debug, Args)]
pub(super) struct StatusArgs {
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
pub(super) struct LearnerArgs {
    /// The new node's id (unique, never reused).
    id: u64,
    /// Where the new node's API listens, as the other nodes reach it.
    url: String,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
pub(super) struct VotersArgs {
    /// Every voter from now on.
    #[arg(required = true)]
    ids: Vec<u64>,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
pub(super) struct RemoveArgs {
    /// The node to take out.
    id: u64,
    #[command(flatten)]
    client: ClientArgs,
}

pub(super) async fn cluster(command: ClusterCommand) -> anyhow::Result<()> {
    let (status, client) = match command {
        ClusterCommand::Status(args) => (args.client.client()?.cluster().await?, args.client),
        ClusterCommand::AddLearner(args) => {
            let client = args.client.client()?;
            (client.add_learner(args.id, &args.url).await?, args.client)
        }
        ClusterCommand::Voters(args) => {
            let client = args.client.client()?;
            (client.set_voters(&args.ids).await?, args.client)
        }
        ClusterCommand::Remove(args) => {
            let client = args.client.client()?;
            (client.remove_member(args.id).await?, args.client)
        }
    };
    if client.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_status(&status);
    }
    Ok(())
}

fn print_status(status: &Value) {
    let number = |value: &Value| value.as_u64().map_or("-".to_owned(), |n| n.to_string());
    println!(
        "node {}, term {}, leader {}",
        number(&status["node_id"]),
        number(&status["term"]),
        number(&status["leader"])
    );
    for member in status["members"].as_array().into_iter().flatten() {
        println!(
            "{:>6}  {:<9} applied {:>10}  lag {:>8}  {}",
            number(&member["id"]),
            member["role"].as_str().unwrap_or("?"),
            number(&member["applied"]),
            number(&member["lag"]),
            member["url"].as_str().unwrap_or("?"),
        );
    }
}
