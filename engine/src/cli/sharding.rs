//! Sharding from the command line: sharder upload and local evaluation, and `append`/`read`
//! across several nodes or clusters (`--nodes URL,URL+URL+URL --sharder FILE|NAME`).

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use futures::StreamExt;

use super::{ClientArgs, print_event};
use crate::client::{
    AppendResult, Checkpoints, FanIn, NewEvent, ReadOptions, ShardedClient, SharderSource,
    SubscribeFrom, SubscriptionMessage,
};
use crate::sharding::{ShardInput, Sharder};
use crate::store::ExpectedRevision;

/// Several nodes as one store, placed by a sharder.
#[derive(Debug, Args, Default)]
pub(super) struct ShardingArgs {
    /// Comma-separated shards, each a node's URL or a cluster's node URLs joined with `+`; the
    /// sharder picks the shard of each stream.
    #[arg(long, value_delimiter = ',', requires = "sharder")]
    pub nodes: Vec<String>,
    /// The sharder: a `.wasm` file, or the name of a sharder uploaded to the nodes (with
    /// `--nodes`); with `read --shard`, the name of one uploaded to the server.
    #[arg(long)]
    pub sharder: Option<String>,
}

impl ShardingArgs {
    pub fn enabled(&self) -> bool {
        !self.nodes.is_empty()
    }

    async fn connect(&self, client: &ClientArgs) -> anyhow::Result<ShardedClient> {
        let sharder = self.sharder.as_deref().unwrap_or_default();
        let source = if std::path::Path::new(sharder).is_file() {
            SharderSource::File(sharder.into())
        } else {
            SharderSource::Named(sharder.to_owned())
        };
        ShardedClient::connect(&self.nodes, client.token.clone(), &source).await
    }
}

#[derive(Debug, Subcommand)]
pub(super) enum SharderCommand {
    /// Upload a sharder component (built for wasm32-wasip2) under a name.
    Deploy(SharderDeployArgs),
    /// Shard events locally, no server: JSON objects on stdin, one per line, shaped like the
    /// items of `POST /sharders/{name}/shard` (an event as written plus its `stream`); one
    /// shard index per line on stdout.
    Eval(SharderEvalArgs),
    /// The sharders a server has.
    List(SharderListArgs),
    /// Delete a sharder.
    Delete(SharderNameArgs),
}

#[derive(Debug, Args)]
pub(super) struct SharderDeployArgs {
    /// The sharder's name.
    name: String,
    /// The sharder component file (`.wasm`).
    file: PathBuf,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
pub(super) struct SharderEvalArgs {
    /// The sharder component file.
    file: PathBuf,
    /// How many shards.
    #[arg(long)]
    shards: u32,
}

#[derive(Debug, Args)]
pub(super) struct SharderListArgs {
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
pub(super) struct SharderNameArgs {
    /// The sharder's name.
    name: String,
    #[command(flatten)]
    client: ClientArgs,
}

pub(super) async fn sharder(command: SharderCommand) -> anyhow::Result<()> {
    match command {
        SharderCommand::Deploy(args) => {
            let bytes = std::fs::read(&args.file)
                .with_context(|| format!("cannot read {}", args.file.display()))?;
            let client = args.client.client()?;
            let spinner = super::rebuild::compiling(&args.name, bytes.len());
            let deployed = client.deploy_sharder(&args.name, bytes).await;
            spinner.finish_and_clear();
            let sha256 = deployed?;
            if args.client.json {
                println!(
                    "{}",
                    serde_json::json!({"name": args.name, "wasm_sha256": sha256})
                );
            } else {
                println!("deployed sharder {} ({sha256})", args.name);
            }
        }
        SharderCommand::Eval(args) => {
            let bytes = std::fs::read(&args.file)
                .with_context(|| format!("cannot read {}", args.file.display()))?;
            tokio::task::spawn_blocking(move || evaluate(&bytes, args.shards)).await??;
        }
        SharderCommand::List(args) => {
            let request = args.client.client()?;
            let sharders = request.sharders().await?;
            for sharder in sharders {
                if args.client.json {
                    println!("{}", serde_json::to_string(&sharder)?);
                } else {
                    println!(
                        "{:<24} {}",
                        sharder["name"].as_str().unwrap_or_default(),
                        sharder["wasm_sha256"].as_str().unwrap_or_default()
                    );
                }
            }
        }
        SharderCommand::Delete(args) => {
            args.client.client()?.delete_sharder(&args.name).await?;
            if !args.client.json {
                println!("deleted sharder {}", args.name);
            }
        }
    }
    Ok(())
}

/// Reads events from stdin in batches, writes their shards to stdout.
fn evaluate(component: &[u8], shards: u32) -> anyhow::Result<()> {
    const BATCH: usize = 1000;
    let sharder = Sharder::standalone(component)?;
    let mut output = std::io::BufWriter::new(std::io::stdout().lock());
    let mut batch = Vec::with_capacity(BATCH);
    let flush = |batch: &mut Vec<ShardInput>, output: &mut dyn Write| -> anyhow::Result<()> {
        for shard in sharder.shard(batch, shards)? {
            writeln!(output, "{shard}")?;
        }
        batch.clear();
        Ok(())
    };
    for (number, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.context("cannot read stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let item: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("stdin line {}: not JSON", number + 1))?;
        let input = ShardInput::from_json(&item)
            .map_err(|reason| anyhow::anyhow!("stdin line {}: {reason}", number + 1))?;
        batch.push(input);
        if batch.len() == BATCH {
            flush(&mut batch, &mut output)?;
        }
    }
    flush(&mut batch, &mut output)?;
    output.flush()?;
    Ok(())
}

pub(super) async fn append(
    sharding: &ShardingArgs,
    client: &ClientArgs,
    stream: &str,
    expected: ExpectedRevision,
    events: &[NewEvent],
) -> anyhow::Result<(usize, AppendResult)> {
    sharding
        .connect(client)
        .await?
        .append(stream, expected, events)
        .await
}

/// `read` over several nodes: a stream from its node; `$all` or a system stream from every
/// node (merged as events arrive with `--follow`, node after node without).
pub(super) async fn read(
    sharding: &ShardingArgs,
    client: &ClientArgs,
    stream: &str,
    mut options: ReadOptions,
    follow: bool,
    limit: Option<usize>,
) -> anyhow::Result<()> {
    let sharded = sharding.connect(client).await?;
    let mut output = std::io::stdout().lock();
    let mut remaining = limit.unwrap_or(usize::MAX);
    let everywhere = stream.starts_with('$');
    if follow && everywhere {
        let mut start = Checkpoints::default();
        if let Some(from) = options.from {
            // The same starting id on every node.
            start.nodes = vec![from.checked_sub(1); sharded.nodes().len()];
        }
        let mut messages = sharded.subscribe(stream, &start, &options);
        while remaining > 0 {
            match messages.next().await {
                Some(FanIn::Event { event, .. }) => {
                    print_event(&mut output, &event, client.json)?;
                    remaining -= 1;
                }
                Some(FanIn::CaughtUp { node }) => {
                    if !client.json {
                        eprintln!("-- node {node} caught up");
                    }
                }
                Some(FanIn::NodeFailed { error, .. }) => eprintln!("warning: {error}"),
                None => anyhow::bail!("the subscriptions ended"),
            }
        }
        return Ok(());
    }
    let nodes: Vec<usize> = if everywhere {
        (0..sharded.nodes().len()).collect()
    } else {
        vec![
            sharded
                .read(
                    stream,
                    &ReadOptions {
                        limit: Some(1),
                        ..options.clone()
                    },
                )
                .await?
                .0,
        ]
    };
    if follow {
        let node = &sharded.nodes()[nodes[0]];
        let from = options.from.map_or(SubscribeFrom::Start, SubscribeFrom::At);
        let mut messages = Box::pin(node.subscribe(stream, from, &options).await?);
        while remaining > 0 {
            match messages.next().await {
                Some(Ok(SubscriptionMessage::Event { event, .. })) => {
                    print_event(&mut output, &event, client.json)?;
                    remaining -= 1;
                }
                Some(Ok(SubscriptionMessage::CaughtUp)) => {}
                Some(Err(error)) => return Err(error),
                None => anyhow::bail!("the server closed the subscription"),
            }
        }
        return Ok(());
    }
    let first = options.from;
    for node in nodes {
        options.from = first;
        while remaining > 0 {
            options.limit = Some(remaining.min(4096));
            let page = sharded.nodes()[node].read(stream, &options).await?;
            for event in &page.events {
                print_event(&mut output, event, client.json)?;
            }
            remaining -= page.events.len().min(remaining);
            match page.next {
                Some(next) => options.from = Some(next),
                None => break,
            }
        }
    }
    Ok(())
}
