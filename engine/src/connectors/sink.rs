//! The Kafka sink: Refract's events to a topic, each exactly once, without Kafka's
//! transactions.
//!
//! Every record carries its event's position (header `refract-position`), and each partition
//! gets its events in position order. So after any failure (a crash, a produce whose answer was
//! lost, a broker restart) the last record of each partition says which of that partition's
//! events it already holds: the session reads those first and sends only what comes after.
//! Events up to the lowest of those positions are on the topic whatever partition they belong
//! to, so reading resumes from there, or from the checkpoint kept in Refract when that is
//! further (the checkpoint only saves reading again; it never decides what is sent).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rskafka::chrono::{TimeZone, Utc};
use rskafka::client::partition::{Compression as KafkaCompression, PartitionClient};
use rskafka::record::Record;
use serde::{Deserialize, Serialize};

use super::definition::{Compression, Partitioning, SinkDefinition, SinkStart, StartName};
use super::kafka::{self, Failure};
use super::{Session, SessionEnd};
use crate::sharding::Sharder;
use crate::store::{AllFilter, Direction, RecordedEvent, Store, StoreError};

/// Events read from the store per batch.
const READ_BATCH: usize = 8000;
/// Bytes of records per produce request (Kafka refuses batches over `message.max.bytes`,
/// 1 MiB by default).
const PRODUCE_BYTES: usize = 900 * 1024;
/// How often the checkpoint is stored while events flow.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Header names of every record.
pub const STREAM_HEADER: &str = "refract-stream";
pub const REVISION_HEADER: &str = "refract-revision";
pub const POSITION_HEADER: &str = "refract-position";
pub const EVENT_ID_HEADER: &str = "refract-event-id";
pub const EVENT_TYPE_HEADER: &str = "refract-event-type";
pub const CREATED_HEADER: &str = "refract-created";
pub const CONTENT_TYPE_HEADER: &str = "content-type";
pub const METADATA_HEADER: &str = "refract-metadata";

/// What a sink keeps in the store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Every event up to this position has been sent (or was not for this sink).
    pub position: Option<u64>,
    /// Where a sink created with `start_from: end` began (the head then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub began_at: Option<u64>,
    /// How events are placed on partitions: the partitioner and the partition count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
    /// The highest position the topic held when the placement last changed: records at or
    /// below it were placed another way, so they tell nothing about what a partition holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placed_before_through: Option<u64>,
}

/// The checkpoint a sink begins with: `start_from`, with `end` the head as of now.
pub(super) fn first_checkpoint(sink: &SinkDefinition, head: u64) -> Checkpoint {
    let began_at = match sink.start_from {
        SinkStart::Named(StartName::Start) => 0,
        SinkStart::Named(StartName::End) => head,
        SinkStart::Position(position) => position,
    };
    Checkpoint {
        began_at: Some(began_at),
        ..Checkpoint::default()
    }
}

/// The checkpoint of a reset sink: it begins again at `start_from` and remembers how the
/// topic's records were placed, so they keep telling (or not) what each partition holds.
pub(super) fn reset_checkpoint(sink: &SinkDefinition, head: u64, stored: &[u8]) -> Checkpoint {
    let stored: Checkpoint = serde_json::from_slice(stored).unwrap_or_default();
    Checkpoint {
        placement: stored.placement,
        placed_before_through: stored.placed_before_through,
        ..first_checkpoint(sink, head)
    }
}

pub(super) async fn run(session: &mut Session, sink: &SinkDefinition) -> Result<(), SessionEnd> {
    let mut checkpoint: Checkpoint = session.checkpoint()?;
    session
        .progress
        .sink_at(checkpoint.position, session.store.head());
    // Created or reset with its first checkpoint; one stored without is given it now.
    if checkpoint.position.is_none() && checkpoint.began_at.is_none() {
        checkpoint = first_checkpoint(sink, session.store.head());
        session.commit(&checkpoint, Vec::new()).await?;
    }
    let sharder = match &sink.partitioning {
        Partitioning::Stream => None,
        Partitioning::Sharder(name) => Some(
            session
                .sharders
                .get(name)
                .map_err(|error| SessionEnd::Fault(format!("cannot place events: {error}")))?,
        ),
    };
    let client = kafka::connect(&sink.bootstrap_servers).await?;
    let partitions = kafka::partitions(&client, &sink.topic).await?;
    let placement = match &sharder {
        Some(sharder) => format!("sharder {} / {}", sharder.sha256(), partitions.len()),
        None => format!("stream / {}", partitions.len()),
    };
    let mut held = Vec::with_capacity(partitions.len());
    for partition in &partitions {
        held.push(last_position(partition).await?);
    }
    if let Some(was) = checkpoint
        .placement
        .as_ref()
        .filter(|was| **was != placement)
    {
        tracing::warn!(connector = %session.name, %was, now = %placement,
            "the sink's placement changed: resuming from its checkpoint");
    }
    if trust_held(&mut checkpoint, placement, &mut held) {
        session.commit(&checkpoint, Vec::new()).await?;
    }
    session.progress.connected();
    // Events up to the lowest held position are on the topic, whichever partition they
    // belong to; a partition that holds nothing yet holds nothing of them (`None` is lowest).
    let lowest_held = held.iter().copied().min().flatten();
    let from = lowest_held
        .max(checkpoint.position)
        .map_or(0, |position| position + 1)
        .max(checkpoint.began_at.unwrap_or(0));
    let mut reader = Reader::new(session.store.clone(), sink, from).await?;
    let compression = compression(sink.compression);
    let mut saved_at = Instant::now();
    let mut saved = checkpoint.position;
    loop {
        let batch = tokio::select! {
            batch = reader.next() => batch?,
            () = session.cancel.cancelled() => return Ok(()),
        };
        let Some(batch) = batch else {
            // Caught up: store the checkpoint if it moved, then wait for events.
            if checkpoint.position != saved {
                session.commit(&checkpoint, Vec::new()).await?;
                saved = checkpoint.position;
            }
            tokio::select! {
                () = reader.wait() => {},
                () = session.cancel.cancelled() => return Ok(()),
            }
            continue;
        };
        let count = partitions.len() as u32;
        let placed = place(&batch.events, count, sharder.as_deref())?;
        let mut records: BTreeMap<usize, Vec<Record>> = BTreeMap::new();
        let mut sent = 0;
        for (event, partition) in batch.events.iter().zip(&placed) {
            let partition = *partition as usize;
            if held[partition].is_some_and(|held| held >= event.position) {
                continue;
            }
            records.entry(partition).or_default().push(record(event));
            sent += 1;
        }
        let produced = records.into_iter().map(|(partition, records)| {
            let client = partitions[partition].clone();
            async move { produce(&client, records, compression).await }
        });
        tokio::select! {
            results = futures::future::join_all(produced) => {
                results.into_iter().collect::<Result<Vec<()>, Failure>>()?;
            }
            () = session.cancel.cancelled() => return Ok(()),
        }
        for (event, partition) in batch.events.iter().zip(&placed) {
            let held = &mut held[*partition as usize];
            *held = (*held).max(Some(event.position));
        }
        checkpoint.position = checkpoint.position.max(batch.through);
        if checkpoint.placed_before_through <= checkpoint.position {
            checkpoint.placed_before_through = None;
        }
        session.progress.handled(sent);
        session
            .progress
            .sink_at(checkpoint.position, session.store.head());
        if saved_at.elapsed() >= CHECKPOINT_EVERY {
            session.commit(&checkpoint, Vec::new()).await?;
            saved = checkpoint.position;
            saved_at = Instant::now();
        }
    }
}

/// Keeps of the partitions' last positions those that say what their partition holds under
/// `placement`, and records it in the checkpoint; answers whether the checkpoint changed.
///
/// After a change of placement, what the topic holds so far tells nothing of the new one, so
/// the checkpoint alone says what was sent (events after it may be sent again, none is
/// skipped) until the sink has sent past the records placed the old way.
fn trust_held(checkpoint: &mut Checkpoint, placement: String, held: &mut [Option<u64>]) -> bool {
    let changed = checkpoint.placement.as_ref() != Some(&placement);
    if changed {
        if checkpoint.placement.is_some() {
            let through = held.iter().copied().max().flatten();
            checkpoint.placed_before_through = checkpoint.placed_before_through.max(through);
        }
        checkpoint.placement = Some(placement);
    }
    let placed_before_through = checkpoint.placed_before_through;
    for position in held {
        *position = position.filter(|position| placed_before_through < Some(*position));
    }
    changed
}

/// The partition of each event: the sharder's choice, or Kafka's default for the stream name.
fn place(
    events: &[RecordedEvent],
    partitions: u32,
    sharder: Option<&Sharder>,
) -> Result<Vec<u32>, SessionEnd> {
    match sharder {
        Some(sharder) => sharder
            .shard_recorded(events, partitions)
            .map_err(|error| SessionEnd::Fault(format!("the sharder failed: {error:#}"))),
        None => Ok(events
            .iter()
            .map(|event| kafka::default_partition(event.stream.as_bytes(), partitions))
            .collect()),
    }
}

/// The highest position the partition's last records carry, if any.
async fn last_position(partition: &PartitionClient) -> kafka::Result<Option<u64>> {
    let mut highest = None;
    kafka::visit_last_records(partition, |record| {
        let position = record
            .record
            .headers
            .get(POSITION_HEADER)
            .and_then(|value| std::str::from_utf8(value).ok())
            .and_then(|text| text.parse::<u64>().ok());
        highest = highest.max(position);
    })
    .await?;
    Ok(highest)
}

/// Sends records in requests of at most [`PRODUCE_BYTES`], in order; any failure ends the
/// session (the answer may have been lost after the broker took the records).
async fn produce(
    partition: &PartitionClient,
    records: Vec<Record>,
    compression: KafkaCompression,
) -> kafka::Result<()> {
    let what = format!("cannot send to partition {}", partition.partition());
    let mut chunk = Vec::new();
    let mut bytes = 0;
    let mut records = records.into_iter().peekable();
    while let Some(record) = records.next() {
        bytes += record.approximate_size();
        chunk.push(record);
        let full = records
            .peek()
            .is_some_and(|next| bytes + next.approximate_size() > PRODUCE_BYTES);
        if full || records.peek().is_none() {
            kafka::request(
                &what,
                partition.produce(std::mem::take(&mut chunk), compression),
            )
            .await?;
            bytes = 0;
        }
    }
    Ok(())
}

fn record(event: &RecordedEvent) -> Record {
    let mut headers = BTreeMap::from([
        (STREAM_HEADER.to_owned(), event.stream.as_bytes().to_vec()),
        (
            REVISION_HEADER.to_owned(),
            event.revision.to_string().into_bytes(),
        ),
        (
            POSITION_HEADER.to_owned(),
            event.position.to_string().into_bytes(),
        ),
        (
            EVENT_ID_HEADER.to_owned(),
            event.id.to_string().into_bytes(),
        ),
        (
            EVENT_TYPE_HEADER.to_owned(),
            event.event_type.as_bytes().to_vec(),
        ),
        (
            CREATED_HEADER.to_owned(),
            event.created_ms.to_string().into_bytes(),
        ),
        (
            CONTENT_TYPE_HEADER.to_owned(),
            if event.binary {
                b"application/octet-stream".to_vec()
            } else {
                b"application/json".to_vec()
            },
        ),
    ]);
    if !event.metadata.is_empty() {
        headers.insert(METADATA_HEADER.to_owned(), event.metadata.clone());
    }
    Record {
        key: Some(event.stream.as_bytes().to_vec()),
        value: Some(event.data.clone()),
        headers,
        timestamp: Utc
            .timestamp_millis_opt(event.created_ms)
            .single()
            .unwrap_or_else(Utc::now),
    }
}

fn compression(compression: Compression) -> KafkaCompression {
    match compression {
        Compression::None => KafkaCompression::NoCompression,
        Compression::Gzip => KafkaCompression::Gzip,
        Compression::Lz4 => KafkaCompression::Lz4,
        Compression::Snappy => KafkaCompression::Snappy,
        Compression::Zstd => KafkaCompression::Zstd,
    }
}

/// Events read for the sink, and the position everything read so far reaches.
struct Batch {
    events: Vec<RecordedEvent>,
    through: Option<u64>,
}

/// Reads the sink's source from a position on: `$all` with the filters, or a stream (a
/// category's `$ce-` stream of links resolved to its events).
struct Reader {
    store: Store,
    head: tokio::sync::watch::Receiver<u64>,
    source: Source,
    /// Events pass whose stream starts with one of these (all when empty).
    stream_prefixes: Vec<String>,
    /// Events pass whose type starts with one of these (all when empty).
    type_prefixes: Vec<String>,
}

enum Source {
    All {
        next: u64,
        filter: AllFilter,
    },
    /// `next` is the stream's revision to read next; `from` the first position wanted.
    Stream {
        stream: String,
        next: u64,
        from: u64,
    },
}

impl Reader {
    async fn new(store: Store, sink: &SinkDefinition, from: u64) -> Result<Reader, SessionEnd> {
        let stream_prefixes = prefixes(sink.stream_prefix.as_deref());
        let type_prefixes = prefixes(sink.type_prefix.as_deref());
        let source = if sink.source == "$all" {
            Source::All {
                next: from,
                filter: AllFilter {
                    stream_prefixes: stream_prefixes.clone(),
                    type_prefixes: Vec::new(),
                    include_system: false,
                },
            }
        } else {
            let stream = sink.source.clone();
            let next = {
                let stream = stream.clone();
                store
                    .blocking(move |store| first_revision_at(store, &stream, from))
                    .await
                    .map_err(store_failure)?
            };
            Source::Stream { stream, next, from }
        };
        Ok(Reader {
            head: store.watch_head(),
            store,
            source,
            stream_prefixes,
            type_prefixes,
        })
    }

    /// The next events, or `None` when there are none yet.
    async fn next(&mut self) -> Result<Option<Batch>, SessionEnd> {
        self.head.borrow_and_update();
        let (events, through) = match &mut self.source {
            Source::All { next, filter } => {
                let (from, filter) = (*next, filter.clone());
                let slice = self
                    .store
                    .blocking(move |store| {
                        store.read_all(Some(from), Direction::Forward, READ_BATCH, &filter)
                    })
                    .await
                    .map_err(store_failure)?;
                if slice.cursor <= *next {
                    return Ok(None);
                }
                *next = slice.cursor;
                (slice.events, Some(slice.cursor - 1))
            }
            Source::Stream { stream, next, from } => {
                let (name, revision) = (stream.clone(), *next);
                let read = self
                    .store
                    .blocking(move |store| {
                        store.read_stream(
                            &name,
                            Some(revision),
                            Direction::Forward,
                            READ_BATCH,
                            true,
                        )
                    })
                    .await;
                let slice = match read {
                    Ok(slice) => slice,
                    Err(StoreError::StreamNotFound(_)) => return Ok(None),
                    Err(error) => return Err(store_failure(error)),
                };
                if slice.cursor <= *next {
                    return Ok(None);
                }
                *next = slice.cursor;
                let events: Vec<_> = slice
                    .events
                    .into_iter()
                    .filter(|event| event.position >= *from)
                    .collect();
                let through = events.last().map(|event| event.position);
                (events, through)
            }
        };
        let starts_with_any = |text: &str, prefixes: &[String]| {
            prefixes.is_empty() || prefixes.iter().any(|prefix| text.starts_with(prefix))
        };
        let wanted = |event: &RecordedEvent| {
            starts_with_any(&event.stream, &self.stream_prefixes)
                && starts_with_any(&event.event_type, &self.type_prefixes)
        };
        let events = events.into_iter().filter(wanted).collect();
        Ok(Some(Batch { events, through }))
    }

    /// Waits for new events (or a while: a stream that did not exist may have appeared).
    async fn wait(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.head.changed()).await;
    }
}

/// The first revision of `stream` whose event is at `position` or later (the stream's end when
/// none is): events, and a category's links, are in position order.
fn first_revision_at(store: &Store, stream: &str, position: u64) -> Result<u64, StoreError> {
    let revision_of = |event: &RecordedEvent| {
        event
            .link
            .as_ref()
            .map_or(event.revision, |link| link.revision)
    };
    let last = match store.read_stream(stream, None, Direction::Backward, 1, true) {
        Ok(slice) => match slice.events.first() {
            Some(event) => revision_of(event),
            None => return Ok(0),
        },
        Err(StoreError::StreamNotFound(_)) => return Ok(0),
        Err(error) => return Err(error),
    };
    let (mut low, mut high) = (0, last + 1);
    while low < high {
        let middle = low + (high - low) / 2;
        let slice = store.read_stream(stream, Some(middle), Direction::Forward, 1, true)?;
        match slice.events.first() {
            Some(event) if event.position >= position => high = middle,
            Some(event) => low = revision_of(event).max(middle) + 1,
            None => high = middle,
        }
    }
    Ok(low)
}

/// A filter's comma-separated prefixes, as `$all` reads take them.
fn prefixes(list: Option<&str>) -> Vec<String> {
    list.into_iter()
        .flat_map(|list| list.split(','))
        .filter(|prefix| !prefix.is_empty())
        .map(str::to_owned)
        .collect()
}

fn store_failure(error: StoreError) -> SessionEnd {
    SessionEnd::Retry(format!("cannot read the store: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_placed_another_way_are_not_trusted_until_sent_past() {
        // First placement: the partitions' last records are trusted as they are.
        let mut checkpoint = Checkpoint::default();
        let mut held = [Some(1000), Some(600)];
        assert!(trust_held(&mut checkpoint, "stream / 2".into(), &mut held));
        assert_eq!(held, [Some(1000), Some(600)]);
        checkpoint.position = Some(500);

        // Partitions added: nothing held so far says what the new placement sent.
        let mut held = [Some(1000), Some(600), None];
        assert!(trust_held(&mut checkpoint, "stream / 3".into(), &mut held));
        assert_eq!(held, [None, None, None]);
        assert_eq!(checkpoint.placed_before_through, Some(1000));

        // A later session still distrusts them, but trusts what the new placement sent.
        let mut held = [Some(1000), Some(1200), None];
        assert!(!trust_held(&mut checkpoint, "stream / 3".into(), &mut held));
        assert_eq!(held, [None, Some(1200), None]);
    }
}
