//! Measuring files: size, SHA-256 and a content type sniffed from the first bytes,
//! with every read confined to a storage root.
//!
//! Confinement uses `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` where the
//! kernel has it (Linux 5.6+): the kernel refuses any resolution, symlinks
//! included, that leaves the root, with no window for a race. Elsewhere the path is
//! canonicalised, checked to be under the root, and opened with `O_NOFOLLOW`.
//! Files are opened non-blocking (a FIFO cannot stall the consumer) and must be
//! regular files.

use std::borrow::Cow;
use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use sha2::{Digest, Sha256};

use crate::copy::Measured;
use crate::error::{FileFailure, Reason};

/// Environment variable naming a key whose measurement (and parsing) panics: fault
/// injection for the test suite.
pub const TEST_PANIC_ENV: &str = "FILEPIPE_TEST_PANIC_KEY";

/// How many leading bytes content sniffing looks at.
pub const SNIFF_BYTES: usize = 512;
const CHUNK: usize = 256 * 1024;

/// Magic numbers of common upload types, checked in order.
const MAGIC: &[(usize, &[u8], &str)] = &[
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"%PDF-", "application/pdf"),
    (0, b"PK\x03\x04", "application/zip"),
    (0, b"PK\x05\x06", "application/zip"),
    (0, b"\x1f\x8b", "application/gzip"),
    (0, b"BZh", "application/x-bzip2"),
    (0, b"\xfd7zXZ\x00", "application/x-xz"),
    (0, b"\x28\xb5\x2f\xfd", "application/zstd"),
    (0, b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (0, b"Rar!\x1a\x07", "application/vnd.rar"),
    (257, b"ustar", "application/x-tar"),
    (0, b"BM", "image/bmp"),
    (0, b"II*\x00", "image/tiff"),
    (0, b"MM\x00*", "image/tiff"),
    (0, b"\x00\x00\x01\x00", "image/x-icon"),
    (0, b"ID3", "audio/mpeg"),
    (0, b"\xff\xfb", "audio/mpeg"),
    (0, b"OggS", "audio/ogg"),
    (0, b"fLaC", "audio/flac"),
    (0, b"\x1aE\xdf\xa3", "video/webm"),
    (0, b"\x7fELF", "application/x-elf"),
    (0, b"SQLite format 3\x00", "application/vnd.sqlite3"),
    (0, b"\x00asm", "application/wasm"),
    (0, b"wOFF", "font/woff"),
    (0, b"wOF2", "font/woff2"),
];

/// A content type as a static string when it is one sniffing produces (the common
/// case: no allocation), owned otherwise.
pub fn intern_content_type(s: &str) -> Cow<'static, str> {
    const OTHERS: [&str; 7] = [
        "text/plain",
        "text/html",
        "application/json",
        "application/xml",
        "image/svg+xml",
        "application/octet-stream",
        "application/x-empty",
    ];
    MAGIC
        .iter()
        .map(|m| m.2)
        .chain(OTHERS)
        .find(|k| *k == s)
        .map_or_else(|| Cow::Owned(s.to_owned()), Cow::Borrowed)
}

/// The content type of a file from its first bytes (at most [`SNIFF_BYTES`]).
pub fn sniff(head: &[u8]) -> &'static str {
    for &(offset, magic, kind) in MAGIC {
        if head.len() >= offset + magic.len() && &head[offset..offset + magic.len()] == magic {
            return kind;
        }
    }
    if head.len() >= 12 && &head[0..4] == b"RIFF" {
        match &head[8..12] {
            b"WEBP" => return "image/webp",
            b"WAVE" => return "audio/wav",
            b"AVI " => return "video/x-msvideo",
            _ => {}
        }
    }
    if head.len() >= 12 && &head[4..8] == b"ftyp" {
        return match &head[8..12] {
            b"heic" | b"heix" | b"mif1" => "image/heic",
            b"avif" => "image/avif",
            b"qt  " => "video/quicktime",
            _ => "video/mp4",
        };
    }
    if head.is_empty() {
        return "application/x-empty";
    }
    sniff_text(head)
}

fn sniff_text(head: &[u8]) -> &'static str {
    // A multi-byte character may be cut at the end of the window.
    let valid = match std::str::from_utf8(head) {
        Ok(s) => s,
        Err(e) if e.error_len().is_none() => {
            std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or("")
        }
        Err(_) => return "application/octet-stream",
    };
    if valid
        .bytes()
        .any(|c| c < 0x20 && !matches!(c, b'\t' | b'\n' | b'\r' | 0x0c))
    {
        return "application/octet-stream";
    }
    let start = valid.trim_start_matches('\u{feff}').trim_start();
    let lower: String = start
        .chars()
        .take(64)
        .flat_map(char::to_lowercase)
        .collect();
    if lower.starts_with("<!doctype html") || lower.starts_with("<html") {
        "text/html"
    } else if lower.starts_with("<svg") || (lower.starts_with("<?xml") && valid.contains("<svg")) {
        "image/svg+xml"
    } else if lower.starts_with("<?xml") {
        "application/xml"
    } else if looks_like_json(start) {
        "application/json"
    } else {
        "text/plain"
    }
}

/// `{` then a key or `}`, or `[` then a value or `]`: JSON, not prose that starts with a brace.
fn looks_like_json(s: &str) -> bool {
    let mut chars = s.chars();
    let first = chars.next();
    let next = chars.as_str().trim_start().chars().next();
    match (first, next) {
        (Some('{'), Some('"' | '}')) => true,
        (Some('['), Some(c)) => {
            matches!(c, '{' | '[' | '"' | ']' | '-' | '0'..='9' | 't' | 'f' | 'n')
        }
        _ => false,
    }
}

/// A directory that confines every open beneath it.
pub struct Root {
    dir: OwnedFd,
    canonical: PathBuf,
}

fn errno_failure(err: std::io::Error, key: &str) -> FileFailure {
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
        Ok(Root { dir, canonical })
    }

    fn open_beneath(&self, key: &str) -> Result<File, FileFailure> {
        let c = CString::new(key)
            .map_err(|_| FileFailure::new(Reason::NulByte, "key contains a NUL byte"))?;
        let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
        let how = OpenHow {
            flags: flags as u64,
            mode: 0,
            resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
        };
        loop {
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
        let flags =
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NOFOLLOW;
        // SAFETY: a valid C string; the descriptor is owned by the File.
        let fd = unsafe { libc::open(c.as_ptr(), flags) };
        if fd < 0 {
            return Err(errno_failure(std::io::Error::last_os_error(), key));
        }
        // SAFETY: fresh descriptor.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Measures one file: size, SHA-256, sniffed content type.
    pub fn measure(
        &self,
        key: &str,
        max_bytes: u64,
        buf: &mut Vec<u8>,
    ) -> Result<Measured, FileFailure> {
        let mut file = self.open_beneath(key)?;
        let meta = file.metadata().map_err(|e| errno_failure(e, key))?;
        if !meta.file_type().is_file() {
            return Err(FileFailure::new(
                Reason::NotAFile,
                format!("'{key}' is not a regular file (a directory, FIFO, socket or device)"),
            ));
        }
        if meta.len() > max_bytes {
            return Err(too_large(key, meta.len(), max_bytes));
        }
        hash_reader(&mut file, key, max_bytes, buf)
    }
}

fn too_large(key: &str, size: u64, max_bytes: u64) -> FileFailure {
    FileFailure::new(
        Reason::TooLarge,
        format!(
            "file '{key}' is {size} bytes, more than the limit of {max_bytes} (MAX_FILE_BYTES)"
        ),
    )
}

/// Streams a reader through SHA-256, keeping the first bytes for sniffing.
pub fn hash_reader(
    r: &mut impl Read,
    key: &str,
    max_bytes: u64,
    buf: &mut Vec<u8>,
) -> Result<Measured, FileFailure> {
    buf.resize(CHUNK, 0);
    let mut hasher = Sha256::new();
    let mut head = [0u8; SNIFF_BYTES];
    let mut head_len = 0;
    let mut total: u64 = 0;
    loop {
        let n = match r.read(buf) {
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
    }
    Ok(Measured {
        size: total as i64,
        sha256: hasher.finalize().into(),
        content_type: Some(Cow::Borrowed(sniff(&head[..head_len]))),
    })
}

/// Measures one file; a panic (a bug) fails only this file, with reason `internal_error`.
fn measure_guarded(
    root: &Root,
    key: &str,
    max_bytes: u64,
    buf: &mut Vec<u8>,
    panic_key: Option<&str>,
) -> Result<Measured, FileFailure> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if panic_key == Some(key) {
            panic!("test panic requested for this key");
        }
        root.measure(key, max_bytes, buf)
    }))
    .unwrap_or_else(|_| {
        buf.clear();
        Err(FileFailure::new(
            Reason::Internal,
            format!("internal error while measuring '{key}' (a bug: please report it)"),
        ))
    })
}

/// Measures many files under one root on up to `threads` threads.
pub fn measure_all(
    root: &Root,
    keys: &[&str],
    max_bytes: u64,
    threads: usize,
) -> Vec<Result<Measured, FileFailure>> {
    let panic_key = std::env::var(TEST_PANIC_ENV).ok();
    let panic_key = panic_key.as_deref();
    let threads = threads.clamp(1, 64).min(keys.len().div_ceil(16)).max(1);
    if threads == 1 {
        let mut buf = Vec::new();
        return keys
            .iter()
            .map(|k| measure_guarded(root, k, max_bytes, &mut buf, panic_key))
            .collect();
    }
    let next = AtomicUsize::new(0);
    let mut results: Vec<Option<Result<Measured, FileFailure>>> = vec![None; keys.len()];
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut buf = Vec::new();
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= keys.len() {
                            return done;
                        }
                        done.push((
                            i,
                            measure_guarded(root, keys[i], max_bytes, &mut buf, panic_key),
                        ));
                    }
                })
            })
            .collect();
        for worker in workers {
            for (i, r) in worker.join().expect("a measuring thread panicked") {
                results[i] = Some(r);
            }
        }
    });
    results
        .into_iter()
        .map(|r| r.expect("every slot is filled"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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
        let m = root.measure("sub/a.txt", 100, &mut buf).unwrap();
        assert_eq!(m.size, 6);
        assert_eq!(m.content_type.as_deref(), Some("text/plain"));
        let expected: [u8; 32] = Sha256::digest(b"hello\n").into();
        assert_eq!(m.sha256, expected);
        assert_eq!(root.measure("in", 100, &mut buf).unwrap().sha256, expected);
        assert_eq!(
            root.measure("out", 100, &mut buf).unwrap_err().reason,
            Reason::UnsafeKey
        );
        assert_eq!(
            root.measure("../secret", 100, &mut buf).unwrap_err().reason,
            Reason::UnsafeKey
        );
        assert_eq!(
            root.measure("nope", 100, &mut buf).unwrap_err().reason,
            Reason::Missing
        );
        assert_eq!(
            root.measure("sub", 100, &mut buf).unwrap_err().reason,
            Reason::NotAFile
        );
        assert_eq!(
            root.measure("sub/a.txt", 3, &mut buf).unwrap_err().reason,
            Reason::TooLarge
        );
        let all = measure_all(&root, &["sub/a.txt"; 100], 100, 4);
        assert!(all.iter().all(|r| r.as_ref().unwrap().sha256 == expected));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sniffs() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), "image/png");
        assert_eq!(sniff(b"%PDF-1.7"), "application/pdf");
        assert_eq!(sniff(b"hello world"), "text/plain");
        assert_eq!(sniff(b"  {\"a\": 1}"), "application/json");
        assert_eq!(sniff(b"[1, 2]"), "application/json");
        assert_eq!(sniff(b"{not json"), "text/plain");
        assert_eq!(sniff(b"[see below]"), "text/plain");
        assert_eq!(sniff(b"<!DOCTYPE html><html>"), "text/html");
        assert_eq!(sniff(b"\x00\x01\x02\x03binary"), "application/octet-stream");
        assert_eq!(sniff("héllo".as_bytes()), "text/plain");
        assert_eq!(sniff(&"é".as_bytes()[..1]), "text/plain");
        assert_eq!(sniff(b""), "application/x-empty");
    }
}
