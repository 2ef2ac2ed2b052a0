//! Where the store keeps its bytes. The write-ahead log reaches its files only through
//! [`LogStorage`], and redb through its own `StorageBackend`, so tests can put both on a
//! simulated disk that loses, at a power cut, what was written but not synced.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

#[cfg(test)]
pub mod simulated;

/// A directory of the log's files.
pub trait LogStorage: Send {
    /// The names of the files it holds.
    fn names(&self) -> io::Result<Vec<String>>;
    /// Opens a file that exists.
    fn open(&self, name: &str) -> io::Result<Box<dyn LogFile>>;
    /// Creates a file of `len` zero bytes, replacing any of that name. Once this returns, the
    /// file exists with that size whatever happens next.
    fn create(&self, name: &str, len: u64) -> io::Result<Box<dyn LogFile>>;
    /// Deletes a file.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes the creations and removals so far durable.
    fn sync(&self) -> io::Result<()>;
    /// Replaces a small file's bytes, at once and durably.
    fn replace(&self, name: &str, bytes: &[u8]) -> io::Result<()>;
    /// A small file's bytes, if it exists.
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
}

/// One of the log's files.
pub trait LogFile: Send + Sync {
    /// Bytes in the file.
    fn size(&self) -> io::Result<u64>;
    fn read_at(&self, out: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the bytes written so far durable.
    fn sync(&self) -> io::Result<()>;
    /// Zeroes everything from `offset` to the file's end, durably.
    fn zero_from(&self, offset: u64) -> io::Result<()>;
}

/// The log's files in a directory of the file system.
pub struct Directory {
    path: PathBuf,
}

impl Directory {
    /// The directory at `path`, created if missing.
    pub fn open(path: PathBuf) -> io::Result<Directory> {
        fs::create_dir_all(&path)?;
        Ok(Directory { path })
    }
}

impl LogStorage for Directory {
    fn names(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for item in fs::read_dir(&self.path)? {
            if let Ok(name) = item?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn LogFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path.join(name))?;
        Ok(Box::new(file))
    }

    fn create(&self, name: &str, len: u64) -> io::Result<Box<dyn LogFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.path.join(name))?;
        // Full size up front, so syncing later writes never has a new size to record.
        file.set_len(len)?;
        file.sync_all()?;
        self.sync()?;
        Ok(Box::new(file))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.path.join(name))
    }

    fn sync(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()
    }

    fn replace(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let temporary = self.path.join(format!("{name}.new"));
        let file = File::create(&temporary)?;
        file.write_all_at(bytes, 0)?;
        file.sync_all()?;
        fs::rename(&temporary, self.path.join(name))?;
        self.sync()
    }

    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.path.join(name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }
}

impl LogFile for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_at(&self, out: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(out, offset)
    }

    fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(bytes, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn zero_from(&self, offset: u64) -> io::Result<()> {
        let len = self.metadata()?.len();
        self.set_len(offset)?;
        self.set_len(len)?;
        self.sync_all()
    }
}
