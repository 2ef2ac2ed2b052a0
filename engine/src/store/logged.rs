//! The writer's batches as write-ahead log entries.
//!
//! An entry holds the batch's operations, as queued, and the time the writer stamped it with.
//! Applying an operation is deterministic given the database before it and that time (positions,
//! revisions and stream ids are assigned by applying it), so replaying an entry over the state
//! it was first applied to gives the same state and the same answers.
//!
//! Every [`Operation`](super::writer::Operation) is listed here once; the list is the entry's
//! format, so operations are only ever added at its end.

use serde::{Deserialize, Serialize};

use super::StoreError;
use super::writer::{Job, unanswered};

/// Declares the operations an entry can hold: the owned form read back, the borrowed form
/// written, and how each operation names itself.
macro_rules! commands {
    ($($(#[$attribute:meta])* $variant:ident($operation:ty),)*) => {
        /// An operation read back from the log.
        #[derive(Deserialize)]
        pub(super) enum Command {
            $($(#[$attribute])* $variant($operation),)*
        }

        /// An operation as written to the log, borrowed from the queued request.
        #[derive(Serialize)]
        pub(super) enum CommandRef<'a> {
            $($(#[$attribute])* $variant(&'a $operation),)*
        }

        /// How an operation appears in the log.
        pub(super) trait Logged {
            fn command(&self) -> CommandRef<'_>;
        }

        $(
            $(#[$attribute])*
            impl Logged for $operation {
                fn command(&self) -> CommandRef<'_> {
                    CommandRef::$variant(self)
                }
            }
        )*

        impl Command {
            /// The operation as a job whose answer nobody waits for.
            fn into_job(self) -> Box<dyn Job> {
                match self {
                    $($(#[$attribute])* Command::$variant(operation) => unanswered(operation),)*
                }
            }
        }
    };
}

commands! {
    Append(super::streams::Append),
    SetMetadata(super::streams::SetMetadata),
    Delete(super::streams::Delete),
    SaveGroup(super::group_data::SaveGroup),
    RemoveGroup(super::group_data::RemoveGroup),
    ParkMessages(super::group_data::ParkMessages),
    SaveSharder(super::sharder_data::SaveSharder),
    RemoveSharder(super::sharder_data::RemoveSharder),
    SetIndexRunning(super::indexes::SetRunning),
    ResetIndex(super::indexes::Reset),
    SetIndexConfig(super::indexes::SetConfig),
    SaveProjection(super::projection_data::SaveProjection),
    RemoveProjection(super::projection_data::RemoveProjection),
    CommitProjection(super::projection_data::CommitProjection),
    SkipEvent(super::projection_data::SkipEvent),
    BuildProjection(super::projection_data::BuildProjection),
    SaveConnector(super::connector_data::SaveConnector),
    RemoveConnector(super::connector_data::RemoveConnector),
    CommitConnector(super::connector_data::CommitConnector),
    #[cfg(test)]
    WritesThenFails(super::writer::tests::WritesThenFails),
    #[cfg(test)]
    Refused(super::writer::tests::Refused),
}

#[derive(Serialize)]
struct EntryRef<'a> {
    now_ms: i64,
    commands: Vec<CommandRef<'a>>,
}

#[derive(Deserialize)]
struct Entry {
    now_ms: i64,
    commands: Vec<Command>,
}

/// Encodes a batch into `out` (cleared first).
pub(super) fn encode(
    now_ms: i64,
    batch: &[Box<dyn Job>],
    out: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let entry = EntryRef {
        now_ms,
        commands: batch.iter().map(|job| job.command()).collect(),
    };
    out.clear();
    let written = postcard::to_extend(&entry, std::mem::take(out)).map_err(StoreError::storage)?;
    *out = written;
    Ok(())
}

/// Decodes an entry into its time and its operations, ready to apply again.
pub(super) fn decode(payload: &[u8]) -> Result<(i64, Vec<Box<dyn Job>>), StoreError> {
    let entry: Entry = postcard::from_bytes(payload).map_err(StoreError::storage)?;
    let jobs = entry.commands.into_iter().map(Command::into_job).collect();
    Ok((entry.now_ms, jobs))
}

/// Checks that an entry reads back as it was written: every entry the tests log goes through
/// here, so an operation whose fields do not survive the log's encoding fails them.
#[cfg(test)]
pub(super) fn assert_round_trip(payload: &[u8]) {
    let (now_ms, jobs) = decode(payload).expect("a logged entry decodes");
    let mut again = Vec::new();
    encode(now_ms, &jobs, &mut again).expect("a decoded entry encodes");
    assert_eq!(
        payload,
        &again[..],
        "a logged entry changed on its way back"
    );
}

/// Values whose serde form is made for JSON (optional fields left out, free-form objects):
/// carried in the log as JSON text.
pub(super) mod as_json {
    use serde::de::DeserializeOwned;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(value).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(&text)
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<T, D::Error> {
        let text = String::deserialize(deserializer)?;
        serde_json::from_str(&text).map_err(serde::de::Error::custom)
    }
}
