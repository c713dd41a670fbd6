"""Passwords stay out of everything shown, and entry text cannot drive a terminal:
`mask_url` over passwords of any characters, the scrubber over client libraries' real
messages, `printable` and the log formatter over escape sequences."""

from __future__ import annotations

import io
import logging
from urllib.parse import quote

import psycopg
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict

from filepipe.config import Settings, load_settings, mask_url
from filepipe.embedded import free_port
from filepipe.redaction import SafeFormatter, error_line, printable, scrub

# Any character libpq can hold in a password (it cannot hold NUL).
PASSWORDS = st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), min_size=1, max_size=40)
USERS = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12)
HOSTS = st.sampled_from(["127.0.0.1", "db.example.com", "[::1]", "redis-0.cache.internal"])
TAILS = st.sampled_from(
    ["/0", "/db", "/app?sslmode=require", "", "/x?application_name=filepipe&connect_timeout=3"]
)


@settings(max_examples=400, deadline=None)
@given(
    scheme=st.sampled_from(["redis", "rediss", "postgresql", "postgres"]),
    user=USERS,
    password=PASSWORDS,
    host=HOSTS,
    port=st.integers(1, 65535),
    tail=TAILS,
    encode=st.booleans(),
)
def test_mask_url_masks_any_password(
    scheme: str, user: str, password: str, host: str, port: int, tail: str, encode: bool
) -> None:
    written = quote(password, safe="") if encode else password
    url = f"{scheme}://{user}:{written}@{host}:{port}{tail}"
    assert mask_url(url) == f"{scheme}://{user}:***@{host}:{port}{tail}"
    if encode and scheme.startswith("postgres"):
        assert conninfo_to_dict(url)["password"] == password  # the URL libpq reads


@settings(max_examples=200, deadline=None)
@given(password=PASSWORDS, tail=TAILS)
def test_mask_url_masks_a_redis_password_without_user(password: str, tail: str) -> None:
    assert mask_url(f"redis://:{password}@127.0.0.1:6379{tail}") == f"redis://:***@127.0.0.1:6379{tail}"


@settings(max_examples=400, deadline=None)
@given(password=PASSWORDS, key=st.sampled_from(["password", "sslpassword"]), spaced=st.booleans())
def test_mask_url_masks_any_password_of_a_key_value_string(password: str, key: str, spaced: bool) -> None:
    quoted = "'" + password.replace("\\", "\\\\").replace("'", "\\'") + "'"
    eq = " = " if spaced else "="
    dsn = f"host=127.0.0.1 port=5432 user=app {key}{eq}{quoted} dbname=test"
    assert conninfo_to_dict(dsn)[key] == password  # what libpq reads
    assert mask_url(dsn) == f"host=127.0.0.1 port=5432 user=app {key}{eq}*** dbname=test"
    if not any(c.isspace() or c in "'\\" for c in password):
        bare = f"user=app {key}={password} dbname=test"
        assert conninfo_to_dict(bare)[key] == password
        assert mask_url(bare) == f"user=app {key}=*** dbname=test"


@settings(max_examples=200, deadline=None)
@given(password=PASSWORDS, tail=TAILS)
def test_mask_url_masks_a_password_in_the_query(password: str, tail: str) -> None:
    url = f"postgresql://app@127.0.0.1/test?password={quote(password, safe='')}&sslmode=require"
    assert mask_url(url) == "postgresql://app@127.0.0.1/test?password=***&sslmode=require"


def test_mask_url_keeps_what_has_no_password() -> None:
    for url in (
        "redis://127.0.0.1:6379/0",
        "postgresql://app@h/db",
        "host=h dbname=x",
        "unix:///tmp/r.sock",
        "",
    ):
        assert mask_url(url) == url


@pytest.mark.parametrize(
    "uri",
    [
        "postgresql://app:Tr0ub4dor%zz3@127.0.0.1:5432/test",  # a broken percent-escape
        "postgresql://app:Tr0ub/4dor@127.0.0.1:5432/test",  # a slash cuts the user info short
        "postgresql://app:Tr0ub4dor#3@127.0.0.1:5432/test",
        "host=127.0.0.1 password=Tr0ub4dor%zz3 user=app dbname='unterminated",
    ],
)
def test_psycopg_messages_are_scrubbed(uri: str) -> None:
    load_settings({"pg_uri": uri}, environ={}, dotenv_path=None)
    with pytest.raises(psycopg.Error) as e:
        psycopg.connect(uri, connect_timeout=2)
    shown = error_line(e.value)
    for piece in ("Tr0ub4dor", "Tr0ub", "4dor"):
        assert piece not in shown, shown


def test_redis_messages_are_scrubbed() -> None:
    url = f"redis://default:Hunter2-Hunter2@127.0.0.1:{free_port()}/0"
    Settings(redis_url=url)
    with pytest.raises(redis.ConnectionError) as e:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    assert "Hunter2" not in error_line(e.value)
    # A message that quotes a URL or a key=value string filepipe never saw is masked too.
    assert scrub("could not open redis://u:OtherSecret@h/0 now") == "could not open redis://u:***@h/0 now"
    assert (
        scrub("bad conninfo: host=h password='Other Secret' x=1") == "bad conninfo: host=h password=*** x=1"
    )


def test_short_passwords_are_scrubbed_only_where_they_stand_alone() -> None:
    Settings(pg_uri="postgresql://app:ab@h/db")
    assert scrub('password "ab" refused') == 'password "***" refused'
    assert scrub("table abacus") == "table abacus"


@settings(max_examples=300, deadline=None)
@given(
    password=PASSWORDS.filter(lambda p: len(p) >= 4 and "*" not in p),
    before=st.text(max_size=10),
    after=st.text(max_size=10),
)
def test_a_known_password_never_survives_scrubbing(password: str, before: str, after: str) -> None:
    Settings(redis_url=f"redis://:{quote(password, safe='')}@127.0.0.1:6379/0")
    assert password not in scrub(f"{before}{password}{after}")


def test_printable_escapes_terminal_controls() -> None:
    hostile = "\x1b[2J\x1b]0;owned\x07\x9b31m\r\nA\u202eB\x00\x7f"
    shown = printable(hostile)
    assert shown == "\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\r\\nA\\u202eB\\x00\\x7f"
    assert printable(b"ok \xff\x1b") == "ok \\xff\\x1b"
    assert printable("über straße 🚀.txt") == "über straße 🚀.txt"


def test_log_lines_are_escaped_and_scrubbed() -> None:
    Settings(pg_uri="postgresql://app:LogSecret-99@h/db")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(SafeFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("filepipe.test_redaction")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("entry %s: field %s refused: %s", "1-0", "\x1b[31mred\nFAKE LINE", "pw LogSecret-99")
        try:
            raise ValueError("connecting with LogSecret-99")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    assert "\x1b" not in text and "LogSecret" not in text
    assert text.splitlines()[0] == "WARNING entry 1-0: field \\x1b[31mred\\nFAKE LINE refused: pw ***"
    assert "ValueError: connecting with ***" in text
