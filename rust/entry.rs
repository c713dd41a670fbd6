//! Validation of one stream entry against the event contract (DESIGN.md).
//!
//! Pure Rust: no Python types. An entry is either a [`Record`] ready to be
//! measured and loaded, or a [`Reject`] with a stable reason code and a message
//! naming the entry id and the field.

use std::collections::HashMap;

use crate::error::Reason;
use crate::time::{parse_rfc3339, MAX_US};

/// Where a record's file lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    Local,
    S3,
}

impl Storage {
    pub fn as_str(self) -> &'static str {
        match self {
            Storage::Local => "local",
            Storage::S3 => "s3",
        }
    }

    pub fn parse(s: &str) -> Option<Storage> {
        match s {
            "local" => Some(Storage::Local),
            "s3" => Some(Storage::S3),
            _ => None,
        }
    }
}

/// A validated entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The value of the `stream_id` column: the entry id, behind the batch's prefix.
    pub stream_id: String,
    /// Microseconds since the epoch, from the entry id's milliseconds.
    pub event_time_us: i64,
    pub file_id: [u8; 16],
    pub filename: String,
    pub storage: Storage,
    pub key: String,
    pub declared_size: Option<i64>,
    pub content_type: Option<String>,
    /// Declared upload time, or the event time when absent.
    pub uploaded_at_us: i64,
    /// Every field outside the contract, in entry order.
    pub attributes: Vec<(String, String)>,
}

/// An entry that cannot become a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    pub entry_id: String,
    pub reason: Reason,
    pub message: String,
}

/// Longest accepted `filename` or `key`, in bytes.
pub const MAX_NAME_BYTES: usize = 4096;
/// Longest accepted `content_type`, in bytes.
pub const MAX_CONTENT_TYPE_BYTES: usize = 255;
/// Longest value quoted back in a message, in characters.
const QUOTE_CHARS: usize = 60;

/// Per-entry caps, checked before an entry is copied or parsed: an entry over one is
/// rejected at the cost of counting it, however many fields or bytes it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most fields (name/value pairs) an entry may have: FILEPIPE_MAX_ENTRY_FIELDS.
    pub max_fields: usize,
    /// Most bytes an entry may hold (its id, field names and values): FILEPIPE_MAX_ENTRY_BYTES.
    pub max_bytes: usize,
}

impl Limits {
    /// No cap at all.
    pub const NONE: Limits = Limits {
        max_fields: usize::MAX,
        max_bytes: usize::MAX,
    };

    /// Checks an entry's field count (known before its fields are looked at).
    pub fn check_fields(&self, id: &[u8], fields: usize) -> Result<(), Reject> {
        if fields <= self.max_fields {
            return Ok(());
        }
        Err(Reject::new(
            id,
            Reason::TooManyFields,
            format!(
                "has {fields} fields, more than FILEPIPE_MAX_ENTRY_FIELDS={}",
                self.max_fields
            ),
        ))
    }

    /// Checks an entry's size: its id, field names and values, in bytes.
    pub fn check_bytes(&self, id: &[u8], bytes: usize) -> Result<(), Reject> {
        if bytes <= self.max_bytes {
            return Ok(());
        }
        Err(Reject::new(
            id,
            Reason::EntryTooLarge,
            format!(
                "is {bytes} bytes (id, field names and values), more than FILEPIPE_MAX_ENTRY_BYTES={}",
                self.max_bytes
            ),
        ))
    }
}

/// How many bytes an entry holds: its id, field names and values.
pub fn entry_bytes(id: &[u8], fields: &[(&[u8], &[u8])]) -> usize {
    id.len() + fields.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>()
}

impl Reject {
    /// A reject of entry `id`; the message is prefixed with `entry <id>: `.
    pub fn new(id: &[u8], reason: Reason, message: impl std::fmt::Display) -> Reject {
        let entry_id = String::from_utf8_lossy(id).into_owned();
        Reject {
            message: format!("entry {entry_id}: {message}"),
            entry_id,
            reason,
        }
    }
}

/// An entry's attributes in entry order, a repeated name keeping its first place and its
/// last value. Small sets are searched in place; past a few names, through a hash map,
/// so an entry with very many fields is still parsed in linear time.
struct Attributes<'a> {
    list: Vec<(&'a str, &'a str)>,
    index: Option<HashMap<&'a str, usize>>,
    /// How many names there may be (the entry's field count): the index's size.
    most: usize,
}

impl<'a> Attributes<'a> {
    /// Up to this many names a linear search is faster than hashing.
    const LINEAR: usize = 16;

    fn new(most: usize) -> Self {
        Attributes {
            list: Vec::new(),
            index: None,
            most,
        }
    }

    fn insert(&mut self, name: &'a str, value: &'a str) {
        if let Some(index) = &mut self.index {
            match index.entry(name) {
                std::collections::hash_map::Entry::Occupied(e) => self.list[*e.get()].1 = value,
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(self.list.len());
                    self.list.push((name, value));
                }
            }
            return;
        }
        if let Some(existing) = self.list.iter_mut().find(|(k, _)| *k == name) {
            existing.1 = value;
            return;
        }
        self.list.push((name, value));
        if self.list.len() > Self::LINEAR {
            // std's hasher (SipHash, randomly keyed): field names are the sender's choice,
            // and must not be able to make every name collide.
            let mut index = HashMap::with_capacity(self.most);
            index.extend(self.list.iter().enumerate().map(|(i, (k, _))| (*k, i)));
            self.index = Some(index);
        }
    }

    fn into_owned(self) -> Vec<(String, String)> {
        self.list
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

/// Quotes a (possibly invalid UTF-8) value for a message, shortened and escaped.
pub fn quote(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    let mut out = String::with_capacity(QUOTE_CHARS + 8);
    out.push('\'');
    for (i, c) in text.chars().enumerate() {
        if i == QUOTE_CHARS {
            out.push('…');
            break;
        }
        out.extend(c.escape_debug());
    }
    out.push('\'');
    out
}

/// Splits an entry id `<ms>-<seq>` into its milliseconds.
pub fn entry_millis(id: &[u8]) -> Option<u64> {
    let dash = id.iter().position(|&c| c == b'-')?;
    let (ms, seq) = (&id[..dash], &id[dash + 1..]);
    let number = |b: &[u8]| -> Option<u64> {
        if b.is_empty() || b.len() > 20 || !b.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(b).ok()?.parse().ok()
    };
    number(seq)?;
    number(ms)
}

/// Parses a UUID in its hyphenated (any case, optionally braced) or 32-digit form.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    let b = if b.len() == 38 && b[0] == b'{' && b[37] == b'}' {
        &b[1..37]
    } else {
        b
    };
    // The 32 hex digits, in place: 8-4-4-4-12 with hyphens, or 32 in a row.
    let mut hex = [0u8; 32];
    match b.len() {
        32 => hex.copy_from_slice(b),
        36 => {
            if b[8] != b'-' || b[13] != b'-' || b[18] != b'-' || b[23] != b'-' {
                return None;
            }
            let mut n = 0;
            for &c in b.iter().filter(|&&c| c != b'-') {
                *hex.get_mut(n)? = c;
                n += 1;
            }
            if n != 32 {
                return None;
            }
        }
        _ => return None,
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Formats 16 bytes as a lower-case hyphenated UUID.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, byte) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{byte:02x}"));
    }
    s
}

/// Whether a storage key is safe: relative, no `..` component, no empty key.
/// Confinement of what the key resolves to is the storage backend's job.
pub fn unsafe_key_problem(key: &str) -> Option<&'static str> {
    let b = key.as_bytes();
    match b.first() {
        None => return Some("is empty"),
        Some(b'/' | b'\\') => return Some("is absolute"),
        _ => {}
    }
    if b.split(|&c| c == b'/' || c == b'\\')
        .any(|part| part == b"..")
    {
        return Some("climbs out of the storage root with '..'");
    }
    None
}

fn is_valid_content_type(s: &str) -> bool {
    let Some((kind, rest)) = s.split_once('/') else {
        return false;
    };
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&c))
    };
    let subtype = rest.split(';').next().unwrap_or("").trim_end();
    token(kind) && token(subtype) && s.bytes().all(|c| (0x20..0x7f).contains(&c))
}

/// Validates one entry. `fields` are in entry order; for a repeated field the last wins.
pub fn parse_entry(
    id: &[u8],
    fields: &[(&[u8], &[u8])],
    default_storage: Storage,
    id_prefix: &str,
) -> Result<Record, Reject> {
    // Built only for a reject: an accepted entry's id goes straight into `stream_id`.
    let reject = |reason: Reason, message: String| Reject::new(id, reason, message);
    let millis = match entry_millis(id) {
        Some(ms) if (ms as i128) * 1000 <= MAX_US as i128 => ms as i64,
        _ => {
            return Err(reject(
                Reason::BadEntryId,
                format!("id {} is not a stream entry id", quote(id)),
            ))
        }
    };

    let mut file_id = None;
    let mut filename = None;
    let mut key = None;
    let mut path = None;
    let mut size = None;
    let mut content_type = None;
    let mut uploaded_at = None;
    let mut storage = None;
    let mut attributes = Attributes::new(fields.len());

    for &(name, value) in fields {
        let Ok(name_str) = std::str::from_utf8(name) else {
            return Err(reject(
                Reason::NotUtf8,
                format!("field name {} is not UTF-8", quote(name)),
            ));
        };
        if name_str.contains('\0') {
            return Err(reject(
                Reason::NulByte,
                format!("field name {} contains a NUL byte", quote(name)),
            ));
        }
        let Ok(text) = std::str::from_utf8(value) else {
            return Err(reject(
                Reason::NotUtf8,
                format!("field '{name_str}' is not UTF-8: {}", quote(value)),
            ));
        };
        if text.contains('\0') {
            return Err(reject(
                Reason::NulByte,
                format!("field '{name_str}' contains a NUL byte, which PostgreSQL cannot store"),
            ));
        }
        let slot = match name_str {
            "file_id" => &mut file_id,
            "filename" => &mut filename,
            "key" => &mut key,
            "path" => &mut path,
            "size" => &mut size,
            "content_type" => &mut content_type,
            "uploaded_at" => &mut uploaded_at,
            "storage" => &mut storage,
            _ => {
                attributes.insert(name_str, text);
                continue;
            }
        };
        *slot = Some(text);
    }

    // `path` is the seed's name for `key`; when both are given, `key` wins and
    // `path` is kept as an attribute.
    let key = match (key, path) {
        (Some(k), Some(p)) => {
            attributes.insert("path", p);
            k
        }
        (Some(k), None) | (None, Some(k)) => k,
        (None, None) => {
            return Err(reject(
                Reason::MissingField,
                "required field 'key' (or 'path') is missing".into(),
            ))
        }
    };
    let Some(file_id) = file_id else {
        return Err(reject(
            Reason::MissingField,
            "required field 'file_id' is missing".into(),
        ));
    };
    let Some(filename) = filename else {
        return Err(reject(
            Reason::MissingField,
            "required field 'filename' is missing".into(),
        ));
    };

    let Some(file_uuid) = parse_uuid(file_id) else {
        return Err(reject(
            Reason::BadUuid,
            format!(
                "field 'file_id' is not a UUID: {}",
                quote(file_id.as_bytes())
            ),
        ));
    };
    if filename.is_empty() {
        return Err(reject(
            Reason::MissingField,
            "field 'filename' is empty".into(),
        ));
    }
    if filename.len() > MAX_NAME_BYTES {
        return Err(reject(
            Reason::TooLong,
            format!(
                "field 'filename' is {} bytes, more than {MAX_NAME_BYTES}",
                filename.len()
            ),
        ));
    }
    if key.len() > MAX_NAME_BYTES {
        return Err(reject(
            Reason::TooLong,
            format!(
                "field 'key' is {} bytes, more than {MAX_NAME_BYTES}",
                key.len()
            ),
        ));
    }
    if let Some(problem) = unsafe_key_problem(key) {
        return Err(reject(
            Reason::UnsafeKey,
            format!("field 'key' {} {problem}", quote(key.as_bytes())),
        ));
    }
    let declared_size = match size {
        None => None,
        Some(s) => match s.parse::<i64>() {
            Ok(n) if s.bytes().all(|c| c.is_ascii_digit()) => Some(n),
            _ => {
                return Err(reject(
                    Reason::BadSize,
                    format!(
                        "field 'size' is not a non-negative integer: {}",
                        quote(s.as_bytes())
                    ),
                ))
            }
        },
    };
    let content_type = match content_type {
        None | Some("") => None,
        Some(ct) if ct.len() <= MAX_CONTENT_TYPE_BYTES && is_valid_content_type(ct) => {
            Some(ct.to_owned())
        }
        Some(ct) => {
            return Err(reject(
                Reason::BadContentType,
                format!(
                    "field 'content_type' is not a media type: {}",
                    quote(ct.as_bytes())
                ),
            ))
        }
    };
    let event_time_us = millis * 1000;
    let uploaded_at_us = match uploaded_at {
        None | Some("") => event_time_us,
        Some(t) => match parse_rfc3339(t) {
            Some(us) => us,
            None => {
                return Err(reject(
                    Reason::BadTimestamp,
                    format!(
                        "field 'uploaded_at' is not an RFC 3339 timestamp: {}",
                        quote(t.as_bytes())
                    ),
                ))
            }
        },
    };
    let storage = match storage {
        None | Some("") => default_storage,
        Some(s) => match Storage::parse(s) {
            Some(st) => st,
            None => {
                return Err(reject(
                    Reason::BadStorage,
                    format!(
                        "field 'storage' must be 'local' or 's3', not {}",
                        quote(s.as_bytes())
                    ),
                ))
            }
        },
    };

    // entry_millis accepted the id: it is ASCII digits and a dash.
    let id_text = std::str::from_utf8(id).unwrap_or_default();
    let mut stream_id = String::with_capacity(id_prefix.len() + id_text.len());
    stream_id.push_str(id_prefix);
    stream_id.push_str(id_text);
    Ok(Record {
        stream_id,
        event_time_us,
        file_id: file_uuid,
        filename: filename.to_owned(),
        storage,
        key: key.to_owned(),
        declared_size,
        content_type,
        uploaded_at_us,
        attributes: attributes.into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "0b7e2a4c-3c1d-4e4f-9a55-2d0c6a1b9e01";

    fn parse(fields: &[(&str, &[u8])]) -> Result<Record, Reject> {
        let f: Vec<(&[u8], &[u8])> = fields.iter().map(|(k, v)| (k.as_bytes(), *v)).collect();
        parse_entry(b"1700000000123-7", &f, Storage::Local, "")
    }

    #[test]
    fn accepts_a_minimal_entry() {
        let r = parse(&[
            ("file_id", UUID.as_bytes()),
            ("filename", b"a.txt"),
            ("path", b"x/a.txt"),
        ])
        .unwrap();
        assert_eq!(r.stream_id, "1700000000123-7");
        assert_eq!(r.event_time_us, 1_700_000_000_123_000);
        assert_eq!(r.uploaded_at_us, r.event_time_us);
        assert_eq!(r.key, "x/a.txt");
        assert_eq!(format_uuid(&r.file_id), UUID);
        assert_eq!(r.storage, Storage::Local);
    }

    #[test]
    fn keeps_unknown_fields_as_attributes() {
        let r = parse(&[
            ("file_id", UUID.as_bytes()),
            ("filename", b"a"),
            ("key", b"a"),
            ("user", b"ann"),
            ("path", b"b"),
        ])
        .unwrap();
        assert_eq!(r.key, "a");
        assert_eq!(
            r.attributes,
            vec![("user".into(), "ann".into()), ("path".into(), "b".into())]
        );
    }

    type Fields<'a> = &'a [(&'a str, &'a [u8])];

    #[test]
    fn rejects_with_reasons() {
        let cases: &[(Fields, Reason)] = &[
            (&[("filename", b"a"), ("key", b"a")], Reason::MissingField),
            (
                &[("file_id", b"nope"), ("filename", b"a"), ("key", b"a")],
                Reason::BadUuid,
            ),
            (
                &[
                    ("file_id", UUID.as_bytes()),
                    ("filename", b"a\xff"),
                    ("key", b"a"),
                ],
                Reason::NotUtf8,
            ),
            (
                &[
                    ("file_id", UUID.as_bytes()),
                    ("filename", b"a\0"),
                    ("key", b"a"),
                ],
                Reason::NulByte,
            ),
            (
                &[
                    ("file_id", UUID.as_bytes()),
                    ("filename", b"a"),
                    ("key", b"/etc/passwd"),
                ],
                Reason::UnsafeKey,
            ),
            (
                &[
                    ("file_id", UUID.as_bytes()),
                    ("filename", b"a"),
                    ("key", b"a/../../b"),
                ],
                Reason::UnsafeKey,
            ),
            (
                &[
                    ("file_id", UUID.as_bytes()),
                    ("filename", b"a"),
                    ("key", b"a"),
                    ("size", b"-1"),
                ],
                Reason::BadSize,
            ),
            (
                &[
                    ("file_id", UUID.as_bytes()),
                    ("filename", b"a"),
                    ("key", b"a"),
                    ("uploaded_at", b"today"),
                ],
                Reason::BadTimestamp,
            ),
            (
                &[
                    ("file_id", UUID.as_bytes()),
                    ("filename", b"a"),
                    ("key", b"a"),
                    ("storage", b"ftp"),
                ],
                Reason::BadStorage,
            ),
            (
                &[
                    ("file_id", UUID.as_bytes()),
                    ("filename", b"a"),
                    ("key", b"a"),
                    ("content_type", b"nonsense"),
                ],
                Reason::BadContentType,
            ),
        ];
        for (fields, reason) in cases {
            let err = parse(fields).unwrap_err();
            assert_eq!(err.reason, *reason, "{}", err.message);
            assert!(
                err.message.starts_with("entry 1700000000123-7: "),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn rejects_bad_entry_ids() {
        for id in [
            &b"abc"[..],
            b"1-",
            b"-1",
            b"99999999999999999999-0",
            b"1.5-0",
        ] {
            let err = parse_entry(id, &[], Storage::Local, "").unwrap_err();
            assert_eq!(err.reason, Reason::BadEntryId);
        }
    }

    /// Names `a0`, `a1`, … with values; `dups` names repeated later with new values.
    fn wide(n: usize, dups: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut f: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b"file_id".to_vec(), UUID.as_bytes().to_vec()),
            (b"filename".to_vec(), b"a".to_vec()),
            (b"key".to_vec(), b"a".to_vec()),
        ];
        for i in 0..n {
            f.push((format!("a{i}").into_bytes(), format!("v{i}").into_bytes()));
        }
        for i in 0..dups {
            f.push((format!("a{}", i * 7 % n).into_bytes(), b"last".to_vec()));
        }
        f
    }

    fn parse_owned(fields: &[(Vec<u8>, Vec<u8>)]) -> Result<Record, Reject> {
        let f: Vec<(&[u8], &[u8])> = fields
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        parse_entry(b"1-0", &f, Storage::Local, "")
    }

    #[test]
    fn a_repeated_attribute_keeps_its_first_place_and_its_last_value() {
        for n in [3, Attributes::LINEAR, Attributes::LINEAR + 1, 500] {
            let r = parse_owned(&wide(n, n)).unwrap();
            assert_eq!(r.attributes.len(), n);
            for (i, (k, v)) in r.attributes.iter().enumerate() {
                assert_eq!(k, &format!("a{i}"));
                let repeated = (0..n).any(|j| j * 7 % n == i);
                assert_eq!(v, if repeated { "last" } else { &r.attributes[i].1 });
                if !repeated {
                    assert_eq!(v, &format!("v{i}"));
                }
            }
        }
    }

    fn best_parse_time(fields: &[(Vec<u8>, Vec<u8>)]) -> std::time::Duration {
        (0..3)
            .map(|_| {
                let t = std::time::Instant::now();
                parse_owned(fields).unwrap();
                t.elapsed()
            })
            .min()
            .unwrap()
    }

    #[test]
    #[ignore = "a timing ratio: run by `make bench` (cargo test --release -- --ignored)"]
    fn parsing_is_linear_in_the_number_of_fields() {
        // Four times the fields: a linear parse takes about four times as long, a
        // quadratic one sixteen times (caches make the larger one slower per field: up to
        // about 11 times seen). Both sizes measured here, back to back.
        let small = wide(25_000, 5_000);
        let large = wide(100_000, 20_000);
        let ratio = best_parse_time(&large).as_secs_f64() / best_parse_time(&small).as_secs_f64();
        assert!(ratio < 13.0, "4x the fields took {ratio:.1}x as long");
    }

    #[test]
    fn caps_reject_above_and_accept_at_the_limit() {
        let limits = Limits {
            max_fields: 3,
            max_bytes: 10,
        };
        assert!(limits.check_fields(b"1-0", 3).is_ok());
        let r = limits.check_fields(b"1-0", 4).unwrap_err();
        assert_eq!(r.reason, Reason::TooManyFields);
        assert_eq!(
            r.message,
            "entry 1-0: has 4 fields, more than FILEPIPE_MAX_ENTRY_FIELDS=3"
        );
        assert!(limits.check_bytes(b"1-0", 10).is_ok());
        let r = limits.check_bytes(b"1-0", 11).unwrap_err();
        assert_eq!(r.reason, Reason::EntryTooLarge);
        assert!(
            r.message.starts_with("entry 1-0: is 11 bytes"),
            "{}",
            r.message
        );
        assert!(
            r.message.ends_with("FILEPIPE_MAX_ENTRY_BYTES=10"),
            "{}",
            r.message
        );
        assert!(Limits::NONE.check_fields(b"1-0", usize::MAX).is_ok());
        let fields: [(&[u8], &[u8]); 2] = [(b"ab", b"cde"), (b"", b"f")];
        assert_eq!(entry_bytes(b"1-0", &fields), 3 + 5 + 1);
    }

    #[test]
    fn uuid_forms() {
        let canonical = parse_uuid(UUID).unwrap();
        assert_eq!(parse_uuid(&UUID.to_uppercase()), Some(canonical));
        assert_eq!(parse_uuid(&UUID.replace('-', "")), Some(canonical));
        assert_eq!(parse_uuid(&format!("{{{UUID}}}")), Some(canonical));
        assert_eq!(parse_uuid("0b7e2a4c-3c1d-4e4f-9a55-2d0c6a1b9e0g"), None);
        assert_eq!(parse_uuid("0b7e2a4c3-c1d-4e4f-9a55-2d0c6a1b9e01"), None);
    }
}
