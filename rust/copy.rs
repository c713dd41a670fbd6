//! Encoding of records into one PostgreSQL COPY buffer for the staging table.
//!
//! Columns, in order (see [`COLUMNS`]): event_time, stream, stream_id, file_id,
//! filename, storage, storage_key, size_bytes, checksum_sha256, content_type,
//! uploaded_at, consumer, attributes. `stream` and `consumer` are the same for every
//! row of a buffer ([`BatchColumns`]): they are given once per batch. Both COPY formats are supported: `text` with PostgreSQL's
//! exact escaping, and `binary` (the default: no escaping, and PostgreSQL parses
//! neither timestamps nor UUIDs).

use std::borrow::Cow;

use crate::entry::Record;
use crate::time::{write_pg_timestamp, PG_EPOCH_OFFSET_US};

/// The staging table's columns, in the order every buffer carries them.
pub const COLUMNS: [&str; 13] = [
    "event_time",
    "stream",
    "stream_id",
    "file_id",
    "filename",
    "storage",
    "storage_key",
    "size_bytes",
    "checksum_sha256",
    "content_type",
    "uploaded_at",
    "consumer",
    "attributes",
];

/// What the consumer measured of a record's file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Measured {
    pub size: i64,
    pub sha256: [u8; 32],
    /// Sniffed (or reported by the store); the declared type takes precedence.
    /// Sniffed types are static strings: no allocation per file.
    pub content_type: Option<Cow<'static, str>>,
}

/// The columns whose value is the same for every row of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchColumns<'a> {
    /// The logical stream name (`STREAM_NAME`): part of the row's key, with
    /// `stream_id` and `event_time`, so two streams loading one table never collide.
    pub stream: &'a str,
    /// The consumer that loads the batch.
    pub consumer: &'a str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Binary,
}

const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `s` with COPY text escaping: exactly the characters PostgreSQL's own
/// `COPY TO` escapes (backslash, and backspace, form feed, newline, carriage
/// return, tab, vertical tab); every other byte is sent as it is.
pub fn escape_text(out: &mut Vec<u8>, s: &[u8]) {
    let mut start = 0;
    for (i, &c) in s.iter().enumerate() {
        let esc = match c {
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x0b => b'v',
            _ => continue,
        };
        out.extend_from_slice(&s[start..i]);
        out.push(b'\\');
        out.push(esc);
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
}

/// Appends a JSON string literal (RFC 8259 escaping; non-ASCII left as UTF-8).
pub fn write_json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let b = s.as_bytes();
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let short = match c {
            b'"' => b'"',
            b'\\' => b'\\',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x08 => b'b',
            0x0c => b'f',
            0x00..=0x1f => {
                out.extend_from_slice(&b[start..i]);
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(c >> 4)]);
                out.push(HEX[usize::from(c & 15)]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&b[start..i]);
        out.push(b'\\');
        out.push(short);
        start = i + 1;
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
}

/// The attributes as a JSON object, keys in entry order.
pub fn attributes_json(out: &mut Vec<u8>, attributes: &[(String, String)]) {
    out.push(b'{');
    for (i, (k, v)) in attributes.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        write_json_string(out, k);
        out.extend_from_slice(b": ");
        write_json_string(out, v);
    }
    out.push(b'}');
}

pub fn uuid_text(out: &mut Vec<u8>, u: &[u8; 16]) {
    for (i, byte) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push(b'-');
        }
        out.push(HEX[usize::from(byte >> 4)]);
        out.push(HEX[usize::from(byte & 15)]);
    }
}

fn hex_digest(out: &mut Vec<u8>, digest: &[u8; 32]) {
    for byte in digest {
        out.push(HEX[usize::from(byte >> 4)]);
        out.push(HEX[usize::from(byte & 15)]);
    }
}

/// The buffer's start: the binary header, or nothing for text.
pub fn begin(out: &mut Vec<u8>, format: Format) {
    if format == Format::Binary {
        out.extend_from_slice(BINARY_SIGNATURE);
        out.extend_from_slice(&0i32.to_be_bytes()); // flags
        out.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    }
}

/// The buffer's end: the binary trailer, or nothing for text.
pub fn finish(out: &mut Vec<u8>, format: Format) {
    if format == Format::Binary {
        out.extend_from_slice(&(-1i16).to_be_bytes());
    }
}

/// Appends one row.
pub fn encode_row(
    out: &mut Vec<u8>,
    format: Format,
    record: &Record,
    measured: &Measured,
    batch: BatchColumns<'_>,
) {
    let content_type = record
        .content_type
        .as_deref()
        .or(measured.content_type.as_deref());
    match format {
        Format::Text => encode_text_row(out, record, measured, content_type, batch),
        Format::Binary => encode_binary_row(out, record, measured, content_type, batch),
    }
}

fn encode_text_row(
    out: &mut Vec<u8>,
    r: &Record,
    m: &Measured,
    content_type: Option<&str>,
    batch: BatchColumns<'_>,
) {
    write_pg_timestamp(out, r.event_time_us);
    out.push(b'\t');
    escape_text(out, batch.stream.as_bytes());
    out.push(b'\t');
    escape_text(out, r.stream_id.as_bytes());
    out.push(b'\t');
    uuid_text(out, &r.file_id);
    out.push(b'\t');
    escape_text(out, r.filename.as_bytes());
    out.push(b'\t');
    out.extend_from_slice(r.storage.as_str().as_bytes());
    out.push(b'\t');
    escape_text(out, r.key.as_bytes());
    out.push(b'\t');
    out.extend_from_slice(m.size.to_string().as_bytes());
    out.push(b'\t');
    hex_digest(out, &m.sha256);
    out.push(b'\t');
    match content_type {
        Some(ct) => escape_text(out, ct.as_bytes()),
        None => out.extend_from_slice(b"\\N"),
    }
    out.push(b'\t');
    write_pg_timestamp(out, r.uploaded_at_us);
    out.push(b'\t');
    escape_text(out, batch.consumer.as_bytes());
    out.push(b'\t');
    let mut json = Vec::with_capacity(64);
    attributes_json(&mut json, &r.attributes);
    escape_text(out, &json);
    out.push(b'\n');
}

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn encode_binary_row(
    out: &mut Vec<u8>,
    r: &Record,
    m: &Measured,
    content_type: Option<&str>,
    batch: BatchColumns<'_>,
) {
    out.extend_from_slice(&(COLUMNS.len() as i16).to_be_bytes());
    field(out, &(r.event_time_us - PG_EPOCH_OFFSET_US).to_be_bytes());
    field(out, batch.stream.as_bytes());
    field(out, r.stream_id.as_bytes());
    field(out, &r.file_id);
    field(out, r.filename.as_bytes());
    field(out, r.storage.as_str().as_bytes());
    field(out, r.key.as_bytes());
    field(out, &m.size.to_be_bytes());
    out.extend_from_slice(&64i32.to_be_bytes());
    hex_digest(out, &m.sha256);
    match content_type {
        Some(ct) => field(out, ct.as_bytes()),
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
    }
    field(out, &(r.uploaded_at_us - PG_EPOCH_OFFSET_US).to_be_bytes());
    field(out, batch.consumer.as_bytes());
    // jsonb's binary input: a version byte (1), then the JSON text.
    let len_at = out.len();
    out.extend_from_slice(&0i32.to_be_bytes());
    out.push(1);
    attributes_json(out, &r.attributes);
    let len = (out.len() - len_at - 4) as i32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Encodes every record that has a measurement into one buffer.
pub fn encode<'a>(
    rows: impl Iterator<Item = (&'a Record, &'a Measured)>,
    batch: BatchColumns<'_>,
    format: Format,
    capacity_hint: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity_hint * 256 + 32);
    begin(&mut out, format);
    for (record, measured) in rows {
        encode_row(&mut out, format, record, measured, batch);
    }
    finish(&mut out, format);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Storage;

    fn record() -> Record {
        Record {
            stream_id: "1700000000123-0".into(),
            event_time_us: 1_700_000_000_123_000,
            file_id: [0xab; 16],
            filename: "a\tb\nc\\d\re\x08\x0b\x0c\x01".into(),
            storage: Storage::Local,
            key: "dir/a b.txt".into(),
            declared_size: None,
            content_type: None,
            uploaded_at_us: 0,
            attributes: vec![("k\"".into(), "v\n".into())],
        }
    }

    fn measured() -> Measured {
        Measured {
            size: 42,
            sha256: [1; 32],
            content_type: None,
        }
    }

    const BATCH: BatchColumns<'static> = BatchColumns {
        stream: "uploads\teu",
        consumer: "c1",
    };

    #[test]
    fn text_row_is_escaped_like_postgres() {
        let mut out = Vec::new();
        encode_row(&mut out, Format::Text, &record(), &measured(), BATCH);
        let expected = format!(
            "2023-11-14 22:13:20.123+00\tuploads\\teu\t1700000000123-0\tabababab-abab-abab-abab-abababababab\t\
             a\\tb\\nc\\\\d\\re\\b\\v\\f\x01\tlocal\tdir/a b.txt\t42\t{}\t\\N\t\
             1970-01-01 00:00:00+00\tc1\t{{\"k\\\\\"\": \"v\\\\n\"}}\n",
            "01".repeat(32)
        );
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }

    #[test]
    fn binary_buffer_has_header_and_trailer() {
        let buf = encode(
            [(&record(), &measured())].into_iter(),
            BATCH,
            Format::Binary,
            1,
        );
        assert!(buf.starts_with(BINARY_SIGNATURE));
        assert!(buf.ends_with(&[0xff, 0xff]));
        assert_eq!(&buf[19..21], &13i16.to_be_bytes());
        // event_time (4 + 8 bytes), then the stream name once per row.
        assert_eq!(&buf[33..37], &10i32.to_be_bytes());
        assert_eq!(&buf[37..47], b"uploads\teu");
    }

    #[test]
    fn json_escapes_controls() {
        let mut out = Vec::new();
        write_json_string(&mut out, "a\"\\\u{1}é");
        assert_eq!(String::from_utf8(out).unwrap(), "\"a\\\"\\\\\\u0001é\"");
    }
}
