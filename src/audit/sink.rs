//! Copies of the audit log outside the store: a rotated JSON Lines file and
//! standard output. The writer hands each committed batch's lines to every
//! sink in one call; a sink makes them durable before returning (the file
//! sink fsyncs), so in fail-closed mode a request is answered only once
//! its record is in the store *and* in every sink.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::AuditSinkConfig;

/// Somewhere audit lines go.
pub trait Sink: Send {
    /// A short name for logs (`file:/var/log/cistern/audit.jsonl`, `stdout`).
    fn name(&self) -> &str;
    /// Writes whole lines and makes them durable.
    fn write_lines(&mut self, lines: &[u8]) -> io::Result<()>;
}

/// The sinks a config names, opened (files created 0600).
pub fn open_sinks(configs: &[AuditSinkConfig]) -> io::Result<Vec<Box<dyn Sink>>> {
    configs
        .iter()
        .map(|c| -> io::Result<Box<dyn Sink>> {
            Ok(match c {
                AuditSinkConfig::File {
                    path,
                    max_bytes,
                    keep,
                } => Box::new(FileSink::open(path, *max_bytes, *keep)?),
                AuditSinkConfig::Stdout => Box::new(StdoutSink),
            })
        })
        .collect()
}

/// JSON Lines on standard output.
#[derive(Debug)]
pub struct StdoutSink;

impl Sink for StdoutSink {
    fn name(&self) -> &str {
        "stdout"
    }

    fn write_lines(&mut self, lines: &[u8]) -> io::Result<()> {
        let mut out = io::stdout().lock();
        out.write_all(lines)?;
        out.flush()
    }
}

/// JSON Lines appended to a file, fsynced per write, rotated by size:
/// `path` → `path.1` → … → `path.<keep>` (the oldest is deleted). A batch
/// is never split across two files.
#[derive(Debug)]
pub struct FileSink {
    name: String,
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: u32,
}

impl FileSink {
    /// Opens (creating 0600) `path` for appending.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> io::Result<FileSink> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(FileSink {
            name: format!("file:{}", path.display()),
            path: path.to_owned(),
            file,
            size,
            max_bytes,
            keep,
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.sync_all()?;
        let numbered = |n: u32| {
            let mut p = self.path.as_os_str().to_owned();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        match std::fs::remove_file(numbered(self.keep)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for n in (1..self.keep).rev() {
            match std::fs::rename(numbered(n), numbered(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, numbered(1))?;
        self.file = open_append(&self.path)?;
        self.size = 0;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn write_lines(&mut self, lines: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + lines.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(lines)?;
        self.file.sync_data()?;
        self.size += lines.len() as u64;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn file_sink_rotates_by_size_and_keeps_whole_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut sink = FileSink::open(&path, 4096, 2).unwrap();
        let batch = vec![b'x'; 3000];
        for _ in 0..4 {
            sink.write_lines(&batch).unwrap();
        }
        // Four 3000-byte batches, 4096 per file: one batch per file, two kept.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3000);
        assert_eq!(
            std::fs::metadata(dir.path().join("audit.jsonl.1"))
                .unwrap()
                .len(),
            3000
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("audit.jsonl.2"))
                .unwrap()
                .len(),
            3000
        );
        assert!(!dir.path().join("audit.jsonl.3").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_failing_device_is_an_error_not_a_silent_loss() {
        // /dev/full accepts the open and fails every write with ENOSPC.
        let mut sink = FileSink::open(Path::new("/dev/full"), 1 << 20, 1).unwrap();
        assert!(sink.write_lines(b"{}\n").is_err());
    }
}
