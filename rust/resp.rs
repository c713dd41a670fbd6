//! Redis replies as the server sends them (RESP2 or RESP3), in pure Rust: where one
//! reply ends in the bytes read so far ([`Scanner`]), and the entries of a one-stream
//! XREADGROUP reply read in place from its bytes ([`ReadReply`]), so that no object is
//! built per entry, field name or value before the batch is parsed.

/// Most aggregates open at once in a reply the scanner accepts; an XREADGROUP reply
/// nests four deep.
const MAX_DEPTH: usize = 128;

use std::sync::Mutex;

/// Why bytes are not a RESP reply.
#[derive(Debug, PartialEq, Eq)]
pub struct ProtocolError(pub &'static str);

/// Finds where one complete reply ends in a buffer that only grows between calls,
/// looking at each byte about once however the reply arrives in pieces.
#[derive(Debug, Default)]
pub struct Scanner {
    /// Where the next element's header starts.
    pos: usize,
    /// Elements still to come in each aggregate open around `pos`.
    open: Vec<usize>,
}

/// One header line: its type byte, the number it holds (for lengths and counts), and
/// where the line's bytes after the `\r\n` start.
struct Header {
    kind: u8,
    number: i64,
    next: usize,
}

/// The header line starting at `pos`, or None while it is incomplete. A length or a
/// count is read digit by digit, in the one pass that finds the line's end.
fn header(buf: &[u8], pos: usize) -> Result<Option<Header>, ProtocolError> {
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    match kind {
        b'$' | b'!' | b'=' | b'*' | b'~' | b'>' | b'%' | b'|' => {
            let not_a_number = ProtocolError("a length or count is not a number");
            let negative = buf.get(pos + 1) == Some(&b'-');
            let start = pos + 1 + usize::from(negative);
            let mut i = start;
            let mut number: i64 = 0;
            loop {
                let Some(&c) = buf.get(i) else {
                    return Ok(None);
                };
                if !c.is_ascii_digit() {
                    break;
                }
                if i - start == 18 {
                    return Err(not_a_number);
                }
                number = number * 10 + i64::from(c - b'0');
                i += 1;
            }
            if buf[i] != b'\r' || i == start {
                return Err(not_a_number);
            }
            match buf.get(i + 1) {
                None => Ok(None),
                Some(b'\n') => Ok(Some(Header {
                    kind,
                    number: if negative { -number } else { number },
                    next: i + 2,
                })),
                Some(_) => Err(ProtocolError("a line does not end with CRLF")),
            }
        }
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {
            let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') else {
                return Ok(None);
            };
            let end = pos + nl;
            if nl < 2 || buf[end - 1] != b'\r' {
                return Err(ProtocolError("a line does not end with CRLF"));
            }
            Ok(Some(Header {
                kind,
                number: 0,
                next: end + 1,
            }))
        }
        _ => Err(ProtocolError("unknown reply type")),
    }
}

impl Scanner {
    pub fn new() -> Self {
        Scanner::default()
    }

    /// Forgets the reply scanned so far: the next buffer starts a new one.
    pub fn reset(&mut self) {
        self.pos = 0;
        self.open.clear();
    }

    /// Scans what `buf` holds past what earlier calls saw; `buf` must start where the
    /// reply starts and hold at least what it held at the last call. Returns the
    /// reply's length once it is complete (bytes past it belong to the next reply).
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
        loop {
            let Some(h) = header(buf, self.pos)? else {
                return Ok(None);
            };
            let next = match h.kind {
                b'$' | b'!' | b'=' if h.number >= 0 => {
                    let Some(end) = usize::try_from(h.number)
                        .ok()
                        .and_then(|n| h.next.checked_add(n))
                    else {
                        return Err(ProtocolError("a bulk string is too long"));
                    };
                    if buf.len() < end + 2 {
                        return Ok(None);
                    }
                    if &buf[end..end + 2] != b"\r\n" {
                        return Err(ProtocolError("a bulk string does not end with CRLF"));
                    }
                    end + 2
                }
                b'*' | b'~' | b'>' | b'%' | b'|' if h.number > 0 => {
                    let n = usize::try_from(h.number)
                        .map_err(|_| ProtocolError("an aggregate is too long"))?;
                    // A map holds name and value; an attribute, its pairs and the
                    // element it is about.
                    let items = match h.kind {
                        b'%' => n.checked_mul(2),
                        b'|' => n.checked_mul(2).and_then(|n| n.checked_add(1)),
                        _ => Some(n),
                    }
                    .ok_or(ProtocolError("an aggregate is too long"))?;
                    if self.open.len() == MAX_DEPTH {
                        return Err(ProtocolError("a reply nests too deep"));
                    }
                    self.open.push(items);
                    self.pos = h.next;
                    continue;
                }
                // A scalar, a null, or an empty aggregate: one element, complete.
                _ => h.next,
            };
            self.pos = next;
            // The element is complete, and with it every aggregate it was the last of.
            loop {
                let Some(left) = self.open.last_mut() else {
                    return Ok(Some(self.pos));
                };
                *left -= 1;
                if *left > 0 {
                    break;
                }
                self.open.pop();
            }
        }
    }
}

/// A position in a complete reply, reading the elements an XREADGROUP reply is made of.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn header(&mut self) -> Option<Header> {
        let h = header(self.buf, self.pos).ok()??;
        self.pos = h.next;
        Some(h)
    }

    /// A bulk string.
    fn bulk(&mut self) -> Option<&'a [u8]> {
        let h = self.header()?;
        if h.kind != b'$' || h.number < 0 {
            return None;
        }
        let end = h.next.checked_add(usize::try_from(h.number).ok()?)?;
        let value = self.buf.get(h.next..end)?;
        if self.buf.get(end..end + 2)? != b"\r\n" {
            return None;
        }
        self.pos = end + 2;
        Some(value)
    }

    /// An array's length, or None for a null (`*-1` in RESP2, `_` in RESP3); an
    /// error for anything else.
    fn array(&mut self) -> Result<Option<usize>, ()> {
        let h = self.header().ok_or(())?;
        match h.kind {
            b'*' if h.number < 0 => Ok(None),
            b'*' => usize::try_from(h.number).map(Some).map_err(|_| ()),
            b'_' => Ok(None),
            _ => Err(()),
        }
    }
}

impl Drop for ReadReply {
    fn drop(&mut self) {
        keep_spare(std::mem::take(&mut self.buf));
    }
}

/// One entry of a [`ReadReply`]: its id and, unless it was read without them (deleted
/// from the stream while pending), its fields as (name, value) pairs.
pub struct ReplyEntry<'a> {
    pub id: &'a [u8],
    pub fields: Option<Fields<'a>>,
}

/// The fields of one entry, in entry order.
pub struct Fields<'a> {
    cursor: Cursor<'a>,
    left: usize,
}

impl Fields<'_> {
    /// How many (name, value) pairs there are.
    pub fn len(&self) -> usize {
        self.left
    }

    pub fn is_empty(&self) -> bool {
        self.left == 0
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Read once in full when the reply was made: these reads cannot fail.
        let name = self.cursor.bulk().unwrap_or_default();
        let value = self.cursor.bulk().unwrap_or_default();
        Some((name, value))
    }
}

/// The buffers of replies no longer needed, kept for the next replies (at most this many
/// bytes of them): a reply is collected in one thread and dropped in another, after its
/// batch is committed, and memory handed back and forth between threads that way is
/// reused by the allocator late, if at all, so that every reply would fault in fresh
/// pages (and the process would hold more of them). A read takes one buffer and a commit
/// gives one back: a few spare are enough, and more would only be held (draining 1M
/// entries peaked at 150 MB with 16 MiB kept, 126-131 MB with 4 MiB).
const SPARE_BYTES: usize = 4 * 1024 * 1024;
static SPARE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer for a reply of about `size` bytes: a spare one if there is one.
pub fn buffer(size: usize) -> Vec<u8> {
    let spare = SPARE.lock().map(|mut s| s.pop()).unwrap_or(None);
    let mut buf = spare.unwrap_or_default();
    if buf.capacity() < size {
        buf.reserve_exact(size);
    }
    buf
}

fn keep_spare(mut buf: Vec<u8>) {
    if buf.capacity() == 0 {
        return;
    }
    buf.clear();
    if let Ok(mut spare) = SPARE.lock() {
        let kept: usize = spare.iter().map(Vec::capacity).sum();
        if kept + buf.capacity() <= SPARE_BYTES {
            spare.push(buf);
        }
    }
}

/// Where one entry of a [`ReadReply`] is: its id, and the header of its fields.
#[derive(Debug, Clone, Copy)]
struct Span {
    id: (usize, usize),
    fields: usize,
}

/// The entries of a one-stream XREADGROUP reply, in the reply's own bytes: where each
/// entry's id and fields are, and nothing else per entry.
#[derive(Debug)]
pub struct ReadReply {
    buf: Vec<u8>,
    stream: (usize, usize),
    spans: Vec<Span>,
}

impl ReadReply {
    /// Reads `buf` (one complete reply) as the reply of an XREADGROUP on one stream:
    /// `[[stream, [[id, [name, value, …] | nil], …]]]` (RESP2) or
    /// `{stream: [[id, [name, value, …] | nil], …]}` (RESP3). Gives `buf` back if it
    /// is any other reply (an error, a null, several streams).
    pub fn parse(buf: Vec<u8>) -> Result<ReadReply, Vec<u8>> {
        match Self::index(&buf) {
            Some((stream, spans)) => Ok(ReadReply { buf, stream, spans }),
            None => Err(buf),
        }
    }

    fn index(buf: &[u8]) -> Option<((usize, usize), Vec<Span>)> {
        let mut c = Cursor { buf, pos: 0 };
        let top = c.header()?;
        match (top.kind, top.number) {
            (b'*', 1) => {
                if c.array().ok()?? != 2 {
                    return None;
                }
            }
            (b'%', 1) => {}
            _ => return None,
        }
        let name = c.bulk()?;
        let end = c.pos - 2;
        let stream = (end - name.len(), end);
        let count = c.array().ok()??;
        let mut spans = Vec::with_capacity(count.min(buf.len() / 8));
        for _ in 0..count {
            if c.array().ok()?? != 2 {
                return None;
            }
            let id = c.bulk()?;
            let fields = c.pos;
            spans.push(Span {
                id: (fields - 2 - id.len(), fields - 2),
                fields,
            });
            if let Some(items) = c.array().ok()? {
                if items % 2 != 0 {
                    return None;
                }
                for _ in 0..items {
                    c.bulk()?;
                }
            }
        }
        (c.pos == buf.len()).then_some((stream, spans))
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The stream's name.
    pub fn stream(&self) -> &[u8] {
        &self.buf[self.stream.0..self.stream.1]
    }

    /// The reply's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The id of entry `index` (< `len()`).
    pub fn id(&self, index: usize) -> &[u8] {
        let (start, end) = self.spans[index].id;
        &self.buf[start..end]
    }

    /// Entry `index` (< `len()`).
    pub fn entry(&self, index: usize) -> ReplyEntry<'_> {
        let span = self.spans[index];
        let mut cursor = Cursor {
            buf: &self.buf,
            pos: span.fields,
        };
        // Read once in full when the reply was made: this read cannot fail.
        let id = self.id(index);
        let fields = match cursor.array() {
            Ok(Some(items)) => Some(Fields {
                cursor,
                left: items / 2,
            }),
            _ => None,
        };
        ReplyEntry { id, fields }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Vec<u8> {
        let mut out = format!("${}\r\n", s.len()).into_bytes();
        out.extend_from_slice(s);
        out.extend_from_slice(b"\r\n");
        out
    }

    type Entries<'a> = [(&'a [u8], Option<&'a [&'a [u8]]>)];

    /// A RESP2 XREADGROUP reply of `entries` (None: read without fields).
    fn reply(stream: &[u8], entries: &Entries<'_>) -> Vec<u8> {
        let mut out = b"*1\r\n*2\r\n".to_vec();
        out.extend(bulk(stream));
        out.extend(format!("*{}\r\n", entries.len()).into_bytes());
        for (id, fields) in entries {
            out.extend_from_slice(b"*2\r\n");
            out.extend(bulk(id));
            match fields {
                None => out.extend_from_slice(b"*-1\r\n"),
                Some(items) => {
                    out.extend(format!("*{}\r\n", items.len()).into_bytes());
                    for item in *items {
                        out.extend(bulk(item));
                    }
                }
            }
        }
        out
    }

    fn sample() -> Vec<u8> {
        reply(
            b"s",
            &[
                (b"1-0", Some(&[b"key", b"a", b"file_id", b"x\r\ny"])),
                (b"1-1", None),
                (b"2-0", Some(&[])),
            ],
        )
    }

    #[test]
    fn scans_to_the_end_of_one_reply_fed_byte_by_byte() {
        let mut bytes = sample();
        let len = bytes.len();
        bytes.extend_from_slice(b"+OK\r\n");
        let mut s = Scanner::new();
        for n in 0..len {
            assert_eq!(s.scan(&bytes[..n]), Ok(None), "at {n}");
        }
        assert_eq!(s.scan(&bytes[..len]), Ok(Some(len)));
        s.reset();
        assert_eq!(s.scan(&bytes), Ok(Some(len)));
        s.reset();
        assert_eq!(s.scan(&bytes[len..]), Ok(Some(5)));
    }

    #[test]
    fn scans_every_kind_of_element() {
        for (reply, len) in [
            (&b"+PONG\r\n"[..], 7),
            (b"-ERR no\r\n", 9),
            (b":12\r\n", 5),
            (b"$-1\r\n", 5),
            (b"*-1\r\n", 5),
            (b"_\r\n", 3),
            (b"*0\r\n", 4),
            (b"%1\r\n+a\r\n:1\r\n", 12),
            (b"|1\r\n+a\r\n+b\r\n:7\r\n", 16),
            (b"*2\r\n*1\r\n$0\r\n\r\n#t\r\n", 18),
        ] {
            assert_eq!(Scanner::new().scan(reply), Ok(Some(len)), "{reply:?}");
        }
        assert!(Scanner::new().scan(b"?x\r\n").is_err());
        assert!(Scanner::new().scan(b"$3\r\nabcd\r\n").is_err());
        assert!(Scanner::new().scan(b"*x\r\n").is_err());
        assert!(Scanner::new().scan(b"+a\n").is_err());
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1);
        assert!(Scanner::new().scan(deep.as_bytes()).is_err());
    }

    #[test]
    fn reads_the_entries_in_place() {
        let r = ReadReply::parse(sample()).unwrap();
        assert_eq!((r.len(), r.stream()), (3, &b"s"[..]));
        let e = r.entry(0);
        assert_eq!(e.id, b"1-0");
        let fields: Vec<_> = e.fields.unwrap().collect();
        assert_eq!(
            fields,
            vec![(&b"key"[..], &b"a"[..]), (b"file_id", b"x\r\ny")]
        );
        assert!(r.entry(1).fields.is_none());
        assert_eq!(r.entry(2).fields.map(|f| f.len()), Some(0));
    }

    #[test]
    fn reads_a_resp3_reply() {
        let mut bytes = b"%1\r\n".to_vec();
        bytes.extend(bulk(b"stream"));
        bytes.extend_from_slice(b"*2\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nk\r\n$1\r\nv\r\n");
        bytes.extend_from_slice(b"*2\r\n$3\r\n1-1\r\n_\r\n");
        let r = ReadReply::parse(bytes).unwrap();
        assert_eq!((r.len(), r.stream()), (2, &b"stream"[..]));
        assert_eq!(
            r.entry(0).fields.unwrap().next(),
            Some((&b"k"[..], &b"v"[..]))
        );
        assert!(r.entry(1).fields.is_none());
    }

    #[test]
    fn gives_back_any_other_reply() {
        for other in [
            &b"-NOGROUP no such group\r\n"[..],
            b"*-1\r\n",
            b"*3\r\n+a\r\n+b\r\n+c\r\n",
            // Two streams.
            b"*2\r\n*2\r\n$1\r\na\r\n*0\r\n*2\r\n$1\r\nb\r\n*0\r\n",
            // XAUTOCLAIM's shape.
            b"*3\r\n$3\r\n0-0\r\n*0\r\n*0\r\n",
            // An odd field list.
            b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*1\r\n$1\r\nk\r\n",
        ] {
            assert_eq!(ReadReply::parse(other.to_vec()).unwrap_err(), other);
        }
        let mut longer = sample();
        longer.extend_from_slice(b"+OK\r\n");
        assert!(ReadReply::parse(longer).is_err());
    }
}
