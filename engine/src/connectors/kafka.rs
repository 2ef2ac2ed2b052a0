//! What the connectors need from Kafka, on rskafka (Kafka's protocol in pure Rust).
//!
//! Every client is built without rskafka's own retries: a produce it re-sent after a lost
//! answer could land twice, so any failure ends the connector's session and the next one
//! starts from what the broker holds. Every request has a deadline, so a broker that stops
//! answering is noticed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rskafka::BackoffConfig;
use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::RecordAndOffset;

/// Longest a request to the broker may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the fetches that read a partition's end wait for records. Not zero: some brokers
/// answer a fetch that may not wait before reading anything.
const END_FETCH_WAIT_MS: i32 = 100;
/// Most bytes one fetch asks for, per partition.
pub const FETCH_BYTES: i32 = 1024 * 1024;

/// A failure talking to Kafka, as shown in a connector's status.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Failure(pub String);

pub type Result<T> = std::result::Result<T, Failure>;

/// Runs a request with the deadline; `what` names it in the error.
pub async fn request<T>(
    what: &str,
    work: impl Future<Output = std::result::Result<T, KafkaError>>,
) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(Failure(format!("{what}: {error}"))),
        Err(_) => Err(Failure(format!(
            "{what}: no answer from the broker within {}s",
            REQUEST_TIMEOUT.as_secs()
        ))),
    }
}

/// A client of the cluster at `bootstrap_servers` (`host:port,…`).
pub async fn connect(bootstrap_servers: &str) -> Result<Client> {
    let brokers = bootstrap_servers
        .split(',')
        .map(|server| server.trim().to_owned())
        .collect();
    let no_retries = BackoffConfig {
        deadline: Some(Duration::ZERO),
        ..BackoffConfig::default()
    };
    request(
        &format!("cannot connect to {bootstrap_servers}"),
        ClientBuilder::new(brokers)
            .client_id("refract")
            .backoff_config(no_retries)
            .build(),
    )
    .await
}

/// A client for each partition of `topic`, in partition order.
pub async fn partitions(client: &Client, topic: &str) -> Result<Vec<Arc<PartitionClient>>> {
    let topics = request("cannot list the topics", client.list_topics()).await?;
    let Some(found) = topics.into_iter().find(|found| found.name == topic) else {
        return Err(Failure(format!("the topic {topic:?} does not exist")));
    };
    // A set: in order.
    let numbers = found.partitions;
    let count = numbers.len() as i32;
    if count == 0 {
        return Err(Failure(format!(
            "the broker lists no partitions for the topic {topic:?}"
        )));
    }
    if numbers.iter().copied().ne(0..count) {
        return Err(Failure(format!(
            "the topic {topic:?} has partitions {numbers:?}, not 0 to {}",
            count - 1
        )));
    }
    let mut clients = Vec::with_capacity(numbers.len());
    for partition in 0..count {
        let client = request(
            &format!("cannot reach partition {partition} of {topic:?}"),
            client.partition_client(topic, partition, UnknownTopicHandling::Error),
        )
        .await?;
        clients.push(Arc::new(client));
    }
    Ok(clients)
}

/// Fetches records from `offset` on; answers them with the partition's high watermark.
pub async fn fetch(
    partition: &PartitionClient,
    offset: i64,
    max_wait_ms: i32,
) -> std::result::Result<(Vec<RecordAndOffset>, i64), KafkaError> {
    match partition
        .fetch_records(offset, 1..FETCH_BYTES, max_wait_ms)
        .await
    {
        // Some brokers answer a fetch from a partition that has never held a record with no
        // topic at all, at once: nothing there yet, so wait as a broker would have.
        Err(KafkaError::InvalidResponse(message)) if message.ends_with("got 0") => {
            let wait = u64::try_from(max_wait_ms).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            Ok((Vec::new(), offset))
        }
        fetched => fetched,
    }
}

/// The first offset the partition holds.
pub async fn earliest(partition: &PartitionClient) -> Result<i64> {
    request(
        &format!(
            "cannot read partition {}'s first offset",
            partition.partition()
        ),
        partition.get_offset(OffsetAt::Earliest),
    )
    .await
}

/// The offset the partition's next record gets (its high watermark), as a fetch reports it.
pub async fn high_watermark(partition: &PartitionClient) -> Result<i64> {
    let what = format!("cannot read partition {}'s end", partition.partition());
    let from = request(&what, partition.get_offset(OffsetAt::Latest)).await?;
    let (_, high_watermark) =
        request(&what, fetch(partition, from.max(0), END_FETCH_WAIT_MS)).await?;
    Ok(high_watermark)
}

/// Visits the records from near the partition's end to its high watermark: the last record
/// at least, and on brokers whose "latest" offset is a batch's first, that whole batch.
pub async fn visit_last_records(
    partition: &PartitionClient,
    mut visit: impl FnMut(&RecordAndOffset),
) -> Result<()> {
    let what = format!(
        "cannot read partition {}'s last record",
        partition.partition()
    );
    let latest = request(&what, partition.get_offset(OffsetAt::Latest)).await?;
    let earliest = earliest(partition).await?;
    if latest <= earliest {
        return Ok(());
    }
    let mut offset = (latest - 1).max(earliest);
    loop {
        let (records, high_watermark) =
            request(&what, fetch(partition, offset, END_FETCH_WAIT_MS)).await?;
        let Some(last) = records.last() else {
            return Ok(());
        };
        offset = last.offset + 1;
        records.iter().for_each(&mut visit);
        if offset >= high_watermark {
            return Ok(());
        }
    }
}

/// Whether a fetch failed because the offset is no longer (or not yet) in the partition.
pub fn is_offset_out_of_range(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::ServerError {
            protocol_error: ProtocolError::OffsetOutOfRange,
            ..
        }
    )
}

/// Kafka's default partitioner for keyed records (murmur2 of the key, as the Java producer
/// and Kafka Streams compute it): the same key lands on the same partition as theirs would.
pub fn default_partition(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes(chunk.try_into().expect("four bytes"));
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_agrees_with_kafka() {
        // Kafka's own test vectors (UtilsTest.testMurmur2), as signed ints.
        let cases: [(&[u8], i32); 7] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
            (b"", 275646681),
        ];
        for (key, expected) in cases {
            assert_eq!(
                murmur2(key) as i32,
                expected,
                "{:?}",
                String::from_utf8_lossy(key)
            );
        }
        assert!(default_partition(b"order-1", 3) < 3);
    }
}
