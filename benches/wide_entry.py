"""What one entry with very many fields costs the parser: the batch `[(id, [name, value, …])]`
as the consumer reads it (a flat list of bytes), parsed with no cap (the parse proper) and
with the default caps (the entry is rejected as `too_many_fields` after being counted);
best of three runs each.

    python -m benches.wide_entry --fields 1000000
    python -m benches.wide_entry --fields 100000 200000 300000

Also prints how far another Python thread got meanwhile, as a share of the parse time:
about 0 when the parse holds the GIL throughout, most of it when the GIL is released."""

from __future__ import annotations

import argparse
import functools
import uuid

from tests.support.gil import timed_with_free_share

from filepipe import _native
from filepipe.constants import DEFAULT_MAX_ENTRY_BYTES, DEFAULT_MAX_ENTRY_FIELDS


def wide_entry(fields: int) -> list[tuple[bytes, list[bytes]]]:
    flat = [b"file_id", str(uuid.uuid4()).encode(), b"filename", b"a.txt", b"key", b"a.txt"]
    for i in range(fields - 3):
        flat += [b"attr_%d" % i, b"value %d" % i]
    return [(b"1700000000000-0", flat)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, nargs="+", default=[1_000_000])
    args = parser.parse_args()
    capped = "max_fields" in (_native.parse_entries.__text_signature__ or "")
    for n in args.fields:
        batch = wide_entry(n)
        seconds, free = min(
            timed_with_free_share(functools.partial(_native.parse_entries, batch)) for _ in range(3)
        )
        line = f"{n:>9,} fields: parse {seconds * 1000:9.1f} ms (other thread free {free:4.0%} of it)"
        if capped:
            capped_s, _ = min(
                timed_with_free_share(
                    functools.partial(
                        _native.parse_entries,
                        batch,
                        max_fields=DEFAULT_MAX_ENTRY_FIELDS,
                        max_bytes=DEFAULT_MAX_ENTRY_BYTES,
                    )
                )
                for _ in range(3)
            )
            rejects = _native.parse_entries(batch, max_fields=DEFAULT_MAX_ENTRY_FIELDS).rejects
            outcome = rejects[0][2] if rejects else "accepted"
            line += f"; with the default caps {capped_s * 1000:.1f} ms ({outcome})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
