//! `refract connector …`: Kafka sinks and sources from the command line.

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::Value;

use super::ClientArgs;

#[derive(Debug, Subcommand)]
pub(super) enum ConnectorCommand {
    /// Create a connector (it starts at once) or replace its definition.
    Put(PutArgs),
    /// Every connector with its status.
    List(ListArgs),
    /// One connector's definition and status.
    Info(NameArgs),
    /// Start a stopped or faulted connector from its checkpoint.
    Start(NameArgs),
    /// Stop a connector, keeping its checkpoint.
    Stop(NameArgs),
    /// Forget a connector's checkpoint: it begins again from its `start_from`.
    Reset(NameArgs),
    /// Delete a connector and its checkpoint.
    Delete(NameArgs),
}

#[derive(Debug, Args)]
pub(super) struct PutArgs {
    /// The connector's name.
    name: String,
    /// The definition as JSON, as `PUT /connectors/{name}` takes it; `@FILE` reads a file and
    /// `-` standard input.
    definition: String,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
pub(super) struct NameArgs {
    /// The connector's name.
    name: String,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
pub(super) struct ListArgs {
    #[command(flatten)]
    client: ClientArgs,
}

pub(super) async fn connector(command: ConnectorCommand) -> anyhow::Result<()> {
    match command {
        ConnectorCommand::Put(args) => {
            let text = match args.definition.as_str() {
                "-" => std::io::read_to_string(std::io::stdin())
                    .context("cannot read the definition from standard input")?,
                path if path.starts_with('@') => std::fs::read_to_string(&path[1..])
                    .with_context(|| format!("cannot read {}", &path[1..]))?,
                text => text.to_owned(),
            };
            let definition: Value =
                serde_json::from_str(&text).context("the definition is not valid JSON")?;
            let (created, info) = args
                .client
                .client()?
                .put_connector(&args.name, &definition)
                .await?;
            if args.client.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                let verb = if created { "created" } else { "updated" };
                println!("{verb} {}", args.name);
                print_infos(std::slice::from_ref(&info));
            }
            Ok(())
        }
        ConnectorCommand::List(args) => {
            let infos = args.client.client()?.connectors().await?;
            if args.client.json {
                println!("{}", serde_json::to_string_pretty(&infos)?);
            } else {
                print_infos(&infos);
            }
            Ok(())
        }
        ConnectorCommand::Info(args) => {
            let info = args.client.client()?.connector(&args.name).await?;
            if args.client.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_infos(std::slice::from_ref(&info));
                if let Some(error) = info["last_error"].as_str() {
                    println!("  last error: {error}");
                }
            }
            Ok(())
        }
        ConnectorCommand::Start(args) => action(args, "start").await,
        ConnectorCommand::Stop(args) => action(args, "stop").await,
        ConnectorCommand::Reset(args) => action(args, "reset").await,
        ConnectorCommand::Delete(args) => {
            args.client.client()?.delete_connector(&args.name).await?;
            if !args.client.json {
                println!("deleted {}", args.name);
            }
            Ok(())
        }
    }
}

async fn action(args: NameArgs, action: &str) -> anyhow::Result<()> {
    let info = args
        .client
        .client()?
        .connector_action(&args.name, action)
        .await?;
    if args.client.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print_infos(std::slice::from_ref(&info));
    }
    Ok(())
}

/// One line per connector: name, kind, topic, status, progress, lag and rate.
fn print_infos(infos: &[Value]) {
    for info in infos {
        let progress = match (&info["position"], info["offsets"].as_object()) {
            (Value::Number(position), _) => format!("position {position}"),
            (_, Some(offsets)) if !offsets.is_empty() => {
                let offsets: Vec<String> = offsets
                    .iter()
                    .map(|(partition, offset)| format!("{partition}:{offset}"))
                    .collect();
                format!("offsets {}", offsets.join(","))
            }
            _ => "no progress yet".to_owned(),
        };
        println!(
            "{}  {}  {}  {}{}  {}  lag {}  {:.0} events/s",
            info["name"].as_str().unwrap_or("?"),
            info["kind"].as_str().unwrap_or("?"),
            info["topic"].as_str().unwrap_or("?"),
            info["status"].as_str().unwrap_or("?"),
            if info["connected"] == Value::Bool(false) && info["status"] == "running" {
                " (not connected)"
            } else {
                ""
            },
            progress,
            info["lag"],
            info["events_per_second"].as_f64().unwrap_or(0.0),
        );
    }
}
