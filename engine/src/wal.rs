//! The write-ahead log: a segmented, preallocated, checksummed sequence of entries, each one
//! batch of the writer, numbered by `index` and stamped with the `term` it was written in.
//!
//! An entry on disk is a 24-byte header — payload length, CRC-32 of everything after the CRC,
//! term, index — then the payload. Segments are files named by their first index and made full
//! size when created, so appending never changes a file's size for `fdatasync` to record
//! (reserving the blocks as well, with `fallocate`, measured no faster). Reading stops at the
//! first entry whose length is zero, whose checksum fails or whose index is not the next one:
//! a torn tail was never synced, so never acknowledged. Opening cuts the log there and clears
//! what lies past it, so stale bytes can never pass for entries later.
//!
//! The log can also drop entries after an index (a follower's conflicting tail), drop segments
//! before one (once the database holds them durably) and keep small state beside it, such as
//! a vote: what a replicated log needs from its storage.

use std::io;
use std::sync::Arc;

use crate::disk::{LogFile, LogStorage};

/// Bytes of a segment when created, by default; an entry larger than that gets a segment of
/// its own size.
pub const SEGMENT_BYTES: u64 = 64 << 20;
const HEADER_BYTES: usize = 24;
const SEGMENT_SUFFIX: &str = ".wal";

/// One entry, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub term: u64,
    pub index: u64,
    pub payload: Vec<u8>,
}

struct Segment {
    first_index: u64,
    name: String,
    /// Shared with a sync running on another thread.
    file: Arc<dyn LogFile>,
    /// Where the next entry goes (the end of the last entry in it).
    end: u64,
    /// Where each of its entries starts, in index order: a read of recent entries reads only
    /// their bytes.
    offsets: Vec<u64>,
    capacity: u64,
    /// Whether bytes were written since its last sync.
    dirty: bool,
}

/// The segment files a sync must flush.
pub struct PendingSync(Vec<Arc<dyn LogFile>>);

impl PendingSync {
    pub fn run(self) -> io::Result<()> {
        self.0.iter().try_for_each(|file| file.sync())
    }
}

/// The log, in storage of its own.
pub struct Wal {
    storage: Box<dyn LogStorage>,
    segment_bytes: u64,
    /// Oldest first; the last one takes appends.
    segments: Vec<Segment>,
    next_index: u64,
    last_term: u64,
    /// Reused to lay out each entry, header and payload, for one write.
    frame: Vec<u8>,
}

impl Wal {
    /// Opens the log in `storage`, cutting it at the first entry that is torn. An empty log
    /// numbers its first entry `next_index_if_empty`. New segments get `segment_bytes`.
    pub fn open(
        storage: Box<dyn LogStorage>,
        next_index_if_empty: u64,
        segment_bytes: u64,
    ) -> io::Result<Wal> {
        let mut firsts = Vec::new();
        for name in storage.names()? {
            if let Some(first) = name
                .strip_suffix(SEGMENT_SUFFIX)
                .and_then(|stem| stem.parse::<u64>().ok())
            {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let mut wal = Wal {
            storage,
            segment_bytes,
            segments: Vec::new(),
            next_index: next_index_if_empty,
            last_term: 0,
            frame: Vec::new(),
        };
        let mut torn = false;
        for first in firsts {
            let name = segment_name(first);
            if torn || (!wal.segments.is_empty() && first != wal.next_index) {
                // Past the end of the log: never synced as part of it.
                wal.storage.remove(&name)?;
                torn = true;
                continue;
            }
            let file = wal.storage.open(&name)?;
            let capacity = file.size()?;
            let mut segment = Segment {
                first_index: first,
                name,
                file: Arc::from(file),
                end: 0,
                offsets: Vec::new(),
                capacity,
                dirty: false,
            };
            let mut next_index = first;
            let mut last_term = wal.last_term;
            let complete = scan(&*segment.file, 0, capacity, |offset, header, _| {
                if header.index != next_index {
                    return false;
                }
                next_index += 1;
                last_term = header.term;
                segment.offsets.push(offset);
                segment.end = offset + (HEADER_BYTES as u64) + header.length;
                true
            })?;
            if !complete {
                segment.clear_after_end()?;
                torn = true;
            }
            if segment.end == 0 {
                // Nothing of it was synced; the next append makes it again.
                wal.storage.remove(&segment.name)?;
                continue;
            }
            wal.next_index = next_index;
            wal.last_term = last_term;
            wal.segments.push(segment);
        }
        if !torn && let Some(last) = wal.segments.last_mut() {
            // Entries end at zeroed space, but unsynced writes may have reached the disk out
            // of order: an old entry past the gap could one day line up as the next one.
            last.clear_after_end()?;
        }
        Ok(wal)
    }

    /// The index the next entry gets.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// The first index still held, if any entry is.
    pub fn first_index(&self) -> Option<u64> {
        let first = self.segments.first()?.first_index;
        (first < self.next_index).then_some(first)
    }

    /// The term of the last entry (0 for a log that never held one).
    pub fn last_term(&self) -> u64 {
        self.last_term
    }

    /// Writes an entry and answers its index. It is durable once [`Wal::sync`] returns.
    pub fn append(&mut self, term: u64, payload: &[u8]) -> io::Result<u64> {
        let index = self.next_index;
        let needed = (HEADER_BYTES + payload.len()) as u64;
        let roll = match self.segments.last() {
            Some(segment) => segment.end + needed > segment.capacity,
            None => true,
        };
        if roll {
            self.create_segment(index, needed.max(self.segment_bytes))?;
        }
        let frame = &mut self.frame;
        frame.clear();
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&[0; 4]);
        frame.extend_from_slice(&term.to_le_bytes());
        frame.extend_from_slice(&index.to_le_bytes());
        frame.extend_from_slice(payload);
        let checksum = crc32fast::hash(&frame[8..]);
        frame[4..8].copy_from_slice(&checksum.to_le_bytes());
        let segment = self.segments.last_mut().expect("a segment to append to");
        segment.file.write_at(frame, segment.end)?;
        segment.offsets.push(segment.end);
        segment.end += needed;
        segment.dirty = true;
        self.next_index += 1;
        self.last_term = term;
        Ok(index)
    }

    /// Makes every entry appended so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.take_sync().run()
    }

    /// The sync of every entry appended so far, to run on another thread while the caller goes
    /// on. The log counts them as synced from here: a caller whose sync fails must stop using
    /// the log, whose durable end is then unknown.
    pub fn take_sync(&mut self) -> PendingSync {
        let files = self
            .segments
            .iter_mut()
            .filter(|segment| segment.dirty)
            .map(|segment| {
                segment.dirty = false;
                segment.file.clone()
            })
            .collect();
        PendingSync(files)
    }

    /// Reads the entries from `from` (inclusive) to the end, oldest first.
    pub fn read_from(&self, from: u64) -> io::Result<Vec<Entry>> {
        self.read_range(from, u64::MAX)
    }

    /// Reads the entries from `from` (inclusive) to `until` (exclusive) that the log holds,
    /// oldest first.
    pub fn read_range(&self, from: u64, until: u64) -> io::Result<Vec<Entry>> {
        let mut entries = Vec::new();
        for segment in &self.segments {
            let held = segment.offsets.len() as u64;
            let first = from.max(segment.first_index) - segment.first_index;
            let end = until.max(segment.first_index) - segment.first_index;
            let end = end.min(held);
            if first >= end {
                continue;
            }
            // Only the bytes of the entries asked for.
            let start = segment.offsets[first as usize];
            let limit = segment
                .offsets
                .get(end as usize)
                .copied()
                .unwrap_or(segment.end);
            let wanted = entries.len() as u64 + (end - first);
            scan(&*segment.file, start, limit, |_, header, payload| {
                entries.push(Entry {
                    term: header.term,
                    index: header.index,
                    payload: payload.to_vec(),
                });
                true
            })?;
            if entries.len() as u64 != wanted {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("log segment {} cannot be read back whole", segment.name),
                ));
            }
        }
        Ok(entries)
    }

    /// Drops every entry after `index`; the next append gets `index + 1`.
    pub fn truncate_after(&mut self, index: u64) -> io::Result<()> {
        if index + 1 >= self.next_index {
            return Ok(());
        }
        while let Some(segment) = self.segments.last() {
            if segment.first_index <= index {
                break;
            }
            let segment = self.segments.pop().expect("a last segment");
            self.storage.remove(&segment.name)?;
        }
        let mut last_term = 0;
        if let Some(segment) = self.segments.last_mut() {
            // It holds `index` (later segments are gone): the entry there is the new last one.
            let kept = (index + 1 - segment.first_index) as usize;
            let last = segment.offsets[kept - 1];
            let end = segment.offsets.get(kept).copied().unwrap_or(segment.end);
            let mut read = false;
            scan(&*segment.file, last, end, |_, header, _| {
                last_term = header.term;
                read = true;
                false
            })?;
            if !read {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("log entry {index} cannot be read back"),
                ));
            }
            segment.end = end;
            segment.offsets.truncate(kept);
            segment.clear_after_end()?;
        }
        self.next_index = index + 1;
        self.last_term = last_term;
        self.storage.sync()
    }

    /// Drops the segments whose entries all come before `index` (the database holds them).
    pub fn purge_before(&mut self, index: u64) -> io::Result<()> {
        while self.segments.len() > 1 && self.segments[1].first_index <= index {
            let segment = self.segments.remove(0);
            self.storage.remove(&segment.name)?;
        }
        Ok(())
    }

    /// Stores a small piece of state beside the log (a vote, where the log was purged to)
    /// durably, replacing what was kept under that name before.
    pub fn save_state(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        debug_assert!(!name.ends_with(SEGMENT_SUFFIX), "state is not a segment");
        self.storage.replace(name, bytes)
    }

    /// The state kept last under `name`, if any.
    pub fn state(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        self.storage.read(name)
    }

    /// Drops every entry; the next append gets `next_index`.
    pub fn reset(&mut self, next_index: u64) -> io::Result<()> {
        for segment in self.segments.drain(..) {
            self.storage.remove(&segment.name)?;
        }
        self.next_index = next_index;
        self.last_term = 0;
        self.storage.sync()
    }

    fn create_segment(&mut self, first_index: u64, capacity: u64) -> io::Result<()> {
        let name = segment_name(first_index);
        // Its name and size survive a power cut before entries in it are acknowledged.
        let file = self.storage.create(&name, capacity)?;
        self.segments.push(Segment {
            first_index,
            name,
            file: Arc::from(file),
            end: 0,
            offsets: Vec::new(),
            capacity,
            dirty: false,
        });
        Ok(())
    }
}

impl Segment {
    /// Zeroes everything past `end`, so nothing written there before reads as an entry.
    fn clear_after_end(&mut self) -> io::Result<()> {
        self.file.zero_from(self.end)
    }
}

fn segment_name(first_index: u64) -> String {
    format!("{first_index:020}{SEGMENT_SUFFIX}")
}

struct Header {
    length: u64,
    term: u64,
    index: u64,
}

/// Calls `visit` with each whole entry of `file` from `start` to `limit`, in order, until it answers
/// false; answers whether the entries ended cleanly (at zeroed space, or too close to `limit`
/// for a header: appending rolls over to a new segment there).
fn scan(
    file: &dyn LogFile,
    start: u64,
    limit: u64,
    mut visit: impl FnMut(u64, &Header, &[u8]) -> bool,
) -> io::Result<bool> {
    const CHUNK: usize = 1 << 20;
    let mut offset = start;
    let mut buffer = Vec::new();
    let mut buffer_start = start;
    // Reads `length` bytes at `at` through a buffer that holds at least a chunk ahead.
    let mut read = |at: u64, length: usize, buffer: &mut Vec<u8>| -> io::Result<Option<Vec<u8>>> {
        if at + length as u64 > limit {
            return Ok(None);
        }
        let buffered_end = buffer_start + buffer.len() as u64;
        if at < buffer_start || at + length as u64 > buffered_end {
            let size = (length.max(CHUNK) as u64).min(limit - at) as usize;
            buffer.resize(size, 0);
            file.read_at(buffer, at)?;
            buffer_start = at;
        }
        let start = (at - buffer_start) as usize;
        Ok(Some(buffer[start..start + length].to_vec()))
    };
    loop {
        let Some(header_bytes) = read(offset, HEADER_BYTES, &mut buffer)? else {
            return Ok(true);
        };
        let length = u32::from_le_bytes(header_bytes[0..4].try_into().expect("4 bytes")) as u64;
        let checksum = u32::from_le_bytes(header_bytes[4..8].try_into().expect("4 bytes"));
        if length == 0 && checksum == 0 {
            // Preallocated space: the clean end of the segment's entries.
            return Ok(true);
        }
        let header = Header {
            length,
            term: u64::from_le_bytes(header_bytes[8..16].try_into().expect("8 bytes")),
            index: u64::from_le_bytes(header_bytes[16..24].try_into().expect("8 bytes")),
        };
        let Some(payload) = read(offset + HEADER_BYTES as u64, length as usize, &mut buffer)?
        else {
            return Ok(false);
        };
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header_bytes[8..]);
        hasher.update(&payload);
        if hasher.finalize() != checksum {
            return Ok(false);
        }
        if !visit(offset, &header, &payload) {
            return Ok(false);
        }
        offset += HEADER_BYTES as u64 + length;
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    use super::*;
    use crate::disk::Directory;

    fn open(dir: &Path, next_index_if_empty: u64) -> Wal {
        let storage = Directory::open(dir.to_path_buf()).unwrap();
        Wal::open(Box::new(storage), next_index_if_empty, SEGMENT_BYTES).unwrap()
    }

    /// Writes `count` entries of 100 bytes (124 with their header) to a log of `segment_bytes`
    /// segments in `dir`, syncs them and closes the log.
    fn write_entries(dir: &Path, count: u8, segment_bytes: u64) {
        let storage = Directory::open(dir.to_path_buf()).unwrap();
        let mut wal = Wal::open(Box::new(storage), 1, segment_bytes).unwrap();
        for n in 0..count {
            wal.append(1, &[n; 100]).unwrap();
        }
        wal.sync().unwrap();
    }

    /// Overwrites bytes of the first segment, as a disk might have left them.
    fn overwrite(dir: &Path, offset: u64, bytes: &[u8]) {
        let path = dir.join(format!("{:020}.wal", 1));
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(bytes, offset).unwrap();
    }

    fn payloads(wal: &Wal, from: u64) -> Vec<(u64, Vec<u8>)> {
        wal.read_from(from)
            .unwrap()
            .into_iter()
            .map(|entry| (entry.index, entry.payload))
            .collect()
    }

    #[test]
    fn entries_read_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path(), 1);
        assert_eq!(wal.first_index(), None);
        for n in 0..100u8 {
            let index = wal.append(3, &vec![n; n as usize + 1]).unwrap();
            assert_eq!(index, n as u64 + 1);
        }
        wal.sync().unwrap();
        drop(wal);
        let wal = open(dir.path(), 1);
        assert_eq!(wal.next_index(), 101);
        assert_eq!(wal.first_index(), Some(1));
        assert_eq!(wal.last_term(), 3);
        let read = payloads(&wal, 95);
        assert_eq!(read.len(), 6);
        assert_eq!(read[0], (95, vec![94; 95]));
    }

    #[test]
    fn an_empty_log_starts_where_it_is_told() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path(), 42);
        assert_eq!(wal.append(1, b"x").unwrap(), 42);
        wal.sync().unwrap();
        drop(wal);
        let wal = open(dir.path(), 7);
        assert_eq!(wal.next_index(), 43);
    }

    #[test]
    fn a_torn_entry_ends_the_log_and_what_follows_is_cleared() {
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 10, SEGMENT_BYTES);
        // Flip a byte in the payload of entry 6.
        overwrite(dir.path(), 5 * 124 + HEADER_BYTES as u64 + 7, &[0xff]);
        let mut wal = open(dir.path(), 1);
        assert_eq!(wal.next_index(), 6);
        assert_eq!(payloads(&wal, 1).len(), 5);
        // The entries after the torn one are gone for good: new ones take their places, and
        // once a new entry is torn too, no old one can follow it.
        wal.append(2, &[9; 50]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let wal = open(dir.path(), 1);
        assert_eq!(wal.next_index(), 7);
        assert_eq!(payloads(&wal, 6), vec![(6, vec![9; 50])]);
    }

    #[test]
    fn a_segment_ending_too_close_to_its_end_for_a_header_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        // Three entries fill all but 10 bytes of a segment; the fourth rolls over.
        write_entries(dir.path(), 5, 3 * 124 + 10);
        let wal = open(dir.path(), 1);
        assert_eq!(wal.next_index(), 6);
        assert_eq!(payloads(&wal, 1).len(), 5);
    }

    #[test]
    fn entries_after_a_zeroed_gap_never_come_back() {
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 10, SEGMENT_BYTES);
        // Entry 6 never reached the disk, the ones after it did.
        overwrite(dir.path(), 5 * 124, &[0; 124]);
        let mut wal = open(dir.path(), 1);
        assert_eq!(wal.next_index(), 6);
        // A new entry 6 of the same size ends where the old entry 7 began.
        wal.append(2, &[9; 100]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let wal = open(dir.path(), 1);
        assert_eq!(wal.next_index(), 7);
        assert_eq!(payloads(&wal, 6), vec![(6, vec![9; 100])]);
    }

    #[test]
    fn entries_roll_over_segments_and_purge_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path(), 1);
        let big = vec![7u8; (SEGMENT_BYTES / 2) as usize];
        for _ in 0..5 {
            wal.append(1, &big).unwrap();
        }
        wal.sync().unwrap();
        assert!(wal.segments.len() >= 3);
        wal.purge_before(5).unwrap();
        assert_eq!(wal.first_index(), Some(5));
        assert_eq!(payloads(&wal, 1).len(), 1);
        drop(wal);
        let wal = open(dir.path(), 1);
        assert_eq!(wal.first_index(), Some(5));
        assert_eq!(wal.next_index(), 6);
    }

    #[test]
    fn an_entry_larger_than_a_segment_gets_one_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path(), 1);
        wal.append(1, b"small").unwrap();
        let huge = vec![1u8; SEGMENT_BYTES as usize + 10];
        wal.append(1, &huge).unwrap();
        wal.append(1, b"after").unwrap();
        wal.sync().unwrap();
        drop(wal);
        let wal = open(dir.path(), 1);
        let read = payloads(&wal, 1);
        assert_eq!(read.len(), 3);
        assert_eq!(read[1].1.len(), huge.len());
        assert_eq!(read[2], (3, b"after".to_vec()));
    }

    #[test]
    fn truncation_drops_the_tail_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path(), 1);
        let big = vec![7u8; (SEGMENT_BYTES / 3) as usize];
        for _ in 0..7 {
            wal.append(1, &big).unwrap();
        }
        wal.truncate_after(2).unwrap();
        assert_eq!(wal.next_index(), 3);
        assert_eq!(wal.append(2, b"new").unwrap(), 3);
        wal.sync().unwrap();
        drop(wal);
        let wal = open(dir.path(), 1);
        assert_eq!(wal.next_index(), 4);
        assert_eq!(wal.last_term(), 2);
        assert_eq!(payloads(&wal, 3), vec![(3, b"new".to_vec())]);
    }

    #[test]
    fn state_beside_the_log_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path(), 1);
        assert_eq!(wal.state("vote").unwrap(), None);
        wal.save_state("vote", b"term 3, node 2").unwrap();
        wal.save_state("vote", b"term 4, node 1").unwrap();
        wal.save_state("purged", b"7").unwrap();
        let wal = open(dir.path(), 1);
        assert_eq!(wal.state("vote").unwrap(), Some(b"term 4, node 1".to_vec()));
        assert_eq!(wal.state("purged").unwrap(), Some(b"7".to_vec()));
    }

    #[test]
    fn a_range_reads_only_its_entries_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        // Three entries of 124 bytes per 400-byte segment: entries 1-3, 4-6, 7-9, 10.
        write_entries(dir.path(), 10, 400);
        let wal = open(dir.path(), 1);
        let indexes = |from, until| -> Vec<u64> {
            let entries = wal.read_range(from, until).unwrap();
            entries.iter().map(|entry| entry.index).collect()
        };
        assert_eq!(indexes(2, 5), vec![2, 3, 4]);
        assert_eq!(indexes(4, 7), vec![4, 5, 6]);
        assert_eq!(indexes(9, 100), vec![9, 10]);
        assert_eq!(indexes(11, 20), Vec::<u64>::new());
        assert_eq!(indexes(5, 5), Vec::<u64>::new());
        assert_eq!(wal.read_range(3, 4).unwrap()[0].payload, vec![2; 100]);
    }
}
