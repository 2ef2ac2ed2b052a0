//! Catch-up then live reading of a stream or of `$all`.
//!
//! A subscription is a cursor over committed data and nothing else: it reads a batch from the
//! store, hands it out, and when a read comes back empty it waits for the head position to move.
//! Because history and live events come from the same reads at the same cursor, the switch from
//! one to the other can neither skip nor repeat an event. It holds one batch at a time, and only
//! reads the next when the consumer asks, so a slow consumer costs memory for one batch.

mod shard;

use std::collections::VecDeque;

use tokio::sync::watch;

use crate::store::{AllFilter, Direction, RecordedEvent, Slice, Store, StoreError};
pub use shard::ShardFilter;

/// Events read from the store per round trip.
const BATCH: usize = 256;

/// What a subscription reads.
#[derive(Debug, Clone)]
pub enum Source {
    Stream { name: String, resolve_links: bool },
    All { filter: AllFilter },
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// From the first event.
    Beginning,
    /// After everything already written: live events only.
    End,
    /// From this revision (stream) or position (`$all`), inclusive.
    At(u64),
}

/// One step of a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// An event and its id in the subscribed sequence: the revision in the stream (for a link,
    /// the link's revision) or the position in `$all`.
    Event { id: u64, event: Box<RecordedEvent> },
    /// Everything written before this point has been delivered; live events follow.
    CaughtUp,
}

pub struct Subscription {
    store: Store,
    source: Source,
    cursor: u64,
    head: watch::Receiver<u64>,
    caught_up: bool,
    pending: VecDeque<Item>,
    shard: Option<ShardFilter>,
    /// Events read per round trip.
    batch: usize,
}

impl Subscription {
    /// Starts a subscription. Blocking work is done on the blocking pool.
    pub async fn start(store: Store, source: Source, start: Start) -> Result<Self, StoreError> {
        let head = store.watch_head();
        let cursor = match &source {
            Source::Stream { name, .. } => {
                // A stream that does not exist yet may be subscribed to; a tombstoned one not.
                let name = name.clone();
                let last = store
                    .blocking(move |store| store.last_revision(&name))
                    .await?;
                match start {
                    Start::Beginning => 0,
                    Start::End => last.map_or(0, |revision| revision + 1),
                    Start::At(revision) => revision,
                }
            }
            Source::All { .. } => match start {
                Start::Beginning => 0,
                Start::End => store.head(),
                Start::At(position) => position,
            },
        };
        Ok(Subscription {
            store,
            source,
            cursor,
            head,
            caught_up: false,
            pending: VecDeque::new(),
            shard: None,
            batch: BATCH,
        })
    }

    /// Reads up to `batch` events per round trip to the store instead of the default.
    pub fn with_batch(self, batch: usize) -> Self {
        Subscription {
            batch: batch.max(1),
            ..self
        }
    }

    /// Delivers only the events of one shard.
    pub fn on_shard(self, shard: ShardFilter) -> Self {
        Subscription {
            shard: Some(shard),
            ..self
        }
    }

    /// The next event, or the caught-up marker; waits for new events when there are none.
    pub async fn next(&mut self) -> Result<Item, StoreError> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Ok(item);
            }
            // Mark the head seen before reading, so a commit after the read wakes us.
            self.head.borrow_and_update();
            let slice = self.read().await?;
            self.cursor = slice.cursor;
            let at_end = slice.next.is_none();
            self.pending.extend(slice.events.into_iter().map(|event| {
                let id = match (&self.source, &event.link) {
                    (Source::All { .. }, _) => event.position,
                    (Source::Stream { .. }, Some(link)) => link.revision,
                    (Source::Stream { .. }, None) => event.revision,
                };
                Item::Event {
                    id,
                    event: Box::new(event),
                }
            }));
            if !self.pending.is_empty() || !at_end {
                continue;
            }
            if !self.caught_up {
                self.caught_up = true;
                return Ok(Item::CaughtUp);
            }
            self.head
                .changed()
                .await
                .map_err(|_| StoreError::ShuttingDown)?;
        }
    }

    /// The next item and whatever else is already read, without waiting for more.
    pub async fn next_batch(&mut self) -> Result<Vec<Item>, StoreError> {
        let first = self.next().await?;
        let mut items = Vec::with_capacity(1 + self.pending.len());
        items.push(first);
        items.extend(self.pending.drain(..));
        Ok(items)
    }

    async fn read(&self) -> Result<Slice, StoreError> {
        let (source, cursor, batch) = (self.source.clone(), self.cursor, self.batch);
        let shard = self.shard.clone();
        self.store
            .blocking(move |store| {
                let mut slice = Self::read_source(store, &source, cursor, batch)?;
                if let Some(shard) = &shard {
                    slice.events = shard.retain(std::mem::take(&mut slice.events))?;
                }
                Ok(slice)
            })
            .await
    }

    fn read_source(
        store: &Store,
        source: &Source,
        cursor: u64,
        batch: usize,
    ) -> Result<Slice, StoreError> {
        match source {
            Source::All { filter } => {
                store.read_all(Some(cursor), Direction::Forward, batch, filter)
            }
            Source::Stream {
                name,
                resolve_links,
            } => {
                match store.read_stream(
                    name,
                    Some(cursor),
                    Direction::Forward,
                    batch,
                    *resolve_links,
                ) {
                    // Not written yet, or soft-deleted: nothing to deliver until it is written.
                    Err(StoreError::StreamNotFound(_)) => Ok(Slice {
                        cursor,
                        ..Slice::default()
                    }),
                    other => other,
                }
            }
        }
    }
}
