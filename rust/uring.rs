//! Small files opened, read and closed a chunk at a time through io_uring (Linux 5.6+).
//!
//! One file at a time costs four system calls: `openat2`, `fstat`, `read`, `close`.
//! Here a chunk's opens go to the kernel in one `io_uring_enter`, each file then takes
//! its `fstat` (io_uring has no stat of an open descriptor), and the chunk's reads and
//! closes go in one more `io_uring_enter`: about one system call a file. Where entering
//! the kernel is dear (a virtual machine, its side-channel mitigations), that is most of
//! what a small file costs.
//!
//! Only the plain case is done here: an open that succeeded, of a regular file no
//! larger than [`SMALL`] and the limit, whose read returned the size `fstat` gave.
//! Every other file is handed back: open ([`Outcome::Open`]) when it is open but not
//! the plain case, or to be measured from the start ([`Outcome::Ordinary`]), so that
//! its result and its error are the ordinary path's, word for word.
//!
//! Where io_uring is missing or refused (an old kernel, a seccomp profile,
//! `kernel.io_uring_disabled`), or turned off with `FILEPIPE_IO_URING=0`, [`read_chunk`]
//! says so once and every file takes the ordinary path.

use std::cell::RefCell;
use std::ffi::CString;
use std::fs::File;
use std::ops::Range;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU8, Ordering};

use io_uring::{opcode, squeue::Flags, types, IoUring, Probe};

use crate::measure::regular_file_size;
use crate::root::Root;

/// Environment variable that turns io_uring off (`0`, `off`, `false`, `no`).
pub const ENV: &str = "FILEPIPE_IO_URING";

/// Files a chunk holds at most (a ring has room for each one's read and close).
pub const CHUNK: usize = 64;

/// The largest file read in one go into the chunk's buffer; larger ones are read the
/// ordinary way, where four system calls are little beside hashing them.
pub const SMALL: u64 = 64 * 1024;

/// A chunk's buffer at most: the files that do not fit are read the ordinary way.
const BUFFER: usize = 1 << 20;

const UNKNOWN: u8 = 0;
const ON: u8 = 1;
/// Refused or missing here, or the ring failed.
const OFF: u8 = 2;
/// Turned off by the environment.
const OFF_BY_ENV: u8 = 3;

/// Whether io_uring is used here: decided by the first ring made (or the environment).
static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// A close's user data; a read's is the file's index in the chunk.
const CLOSE: u64 = 1 << 32;

/// What became of one file of a chunk.
pub enum Outcome {
    /// Read whole: its bytes are this range of the chunk's buffer.
    Read(Range<usize>),
    /// Open, but not the plain case (not a regular file, large, or `fstat` failed):
    /// the ordinary path goes on with the open file.
    Open(File),
    /// Not opened, or not read whole: the ordinary path measures it from the start.
    Ordinary,
}

/// One thread's ring, and the process it was made in (a forked child makes its own).
struct Ring {
    ring: IoUring,
    pid: u32,
}

thread_local! {
    static RING: RefCell<Option<Ring>> = const { RefCell::new(None) };
}

/// Whether io_uring is in use: `None` until the first chunk has tried it.
pub fn in_use() -> Option<bool> {
    match STATE.load(Ordering::Relaxed) {
        ON => Some(true),
        UNKNOWN => None,
        _ => Some(false),
    }
}

/// How files are read, in words (for `filepipe benchmark`).
pub fn describe() -> &'static str {
    match STATE.load(Ordering::Relaxed) {
        ON => "a chunk at a time through io_uring",
        OFF_BY_ENV => "one system call at a time (FILEPIPE_IO_URING=0)",
        OFF => "one system call at a time (io_uring is not available here)",
        _ => "not yet",
    }
}

fn turned_off_by_env() -> bool {
    std::env::var(ENV).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "off" | "false" | "no"
        )
    })
}

/// Opens, checks, reads and closes `keys` (at most [`CHUNK`]) beneath `root`, reading
/// into `buffer`. `None` if io_uring cannot be used: measure every file the ordinary way.
pub fn read_chunk(
    root: &Root,
    keys: &[&str],
    max_bytes: u64,
    buffer: &mut Vec<u8>,
) -> Option<Vec<Outcome>> {
    if matches!(STATE.load(Ordering::Relaxed), OFF | OFF_BY_ENV) || keys.is_empty() {
        return None;
    }
    RING.with(|cell| {
        let mut cell = cell.borrow_mut();
        let pid = std::process::id();
        if !matches!(cell.as_ref(), Some(r) if r.pid == pid) {
            *cell = None;
            if turned_off_by_env() {
                STATE.store(OFF_BY_ENV, Ordering::Relaxed);
                return None;
            }
            match Ring::new(pid) {
                Some(ring) => {
                    STATE.store(ON, Ordering::Relaxed);
                    *cell = Some(ring);
                }
                None => {
                    STATE.store(OFF, Ordering::Relaxed);
                    return None;
                }
            }
        }
        let ring = cell.as_mut().expect("made above");
        match ring.read_chunk(root, keys, max_bytes, buffer) {
            Ok(outcomes) => Some(outcomes),
            Err(_) => {
                // The ring failed under us (not one file: the ring itself). Its files
                // are measured the ordinary way, and io_uring is not used again.
                STATE.store(OFF, Ordering::Relaxed);
                *cell = None;
                None
            }
        }
    })
}

/// The folders of a chunk that hold two of its files or more, and for each key that
/// is in one, the folder and the file's name in it.
struct Folders {
    folders: Vec<CString>,
    of_key: Vec<Option<(usize, CString)>>,
}

impl Folders {
    fn of(keys: &[&str]) -> Folders {
        // A name that is not a file's own ("", ".", ".."; no folder) keeps its whole path.
        fn split(key: &str) -> Option<(&str, &str)> {
            let (folder, name) = key.rsplit_once('/')?;
            let plain = !folder.is_empty() && !matches!(name, "" | "." | "..");
            plain.then_some((folder, name))
        }
        let mut counts: std::collections::HashMap<&str, usize> = Default::default();
        for key in keys {
            if let Some((folder, _)) = split(key) {
                *counts.entry(folder).or_default() += 1;
            }
        }
        let mut index: std::collections::HashMap<&str, usize> = Default::default();
        let mut folders = Vec::new();
        let of_key = keys
            .iter()
            .map(|key| {
                let (folder, name) = split(key)?;
                if counts[folder] < 2 {
                    return None;
                }
                let n = *index.entry(folder).or_insert_with(|| {
                    folders.push(CString::new(folder).unwrap_or_default());
                    folders.len() - 1
                });
                Some((n, CString::new(name).ok()?))
            })
            .collect();
        Folders { folders, of_key }
    }
}

impl Ring {
    /// A ring, if io_uring is allowed here and has the operations needed.
    fn new(pid: u32) -> Option<Ring> {
        // Twice a chunk: each file's read and close are in the ring together.
        let ring = IoUring::builder().dontfork().build(2 * CHUNK as u32).ok()?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe).ok()?;
        let needed = [
            opcode::OpenAt2::CODE,
            opcode::Read::CODE,
            opcode::Close::CODE,
        ];
        needed
            .iter()
            .all(|&op| probe.is_supported(op))
            .then_some(Ring { ring, pid })
    }

    /// Submits what is queued and hands each of `n` completions to `each`.
    fn complete(&mut self, n: usize, mut each: impl FnMut(u64, i32)) -> std::io::Result<()> {
        let mut got = 0;
        let mut busy = 0;
        while got < n {
            match self.ring.submit_and_wait(n - got) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                    ) && busy < 1000 =>
                {
                    busy += 1;
                }
                Err(e) => return Err(e),
            }
            for cqe in self.ring.completion() {
                each(cqe.user_data(), cqe.result());
                got += 1;
            }
        }
        Ok(())
    }

    fn read_chunk(
        &mut self,
        root: &Root,
        keys: &[&str],
        max_bytes: u64,
        buffer: &mut Vec<u8>,
    ) -> std::io::Result<Vec<Outcome>> {
        let mut out: Vec<Outcome> = keys.iter().map(|_| Outcome::Ordinary).collect();
        let keys = &keys[..keys.len().min(CHUNK)];
        // A key with a NUL byte is refused by the ordinary path, with its reason.
        let paths: Vec<Option<CString>> = keys.iter().map(|k| CString::new(*k).ok()).collect();
        let (flags, resolve) = root.open_how();
        let how = types::OpenHow::new().flags(flags).resolve(resolve);

        // Keys that share a folder are opened from it: its path is walked once for the
        // chunk, not once a file. The folder is opened beneath the root and each file
        // beneath the folder, no less confined; what cannot be opened so (a symlink that
        // climbs out of its folder, staying in the root) is opened the ordinary way.
        let plan = Folders::of(keys);
        let folder_how = types::OpenHow::new()
            .flags((libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64)
            .resolve(resolve);
        let mut folder_fds = vec![-1i32; plan.folders.len()];
        if !plan.folders.is_empty() {
            {
                let mut sq = self.ring.submission();
                for (n, folder) in plan.folders.iter().enumerate() {
                    let open = opcode::OpenAt2::new(
                        types::Fd(root.dir_fd()),
                        folder.as_ptr(),
                        &folder_how,
                    )
                    .build()
                    .user_data(n as u64);
                    // SAFETY: the path and `folder_how` outlive the completion, waited for
                    // below; the ring has room for a chunk.
                    unsafe { sq.push(&open).expect("room for a chunk's folders") };
                }
            }
            self.complete(plan.folders.len(), |n, res| {
                if let Some(fd) = folder_fds.get_mut(n as usize) {
                    *fd = res;
                }
            })?;
        }

        // The opens, in one call. A failed one is opened again the ordinary way, which
        // gives its error (and drops O_NOATIME where the files are someone else's).
        let mut fds = vec![-1i32; keys.len()];
        let mut queued = 0;
        {
            let mut sq = self.ring.submission();
            for (i, path) in paths.iter().enumerate() {
                let Some(path) = path else { continue };
                let (dir, name) = match plan.of_key[i] {
                    Some((n, ref name)) if folder_fds[n] >= 0 => (folder_fds[n], name.as_ptr()),
                    _ => (root.dir_fd(), path.as_ptr()),
                };
                let open = opcode::OpenAt2::new(types::Fd(dir), name, &how)
                    .build()
                    .user_data(i as u64);
                // SAFETY: the path and `how` outlive the completion, waited for below.
                if unsafe { sq.push(&open) }.is_ok() {
                    queued += 1;
                }
            }
        }
        let opened = self.complete(queued, |i, res| {
            if let Some(fd) = fds.get_mut(i as usize) {
                *fd = res;
            }
        });
        for &fd in folder_fds.iter().filter(|&&fd| fd >= 0) {
            // SAFETY: descriptors the ring opened for us, used by no file from here on.
            unsafe { libc::close(fd) };
        }
        if let Err(e) = opened {
            for &fd in fds.iter().filter(|&&fd| fd >= 0) {
                // SAFETY: descriptors the ring opened for us, not handed out.
                unsafe { libc::close(fd) };
            }
            return Err(e);
        }

        // Each open file's type and size: only regular files that fit are read here.
        let mut reads: Vec<(usize, i32, Range<usize>)> = Vec::with_capacity(keys.len());
        let mut end = 0usize;
        for (i, &fd) in fds.iter().enumerate() {
            if fd < 0 {
                continue;
            }
            // Not a regular file, too big, or fstat failed: the ordinary path says which.
            let size = regular_file_size(fd).ok().flatten();
            let small = size.filter(|&n| n <= SMALL.min(max_bytes) && end + (n as usize) < BUFFER);
            if let Some(size) = small {
                reads.push((i, fd, end..end + size as usize));
                // One byte more than the size: a file that grew is not read short.
                end += size as usize + 1;
            } else {
                // SAFETY: a descriptor the ring opened for us; the File owns it from here.
                out[i] = Outcome::Open(unsafe { File::from_raw_fd(fd) });
            }
        }
        if reads.is_empty() {
            return Ok(out);
        }

        // The reads and closes, in one call; each close is linked to its read, so it
        // runs whatever the read did.
        if buffer.len() < end {
            buffer.resize(end, 0);
        }
        let base = buffer.as_mut_ptr();
        {
            let mut sq = self.ring.submission();
            for (n, (_, fd, range)) in reads.iter().enumerate() {
                // SAFETY: the range is inside the buffer, which is not touched until
                // every read has completed; ranges do not overlap (each has its byte more).
                let ptr = unsafe { base.add(range.start) };
                let read = opcode::Read::new(types::Fd(*fd), ptr, range.len() as u32 + 1)
                    .offset(0)
                    .build()
                    .flags(Flags::IO_HARDLINK)
                    .user_data(n as u64);
                let close = opcode::Close::new(types::Fd(*fd))
                    .build()
                    .user_data(CLOSE | n as u64);
                // SAFETY: as above; the ring has room for a chunk's reads and closes.
                unsafe {
                    sq.push(&read).expect("room for a chunk's reads");
                    sq.push(&close).expect("room for a chunk's closes");
                }
            }
        }
        let mut read = vec![-1i32; reads.len()];
        let done = self.complete(2 * reads.len(), |data, res| {
            let n = (data & (CLOSE - 1)) as usize;
            if data & CLOSE == 0 {
                read[n] = res;
            } else if res == -libc::ECANCELED {
                // Not run (only if the ring gave up on the link): closed here instead.
                // SAFETY: the descriptor is ours and still open.
                unsafe { libc::close(reads[n].1) };
            }
        });
        if let Err(e) = done {
            // Reads may still be in flight into the buffer: it is never used again.
            std::mem::forget(std::mem::take(buffer));
            return Err(e);
        }
        for ((i, _, range), got) in reads.into_iter().zip(read) {
            // Not the size fstat gave: the file changed meanwhile, measured anew.
            if got >= 0 && got as usize == range.len() {
                out[i] = Outcome::Read(range);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::{measure, measure_all};
    use std::path::PathBuf;

    fn tmp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("filepipe-uring-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root/sub")).unwrap();
        dir
    }

    /// Descriptors of this process open on something under `dir`.
    fn open_under(dir: &std::path::Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.starts_with(dir))
            .count()
    }

    #[test]
    fn a_chunk_measures_every_file_as_the_ordinary_path_does() {
        let dir = tmp("same");
        let root_path = dir.join("root");
        let mut keys: Vec<String> = Vec::new();
        for (i, size) in [0usize, 1, 100, 4096, 65_535, 65_536, 65_537, 300_000]
            .into_iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..size).map(|b| (b * 7 + i) as u8).collect();
            std::fs::write(root_path.join(format!("sub/f{i}")), data).unwrap();
            keys.push(format!("sub/f{i}"));
        }
        std::fs::write(root_path.join("page.html"), b"<!DOCTYPE html><p>hi").unwrap();
        std::fs::write(dir.join("secret"), b"canary").unwrap();
        std::os::unix::fs::symlink(dir.join("secret"), root_path.join("out")).unwrap();
        std::os::unix::fs::symlink("sub/f2", root_path.join("in")).unwrap();
        // Climbing out of its folder, not out of the root; and out of both.
        std::os::unix::fs::symlink("../page.html", root_path.join("sub/up")).unwrap();
        std::os::unix::fs::symlink("../../secret", root_path.join("sub/out")).unwrap();
        std::os::unix::fs::symlink("sub", root_path.join("sublink")).unwrap();
        let fifo = std::ffi::CString::new(root_path.join("fifo").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        for k in [
            "page.html",
            "out",
            "in",
            "fifo",
            "sub",
            ".",
            "",
            "../secret",
            "nope",
            "a\0b",
        ] {
            keys.push(k.to_owned());
        }
        let root = Root::open(&root_path).unwrap();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        // Limits below, at and above the sizes.
        for max_bytes in [100, 65_536, 1 << 30] {
            let mut buf = Vec::new();
            let ordinary: Vec<_> = keys
                .iter()
                .map(|k| measure(&root, k, max_bytes, &mut buf))
                .collect();
            for threads in [1, 3] {
                let many: Vec<&str> = keys.iter().cycle().take(keys.len() * 20).copied().collect();
                let chunked = measure_all(&root, &many, max_bytes, threads);
                for (n, (got, key)) in chunked.iter().zip(&many).enumerate() {
                    let want = &ordinary[n % keys.len()];
                    match (got, want) {
                        (Ok(g), Ok(w)) => assert_eq!(
                            (g.size, g.sha256, &g.content_type),
                            (w.size, w.sha256, &w.content_type),
                            "{key:?}"
                        ),
                        (Err(g), Err(w)) => assert_eq!(
                            (g.reason, &g.message, g.transient),
                            (w.reason, &w.message, w.transient),
                            "{key:?}"
                        ),
                        _ => panic!("{key:?}: {got:?} where the ordinary path gave {want:?}"),
                    }
                }
            }
        }
        drop(root);
        assert_eq!(open_under(&dir), 0, "a descriptor was left open");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn small_regular_files_are_read_in_the_ring_and_the_rest_handed_back() {
        let dir = tmp("outcomes");
        let root_path = dir.join("root");
        std::fs::write(root_path.join("small"), b"hello\n").unwrap();
        std::fs::write(root_path.join("empty"), b"").unwrap();
        std::fs::write(root_path.join("big"), vec![1u8; SMALL as usize + 1]).unwrap();
        let root = Root::open(&root_path).unwrap();
        let keys = ["small", "empty", "big", "sub", "nope"];
        let mut buffer = Vec::new();
        let Some(outcomes) = read_chunk(&root, &keys, 1 << 30, &mut buffer) else {
            // io_uring is refused here: what the ordinary path does is tested above.
            assert_eq!(in_use(), Some(false));
            eprintln!("io_uring cannot be used on this machine: chunk reads not tested");
            return;
        };
        assert_eq!(in_use(), Some(true));
        let shown: Vec<String> = outcomes
            .into_iter()
            .map(|o| match o {
                Outcome::Read(r) => format!("read {:?}", &buffer[r]),
                Outcome::Open(_) => "open".to_owned(),
                Outcome::Ordinary => "ordinary".to_owned(),
            })
            .collect();
        assert_eq!(
            shown,
            [
                format!("read {:?}", b"hello\n"),
                "read []".to_owned(),
                "open".to_owned(),
                "open".to_owned(),
                "ordinary".to_owned()
            ]
        );
        // Over the limit: handed back open, for the ordinary path to refuse.
        let outcomes = read_chunk(&root, &["small"], 3, &mut buffer).unwrap();
        assert!(matches!(outcomes[..], [Outcome::Open(_)]));
        drop((outcomes, shown, root));
        assert_eq!(open_under(&dir), 0, "a descriptor was left open");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
