//! The Kafka source: a topic's records landed in Refract's streams, each exactly once.
//!
//! Each partition is fetched from its stored offset by a task of its own; the session takes
//! whatever the fetches brought and appends it in one commit with the partitions' new offsets,
//! so a record is either landed with its offset or neither is. Event ids derive from topic,
//! partition and offset (UUID v5), so a record read twice has the same id either way.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rskafka::client::partition::PartitionClient;
use rskafka::record::RecordAndOffset;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::definition::{
    EventTypeMapping, SourceDefinition, SourceStart, StreamStrategy, check_event_type,
    check_target_stream,
};
use super::kafka::{self, Failure};
use super::{Session, SessionEnd};
use crate::projections::component::{
    Compiled, Event as GuestEvent, Instance, InstanceSetup, Runtime,
};
use crate::sandbox::{GuestKind, GuestLog};
use crate::store::{NewEvent, Store, StoreError};

/// How long a fetch waits on the broker for records.
const FETCH_WAIT_MS: i32 = 250;
/// Fetched batches waiting for the commit, per partition.
const FETCHES_AHEAD: usize = 4;
/// Records landed per commit, at most.
const COMMIT_RECORDS: usize = 10_000;
/// Where UUID v5 event ids of Kafka records come from.
const RECORD_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6b61_666b_615f_7265_6661_6374_0000_0001);

/// What a source keeps in the store: the next offset of each partition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub offsets: BTreeMap<i32, i64>,
}

/// What a partition's fetch brought.
struct Fetched {
    partition: i32,
    records: Vec<RecordAndOffset>,
    high_watermark: i64,
}

pub(super) async fn run(
    session: &mut Session,
    source: &SourceDefinition,
) -> Result<(), SessionEnd> {
    let mut checkpoint: Checkpoint = session.checkpoint()?;
    session.progress.source_at(&checkpoint.offsets);
    let client = kafka::connect(&source.bootstrap_servers).await?;
    let partitions = kafka::partitions(&client, &source.topic).await?;
    // Partitions seen for the first time begin where `start_from` says, and that is stored
    // before anything else, so a restart does not move a `latest` start.
    let mut new_partition = false;
    for partition in &partitions {
        if let std::collections::btree_map::Entry::Vacant(entry) =
            checkpoint.offsets.entry(partition.partition())
        {
            entry.insert(match source.start_from {
                SourceStart::Earliest => kafka::earliest(partition).await?,
                SourceStart::Latest => kafka::high_watermark(partition).await?,
            });
            new_partition = true;
        }
    }
    if new_partition {
        session.commit(&checkpoint, Vec::new()).await?;
    }
    session.progress.connected();
    session.progress.source_at(&checkpoint.offsets);
    let (sender, mut fetched) = mpsc::channel(FETCHES_AHEAD * partitions.len());
    let fetchers = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(fetch_all(
        partitions,
        checkpoint.offsets.clone(),
        sender,
    )));
    let mut mapping = Mapping::new(source);
    if let Some(projection) = &mapping.projection {
        mapping.mapper = Some(mapper(session, projection).await?);
    }
    loop {
        let first = tokio::select! {
            first = fetched.recv() => first,
            () = session.cancel.cancelled() => return Ok(()),
        };
        let Some(first) = first else {
            // The fetchers ended: one of them failed.
            return Err(match fetchers.await {
                Ok(Err(failure)) => failure.into(),
                _ => SessionEnd::Retry("the fetches stopped".into()),
            });
        };
        let mut batch = vec![first];
        let mut records = batch[0].records.len();
        while records < COMMIT_RECORDS {
            match fetched.try_recv() {
                Ok(more) => {
                    records += more.records.len();
                    batch.push(more);
                }
                Err(_) => break,
            }
        }
        for fetch in &batch {
            session
                .progress
                .high_watermark(fetch.partition, fetch.high_watermark);
            if let Some(last) = fetch.records.last() {
                checkpoint.offsets.insert(fetch.partition, last.offset + 1);
            }
        }
        let mapped = if mapping.mapper.is_some() {
            // Guest code runs off the async threads, so stopping never waits on it.
            let (returned, mapped) = tokio::task::spawn_blocking(move || {
                let mapped = mapping.appends(&batch);
                (mapping, mapped)
            })
            .await
            .map_err(|error| SessionEnd::Fault(format!("the mapping failed: {error}")))?;
            mapping = returned;
            mapped
        } else {
            mapping.appends(&batch)
        };
        let appends = mapped.map_err(SessionEnd::Fault)?;
        if appends.is_empty() {
            session.progress.source_at(&checkpoint.offsets);
            continue;
        }
        session.commit(&checkpoint, appends).await?;
        session.progress.handled(records as u64);
        session.progress.source_at(&checkpoint.offsets);
    }
}

/// Fetches every partition from its offset until one fails; the failure is the answer.
async fn fetch_all(
    partitions: Vec<Arc<PartitionClient>>,
    offsets: BTreeMap<i32, i64>,
    sender: mpsc::Sender<Fetched>,
) -> Result<(), Failure> {
    let mut fetchers = tokio::task::JoinSet::new();
    for partition in partitions {
        let offset = offsets[&partition.partition()];
        fetchers.spawn(fetch_partition(partition, offset, sender.clone()));
    }
    drop(sender);
    while let Some(ended) = fetchers.join_next().await {
        match ended {
            Ok(Ok(())) => {}
            Ok(Err(failure)) => return Err(failure),
            Err(error) => return Err(Failure(format!("a fetch task failed: {error}"))),
        }
    }
    Ok(())
}

async fn fetch_partition(
    partition: Arc<PartitionClient>,
    mut offset: i64,
    sender: mpsc::Sender<Fetched>,
) -> Result<(), Failure> {
    let number = partition.partition();
    let what = format!("cannot fetch partition {number}");
    loop {
        let answer = tokio::time::timeout(
            kafka::REQUEST_TIMEOUT + Duration::from_millis(FETCH_WAIT_MS as u64),
            kafka::fetch(&partition, offset, FETCH_WAIT_MS),
        )
        .await;
        let (records, high_watermark) = match answer {
            Ok(Ok(fetched)) => fetched,
            Ok(Err(error)) if kafka::is_offset_out_of_range(&error) => {
                return Err(Failure(format!(
                    "{what}: offset {offset} is not in the partition (its records were \
                     deleted?); reset the connector to begin again from start_from"
                )));
            }
            Ok(Err(error)) => return Err(Failure(format!("{what}: {error}"))),
            Err(_) => {
                return Err(Failure(format!(
                    "{what}: no answer from the broker within {}s",
                    kafka::REQUEST_TIMEOUT.as_secs()
                )));
            }
        };
        match records.last() {
            Some(last) => offset = last.offset + 1,
            // Below the end but nothing to read: a transaction's marker at the partition's
            // end, or records of a transaction still open. The broker answers such fetches
            // at once, so wait as it would have.
            None if high_watermark > offset => {
                tokio::time::sleep(Duration::from_millis(FETCH_WAIT_MS as u64)).await;
            }
            None => {}
        }
        let fetched = Fetched {
            partition: number,
            records,
            high_watermark,
        };
        if sender.send(fetched).await.is_err() {
            return Ok(());
        }
    }
}

/// How a record becomes an event in a stream.
struct Mapping {
    topic: String,
    strategy: StreamStrategy,
    value: Option<String>,
    event_type: EventTypeMapping,
    /// The projection whose partition key names a record's stream, and an instance of it.
    projection: Option<String>,
    mapper: Option<Instance>,
}

/// The deployed projection `name`, compiled (`None` when there is none); the outer error is
/// the store's, the inner one says why the component does not run.
pub(super) async fn load_projection(
    store: Store,
    runtime: Runtime,
    name: String,
) -> Result<anyhow::Result<Option<Compiled>>, StoreError> {
    store
        .blocking(move |store| {
            let component = store.stored_projection_component(&name)?;
            Ok(component.map(|bytes| runtime.compile(&bytes)).transpose())
        })
        .await
}

/// An instance of the projection `name`, to ask partition keys of.
async fn mapper(session: &Session, name: &str) -> Result<Instance, SessionEnd> {
    let runtime = session.runtime.clone();
    let loaded = load_projection(session.store.clone(), runtime.clone(), name.to_owned())
        .await
        .map_err(|error| SessionEnd::Retry(format!("cannot read the projection: {error}")))?;
    let cannot_run = |error: anyhow::Error| {
        SessionEnd::Fault(format!("cannot run the projection {name:?}: {error:#}"))
    };
    let compiled = loaded
        .map_err(cannot_run)?
        .ok_or_else(|| SessionEnd::Fault(format!("no projection is named {name:?}")))?;
    let setup = InstanceSetup {
        projection: name.to_owned(),
        log: GuestLog::new(GuestKind::Projection, name),
        ..InstanceSetup::default()
    };
    // Instantiating runs the guest's start: off the async threads too.
    tokio::task::spawn_blocking(move || Instance::new(&runtime, compiled.pre(), setup))
        .await
        .map_err(|error| SessionEnd::Retry(format!("loading the projection failed: {error}")))?
        .map_err(cannot_run)
}

impl Mapping {
    /// The fetched records as appends, in order, a run of records of one stream in one append.
    fn appends(&mut self, batch: &[Fetched]) -> Result<Vec<(String, Vec<NewEvent>)>, String> {
        let mut appends: Vec<(String, Vec<NewEvent>)> = Vec::new();
        for fetch in batch {
            for record in &fetch.records {
                let (stream, event) = self.event(fetch.partition, record)?;
                match appends.last_mut() {
                    Some((last, events)) if *last == stream => events.push(event),
                    _ => appends.push((stream, vec![event])),
                }
            }
        }
        Ok(appends)
    }

    fn new(source: &SourceDefinition) -> Mapping {
        let projection = match source.stream.strategy {
            StreamStrategy::Projection => source.stream.value.clone(),
            _ => None,
        };
        Mapping {
            topic: source.topic.clone(),
            strategy: source.stream.strategy,
            value: source.stream.value.clone(),
            event_type: source
                .event_type
                .clone()
                .unwrap_or_else(|| EventTypeMapping::Fixed(source.topic.clone())),
            projection,
            mapper: None,
        }
    }

    /// The record as an event and its stream; a projection that fails to map it says why.
    fn event(
        &mut self,
        partition: i32,
        record: &RecordAndOffset,
    ) -> Result<(String, NewEvent), String> {
        let header = |name: &str| {
            record
                .record
                .headers
                .get(name)
                .and_then(|value| std::str::from_utf8(value).ok())
        };
        let event_type = match &self.event_type {
            EventTypeMapping::Fixed(event_type) => event_type.clone(),
            EventTypeMapping::Header(mapping) => header(&mapping.header)
                .filter(|event_type| check_event_type(event_type).is_ok())
                .map(str::to_owned)
                .or_else(|| mapping.default.clone())
                .unwrap_or_else(|| self.topic.clone()),
        };
        let value = record.record.value.clone().unwrap_or_default();
        let binary =
            value.is_empty() || serde_json::from_slice::<serde::de::IgnoredAny>(&value).is_err();
        let id = Uuid::new_v5(
            &RECORD_ID_NAMESPACE,
            format!("{}/{partition}/{}", self.topic, record.offset).as_bytes(),
        );
        let event = NewEvent {
            id,
            event_type,
            data: value,
            binary,
            metadata: self.metadata(partition, record),
        };
        let chosen = match self.strategy {
            StreamStrategy::Topic => None,
            StreamStrategy::Fixed => self.value.clone(),
            StreamStrategy::Key => record
                .record
                .key
                .as_deref()
                .and_then(|key| std::str::from_utf8(key).ok())
                .map(|key| format!("{}{key}", self.value.as_deref().unwrap_or(""))),
            StreamStrategy::Header => {
                header(self.value.as_deref().unwrap_or_default()).map(str::to_owned)
            }
            StreamStrategy::Projection => self.partition_key(partition, record, &event)?,
        };
        let stream = chosen
            .filter(|stream| check_target_stream(stream).is_ok())
            .unwrap_or_else(|| self.topic.clone());
        Ok((stream, event))
    }

    /// The projection's partition key of the record, seen as a new event of the topic's stream
    /// (no revision or position yet, as a sharder sees one).
    fn partition_key(
        &mut self,
        partition: i32,
        record: &RecordAndOffset,
        event: &NewEvent,
    ) -> Result<Option<String>, String> {
        let Some(mapper) = &mut self.mapper else {
            return Ok(None);
        };
        let guest_event = GuestEvent {
            stream: self.topic.clone(),
            revision: 0,
            position: 0,
            id: event.id.hyphenated().to_string(),
            event_type: event.event_type.clone(),
            data: event.data.clone(),
            metadata: event.metadata.clone(),
            created_ms: record.record.timestamp.timestamp_millis(),
        };
        mapper.partition_key(&guest_event).map_err(|error| {
            format!(
                "the projection {:?} failed on offset {} of partition {partition}: {error:#}",
                self.projection.as_deref().unwrap_or_default(),
                record.offset
            )
        })
    }

    /// Where the record came from, as the event's metadata.
    fn metadata(&self, partition: i32, record: &RecordAndOffset) -> Vec<u8> {
        let mut kafka = Map::new();
        kafka.insert("topic".into(), self.topic.clone().into());
        kafka.insert("partition".into(), partition.into());
        kafka.insert("offset".into(), record.offset.into());
        kafka.insert(
            "timestamp_ms".into(),
            record.record.timestamp.timestamp_millis().into(),
        );
        if let Some(key) = &record.record.key {
            kafka.insert(
                "key".into(),
                String::from_utf8_lossy(key).into_owned().into(),
            );
        }
        if !record.record.headers.is_empty() {
            let headers = record
                .record
                .headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.clone(),
                        Value::from(String::from_utf8_lossy(value).into_owned()),
                    )
                })
                .collect::<Map<_, _>>();
            kafka.insert("headers".into(), Value::Object(headers));
        }
        let metadata = Value::Object(Map::from_iter([("kafka".to_owned(), Value::Object(kafka))]));
        serde_json::to_vec(&metadata).expect("JSON values serialise")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rskafka::chrono::{TimeZone, Utc};
    use rskafka::record::Record;

    use super::*;
    use crate::connectors::definition::{HeaderType, StreamMapping};

    fn definition(strategy: StreamStrategy, value: Option<&str>) -> SourceDefinition {
        SourceDefinition {
            bootstrap_servers: "h:1".into(),
            topic: "orders".into(),
            stream: StreamMapping {
                strategy,
                value: value.map(str::to_owned),
            },
            event_type: Some(EventTypeMapping::Header(HeaderType {
                header: "type".into(),
                default: Some("Unknown".into()),
            })),
            start_from: SourceStart::Earliest,
        }
    }

    fn record(key: Option<&str>, value: &[u8], headers: &[(&str, &str)]) -> RecordAndOffset {
        RecordAndOffset {
            record: Record {
                key: key.map(|key| key.as_bytes().to_vec()),
                value: Some(value.to_vec()),
                headers: headers
                    .iter()
                    .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
                    .collect::<BTreeMap<_, _>>(),
                timestamp: Utc.timestamp_millis_opt(1_000).unwrap(),
            },
            offset: 7,
        }
    }

    #[test]
    fn records_map_to_streams_types_and_stable_ids() {
        let mut by_key = Mapping::new(&definition(StreamStrategy::Key, Some("order-")));
        let (stream, event) = by_key
            .event(2, &record(Some("17"), br#"{"a":1}"#, &[("type", "Placed")]))
            .unwrap();
        assert_eq!(stream, "order-17");
        assert_eq!(event.event_type, "Placed");
        assert!(!event.binary);
        let (_, again) = by_key
            .event(2, &record(Some("17"), br#"{"a":1}"#, &[]))
            .unwrap();
        assert_eq!(
            event.id, again.id,
            "the id comes from topic, partition and offset"
        );
        assert_eq!(again.event_type, "Unknown");
        let (_, other) = by_key
            .event(3, &record(Some("17"), br#"{"a":1}"#, &[]))
            .unwrap();
        assert_ne!(event.id, other.id);
        let metadata: Value = serde_json::from_slice(&event.metadata).unwrap();
        assert_eq!(metadata["kafka"]["offset"], 7);
        assert_eq!(metadata["kafka"]["headers"]["type"], "Placed");
        // No key, or one that is no stream for clients: the topic's stream.
        assert_eq!(
            by_key.event(0, &record(None, b"x", &[])).unwrap().0,
            "orders"
        );
        let mut by_header = Mapping::new(&definition(StreamStrategy::Header, Some("to")));
        assert_eq!(
            by_header
                .event(0, &record(None, b"x", &[("to", "a-1")]))
                .unwrap()
                .0,
            "a-1"
        );
        assert_eq!(
            by_header
                .event(0, &record(None, b"x", &[("to", "$all")]))
                .unwrap()
                .0,
            "orders"
        );
        let (_, binary) = by_header
            .event(0, &record(None, b"\xff not json", &[]))
            .unwrap();
        assert!(binary.binary);
        let mut fixed = Mapping::new(&definition(StreamStrategy::Fixed, Some("inbox")));
        assert_eq!(
            fixed.event(0, &record(Some("k"), b"1", &[])).unwrap().0,
            "inbox"
        );
    }
}
