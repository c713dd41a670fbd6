//! Measuring files: size, SHA-256 and a sniffed content type, every read confined
//! to a storage root ([`Root`]), many files on a few threads, a chunk of small files
//! at a time through io_uring where it can be used ([`uring`]), a panic failing only
//! its file. Files must be regular files.

use std::borrow::Cow;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::copy::Measured;
use crate::error::{FileFailure, Reason};
use crate::root::{errno_failure, Root};
use crate::sniff::{sniff, SNIFF_BYTES};
use crate::uring::{self, Outcome};

/// Environment variable naming a key whose measurement (and parsing) panics: fault
/// injection for the test suite.
pub const TEST_PANIC_ENV: &str = "FILEPIPE_TEST_PANIC_KEY";

const CHUNK: usize = 256 * 1024;

/// Measures one file: size, SHA-256, sniffed content type.
pub fn measure(
    root: &Root,
    key: &str,
    max_bytes: u64,
    buf: &mut Vec<u8>,
) -> Result<Measured, FileFailure> {
    measure_open(root.open_beneath(key)?, key, max_bytes, buf)
}

/// Measures a file opened beneath the root.
fn measure_open(
    mut file: File,
    key: &str,
    max_bytes: u64,
    buf: &mut Vec<u8>,
) -> Result<Measured, FileFailure> {
    let size = regular_file_size(file.as_raw_fd()).map_err(|e| errno_failure(e, key))?;
    let Some(size) = size else {
        return Err(FileFailure::new(
            Reason::NotAFile,
            format!("'{key}' is not a regular file (a directory, FIFO, socket or device)"),
        ));
    };
    if size > max_bytes {
        return Err(too_large(key, size, max_bytes));
    }
    hash_reader(&mut file, key, max_bytes, Some(size), buf)
}

/// The size of an open file if it is a regular file (`fstat`: lighter than the
/// `statx` that `File::metadata` makes).
pub(crate) fn regular_file_size(fd: RawFd) -> std::io::Result<Option<u64>> {
    // SAFETY: fstat fills the zeroed struct it is given; the caller's descriptor is open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(((st.st_mode & libc::S_IFMT) == libc::S_IFREG).then_some(st.st_size as u64))
}

fn too_large(key: &str, size: u64, max_bytes: u64) -> FileFailure {
    FileFailure::new(
        Reason::TooLarge,
        format!(
            "file '{key}' is {size} bytes, more than the limit of {max_bytes} (MAX_FILE_BYTES)"
        ),
    )
}

/// Streams a reader through SHA-256, keeping the first bytes for sniffing. With the
/// size `fstat` gave (`size`), the buffer is no larger than the file needs, and a read
/// that comes short once that many bytes are in is the end of the file: a small file
/// takes one read, not a read and one more that returns nothing.
pub fn hash_reader(
    r: &mut impl Read,
    key: &str,
    max_bytes: u64,
    size: Option<u64>,
    buf: &mut Vec<u8>,
) -> Result<Measured, FileFailure> {
    let want = size.map_or(CHUNK, |n| {
        usize::try_from(n).map_or(CHUNK, |n| n.saturating_add(1).min(CHUNK))
    });
    if buf.len() < want {
        buf.resize(want, 0);
    }
    let mut hasher = Sha256::new();
    let mut head = [0u8; SNIFF_BYTES];
    let mut head_len = 0;
    let mut total: u64 = 0;
    loop {
        let n = match r.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(errno_failure(e, key)),
        };
        total += n as u64;
        if total > max_bytes {
            return Err(too_large(key, total, max_bytes));
        }
        if head_len < SNIFF_BYTES {
            let take = (SNIFF_BYTES - head_len).min(n);
            head[head_len..head_len + take].copy_from_slice(&buf[..take]);
            head_len += take;
        }
        hasher.update(&buf[..n]);
        if n < want && Some(total) == size {
            break;
        }
    }
    Ok(Measured {
        size: total as i64,
        sha256: hasher.finalize().into(),
        content_type: Some(Cow::Borrowed(sniff(&head[..head_len]))),
    })
}

/// The measurement of a file read whole: `data` is all of it.
fn measure_bytes(data: &[u8]) -> Measured {
    Measured {
        size: data.len() as i64,
        sha256: Sha256::digest(data).into(),
        content_type: Some(Cow::Borrowed(sniff(&data[..data.len().min(SNIFF_BYTES)]))),
    }
}

/// Measures one file with `how`; a panic (a bug) fails only this file, with reason
/// `internal_error`.
fn guarded(
    key: &str,
    buf: &mut Vec<u8>,
    panic_key: Option<&str>,
    how: impl FnOnce(&mut Vec<u8>) -> Result<Measured, FileFailure>,
) -> Result<Measured, FileFailure> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if panic_key == Some(key) {
            panic!("test panic requested for this key");
        }
        how(&mut *buf)
    }))
    .unwrap_or_else(|_| {
        buf.clear();
        Err(FileFailure::new(
            Reason::Internal,
            format!("internal error while measuring '{key}' (a bug: please report it)"),
        ))
    })
}

/// A thread's buffers: one for files read the ordinary way, one for a chunk's reads.
#[derive(Default)]
struct Buffers {
    file: Vec<u8>,
    chunk: Vec<u8>,
}

/// Measures a chunk of keys (at most [`uring::CHUNK`]): through io_uring where it
/// can be used, each file that is not the plain case the ordinary way.
fn measure_chunk(
    root: &Root,
    keys: &[&str],
    max_bytes: u64,
    bufs: &mut Buffers,
    panic_key: Option<&str>,
    mut each: impl FnMut(usize, Result<Measured, FileFailure>),
) {
    let ordinary = |key: &str, buf: &mut Vec<u8>| {
        guarded(key, buf, panic_key, |buf| {
            measure(root, key, max_bytes, buf)
        })
    };
    // The key that is to panic (fault injection) is measured where a panic is caught.
    let outcomes = match panic_key {
        Some(p) if keys.contains(&p) => None,
        _ => uring::read_chunk(root, keys, max_bytes, &mut bufs.chunk),
    };
    let Some(outcomes) = outcomes else {
        for (i, key) in keys.iter().enumerate() {
            each(i, ordinary(key, &mut bufs.file));
        }
        return;
    };
    for (i, (key, outcome)) in keys.iter().zip(outcomes).enumerate() {
        let result = match outcome {
            Outcome::Read(range) => Ok(measure_bytes(&bufs.chunk[range])),
            Outcome::Open(file) => guarded(key, &mut bufs.file, panic_key, |buf| {
                measure_open(file, key, max_bytes, buf)
            }),
            Outcome::Ordinary => ordinary(key, &mut bufs.file),
        };
        each(i, result);
    }
}

/// Measures many files under one root on up to `threads` threads: the calling thread
/// and pooled ones (see [`pool`]).
pub fn measure_all(
    root: &Root,
    keys: &[&str],
    max_bytes: u64,
    threads: usize,
) -> Vec<Result<Measured, FileFailure>> {
    let panic_key = std::env::var(TEST_PANIC_ENV).ok();
    let panic_key = panic_key.as_deref();
    let threads = threads.clamp(1, 64).min(keys.len().div_ceil(16)).max(1);
    // Chunks small enough that every thread gets a share of a small batch.
    let chunk = keys.len().div_ceil(threads).clamp(1, uring::CHUNK);
    if threads == 1 {
        let mut bufs = Buffers::default();
        let mut results = Vec::with_capacity(keys.len());
        for part in keys.chunks(chunk) {
            measure_chunk(root, part, max_bytes, &mut bufs, panic_key, |_, r| {
                results.push(r)
            });
        }
        return results;
    }
    let next = AtomicUsize::new(0);
    let collected = Mutex::new(Vec::with_capacity(keys.len()));
    let task = || {
        let mut bufs = Buffers::default();
        let mut done = Vec::new();
        loop {
            let start = next.fetch_add(chunk, Ordering::Relaxed);
            if start >= keys.len() {
                break;
            }
            let part = &keys[start..(start + chunk).min(keys.len())];
            measure_chunk(root, part, max_bytes, &mut bufs, panic_key, |i, r| {
                done.push((start + i, r))
            });
        }
        collected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(done);
    };
    assert!(pool::run(threads - 1, &task), "a measuring thread panicked");
    let mut results: Vec<Option<Result<Measured, FileFailure>>> = vec![None; keys.len()];
    for (i, r) in collected.into_inner().unwrap_or_else(|e| e.into_inner()) {
        results[i] = Some(r);
    }
    results
        .into_iter()
        .map(|r| r.expect("every slot is filled"))
        .collect()
}

/// Threads that measure files, started the first time they are needed and kept: a
/// batch's files are handed to them rather than to threads started for each batch, whose
/// start, stacks and fresh allocator heaps would cost page faults at every batch.
pub mod pool {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::mpsc::{channel, Sender};
    use std::sync::{Arc, Condvar, Mutex};

    type Task = dyn Fn() + Sync;

    /// A borrowed task, for a pooled thread to run once.
    struct TaskRef(*const Task);

    // SAFETY: the task is Sync, and `run` does not return (nor unwind) before every
    // thread it was given to has run it and let go of it.
    unsafe impl Send for TaskRef {}

    /// Counts down the threads still running a task, and whether one of them panicked.
    struct Latch {
        state: Mutex<(usize, bool)>,
        done: Condvar,
    }

    impl Latch {
        fn count_down(&self, panicked: bool) {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.0 -= 1;
            state.1 |= panicked;
            if state.0 == 0 {
                self.done.notify_all();
            }
        }

        /// Waits for every thread; false if one panicked.
        fn wait(&self) -> bool {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            while state.0 > 0 {
                state = self.done.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            !state.1
        }
    }

    struct Job {
        task: TaskRef,
        latch: Arc<Latch>,
    }

    struct Pool {
        /// The process the threads belong to: a child forked since has none of them.
        pid: u32,
        workers: Vec<Sender<Job>>,
    }

    static POOL: Mutex<Option<Pool>> = Mutex::new(None);

    fn spawn() -> Option<Sender<Job>> {
        let (tx, rx) = channel::<Job>();
        std::thread::Builder::new()
            // Named, so that a profile tells the measuring threads apart.
            .name("filepipe-measure".to_owned())
            .spawn(move || {
                for job in rx {
                    // SAFETY: the caller of `run` waits for this count-down, so the task
                    // outlives this call.
                    let ran = catch_unwind(AssertUnwindSafe(|| unsafe { (*job.task.0)() }));
                    job.latch.count_down(ran.is_err());
                }
            })
            .ok()?;
        Some(tx)
    }

    /// Runs `task` in this thread and at once on `extra` pooled threads, and returns
    /// once all of them have run it: false if any of them panicked.
    pub fn run(extra: usize, task: &(dyn Fn() + Sync)) -> bool {
        let latch = Arc::new(Latch {
            state: Mutex::new((extra + 1, false)),
            done: Condvar::new(),
        });
        // SAFETY: the lifetime is erased only while `run` waits for the task to be done.
        let erased: *const Task =
            unsafe { std::mem::transmute::<&(dyn Fn() + Sync), &'static Task>(task) };
        let mut sent = 0;
        {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            let pid = std::process::id();
            if !matches!(pool.as_ref(), Some(p) if p.pid == pid) {
                *pool = Some(Pool {
                    pid,
                    workers: Vec::new(),
                });
            }
            let workers = &mut pool.as_mut().expect("made above").workers;
            while workers.len() < extra {
                match spawn() {
                    Some(tx) => workers.push(tx),
                    None => break,
                }
            }
            for tx in workers.iter().take(extra) {
                let job = Job {
                    task: TaskRef(erased),
                    latch: Arc::clone(&latch),
                };
                if tx.send(job).is_ok() {
                    sent += 1;
                }
            }
        }
        // What could not be handed out (no thread could be started) is not waited for.
        for _ in sent..extra {
            latch.count_down(false);
        }
        let here = catch_unwind(AssertUnwindSafe(task));
        latch.count_down(here.is_err());
        latch.wait()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;

    fn tmp() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "filepipe-hash-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root/sub")).unwrap();
        dir
    }

    #[test]
    fn measures_and_confines() {
        let dir = tmp();
        let root_path = dir.join("root");
        std::fs::File::create(root_path.join("sub/a.txt"))
            .unwrap()
            .write_all(b"hello\n")
            .unwrap();
        std::fs::write(dir.join("secret"), b"canary").unwrap();
        std::os::unix::fs::symlink(dir.join("secret"), root_path.join("out")).unwrap();
        std::os::unix::fs::symlink("sub/a.txt", root_path.join("in")).unwrap();
        let root = Root::open(&root_path).unwrap();
        let mut buf = Vec::new();
        let m = measure(&root, "sub/a.txt", 100, &mut buf).unwrap();
        assert_eq!(m.size, 6);
        assert_eq!(m.content_type.as_deref(), Some("text/plain"));
        let expected: [u8; 32] = Sha256::digest(b"hello\n").into();
        assert_eq!(m.sha256, expected);
        assert_eq!(
            measure(&root, "in", 100, &mut buf).unwrap().sha256,
            expected
        );
        assert_eq!(
            measure(&root, "out", 100, &mut buf).unwrap_err().reason,
            Reason::UnsafeKey
        );
        assert_eq!(
            measure(&root, "../secret", 100, &mut buf)
                .unwrap_err()
                .reason,
            Reason::UnsafeKey
        );
        assert_eq!(
            measure(&root, "nope", 100, &mut buf).unwrap_err().reason,
            Reason::Missing
        );
        assert_eq!(
            measure(&root, "sub", 100, &mut buf).unwrap_err().reason,
            Reason::NotAFile
        );
        assert_eq!(
            measure(&root, "sub/a.txt", 3, &mut buf).unwrap_err().reason,
            Reason::TooLarge
        );
        let all = measure_all(&root, &["sub/a.txt"; 100], 100, 4);
        assert!(all.iter().all(|r| r.as_ref().unwrap().sha256 == expected));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn measuring_leaves_the_access_time_as_it_was() {
        let dir = tmp().join("atime");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, b"data").unwrap();
        let then = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(86_400);
        let times = std::fs::FileTimes::new().set_accessed(then);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_times(times)
            .unwrap();
        let root = Root::open(&dir).unwrap();
        let m = measure(&root, "f", 100, &mut Vec::new()).unwrap();
        assert_eq!(m.size, 4);
        // Older than its modification: a read would have updated it (relatime).
        assert_eq!(std::fs::metadata(&path).unwrap().accessed().unwrap(), then);
        std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn pooled_threads_run_a_borrowed_task_and_are_kept() {
        let ran = AtomicUsize::new(0);
        let seen = Mutex::new(Vec::new());
        for _ in 0..50 {
            let task = || {
                ran.fetch_add(1, Ordering::Relaxed);
                let me = std::thread::current();
                seen.lock()
                    .unwrap()
                    .push((me.name().map(str::to_owned), me.id()));
            };
            assert!(pool::run(3, &task));
        }
        assert_eq!(ran.load(Ordering::Relaxed), 50 * 4);
        let seen = seen.into_inner().unwrap();
        let pooled: std::collections::HashSet<_> = seen
            .iter()
            .filter(|(name, _)| name.as_deref() == Some("filepipe-measure"))
            .map(|(_, id)| *id)
            .collect();
        // 50 runs here, 150 on three threads started once (no other test asks for more).
        assert_eq!(seen.len() - 150, 50);
        assert_eq!(pooled.len(), 3);
        // A panic anywhere is reported once every thread is done, and the pool goes on.
        let boom = || {
            if std::thread::current().name() == Some("filepipe-measure") {
                panic!("test panic in a pooled thread");
            }
        };
        assert!(!pool::run(2, &boom));
        assert!(pool::run(2, &|| ()));
    }

    /// Hands out at most `step` bytes a read, and counts the reads.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
        reads: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            self.reads += 1;
            let n = self.step.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_small_file_of_known_size_takes_one_read_and_short_reads_are_followed() {
        let data = b"hello, world\n".repeat(100);
        let expected: [u8; 32] = Sha256::digest(&data).into();
        let mut buf = Vec::new();
        let size = Some(data.len() as u64);
        let mut whole = Trickle {
            data: &data,
            step: usize::MAX,
            reads: 0,
        };
        let m = hash_reader(&mut whole, "k", 1 << 20, size, &mut buf).unwrap();
        assert_eq!(
            (m.sha256, m.size, whole.reads),
            (expected, data.len() as i64, 1)
        );
        // Reads that come short before the size is reached are not taken for the end.
        let mut trickle = Trickle {
            data: &data,
            step: 7,
            reads: 0,
        };
        let m = hash_reader(&mut trickle, "k", 1 << 20, size, &mut buf).unwrap();
        assert_eq!(
            (m.sha256, trickle.reads),
            (expected, data.len().div_ceil(7))
        );
        // A file that grew after fstat is read to its end.
        let mut grown = Trickle {
            data: &data,
            step: usize::MAX,
            reads: 0,
        };
        let m = hash_reader(&mut grown, "k", 1 << 20, Some(10), &mut buf).unwrap();
        assert_eq!((m.sha256, m.size), (expected, data.len() as i64));
        // Without a size, to the read that returns nothing.
        let mut unknown = Trickle {
            data: &data,
            step: usize::MAX,
            reads: 0,
        };
        hash_reader(&mut unknown, "k", 1 << 20, None, &mut buf).unwrap();
        assert_eq!(unknown.reads, 2);
        let mut big = Trickle {
            data: &data,
            step: usize::MAX,
            reads: 0,
        };
        let err = hash_reader(&mut big, "k", 100, Some(10), &mut buf).unwrap_err();
        assert_eq!(err.reason, Reason::TooLarge);
    }
}
