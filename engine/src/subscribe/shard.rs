//! Shard subscriptions and reads: only the events a sharder places on one shard, in the order
//! of the source, with their usual revisions or positions (Kafka's partitions, over any stream
//! and without creating them first).

use std::sync::Arc;

use crate::sharding::Sharder;
use crate::store::{Direction, RecordedEvent, Slice, StoreError};

/// Most store reads one sharded page may take to find its events.
const MAX_SCANS: usize = 64;
/// Most events one of those reads asks for.
const SCAN: usize = 4096;

/// Shard `shard` of `shards`, as `sharder` places events.
#[derive(Clone)]
pub struct ShardFilter {
    pub sharder: Arc<Sharder>,
    pub name: String,
    pub shards: u32,
    pub shard: u32,
}

impl ShardFilter {
    /// The events on this shard, in order. Runs the sharder once for the batch: call it off the
    /// async workers.
    pub fn retain(&self, events: Vec<RecordedEvent>) -> Result<Vec<RecordedEvent>, StoreError> {
        if events.is_empty() {
            return Ok(events);
        }
        let shards = self
            .sharder
            .shard_recorded(&events, self.shards)
            .map_err(|error| {
                StoreError::InvalidRequest(format!("the sharder {:?} failed: {error:#}", self.name))
            })?;
        Ok(events
            .into_iter()
            .zip(shards)
            .filter(|(_, shard)| *shard == self.shard)
            .map(|(event, _)| event)
            .collect())
    }

    /// A page of up to `limit` events of this shard, read with `read(from, count)` until the
    /// page is full, the source ends, or [`MAX_SCANS`] reads were made (then `next` says where
    /// to go on). `id_of` gives an event's revision or position in the source.
    pub fn read_page(
        &self,
        from: Option<u64>,
        direction: Direction,
        limit: usize,
        mut read: impl FnMut(Option<u64>, usize) -> Result<Slice, StoreError>,
        id_of: impl Fn(&RecordedEvent) -> u64,
    ) -> Result<Slice, StoreError> {
        let mut page = Slice {
            next: from,
            ..Slice::default()
        };
        let mut from = from;
        for _ in 0..MAX_SCANS {
            let wanted = limit - page.events.len();
            let count = wanted
                .saturating_mul(self.shards as usize)
                .clamp(wanted, SCAN);
            let slice = read(from, count)?;
            page.last_revision = slice.last_revision;
            page.cursor = slice.cursor;
            page.next = slice.next;
            let mut kept = self.retain(slice.events)?;
            if kept.len() > wanted {
                kept.truncate(wanted);
                let last = id_of(kept.last().expect("a kept event"));
                page.next = match direction {
                    Direction::Forward => last.checked_add(1),
                    Direction::Backward => last.checked_sub(1),
                };
            }
            page.events.extend(kept);
            from = page.next;
            if page.events.len() == limit || from.is_none() {
                break;
            }
        }
        Ok(page)
    }
}
