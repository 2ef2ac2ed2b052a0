//! `refract group …`: consumer groups from the command line.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::{ClientArgs, print_event};
use crate::client::{GroupInfo, GroupSettings, PartitionConsumer, Strategy};
use crate::groups::settings::Settings;

#[derive(Debug, Subcommand)]
pub(super) enum GroupCommand {
    /// Create a consumer group on a stream, a system stream (`$ce-order`) or `$all`.
    Create(GroupSettingsArgs),
    /// Replace a group's settings; its checkpoint stays.
    Update(GroupSettingsArgs),
    /// Delete a group with its checkpoint and parked messages.
    Delete(GroupArgs),
    /// Every group with its statistics.
    List(ListArgs),
    /// One group's settings and statistics.
    Info(GroupArgs),
    /// Deliver the parked messages again, before new ones.
    ReplayParked(ReplayArgs),
    /// Join a group as a consumer and print its messages as they come.
    Consume(ConsumeArgs),
}

#[derive(Debug, Args)]
pub(super) struct GroupArgs {
    /// The stream the group reads: a stream, a system stream such as `$ce-order`, or `$all`.
    stream: String,
    /// The group's name.
    group: String,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
pub(super) struct ListArgs {
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
pub(super) struct GroupSettingsArgs {
    /// The stream the group reads: a stream, a system stream such as `$ce-order`, or `$all`.
    stream: String,
    /// The group's name.
    group: String,
    /// Settings as JSON, as `PUT /groups/{stream}/{group}` takes them; the flags below win.
    #[arg(long)]
    settings: Option<String>,
    /// `start`, `end` or a revision/position.
    #[arg(long)]
    start_from: Option<String>,
    /// `round_robin`, `dispatch_to_single`, `pinned` or `pinned_by_correlation`.
    #[arg(long, conflicts_with = "sharder")]
    strategy: Option<String>,
    /// Use the sharded strategy with this uploaded sharder (the partitioned one with
    /// `--partitions`).
    #[arg(long)]
    sharder: Option<String>,
    /// Kafka's model: the sharder places events in this many partitions, each consumed by one
    /// consumer at a time, which commits offsets instead of acking.
    #[arg(long, requires = "sharder")]
    partitions: Option<u32>,
    /// A message not acked within this many milliseconds goes out again (default 30,000).
    #[arg(long)]
    message_timeout_ms: Option<u64>,
    /// Deliveries of a message before it is parked (default 10).
    #[arg(long)]
    max_retry_count: Option<u32>,
    /// 0 = unlimited.
    #[arg(long)]
    max_subscriber_count: Option<usize>,
    #[command(flatten)]
    client: ClientArgs,
}

impl GroupSettingsArgs {
    fn settings(&self) -> anyhow::Result<GroupSettings> {
        let mut json = match &self.settings {
            Some(text) => serde_json::from_str(text).context("--settings is not valid JSON")?,
            None => serde_json::json!({}),
        };
        let object = json
            .as_object_mut()
            .context("--settings must be a JSON object")?;
        if let Some(start) = &self.start_from {
            let value = match start.parse::<u64>() {
                Ok(at) => serde_json::json!(at),
                Err(_) => serde_json::json!(start),
            };
            object.insert("start_from".into(), value);
        }
        if let Some(strategy) = &self.strategy {
            object.insert("strategy".into(), serde_json::json!(strategy));
        }
        match (&self.sharder, self.partitions) {
            (Some(sharder), Some(partitions)) => {
                let strategy = serde_json::json!({
                    "partitioned": { "sharder": sharder, "partitions": partitions }
                });
                object.insert("strategy".into(), strategy);
            }
            (Some(sharder), None) => {
                object.insert("strategy".into(), serde_json::json!({ "sharded": sharder }));
            }
            _ => {}
        }
        for (name, value) in [
            (
                "message_timeout_ms",
                self.message_timeout_ms.map(|v| v as usize),
            ),
            ("max_retry_count", self.max_retry_count.map(|v| v as usize)),
            ("max_subscriber_count", self.max_subscriber_count),
        ] {
            if let Some(value) = value {
                object.insert(name.into(), serde_json::json!(value));
            }
        }
        Settings::parse(json.to_string().as_bytes()).map_err(anyhow::Error::msg)
    }
}

#[derive(Debug, Args)]
pub(super) struct ReplayArgs {
    /// The stream the group reads: a stream, a system stream such as `$ce-order`, or `$all`.
    stream: String,
    /// The group's name.
    group: String,
    /// Replay only this many parked messages.
    #[arg(long)]
    stop_at: Option<u64>,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
pub(super) struct ConsumeArgs {
    /// The stream the group reads: a stream, a system stream such as `$ce-order`, or `$all`.
    stream: String,
    /// The group's name.
    group: String,
    /// The consumer's name (default: refract-cli-<process id>).
    #[arg(long)]
    consumer: Option<String>,
    /// Ack each message once printed; without it messages are retried after the timeout.
    #[arg(long)]
    ack: bool,
    /// A partitioned group: commit the offsets of what was printed every this many messages
    /// (and when stopping); without it nothing is committed.
    #[arg(long)]
    commit_every: Option<u64>,
    /// Messages per pull.
    #[arg(long, default_value_t = 100)]
    max: usize,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<u64>,
    #[command(flatten)]
    client: ClientArgs,
}

pub(super) async fn group(command: GroupCommand) -> anyhow::Result<()> {
    match command {
        GroupCommand::Create(args) => put(args, true).await,
        GroupCommand::Update(args) => put(args, false).await,
        GroupCommand::Delete(args) => {
            args.client
                .client()?
                .delete_group(&args.stream, &args.group)
                .await?;
            if !args.client.json {
                println!("deleted {} on {}", args.group, args.stream);
            }
            Ok(())
        }
        GroupCommand::List(args) => {
            let groups = args.client.client()?.groups().await?;
            print_infos(&groups, args.client.json)
        }
        GroupCommand::Info(args) => {
            let info = args
                .client
                .client()?
                .group(&args.stream, &args.group)
                .await?;
            if args.client.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
                return Ok(());
            }
            print_infos(std::slice::from_ref(&info), false)?;
            if let Some(at) = &info.repartitioning {
                println!(
                    "  repartitioning at {}: events before it keep {} partitions by {}",
                    at.at, at.from_partitions, at.from_sharder
                );
            }
            for partition in info.partitions.iter().flatten() {
                println!(
                    "  partition {:>4}  owner {:<20} committed {:>12}  lag {:>8}",
                    partition.partition,
                    partition.owner.as_deref().unwrap_or("-"),
                    partition
                        .committed
                        .map_or_else(|| "-".to_owned(), |at| at.to_string()),
                    partition.lag
                );
            }
            for consumer in &info.consumers {
                println!(
                    "  consumer {:<20} in flight {:>6}  acked {:>10}  nacked {:>8}",
                    consumer.name, consumer.in_flight, consumer.acked, consumer.nacked
                );
            }
            Ok(())
        }
        GroupCommand::ReplayParked(args) => {
            let replaying = args
                .client
                .client()?
                .replay_parked(&args.stream, &args.group, args.stop_at)
                .await?;
            println!("replaying {replaying} parked messages");
            Ok(())
        }
        GroupCommand::Consume(args) => consume(args).await,
    }
}

async fn put(args: GroupSettingsArgs, create: bool) -> anyhow::Result<()> {
    let settings = args.settings()?;
    let client = args.client.client()?;
    let exists = client.group(&args.stream, &args.group).await.is_ok();
    if create && exists {
        anyhow::bail!(
            "the group {} on {} exists; use `refract group update`",
            args.group,
            args.stream
        );
    }
    if !create && !exists {
        anyhow::bail!("no group {} on {}", args.group, args.stream);
    }
    let (_, info) = client
        .put_group(&args.stream, &args.group, &settings)
        .await?;
    if args.client.json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        let what = if create { "created" } else { "updated" };
        println!("{what} {} on {}", info.group, info.stream);
    }
    Ok(())
}

fn print_infos(groups: &[GroupInfo], json: bool) -> anyhow::Result<()> {
    if json {
        for info in groups {
            println!("{}", serde_json::to_string(info)?);
        }
        return Ok(());
    }
    println!(
        "{:<24} {:<20} {:<11} {:<16} {:>12} {:>9} {:>9} {:>7}",
        "stream", "group", "status", "strategy", "checkpoint", "consumers", "in flight", "parked"
    );
    for info in groups {
        let strategy = match &info.settings.strategy {
            Strategy::Sharded(name) => format!("sharded:{name}"),
            Strategy::Partitioned {
                sharder,
                partitions,
            } => format!("partitioned:{sharder}/{partitions}"),
            other => serde_json::to_value(other)?
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        };
        let checkpoint = info
            .checkpoint
            .map_or_else(|| "-".to_owned(), |at| at.to_string());
        println!(
            "{:<24} {:<20} {:<11} {:<16} {:>12} {:>9} {:>9} {:>7}",
            info.stream,
            info.group,
            info.status,
            strategy,
            checkpoint,
            info.consumers.len(),
            info.in_flight,
            info.parked
        );
    }
    Ok(())
}

async fn consume(args: ConsumeArgs) -> anyhow::Result<()> {
    let client = args.client.client()?;
    let consumer = args
        .consumer
        .clone()
        .unwrap_or_else(|| format!("refract-cli-{}", std::process::id()));
    let info = client.group(&args.stream, &args.group).await?;
    if info.partitions.is_some() {
        return consume_partitions(args, client, consumer).await;
    }
    if args.commit_every.is_some() {
        anyhow::bail!("--commit-every is for partitioned groups; this group acks (--ack)");
    }
    let mut printed = 0u64;
    let mut output = std::io::stdout().lock();
    loop {
        let messages = client
            .pull(
                &args.stream,
                &args.group,
                &consumer,
                args.max,
                Duration::from_secs(10),
            )
            .await?;
        let mut acks = Vec::new();
        for message in messages {
            if args.count.is_some_and(|count| printed >= count) {
                break;
            }
            if args.client.json {
                writeln!(output, "{}", serde_json::to_string(&message)?)?;
            } else {
                write!(
                    output,
                    "[{} retry {}] ",
                    message.ack_id, message.retry_count
                )?;
                print_event(&mut output, &message.event, false)?;
            }
            printed += 1;
            acks.push(message.ack_id);
        }
        output.flush()?;
        if args.ack && !acks.is_empty() {
            client.ack(&args.stream, &args.group, &acks).await?;
        }
        if args.count.is_some_and(|count| printed >= count) {
            return Ok(());
        }
    }
}

/// A partitioned group: prints each message with its partition and offset, commits every
/// `--commit-every` messages, and on Ctrl-C commits what was printed before leaving.
async fn consume_partitions(
    args: ConsumeArgs,
    client: crate::client::Client,
    consumer: String,
) -> anyhow::Result<()> {
    if args.ack {
        anyhow::bail!("a partitioned group takes commits, not acks: use --commit-every N");
    }
    let mut group = PartitionConsumer::new(client, &args.stream, &args.group, &consumer);
    let mut printed = 0u64;
    let mut since_commit = 0u64;
    let mut generation = None;
    let mut output = std::io::stdout().lock();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let wanted = args
            .count
            .map_or(args.max, |count| args.max.min((count - printed) as usize));
        let messages = tokio::select! {
            messages = group.poll(wanted.max(1), Duration::from_secs(10)) => messages?,
            _ = &mut interrupted => break,
        };
        if let Some((now, partitions)) = group.assignment()
            && generation != Some(now)
        {
            generation = Some(now);
            if !args.client.json {
                eprintln!("-- generation {now}: partitions {partitions:?}");
            }
        }
        for message in messages {
            if args.client.json {
                writeln!(output, "{}", serde_json::to_string(&message)?)?;
            } else {
                write!(
                    output,
                    "[partition {} offset {}] ",
                    message.partition, message.offset
                )?;
                print_event(&mut output, &message.event, false)?;
            }
            group.processed(&message);
            printed += 1;
            since_commit += 1;
        }
        output.flush()?;
        if args.commit_every.is_some_and(|every| since_commit >= every) {
            group.commit().await?;
            since_commit = 0;
        }
        if args.count.is_some_and(|count| printed >= count) {
            break;
        }
    }
    if args.commit_every.is_some() && !group.commit().await? {
        eprintln!(
            "-- the group rebalanced before the last commit: its partitions' new owners get those messages again"
        );
    }
    Ok(())
}
