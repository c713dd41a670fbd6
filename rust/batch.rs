//! One batch of stream entries on its way through the consumer, in pure Rust: the
//! entries copied out of the reply into one arena, parsed with a panic failing only
//! its entry, and a slot per accepted record that measuring (here, or in Python for
//! S3) moves from pending to measured or failed, which encoding then reads.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use crate::copy::{self, BatchColumns, Format, Measured};
use crate::entry::{parse_entry, Limits, Record, Reject, Storage};
use crate::error::{FileFailure, Reason};
use crate::measure;
use crate::resp::ReadReply;
use crate::root::Root;

/// The validated entries of one reply.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<Record>,
    /// Position in the input list of each accepted record.
    pub positions: Vec<usize>,
    /// (position in the input, reject).
    pub rejects: Vec<(usize, Reject)>,
    /// Bytes of every input entry's id, field names and values.
    pub input_bytes: usize,
    /// Bytes of the last input entry: what the entries written next are likely to hold
    /// (the mean of a batch that straddles a turn from small entries to big ones is not).
    pub last_input_bytes: usize,
}

/// One input entry, copied into [`Copied::arena`]: its id, then name, value, name,
/// value, …, one after the other from `start`, each ending where
/// [`Copied::ends`]`[ends.0..ends.1]` says.
enum Input {
    Entry {
        pos: usize,
        start: usize,
        ends: (usize, usize),
    },
    /// Rejected before parsing (deleted, or over a cap).
    Rejected { pos: usize, reject: Reject },
}

/// A whole batch's entries in owned buffers: the bytes of every id, field name and
/// value in one arena, and where each ends. Filled while the caller holds the input
/// (with the GIL), parsed without it.
#[derive(Default)]
pub struct Copied {
    arena: Vec<u8>,
    ends: Vec<usize>,
    inputs: Vec<Input>,
    /// Ids, field names and values of every input entry, rejected ones included.
    input_bytes: usize,
    last_input_bytes: usize,
}

/// Room reserved per entry of a batch whose length is known: what the producer's entries
/// take, so a batch of them is copied without growing the arena.
const ENTRY_BYTES_HINT: usize = 320;
const ENTRY_FIELDS_HINT: usize = 8;

impl Copied {
    pub fn with_capacity(entries: usize) -> Self {
        Copied {
            arena: Vec::with_capacity(entries * ENTRY_BYTES_HINT),
            ends: Vec::with_capacity(entries * (2 * ENTRY_FIELDS_HINT + 1)),
            inputs: Vec::with_capacity(entries),
            input_bytes: 0,
            last_input_bytes: 0,
        }
    }

    /// Bytes copied so far.
    pub fn copied_bytes(&self) -> usize {
        self.arena.len()
    }

    fn push(&mut self, bytes: &[u8]) {
        self.arena.extend_from_slice(bytes);
        self.ends.push(self.arena.len());
    }

    /// An entry deleted from the stream since its delivery (XAUTOCLAIM names it with
    /// no fields).
    pub fn add_deleted(&mut self, pos: usize, id: &[u8]) {
        self.input_bytes += id.len();
        self.last_input_bytes = id.len();
        self.inputs.push(Input::Rejected {
            pos,
            reject: Reject::new(id, Reason::MissingField, "was deleted from the stream"),
        });
    }

    /// Copies one entry of `count` fields, unless it is over a cap. `visit` calls its
    /// argument with each (name, value) of the entry, once, in order. The field count
    /// is checked before any field is looked at; the bytes are counted as they are
    /// copied, and copying stops at the cap, so an entry over a cap costs no more than
    /// counting it.
    pub fn add<E>(
        &mut self,
        pos: usize,
        id: &[u8],
        count: usize,
        limits: Limits,
        visit: impl FnOnce(&mut dyn FnMut(&[u8], &[u8])) -> Result<(), E>,
    ) -> Result<(), E> {
        self.input_bytes += id.len();
        if let Err(reject) = limits.check_fields(id, count) {
            let mut bytes = 0;
            visit(&mut |n, v| bytes += n.len() + v.len())?;
            self.input_bytes += bytes;
            self.last_input_bytes = id.len() + bytes;
            self.inputs.push(Input::Rejected { pos, reject });
            return Ok(());
        }
        let (start, ends_mark) = (self.arena.len(), self.ends.len());
        self.push(id);
        let mut bytes = id.len();
        let mut over = false;
        self.ends.reserve(count * 2);
        visit(&mut |n, v| {
            bytes += n.len() + v.len();
            over = over || bytes > limits.max_bytes;
            if !over {
                self.push(n);
                self.push(v);
            }
        })?;
        self.input_bytes += bytes - id.len();
        self.last_input_bytes = bytes;
        if let Err(reject) = limits.check_bytes(id, bytes) {
            self.arena.truncate(start);
            self.ends.truncate(ends_mark);
            self.inputs.push(Input::Rejected { pos, reject });
            return Ok(());
        }
        self.inputs.push(Input::Entry {
            pos,
            start,
            ends: (ends_mark, self.ends.len()),
        });
        Ok(())
    }

    /// Parses every copied entry; a panic (a bug) rejects only its entry, with reason
    /// `internal_error`. `panic_key` is the test suite's fault injection (see
    /// [`measure::TEST_PANIC_ENV`]).
    pub fn parse(
        mut self,
        default_storage: Storage,
        id_prefix: &str,
        panic_key: Option<&[u8]>,
    ) -> Batch {
        let mut batch = Batch {
            input_bytes: self.input_bytes,
            last_input_bytes: self.last_input_bytes,
            ..Batch::default()
        };
        let mut fields: Vec<(&[u8], &[u8])> = Vec::new();
        for input in std::mem::take(&mut self.inputs) {
            let (pos, start, spans) = match input {
                Input::Rejected { pos, reject } => {
                    batch.rejects.push((pos, reject));
                    continue;
                }
                Input::Entry { pos, start, ends } => (pos, start, ends),
            };
            let ends = &self.ends[spans.0..spans.1];
            let id = &self.arena[start..ends[0]];
            fields.clear();
            for pair in ends.windows(3).step_by(2) {
                fields.push((&self.arena[pair[0]..pair[1]], &self.arena[pair[1]..pair[2]]));
            }
            batch.parse_one(pos, id, &fields, default_storage, id_prefix, panic_key);
        }
        batch
    }
}

impl Batch {
    /// Parses one entry into a record or a reject; a panic (a bug) rejects only this
    /// entry, with reason `internal_error`.
    fn parse_one(
        &mut self,
        pos: usize,
        id: &[u8],
        fields: &[(&[u8], &[u8])],
        default_storage: Storage,
        id_prefix: &str,
        panic_key: Option<&[u8]>,
    ) {
        let parsed = catch_unwind(AssertUnwindSafe(|| {
            test_panic(panic_key, fields);
            parse_entry(id, fields, default_storage, id_prefix)
        }))
        .unwrap_or_else(|_| {
            Err(Reject::new(
                id,
                Reason::Internal,
                "internal error while parsing (a bug: please report it)",
            ))
        });
        match parsed {
            Ok(record) => {
                self.positions.push(pos);
                self.records.push(record);
            }
            Err(reject) => self.rejects.push((pos, reject)),
        }
    }
}

/// Parses the entries of an XREADGROUP reply where they are, in the reply's bytes, as
/// [`Copied::parse`] parses copied ones: the same caps, checked the same way (the field
/// count before any field, then the bytes), the same rejects, and every byte counted.
pub fn parse_reply(
    reply: &ReadReply,
    limits: Limits,
    default_storage: Storage,
    id_prefix: &str,
    panic_key: Option<&[u8]>,
) -> Batch {
    let mut batch = Batch {
        records: Vec::with_capacity(reply.len()),
        positions: Vec::with_capacity(reply.len()),
        ..Batch::default()
    };
    let mut fields: Vec<(&[u8], &[u8])> = Vec::new();
    for pos in 0..reply.len() {
        let entry = reply.entry(pos);
        let id = entry.id;
        batch.input_bytes += id.len();
        batch.last_input_bytes = id.len();
        let Some(items) = entry.fields else {
            batch.rejects.push((
                pos,
                Reject::new(id, Reason::MissingField, "was deleted from the stream"),
            ));
            continue;
        };
        let count = items.len();
        let fits = count <= limits.max_fields;
        let mut bytes = id.len();
        fields.clear();
        for (name, value) in items {
            bytes += name.len() + value.len();
            if fits && bytes <= limits.max_bytes {
                fields.push((name, value));
            }
        }
        batch.input_bytes += bytes - id.len();
        batch.last_input_bytes = bytes;
        let within = limits
            .check_fields(id, count)
            .and_then(|()| limits.check_bytes(id, bytes));
        if let Err(reject) = within {
            batch.rejects.push((pos, reject));
            continue;
        }
        batch.parse_one(pos, id, &fields, default_storage, id_prefix, panic_key);
    }
    batch
}

/// Fault injection for the test suite: an entry whose `key` equals `panic_key` makes
/// the parser panic, to prove a panic only rejects that entry.
fn test_panic(panic_key: Option<&[u8]>, fields: &[(&[u8], &[u8])]) {
    if let Some(k) = panic_key {
        if fields.iter().any(|(n, v)| *n == b"key" && *v == k) {
            panic!("test panic requested for this key");
        }
    }
}

/// Where one accepted record is: waiting to be measured, measured, or failed.
#[derive(Debug)]
pub enum Slot {
    Pending,
    Done(Measured),
    Failed(FileFailure),
}

/// Why a slot cannot be written or read.
#[derive(Debug, PartialEq, Eq)]
pub enum SlotError {
    /// The record index is past the batch's end.
    OutOfRange(usize),
    /// The measurement is not one (its message says why).
    Invalid(&'static str),
}

impl std::fmt::Display for SlotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlotError::OutOfRange(i) => write!(f, "record index {i} out of range"),
            SlotError::Invalid(why) => f.write_str(why),
        }
    }
}

/// One slot per accepted record of a batch, by record index. A slot can be written
/// again (a retry measures again); encoding reads the measured ones.
#[derive(Debug)]
pub struct Slots(Vec<Slot>);

impl Slots {
    pub fn new(count: usize) -> Self {
        Slots((0..count).map(|_| Slot::Pending).collect())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn slot(&mut self, index: usize) -> Result<&mut Slot, SlotError> {
        self.0.get_mut(index).ok_or(SlotError::OutOfRange(index))
    }

    /// Records a measurement: size, SHA-256 digest, content type.
    pub fn set(
        &mut self,
        index: usize,
        size: i64,
        sha256: &[u8],
        content_type: Option<&str>,
    ) -> Result<(), SlotError> {
        let slot = self.slot(index)?;
        let sha256: [u8; 32] = sha256
            .try_into()
            .map_err(|_| SlotError::Invalid("sha256 must be a 32-byte digest"))?;
        if size < 0 {
            return Err(SlotError::Invalid("size must not be negative"));
        }
        *slot = Slot::Done(Measured {
            size,
            sha256,
            content_type: content_type.map(crate::sniff::intern_content_type),
        });
        Ok(())
    }

    /// Marks a record as failed; it will not be encoded.
    pub fn fail(&mut self, index: usize, failure: FileFailure) -> Result<(), SlotError> {
        *self.slot(index)? = Slot::Failed(failure);
        Ok(())
    }

    /// (record index, failure) of every failed record.
    pub fn failures(&self) -> impl Iterator<Item = (usize, &FileFailure)> {
        self.0.iter().enumerate().filter_map(|(i, s)| match s {
            Slot::Failed(f) => Some((i, f)),
            _ => None,
        })
    }

    /// Indices of the records measured successfully.
    pub fn measured(&self) -> Vec<usize> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(i, s)| matches!(s, Slot::Done(_)).then_some(i))
            .collect()
    }

    /// The measurement of one record, or None while it is pending or failed.
    pub fn get(&self, index: usize) -> Result<Option<&Measured>, SlotError> {
        match self.0.get(index) {
            None => Err(SlotError::OutOfRange(index)),
            Some(Slot::Done(m)) => Ok(Some(m)),
            Some(_) => Ok(None),
        }
    }
}

/// Measures every local-storage record of `batch` under `root` on up to `threads`
/// threads, into `slots`. A panic while measuring fails only its file; the error is
/// the root that cannot be opened (or a bug outside any one file).
pub fn measure_local(
    batch: &Batch,
    slots: &mut Slots,
    root: &str,
    max_bytes: u64,
    threads: usize,
) -> Result<(), String> {
    if slots.len() != batch.records.len() {
        return Err("measurements and batch differ in length".to_owned());
    }
    let local: Vec<usize> = (0..batch.records.len())
        .filter(|&i| batch.records[i].storage == Storage::Local)
        .collect();
    if local.is_empty() {
        return Ok(());
    }
    let root = Root::open(Path::new(root))
        .map_err(|e| format!("local storage root '{root}' cannot be opened: {e}"))?;
    let keys: Vec<&str> = local
        .iter()
        .map(|&i| batch.records[i].key.as_str())
        .collect();
    let results = catch_unwind(AssertUnwindSafe(|| {
        measure::measure_all(&root, &keys, max_bytes, threads)
    }))
    .map_err(|_| "internal error while measuring files (a bug: please report it)".to_owned())?;
    for (i, r) in local.into_iter().zip(results) {
        slots.0[i] = match r {
            Ok(measured) => Slot::Done(measured),
            Err(failure) => Slot::Failed(failure),
        };
    }
    Ok(())
}

/// Encodes the measured records of `batch` (those `measured` gives a measurement
/// for), restricted to the record indices `only` if given, into one COPY buffer.
/// The indices must be in range (the caller checks them).
pub fn encode<'a>(
    batch: &'a Batch,
    columns: BatchColumns<'_>,
    format: Format,
    only: Option<&[usize]>,
    measured: impl Fn(usize) -> Option<&'a Measured>,
) -> Vec<u8> {
    let indices: Box<dyn Iterator<Item = usize>> = match only {
        Some(idx) => Box::new(idx.iter().copied()),
        None => Box::new(0..batch.records.len()),
    };
    let rows = indices.filter_map(|i| measured(i).map(|m| (&batch.records[i], m)));
    copy::encode(rows, columns, format, batch.records.len())
}

/// Encodes the measured records of `batch` from its slots.
pub fn encode_slots(
    batch: &Batch,
    slots: &Slots,
    columns: BatchColumns<'_>,
    format: Format,
    only: Option<&[usize]>,
) -> Result<Vec<u8>, String> {
    if slots.len() != batch.records.len() {
        return Err("measurements and batch differ in length".to_owned());
    }
    Ok(encode(batch, columns, format, only, |i| {
        match &slots.0[i] {
            Slot::Done(m) => Some(m),
            _ => None,
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "123e4567-e89b-12d3-a456-426614174000";

    type Fields<'a> = &'a [(&'a [u8], &'a [u8])];

    fn add(c: &mut Copied, pos: usize, id: &[u8], fields: Fields<'_>, limits: Limits) {
        c.add::<()>(pos, id, fields.len(), limits, |f| {
            for (n, v) in fields {
                f(n, v);
            }
            Ok(())
        })
        .unwrap();
    }

    fn entry(key: &str) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b"file_id", UUID.as_bytes().to_vec()),
            (b"filename", b"a.txt".to_vec()),
            (b"key", key.as_bytes().to_vec()),
        ]
    }

    fn copy_entries(keys: &[&str], limits: Limits) -> Copied {
        let mut c = Copied::with_capacity(keys.len());
        for (pos, key) in keys.iter().enumerate() {
            let e = entry(key);
            let fields: Vec<(&[u8], &[u8])> = e.iter().map(|(n, v)| (*n, v.as_slice())).collect();
            add(
                &mut c,
                pos,
                format!("1700000000000-{pos}").as_bytes(),
                &fields,
                limits,
            );
        }
        c
    }

    #[test]
    fn parses_in_input_order_and_counts_every_byte() {
        let mut c = copy_entries(&["a", "b"], Limits::NONE);
        c.add_deleted(2, b"1-2");
        let b = c.parse(Storage::Local, "p:", None);
        assert_eq!(b.positions, vec![0, 1]);
        assert_eq!(b.records[1].key, "b");
        assert_eq!(b.records[0].stream_id, "p:1700000000000-0");
        assert_eq!(b.rejects.len(), 1);
        assert_eq!(b.rejects[0].0, 2);
        assert_eq!(b.rejects[0].1.reason, Reason::MissingField);
        let one = 15 + 7 + UUID.len() + 8 + 5 + 3 + 1;
        assert_eq!(b.input_bytes, 2 * one + 3);
        assert_eq!(b.last_input_bytes, 3);
    }

    #[test]
    fn a_panic_rejects_only_its_entry() {
        let c = copy_entries(&["a", "boom", "c"], Limits::NONE);
        let b = c.parse(Storage::Local, "", Some(b"boom"));
        assert_eq!(b.positions, vec![0, 2]);
        assert_eq!(b.rejects.len(), 1);
        let (pos, reject) = &b.rejects[0];
        assert_eq!((*pos, reject.reason), (1, Reason::Internal));
        assert!(reject
            .message
            .starts_with("entry 1700000000000-1: internal error"));
    }

    #[test]
    fn an_entry_over_a_cap_is_rejected_without_being_copied() {
        let fields = Limits {
            max_fields: 2,
            max_bytes: usize::MAX,
        };
        let c = copy_entries(&["a"], fields);
        assert_eq!(c.copied_bytes(), 0);
        let b = c.parse(Storage::Local, "", None);
        assert_eq!(b.rejects[0].1.reason, Reason::TooManyFields);
        assert!(b.input_bytes > 0);

        let bytes = Limits {
            max_fields: usize::MAX,
            max_bytes: 40,
        };
        let mut c = copy_entries(&["a"], bytes);
        assert_eq!(c.copied_bytes(), 0);
        add(&mut c, 1, b"1-1", &[], bytes);
        let b = c.parse(Storage::Local, "", None);
        assert_eq!(b.rejects[0].1.reason, Reason::EntryTooLarge);
        assert_eq!(b.rejects[1].1.reason, Reason::MissingField);
    }

    type ReplyEntries<'a> = [(String, Option<Vec<(&'a [u8], Vec<u8>)>>)];

    /// The RESP2 XREADGROUP reply of entries `(id, fields or None)`.
    fn reply_of(entries: &ReplyEntries<'_>) -> ReadReply {
        let bulk = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend(format!("${}\r\n", b.len()).into_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        };
        let mut out = b"*1\r\n*2\r\n".to_vec();
        bulk(&mut out, b"s");
        out.extend(format!("*{}\r\n", entries.len()).into_bytes());
        for (id, fields) in entries {
            out.extend_from_slice(b"*2\r\n");
            bulk(&mut out, id.as_bytes());
            match fields {
                None => out.extend_from_slice(b"*-1\r\n"),
                Some(f) => {
                    out.extend(format!("*{}\r\n", 2 * f.len()).into_bytes());
                    for (n, v) in f {
                        bulk(&mut out, n);
                        bulk(&mut out, v);
                    }
                }
            }
        }
        ReadReply::parse(out).unwrap()
    }

    #[test]
    fn a_reply_parses_in_place_as_its_copied_entries_do() {
        let keys = ["a", "boom", "c", "d"];
        let mut entries: Vec<_> = keys
            .iter()
            .enumerate()
            .map(|(pos, k)| (format!("1700000000000-{pos}"), Some(entry(k))))
            .collect();
        entries.push(("1-9".to_owned(), None));
        let reply = reply_of(&entries);
        for limits in [
            Limits::NONE,
            Limits {
                max_fields: 2,
                max_bytes: usize::MAX,
            },
            Limits {
                max_fields: usize::MAX,
                max_bytes: 70,
            },
        ] {
            let mut c = copy_entries(&keys, limits);
            c.add_deleted(4, b"1-9");
            let copied = c.parse(Storage::Local, "p:", Some(b"boom"));
            let read = parse_reply(&reply, limits, Storage::Local, "p:", Some(b"boom"));
            assert_eq!(read.records, copied.records);
            assert_eq!(read.positions, copied.positions);
            assert_eq!(read.rejects, copied.rejects);
            assert_eq!(read.input_bytes, copied.input_bytes);
            assert_eq!(read.last_input_bytes, copied.last_input_bytes);
        }
        let b = parse_reply(&reply, Limits::NONE, Storage::Local, "", Some(b"boom"));
        assert_eq!(b.positions, vec![0, 2, 3]);
        assert_eq!(b.rejects[0].1.reason, Reason::Internal);
        assert_eq!(
            b.rejects[1],
            (
                4,
                Reject::new(b"1-9", Reason::MissingField, "was deleted from the stream")
            )
        );
    }

    #[test]
    fn a_visitor_error_stops_the_copy() {
        let mut c = Copied::default();
        let r = c.add(0, b"1-0", 1, Limits::NONE, |_| Err("bad field"));
        assert_eq!(r, Err("bad field"));
    }

    #[test]
    fn slots_move_from_pending_to_measured_or_failed() {
        let mut s = Slots::new(3);
        assert_eq!(s.get(0), Ok(None));
        assert_eq!(s.get(3), Err(SlotError::OutOfRange(3)));
        s.set(0, 5, &[7; 32], Some("text/plain")).unwrap();
        s.fail(1, FileFailure::new(Reason::Missing, "gone"))
            .unwrap();
        assert_eq!(s.measured(), vec![0]);
        let failed: Vec<_> = s.failures().map(|(i, f)| (i, f.reason)).collect();
        assert_eq!(failed, vec![(1, Reason::Missing)]);
        assert_eq!(s.get(0).unwrap().unwrap().size, 5);
        // A retry measures a failed record again.
        s.set(1, 0, &[0; 32], None).unwrap();
        assert_eq!(s.measured(), vec![0, 1]);
        assert_eq!(s.failures().count(), 0);
        assert_eq!(
            s.set(2, 1, &[0; 31], None),
            Err(SlotError::Invalid("sha256 must be a 32-byte digest"))
        );
        assert_eq!(
            s.set(2, -1, &[0; 32], None),
            Err(SlotError::Invalid("size must not be negative"))
        );
        assert_eq!(
            s.fail(9, FileFailure::transient("x")),
            Err(SlotError::OutOfRange(9))
        );
        assert_eq!(s.get(2), Ok(None));
    }

    #[test]
    fn measures_local_records_and_encodes_the_measured_ones() {
        let dir = std::env::temp_dir().join(format!("filepipe-batch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a"), b"hello").unwrap();
        let b = copy_entries(&["a", "missing"], Limits::NONE).parse(Storage::Local, "", None);
        let mut slots = Slots::new(b.records.len());
        measure_local(&b, &mut slots, dir.to_str().unwrap(), 100, 2).unwrap();
        assert_eq!(slots.measured(), vec![0]);
        assert_eq!(slots.failures().next().unwrap().1.reason, Reason::Missing);
        let columns = BatchColumns {
            stream: "s",
            consumer: "c",
        };
        let text = encode_slots(&b, &slots, columns, Format::Text, None).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(text.contains("\ta\t"));
        let none = encode_slots(&b, &slots, columns, Format::Text, Some(&[1])).unwrap();
        assert!(none.is_empty());
        let err = measure_local(&b, &mut slots, "/nonexistent/root", 100, 2).unwrap_err();
        assert!(err.starts_with("local storage root '/nonexistent/root' cannot be opened"));
        assert!(measure_local(&b, &mut Slots::new(1), "/", 100, 1).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
