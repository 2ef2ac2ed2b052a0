//! A consumer of a partitioned group, as Kafka's consumer is: it polls, keeps the offset of the
//! last message processed per partition, and commits them, following the group's generations.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{ApiFailure, Client, PartitionedMessage};

/// One consumer of a partitioned group.
///
/// ```no_run
/// # async fn demo(client: refract::client::Client) -> anyhow::Result<()> {
/// use refract::client::PartitionConsumer;
/// use std::time::Duration;
///
/// let mut consumer = PartitionConsumer::new(client, "$all", "billing", "worker-1");
/// loop {
///     for message in consumer.poll(1_000, Duration::from_secs(5)).await? {
///         // … process message.event …
///         consumer.processed(&message);
///     }
///     consumer.commit().await?;
/// }
/// # }
/// ```
pub struct PartitionConsumer {
    client: Client,
    stream: String,
    group: String,
    name: String,
    generation: Option<u64>,
    partitions: Vec<u32>,
    /// Per partition, the offset of the last message processed and not committed.
    processed: BTreeMap<u32, u64>,
}

impl PartitionConsumer {
    pub fn new(client: Client, stream: &str, group: &str, name: &str) -> PartitionConsumer {
        PartitionConsumer {
            client,
            stream: stream.to_owned(),
            group: group.to_owned(),
            name: name.to_owned(),
            generation: None,
            partitions: Vec::new(),
            processed: BTreeMap::new(),
        }
    }

    /// The generation and partitions the last poll reported (none before the first).
    pub fn assignment(&self) -> Option<(u64, &[u32])> {
        Some((self.generation?, &self.partitions))
    }

    /// Up to `max` messages of this consumer's partitions, each partition's in order, waiting up
    /// to `wait` when none is ready. When the partitions changed, what was processed on a
    /// partition that is no longer this consumer's is forgotten: its new owner gets it again.
    pub async fn poll(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> anyhow::Result<Vec<PartitionedMessage>> {
        // Taken until the answer is in: a poll dropped meanwhile (its messages lost with it)
        // leaves none, so the next poll starts again.
        let known = self.generation.take();
        let pulled = self
            .client
            .pull_partitioned(&self.stream, &self.group, &self.name, known, max, wait)
            .await;
        let batch = match pulled {
            Ok(batch) => batch,
            Err(error) => {
                // The answer may have been lost with messages in it: the next poll starts
                // again from the committed offsets, and what was processed comes again.
                self.start_again();
                return Err(error);
            }
        };
        self.generation = Some(batch.generation);
        if known != Some(batch.generation) {
            self.processed
                .retain(|partition, _| batch.partitions.contains(partition));
            self.partitions = batch.partitions;
        }
        Ok(batch.messages)
    }

    /// Notes a message as processed: the next commit covers it and everything before it on its
    /// partition.
    pub fn processed(&mut self, message: &PartitionedMessage) {
        let offset = self.processed.entry(message.partition).or_insert(0);
        *offset = (*offset).max(message.offset);
    }

    /// Messages processed and not committed, by partition.
    pub fn uncommitted(&self) -> &BTreeMap<u32, u64> {
        &self.processed
    }

    /// Commits what was processed. `Ok(false)` when nothing was committed: the group moved to
    /// another generation first (the next poll learns the new partitions, and the offsets of
    /// the partitions this consumer keeps go with the next commit), or a partition came back to
    /// this consumer meanwhile (its messages come again).
    pub async fn commit(&mut self) -> anyhow::Result<bool> {
        let Some(generation) = self.generation else {
            return Ok(true);
        };
        if self.processed.is_empty() {
            return Ok(true);
        }
        let committed = self
            .client
            .commit(
                &self.stream,
                &self.group,
                &self.name,
                generation,
                &self.processed,
            )
            .await;
        match committed {
            Ok(()) => {
                self.processed.clear();
                Ok(true)
            }
            Err(error) => match error.downcast_ref::<ApiFailure>().map(|f| f.code.as_str()) {
                // The next poll learns the new generation; the offsets of the partitions kept
                // go with the next commit.
                Some("stale_generation" | "not_owner") => Ok(false),
                // A partition came back to this consumer after it moved away: its messages
                // come again from the committed offset.
                Some("not_delivered") => {
                    self.start_again();
                    Ok(false)
                }
                _ => Err(error),
            },
        }
    }

    /// Forgets the generation and what was processed and not committed: the next poll says
    /// it starts, and the group sends this consumer's partitions again from their committed
    /// offsets.
    fn start_again(&mut self) {
        self.generation = None;
        self.partitions.clear();
        self.processed.clear();
    }
}
