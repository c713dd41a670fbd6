//! A storage root that confines every open beneath it.
//!
//! Confinement uses `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` where the
//! kernel has it (Linux 5.6+): the kernel refuses any resolution, symlinks
//! included, that leaves the root, with no window for a race. Elsewhere the path is
//! canonicalised, checked to be under the root, and opened with `O_NOFOLLOW`.
//! Files are opened non-blocking (a FIFO cannot stall the consumer), and without
//! updating their access time where the kernel allows it (`O_NOATIME`: the consumer's
//! owner owns the files, or may act as if it did): a file read for the first time since
//! it was written would otherwise have its inode written back, for every file.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{FileFailure, Reason};

/// A directory that confines every open beneath it.
pub struct Root {
    dir: OwnedFd,
    canonical: PathBuf,
    /// The kernel refused `O_NOATIME` here (the files are someone else's): not asked again.
    atime_kept: AtomicBool,
}

/// The failure an I/O error on `key` stands for.
pub fn errno_failure(err: std::io::Error, key: &str) -> FileFailure {
    match err.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => FileFailure::new(
            Reason::Missing,
            format!("file '{key}' does not exist in the storage root"),
        ),
        Some(libc::EXDEV) | Some(libc::ELOOP) => FileFailure::new(
            Reason::UnsafeKey,
            format!("file '{key}' resolves outside the storage root (a symlink leaving it?)"),
        ),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOMEM) | Some(libc::EAGAIN)
        | Some(libc::EINTR) => {
            FileFailure::transient(format!("file '{key}' could not be opened for now: {err}"))
        }
        _ => FileFailure::new(
            Reason::Unreadable,
            format!("file '{key}' cannot be read: {err}"),
        ),
    }
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_BENEATH: u64 = 0x08;
/// Read-only, non-blocking (a FIFO cannot stall the open), closed on exec, never a
/// controlling terminal.
const OPEN_FLAGS: i32 = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;

impl Root {
    /// Opens the root directory; it must exist.
    pub fn open(path: &Path) -> std::io::Result<Root> {
        let canonical = std::fs::canonicalize(path)?;
        let c = CString::new(canonical.as_os_str().as_bytes()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in root path")
        })?;
        // SAFETY: a valid C string; the returned descriptor is owned below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let dir = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Root {
            dir,
            canonical,
            atime_kept: AtomicBool::new(false),
        })
    }

    /// The root directory's descriptor (`O_PATH`), for opens relative to it.
    pub fn dir_fd(&self) -> i32 {
        self.dir.as_raw_fd()
    }

    /// The `openat2` flags and resolution that [`Root::open_beneath`] opens with now:
    /// for another way of making the same call (see [`crate::uring`]).
    pub fn open_how(&self) -> (u64, u64) {
        let noatime = !self.atime_kept.load(Ordering::Relaxed);
        (
            (OPEN_FLAGS | if noatime { libc::O_NOATIME } else { 0 }) as u64,
            RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
        )
    }

    /// Opens `key` read-only, confined beneath the root.
    pub fn open_beneath(&self, key: &str) -> Result<File, FileFailure> {
        let c = CString::new(key)
            .map_err(|_| FileFailure::new(Reason::NulByte, "key contains a NUL byte"))?;
        let mut noatime = !self.atime_kept.load(Ordering::Relaxed);
        loop {
            let how = OpenHow {
                flags: (OPEN_FLAGS | if noatime { libc::O_NOATIME } else { 0 }) as u64,
                mode: 0,
                resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
            };
            // SAFETY: openat2 reads `how` (of the size passed) and the C string; both outlive the call.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    self.dir.as_raw_fd(),
                    c.as_ptr(),
                    &how as *const OpenHow,
                    std::mem::size_of::<OpenHow>(),
                )
            };
            if fd >= 0 {
                // SAFETY: a fresh descriptor owned by the File from here on.
                return Ok(unsafe { File::from_raw_fd(fd as i32) });
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                Some(libc::EPERM) if noatime => {
                    // Not the files' owner: open them as before, and from now on.
                    self.atime_kept.store(true, Ordering::Relaxed);
                    noatime = false;
                    continue;
                }
                Some(libc::ENOSYS) | Some(libc::EPERM) => return self.open_checked(key),
                _ => return Err(errno_failure(err, key)),
            }
        }
    }

    /// Fallback without openat2: canonicalise, check, open without following links.
    fn open_checked(&self, key: &str) -> Result<File, FileFailure> {
        let joined = self.canonical.join(key);
        let real = std::fs::canonicalize(&joined).map_err(|e| errno_failure(e, key))?;
        if !real.starts_with(&self.canonical) {
            return Err(errno_failure(
                std::io::Error::from_raw_os_error(libc::EXDEV),
                key,
            ));
        }
        let c = CString::new(real.as_os_str().as_bytes())
            .map_err(|_| FileFailure::new(Reason::NulByte, "key contains a NUL byte"))?;
        let flags = OPEN_FLAGS | libc::O_NOFOLLOW;
        // SAFETY: a valid C string; the descriptor is owned by the File.
        let fd = unsafe { libc::open(c.as_ptr(), flags) };
        if fd < 0 {
            return Err(errno_failure(std::io::Error::last_os_error(), key));
        }
        // SAFETY: fresh descriptor.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}
