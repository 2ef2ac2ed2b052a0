//! How a group spreads its messages over consumers, apart from the group's task so each
//! strategy can be read and tested alone:
//!
//! - [`Keying`] gives every message a bucket as it is read: the hash of its stream (pinned), of
//!   its correlation id (pinned by correlation, by the same rule as `$by_correlation_id`), or the
//!   shard an uploaded sharder picks (sharded); 0 for the strategies without buckets.
//! - [`Spread`] owns the buckets: consumers own buckets by rendezvous hashing (a join or leave
//!   moves only that consumer's buckets), and it picks the consumer for each ready message.

use std::sync::Arc;

use super::settings::Strategy;
use crate::sharding::Sharder;
use crate::store::{IndexConfig, RecordedEvent};

/// Buckets of the pinned and sharded strategies; consumers own buckets.
pub const BUCKETS: u32 = 4096;

/// What decides the bucket of a message.
#[derive(Clone)]
pub(super) enum Keying {
    /// Round robin and dispatch to single: one bucket for everything.
    Single,
    /// The original stream's name.
    Stream,
    /// The correlation id (the configured metadata property), else the stream's name.
    Correlation(IndexConfig),
    /// The shard the sharder picks among [`BUCKETS`].
    Sharder { name: String, sharder: Arc<Sharder> },
}

impl Keying {
    /// The keying of `strategy`; a sharded strategy needs its sharder loaded.
    pub fn of(
        strategy: &Strategy,
        config: &IndexConfig,
        sharder: Option<Arc<Sharder>>,
    ) -> Result<Keying, String> {
        Ok(match strategy {
            Strategy::RoundRobin | Strategy::DispatchToSingle => Keying::Single,
            Strategy::Pinned => Keying::Stream,
            Strategy::PinnedByCorrelation => Keying::Correlation(config.clone()),
            Strategy::Sharded(name) => Keying::Sharder {
                name: name.clone(),
                sharder: sharder.ok_or_else(|| format!("the sharder {name:?} is not loaded"))?,
            },
            Strategy::Partitioned { .. } => {
                return Err("a partitioned strategy has no per-message keying".into());
            }
        })
    }

    /// The bucket of each event, in order, or why there is none (a sharder that failed). A
    /// sharder runs on the blocking pool, once for the whole batch.
    pub async fn buckets(&self, events: &[Arc<RecordedEvent>]) -> Vec<Result<u32, String>> {
        let (name, sharder) = match self {
            Keying::Sharder { name, sharder } => (name.clone(), sharder.clone()),
            _ => return events.iter().map(|event| Ok(self.hashed(event))).collect(),
        };
        let count = events.len();
        let owned = events.to_vec();
        let shards = tokio::task::spawn_blocking(move || sharder.shard_recorded(&owned, BUCKETS))
            .await
            .map_err(|error| format!("the sharder {name:?} failed: {error}"))
            .and_then(|result| {
                result.map_err(|error| format!("the sharder {name:?} failed: {error:#}"))
            });
        match shards {
            Ok(shards) if shards.len() == count => shards.into_iter().map(Ok).collect(),
            Ok(_) => vec![Err(format!("the sharder {name:?} returned no shard")); count],
            // A batch that fails is tried one event at a time, so only the event at fault is
            // refused.
            Err(error) if count == 1 => vec![Err(error)],
            Err(_) => {
                let mut buckets = Vec::with_capacity(count);
                for event in events {
                    buckets.extend(Box::pin(self.buckets(std::slice::from_ref(event))).await);
                }
                buckets
            }
        }
    }

    fn hashed(&self, event: &RecordedEvent) -> u32 {
        let key = match self {
            Keying::Single | Keying::Sharder { .. } => return 0,
            Keying::Stream => event.stream.as_bytes(),
            Keying::Correlation(config) => {
                let id = config.correlation_id(&event.metadata);
                return bucket_of_key(id.as_deref().unwrap_or(&event.stream).as_bytes());
            }
        };
        bucket_of_key(key)
    }
}

fn bucket_of_key(key: &[u8]) -> u32 {
    (fnv1a_64(key) % u64::from(BUCKETS)) as u32
}

/// Which consumer takes which message.
pub(super) struct Spread {
    rule: Rule,
    /// Round robin: the consumer to try first next time.
    next: usize,
    /// Bucket → the index of its owning consumer.
    owners: Vec<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Rule {
    RoundRobin,
    DispatchToSingle,
    Buckets,
}

impl Spread {
    pub fn new(strategy: &Strategy) -> Spread {
        let rule = match strategy {
            Strategy::RoundRobin => Rule::RoundRobin,
            Strategy::DispatchToSingle => Rule::DispatchToSingle,
            Strategy::Pinned
            | Strategy::PinnedByCorrelation
            | Strategy::Sharded(_)
            | Strategy::Partitioned { .. } => Rule::Buckets,
        };
        Spread {
            rule,
            next: 0,
            owners: Vec::new(),
        }
    }

    /// Whether a message's consumer depends on its bucket.
    pub fn bucketed(&self) -> bool {
        self.rule == Rule::Buckets
    }

    /// Hands the buckets to `consumers` (by name, in the group's order). Rendezvous hashing:
    /// a bucket goes to the consumer with the highest score for it, so a join or leave moves
    /// only the buckets that consumer wins or held.
    pub fn assign(&mut self, consumers: &[&str]) {
        self.next = 0;
        if !self.bucketed() || consumers.is_empty() {
            self.owners.clear();
            return;
        }
        let seeds: Vec<u64> = consumers
            .iter()
            .map(|name| fnv1a_64(name.as_bytes()))
            .collect();
        self.owners = (0..BUCKETS)
            .map(|bucket| {
                let mut best = (0u64, 0usize);
                for (index, seed) in seeds.iter().enumerate() {
                    let score = mix(seed ^ u64::from(bucket).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    if index == 0 || score > best.0 {
                        best = (score, index);
                    }
                }
                best.1
            })
            .collect();
    }

    /// The consumer that takes a message of `bucket`, given how many more messages each
    /// consumer takes now (`rooms`). A bucket's owner waits while `held_elsewhere(owner)`: the
    /// bucket's earlier messages are still with another consumer, and order comes first.
    pub fn pick(
        &mut self,
        bucket: u32,
        rooms: &[usize],
        held_elsewhere: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        match self.rule {
            Rule::RoundRobin => {
                let count = rooms.len();
                let found = (0..count)
                    .map(|step| (self.next + step) % count)
                    .find(|&index| rooms[index] > 0);
                if let Some(index) = found {
                    self.next = (index + 1) % count;
                }
                found
            }
            Rule::DispatchToSingle => rooms.iter().position(|&room| room > 0),
            Rule::Buckets => {
                let owner = *self.owners.get(bucket as usize)?;
                (rooms.get(owner).is_some_and(|&room| room > 0) && !held_elsewhere(owner))
                    .then_some(owner)
            }
        }
    }
}

/// FNV-1a, 64 bits: a stable hash of keys, the same on every machine and version.
fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64's finaliser: spreads a seed's bits for rendezvous scores.
fn mix(mut value: u64) -> u64 {
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(stream: &str, metadata: &str) -> Arc<RecordedEvent> {
        Arc::new(RecordedEvent {
            stream: stream.into(),
            revision: 0,
            position: 0,
            id: uuid::Uuid::nil(),
            event_type: "T".into(),
            data: b"{}".to_vec(),
            binary: false,
            metadata: metadata.as_bytes().to_vec(),
            created_ms: 0,
            link: None,
        })
    }

    async fn buckets(keying: &Keying, events: &[Arc<RecordedEvent>]) -> Vec<u32> {
        keying
            .buckets(events)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect()
    }

    #[tokio::test]
    async fn pinned_keys_on_the_stream_and_correlation_on_the_configured_property() {
        let events = [
            event("order-1", ""),
            event("order-1", r#"{"$correlationId":"c-9"}"#),
            event("order-2", r#"{"trace":"c-9"}"#),
        ];
        let pinned = buckets(&Keying::Stream, &events).await;
        assert_eq!(pinned[0], pinned[1]);
        assert_eq!(pinned[0], bucket_of_key(b"order-1"));

        let default = Keying::Correlation(IndexConfig::default());
        let by_default = buckets(&default, &events).await;
        assert_eq!(
            by_default[0],
            bucket_of_key(b"order-1"),
            "no id: the stream"
        );
        assert_eq!(by_default[1], bucket_of_key(b"c-9"));
        assert_eq!(by_default[2], bucket_of_key(b"order-2"));

        let trace = Keying::Correlation(IndexConfig {
            correlation_property: "trace".into(),
            ..IndexConfig::default()
        });
        let by_trace = buckets(&trace, &events).await;
        assert_eq!(by_trace[1], bucket_of_key(b"order-1"));
        assert_eq!(by_trace[2], bucket_of_key(b"c-9"));

        assert_eq!(buckets(&Keying::Single, &events).await, vec![0, 0, 0]);
    }

    #[test]
    fn rendezvous_moves_only_the_buckets_of_the_consumer_that_joins() {
        let mut spread = Spread::new(&Strategy::Pinned);
        spread.assign(&["a", "b", "c"]);
        let before = spread.owners.clone();
        for index in 0..3 {
            let owned = before.iter().filter(|&&owner| owner == index).count();
            assert!((1100..1650).contains(&owned), "consumer {index}: {owned}");
        }
        spread.assign(&["a", "b", "c", "d"]);
        for (bucket, (&old, &new)) in before.iter().zip(&spread.owners).enumerate() {
            assert!(
                new == old || new == 3,
                "bucket {bucket} moved from {old} to {new}"
            );
        }
        spread.assign(&["a", "c"]);
        for (&old, &new) in before.iter().zip(&spread.owners) {
            // Consumer "c" was index 2 and is index 1 now.
            match old {
                0 => assert_eq!(new, 0),
                2 => assert_eq!(new, 1),
                _ => {}
            }
        }
    }

    #[test]
    fn a_bucket_waits_for_its_earlier_messages_and_for_room() {
        let mut spread = Spread::new(&Strategy::Pinned);
        spread.assign(&["a", "b"]);
        let bucket = (0..BUCKETS)
            .find(|&b| spread.owners[b as usize] == 1)
            .unwrap();
        assert_eq!(spread.pick(bucket, &[5, 5], |_| false), Some(1));
        assert_eq!(spread.pick(bucket, &[5, 0], |_| false), None, "no room");
        assert_eq!(spread.pick(bucket, &[5, 5], |_| true), None, "held by a");
    }

    #[test]
    fn round_robin_alternates_and_dispatch_to_single_fills_the_first() {
        let mut spread = Spread::new(&Strategy::RoundRobin);
        spread.assign(&["a", "b", "c"]);
        let picks: Vec<_> = (0..5)
            .map(|_| spread.pick(0, &[1, 0, 1], |_| false))
            .collect();
        assert_eq!(picks, [Some(0), Some(2), Some(0), Some(2), Some(0)]);
        let mut single = Spread::new(&Strategy::DispatchToSingle);
        assert_eq!(single.pick(0, &[3, 3], |_| false), Some(0));
        assert_eq!(single.pick(0, &[0, 3], |_| false), Some(1));
        assert_eq!(single.pick(0, &[0, 0], |_| false), None);
    }
}
