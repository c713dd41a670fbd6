//! All PyO3 glue: conversions between Python objects and the pure core, GIL
//! release around the work that takes time, and error mapping. Everything
//! crosses this boundary once per batch.

use std::sync::Mutex;

use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyIterator, PyList, PyString, PyTuple};

use crate::batch::{self, encode_slots, parse_reply, Batch, Copied, SlotError, Slots};
use crate::copy::{self, BatchColumns, Format, Measured};
use crate::entry::{format_uuid, Limits, Storage};
use crate::error::{FileFailure, Reason};
use crate::measure;
use crate::resp::{self, ReadReply, Scanner};
use crate::sniff;
use crate::time::write_pg_timestamp;

pyo3::import_exception!(filepipe.errors, EntryError);
pyo3::import_exception!(filepipe.errors, StorageError);

fn reason_from_str(s: &str) -> PyResult<Reason> {
    Reason::from_code(s).ok_or_else(|| PyValueError::new_err(format!("unknown reason code '{s}'")))
}

/// The validated entries of one XREADGROUP reply, kept on the Rust side.
#[pyclass(frozen, module = "filepipe._native")]
pub struct EntryBatch(Batch);

#[pymethods]
impl EntryBatch {
    fn __len__(&self) -> usize {
        self.0.records.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "<EntryBatch accepted={} rejected={}>",
            self.0.records.len(),
            self.0.rejects.len()
        )
    }

    /// (input position, entry id, reason, message) of every rejected entry.
    #[getter]
    fn rejects(&self) -> Vec<(usize, String, &'static str, String)> {
        self.0
            .rejects
            .iter()
            .map(|(pos, r)| {
                (
                    *pos,
                    r.entry_id.clone(),
                    r.reason.as_str(),
                    r.message.clone(),
                )
            })
            .collect()
    }

    /// Input position of each accepted record.
    #[getter]
    fn positions(&self) -> Vec<usize> {
        self.0.positions.clone()
    }

    /// The bytes of the input entries' ids, field names and values, rejected entries
    /// included: what the batch held when it was read.
    #[getter]
    fn input_bytes(&self) -> usize {
        self.0.input_bytes
    }

    /// The bytes of the last input entry (id, field names and values).
    #[getter]
    fn last_input_bytes(&self) -> usize {
        self.0.last_input_bytes
    }

    /// (storage, key) of each accepted record.
    fn locations(&self) -> Vec<(&'static str, String)> {
        self.0
            .records
            .iter()
            .map(|r| (r.storage.as_str(), r.key.clone()))
            .collect()
    }

    /// Record indices by storage, in record order: only the storages the batch names.
    fn by_storage(&self) -> Vec<(&'static str, Vec<usize>)> {
        let mut local = Vec::new();
        let mut s3 = Vec::new();
        for (i, r) in self.0.records.iter().enumerate() {
            match r.storage {
                Storage::Local => local.push(i),
                Storage::S3 => s3.push(i),
            }
        }
        [(Storage::Local, local), (Storage::S3, s3)]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(st, v)| (st.as_str(), v))
            .collect()
    }

    /// The accepted records as dicts (for inspection and tests; not the hot path).
    fn records<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.0
            .records
            .iter()
            .map(|r| {
                let d = PyDict::new(py);
                d.set_item("stream_id", &r.stream_id)?;
                d.set_item("event_time_us", r.event_time_us)?;
                d.set_item("file_id", format_uuid(&r.file_id))?;
                d.set_item("filename", &r.filename)?;
                d.set_item("storage", r.storage.as_str())?;
                d.set_item("key", &r.key)?;
                d.set_item("declared_size", r.declared_size)?;
                d.set_item("content_type", r.content_type.as_deref())?;
                d.set_item("uploaded_at_us", r.uploaded_at_us)?;
                d.set_item("attributes", r.attributes.clone())?;
                Ok(d)
            })
            .collect()
    }
}

type MeasurementTuple<'py> = (i64, Bound<'py, PyBytes>, Option<String>);

fn slot_error(e: SlotError) -> PyErr {
    match e {
        SlotError::OutOfRange(_) => PyIndexError::new_err(e.to_string()),
        SlotError::Invalid(_) => PyValueError::new_err(e.to_string()),
    }
}

/// What the consumer measured of each accepted record's file, by record index.
#[pyclass(frozen, module = "filepipe._native")]
pub struct Measurements {
    slots: Mutex<Slots>,
}

impl Measurements {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl Measurements {
    #[new]
    fn new(count: usize) -> Self {
        Measurements {
            slots: Mutex::new(Slots::new(count)),
        }
    }

    fn __len__(&self) -> usize {
        self.lock().len()
    }

    /// Records a measurement: size, SHA-256 digest (32 bytes), content type.
    #[pyo3(signature = (index, size, sha256, content_type=None))]
    fn set(
        &self,
        index: usize,
        size: i64,
        sha256: &[u8],
        content_type: Option<&str>,
    ) -> PyResult<()> {
        self.lock()
            .set(index, size, sha256, content_type)
            .map_err(slot_error)
    }

    /// Marks a record as failed, with a reason code; it will not be encoded.
    #[pyo3(signature = (index, reason, message, transient=false))]
    fn fail(&self, index: usize, reason: &str, message: String, transient: bool) -> PyResult<()> {
        let failure = FileFailure {
            reason: reason_from_str(reason)?,
            message,
            transient,
        };
        self.lock().fail(index, failure).map_err(slot_error)
    }

    /// (record index, reason, message, transient) of every failed record.
    fn failures(&self) -> Vec<(usize, &'static str, String, bool)> {
        self.lock()
            .failures()
            .map(|(i, f)| (i, f.reason.as_str(), f.message.clone(), f.transient))
            .collect()
    }

    /// Indices of the records measured successfully.
    fn measured(&self) -> Vec<usize> {
        self.lock().measured()
    }

    /// (size, sha256 digest, content type) of one record, or None if it is not measured.
    fn get<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Option<MeasurementTuple<'py>>> {
        let slots = self.lock();
        Ok(slots.get(index).map_err(slot_error)?.map(|m| {
            (
                m.size,
                PyBytes::new(py, &m.sha256),
                m.content_type.as_deref().map(str::to_owned),
            )
        }))
    }
}

/// The entries of one XREADGROUP reply, in the bytes Redis sent: a sequence of
/// `(id, [name, value, …] | None)` whose items are made only when asked for.
#[pyclass(frozen, sequence, module = "filepipe._native")]
pub struct Reply {
    reply: ReadReply,
    /// The ids, and those of entries read without fields, made once (`entry_ids`).
    ids: PyOnceLock<(Py<PyList>, Py<PyList>)>,
}

impl Reply {
    fn new(reply: ReadReply) -> Self {
        Reply {
            reply,
            ids: PyOnceLock::new(),
        }
    }

    /// Copies of the lists of ids `entry_ids` gives, made once per reply: the reader and
    /// the preparer both ask.
    fn ids<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
        let (ids, gone) = self.ids.get_or_try_init(py, || -> PyResult<_> {
            let ids = PyList::empty(py);
            let gone = PyList::empty(py);
            let reply = &self.reply;
            for i in 0..reply.len() {
                let entry = reply.entry(i);
                let id = PyBytes::new(py, entry.id);
                if entry.fields.as_ref().map_or(true, |f| f.is_empty()) {
                    gone.append(&id)?;
                }
                ids.append(id)?;
            }
            Ok((ids.unbind(), gone.unbind()))
        })?;
        let copy = |list: &Py<PyList>| {
            let list = list.bind(py);
            list.get_slice(0, list.len())
        };
        Ok((copy(ids), copy(gone)))
    }

    fn item<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Bound<'py, PyTuple>> {
        let entry = self.reply.entry(index);
        let id = PyBytes::new(py, entry.id);
        let fields = match entry.fields {
            None => py.None().into_bound(py),
            Some(fields) => {
                let list = PyList::empty(py);
                for (name, value) in fields {
                    list.append(PyBytes::new(py, name))?;
                    list.append(PyBytes::new(py, value))?;
                }
                list.into_any()
            }
        };
        PyTuple::new(py, [id.into_any(), fields])
    }
}

#[pymethods]
impl Reply {
    fn __len__(&self) -> usize {
        self.reply.len()
    }

    fn __getitem__<'py>(&self, py: Python<'py>, index: isize) -> PyResult<Bound<'py, PyTuple>> {
        let len = self.reply.len() as isize;
        let i = if index < 0 { index + len } else { index };
        if i < 0 || i >= len {
            return Err(PyIndexError::new_err("reply index out of range"));
        }
        self.item(py, i as usize)
    }

    /// Every entry (made at once: iterating is for the rare paths, such as filtering).
    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyIterator>> {
        let items = (0..self.reply.len())
            .map(|i| self.item(py, i))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)?.try_iter()
    }

    fn __repr__(&self) -> String {
        format!(
            "<Reply stream={:?} entries={} bytes={}>",
            String::from_utf8_lossy(self.reply.stream()),
            self.reply.len(),
            self.reply.bytes().len()
        )
    }

    /// The stream the entries were read from.
    #[getter]
    fn stream<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.reply.stream())
    }

    /// The size of the reply, in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.reply.bytes().len()
    }
}

/// Collects the bytes of one reply as they are read from a socket, and tells when the
/// reply is complete.
#[pyclass(module = "filepipe._native")]
pub struct ReplyReader {
    buf: Vec<u8>,
    scanner: Scanner,
    /// The reply's length, once complete (or 0 with `invalid`).
    end: Option<usize>,
    invalid: bool,
    /// Size of the last reply: room reserved for the next one.
    last: usize,
}

#[pymethods]
impl ReplyReader {
    #[new]
    fn new() -> Self {
        ReplyReader {
            buf: Vec::new(),
            scanner: Scanner::new(),
            end: None,
            invalid: false,
            last: 0,
        }
    }

    /// Appends the first `n` bytes of `chunk` (a bytearray the socket was read into, or
    /// bytes). True once a whole reply is in, or once the bytes are not a reply this
    /// reader knows (`take` then gives them back).
    fn feed(&mut self, chunk: &Bound<'_, PyAny>, n: usize) -> PyResult<bool> {
        if let Ok(array) = chunk.cast::<PyByteArray>() {
            // SAFETY: the bytes are copied out at once, with no Python code run meanwhile.
            let data = unsafe { array.as_bytes() };
            self.append(data.get(..n))?;
        } else {
            let data = chunk.cast::<PyBytes>()?.as_bytes();
            self.append(data.get(..n))?;
        }
        if self.end.is_none() && !self.invalid {
            match self.scanner.scan(&self.buf) {
                Ok(end) => self.end = end,
                Err(_) => self.invalid = true,
            }
        }
        Ok(self.end.is_some() || self.invalid)
    }

    /// The reply collected, and the bytes read past it; the reader starts afresh. The
    /// reply is a Reply when it is the reply of an XREADGROUP on one stream; otherwise
    /// it is None and every byte read is given back, for another parser.
    fn take<'py>(&mut self, py: Python<'py>) -> PyResult<(Option<Reply>, Bound<'py, PyBytes>)> {
        let mut buf = std::mem::take(&mut self.buf);
        let end = if self.invalid { None } else { self.end };
        self.scanner.reset();
        self.end = None;
        self.invalid = false;
        let Some(end) = end else {
            return Ok((None, PyBytes::new(py, &buf)));
        };
        let rest = PyBytes::new(py, &buf[end..]);
        buf.truncate(end);
        self.last = end;
        let parse = move || ReadReply::parse(buf);
        let parsed = if end < DETACH_BYTES {
            parse()
        } else {
            py.detach(parse)
        };
        match parsed {
            Ok(reply) => Ok((Some(Reply::new(reply)), rest)),
            Err(mut all) => {
                all.extend_from_slice(rest.as_bytes());
                Ok((None, PyBytes::new(py, &all)))
            }
        }
    }
}

impl ReplyReader {
    fn append(&mut self, data: Option<&[u8]>) -> PyResult<()> {
        let data = data.ok_or_else(|| PyValueError::new_err("n is past the chunk's end"))?;
        if self.buf.capacity() == 0 {
            // About the size of the last reply: a reply like it is collected without
            // growing (and copying) the buffer again and again.
            self.buf = resp::buffer(self.last + self.last / 8);
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }
}

fn as_bytes<'a>(obj: &'a Bound<'_, PyAny>, what: &str) -> PyResult<&'a [u8]> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(b.as_bytes());
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(s.to_str()?.as_bytes());
    }
    Err(EntryError::new_err(format!(
        "{what} must be bytes or str, not {}",
        obj.get_type().name()?
    )))
}

/// How many fields an entry has, from its dict's or flat list's length alone.
fn field_count(fields: &Bound<'_, PyAny>) -> PyResult<usize> {
    if let Ok(d) = fields.cast::<PyDict>() {
        return Ok(d.len());
    }
    if let Ok(l) = fields.cast::<PyList>() {
        // A flat [name, value, name, value, …] list, as RESP sends it.
        if l.len() % 2 != 0 {
            return Err(EntryError::new_err(
                "a flat field list must have an even length",
            ));
        }
        return Ok(l.len() / 2);
    }
    Err(EntryError::new_err(format!(
        "entry fields must be a dict or a flat list, not {}",
        fields.get_type().name()?
    )))
}

/// Calls `f(name, value)` for each field of a dict or flat list (`field_count` has
/// checked which it is).
fn for_each_field(fields: &Bound<'_, PyAny>, mut f: impl FnMut(&[u8], &[u8])) -> PyResult<()> {
    if let Ok(d) = fields.cast::<PyDict>() {
        for (k, v) in d.iter() {
            f(
                as_bytes(&k, "a field name")?,
                as_bytes(&v, "a field value")?,
            );
        }
    } else if let Ok(l) = fields.cast::<PyList>() {
        let mut items = l.iter();
        while let (Some(k), Some(v)) = (items.next(), items.next()) {
            f(
                as_bytes(&k, "a field name")?,
                as_bytes(&v, "a field value")?,
            );
        }
    }
    Ok(())
}

/// Below this many copied bytes a batch is parsed without releasing the GIL: taking
/// it back can wait for another thread's switch interval, which costs more than such
/// a parse.
const DETACH_BYTES: usize = 32 * 1024;

fn limit(value: Option<usize>) -> usize {
    value.unwrap_or(usize::MAX)
}

/// Validates a batch of stream entries: a Reply (parsed where it is), or
/// `[(id, {field: value}), …]` as redis-py's XREADGROUP/XAUTOCLAIM replies hold them
/// (bytes or str).
///
/// Those are copied into owned buffers with the GIL held (an entry over a cap is
/// rejected without being copied), then parsed with the GIL released.
#[pyfunction]
#[pyo3(signature = (entries, default_storage="local", id_prefix="", max_fields=None, max_bytes=None))]
fn parse_entries(
    py: Python<'_>,
    entries: &Bound<'_, PyAny>,
    default_storage: &str,
    id_prefix: &str,
    max_fields: Option<usize>,
    max_bytes: Option<usize>,
) -> PyResult<EntryBatch> {
    let default_storage = Storage::parse(default_storage).ok_or_else(|| {
        PyValueError::new_err(format!(
            "default_storage must be 'local' or 's3', not '{default_storage}'"
        ))
    })?;
    let limits = Limits {
        max_fields: limit(max_fields),
        max_bytes: limit(max_bytes),
    };
    let panic_key = std::env::var_os(measure::TEST_PANIC_ENV);
    if let Ok(reply) = entries.cast::<Reply>() {
        // In place: nothing to copy, and the reply cannot change meanwhile.
        let reply: &Reply = reply.get();
        let prefix = id_prefix.to_owned();
        let parse = || {
            let key = panic_key.as_ref().map(|k| k.as_encoded_bytes());
            EntryBatch(parse_reply(
                &reply.reply,
                limits,
                default_storage,
                &prefix,
                key,
            ))
        };
        return Ok(if reply.reply.bytes().len() < DETACH_BYTES {
            parse()
        } else {
            py.detach(parse)
        });
    }
    let mut copied = Copied::with_capacity(entries.len().unwrap_or(0));
    for (pos, entry) in entries.try_iter()?.enumerate() {
        let entry = entry?;
        let not_a_pair =
            || EntryError::new_err(format!("entry {pos} must be an (id, fields) pair"));
        let (id_obj, fields_obj) = if let Ok(t) = entry.cast::<PyTuple>() {
            if t.len() != 2 {
                return Err(not_a_pair());
            }
            (t.get_item(0)?, t.get_item(1)?)
        } else if let Ok(l) = entry.cast::<PyList>() {
            if l.len() != 2 {
                return Err(not_a_pair());
            }
            (l.get_item(0)?, l.get_item(1)?)
        } else {
            return Err(not_a_pair());
        };
        let id = as_bytes(&id_obj, "an entry id")?;
        if fields_obj.is_none() {
            // XAUTOCLAIM/XCLAIM name entries deleted since delivery with no fields.
            copied.add_deleted(pos, id);
            continue;
        }
        let count = field_count(&fields_obj)?;
        copied.add(pos, id, count, limits, |f| for_each_field(&fields_obj, f))?;
    }
    let copied_small = copied.copied_bytes() < DETACH_BYTES;
    let prefix = id_prefix.to_owned();
    let parse = move || {
        let key = panic_key.as_ref().map(|k| k.as_encoded_bytes());
        EntryBatch(copied.parse(default_storage, &prefix, key))
    };
    Ok(if copied_small {
        parse()
    } else {
        py.detach(parse)
    })
}

/// The ids of a reply's entries, and of those among them read without fields (deleted
/// from the stream while pending): two lists of the reply's own id objects, made with
/// no Python code run per entry.
#[pyfunction]
fn entry_ids<'py>(
    py: Python<'py>,
    entries: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
    if let Ok(reply) = entries.cast::<Reply>() {
        return reply.get().ids(py);
    }
    let ids = PyList::empty(py);
    let gone = PyList::empty(py);
    for (pos, entry) in entries.try_iter()?.enumerate() {
        let entry = entry?;
        let not_a_pair =
            || EntryError::new_err(format!("entry {pos} must be an (id, fields) pair"));
        let (id, fields) = if let Ok(t) = entry.cast::<PyTuple>() {
            if t.len() != 2 {
                return Err(not_a_pair());
            }
            (t.get_item(0)?, t.get_item(1)?)
        } else if let Ok(l) = entry.cast::<PyList>() {
            if l.len() != 2 {
                return Err(not_a_pair());
            }
            (l.get_item(0)?, l.get_item(1)?)
        } else {
            return Err(not_a_pair());
        };
        if fields.is_none() || !fields.is_truthy()? {
            gone.append(&id)?;
        }
        ids.append(id)?;
    }
    Ok((ids, gone))
}

/// Measures every local-storage record of `batch` (size, SHA-256, sniffed type)
/// under `root` on up to `threads` threads, with the GIL released.
#[pyfunction]
#[pyo3(signature = (batch, root, max_bytes, threads=4, into=None))]
fn measure_local(
    py: Python<'_>,
    batch: &Bound<'_, EntryBatch>,
    root: &str,
    max_bytes: u64,
    threads: usize,
    into: Option<Bound<'_, Measurements>>,
) -> PyResult<Py<Measurements>> {
    let b = &batch.get().0;
    let out = match into {
        Some(m) => m.unbind(),
        None => Py::new(py, Measurements::new(b.records.len()))?,
    };
    let m: &Measurements = out.get();
    py.detach(|| batch::measure_local(b, &mut m.lock(), root, max_bytes, threads))
        .map_err(|e| {
            if e.starts_with("measurements and batch") {
                PyValueError::new_err(e)
            } else {
                StorageError::new_err(e)
            }
        })?;
    Ok(out)
}

fn measurement_from_tuple(obj: &Bound<'_, PyAny>) -> PyResult<Option<Measured>> {
    if obj.is_none() {
        return Ok(None);
    }
    let bad = || {
        PyValueError::new_err("a measurement must be a (size, sha256, content_type) tuple or None")
    };
    let t = obj.cast::<PyTuple>().map_err(|_| bad())?;
    if t.len() != 3 {
        return Err(bad());
    }
    let size: i64 = t.get_item(0)?.extract()?;
    let digest_obj = t.get_item(1)?;
    let digest = digest_obj
        .cast::<PyBytes>()
        .map_err(|_| PyValueError::new_err("sha256 must be bytes"))?;
    let sha256: [u8; 32] = digest
        .as_bytes()
        .try_into()
        .map_err(|_| PyValueError::new_err("sha256 must be a 32-byte digest"))?;
    let ct_obj = t.get_item(2)?;
    let content_type = if ct_obj.is_none() {
        None
    } else {
        Some(sniff::intern_content_type(
            ct_obj.cast::<PyString>()?.to_str()?,
        ))
    };
    Ok(Some(Measured {
        size,
        sha256,
        content_type,
    }))
}

/// Encodes the measured records of `batch` into one COPY buffer (binary by default,
/// or text), with the GIL released. `measurements` is a Measurements object or a
/// list of (size, sha256, content_type) tuples / None. `only` restricts the
/// buffer to the given record indices. `stream` (the logical stream name) and
/// `consumer` go into every row.
#[pyfunction]
#[pyo3(signature = (batch, measurements, consumer, binary=true, only=None, *, stream))]
fn encode_copy<'py>(
    py: Python<'py>,
    batch: &Bound<'py, EntryBatch>,
    measurements: &Bound<'py, PyAny>,
    consumer: &str,
    binary: bool,
    only: Option<Vec<usize>>,
    stream: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let b = &batch.get().0;
    let format = if binary { Format::Binary } else { Format::Text };
    if let Some(idx) = &only {
        if let Some(bad) = idx.iter().find(|&&i| i >= b.records.len()) {
            return Err(PyIndexError::new_err(format!(
                "record index {bad} out of range"
            )));
        }
    }
    let (consumer, stream) = (consumer.to_owned(), stream.to_owned());
    let columns = BatchColumns {
        stream: &stream,
        consumer: &consumer,
    };
    let buf = if let Ok(m) = measurements.cast::<Measurements>() {
        let m: &Measurements = m.get();
        py.detach(|| encode_slots(b, &m.lock(), columns, format, only.as_deref()))
            .map_err(PyValueError::new_err)?
    } else {
        let list: Vec<Option<Measured>> = measurements
            .try_iter()?
            .map(|o| measurement_from_tuple(&o?))
            .collect::<PyResult<_>>()?;
        // (Content types repeat: measurement_from_tuple interns the common ones.)
        if list.len() != b.records.len() {
            return Err(PyValueError::new_err(
                "measurements and batch differ in length",
            ));
        }
        py.detach(|| batch::encode(b, columns, format, only.as_deref(), |i| list[i].as_ref()))
    };
    Ok(PyBytes::new(py, &buf))
}

/// The content type of a file from its first bytes.
#[pyfunction]
fn sniff_content_type(head: &[u8]) -> &'static str {
    sniff::sniff(head)
}

/// Formats microseconds since the epoch as PostgreSQL prints a UTC timestamptz.
#[pyfunction]
fn format_timestamp(us: i64) -> String {
    let mut out = Vec::with_capacity(32);
    write_pg_timestamp(&mut out, us);
    String::from_utf8(out).expect("ASCII")
}

/// Every reason code the extension can produce.
#[pyfunction]
fn reason_codes() -> Vec<&'static str> {
    Reason::ALL.iter().map(|r| r.as_str()).collect()
}

/// How local files are read: a chunk at a time through io_uring, or one system call at
/// a time (and why), or "not yet" before the first batch was measured.
#[pyfunction]
fn file_reads() -> &'static str {
    crate::uring::describe()
}

#[pymodule]
#[pyo3(name = "_native")]
pub fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("COPY_COLUMNS", copy::COLUMNS.to_vec())?;
    m.add("SNIFF_BYTES", sniff::SNIFF_BYTES)?;
    m.add_class::<EntryBatch>()?;
    m.add_class::<Measurements>()?;
    m.add_class::<Reply>()?;
    m.add_class::<ReplyReader>()?;
    m.add_function(wrap_pyfunction!(parse_entries, m)?)?;
    m.add_function(wrap_pyfunction!(entry_ids, m)?)?;
    m.add_function(wrap_pyfunction!(measure_local, m)?)?;
    m.add_function(wrap_pyfunction!(encode_copy, m)?)?;
    m.add_function(wrap_pyfunction!(sniff_content_type, m)?)?;
    m.add_function(wrap_pyfunction!(format_timestamp, m)?)?;
    m.add_function(wrap_pyfunction!(reason_codes, m)?)?;
    m.add_function(wrap_pyfunction!(file_reads, m)?)?;
    Ok(())
}
