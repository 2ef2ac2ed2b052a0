//! The byte layouts of the two record kinds the store keeps: events in the log and stream states.
//!
//! Both are hand-encoded because they sit on the hottest paths (every append writes one of each,
//! every read decodes one event per result) and their shape is small and fixed. Every layout starts
//! with a version byte so the format can evolve without a migration of old rows.

use uuid::Uuid;

const EVENT_FORMAT: u8 = 1;
const STATE_FORMAT: u8 = 1;

/// Flag bit: the event's data is opaque bytes rather than JSON text.
const FLAG_BINARY: u8 = 1;

/// An event as stored in the log. Borrowed from the page it was read from; decode is zero-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRecord<'a> {
    pub stream: &'a str,
    pub revision: u64,
    pub created_ms: i64,
    pub id: Uuid,
    pub event_type: &'a str,
    /// JSON text (an object) or empty when the event has no metadata.
    pub metadata: &'a [u8],
    /// JSON text, or opaque bytes when `binary`.
    pub data: &'a [u8],
    pub binary: bool,
}

// Layout: format u8 | flags u8 | revision u64 | created_ms i64 | id [16] | stream_len u16 |
// type_len u16 | metadata_len u32 | stream | type | metadata | data (the rest).
const EVENT_HEADER: usize = 1 + 1 + 8 + 8 + 16 + 2 + 2 + 4;

impl<'a> EventRecord<'a> {
    pub fn encoded_len(&self) -> usize {
        EVENT_HEADER
            + self.stream.len()
            + self.event_type.len()
            + self.metadata.len()
            + self.data.len()
    }

    /// Appends the encoding to `out`. Stream names, types and metadata are bounded by the API's
    /// validation well below the field widths; an oversized field is a programming error.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.push(EVENT_FORMAT);
        out.push(if self.binary { FLAG_BINARY } else { 0 });
        out.extend_from_slice(&self.revision.to_le_bytes());
        out.extend_from_slice(&self.created_ms.to_le_bytes());
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(
            &u16::try_from(self.stream.len())
                .expect("stream name length")
                .to_le_bytes(),
        );
        out.extend_from_slice(
            &u16::try_from(self.event_type.len())
                .expect("event type length")
                .to_le_bytes(),
        );
        out.extend_from_slice(
            &u32::try_from(self.metadata.len())
                .expect("metadata length")
                .to_le_bytes(),
        );
        out.extend_from_slice(self.stream.as_bytes());
        out.extend_from_slice(self.event_type.as_bytes());
        out.extend_from_slice(self.metadata);
        out.extend_from_slice(self.data);
    }

    pub fn decode(bytes: &'a [u8]) -> Result<Self, CorruptRecord> {
        let mut reader = Reader { bytes, at: 0 };
        if reader.u8()? != EVENT_FORMAT {
            return Err(CorruptRecord("unknown event record format"));
        }
        let flags = reader.u8()?;
        let revision = reader.u64()?;
        let created_ms = reader.u64()? as i64;
        let id = Uuid::from_bytes(reader.take(16)?.try_into().expect("16 bytes"));
        let stream_len = reader.u16()? as usize;
        let type_len = reader.u16()? as usize;
        let metadata_len = reader.u32()? as usize;
        let stream = reader.str(stream_len)?;
        let event_type = reader.str(type_len)?;
        let metadata = reader.take(metadata_len)?;
        let data = reader.rest();
        Ok(EventRecord {
            stream,
            revision,
            created_ms,
            id,
            event_type,
            metadata,
            data,
            binary: flags & FLAG_BINARY != 0,
        })
    }
}

/// What the store knows about one stream.
///
/// Appends do not rewrite it: the next revision is derived from the stream's last index entry
/// when the state is loaded, so an append to an existing stream dirties one index page and the
/// log's tail, not a third, random page of the `streams` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamState {
    pub id: u64,
    /// The revision the next event gets; `0` while the stream has never had an event.
    /// Not stored: filled in from the index by [`crate::store::load_stream`].
    pub next_revision: u64,
    /// Revisions below this were removed by a soft delete.
    pub deleted_before: u64,
    /// Soft-deleted and not written since: reads answer "not found".
    pub soft_deleted: bool,
    /// Hard-deleted: reads and writes answer "deleted" forever.
    pub tombstoned: bool,
    /// An output stream of a built-in index: its entries live, packed, in the `links` table.
    pub links: bool,
    /// The stream's metadata as JSON text (see [`crate::store::StreamMetadata`]), or empty.
    pub metadata: Vec<u8>,
}

const FLAG_SOFT_DELETED: u8 = 1;
const FLAG_TOMBSTONED: u8 = 2;
const FLAG_LINKS: u8 = 4;

impl StreamState {
    pub fn last_revision(&self) -> Option<u64> {
        self.next_revision.checked_sub(1)
    }

    /// The last revision as optimistic concurrency sees it: a soft-deleted stream reads as absent.
    pub fn current_revision(&self) -> Option<u64> {
        if self.soft_deleted {
            None
        } else {
            self.last_revision()
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + 16 + self.metadata.len());
        out.push(STATE_FORMAT);
        let mut flags = 0;
        if self.soft_deleted {
            flags |= FLAG_SOFT_DELETED;
        }
        if self.tombstoned {
            flags |= FLAG_TOMBSTONED;
        }
        if self.links {
            flags |= FLAG_LINKS;
        }
        out.push(flags);
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.deleted_before.to_le_bytes());
        out.extend_from_slice(&self.metadata);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CorruptRecord> {
        let mut reader = Reader { bytes, at: 0 };
        if reader.u8()? != STATE_FORMAT {
            return Err(CorruptRecord("unknown stream state format"));
        }
        let flags = reader.u8()?;
        Ok(StreamState {
            id: reader.u64()?,
            next_revision: 0,
            deleted_before: reader.u64()?,
            soft_deleted: flags & FLAG_SOFT_DELETED != 0,
            tombstoned: flags & FLAG_TOMBSTONED != 0,
            links: flags & FLAG_LINKS != 0,
            metadata: reader.rest().to_vec(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("corrupt record: {0}")]
pub struct CorruptRecord(&'static str);

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], CorruptRecord> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len());
        let end = end.ok_or(CorruptRecord("truncated record"))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn rest(&mut self) -> &'a [u8] {
        let slice = &self.bytes[self.at..];
        self.at = self.bytes.len();
        slice
    }

    fn u8(&mut self) -> Result<u8, CorruptRecord> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, CorruptRecord> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, CorruptRecord> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, CorruptRecord> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn str(&mut self, len: usize) -> Result<&'a str, CorruptRecord> {
        std::str::from_utf8(self.take(len)?).map_err(|_| CorruptRecord("invalid UTF-8 in record"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EventRecord<'static> {
        EventRecord {
            stream: "order-123",
            revision: 41,
            created_ms: 1_795_000_000_123,
            id: Uuid::from_u128(0x8c7f0c3e_3f4d_4a8e_9a0b_1f2e3d4c5b6a),
            event_type: "OrderPlaced",
            metadata: br#"{"$correlationId":"c-1"}"#,
            data: br#"{"total":42}"#,
            binary: false,
        }
    }

    #[test]
    fn event_round_trips() {
        let event = sample();
        let mut bytes = Vec::new();
        event.encode_into(&mut bytes);
        assert_eq!(bytes.len(), event.encoded_len());
        assert_eq!(EventRecord::decode(&bytes).unwrap(), event);

        let binary = EventRecord {
            data: &[0, 255, 7],
            binary: true,
            metadata: b"",
            ..event
        };
        let mut bytes = Vec::new();
        binary.encode_into(&mut bytes);
        assert_eq!(EventRecord::decode(&bytes).unwrap(), binary);
    }

    #[test]
    fn truncated_or_foreign_bytes_are_rejected_not_misread() {
        let mut bytes = Vec::new();
        sample().encode_into(&mut bytes);
        // Cutting inside the header or the variable fields must fail; only the data may be short.
        let data_start = bytes.len() - sample().data.len();
        for cut in 0..data_start {
            assert!(EventRecord::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        bytes[0] = 99;
        assert!(EventRecord::decode(&bytes).is_err());
    }

    #[test]
    fn stream_state_round_trips() {
        let state = StreamState {
            id: 7,
            next_revision: 0,
            deleted_before: 3,
            soft_deleted: true,
            tombstoned: false,
            links: true,
            metadata: br#"{"max_count":5}"#.to_vec(),
        };
        assert_eq!(StreamState::decode(&state.encode()).unwrap(), state);
        let state = StreamState {
            next_revision: 12,
            ..state
        };
        assert_eq!(state.last_revision(), Some(11));
        assert_eq!(state.current_revision(), None);
        assert_eq!(StreamState::default().last_revision(), None);
    }
}
