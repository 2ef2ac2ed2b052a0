//! A disk in memory for power-cut tests.
//!
//! It keeps what was synced. At a power cut each write made since its file's last sync is
//! kept, lost, or torn (some of its 512-byte sectors reach the platter, others do not), in any
//! combination and regardless of order, as a disk with a volatile cache may leave it. Creating,
//! removing and replacing files are durable at once: the log syncs its directory after each,
//! and the database never does either. After a cut, the handles opened before it are dead:
//! everything done through them fails, as the machine they belonged to is off.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use redb::StorageBackend;

/// The error redb's storage methods answer.
type BackendIoError = io::Error;

use super::{LogFile, LogStorage};

const SECTOR: usize = 512;

/// Random choices from a seed (SplitMix64): the same seed cuts the same way.
pub struct Seeded(u64);

impl Seeded {
    pub fn new(seed: u64) -> Seeded {
        Seeded(seed)
    }

    pub fn number(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `bound` (which is above 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.number() % bound
    }
}

/// How long a sync of a log file takes: long enough for the writer to log the next entry
/// meanwhile, as it does on a real disk.
const LOG_SYNC_TIME: std::time::Duration = std::time::Duration::from_micros(200);

#[derive(Default)]
pub struct SimulatedDisk {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Power cuts so far; a handle made before the last one is dead.
    cuts: u64,
    files: BTreeMap<String, SimulatedFile>,
}

#[derive(Default)]
struct SimulatedFile {
    /// What reads see.
    current: Vec<u8>,
    /// What a power cut leaves for sure.
    durable: Vec<u8>,
    /// Changes since the last sync, oldest first.
    unsynced: Vec<Change>,
}

enum Change {
    Write { offset: usize, bytes: Vec<u8> },
    Len(usize),
}

impl Change {
    fn apply(&self, bytes: &mut Vec<u8>) {
        match self {
            Change::Write {
                offset,
                bytes: written,
            } => {
                let end = offset + written.len();
                if bytes.len() < end {
                    bytes.resize(end, 0);
                }
                bytes[*offset..end].copy_from_slice(written);
            }
            Change::Len(len) => bytes.resize(*len, 0),
        }
    }
}

impl SimulatedFile {
    fn change(&mut self, change: Change) {
        change.apply(&mut self.current);
        self.unsynced.push(change);
    }

    fn sync(&mut self) {
        self.sync_first(self.unsynced.len());
    }

    /// Makes the oldest `count` unsynced changes durable.
    fn sync_first(&mut self, count: usize) {
        let count = count.min(self.unsynced.len());
        for change in self.unsynced.drain(..count) {
            change.apply(&mut self.durable);
        }
    }

    fn cut(&mut self, seeded: &mut Seeded) {
        for change in std::mem::take(&mut self.unsynced) {
            match (seeded.below(3), change) {
                (0, _) => {}
                (1, change) => change.apply(&mut self.durable),
                (_, Change::Write { offset, bytes }) => {
                    // Torn: each sector of it reached the disk or did not.
                    for (number, sector) in bytes.chunks(SECTOR).enumerate() {
                        if seeded.below(2) == 0 {
                            Change::Write {
                                offset: offset + number * SECTOR,
                                bytes: sector.to_vec(),
                            }
                            .apply(&mut self.durable);
                        }
                    }
                }
                (_, change) => change.apply(&mut self.durable),
            }
        }
        self.current = self.durable.clone();
    }
}

impl SimulatedDisk {
    pub fn new() -> Arc<SimulatedDisk> {
        Arc::new(SimulatedDisk::default())
    }

    /// Cuts the power: every file keeps what was synced and some of what was not, and every
    /// handle made so far dies.
    pub fn power_cut(&self, seeded: &mut Seeded) {
        let mut state = self.lock();
        state.cuts += 1;
        for file in state.files.values_mut() {
            file.cut(seeded);
        }
    }

    /// A file for redb, created empty if missing.
    pub fn database(self: &Arc<Self>, name: &str) -> SimulatedHandle {
        let mut state = self.lock();
        state.files.entry(name.to_owned()).or_default();
        SimulatedHandle {
            disk: self.clone(),
            name: name.to_owned(),
            born: state.cuts,
        }
    }

    /// A directory for the log: the files whose names start with `prefix`.
    pub fn directory(self: &Arc<Self>, prefix: &str) -> SimulatedDirectory {
        SimulatedDirectory {
            disk: self.clone(),
            prefix: prefix.to_owned(),
            born: self.lock().cuts,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("simulated disk lock")
    }
}

/// A file of the simulated disk, as the log or redb holds it.
pub struct SimulatedHandle {
    disk: Arc<SimulatedDisk>,
    name: String,
    /// The power cuts before it was made.
    born: u64,
}

impl fmt::Debug for SimulatedHandle {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "SimulatedHandle({})", self.name)
    }
}

impl SimulatedHandle {
    /// Runs `change` on the file, unless the machine this handle belongs to is off.
    fn alive<T>(&self, change: impl FnOnce(&mut SimulatedFile) -> T) -> io::Result<T> {
        let mut state = self.disk.lock();
        if state.cuts != self.born {
            return Err(power_off());
        }
        let file = state
            .files
            .get_mut(&self.name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, self.name.clone()))?;
        Ok(change(file))
    }

    fn read_into(&self, out: &mut [u8], offset: u64) -> io::Result<()> {
        self.alive(|file| {
            let start = offset as usize;
            let end = start + out.len();
            if end > file.current.len() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end of the file",
                ));
            }
            out.copy_from_slice(&file.current[start..end]);
            Ok(())
        })?
    }

    fn current_len(&self) -> io::Result<u64> {
        self.alive(|file| file.current.len() as u64)
    }
}

fn power_off() -> io::Error {
    io::Error::other("the power is off")
}

impl LogFile for SimulatedHandle {
    fn size(&self) -> io::Result<u64> {
        self.current_len()
    }

    fn read_at(&self, out: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_into(out, offset)
    }

    fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.alive(|file| {
            file.change(Change::Write {
                offset: offset as usize,
                bytes: bytes.to_vec(),
            })
        })
    }

    fn sync(&self) -> io::Result<()> {
        // As a disk's, a sync takes a while and covers the writes made before it began: those
        // made meanwhile (the next log entry's) stay unsynced until a sync of their own.
        let covered = self.alive(|file| file.unsynced.len())?;
        std::thread::sleep(LOG_SYNC_TIME);
        self.alive(|file| file.sync_first(covered))
    }

    fn zero_from(&self, offset: u64) -> io::Result<()> {
        self.alive(|file| {
            let len = file.current.len();
            file.change(Change::Len(offset as usize));
            file.change(Change::Len(len));
            file.sync();
        })
    }
}

impl StorageBackend for SimulatedHandle {
    fn len(&self) -> Result<u64, BackendIoError> {
        self.current_len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendIoError> {
        self.read_into(out, offset)
    }

    fn set_len(&self, len: u64) -> Result<(), BackendIoError> {
        self.alive(|file| file.change(Change::Len(len as usize)))
    }

    fn sync_data(&self) -> Result<(), BackendIoError> {
        self.alive(SimulatedFile::sync)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendIoError> {
        self.alive(|file| {
            file.change(Change::Write {
                offset: offset as usize,
                bytes: data.to_vec(),
            })
        })
    }
}

/// The log's directory on the simulated disk.
pub struct SimulatedDirectory {
    disk: Arc<SimulatedDisk>,
    prefix: String,
    born: u64,
}

impl SimulatedDirectory {
    /// A file's name on the disk.
    fn path(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn handle(&self, name: &str) -> SimulatedHandle {
        SimulatedHandle {
            disk: self.disk.clone(),
            name: self.path(name),
            born: self.born,
        }
    }

    /// Makes a file hold `bytes`, durably.
    fn put(&self, name: &str, bytes: Vec<u8>) -> io::Result<()> {
        let name = self.path(name);
        self.alive(|files| {
            files.insert(
                name,
                SimulatedFile {
                    current: bytes.clone(),
                    durable: bytes,
                    unsynced: Vec::new(),
                },
            );
        })
    }

    /// Works on the directory's files, unless the machine this handle belongs to is off.
    fn alive<T>(
        &self,
        work: impl FnOnce(&mut BTreeMap<String, SimulatedFile>) -> T,
    ) -> io::Result<T> {
        let mut state = self.disk.lock();
        if state.cuts != self.born {
            return Err(power_off());
        }
        Ok(work(&mut state.files))
    }
}

impl LogStorage for SimulatedDirectory {
    fn names(&self) -> io::Result<Vec<String>> {
        self.alive(|files| {
            files
                .keys()
                .filter_map(|name| name.strip_prefix(&self.prefix))
                .map(str::to_owned)
                .collect()
        })
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn LogFile>> {
        let handle = self.handle(name);
        handle.current_len()?;
        Ok(Box::new(handle))
    }

    fn create(&self, name: &str, len: u64) -> io::Result<Box<dyn LogFile>> {
        self.put(name, vec![0; len as usize])?;
        Ok(Box::new(self.handle(name)))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let name = self.path(name);
        self.alive(|files| {
            files.remove(&name);
        })
    }

    fn sync(&self) -> io::Result<()> {
        self.alive(|_| ())
    }

    fn replace(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.put(name, bytes.to_vec())
    }

    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let name = self.path(name);
        self.alive(|files| files.get(&name).map(|file| file.current.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_keeps_what_was_synced_and_some_of_what_was_not() {
        let mut seeded = Seeded::new(7);
        let mut outcomes = std::collections::BTreeSet::new();
        for _ in 0..64 {
            let disk = SimulatedDisk::new();
            let file = disk.database("data");
            StorageBackend::write(&file, 0, &[1; 1024]).unwrap();
            file.sync_data().unwrap();
            StorageBackend::write(&file, 0, &[2; 4096]).unwrap();
            disk.power_cut(&mut seeded);
            let after = disk.database("data");
            let mut bytes = vec![0; StorageBackend::len(&after).unwrap() as usize];
            StorageBackend::read(&after, 0, &mut bytes).unwrap();
            assert!(bytes.len() >= 1024 && bytes.len().is_multiple_of(SECTOR));
            // Whatever survived is sector by sector the old or the new bytes.
            for sector in bytes.chunks(SECTOR) {
                assert!(sector.iter().all(|&b| b == sector[0]));
            }
            // The handle from before the cut is dead.
            assert!(StorageBackend::write(&file, 0, &[3; 16]).is_err());
            outcomes.insert(bytes.iter().filter(|&&b| b == 2).count() / SECTOR);
        }
        // Lost, kept and torn all happen.
        assert!(outcomes.contains(&0) && outcomes.contains(&8) && outcomes.len() > 2);
    }
}
