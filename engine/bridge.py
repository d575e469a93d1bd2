"""Beyond one machine: the local log as the outbox of NATS JetStream.

:class:`JetStreamForwarder` reads a :class:`engine.Log` through a consumer group
and publishes every record to a JetStream stream, exactly once and in log
order; :class:`JetStreamIngest` does the other direction, a durable JetStream
consumer appended into a local log, each message once.

Requires the ``nats`` extra (``pip install "queue-engine[nats]"``); nothing in
the core imports this module.

Both bridges connect as NATS users do: ``NATS_URL`` when no server is given,
``user:password@``/``token@`` URLs, an NKEY seed or a creds file (JWT and
seed), TLS with a CA and a client certificate -- see :class:`JetStreamForwarder`.

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

Up to ``max_in_flight`` publishes are outstanding at once, in batches of a
quarter of that, each batch one socket write on a lean connection of our own
(:mod:`engine._nats_wire`; nats-py still does the management calls).  Only
the *last* record of a batch asks for an acknowledgement: by the chain above,
JetStream stores that record only if its predecessor is the stream's last
message, which it is only if that one was stored after *its* predecessor, and
so on back to the batch before -- so one successful ack proves the whole
batch is stored, in order, once; a record refused or lost anywhere in it
makes the last one fail (or never be acknowledged) and the forwarder
resynchronises.  (A duplicate ack for the last record says it was stored by
an earlier attempt, under the same chain check.)

The group offset is committed as batches complete, off the event loop and at
most every 0.1 s (a commit is an fsync).  After any failure -- and on every
start -- the forwarder asks the stream for its last message, reads the
offset out of its ``Nats-Msg-Id`` and resumes right after it (or at the
committed group offset, whichever is later).  So a crash between publish and
commit re-sends nothing the stream already has, and anything re-sent anyway
is dropped by the duplicate window.  ``BridgeStatus.duplicates`` counts the
batches whose last record the stream already had.

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
import binascii
import collections
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Union, cast

from . import _nats_wire
from ._fsutil import check_durability
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
    duplicates: int = 0  # re-sent messages the far side already had (forwarder: batches)
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


class _NatsSettings:
    """Where and how a bridge connects -- servers, TLS, credentials -- for
    both its lean publish connection and its nats-py connection."""

    def __init__(self, servers: Union[str, Sequence[str], None], tls: Optional[ssl.SSLContext],
                 tls_ca: Optional[_PathLike], tls_cert: Optional[_PathLike],
                 tls_key: Optional[_PathLike], tls_handshake_first: bool,
                 creds: Optional[_PathLike], nkey_seed: Optional[_PathLike]) -> None:
        self.servers = _nats_wire.resolve_servers(servers)
        if tls is not None and (tls_ca or tls_cert or tls_key):
            raise ValueError("give tls (an ssl.SSLContext) or tls_ca/tls_cert/tls_key, not both")
        if tls is None and (tls_ca or tls_cert or tls_key or tls_handshake_first):
            tls = _nats_wire.tls_context(tls_ca, tls_cert, tls_key)
        self.tls = tls
        self.tls_handshake_first = bool(tls_handshake_first)
        self.credentials = _nats_wire.Credentials(creds=creds, nkey_seed=nkey_seed)

    def open_wire(self, known: Sequence[str]) -> Any:
        """The lean publish connection (a coroutine: see :func:`_nats_wire.open_wire`)."""
        return _nats_wire.open_wire(self.servers, known=known, tls=self.tls,
                                    credentials=self.credentials,
                                    tls_handshake_first=self.tls_handshake_first)

    def nats_py_options(self) -> Dict[str, Any]:
        """nats-py's ``connect`` arguments for the same servers, TLS and identity."""
        opts: Dict[str, Any] = {}
        if self.tls is not None:
            opts["tls"] = self.tls
        if self.tls_handshake_first:
            opts["tls_handshake_first"] = True
        cred = self.credentials
        if cred.creds:
            # The same creds-file parser as the lean connection, read at every connect.
            opts["user_jwt_cb"] = lambda: (cred.jwt() or "").encode()
            opts["signature_cb"] = lambda nonce: base64.b64encode(cred.sign(nonce))
        elif cred:
            opts["nkeys_seed_str"] = cred.seed()
        return opts


def _refusal(exc: BaseException, nats: Any) -> bool:
    """True for a connect failure that retrying with the same settings will not
    cure: the server refused the credentials, or TLS failed (verification, a
    client certificate the server requires)."""
    if isinstance(exc, (nats.errors.AuthorizationError, ssl.SSLError)):
        return True
    return _nats_wire._is_auth_error(str(exc).split("nats: ", 1)[-1].strip("'"))


async def _connect(settings: _NatsSettings) -> Any:
    """nats-py's connection (management calls, the ingest's consumer).

    A server that is down is waited for (nats-py keeps retrying); a refusal
    of the credentials or the TLS handshake raises :class:`_nats_wire.AuthError`
    at once instead of retrying forever."""
    nats = _import_nats()
    loop = asyncio.get_running_loop()
    refused: asyncio.Future[BaseException] = loop.create_future()

    async def on_error(exc: BaseException) -> None:
        if not _refusal(exc, nats):
            log.info("jetstream: %r", exc)  # a server down: nats-py retries
        elif not connecting.done() and not refused.done():
            refused.set_result(exc)  # at start: the settings are wrong
        else:  # on a reconnect: the user may be revoked for now; keep trying
            log.warning("jetstream: the server refused the connection: %s",
                        _nats_wire.explain_refusal(exc))

    nc = nats.NATS()
    connecting = asyncio.ensure_future(nc.connect(
        servers=list(settings.servers),
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        connect_timeout=2,
        allow_reconnect=True,
        error_cb=on_error,
        **settings.nats_py_options(),
    ))
    try:
        await asyncio.wait({connecting, refused}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        connecting.cancel()
        raise
    if connecting.done():
        connecting.result()
        return nc
    connecting.cancel()
    try:
        await asyncio.wait_for(nc.close(), 2)
    except BaseException:  # half-open: nothing to drain
        pass
    exc = refused.result()
    raise _nats_wire.AuthError(
        f"{', '.join(map(_nats_wire.redact, settings.servers))}: the connection was refused: "
        f"{_nats_wire.explain_refusal(exc)}"
        + (f" ({settings.credentials!r})" if settings.credentials else ""))


class JetStreamForwarder:
    """Forward a log to a JetStream stream, exactly once and in log order.

    >>> fwd = JetStreamForwarder("data/orders", group="jetstream",
    ...                          servers="nats://127.0.0.1:4222",
    ...                          stream="ORDERS", subject="orders")   # doctest: +SKIP
    >>> fwd.run(until_caught_up=True)                                   # doctest: +SKIP

    ``create_stream=True`` creates the stream (``replicas`` copies, the given
    ``duplicate_window`` in seconds) when it does not exist.  ``run`` blocks;
    ``arun`` is the coroutine.  See the module docstring for the protocol.

    The group offset is committed (durably: an fsync) at most every
    ``commit_interval`` seconds, 0 meaning as often as the disk allows; it is
    where a restart starts looking, the stream decides where it resumes.

    Connecting (as the ``nats`` tool and the NATS client libraries do):

    * ``servers``: a URL, a comma-separated list or a sequence of URLs
      (``nats://``, ``tls://``; ``user:password@`` or ``token@`` in the URL);
      None: the ``NATS_URL`` environment variable, else ``nats://127.0.0.1:4222``;
    * ``creds``: a creds file (user JWT and NKEY seed, from ``nsc``), or
      ``nkey_seed``: an NKEY user seed, as a file or the seed itself
      (``SU...``); either needs the ``nkeys`` package (the ``nats`` extra);
    * ``tls_ca``: the CA file that verifies the server (default: the system's
      trust store); ``tls_cert``/``tls_key``: the client certificate a server
      with ``verify: true`` asks for; or ``tls``: an ``ssl.SSLContext`` of your
      own instead of these.  TLS starts after the server's INFO when the URL is
      ``tls://``, the server requires it or a TLS setting is given;
      ``tls_handshake_first`` starts it before INFO (servers configured with
      ``handshake_first``).

    A refused identity (wrong seed, revoked user, a certificate either side
    cannot verify) raises :class:`engine._nats_wire.AuthError` at start; a
    server that is down is waited for.

    >>> JetStreamForwarder("data/orders", "jetstream", None, "ORDERS", "orders",
    ...                    creds="/etc/orders/orders.creds",
    ...                    tls_ca="/etc/orders/ca.pem")                # doctest: +SKIP

    The subject should be the forwarder's alone: a message someone else
    publishes on it breaks the chain, costs a resynchronisation, and makes the
    forwarder look back up to ``resync_scan`` messages for its own last record.
    """

    def __init__(
        self,
        log_path: _PathLike,
        group: str,
        servers: Union[str, Sequence[str], None],
        stream: str,
        subject: str,
        *,
        max_in_flight: int = 1024,
        ack_timeout: float = 5.0,
        create_stream: bool = True,
        replicas: int = 1,
        duplicate_window: float = 120.0,
        resync_scan: int = 10_000,
        commit_interval: float = 0.1,
        tls: Optional[ssl.SSLContext] = None,
        tls_ca: Optional[_PathLike] = None,
        tls_cert: Optional[_PathLike] = None,
        tls_key: Optional[_PathLike] = None,
        tls_handshake_first: bool = False,
        creds: Optional[_PathLike] = None,
        nkey_seed: Optional[_PathLike] = None,
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
        self._nats = _NatsSettings(servers, tls, tls_ca, tls_cert, tls_key,
                                   tls_handshake_first, creds, nkey_seed)
        self.servers = self._nats.servers
        self.stream = stream
        self.subject = subject
        self.max_in_flight = int(max_in_flight)
        self.ack_timeout = float(ack_timeout)
        self.create_stream = create_stream
        self.replicas = int(replicas)
        self.duplicate_window = float(duplicate_window)
        self.resync_scan = int(resync_scan)
        if commit_interval < 0:
            raise ValueError("commit_interval must be >= 0")
        self.commit_interval = float(commit_interval)
        self.tls = self._nats.tls
        self._status = BridgeStatus()
        self._stop: Optional[asyncio.Event] = None

    def status(self) -> BridgeStatus:
        return self._status

    def stop(self) -> None:
        """Ask a running forwarder to finish the batches in flight and return (thread-safe)."""
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
        nc = await _connect(self._nats)
        js = nc.jetstream()
        reader = _log.LogReader(self.log_path, group=self.group)
        self._wire: Optional[_nats_wire.WireConnection] = None
        pipe: Optional[_Pipeline] = None
        try:
            await self._ensure_stream(js, nats)
            log_id = reader.log_id
            if log_id is None:  # pragma: no cover - a log always has an id once opened
                raise EngineError(f"{self.log_path}: the log has no id; is it a log directory?")
            self._wire = await self._reconnect(first=True)
            expected_last = await self._resync(js, reader, log_id)
            pipe = _Pipeline(self, reader, log_id, expected_last)
            # the stream holds everything below where the resync put the
            # reader: the group offset goes there too, even with nothing left
            # to send (a restart after the last acks, before their commit)
            pipe.committer.offer(reader.position)
            next_status = time.monotonic() + status_interval
            while True:
                try:
                    done = await pipe.step(until_caught_up, max_records)
                except _Resync as why:
                    log.warning("jetstream forward: %s; resynchronising with the stream", why)
                    self._status.resyncs += 1
                    await pipe.abandon()
                    if self._wire is not None and self._wire.alive:
                        # Overdue acks on a connection that looks up: make sure
                        # the server is still there, or re-sends go nowhere.
                        try:
                            await self._wire.ping(2.0)
                        except Exception:
                            self._wire.close()
                    if self._wire is None or not self._wire.alive:
                        self._wire = await self._reconnect()
                    await asyncio.sleep(0.1)
                    pipe.expected_last = await self._resync(js, reader, log_id)
                    pipe.committer.offer(reader.position)
                    continue
                if done:
                    await pipe.committer.flush()
                    break
                if on_status is not None and time.monotonic() >= next_status:
                    on_status(self._status)
                    next_status = time.monotonic() + status_interval
        finally:
            if self._wire is not None:
                self._wire.close()
            if pipe is not None and pipe.committer.task is not None:
                # The reader must outlive a commit running in the executor.
                try:
                    await asyncio.wait_for(asyncio.shield(pipe.committer.task), 10)
                except BaseException:
                    pass
            reader.close()
            try:
                await nc.drain()
            except Exception:  # the connection may already be gone
                pass
        return self._status

    async def _reconnect(self, first: bool = False) -> _nats_wire.WireConnection:
        """Open the publish connection, retrying (any server, any cluster URL
        learnt so far) until one answers or the forwarder is stopped.  At
        start (``first``) a refused identity raises instead: nats-py just
        connected with it, so the settings are wrong, not the moment."""
        known: List[str] = []
        if self._wire is not None:
            known = self._wire.connect_urls
            self._wire.close()
        next_log = 0.0
        while True:
            try:
                return await self._nats.open_wire(known)
            except _nats_wire.WireError as exc:
                if first and isinstance(exc, _nats_wire.AuthError):
                    raise
                if self._stop is not None and self._stop.is_set():
                    raise EngineError(f"stopped while reconnecting: {exc}") from None
                if time.monotonic() >= next_log:
                    log.warning("jetstream forward: %s (retrying)", exc)
                    next_log = time.monotonic() + 5.0
                await asyncio.sleep(0.2)

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

        Returns the message id the next publish must name as the stream's last
        (None: publish the next record unchecked).
        """
        nats = _import_nats()
        last_id: Optional[str] = None
        last_seq = 0
        for attempt in range(200):
            try:
                msg = await js.get_last_msg(self.stream, self.subject)
                last_id = (msg.headers or {}).get(HDR_MSG_ID)
                last_seq = int(msg.seq or 0)
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
        ours = _our_offset(last_id, log_id)
        if last_seq and ours is None:
            # Someone else published on our subject last.  The chain check
            # cannot name a foreign message, so the next record goes unchecked;
            # but it must be the one after *our* last record in the stream, not
            # the committed offset (which may lag: re-sent records would be
            # dropped as duplicates and the next new one, chained to a
            # duplicate, refused forever).
            last_id = None
            ours = await self._scan_back(js, nats, log_id, last_seq)
        if ours is not None:
            start = max(start, ours + 1)
        reader.seek(start)
        return last_id

    async def _scan_back(self, js: Any, nats: Any, log_id: str, last_seq: int) -> Optional[int]:
        """Our newest record among the ``resync_scan`` stream messages before
        ``last_seq`` (its log offset), or None."""

        async def get(seq: int) -> Any:
            for attempt in range(50):
                try:
                    return await js.get_msg(self.stream, seq)
                except nats.js.errors.NotFoundError:
                    return None  # deleted, or never there
                except Exception:  # leader election in progress
                    if attempt == 49:
                        raise
                    await asyncio.sleep(0.1)
            return None  # pragma: no cover

        lo = max(1, last_seq - self.resync_scan)
        seq = last_seq - 1
        while seq >= lo:
            seqs = range(seq, max(lo, seq - 63) - 1, -1)
            for msg in await asyncio.gather(*(get(q) for q in seqs)):
                if msg is None or msg.subject != self.subject:
                    continue
                off = _our_offset((msg.headers or {}).get(HDR_MSG_ID), log_id)
                if off is not None:
                    return off
            seq -= 64
        log.warning("jetstream forward: none of this log's records among the last %d messages "
                    "of stream %r; resuming at the committed offset (the duplicate window "
                    "drops what was sent already)", self.resync_scan, self.stream)
        return None


def _our_offset(msg_id: Optional[str], log_id: str) -> Optional[int]:
    """The log offset in a ``<log id>:<offset>`` message id of this log, else None."""
    if msg_id is None:
        return None
    lid, _, off = msg_id.rpartition(":")
    return int(off) if lid == log_id and off.isdigit() else None


_WRITE_BYTES = 1 << 20  # one socket write of a batch holds about this much


class _Pipeline:
    """The forwarder's publish window: batches of HPUB frames on the lean
    connection (:mod:`engine._nats_wire`), acknowledgements counted per batch.

    A batch's reply subject is ``<inbox><batch number>``, so an ack is matched
    to its batch by one dictionary lookup in the receive parser -- no future,
    no task, no JSON decode per message.  Up to ``max_in_flight`` records are
    unacknowledged at once, in several batches, so the next batch is on the
    wire while the stream still acknowledges the previous one.  The group
    offset is committed as the oldest batches complete, in order.  Any
    refusal, a lost connection or an ack overdue by ``ack_timeout`` raises
    :class:`_Resync`.
    """

    def __init__(self, fwd: JetStreamForwarder, reader: Any, log_id: str,
                 expected_last: Optional[str]) -> None:
        self.fwd = fwd
        self.reader = reader
        self.status = fwd._status
        self.lid = log_id.encode()
        self.subject = fwd.subject.encode()
        self.expected_last = expected_last
        self.window: Deque[_nats_wire.AckTally] = collections.deque()
        self.in_flight = 0
        self.batch_no = 0
        # Several batches in flight: the next one is formatted and written
        # while the server stores the previous ones.
        self.max_chunk = max(1, fwd.max_in_flight // 4)
        self.chunk = self.max_chunk
        self.committer = _Committer(reader, fwd.commit_interval)

    async def step(self, until_caught_up: bool, max_records: Optional[int]) -> bool:
        """Retire finished batches, send more, or wait for acks; True when done."""
        wire = self.fwd._wire
        assert wire is not None
        window = self.window
        commit_to = -1
        while window and window[0].left <= 0:
            tally = window[0]
            if tally.errors:
                raise _Resync(f"the stream refused a record: {tally.errors[0]!r}")
            window.popleft()
            wire.batches.pop(tally.key, None)
            self.in_flight -= tally.count
            self.status.records += tally.count
            self.status.duplicates += tally.duplicates
            commit_to = tally.last_offset + 1
        # Also with nothing new: an offset held back by the interval is
        # committed on a later step (an idle forwarder polls every 0.2 s).
        self.committer.offer(commit_to)
        self.status.in_flight = self.in_flight
        for tally in window:
            if tally.errors:
                raise _Resync(f"the stream refused a record: {tally.errors[0]!r}")
        if not wire.alive:
            raise _Resync(str(wire.lost))
        if wire.server_error is not None:
            # e.g. a permissions violation: the connection stays up but the
            # publishes it names are dropped; say so now, not at the ack timeout.
            err, wire.server_error = wire.server_error, None
            raise _Resync(f"the server said: {err}")
        stop = self.fwd._stop
        stopping = stop is not None and stop.is_set()
        room = self.fwd.max_in_flight - self.in_flight
        if max_records is not None:
            left = max_records - self.status.records - self.in_flight
            stopping = stopping or left <= 0
            room = min(room, left)
        if not stopping and (room >= self.chunk or (room > 0 and not window)):
            batch = self.reader.read_many(min(room, self.chunk))
            self.status.lag = max(0, JetStreamForwarder._log_end(self.reader)
                                  - self.reader.position)
            if batch:
                await self.send(batch)
                return False
            if not window:
                if until_caught_up:
                    return True
                # Sleep in the log's own futex wait, off the event loop.
                rec = await asyncio.get_running_loop().run_in_executor(
                    None, self.reader.poll, 0.2)
                if rec is not None:
                    await self.send([rec])
                return False
        if not window:
            return stopping
        timeout = window[0].sent_at + self.fwd.ack_timeout - time.monotonic()
        if timeout <= 0:
            raise _Resync(f"no acknowledgement for a batch of {window[0].count} records "
                          f"after {self.fwd.ack_timeout} s")
        wire.progress.clear()
        try:
            await asyncio.wait_for(wire.progress.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return False

    async def send(self, batch: List[Any]) -> None:
        """Format a batch as one buffer of HPUB frames and write it.

        Only the batch's last record asks for an acknowledgement (it alone has
        a reply subject): every record names its predecessor in
        ``Nats-Expected-Last-Msg-Id``, so the stream stores the last record
        only if the one before it is the stream's last message, and that one
        only if *its* predecessor was -- a success for the last record proves
        the whole batch is stored, in order, once.  A record refused or lost
        anywhere in the batch makes every later one, the last included, fail
        the check (or never be acknowledged): the batch is not committed and
        the forwarder resynchronises.  One ack per batch instead of one per
        record takes a third of the server's work per message away.
        """
        wire = self.fwd._wire
        assert wire is not None
        self.batch_no += 1
        token = b"%d" % self.batch_no
        subject = self.subject
        lid = self.lid
        exp = self.expected_last
        expected = exp.encode() if exp is not None else None
        max_payload = wire.max_payload
        frames: List[bytes] = []
        add = frames.append
        b64 = binascii.b2a_base64
        size = sent = 0
        for rec in batch:
            mid = b"%s:%d" % (lid, rec.offset)
            key = rec.key
            value = rec.value
            if expected is not None and key is not None:
                hdr = (b"NATS/1.0\r\nNats-Msg-Id: %s\r\nNats-Expected-Last-Msg-Id: %s\r\n"
                       b"Engine-Timestamp: %d\r\nEngine-Key: %s\r\n\r\n"
                       % (mid, expected, rec.timestamp, b64(key, newline=False)))
            else:
                hdr = _headers(mid, expected, rec.timestamp, key)
            hl = len(hdr)
            total = hl + len(value)
            if total > max_payload:
                raise EngineError(
                    f"record {rec.offset} is {total} bytes with its headers; the server "
                    f"accepts at most {max_payload} (max_payload)")
            add(b"HPUB %s %d %d\r\n%s%s\r\n" % (subject, hl, total, hdr, value))
            expected = mid
            size += total
            if size - sent > _WRITE_BYTES and rec is not batch[-1]:
                # Big records: hand the socket a few MiB at a time, not one
                # copy of the whole batch.
                sent = size
                await self._write(wire, frames)
                frames.clear()
        # The last frame again, now with the reply subject that asks for the ack.
        last = batch[-1]
        frames[-1] = b"HPUB %s %s%s %s" % (subject, wire.inbox, token,
                                          frames[-1][len(subject) + 6:])
        tally = _nats_wire.AckTally(token, len(batch), batch[0].offset, last.offset,
                                    time.monotonic())
        wire.batches[token] = tally
        self.window.append(tally)
        self.in_flight += len(batch)
        self.status.in_flight = self.in_flight
        self.expected_last = expected.decode() if expected is not None else None
        await self._write(wire, frames)
        # Big records: fewer per batch, so a batch stays a few MiB.
        self.chunk = max(1, min(self.max_chunk, _WRITE_BYTES * 4 * len(batch) // max(1, size)))

    @staticmethod
    async def _write(wire: _nats_wire.WireConnection, frames: List[bytes]) -> None:
        try:
            await wire.write(b"".join(frames))
        except Exception as exc:
            raise _Resync(f"publish failed: {exc!r}") from exc

    async def abandon(self) -> None:
        """Before a resync: give outstanding acks a moment to land, so the
        stream's last message is final when it is read; then forget them
        (a late ack names a batch that no longer exists and is ignored)."""
        wire = self.fwd._wire
        if wire is not None and wire.alive and self.window:
            deadline = time.monotonic() + 2.0
            while wire.alive and any(t.left > 0 for t in self.window):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wire.progress.clear()
                try:
                    await asyncio.wait_for(wire.progress.wait(), left)
                except asyncio.TimeoutError:
                    break
        if wire is not None:
            wire.batches.clear()
        self.window.clear()
        self.in_flight = 0
        self.status.in_flight = 0


class _Committer:
    """Commits the group offset off the event loop, at most every ``interval`` s.

    A commit is durable (temp file, fsync, rename, fsync of the directory:
    ~10 ms on a disk), so committing every batch would cost more than
    publishing it.  The committed offset is only where a restart *starts
    looking*: the stream's last message decides where it resumes (see
    ``_resync``), so a commit that lags by a fraction of a second re-sends
    nothing.  One commit runs at a time, in the default executor (the file
    calls release the GIL); ``offer`` records the newest offset and
    ``flush`` waits until it is on disk.
    """

    def __init__(self, reader: Any, interval: float = 0.1) -> None:
        self.reader = reader
        self.interval = interval
        self.wanted = -1  # newest offset offered
        committed = reader.committed()
        self.done = -1 if committed is None else committed  # newest offset on disk (or being written)
        self.task: Optional[asyncio.Future[None]] = None
        self.next_at = 0.0

    def offer(self, offset: int) -> None:
        if offset > self.wanted:
            self.wanted = offset
        if self.task is None and self.wanted > self.done and time.monotonic() >= self.next_at:
            self._start()

    def _start(self) -> None:
        offset = self.wanted
        self.done = offset
        self.next_at = time.monotonic() + self.interval
        loop = asyncio.get_running_loop()
        self.task = loop.run_in_executor(None, self.reader.commit, offset)
        self.task.add_done_callback(self._finished)

    def _finished(self, fut: asyncio.Future[None]) -> None:
        self.task = None
        if fut.cancelled() or fut.exception() is not None:
            self.done = -1  # retried on the next offer / flush
            if not fut.cancelled():
                log.warning("jetstream forward: committing the group offset failed: %r",
                            fut.exception())

    async def flush(self) -> None:
        """Wait for the running commit, then commit the newest offset."""
        if self.task is not None:
            try:
                await asyncio.shield(self.task)
            except Exception:
                pass
        if self.wanted > self.done:
            self.done = self.wanted
            await asyncio.get_running_loop().run_in_executor(
                None, self.reader.commit, self.wanted)


def _headers(mid: bytes, expected: Optional[bytes], timestamp: int,
             key: Optional[Any]) -> bytes:
    """The header block when the chain check or the key is absent."""
    parts = [b"NATS/1.0\r\nNats-Msg-Id: ", mid, b"\r\n"]
    if expected is not None:
        parts += [b"Nats-Expected-Last-Msg-Id: ", expected, b"\r\n"]
    parts.append(b"Engine-Timestamp: %d\r\n" % timestamp)
    if key is not None:
        parts += [b"Engine-Key: ", binascii.b2a_base64(key, newline=False), b"\r\n"]
    parts.append(b"\r\n")
    return b"".join(parts)


class _Resync(Exception):
    pass


class JetStreamIngest:
    """Append a JetStream stream into a local log, each message once.

    A durable pull consumer named ``durable`` fetches batches; each batch is
    appended to the log at ``log_path`` (the log's ``durability``, ``always``
    by default) *before* it is acknowledged.  See the module docstring.

    ``servers``, ``creds``/``nkey_seed`` and the TLS settings: as for
    :class:`JetStreamForwarder` (None: ``NATS_URL``, else the local server).
    """

    def __init__(
        self,
        servers: Union[str, Sequence[str], None],
        stream: str,
        durable: str,
        log_path: _PathLike,
        *,
        subject: Optional[str] = None,
        batch: int = 256,
        durability: str = "always",
        window: int = 100_000,
        ack_wait: float = 30.0,
        tls: Optional[ssl.SSLContext] = None,
        tls_ca: Optional[_PathLike] = None,
        tls_cert: Optional[_PathLike] = None,
        tls_key: Optional[_PathLike] = None,
        tls_handshake_first: bool = False,
        creds: Optional[_PathLike] = None,
        nkey_seed: Optional[_PathLike] = None,
    ) -> None:
        if not durable:
            raise ValueError("durable: a durable consumer name is required")
        if batch < 1:
            raise ValueError("batch must be >= 1")
        check_durability(durability)
        self._nats = _NatsSettings(servers, tls, tls_ca, tls_cert, tls_key,
                                   tls_handshake_first, creds, nkey_seed)
        self.servers = self._nats.servers
        self.stream = stream
        self.durable = durable
        self.log_path = os.fspath(log_path)
        self.subject = subject
        self.batch = int(batch)
        self.durability = durability
        self.window = int(window)
        self.ack_wait = float(ack_wait)
        self.tls = self._nats.tls
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
        out = _log.Log(self.log_path, durability=cast(Any, self.durability))
        try:
            seen = self._recent_ids(out)
            nc = await _connect(self._nats)
        except BaseException:
            out.close()
            raise
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
