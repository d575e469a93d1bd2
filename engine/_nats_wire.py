"""A lean NATS client connection: the JetStream forwarder's publish path.

nats-py turns every received message into a ``Msg`` object, runs a callback
task for it and (for ``publish_async``) resolves a future and decodes a JSON
document per acknowledgement; at tens of thousands of acks a second that
machinery, not the server, is the limit.  This module speaks the NATS text
protocol itself, just the part a publisher needs:

* ``INFO`` (first one: limits and features; later ones: cluster URLs),
  ``CONNECT`` (credentials from the URL), ``PING``/``PONG`` both ways,
  ``+OK``/``-ERR``;
* ``HPUB`` frames that the caller formats in bulk (one socket write for a whole
  batch of publishes) -- see :func:`format_hpub`;
* one wildcard ``SUB`` on a private inbox that receives every JetStream
  acknowledgement, parsed straight out of the receive buffer: an ack is
  counted against its batch (the reply subject's last token) without a
  message object, a future, a task or a JSON decode; only an ack that is not
  a plain success is looked at closely.

Management calls (stream info, last message) stay on nats-py: they are rare.
TLS: ``tls://`` URLs, a server that requires it, or an explicit
``ssl.SSLContext`` upgrade the connection after the server's INFO (the NATS
way).  Not supported: NKEY/JWT authentication (the server's -ERR says so).
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import ssl
import urllib.parse
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import EngineError

__all__ = ["WireError", "AckTally", "WireConnection", "open_wire", "parse_url"]

_CRLF = b"\r\n"
#: The success form of a JetStream publish acknowledgement starts like this.
_ACK_OK = b'{"stream"'
# ``"duplicate":true`` (newer servers) or ``"duplicate": true`` (2.9).
_DUPLICATE = b'"duplicate"'
# A receive buffer never holds more than this much of an unfinished frame
# unless a frame announced itself bigger (a guard against a broken peer).
_MAX_CONTROL_LINE = 64 * 1024


class WireError(EngineError, ConnectionError):
    """The NATS connection failed, was refused, or was closed by the server."""


class AckTally:
    """The acknowledgements still owed for one batch of publishes (``acks``
    of them: the forwarder asks for one, on the batch's last record)."""

    __slots__ = ("key", "count", "left", "duplicates", "errors", "first_offset",
                 "last_offset", "sent_at")

    def __init__(self, key: bytes, count: int, first_offset: int, last_offset: int,
                 sent_at: float, acks: int = 1) -> None:
        self.key = key  # the reply subject's last token
        self.count = count  # publishes in the batch
        self.left = acks  # acknowledgements not yet received
        self.duplicates = 0  # acks that say the stream already had the message
        self.errors: List[str] = []  # refusals (error documents, 503 no responders)
        self.first_offset = first_offset  # log offset of the batch's first record
        self.last_offset = last_offset  # log offset of the batch's last record
        self.sent_at = sent_at  # loop time the batch was written


def parse_url(url: str) -> Tuple[str, int, Dict[str, str]]:
    """``nats|tls://[user:pass@|token@]host[:port]`` -> (host, port, CONNECT
    credentials); a ``tls://`` URL adds ``{"tls_required": True}``."""
    if "://" not in url:
        url = "nats://" + url
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("nats", "tcp", "tls"):
        raise WireError(f"{url!r}: not a NATS URL (nats://, tls://)")
    host = u.hostname or "127.0.0.1"
    port = u.port or 4222
    creds: Dict[str, str] = {}
    if u.username and u.password is not None:
        creds["user"] = urllib.parse.unquote(u.username)
        creds["pass"] = urllib.parse.unquote(u.password)
    elif u.username:
        creds["auth_token"] = urllib.parse.unquote(u.username)
    if u.scheme == "tls":
        creds["tls_required"] = True  # type: ignore[assignment]
    return host, port, creds


class WireConnection(asyncio.Protocol):
    """One NATS connection that publishes and counts JetStream acknowledgements.

    Use :func:`open_wire`.  ``batches`` maps a reply token to its
    :class:`AckTally`; ``progress`` is set whenever a batch completes, an ack
    is an error, or the connection is lost (``lost`` then holds the reason).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: Optional[asyncio.Transport] = None
        self._buf = b""
        self.info: Dict[str, Any] = {}
        self._first_info: asyncio.Future[Dict[str, Any]] = loop.create_future()
        self._pongs: List[asyncio.Future[None]] = []
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.lost: Optional[BaseException] = None
        self.last_error: Optional[str] = None
        self.server_error: Optional[str] = None  # an -ERR not yet reported to the caller
        self.connect_urls: List[str] = []
        self.inbox = b""
        self._plen = 0
        self.batches: Dict[bytes, AckTally] = {}
        self.progress = asyncio.Event()
        self.max_payload = 1 << 20

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        # Let the kernel hold a whole batch before asyncio starts buffering.
        transport.set_write_buffer_limits(high=4 << 20, low=1 << 20)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.lost is None:
            why = self.last_error or (repr(exc) if exc else "closed by the server")
            self.lost = WireError(f"connection lost: {why}")
        self._transport = None
        if not self._first_info.done():
            self._first_info.set_exception(self.lost)
        for fut in self._pongs:
            if not fut.done():
                fut.set_exception(self.lost)
        self._pongs.clear()
        self._can_write.set()
        self.progress.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        try:
            pos = self._parse(buf)
        except Exception as exc:  # a protocol violation: drop the connection
            self._fail(f"unparseable data from the server: {exc!r}")
            return
        self._buf = buf[pos:]
        if len(self._buf) > _MAX_CONTROL_LINE and self._buf.find(_CRLF) < 0:
            self._fail("control line too long")

    # -- parsing ----------------------------------------------------------
    def _parse(self, buf: bytes) -> int:
        """Consume every complete frame in ``buf``; returns where the rest starts."""
        pos = 0
        end = len(buf)
        batches = self.batches
        plen = self._plen
        completed = False
        while pos < end:
            eol = buf.find(_CRLF, pos)
            if eol < 0:
                break
            op = buf[pos:pos + 4]
            if op == b"MSG ":
                # MSG <subject> <sid> [reply] <size>
                sp = buf.find(b" ", pos + 4, eol)
                size = int(buf[buf.rfind(b" ", pos, eol) + 1:eol])
                stop = eol + 2 + size
                if stop + 2 > end:
                    break  # the payload is not all here yet
                tally = batches.get(buf[pos + 4 + plen:sp])
                if tally is not None:
                    if buf.startswith(_ACK_OK, eol + 2):
                        if buf.find(_DUPLICATE, eol + 2, stop) >= 0:
                            completed |= _duplicate(tally, buf[eol + 2:stop])
                    else:
                        tally.errors.append(
                            buf[eol + 2:stop].decode("utf-8", "replace") or "empty ack")
                        completed = True
                    tally.left -= 1
                    if tally.left == 0:
                        completed = True
                pos = stop + 2
            elif op == b"HMSG":
                # HMSG <subject> <sid> [reply] <hdr size> <total size>: only a
                # status (503 no responders, 408 ...) comes to us this way.
                parts = buf[pos:eol].split(b" ")
                hsize, total = int(parts[-2]), int(parts[-1])
                stop = eol + 2 + total
                if stop + 2 > end:
                    break
                tally = batches.get(parts[1][plen:])
                if tally is not None:
                    head = buf[eol + 2:eol + 2 + hsize].split(_CRLF, 1)[0]
                    body = buf[eol + 2 + hsize:stop]
                    if body.startswith(_ACK_OK) and head.strip() == b"NATS/1.0":
                        if _DUPLICATE in body:
                            completed |= _duplicate(tally, body)
                    else:
                        tally.errors.append(
                            (head + b" " + body).decode("utf-8", "replace").strip())
                        completed = True
                    tally.left -= 1
                    if tally.left == 0:
                        completed = True
                pos = stop + 2
            else:
                line = buf[pos:eol]
                pos = eol + 2
                self._control(line)
        if completed:
            self.progress.set()
        return pos

    def _control(self, line: bytes) -> None:
        word = line.split(b" ", 1)[0].upper()
        if word == b"PING":
            self._write(b"PONG\r\n")
        elif word == b"PONG":
            if self._pongs:
                fut = self._pongs.pop(0)
                if not fut.done():
                    fut.set_result(None)
        elif word == b"+OK" or not word:
            pass
        elif word == b"-ERR":
            msg = line[4:].strip().strip(b"'").decode("utf-8", "replace")
            self.last_error = msg
            self.server_error = msg
            # Most errors close the connection (the server says so by closing);
            # a permissions violation does not, but the publishes it names
            # will never be acknowledged: surface it now.
            if self._pongs:
                fut = self._pongs.pop(0)
                if not fut.done():
                    fut.set_exception(WireError(f"server error: {msg}"))
            self.progress.set()
        elif word == b"INFO":
            info = json.loads(line[5:])
            self.info = info
            self.max_payload = int(info.get("max_payload", self.max_payload))
            urls = info.get("connect_urls") or []
            if urls:
                self.connect_urls = [str(u) for u in urls]
            if not self._first_info.done():
                self._first_info.set_result(info)
        else:
            raise ValueError(f"unknown operation {line[:40]!r}")

    def _fail(self, why: str) -> None:
        self.last_error = why
        if self._transport is not None:
            self._transport.abort()

    # -- writing ----------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self._transport is None or self.lost is not None:
            raise self.lost or WireError("not connected")
        self._transport.write(data)

    async def write(self, data: bytes) -> None:
        """Queue ``data`` (whole frames) on the socket; waits while the
        socket's send buffer is over its high-water mark."""
        if not self._can_write.is_set():
            await self._can_write.wait()
        self._write(data)

    async def ping(self, timeout: float) -> None:
        """Round trip to the server: everything written before is processed."""
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pongs.append(fut)
        self._write(b"PING\r\n")
        await asyncio.wait_for(fut, timeout)

    def close(self) -> None:
        """Close the socket (idempotent); pending acks are abandoned."""
        if self._transport is not None:
            self._transport.close()
        if self.lost is None:
            self.lost = WireError("closed")

    @property
    def alive(self) -> bool:
        return self.lost is None and self._transport is not None


def _duplicate(tally: AckTally, body: bytes) -> bool:
    """Count a duplicate ack; True when it is really an error.

    A clustered stream stages a message id (with sequence 0) when it proposes
    the message, before it knows whether the message will be stored; a
    "duplicate" of a staged id that was then refused names sequence 0 and
    proves nothing was stored, so it must not count as a success."""
    if b'"seq":0,' in body or b'"seq":0}' in body:
        tally.errors.append("duplicate of a message the stream has not stored: "
                            + body.decode("utf-8", "replace"))
        return True
    tally.duplicates += 1
    return False


def format_hpub(subject: bytes, reply: bytes, headers: bytes, payload: bytes) -> bytes:
    """One ``HPUB`` frame; ``headers`` is the whole block, ``NATS/1.0\\r\\n``
    through the blank line.  (The forwarder inlines the same formatting.)"""
    hl = len(headers)
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject, reply, hl, hl + len(payload), headers, payload)


async def _open_one(url: str, name: str, timeout: float,
                    tls: Optional[ssl.SSLContext]) -> WireConnection:
    host, port, creds = parse_url(url)
    want_tls = bool(creds.pop("tls_required", False)) or tls is not None
    loop = asyncio.get_running_loop()
    conn: WireConnection
    try:
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: WireConnection(loop), host, port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise WireError(f"{url}: cannot connect: {exc!r}") from None
    try:
        info = await asyncio.wait_for(asyncio.shield(conn._first_info), timeout)
        if info.get("tls_required") or want_tls:
            if not (info.get("tls_required") or info.get("tls_available")):
                raise WireError(f"{url}: TLS was asked for but the server does not offer it")
            ctx = tls if tls is not None else ssl.create_default_context()
            old = conn._transport
            assert old is not None
            new = await asyncio.wait_for(
                loop.start_tls(old, conn, ctx, server_hostname=host), timeout)
            if new is None:  # pragma: no cover - only for a closed transport
                raise WireError(f"{url}: the connection closed during the TLS handshake")
            conn._transport = new
            new.set_write_buffer_limits(high=4 << 20, low=1 << 20)
        if not info.get("headers", False):
            raise WireError(f"{url}: the server does not support message headers "
                            f"(nats-server >= 2.2 is needed)")
        opts: Dict[str, Any] = {
            "verbose": False, "pedantic": False, "tls_required": False,
            "name": name, "lang": "python-queue-engine", "version": "1",
            "protocol": 1, "headers": True, "no_responders": True, "echo": False,
        }
        opts.update(creds)
        conn._write(b"CONNECT " + json.dumps(opts, separators=(",", ":")).encode() + _CRLF)
        conn.inbox = b"_INBOX.%s." % secrets.token_hex(11).encode()
        conn._plen = len(conn.inbox)
        conn._write(b"SUB %s* 1\r\n" % conn.inbox)
        await conn.ping(timeout)  # CONNECT and SUB accepted (or -ERR)
    except BaseException as exc:
        conn.close()
        if isinstance(exc, asyncio.TimeoutError):
            raise WireError(f"{url}: no answer to CONNECT within {timeout} s") from None
        if isinstance(exc, (ssl.SSLError, OSError)) and not isinstance(exc, WireError):
            raise WireError(f"{url}: {exc!r}") from None
        raise
    return conn


async def open_wire(servers: Sequence[str], *, name: str = "queue-engine forwarder",
                    timeout: float = 2.0, known: Sequence[str] = (),
                    tls: Optional[ssl.SSLContext] = None) -> WireConnection:
    """Connect to the first server that answers, trying ``servers`` and then
    the cluster URLs a previous connection learnt (``known``) in random order.
    ``tls``: the context for TLS connections (default: the system's trust).
    Raises :class:`WireError` naming every failure when none does."""
    order = list(servers)
    random.shuffle(order)  # spread reconnects over the cluster
    order += [u for u in known if u not in order]
    errors = []
    for url in order:
        try:
            return await _open_one(url, name, timeout, tls)
        except WireError as exc:
            errors.append(str(exc))
            # Authentication and feature refusals will not go away on retry
            # against the same kind of server; still try the others.
    raise WireError("no NATS server answered: " + "; ".join(errors))
