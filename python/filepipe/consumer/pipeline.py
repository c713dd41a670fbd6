"""The `Consumer`: connects the services, wires the stages, runs until stopped."""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from collections.abc import Callable

import psycopg
import redis
from redis.exceptions import RedisClusterException

from .. import db, metrics, shutdown, stream
from .._faults import crash_point
from ..config import Settings, mask_url
from ..constants import DEFAULT_BATCH_SIZE
from ..errors import ConfigError, DatabaseError, SchemaError, TransientError
from ..partitions import partitions
from ..redaction import error_line
from ..retention import Housekeeper
from ..retry import (
    Abandoned,
    Backoff,
    Outage,
    is_transient_pg,
    is_transient_redis,
    permanent_pg,
    permanent_redis,
)
from ..storage import Storage
from ..stream import DeadLetter, ReadSize
from .ack import Ack
from .liveness import InHand, Liveness
from .load import Load, pg_refused
from .pace import Pace
from .prepare import Files, Prepared, prepare
from .progress import Progress, Stats
from .reader import RawBatch, Reader
from .stage import Lifecycle, Stage

log = logging.getLogger("filepipe")


class Consumer:
    """One member of the consumer group. `run()` until `stop()` (or, with
    `drain=True`, until nothing new or pending is left)."""

    def __init__(
        self,
        settings: Settings,
        *,
        drain: bool = False,
        write: Callable[[str], None] | None = print,
        progress_interval: float = 1.0,
        storage: Storage | None = None,
        install_signals: bool = False,
        stop_timeout: float = 30.0,
    ) -> None:
        s = settings
        self.settings = s
        self.drain = drain
        self.name = s.consumer_name
        self.stats = Stats()
        self.progress = Progress(write, progress_interval)
        self.life = Lifecycle(stop_timeout)
        # SIGTERM/SIGINT: a stop request (`filepipe consume` installs it before anything
        # else; a signal that came already stops this consumer before it reads).
        self._own_signals = install_signals and shutdown.installed() is None
        self._stop_request = shutdown.install() if install_signals else None
        if self._stop_request is not None:
            self._stop_request.listen(self._on_signal)
        self.redis = self._connect_redis()
        # Every loader's connection opens now, in the background, while Redis is set up:
        # on a slow network the first loads would otherwise wait for them one by one.
        self.pool = db.create_pool(s, min_size=s.pool_size)
        self._loaders_doubled = False  # on a slow network (_double_loaders)
        self._grow_lock = threading.Lock()
        # Every stream this consumer reads: the stream, or each of its partitions.
        self.parts = partitions(s)
        self._errors: dict[str, str] = {}
        life = self.life

        self.in_hand = InHand(self.redis, s, self.name)
        self.liveness = Liveness(
            self.redis, s, self.name, self.parts, self.stats, self.in_hand, lambda: self.acker.held_count()
        )
        beat = self.liveness.beat
        # Every retry counts in filepipe_retries_total; a drain gives up on an outage that
        # lasts longer than FILEPIPE_DRAIN_TIMEOUT.
        give_up_after = s.drain_timeout if drain else None
        backoff = functools.partial(Backoff, on_retry=metrics.record_retry, give_up_after=give_up_after)
        # One Redis outage is one warning, whichever threads wait it out. The reader and the
        # storage give up at a stop; loading and acknowledging go on until its deadline.
        redis_outage = Outage("Redis", self._error_sink("Redis"))
        self.redis_backoff = backoff("Redis", stop=life.stopping, outage=redis_outage)
        ack_backoff = backoff("Redis", stop=life.abandon, outage=redis_outage)
        held_backoff = backoff("Redis", stop=life.abandon, outage=redis_outage)
        pg_backoff = backoff(
            "PostgreSQL", stop=life.abandon, on_error=self._error_sink("PostgreSQL"), on_wait=beat
        )
        # At the start, PostgreSQL is waited for until a stop (nothing is in hand yet).
        self._pg_start_backoff = backoff("PostgreSQL", stop=life.stopping, outage=pg_backoff.outage)
        # A table that refuses every row (a constraint, trigger or NOT NULL column no row
        # satisfies, a revoked privilege, a read-only database) is waited out like an outage.
        table = f"PostgreSQL table {s.table}"
        refusal = Outage(
            table, self._error_sink("table"), state="refuses rows", recovery="accepts rows again"
        )
        table_backoff = backoff(table, stop=life.abandon, outage=refusal, on_wait=beat)
        storage_backoff = backoff(
            "Storage", stop=life.stopping, on_error=self._error_sink("Storage"), on_wait=beat
        )

        self.files = Files(s, storage_backoff, life.stopping.is_set, storage)
        self.load = Load(s, self.name, db.Loader(self.pool, s), pg_backoff, table_backoff, life.abandon)
        # Trims what every group has acknowledged, caps dead letters, removes departed consumers.
        self.housekeeper = Housekeeper(
            s, self.redis, self.parts, self.name, on_error=self._error_sink("Trimming")
        )
        self.acker = Ack(
            s,
            self.name,
            self.redis,
            self.parts,
            self.stats,
            self.progress,
            self.in_hand,
            self.housekeeper,
            ack_backoff,
            held_backoff,
            life.abandon,
            beat,
        )
        # CONSUMER_BATCH_SIZE set on purpose caps every read; left at its default, the reads
        # may grow beyond it to cover slow round trips (FILEPIPE_BATCH_BYTES still holds).
        read_size = ReadSize(
            s.batch_size, s.batch_bytes, s.max_entry_bytes, beyond=s.batch_size == DEFAULT_BATCH_SIZE
        )
        self._read_size = read_size
        # Reads grow to cover the round trips to Redis and PostgreSQL, measured as it runs.
        self.pace = Pace(read_size)

        # The stages, in the order data flows. At most `in_flight` batches wait between
        # them; the reader reads the next batch while the preparer works on this one.
        self.acking: Stage[tuple[Prepared, int, list[DeadLetter]]] = Stage(
            "acker",
            life,
            self.acker.finish_batch,
            maxsize=s.in_flight,
            drop=self.acker.drop,
            idle=self.acker.idle,
            on_idle=self.acker.on_idle,
            on_end=self.acker.on_end,
        )
        # One loader per pooled connection: several COPYs can be in flight (PostgreSQL works
        # on one while the next is sent), and the next starts while one is acknowledged.
        self.loading: Stage[Prepared] = Stage(
            "loader",
            life,
            self._load_one,
            maxsize=s.in_flight,
            workers=s.pool_size,
            drop=lambda p: self.in_hand.landed(p.part.stream, p.ids),
        )
        self.preparing: Stage[RawBatch] = Stage(
            "preparer",
            life,
            self._prepare_one,
            maxsize=1,
            drop=lambda raw: self.in_hand.landed(raw[0].stream, [e[0] for e in raw[1]]),
        )
        self.reader = Reader(
            s,
            self.name,
            self.redis,
            self.parts,
            life=life,
            drain=drain,
            backoff=self.redis_backoff,
            in_hand=self.in_hand,
            stats=self.stats,
            read_size=read_size,
            submit=self.preparing.put,
            busy=self._busy,
            beat=beat,
            pace=self.pace,
        )

    # -- lifecycle -------------------------------------------------------------------

    @property
    def failed(self) -> BaseException | None:
        return self.life.failed

    def stop(self) -> None:
        """Asks the consumer to finish the batches in hand and return."""
        self.life.stop()

    def _on_signal(self, signum: int) -> None:
        # A second signal leaves at once (shutdown.StopRequest): unacknowledged entries
        # stay pending and are redelivered, so nothing is lost.
        log.warning("%s received: finishing the batch in hand, then stopping", signal.Signals(signum).name)
        self.stop()

    def _error_sink(self, service: str) -> Callable[[str], None]:
        return functools.partial(self._note_error, service)

    def _note_error(self, service: str, message: str) -> None:
        """The heartbeat's `last_error`: the outages going on now ("" when none is)."""
        if message:
            self._errors[service] = message
        else:
            self._errors.pop(service, None)
        self.stats.last_error = "; ".join(self._errors.values())
        if service != "Redis":  # (a heartbeat cannot tell of Redis's own outage)
            self.liveness.beat(force=True)  # `status` hears of it now, not a few backoffs later

    def table_refusal(self) -> str:
        """Why the events table refuses every row right now ("" when it does not)."""
        return self.load.table_refusal()

    def _connect_redis(self) -> redis.Redis:
        """The Redis client. redis-py's cluster client must reach a node to be made: a
        Redis Cluster none of whose nodes answers yet is waited for like a service at the
        start, until a stop (then `run` returns at once, Stats.abandoned) or, draining,
        FILEPIPE_DRAIN_TIMEOUT (GaveUp)."""
        s = self.settings
        if not s.redis_cluster:
            return stream.connect(s)
        backoff = Backoff(
            "Redis",
            stop=self.life.stopping,
            on_retry=metrics.record_retry,
            give_up_after=s.drain_timeout if self.drain else None,
        )
        try:
            return backoff.call(lambda: stream.connect(s), lambda e: isinstance(e, TransientError))
        except Abandoned:
            self.stats.abandoned = (
                f"stopped while waiting for Redis at the start "
                f"({backoff.last_message or 'no answer yet'}); nothing was read"
            )
            return redis.Redis.from_url(s.redis_url)  # never connected: `run` returns first

    def run(self) -> Stats:
        """Consumes until stopped (or drained). Returns the totals. A refusal of Redis's
        that waiting will not fix, at the start or later (a password changed, a user
        disabled, a command the ACL now denies), is a ConfigError with its reason: exit 2."""
        if self.stats.abandoned:  # stopped while the cluster was waited for: nothing was made
            self.pool.close()
            if self._stop_request is not None:
                self._stop_request.unlisten(self._on_signal)
                if self._own_signals:
                    shutdown.uninstall()
            return self.stats
        try:
            return self._run()
        except (redis.RedisError, RedisClusterException) as e:
            if permanent_redis(e):
                raise redis_refused(self.settings, e) from e
            raise

    def _run(self) -> Stats:
        life = self.life
        started = False
        try:
            self._start()
            if not life.stopping.is_set():
                started = True
                self.acking.start()
                self.loading.start()
                self.preparing.start()
                self.reader.run()
        except Abandoned:
            pass  # stopped while waiting for a service at the start: nothing was read (Stats.abandoned)
        finally:
            if started:
                # Each stage finishes what it holds, in the order data flows, within one deadline.
                self.preparing.finish()
                self.loading.finish()
                self.acking.finish()
            # The heartbeat goes with the last trim, in one round trip.
            if not self.housekeeper.stop(also=self.liveness.removal):
                self.liveness.remove()
            self.progress.flush(self.stats)
            self.pool.close()
            self.redis.close()
            self.files.close()
            if self._stop_request is not None:
                self._stop_request.unlisten(self._on_signal)
                if self._own_signals:
                    shutdown.uninstall()
        if life.failed is not None:
            raise life.failed
        return self.stats

    def _start(self) -> None:
        """Checks the storage, then both services, before anything is read. A refusal that
        waiting will not fix (a password, a user, a database or role that does not exist,
        TLS, a missing table) is a ConfigError with the server's reason: `consume` exits 2.
        A service that does not answer is waited for, its reason logged, until a stop (or,
        draining, FILEPIPE_DRAIN_TIMEOUT)."""
        s = self.settings
        # The table check's connection opens meanwhile: on a slow network, its round trips
        # (TLS, the login) overlap the storage's and Redis's.
        early = db.EarlyConnection(s, autocommit=True)
        try:
            self.files.storage(s.storage_mode)
            for part in self.parts:
                self._at_start(
                    "Redis",
                    s.redis_url,
                    self.redis_backoff,
                    lambda p=part: stream.ensure_group(self.redis, p.stream, s.group),  # type: ignore[misc]
                    is_transient_redis,
                )
            if not self.life.stopping.is_set():
                # Redis answers: while the table is checked, the first heartbeat is written
                # and the housekeeper looks for departed consumers (each on a connection
                # the reads will find open).
                self.liveness.beat_aside()
                self.housekeeper.start()
            self._at_start(
                "PostgreSQL",
                s.pg_uri,
                self._pg_start_backoff,
                lambda: self._check_table(early),
                is_transient_pg,
            )
        finally:
            early.close()

    def _at_start(
        self,
        service: str,
        url: str,
        backoff: Backoff,
        check: Callable[[], object],
        transient: Callable[[BaseException], bool],
    ) -> None:
        if self.life.stopping.is_set():
            return
        try:
            backoff.call(check, transient)
        except Abandoned:
            self.stats.abandoned = (
                f"stopped while waiting for {service} at the start "
                f"({backoff.last_message or 'no answer yet'}); nothing was read"
            )
            raise
        except (redis.RedisError, RedisClusterException) as e:
            raise redis_refused(self.settings, e) from e
        except psycopg.Error as e:
            if permanent_pg(e):
                raise pg_refused(self.settings, e) from e
            raise DatabaseError(f"PostgreSQL at {mask_url(url)}: {error_line(e)}") from e

    def _check_table(self, early: db.EarlyConnection) -> None:
        """Refuses a table that is missing or that this version cannot load (SchemaError: one
        line naming `filepipe init-db`, exit 2). On `early`'s connection (autocommit: the one
        catalog query is all, no BEGIN and COMMIT round trips)."""
        table = self.settings.table
        with early.take() as conn:
            layout = db.read_layout(conn, table, compression=False)
        if layout is None:
            raise SchemaError(f"table {table} does not exist: run `filepipe init-db` first")
        problem = layout.problem(table)
        if problem:
            raise SchemaError(problem)
        self.load.loader.layout_checked()  # the first load need not check it again

    def _double_loaders(self) -> None:
        """On a slow network (a round trip to PostgreSQL of SLOW_ROUND_TRIP_S or more), twice
        the loaders and pooled connections: a direct COPY waits two round trips for its
        answers, and while one connection waits another sends. (Twice the batches in flight
        between the preparer and the acknowledgement, too.)"""
        with self._grow_lock:
            if self._loaders_doubled:
                return
            self._loaders_doubled = True
        s = self.settings
        self.pool.resize(self.pool.min_size, 2 * s.pool_size)
        self.loading.add_workers(s.pool_size)
        log.info(
            "round trip to PostgreSQL %.1f ms: %d loaders and connections (twice FILEPIPE_POOL_SIZE)",
            self.pace.round_trip("PostgreSQL") * 1000,
            2 * s.pool_size,
        )

    def _busy(self) -> bool:
        """Whether a batch read is still being prepared, loaded or acknowledged (or its dead
        letters are held back)."""
        return self.preparing.busy() or self.loading.busy() or self.acking.busy() or self.acker.holding

    # -- the stages' work ----------------------------------------------------------------

    def _prepare_one(self, raw: RawBatch) -> None:
        part, entries, redelivered = raw
        deliveries = self.reader.deliveries(part, entries) if redelivered and entries else {}
        started = time.perf_counter()
        prepared = prepare(
            self.settings,
            self.name,
            part,
            entries,
            deliveries=deliveries,
            measure=self.files.measure,
            redelivered=redelivered,
            observe=self._read_size.observe,
        )
        self.pace.prepared(len(entries), time.perf_counter() - started)
        if not self.loading.put(prepared, lambda: self.life.giving_up):
            self.in_hand.landed(part.stream, prepared.ids)

    def _load_one(self, p: Prepared) -> None:
        self.pace.probe_pg(self.pool)
        if not self._loaders_doubled and self.pace.slow("PostgreSQL"):
            self._double_loaders()
        inserted, row_dead = self.load.load(p)
        crash_point("after_commit")
        # Committed: only the ids and dead letters are needed from here on.
        p.release()
        self.acking.put((p, inserted, row_dead), lambda: self.life.abandon.is_set())


def redis_refused(settings: Settings, e: BaseException) -> ConfigError:
    """The error of a Redis that refuses this consumer for good (`retry.permanent_redis`)."""
    return ConfigError(f"Redis at {mask_url(settings.redis_url)} refused: {error_line(e)}")
