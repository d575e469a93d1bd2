"""Beyond one machine: the local log as the outbox of NATS JetStream.

:class:`JetStreamForwarder` reads a :class:`engine.Log` through a consumer group
and publishes every record to a JetStream stream, exactly once and in log
order; :class:`JetStreamIngest` does the other direction, a durable JetStream
consumer appended into a local log, each message once.

Requires the ``nats`` extra (``pip install "queue-engine[nats]"``); nothing in
the core imports this module.

How the forwarder makes "exactly once, in order" hold
------------------------------------------------------
Each record is published with two headers:

* ``Nats-Msg-Id: <log id>:<offset>`` -- JetStream drops a re-sent record that
  it already stored inside its duplicate window;
* ``Nats-Expected-Last-Msg-Id: <id of the previous record>`` -- JetStream
  refuses a record unless the stream's last message is the record before it,
  so a record lost in flight (a leader change, a dropped connection) can never
  be overtaken by the records after it: they are refused too, not stored out
  of order.

Up to ``max_in_flight`` publishes are outstanding at once.  When a batch is
fully acknowledged the group offset is committed.  After any failure -- and on
every start -- the forwarder asks the stream for its last message, reads the
offset out of its ``Nats-Msg-Id`` and resumes right after it (or at the
committed group offset, whichever is later).  So a crash between publish and
commit re-sends nothing the stream already has, and anything re-sent anyway
is dropped by the duplicate window.

The record's key (base64) and timestamp (ns) travel as the headers
``Engine-Key`` and ``Engine-Timestamp``.

How the ingest keeps each message once
--------------------------------------
Every ingested record's *key* is the message id (``Nats-Msg-Id`` when the
publisher set one, else ``<stream>:<stream sequence>``); its value is the
payload.  A batch is appended to the local log (durably, with the log's
durability) *before* it is acknowledged, and the ids of the last ``window``
records of the log are remembered, so a message redelivered after a crash
between append and ack is recognised and acknowledged without a second append.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from .errors import EngineError

__all__ = ["JetStreamForwarder", "JetStreamIngest", "BridgeStatus"]

log = logging.getLogger("engine.bridge")

HDR_MSG_ID = "Nats-Msg-Id"
HDR_EXPECTED_LAST_MSG_ID = "Nats-Expected-Last-Msg-Id"
HDR_KEY = "Engine-Key"
HDR_TIMESTAMP = "Engine-Timestamp"

_PathLike = Union[str, "os.PathLike[str]"]


def _import_nats() -> Any:
    try:
        import nats  # noqa: F401
        import nats.js.api  # noqa: F401
        import nats.js.errors  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            'the JetStream bridge needs nats-py: pip install "queue-engine[nats]"'
        ) from exc
    return nats


@dataclass
class BridgeStatus:
    """What a bridge has done so far (``.status()``; the CLI prints it)."""

    records: int = 0  # records forwarded (acknowledged) or ingested (appended)
    duplicates: int = 0  # re-sent records the far side already had
    in_flight: int = 0  # publishes not yet acknowledged
    lag: int = 0  # records in the log not yet forwarded (forwarder only)
    resyncs: int = 0  # times the forwarder re-read the stream's last message
    started: float = field(default_factory=time.monotonic)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.records / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        return (
            f"records={self.records} rate={self.rate():,.0f}/s lag={self.lag} "
            f"in_flight={self.in_flight} duplicates={self.duplicates} resyncs={self.resyncs}"
        )


def _servers(servers: Union[str, Sequence[str]]) -> List[str]:
    if isinstance(servers, str):
        return [s.strip() for s in servers.split(",") if s.strip()]
    out = list(servers)
    if not out:
        raise ValueError("servers: give at least one NATS URL, e.g. nats://127.0.0.1:4222")
    return out


async def _connect(servers: Sequence[str]) -> Any:
    nats = _import_nats()
    return await nats.connect(
        servers=list(servers),
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        connect_timeout=2,
        allow_reconnect=True,
    )


class JetStreamForwarder:
    """Forward a log to a JetStream stream, exactly once and in log order.

    >>> fwd = JetStreamForwarder("data/orders", group="jetstream",
    ...                          servers="nats://127.0.0.1:4222",
    ...                          stream="ORDERS", subject="orders")   # doctest: +SKIP
    >>> fwd.run(until_caught_up=True)                                   # doctest: +SKIP

    ``create_stream=True`` creates the stream (``replicas`` copies, the given
    ``duplicate_window`` in seconds) when it does not exist.  ``run`` blocks;
    ``arun`` is the coroutine.  See the module docstring for the protocol.
    """

    def __init__(
        self,
        log_path: _PathLike,
        group: str,
        servers: Union[str, Sequence[str]],
        stream: str,
        subject: str,
        *,
        max_in_flight: int = 1024,
        ack_timeout: float = 5.0,
        create_stream: bool = True,
        replicas: int = 1,
        duplicate_window: float = 120.0,
    ) -> None:
        if not isinstance(group, str) or not group:
            raise ValueError("group: a non-empty consumer group name is required")
        if not isinstance(stream, str) or not stream:
            raise ValueError("stream: a non-empty stream name is required")
        if not isinstance(subject, str) or not subject:
            raise ValueError("subject: a non-empty subject is required")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.log_path = os.fspath(log_path)
        self.group = group
        self.servers = _servers(servers)
        self.stream = stream
        self.subject = subject
        self.max_in_flight = int(max_in_flight)
        self.ack_timeout = float(ack_timeout)
        self.create_stream = create_stream
        self.replicas = int(replicas)
        self.duplicate_window = float(duplicate_window)
        self._status = BridgeStatus()
        self._stop: Optional[asyncio.Event] = None

    def status(self) -> BridgeStatus:
        return self._status

    def stop(self) -> None:
        """Ask a running forwarder to finish its batch and return (thread-safe)."""
        if self._stop is not None:
            loop = self._loop
            loop.call_soon_threadsafe(self._stop.set)

    def run(self, **kwargs: Any) -> BridgeStatus:
        """Blocking form of :meth:`arun`."""
        return asyncio.run(self.arun(**kwargs))

    async def arun(
        self,
        *,
        until_caught_up: bool = False,
        max_records: Optional[int] = None,
        on_status: Optional[Callable[[BridgeStatus], None]] = None,
        status_interval: float = 5.0,
    ) -> BridgeStatus:
        """Forward until stopped (``stop()``, cancellation, Ctrl-C).

        ``until_caught_up``: return once every record present in the log is
        acknowledged by the stream.  ``max_records``: return after that many.
        ``on_status`` is called every ``status_interval`` seconds.
        """
        from . import _log

        nats = _import_nats()
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        nc = await _connect(self.servers)
        js = nc.jetstream()
        acks = _AckWindow(nc)
        await acks.start()
        reader = _log.LogReader(self.log_path, group=self.group)
        next_status = time.monotonic() + status_interval
        try:
            await self._ensure_stream(js, nats)
            log_id = reader.log_id
            expected_last = await self._resync(js, reader, log_id)
            while not self._stop.is_set():
                if max_records is not None and self._status.records >= max_records:
                    break
                want = self.max_in_flight
                if max_records is not None:
                    want = min(want, max_records - self._status.records)
                batch = reader.read_many(want)
                self._status.lag = max(0, self._log_end(reader) - reader.position)
                if not batch:
                    if until_caught_up:
                        break
                    # Sleep in the log's own futex wait, off the event loop.
                    rec = await asyncio.get_running_loop().run_in_executor(
                        None, reader.poll, 0.2
                    )
                    if rec is None:
                        continue
                    batch = [rec]
                try:
                    expected_last = await self._publish_batch(acks, batch, log_id, expected_last)
                except _Resync as why:
                    log.warning("jetstream forward: %s; resynchronising with the stream", why)
                    self._status.resyncs += 1
                    await asyncio.sleep(0.1)
                    expected_last = await self._resync(js, reader, log_id)
                    continue
                reader.commit(batch[-1].offset + 1)
                if on_status is not None and time.monotonic() >= next_status:
                    on_status(self._status)
                    next_status = time.monotonic() + status_interval
        finally:
            reader.close()
            try:
                await nc.drain()
            except Exception:  # the connection may already be gone
                pass
        return self._status

    @staticmethod
    def _log_end(reader: Any) -> int:
        end = getattr(reader, "end_offset", None)
        return int(end) if end is not None else reader.position

    async def _ensure_stream(self, js: Any, nats: Any) -> None:
        try:
            await js.stream_info(self.stream)
            return
        except nats.js.errors.NotFoundError:
            if not self.create_stream:
                raise EngineError(
                    f"stream {self.stream!r} does not exist; create it or pass create_stream=True"
                ) from None
        await js.add_stream(
            name=self.stream,
            subjects=[self.subject],
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window,
        )

    async def _resync(self, js: Any, reader: Any, log_id: str) -> Optional[str]:
        """Position the reader right after the last record the stream holds.

        Returns the message id the next publish must name as the stream's last.
        """
        nats = _import_nats()
        last_id: Optional[str] = None
        for attempt in range(200):
            try:
                msg = await js.get_last_msg(self.stream, self.subject)
                last_id = (msg.headers or {}).get(HDR_MSG_ID)
                break
            except nats.js.errors.NotFoundError:
                last_id = None  # empty stream (or nothing on this subject)
                break
            except Exception as exc:  # leader election, reconnect in progress
                if attempt % 25 == 0:
                    log.info("jetstream forward: waiting for the stream: %r", exc)
                await asyncio.sleep(0.1)
        else:
            raise EngineError(f"stream {self.stream!r} did not answer for 20 s")
        committed = reader.committed()
        start = committed if committed is not None else reader.position
        if last_id is not None:
            lid, _, off = last_id.rpartition(":")
            if lid == log_id and off.isdigit():
                start = max(start, int(off) + 1)
            elif lid != log_id:
                # Another log published here last: the chain check cannot name
                # our previous record, so publish the first one unchecked.
                last_id = None
        reader.seek(start)
        if start > 0 and last_id is None:
            # The stream holds none of our records (new stream, or purged):
            # chain from nothing; the duplicate window still guards re-sends.
            return None
        return last_id

    async def _publish_batch(
        self, acks: _AckWindow, batch: List[Any], log_id: str, expected_last: Optional[str]
    ) -> Optional[str]:
        nc = acks.nc
        subject = self.subject
        window = acks.open(len(batch))
        for rec in batch:
            mid = f"{log_id}:{rec.offset}"
            headers: Dict[str, str] = {HDR_MSG_ID: mid, HDR_TIMESTAMP: str(rec.timestamp)}
            if expected_last is not None:
                headers[HDR_EXPECTED_LAST_MSG_ID] = expected_last
            key = rec.key
            if key is not None:
                headers[HDR_KEY] = base64.b64encode(bytes(key)).decode("ascii")
            try:
                await nc.publish(subject, bytes(rec.value), reply=window + str(rec.offset),
                                 headers=headers)
            except Exception as exc:
                await acks.settle()
                raise _Resync(f"publish failed: {exc!r}") from exc
            expected_last = mid
        self._status.in_flight = len(batch)
        try:
            await asyncio.wait_for(acks.all_in.wait(), self.ack_timeout)
        except asyncio.TimeoutError:
            await acks.settle()
            raise _Resync(f"{acks.outstanding} of {len(batch)} acknowledgements missing after "
                          f"{self.ack_timeout} s") from None
        finally:
            self._status.in_flight = 0
        if acks.errors:
            raise _Resync(f"the stream refused a record: {acks.errors[0]!r}")
        self._status.records += len(batch)
        self._status.duplicates += acks.duplicates
        return expected_last


class _AckWindow:
    """The acknowledgements of one batch of publishes, on one wildcard inbox.

    JetStream answers every publish on its reply subject; ours is
    ``<inbox>.<batch>.<offset>``, so an ack is matched to its batch without a
    future, a token or a JSON decode per message (nats-py's ``publish_async``
    does all three; this is what lets one Python process keep tens of
    thousands of records a second in flight).  Only an ack that is not a plain
    success is looked at closely.  Acks of an abandoned batch are ignored.
    """

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.prefix = ""
        self.sub: Any = None
        self.batch = 0
        self.outstanding = 0
        self.duplicates = 0
        self.errors: List[str] = []
        self.all_in = asyncio.Event()

    async def start(self) -> None:
        self.prefix = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(self.prefix + ".*.*", cb=self._on_ack)

    def open(self, n: int) -> str:
        """Start counting a batch of n publishes; returns the reply prefix."""
        self.batch += 1
        self.outstanding = n
        self.duplicates = 0
        self.errors = []
        self.all_in.clear()
        return f"{self.prefix}.{self.batch}."

    async def _on_ack(self, msg: Any) -> None:
        _, batch, _ = msg.subject.rsplit(".", 2)
        if int(batch) != self.batch:
            return  # a late answer to a batch we gave up on
        data = msg.data
        if not data.startswith(b'{"stream"'):
            # an error document, or a status message (503: no responders)
            status = (msg.headers or {}).get("Status") if msg.headers else None
            self.errors.append(data.decode("utf-8", "replace") or f"status {status}")
        elif b'"duplicate":true' in data:
            self.duplicates += 1
        self.outstanding -= 1
        if self.outstanding <= 0:
            self.all_in.set()

    async def settle(self) -> None:
        """Give outstanding acks a moment to land before resyncing, so the
        stream's last message is final when it is read."""
        try:
            await asyncio.wait_for(self.all_in.wait(), 2.0)
        except asyncio.TimeoutError:
            pass
        self.batch += 1  # whatever still comes belongs to no batch


class _Resync(Exception):
    pass


class JetStreamIngest:
    """Append a JetStream stream into a local log, each message once.

    A durable pull consumer named ``durable`` fetches batches; each batch is
    appended to the log at ``log_path`` (the log's ``durability``, ``always``
    by default) *before* it is acknowledged.  See the module docstring.
    """

    def __init__(
        self,
        servers: Union[str, Sequence[str]],
        stream: str,
        durable: str,
        log_path: _PathLike,
        *,
        subject: Optional[str] = None,
        batch: int = 256,
        durability: str = "always",
        window: int = 100_000,
        ack_wait: float = 30.0,
    ) -> None:
        if not durable:
            raise ValueError("durable: a durable consumer name is required")
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.servers = _servers(servers)
        self.stream = stream
        self.durable = durable
        self.log_path = os.fspath(log_path)
        self.subject = subject
        self.batch = int(batch)
        self.durability = durability
        self.window = int(window)
        self.ack_wait = float(ack_wait)
        self._status = BridgeStatus()
        self._stop: Optional[asyncio.Event] = None

    def status(self) -> BridgeStatus:
        return self._status

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def run(self, **kwargs: Any) -> BridgeStatus:
        return asyncio.run(self.arun(**kwargs))

    def _recent_ids(self, log: Any) -> dict[bytes, None]:
        from . import _log

        seen: Dict[bytes, None] = {}
        start = max(log.start_offset, log.next_offset - self.window)
        reader = _log.LogReader(self.log_path, start=start)
        try:
            for rec in reader:
                if rec.key is not None:
                    seen[bytes(rec.key)] = None
        finally:
            reader.close()
        return seen

    async def arun(
        self,
        *,
        until_caught_up: bool = False,
        max_messages: Optional[int] = None,
        on_status: Optional[Callable[[BridgeStatus], None]] = None,
        status_interval: float = 5.0,
    ) -> BridgeStatus:
        """Ingest until stopped (``stop()``, cancellation, Ctrl-C).

        ``until_caught_up``: return once the durable consumer has nothing
        pending and nothing awaiting acknowledgement -- messages a killed
        predecessor fetched but never acknowledged come back after
        ``ack_wait`` seconds and are waited for.  ``max_messages``: return
        after that many appended."""
        from . import _log

        nats = _import_nats()
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        out = _log.Log(self.log_path, durability=self.durability)
        seen = self._recent_ids(out)
        nc = await _connect(self.servers)
        js = nc.jetstream()
        config = nats.js.api.ConsumerConfig(
            durable_name=self.durable,
            ack_policy=nats.js.api.AckPolicy.EXPLICIT,
            max_ack_pending=self.batch * 4,
            ack_wait=self.ack_wait,
        )
        psub = await js.pull_subscribe(
            self.subject or "", durable=self.durable, stream=self.stream, config=config
        )
        next_status = time.monotonic() + status_interval
        try:
            while not self._stop.is_set():
                if max_messages is not None and self._status.records >= max_messages:
                    break
                try:
                    msgs = await psub.fetch(self.batch, timeout=0.25)
                except nats.errors.TimeoutError:
                    msgs = []
                except Exception as exc:  # reconnecting
                    log.info("jetstream ingest: fetch failed: %r", exc)
                    await asyncio.sleep(0.2)
                    continue
                if not msgs:
                    if until_caught_up:
                        info = await psub.consumer_info()
                        if info.num_pending == 0 and info.num_ack_pending == 0:
                            break
                    continue
                values, keys = [], []
                for m in msgs:
                    mid = (m.headers or {}).get(HDR_MSG_ID)
                    if mid is None:
                        mid = f"{self.stream}:{m.metadata.sequence.stream}"
                    bid = mid.encode()
                    if bid in seen:
                        self._status.duplicates += 1
                        continue
                    seen[bid] = None
                    values.append(m.data)
                    keys.append(bid)
                if values:
                    out.append_many(values, keys)  # durable before any ack
                    self._status.records += len(values)
                while len(seen) > self.window:
                    del seen[next(iter(seen))]
                for m in msgs:
                    await m.ack()
                if on_status is not None and time.monotonic() >= next_status:
                    on_status(self._status)
                    next_status = time.monotonic() + status_interval
        finally:
            out.close()
            try:
                await nc.flush()  # the last acks
                await nc.close()
            except Exception:
                pass
        return self._status
