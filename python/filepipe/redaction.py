"""What a person may see of text that came from elsewhere.

Client libraries quote what they were given: psycopg's message for a connection string
it cannot parse contains the password (`invalid percent-encoded token: "Tr0ub4dor%zz3"`),
and a stream entry's keys and values may hold terminal escape sequences. So:

* `mask_url` shows a Redis or PostgreSQL URL, or a libpq key=value string, with its
  passwords replaced by `***`;
* `scrub` removes every password filepipe knows of (those of every `Settings` built in
  this process, and the libraries' own environment variables) from a message, and masks
  anything in it that looks like a URL with a password or a `password=` pair;
* `error_line` is what filepipe shows or logs of any exception: its first line, scrubbed;
* `printable` escapes control characters (ESC, CSI, BEL, CR, NUL, …) and bidirectional
  overrides in a key or value, so it cannot reach a terminal or a log raw;
* `SafeFormatter` does both to every log line.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

MASK = "***"

# libpq keys whose values are secrets.
_SECRET_KEYS = ("password", "sslpassword")
# A libpq key=value pair holding one: the value quoted ('…' with \' and \\ escapes) or a
# run of non-blanks (where a backslash escapes the next character, blanks included).
_DSN_SECRET = re.compile(
    r"(?P<key>(?<![\w.-])(?:ssl)?password\s*=\s*)(?P<value>'(?:[^'\\]|\\[\s\S])*(?:'|$)|(?:\\[\s\S]|[^\s\\])+\\?)",
    re.IGNORECASE,
)
# `password=` in a URL's query: up to the next `&` (a `#` may be part of the password).
_QUERY_SECRET = re.compile(r"(?P<key>[?&;](?:ssl)?password=)(?P<value>[^&]*)", re.IGNORECASE)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# Something that looks like a URL with a user name: `scheme://user:…@`.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*@[^\s'\"<>]*")
# Secrets shorter than this are replaced only where they stand alone, so that a
# two-letter password does not garble every message.
_SHORT = 4
# Passwords read from the environment by the client libraries themselves.
_ENV_SECRETS = ("PGPASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "REDISCLI_AUTH")

_known: set[str] = set()
_lock = threading.Lock()
_pattern: re.Pattern[str] | None = None


def mask_url(url: str) -> str:
    """`redis://user:secret@host/0` -> `redis://user:***@host/0`; a libpq key/value
    string's `password=` too. The password may hold any character (`/`, `#`, `?`, `@`
    and spaces included): everything from the first `:` of the user info to the last
    `@` is masked."""
    if not url:
        return url
    if not _SCHEME.match(url):
        return _DSN_SECRET.sub(lambda m: m.group("key") + MASK, url)
    scheme, rest = url.split("://", 1)
    at = rest.rfind("@")
    if at >= 0:
        userinfo, hostpart = rest[:at], rest[at + 1 :]
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":" + MASK
        rest = f"{userinfo}@{hostpart}"
    rest = _QUERY_SECRET.sub(lambda m: m.group("key") + MASK, rest)
    return f"{scheme}://{rest}"


def url_secrets(url: str) -> list[str]:
    """The passwords written in a URL or a libpq key/value string, as written and as a
    client library decodes them."""
    found: list[str] = []
    if not url:
        return found
    if _SCHEME.match(url):
        rest = url.split("://", 1)[1]
        at = rest.rfind("@")
        if at >= 0 and ":" in rest[:at]:
            password = rest[:at].split(":", 1)[1]
            found.append(password)
            # A `/`, `?`, `#` or `@` left unescaped ends the user info early for libpq and
            # redis-py, which then quote the pieces as a port, a database or a host name.
            found += re.split(r"[/?#@]", password)
        found += [m.group("value") for m in _QUERY_SECRET.finditer(rest)]
    else:
        for m in _DSN_SECRET.finditer(url):
            value = m.group("value")
            if value.startswith("'"):
                value = value[1:-1] if value.endswith("'") and len(value) > 1 else value[1:]
            found.append(value)
            found.append(re.sub(r"\\([\s\S])", r"\1", value))
    decoded = [unquote(s) for s in found]
    return [s for s in dict.fromkeys(found + decoded) if s]


def remember(secrets: Iterable[str]) -> None:
    """Adds passwords to those `scrub` removes (every `Settings` adds its own)."""
    global _pattern
    new = {s for s in secrets if s} - _known
    if not new:
        return
    with _lock:
        _known.update(new)
        _pattern = None


def _secret_pattern() -> re.Pattern[str] | None:
    global _pattern
    env = {os.environ.get(name, "") for name in _ENV_SECRETS} - {""}
    with _lock:
        if env - _known:
            _known.update(env)
            _pattern = None
        if _pattern is None and _known:
            parts = []
            for s in sorted(_known, key=len, reverse=True):
                escaped = re.escape(s)
                parts.append(escaped if len(s) >= _SHORT else rf"(?<![A-Za-z0-9]){escaped}(?![A-Za-z0-9])")
            _pattern = re.compile("|".join(parts))
        return _pattern


def scrub(text: str) -> str:
    """`text` without any password filepipe knows of, and with URLs and `password=`
    pairs in it masked: for any message that came from a client library."""
    if not text:
        return text
    pattern = _secret_pattern()
    if pattern is not None:
        text = pattern.sub(MASK, text)
    text = _URL.sub(lambda m: mask_url(m.group(0)), text)
    return _DSN_SECRET.sub(lambda m: m.group("key") + MASK, text)


def error_line(e: BaseException) -> str:
    """The first line of an exception's message (its class name if it has none),
    scrubbed: what filepipe shows or logs of an error from psycopg, redis-py or boto3."""
    text = str(e).strip()
    return scrub(text.splitlines()[0] if text else type(e).__name__)


# C0 and C1 controls and DEL; bidirectional overrides and isolates; line and paragraph
# separators. Each is shown as its escape (`\x1b`, `\u202e`).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    ch = m.group(0)
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: str | bytes) -> str:
    """A key, value or message as text that is safe to show in a terminal or write to a
    log: bytes that are not UTF-8 as `\\xff`, control characters as their escapes."""
    text = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value
    return _UNPRINTABLE.sub(_escape, text)


class SafeFormatter(logging.Formatter):
    """A log line with its message made printable (one record, one line) and scrubbed;
    a traceback scrubbed."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = scrub(printable(record.message))
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return scrub(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return scrub(super().formatStack(stack_info))
