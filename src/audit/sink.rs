//! Copies of the audit log outside the store: a rotated JSON Lines file and
//! standard output. The writer hands each committed batch's lines to every
//! sink in one call; a sink makes them durable before returning (the file
//! sink fsyncs), so in fail-closed mode a request is answered only once
//! its record is in the store *and* in every sink.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::AuditSinkConfig;

/// Somewhere audit lines go.
pub trait Sink: Send {
    /// A short name for logs (`file:/var/log/cistern/audit.jsonl`, `stdout`).
    fn name(&self) -> &str;
    /// Writes whole lines and makes them durable.
    fn write_lines(&mut self, lines: &[u8]) -> io::Result<()>;
    /// The `seq` of the newest record this sink already holds, when it can
    /// tell (a file can, standard output cannot): a starting server sends
    /// it what was appended while no server ran, and nothing twice.
    fn last_seq(&mut self) -> io::Result<Option<i64>> {
        Ok(None)
    }
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
    /// Opens (creating 0600) `path` for appending. A last line cut short
    /// (a crash in the middle of a write, before its fsync) is cut off:
    /// its batch was never acknowledged, and the writer sends it again
    /// whole (see [`Sink::last_seq`]).
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> io::Result<FileSink> {
        let file = open_append(path)?;
        let mut size = file.metadata()?.len();
        let whole = whole_lines_len(&file, size)?;
        if whole < size {
            tracing::warn!(path = %path.display(), bytes = size - whole, "audit sink file ended in a partial line; cut it off");
            file.set_len(whole)?;
            file.sync_all()?;
            size = whole;
        }
        Ok(FileSink {
            name: format!("file:{}", path.display()),
            path: path.to_owned(),
            file,
            size,
            max_bytes,
            keep,
        })
    }

    /// `path.<n>`, the `n`th rotated file.
    fn numbered(&self, n: u32) -> PathBuf {
        let mut p = self.path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.sync_all()?;
        let numbered = |n: u32| self.numbered(n);
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

    /// From the last line of the file, or of the newest rotated one when
    /// the file was just rotated.
    fn last_seq(&mut self) -> io::Result<Option<i64>> {
        if let Some(line) = last_line(&self.path)? {
            return line_seq(&line).map(Some);
        }
        match last_line(&self.numbered(1)) {
            Ok(Some(line)) => line_seq(&line).map(Some),
            Ok(None) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// How far from the end a last line is looked for: a record line is a few
/// KiB at most.
const TAIL_BYTES: u64 = 1 << 20;

/// The length of `file` up to and including its last newline.
fn whole_lines_len(file: &File, size: u64) -> io::Result<u64> {
    let tail = read_tail(file, size)?;
    let start = size - tail.len() as u64;
    Ok(match tail.iter().rposition(|&b| b == b'\n') {
        Some(i) => start + i as u64 + 1,
        // No newline in the tail: all of it is one partial line only when
        // the tail is the whole file.
        None if start == 0 => 0,
        None => size,
    })
}

fn read_tail(file: &File, size: u64) -> io::Result<Vec<u8>> {
    let start = size.saturating_sub(TAIL_BYTES);
    let mut f = file;
    f.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::with_capacity((size - start) as usize);
    f.take(size - start).read_to_end(&mut tail)?;
    Ok(tail)
}

/// The last complete line of the file at `path`; `None` for an empty file.
fn last_line(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let tail = read_tail(&file, size)?;
    let end = match tail.iter().rposition(|&b| b == b'\n') {
        Some(end) => end,
        None => return Ok(None),
    };
    let start = tail[..end]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    Ok(Some(tail[start..end].to_vec()))
}

/// The record `seq` a sink line stands for: a record's own, or the one a
/// checkpoint covers.
fn line_seq(line: &[u8]) -> io::Result<i64> {
    let v: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("last line: {e}")))?;
    v.get("seq")
        .or_else(|| v.get("checkpoint").and_then(|c| c.get("seq")))
        .and_then(serde_json::Value::as_i64)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "last line has no seq"))
}

fn open_append(path: &Path) -> io::Result<File> {
    // Readable too: opening looks for a partial last line.
    OpenOptions::new()
        .create(true)
        .read(true)
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
    fn a_file_sink_knows_the_last_record_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut sink = FileSink::open(&path, 200, 2).unwrap();
        assert_eq!(sink.last_seq().unwrap(), None, "empty");
        sink.write_lines(b"{\"seq\":1,\"kind\":\"a\"}\n{\"seq\":2,\"kind\":\"b\"}\n")
            .unwrap();
        assert_eq!(sink.last_seq().unwrap(), Some(2));
        sink.write_lines(b"{\"checkpoint\":{\"seq\":2,\"hash\":\"00\"}}\n")
            .unwrap();
        assert_eq!(
            sink.last_seq().unwrap(),
            Some(2),
            "a checkpoint covers its seq"
        );
        // Reopened, it still knows; rotated just now, the rotated file tells.
        let mut sink = FileSink::open(&path, 200, 2).unwrap();
        assert_eq!(sink.last_seq().unwrap(), Some(2));
        sink.rotate().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        assert_eq!(sink.last_seq().unwrap(), Some(2));
        // A line that is not ours is an error, not a guess.
        std::fs::write(&path, b"hello\n").unwrap();
        let mut sink = FileSink::open(&path, 200, 2).unwrap();
        assert!(sink.last_seq().is_err());
    }

    #[test]
    fn a_partial_last_line_is_cut_off_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, b"{\"seq\":1}\n{\"seq\":2}\n{\"seq\":3,\"ki").unwrap();
        let mut sink = FileSink::open(&path, 1 << 20, 1).unwrap();
        assert_eq!(sink.last_seq().unwrap(), Some(2));
        sink.write_lines(b"{\"seq\":3}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"seq\":1}\n{\"seq\":2}\n{\"seq\":3}\n"
        );
        // A file that is one partial line is emptied.
        std::fs::write(&path, b"{\"seq\":1,").unwrap();
        let mut sink = FileSink::open(&path, 1 << 20, 1).unwrap();
        assert_eq!(sink.last_seq().unwrap(), None);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn a_failing_device_is_an_error_not_a_silent_loss() {
        // /dev/full accepts the open and fails every write with ENOSPC.
        let mut sink = FileSink::open(Path::new("/dev/full"), 1 << 20, 1).unwrap();
        assert!(sink.write_lines(b"{}\n").is_err());
    }
}
