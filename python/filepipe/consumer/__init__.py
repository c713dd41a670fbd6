"""The consumer: Redis stream -> validated records -> measured files -> COPY -> ack.

Stages, in the order data flows, each its own module, each but the reader a `Stage`
(threads fed by one bounded queue, stage.py):

* reader.py, in the caller's thread, reads batches: first its own pending entries,
  then new ones, and entries of dead consumers reclaimed with XAUTOCLAIM;
* prepare.py parses and validates a batch in the extension, measures its files and
  encodes the COPY buffer, while the reader reads the next one;
* load.py: one loader per pooled connection commits prepared batches (bisecting a batch
  the table refuses);
* ack.py writes each committed batch's dead letters and acknowledges it in one atomic
  script;
* liveness.py keeps the heartbeat and the claims on the entries in hand fresh.

At most `in_flight` batches wait between stages, so memory is bounded by batch size
x batches in flight, never by the backlog. An entry is acknowledged only after the
row that records it is committed, or after its dead letter is written: a crash
anywhere loses nothing, and redelivery duplicates nothing. pipeline.py wires them
into the `Consumer`.
"""

from .pipeline import Consumer
from .progress import Progress, Stats

__all__ = ["Consumer", "Progress", "Stats"]
