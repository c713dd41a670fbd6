//! The content type of a file from its first bytes: magic numbers of common upload
//! types, then a look at text (HTML, SVG, XML, JSON, plain).

use std::borrow::Cow;

/// How many leading bytes content sniffing looks at.
pub const SNIFF_BYTES: usize = 512;

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

#[cfg(test)]
mod tests {
    use super::*;

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
