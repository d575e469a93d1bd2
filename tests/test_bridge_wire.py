"""The forwarder's lean NATS connection (engine._nats_wire) and the forwarder
on top of it.

* the receive parser against hand-made server byte streams, cut at every
  possible byte boundary: acks counted per batch, duplicates, error
  documents, 503 status messages, PING answered, INFO's cluster URLs, -ERR;
* against a real nats-server: the premise of "one ack per batch" -- a record
  refused in the middle of a batch by the Expected-Last-Msg-Id chain makes
  every later record of the batch refused, the last one's ack included;
* the forwarder end to end (small): content, headers, order, resume after
  more appends, ``max_records``, a record over the server's max_payload.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import List

import pytest
from nats_servers import NatsServer, require_nats

import engine

nw = pytest.importorskip("engine._nats_wire")

pytestmark = pytest.mark.timeout(120)


class _FakeTransport:
    def __init__(self) -> None:
        self.written: List[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        pass


def _conn(loop: asyncio.AbstractEventLoop) -> nw.WireConnection:
    conn = nw.WireConnection(loop)
    tr = _FakeTransport()
    conn._transport = tr  # type: ignore[assignment]
    conn.inbox = b"_INBOX.abc."
    conn._plen = len(conn.inbox)
    return conn


def _msg(subject: bytes, payload: bytes, reply: bytes = b"") -> bytes:
    mid = b" " + reply if reply else b""
    return b"MSG %s 1%s %d\r\n%s\r\n" % (subject, mid, len(payload), payload)


def _hmsg(subject: bytes, head: bytes, payload: bytes) -> bytes:
    return b"HMSG %s 1 %d %d\r\n%s%s\r\n" % (
        subject, len(head), len(head) + len(payload), head, payload)


STREAM = (
    b'INFO {"server_id":"x","max_payload":4096,"headers":true,'
    b'"connect_urls":["127.0.0.1:1","127.0.0.1:2"]}\r\n'
    + _msg(b"_INBOX.abc.1", b'{"stream":"S","seq":1}')
    + b"PING\r\n"
    + _msg(b"_INBOX.abc.1", b'{"stream":"S","seq":2,"duplicate":true}')
    + b"+OK\r\n"
    + _msg(b"_INBOX.abc.2", b'{"error":{"code":400,"err_code":10071,'
                            b'"description":"wrong last msg ID: x"},"stream":"S"}')
    + _hmsg(b"_INBOX.abc.3", b"NATS/1.0 503\r\n\r\n", b"")
    + _msg(b"_INBOX.abc.99", b'{"stream":"S","seq":3}')  # an abandoned batch
    + _msg(b"_INBOX.abc.4", b"")
    + _msg(b"_INBOX.abc.5", b'{"stream":"S","seq":9}\r\nMSG _INBOX.abc.4 1 2\r\n')
    + _msg(b"_INBOX.abc.6", b'{"stream":"S","seq":7,"duplicate": true}')  # 2.9's spelling
    + _msg(b"_INBOX.abc.7", b'{"stream":"S","seq":0,"duplicate": true}')  # staged, not stored
    + b"PONG\r\n"
)


def _tallies(conn: nw.WireConnection) -> List[nw.AckTally]:
    out = [nw.AckTally(b"%d" % i, 10, 0, 9, 0.0, acks=2 if i == 1 else 1)
           for i in range(1, 8)]
    for t in out:
        conn.batches[t.key] = t
    return out


def _check(conn: nw.WireConnection, tallies: List[nw.AckTally]) -> None:
    one, two, three, four, five, six, seven = tallies
    assert one.left == 0 and one.duplicates == 1 and not one.errors
    assert two.left == 0 and "wrong last msg ID" in two.errors[0]
    assert three.left == 0 and "503" in three.errors[0]
    assert four.left == 0 and four.errors == ["empty ack"]
    assert five.left == 0 and not five.errors and five.duplicates == 0
    assert six.left == 0 and not six.errors and six.duplicates == 1
    assert seven.left == 0 and "has not stored" in seven.errors[0] and not seven.duplicates
    assert conn.max_payload == 4096
    assert conn.connect_urls == ["127.0.0.1:1", "127.0.0.1:2"]
    tr = conn._transport
    assert isinstance(tr, _FakeTransport)
    assert b"".join(tr.written) == b"PONG\r\n"
    assert conn._buf == b""
    assert conn.progress.is_set()


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, len(STREAM)])
def test_parser_counts_acks_in_any_split(piece):
    loop = asyncio.new_event_loop()
    try:
        conn = _conn(loop)
        tallies = _tallies(conn)
        pong = loop.create_future()
        conn._pongs.append(pong)
        for i in range(0, len(STREAM), piece):
            conn.data_received(STREAM[i:i + piece])
        _check(conn, tallies)
        assert pong.done() and pong.result() is None
    finally:
        loop.close()


def test_parser_every_two_way_cut():
    loop = asyncio.new_event_loop()
    try:
        for cut in range(1, len(STREAM)):
            conn = _conn(loop)
            tallies = _tallies(conn)
            conn.data_received(STREAM[:cut])
            conn.data_received(STREAM[cut:])
            _check(conn, tallies)
    finally:
        loop.close()


def test_parser_err_and_garbage_drop_the_connection():
    loop = asyncio.new_event_loop()
    try:
        conn = _conn(loop)
        conn.data_received(b"-ERR 'Authorization Violation'\r\n")
        assert conn.last_error == "Authorization Violation" and conn.progress.is_set()
        conn = _conn(loop)
        conn.data_received(b"BOGUS 1 2\r\n")
        assert conn._transport.aborted  # type: ignore[union-attr]
        conn = _conn(loop)
        conn.data_received(b"MSG _INBOX.abc.1 1 notanumber\r\n")
        assert conn._transport.aborted  # type: ignore[union-attr]
        conn = _conn(loop)
        conn.data_received(b"x" * (70 * 1024))  # a control line that never ends
        assert conn._transport.aborted  # type: ignore[union-attr]
        conn.connection_lost(None)
        assert not conn.alive and "control line too long" in str(conn.lost)
    finally:
        loop.close()


def test_parse_url():
    assert nw.parse_url("nats://127.0.0.1:4333") == ("127.0.0.1", 4333, {})
    assert nw.parse_url("localhost") == ("localhost", 4222, {})
    assert nw.parse_url("nats://u:p%40ss@h:1") == ("h", 1, {"user": "u", "pass": "p@ss"})
    assert nw.parse_url("nats://tok@h:1") == ("h", 1, {"auth_token": "tok"})
    assert nw.parse_url("tls://h") == ("h", 4222, {"tls_required": True})
    with pytest.raises(nw.WireError, match="not a NATS URL"):
        nw.parse_url("http://h:1")


# -- against a real server -------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    exe = require_nats()
    srv = NatsServer(exe, tmp_path_factory.mktemp("nats"), "wire").start()
    yield srv
    srv.stop()


async def _add_stream(url: str, name: str, subject: str) -> None:
    import nats

    nc = await nats.connect(servers=[url])
    await nc.jetstream().add_stream(name=name, subjects=[subject])
    await nc.close()


async def _stream_ids(url: str, name: str) -> List[str]:
    import nats

    nc = await nats.connect(servers=[url])
    js = nc.jetstream()
    info = await js.stream_info(name)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await js.get_msg(name, seq)
        out.append((msg.headers or {}).get("Nats-Msg-Id"))
    await nc.close()
    return out


def _frame(subject: bytes, mid: bytes, expected: bytes, reply: bytes = b"") -> bytes:
    hdr = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n" % mid
    if expected:
        hdr += b"Nats-Expected-Last-Msg-Id: %s\r\n" % expected
    hdr += b"\r\n"
    return nw.format_hpub(subject, reply, hdr, b"payload") if reply else (
        b"HPUB %s %d %d\r\n%spayload\r\n" % (subject, len(hdr), len(hdr) + 7, hdr))


def test_a_refusal_mid_batch_fails_the_batch_tail(server):
    """The premise of one ack per batch, checked on the real server."""

    async def go():
        await _add_stream(server.url, "CHAIN", "chain")
        conn = await nw.open_wire([server.url])
        try:
            frames, prev = [], b""
            for i in range(10):
                mid = b"m%d" % i
                expected = b"bogus" if i == 5 else prev
                reply = conn.inbox + b"1" if i == 9 else b""
                frames.append(_frame(b"chain", mid, expected, reply))
                prev = mid
            tally = nw.AckTally(b"1", 10, 0, 9, 0.0)
            conn.batches[b"1"] = tally
            await conn.write(b"".join(frames))
            await asyncio.wait_for(conn.progress.wait(), 10)
            assert tally.left == 0 and tally.errors, "the tail was acknowledged"
            assert "last msg" in tally.errors[0].lower()
            # A clean batch after it, chained to the stream's real last message.
            frames = [_frame(b"chain", b"m5", b"m4"),
                      _frame(b"chain", b"m6", b"m5", conn.inbox + b"2")]
            ok = nw.AckTally(b"2", 2, 5, 6, 0.0)
            conn.batches[b"2"] = ok
            conn.progress.clear()
            await conn.write(b"".join(frames))
            await asyncio.wait_for(conn.progress.wait(), 10)
            assert ok.left == 0 and not ok.errors
            # A re-send of a stored record: the duplicate check comes first.
            dup = nw.AckTally(b"3", 1, 6, 6, 0.0)
            conn.batches[b"3"] = dup
            conn.progress.clear()
            await conn.write(_frame(b"chain", b"m6", b"m5", conn.inbox + b"3"))
            await asyncio.wait_for(conn.progress.wait(), 10)
            assert dup.left == 0 and not dup.errors and dup.duplicates == 1
        finally:
            conn.close()
        assert await _stream_ids(server.url, "CHAIN") == [f"m{i}" for i in range(7)]

    asyncio.run(go())


def test_open_wire_reports_every_failure():
    async def go():
        with pytest.raises(nw.WireError, match="no NATS server answered"):
            await nw.open_wire(["nats://127.0.0.1:1"], timeout=1.0)

    asyncio.run(go())


def _read_all(url: str, stream: str):
    import nats

    async def go():
        nc = await nats.connect(servers=[url])
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        for seq in range(1, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            out.append((msg.headers or {}, msg.data))
        await nc.close()
        return out

    return asyncio.run(go())


def test_forwarder_end_to_end_and_resume(server, tmp_path):
    from engine.bridge import JetStreamForwarder

    path = tmp_path / "outbox"
    with engine.Log(path, durability="none") as log:
        log.append_many([b"v%d" % i for i in range(1000)],
                        keys=[None if i % 3 == 0 else b"k%d" % i for i in range(1000)])
        log_id = log.log_id

    def fwd(**kw):
        return JetStreamForwarder(path, group="g", servers=server.url, stream="E2E",
                                  subject="e2e", max_in_flight=64).run(**kw)

    st = fwd(max_records=300)
    assert st.records == 300 and st.lag == 700  # records in the log not yet forwarded
    assert engine.LogReader(path, group="g").committed() == 300
    st = fwd(until_caught_up=True)
    assert st.records == 700 and st.resyncs == 0 and st.lag == 0
    with engine.Log(path, durability="none") as log:
        log.append_many([b"v%d" % i for i in range(1000, 1500)])
    assert fwd(until_caught_up=True).records == 500
    assert fwd(until_caught_up=True).records == 0
    got = _read_all(server.url, "E2E")
    assert [h["Nats-Msg-Id"] for h, _ in got] == [f"{log_id}:{i}" for i in range(1500)]
    assert [d for _, d in got] == [b"v%d" % i for i in range(1500)]
    for i, (h, _) in enumerate(got):
        if i % 3 == 0 or i >= 1000:
            assert "Engine-Key" not in h
        else:
            assert base64.b64decode(h["Engine-Key"]) == b"k%d" % i
        assert int(h["Engine-Timestamp"]) > 0
        if i > 0:  # the very first record has no predecessor to name
            assert h["Nats-Expected-Last-Msg-Id"] == f"{log_id}:{i - 1}"


def test_forwarder_refuses_a_record_over_max_payload(server, tmp_path):
    from engine.bridge import JetStreamForwarder

    async def limit():
        import nats

        nc = await nats.connect(servers=[server.url])
        size = nc.max_payload
        await nc.close()
        return size

    path = tmp_path / "outbox"
    with engine.Log(path, durability="none") as log:
        log.append_many([b"small", b"x" * asyncio.run(limit())])
    f = JetStreamForwarder(path, group="g", servers=server.url, stream="BIG", subject="big")
    with pytest.raises(engine.EngineError, match="max_payload"):
        f.run(until_caught_up=True)


def test_info_json_is_what_the_parser_expects(server):
    """The real server's greeting parses, and CONNECT is accepted (PING/PONG)."""

    async def go():
        conn = await nw.open_wire([server.url])
        try:
            assert conn.info.get("headers") is True
            assert conn.max_payload == int(conn.info["max_payload"]) > 0
            await conn.ping(5)
            json.dumps(conn.info)
        finally:
            conn.close()

    asyncio.run(go())


def test_forwarder_resumes_after_a_foreign_message_with_a_lagging_commit(server, tmp_path):
    """A crash leaves the committed offset behind the stream, and someone else
    published on the subject since: the forwarder must find its own last
    record behind the foreign message (re-sending from the committed offset
    would be dropped as duplicates and the next new record, chained to a
    duplicate, refused forever)."""
    import nats

    from engine.bridge import JetStreamForwarder

    path = tmp_path / "outbox"
    with engine.Log(path, durability="none") as log:
        log.append_many([b"v%d" % i for i in range(1000)])
        log_id = log.log_id

    def fwd():
        return JetStreamForwarder(path, group="g", servers=server.url, stream="FOREIGN",
                                  subject="foreign", max_in_flight=64)

    assert fwd().run(max_records=300).records == 300
    reader = engine.LogReader(path, group="g")
    reader.commit(100)  # as if the forwarder crashed before committing 100..299
    reader.close()

    async def foreign():
        nc = await nats.connect(servers=[server.url])
        await nc.jetstream().publish("foreign", b"not ours", headers={"Nats-Msg-Id": "x:1"})
        await nc.close()

    asyncio.run(foreign())

    async def go():
        return await asyncio.wait_for(fwd().arun(until_caught_up=True), 60)

    st = asyncio.run(go())
    assert st.records == 700 and st.resyncs == 0
    got = _read_all(server.url, "FOREIGN")
    ids = [h.get("Nats-Msg-Id") for h, _ in got]
    assert ids == [f"{log_id}:{i}" for i in range(300)] + ["x:1"] + [
        f"{log_id}:{i}" for i in range(300, 1000)]
    assert "Nats-Expected-Last-Msg-Id" not in got[301][0]  # the first after the foreign one
    assert got[302][0]["Nats-Expected-Last-Msg-Id"] == f"{log_id}:300"


def test_forwarder_big_records(server, tmp_path):
    """Records of 300 KB: batches are cut into writes of about a MiB and
    shrink to a few MiB each; every record arrives once, intact, in order."""
    import hashlib

    from engine.bridge import JetStreamForwarder

    path = tmp_path / "outbox"
    values = [hashlib.sha256(b"%d" % i).digest() * (300_000 // 32) for i in range(60)]
    with engine.Log(path, durability="none") as log:
        log.append_many(values)
        log_id = log.log_id
    f = JetStreamForwarder(path, group="g", servers=server.url, stream="BIGREC",
                           subject="bigrec", max_in_flight=256)
    assert f.run(until_caught_up=True).records == 60
    got = _read_all(server.url, "BIGREC")
    assert [h["Nats-Msg-Id"] for h, _ in got] == [f"{log_id}:{i}" for i in range(60)]
    assert [d for _, d in got] == values


def test_forwarder_over_tls(tmp_path):
    """A server that requires TLS: the lean connection upgrades after INFO
    (as nats-py does) and verifies the server against the given context."""
    import shutil
    import ssl
    import subprocess

    import nats

    from engine.bridge import JetStreamForwarder

    exe = require_nats()
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl (to make a test certificate) is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True)
    srv = NatsServer(exe, tmp_path, "tls", extra=["--tlscert", str(cert), "--tlskey", str(key)])
    srv.start()
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        path = tmp_path / "outbox"
        with engine.Log(path, durability="none") as log:
            log.append_many([b"v%d" % i for i in range(500)])
            log_id = log.log_id
        url = f"tls://127.0.0.1:{srv.port}"

        async def untrusted():
            with pytest.raises(nw.WireError, match="CERTIFICATE_VERIFY_FAILED"):
                await nw.open_wire([url], tls=ssl.create_default_context())

        asyncio.run(untrusted())
        st = JetStreamForwarder(path, group="g", servers=url, stream="TLS", subject="tls",
                                tls=ctx, max_in_flight=64).run(until_caught_up=True)
        assert st.records == 500

        async def check():
            nc = await nats.connect(servers=[url], tls=ctx)
            js = nc.jetstream()
            ids = [(await js.get_msg("TLS", q)).headers["Nats-Msg-Id"] for q in range(1, 501)]
            assert (await js.stream_info("TLS")).state.messages == 500
            await nc.close()
            return ids

        assert asyncio.run(check()) == [f"{log_id}:{i}" for i in range(500)]
    finally:
        srv.stop()


def test_idle_forwarder_commits_what_the_interval_held_back(server, tmp_path):
    import threading
    import time

    from engine.bridge import JetStreamForwarder

    path = tmp_path / "outbox"
    with engine.Log(path, durability="none") as log:
        log.append_many([b"v%d" % i for i in range(100)])
    f = JetStreamForwarder(path, group="g", servers=server.url, stream="IDLE", subject="idle",
                           max_in_flight=64, commit_interval=0.5)
    t = threading.Thread(target=f.run, daemon=True)
    t.start()
    try:
        reader = engine.LogReader(path, group="g")
        deadline = time.monotonic() + 10
        while reader.committed() != 100:
            assert time.monotonic() < deadline, f"committed {reader.committed()} of 100"
            time.sleep(0.02)
        assert t.is_alive()  # still running, idle: the commit did not wait for the end
        reader.close()
    finally:
        deadline = time.monotonic() + 5
        while f._stop is None and time.monotonic() < deadline:
            time.sleep(0.01)
        f.stop()
        t.join(10)
    assert not t.is_alive()
    assert f.status().records == 100


def test_wire_error_is_an_engine_error():
    from engine._nats_wire import WireError

    assert issubclass(WireError, engine.EngineError)
    assert issubclass(WireError, ConnectionError)  # callers that catch ConnectionError still do
