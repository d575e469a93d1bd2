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

Connecting as NATS users do:

* servers: the URLs given, else the ``NATS_URL`` environment variable (one URL
  or a comma-separated list), else ``nats://127.0.0.1:4222``
  (:func:`resolve_servers`);
* ``user:password@`` or ``token@`` in a URL;
* an NKEY seed or a creds file (the user's JWT and NKEY seed, as ``nsc``
  writes it): :class:`Credentials` signs the server's INFO ``nonce`` with the
  user's Ed25519 key (through the ``nkeys`` package, as nats-py does);
* TLS: ``tls://`` URLs, a server that requires it, or an explicit
  ``ssl.SSLContext`` upgrade the connection after the server's INFO (the NATS
  way); ``tls_handshake_first`` starts TLS before INFO instead, for servers
  configured with ``handshake_first``.  :func:`tls_context` builds the context
  from a CA file and a client certificate and key.

A refusal that retrying will not cure -- the server rejects the credentials,
or TLS cannot verify the server or the server our certificate -- raises
:class:`AuthError`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import secrets
import ssl
import urllib.parse
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .errors import EngineError

__all__ = ["WireError", "AuthError", "AckTally", "WireConnection", "Credentials",
           "open_wire", "parse_url", "redact", "resolve_servers", "tls_context", "DEFAULT_URL"]

#: The server tried when neither the caller nor ``NATS_URL`` names one.
DEFAULT_URL = "nats://127.0.0.1:4222"

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


class AuthError(WireError):
    """The server refused our credentials, or TLS could not verify the server
    or the server our certificate: retrying with the same settings will not
    help -- check the creds file / NKEY seed / certificates named in the message."""


_PathLike = Union[str, "os.PathLike[str]"]

# -ERR texts (lower case) with which a server refuses a connection's identity.
_AUTH_ERRORS = ("authorization violation", "authentication timeout",
                "user authentication expired", "user authentication revoked",
                "account authentication expired")


def resolve_servers(servers: Union[str, Sequence[str], None] = None) -> List[str]:
    """The server URLs to try.

    ``servers``: one URL, a comma-separated list, or a sequence of URLs; None
    means the ``NATS_URL`` environment variable (same forms), and without it
    :data:`DEFAULT_URL` -- as the ``nats`` command-line tool does.

    >>> resolve_servers("nats://a:4222, nats://b:4222")
    ['nats://a:4222', 'nats://b:4222']
    """
    if servers is None:
        servers = os.environ.get("NATS_URL") or DEFAULT_URL
    if isinstance(servers, str):
        out = [s.strip() for s in servers.split(",") if s.strip()]
    else:
        out = [str(s).strip() for s in servers if str(s).strip()]
    if not out:
        raise ValueError("servers: give at least one NATS URL, e.g. " + DEFAULT_URL)
    for url in out:
        parse_url(url)  # a malformed URL fails here, not at the first reconnect
    return out


def redact(url: str) -> str:
    """``url`` fit for a message: a password or token in it becomes ``***``."""
    scheme, sep, rest = url.rpartition("://")
    userinfo, at, hostport = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    hidden = f"{user}:***" if colon else "***"
    return f"{scheme}{sep}{hidden}@{hostport}"


def tls_context(ca: Optional[_PathLike] = None, cert: Optional[_PathLike] = None,
                key: Optional[_PathLike] = None) -> ssl.SSLContext:
    """An SSL context for NATS connections: the server verified against
    ``ca`` (a PEM file; default: the system's trust store), and ``cert`` /
    ``key`` (PEM files; ``key`` may be inside ``cert``) presented as this
    client's certificate when the server asks for one (``verify: true``)."""
    if key is not None and cert is None:
        raise ValueError("tls_key needs tls_cert (the client certificate it belongs to)")
    try:
        ctx = ssl.create_default_context(
            cafile=os.fspath(ca) if ca is not None else None)
        if cert is not None:
            ctx.load_cert_chain(os.fspath(cert), os.fspath(key) if key is not None else None)
    except ssl.SSLError as exc:
        what = f"tls_cert={cert!s} tls_key={key!s}" if cert is not None else f"tls_ca={ca!s}"
        raise ValueError(f"{what}: not a usable PEM certificate/key: {exc}") from None
    return ctx


# -- NKEY seeds and creds files --------------------------------------------

# An encoded seed: 'S', the key type (Operator, Account, User), 56 more base32
# characters -- 36 bytes: 2 prefix, 32 Ed25519 seed, 2 CRC16.
_SEED = re.compile(r"S[OAU][A-Z2-7]{56}")
# What is meant as a seed, not a path, even with a character missing or wrong.
_SEEDISH = re.compile(r"S[A-Za-z0-9]{40,80}")
# A decorated block of a creds file: a -----BEGIN ...----- line, one line of
# content, an ------END ...------ line (nats.go's parser, same shape).
_BLOCK = re.compile(r"^\s*-{3,}[^\n]*-{3,}\s*\r?\n\s*([\w\-.=]+)\s*\r?\n\s*-{3,}[^\n]*-{3,}\s*$",
                    re.MULTILINE)
_PREFIX_SEED = 18 << 3
_PREFIX_USER = 20 << 3


def _crc16(data: bytes) -> int:
    """CRC-16/XMODEM, the NKEY checksum."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def _check_user_seed(seed: str, where: str) -> None:
    """Raise ValueError unless ``seed`` is a well-formed user seed (``SU...``
    with a matching checksum).  The message never contains the seed."""
    if not _SEED.fullmatch(seed):
        raise ValueError(f"{where}: no NKEY seed found (a seed is 58 characters, 'SU...')")
    raw = base64.b32decode(seed + "=" * (-len(seed) % 8))
    if len(raw) != 36 or int.from_bytes(raw[-2:], "little") != _crc16(raw[:-2]):
        raise ValueError(f"{where}: the NKEY seed is damaged (its checksum does not match)")
    prefix = ((raw[0] & 7) << 5) | ((raw[1] & 0xF8) >> 3)
    if raw[0] & 0xF8 != _PREFIX_SEED or prefix != _PREFIX_USER:
        kind = {14 << 3: "an operator", 0: "an account"}.get(prefix, "not a user")
        raise ValueError(f"{where}: the NKEY seed is {kind} seed; a client signs with a "
                         f"user seed ('SU...')")


def _read_text(path: _PathLike, what: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(1 << 20)
    except OSError as exc:
        raise ValueError(f"{what}={os.fspath(path)!s}: cannot read: "
                         f"{exc.strerror or exc}") from None


def _seed_in(text: str) -> Optional[str]:
    """The seed of a seed file: its decorated seed block, else the first line
    that is a seed (nsc and ``nk`` write either form)."""
    for block in _BLOCK.finditer(text):
        if _SEED.fullmatch(block.group(1)):
            return block.group(1)
    for line in text.splitlines():
        if _SEED.fullmatch(line.strip()):
            return line.strip()
    return None


def _read_creds(path: _PathLike) -> Tuple[str, str]:
    """(user JWT, user seed) of a creds file: its first decorated block is the
    JWT, its second the seed -- the layout ``nsc generate creds`` writes."""
    where = f"creds={os.fspath(path)!s}"
    blocks = [m.group(1) for m in _BLOCK.finditer(_read_text(path, "creds"))]
    if len(blocks) < 2:
        raise ValueError(f"{where}: not a NATS creds file (it needs a '-----BEGIN NATS USER "
                         f"JWT-----' block and a '-----BEGIN USER NKEY SEED-----' block)")
    jwt, seed = blocks[0], blocks[1]
    if jwt.count(".") != 2:
        raise ValueError(f"{where}: its first block is not a JWT")
    _check_user_seed(seed, where)
    return jwt, seed


def _keypair(seed: str) -> Any:
    try:
        import nkeys
    except ImportError:
        raise ImportError('NKEY and creds authentication need the nkeys package: '
                          'pip install "queue-engine[nats]"') from None
    return nkeys.from_seed(bytearray(seed.encode()))


class Credentials:
    """How a client proves who it is beyond the URL: a NATS creds file (the
    user's JWT and NKEY seed) or an NKEY seed (a file, or the seed itself).

    The server's INFO carries a ``nonce``; the client signs it with the user's
    Ed25519 key and sends ``nkey`` (the public key) or ``jwt``, and ``sig``
    (the signature, base64url without padding) in CONNECT.  Files are read
    again at every connect, so a rotated creds file is picked up by the next
    reconnect; the constructor reads them once so that a missing file or a
    damaged seed fails at once.  Needs the ``nkeys`` package.

    >>> Credentials(creds="~/.nkeys/creds/O/A/orders.creds")   # doctest: +SKIP
    >>> Credentials(nkey_seed="/etc/orders/user.nk")            # doctest: +SKIP
    """

    __slots__ = ("creds", "nkey_seed", "_seed_text")

    def __init__(self, creds: Optional[_PathLike] = None,
                 nkey_seed: Optional[_PathLike] = None) -> None:
        if creds is not None and nkey_seed is not None:
            raise ValueError("give creds (a creds file) or nkey_seed, not both")
        self.creds = os.path.expanduser(os.fspath(creds)) if creds is not None else None
        self.nkey_seed: Optional[str] = None  # the seed file's path
        self._seed_text: Optional[str] = None  # the seed, when given as such
        if nkey_seed is not None:
            text = os.fspath(nkey_seed).strip()
            if _SEED.fullmatch(text) or (_SEEDISH.fullmatch(text) and not os.path.exists(text)):
                # The seed itself (a mistyped one fails here without being
                # repeated in the message, as a path would be).
                _check_user_seed(text, "nkey_seed")
                self._seed_text = text
            else:
                self.nkey_seed = os.path.expanduser(text)
        if self:
            self.connect_fields("")  # fail now, not at the first connect

    def __bool__(self) -> bool:
        return bool(self.creds or self.nkey_seed or self._seed_text)

    def __repr__(self) -> str:
        if self.creds:
            return f"Credentials(creds={self.creds!r})"
        if self.nkey_seed:
            return f"Credentials(nkey_seed={self.nkey_seed!r})"
        return "Credentials(nkey_seed=<seed>)" if self._seed_text else "Credentials()"

    def seed(self) -> str:
        """The user's NKEY seed (read now from its file, if it has one)."""
        if self.creds:
            return _read_creds(self.creds)[1]
        if self._seed_text:
            return self._seed_text
        if self.nkey_seed:
            where = f"nkey_seed={self.nkey_seed}"
            found = _seed_in(_read_text(self.nkey_seed, "nkey_seed"))
            if found is None:
                raise ValueError(f"{where}: no NKEY seed in the file (a seed is 58 "
                                 f"characters, 'SU...')")
            _check_user_seed(found, where)
            return found
        raise ValueError("no credentials configured")

    def jwt(self) -> Optional[str]:
        """The user's JWT from the creds file (read now), None for an NKEY seed."""
        return _read_creds(self.creds)[0] if self.creds else None

    def sign(self, nonce: str) -> bytes:
        """The raw Ed25519 signature of the server's nonce by the user's key."""
        kp = _keypair(self.seed())
        try:
            return bytes(kp.sign(nonce.encode()))
        finally:
            kp.wipe()

    def connect_fields(self, nonce: str) -> Dict[str, str]:
        """The CONNECT fields that answer ``nonce``: ``jwt`` or ``nkey``, and ``sig``."""
        if not self:
            return {}
        if self.creds:
            jwt, seed = _read_creds(self.creds)
            out = {"jwt": jwt}
        else:
            seed = self.seed()
            out = {}
        kp = _keypair(seed)
        try:
            if not self.creds:
                out["nkey"] = bytes(kp.public_key).decode()
            sig = bytes(kp.sign(nonce.encode()))
        finally:
            kp.wipe()
        out["sig"] = base64.urlsafe_b64encode(sig).rstrip(b"=").decode()
        return out


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
        raise WireError(f"{redact(url)!r}: not a NATS URL (nats://, tls://)")
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
            if isinstance(exc, ssl.SSLError):
                self.lost = AuthError(f"connection lost: {explain_refusal(exc)}")
            elif _is_auth_error(self.last_error):
                self.lost = AuthError(f"connection lost: {why}")
            else:
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
                    if _is_auth_error(msg):
                        fut.set_exception(AuthError(f"server error: {msg}{_CHECK_CREDENTIALS}"))
                    else:
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

    async def ping(self, timeout: float, before: bytes = b"") -> None:
        """Round trip to the server: everything written before is processed.
        ``before``: frames to send in the same write, ahead of the PING."""
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pongs.append(fut)
        self._write(before + b"PING\r\n")
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


_CHECK_CREDENTIALS = " -- check the credentials (user/password or token in the URL, creds, nkey_seed)"


def _is_auth_error(msg: Optional[str]) -> bool:
    return msg is not None and msg.strip().lower().startswith(_AUTH_ERRORS)


def explain_refusal(exc: BaseException) -> str:
    """``exc`` (a refused connection) and what to check for it."""
    text = repr(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return text + " -- the server's certificate is not trusted: give its CA (tls_ca)"
    if "ALERT" in text.upper() and "CERTIFICATE" in text.upper():
        return text + (" -- the server did not accept our client certificate: give one "
                       "its CA trusts (tls_cert, tls_key)")
    if _is_auth_error(str(exc).split("nats: ", 1)[-1].strip("'")) or "Authorization" in text:
        return text + _CHECK_CREDENTIALS
    return text


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


async def _open_one(url: str, name: str, timeout: float, tls: Optional[ssl.SSLContext],
                    credentials: Optional[Credentials],
                    tls_handshake_first: bool) -> WireConnection:
    host, port, creds = parse_url(url)
    shown = redact(url)  # for messages: no password or token
    want_tls = (bool(creds.pop("tls_required", False)) or tls is not None
                or tls_handshake_first)
    ctx = tls if tls is not None else ssl.create_default_context()
    loop = asyncio.get_running_loop()
    conn: WireConnection
    try:
        if tls_handshake_first:
            # The server speaks TLS from the first byte (``handshake_first``).
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: WireConnection(loop), host, port, ssl=ctx, server_hostname=host,
                ssl_handshake_timeout=timeout), timeout)
        else:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: WireConnection(loop), host, port), timeout)
    except ssl.SSLError as exc:
        raise AuthError(f"{shown}: TLS handshake failed: {explain_refusal(exc)}") from None
    except (OSError, asyncio.TimeoutError) as exc:
        raise WireError(f"{shown}: cannot connect: {exc!r}") from None
    try:
        info = await asyncio.wait_for(asyncio.shield(conn._first_info), timeout)
        if not tls_handshake_first and (info.get("tls_required") or want_tls):
            if not (info.get("tls_required") or info.get("tls_available")):
                raise WireError(f"{shown}: TLS was asked for but the server does not offer it")
            old = conn._transport
            assert old is not None
            new = await asyncio.wait_for(
                loop.start_tls(old, conn, ctx, server_hostname=host), timeout)
            if new is None:  # pragma: no cover - only for a closed transport
                raise WireError(f"{shown}: the connection closed during the TLS handshake")
            conn._transport = new
            new.set_write_buffer_limits(high=4 << 20, low=1 << 20)
        if not info.get("headers", False):
            raise WireError(f"{shown}: the server does not support message headers "
                            f"(nats-server >= 2.2 is needed)")
        opts: Dict[str, Any] = {
            "verbose": False, "pedantic": False, "tls_required": False,
            "name": name, "lang": "python-queue-engine", "version": "1",
            "protocol": 1, "headers": True, "no_responders": True, "echo": False,
        }
        opts.update(creds)
        if credentials:
            try:
                opts.update(credentials.connect_fields(str(info.get("nonce") or "")))
            except ValueError as exc:  # e.g. a creds file replaced by a broken one
                raise AuthError(f"{shown}: {exc}") from None
        conn.inbox = b"_INBOX.%s." % secrets.token_hex(11).encode()
        conn._plen = len(conn.inbox)
        # CONNECT, SUB and PING in one write: a server that refuses CONNECT
        # answers -ERR and closes, and a second write racing that close would
        # fail (EPIPE) before the -ERR that says why is read.
        await conn.ping(timeout, b"CONNECT " + json.dumps(opts, separators=(",", ":")).encode()
                        + b"\r\nSUB %s* 1\r\n" % conn.inbox)  # accepted, or -ERR
    except BaseException as exc:
        conn.close()
        if isinstance(exc, asyncio.TimeoutError):
            raise WireError(f"{shown}: no answer to CONNECT within {timeout} s") from None
        if isinstance(exc, ssl.SSLError):
            raise AuthError(f"{shown}: TLS handshake failed: {explain_refusal(exc)}") from None
        if isinstance(exc, OSError) and not isinstance(exc, WireError):
            raise WireError(f"{shown}: {exc!r}") from None
        if isinstance(exc, WireError) and not str(exc).startswith(shown):
            raise type(exc)(f"{shown}: {exc}") from None
        raise
    return conn


async def open_wire(servers: Sequence[str], *, name: str = "queue-engine forwarder",
                    timeout: float = 2.0, known: Sequence[str] = (),
                    tls: Optional[ssl.SSLContext] = None,
                    credentials: Optional[Credentials] = None,
                    tls_handshake_first: bool = False) -> WireConnection:
    """Connect to the first server that answers, trying ``servers`` and then
    the cluster URLs a previous connection learnt (``known``) in random order.

    ``tls``: the context for TLS connections (default: the system's trust;
    see :func:`tls_context`).  ``credentials``: an NKEY seed or creds file to
    answer the server's nonce with.  ``tls_handshake_first``: start TLS before
    the server's INFO (servers configured with ``handshake_first``).

    Raises :class:`WireError` naming every failure when none answers -- an
    :class:`AuthError` when every one refused our identity or TLS failed."""
    order = list(servers)
    random.shuffle(order)  # spread reconnects over the cluster
    order += [u for u in known if u not in order]
    errors: List[WireError] = []
    for url in order:
        try:
            return await _open_one(url, name, timeout, tls, credentials, tls_handshake_first)
        except WireError as exc:
            errors.append(exc)
            # Authentication and feature refusals will not go away on retry
            # against the same kind of server; still try the others.
    err = AuthError if errors and all(isinstance(e, AuthError) for e in errors) else WireError
    raise err("no NATS server answered: " + "; ".join(str(e) for e in errors))
