//! The whole database as a stream of rows: what a cluster sends a node that joins it or fell
//! behind the log's purge point.
//!
//! Written from one read transaction, so it is one consistent state while the writer goes on;
//! read back into one write transaction that replaces every table, so a node holds either its
//! old state or the snapshot's, never a mix. Every table is listed once below; writing refuses
//! a database holding a table that is not, so a table added without being listed fails the
//! first snapshot (and the tests) instead of going missing on other nodes.
//!
//! Layout: a magic string and a format byte, then per table its number (u8) and row count
//! (u64), then each row as key length (u32), key, value length (u32), value; an end marker
//! (255) closes it.

use std::io::{self, Read, Write};

use redb::{
    Key, ReadTransaction, ReadableTable, TableDefinition, TableError, TableHandle, Value,
    WriteTransaction,
};

use super::StoreError;

const MAGIC: &[u8; 8] = b"refract\0";
const FORMAT: u8 = 1;
const END: u8 = 255;

/// Declares the tables a snapshot carries, each with its number in the format (numbers are
/// never reused).
macro_rules! tables {
    ($($number:literal => $table:path,)*) => {
        fn table_names() -> Vec<&'static str> {
            vec![$($table.name(),)*]
        }

        fn write_tables(txn: &ReadTransaction, out: &mut dyn Write) -> Result<(), StoreError> {
            $(write_table(txn, $table, $number, out)?;)*
            Ok(())
        }

        fn delete_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
            $(txn.delete_table($table)?;)*
            Ok(())
        }

        fn read_table(
            txn: &WriteTransaction,
            number: u8,
            rows: u64,
            input: &mut dyn Read,
        ) -> Result<(), StoreError> {
            match number {
                $($number => read_rows(txn, $table, rows, input),)*
                _ => Err(StoreError::Storage(format!(
                    "the snapshot holds table {number}, which this version does not know"
                ))),
            }
        }
    };
}

tables! {
    0 => super::LOG,
    1 => super::STREAMS,
    2 => super::STREAM_INDEX,
    3 => super::LINKS,
    4 => super::META,
    5 => super::INDEX_CURSORS,
    6 => super::SETTINGS,
    7 => super::projection_data::PROJECTIONS,
    8 => super::projection_data::COMPONENTS,
    9 => super::projection_data::CHECKPOINTS,
    10 => super::projection_data::STATES,
    11 => super::projection_data::ROWS,
    12 => super::projection_data::OUTPUTS,
    13 => super::projection_data::SHARDERS,
    14 => super::projection_data::SHADOW_EVENTS,
    15 => super::projection_data::SHADOW_LINKS,
    16 => super::projection_data::STREAM_OWNERS,
    17 => super::projection_data::OWNED_STREAMS,
    18 => super::projection_data::PARKED,
    19 => super::projection_data::HELD,
    20 => super::group_data::GROUPS,
    21 => super::group_data::PARKED_REASONS,
    22 => super::connector_data::CONNECTORS,
    23 => super::connector_data::CONNECTOR_CHECKPOINTS,
}

/// Writes the state `txn` sees to `out`.
pub(crate) fn write(txn: &ReadTransaction, out: &mut dyn Write) -> Result<(), StoreError> {
    let known = table_names();
    for table in txn.list_tables()? {
        if !known.contains(&table.name()) {
            return Err(StoreError::Storage(format!(
                "table {} is not part of a snapshot",
                table.name()
            )));
        }
    }
    out.write_all(MAGIC).map_err(StoreError::storage)?;
    out.write_all(&[FORMAT]).map_err(StoreError::storage)?;
    write_tables(txn, out)?;
    out.write_all(&[END]).map_err(StoreError::storage)?;
    Ok(())
}

/// Replaces every table `txn` can write with the snapshot's.
pub(crate) fn read(txn: &WriteTransaction, input: &mut dyn Read) -> Result<(), StoreError> {
    let mut magic = [0; 9];
    input.read_exact(&mut magic).map_err(damaged)?;
    if &magic[..8] != MAGIC || magic[8] != FORMAT {
        return Err(StoreError::Storage(
            "not a snapshot of this version's format".into(),
        ));
    }
    delete_tables(txn)?;
    loop {
        let number = read_u8(input)?;
        if number == END {
            return Ok(());
        }
        let rows = read_u64(input)?;
        read_table(txn, number, rows, input)?;
    }
}

fn write_table<K: Key + 'static, V: Value + 'static>(
    txn: &ReadTransaction,
    definition: TableDefinition<K, V>,
    number: u8,
    out: &mut dyn Write,
) -> Result<(), StoreError> {
    let table = match txn.open_table(definition) {
        Ok(table) => table,
        Err(TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(error) => return Err(error.into()),
    };
    let rows = redb::ReadableTableMetadata::len(&table)?;
    let mut put = |bytes: &[u8]| out.write_all(bytes).map_err(StoreError::storage);
    put(&[number])?;
    put(&rows.to_le_bytes())?;
    for row in table.iter()? {
        let (key, value) = row?;
        let key = key.value();
        let key = K::as_bytes(&key);
        let value = value.value();
        let value = V::as_bytes(&value);
        for bytes in [key.as_ref(), value.as_ref()] {
            put(&(bytes.len() as u32).to_le_bytes())?;
            put(bytes)?;
        }
    }
    Ok(())
}

fn read_rows<K: Key + 'static, V: Value + 'static>(
    txn: &WriteTransaction,
    definition: TableDefinition<K, V>,
    rows: u64,
    input: &mut dyn Read,
) -> Result<(), StoreError> {
    let mut table = txn.open_table(definition)?;
    let (mut key, mut value) = (Vec::new(), Vec::new());
    for _ in 0..rows {
        read_bytes(input, &mut key)?;
        read_bytes(input, &mut value)?;
        table.insert(K::from_bytes(&key), V::from_bytes(&value))?;
    }
    Ok(())
}

fn read_bytes(input: &mut dyn Read, out: &mut Vec<u8>) -> Result<(), StoreError> {
    let mut length = [0; 4];
    input.read_exact(&mut length).map_err(damaged)?;
    out.resize(u32::from_le_bytes(length) as usize, 0);
    input.read_exact(out).map_err(damaged)
}

fn read_u8(input: &mut dyn Read) -> Result<u8, StoreError> {
    let mut byte = [0; 1];
    input.read_exact(&mut byte).map_err(damaged)?;
    Ok(byte[0])
}

fn read_u64(input: &mut dyn Read) -> Result<u64, StoreError> {
    let mut bytes = [0; 8];
    input.read_exact(&mut bytes).map_err(damaged)?;
    Ok(u64::from_le_bytes(bytes))
}

fn damaged(error: io::Error) -> StoreError {
    StoreError::Storage(format!("the snapshot is cut short or damaged: {error}"))
}

/// Every row of every table, as bytes, for comparing two databases in tests.
#[cfg(test)]
pub(crate) fn rows(db: &redb::Database) -> Vec<u8> {
    let mut out = Vec::new();
    write(&redb::ReadableDatabase::begin_read(db).unwrap(), &mut out).unwrap();
    out
}

#[cfg(test)]
mod tests {
    use redb::ReadableDatabase;

    use super::*;

    #[test]
    fn a_database_reads_back_row_for_row_and_replaces_what_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let source = redb::Database::create(dir.path().join("source.redb")).unwrap();
        let txn = source.begin_write().unwrap();
        {
            let mut log = txn.open_table(super::super::LOG).unwrap();
            log.insert(0, b"first".as_slice()).unwrap();
            log.insert(1, b"second".as_slice()).unwrap();
            let mut rows = txn.open_table(super::super::projection_data::ROWS).unwrap();
            rows.insert((3, "table", "key"), b"{}".as_slice()).unwrap();
            let mut meta = txn.open_table(super::super::META).unwrap();
            meta.insert("next_stream_id", 7).unwrap();
        }
        txn.commit().unwrap();
        let snapshot = rows(&source);

        let target = redb::Database::create(dir.path().join("target.redb")).unwrap();
        let txn = target.begin_write().unwrap();
        {
            let mut log = txn.open_table(super::super::LOG).unwrap();
            log.insert(5, b"not in the snapshot".as_slice()).unwrap();
            let mut groups = txn.open_table(super::super::group_data::GROUPS).unwrap();
            groups.insert(("s", "g"), b"gone".as_slice()).unwrap();
        }
        txn.commit().unwrap();
        let txn = target.begin_write().unwrap();
        read(&txn, &mut snapshot.as_slice()).unwrap();
        txn.commit().unwrap();
        assert_eq!(rows(&target), snapshot);
    }

    #[test]
    fn a_table_not_listed_fails_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("db.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(TableDefinition::<u64, u64>::new("unlisted"))
            .unwrap();
        txn.commit().unwrap();
        let error = write(&db.begin_read().unwrap(), &mut Vec::new()).unwrap_err();
        assert!(error.to_string().contains("table unlisted is not part"));
    }

    #[test]
    fn a_cut_short_snapshot_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("db.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(super::super::LOG)
            .unwrap()
            .insert(0, b"kept".as_slice())
            .unwrap();
        txn.commit().unwrap();
        let before = rows(&db);
        let txn = db.begin_write().unwrap();
        let cut = &before[..before.len() - 3];
        let error = read(&txn, &mut &cut[..]).unwrap_err();
        assert!(error.to_string().contains("cut short"));
        drop(txn);
        assert_eq!(rows(&db), before);
    }
}
