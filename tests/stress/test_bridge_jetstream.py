"""The JetStream bridge against real nats-server processes.

* a forwarder SIGKILLed at >= 20 random moments while it forwards 100,000
  records: the stream ends with every record exactly once, in log order;
* a 3-node cluster with a 3-replica stream, one node SIGKILLed mid-stream and
  restarted: nothing lost, nothing duplicated;
* an ingest SIGKILLed mid-stream: the local log ends with every message once.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nats_servers import NatsServer, read_stream_raw, require_nats, start_cluster

import engine

pytestmark = [pytest.mark.crash, pytest.mark.timeout(300)]

N_RECORDS = 100_000
KILLS = 20


def _payload(i: int) -> bytes:
    return i.to_bytes(8, "little") + bytes([i % 251]) * 56  # 64 bytes


def _fill_log(path: Path, n: int) -> str:
    with engine.Log(path, durability="none") as log:
        for start in range(0, n, 10_000):
            log.append_many(
                [_payload(i) for i in range(start, min(n, start + 10_000))],
                keys=[b"k%d" % (i % 97) for i in range(start, min(n, start + 10_000))],
            )
        return log.log_id


# commit_interval=0: the kills are placed by committed progress, so the
# committed offset should trail the stream by one fsync, not by 0.1 s (at
# ~50k records/s that would be 5,000 records of overshoot per kill, and 20
# kills would not fit in 100,000 records).
FORWARD_CHILD = """
import sys
from engine.bridge import JetStreamForwarder
log_path, servers, stream, subject, replicas = sys.argv[1:6]
JetStreamForwarder(log_path, group="js", servers=servers, stream=stream, subject=subject,
                   max_in_flight=512, replicas=int(replicas),
                   commit_interval=0).run(until_caught_up=True)
"""


def _forward_proc(log_path, servers, stream="ORDERS", subject="orders", replicas=1):
    return subprocess.Popen(
        [sys.executable, "-c", FORWARD_CHILD, str(log_path), servers, stream, subject,
         str(replicas)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def _retry(call, seconds=30.0):
    import nats

    deadline = time.monotonic() + seconds
    while True:
        try:
            return await call()
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _read_stream(servers, stream, subject, expect, by_sequence):
    """Every message of the stream, in stream order: (msg id, payload, key,
    timestamp).  ``by_sequence``: one get per sequence number, a consumer-free
    read (after a node restart a push consumer can stall while its replica
    catches up) but ~3k messages/s; otherwise a push consumer on a raw socket
    (``read_stream_raw``), which delivers every stored message once, in
    stream order."""
    import nats

    nc = await nats.connect(servers=servers)
    js = nc.jetstream()
    info = await _retry(lambda: js.stream_info(stream))
    assert info.state.messages == expect, f"stream holds {info.state.messages}, want {expect}"
    assert info.state.first_seq == 1 and info.state.last_seq == expect

    def row(msg):
        h = msg.headers or {}
        return (h.get("Nats-Msg-Id"), msg.data, h.get("Engine-Key"), h.get("Engine-Timestamp"))

    out = []
    if by_sequence:
        async def one(seq):
            return row(await _retry(lambda: js.get_msg(stream, seq)))

        for lo in range(1, expect + 1, 256):
            out += await asyncio.gather(*(one(q) for q in range(lo, min(expect, lo + 255) + 1)))
    else:
        for seq, h, data in await read_stream_raw(servers[0], stream, subject, expect):
            assert seq == len(out) + 1, f"message {seq} delivered at position {len(out) + 1}"
            out.append((h.get("Nats-Msg-Id"), data, h.get("Engine-Key"),
                        h.get("Engine-Timestamp")))
    await nc.close()
    return out


def _check_stream(servers, log_id, n, stream="ORDERS", subject="orders", by_sequence=False):
    got = asyncio.run(_read_stream(servers, stream, subject, n, by_sequence))
    ids = [mid for mid, _, _, _ in got]
    assert ids == [f"{log_id}:{i}" for i in range(n)], "stream is not the log, once, in order"
    bad = [i for i, (_, data, _, _) in enumerate(got) if data != _payload(i)]
    assert not bad, f"{len(bad)} payloads differ, first at {bad[:3]}"
    import base64

    assert all(base64.b64decode(k) == b"k%d" % (i % 97) for i, (_, _, k, _) in enumerate(got))
    assert all(ts is not None and int(ts) > 0 for _, _, _, ts in got)


def _committed(log_path) -> int:
    reader = engine.LogReader(log_path, group="js")
    try:
        return reader.committed() or 0
    finally:
        reader.close()


def test_forwarder_killed_at_random_moments_single_server(tmp_path):
    exe = require_nats()
    server = NatsServer(exe, tmp_path, "solo").start()
    try:
        log_path = tmp_path / "outbox"
        log_id = _fill_log(log_path, N_RECORDS)
        rng = random.Random(1234)
        deadline = time.monotonic() + 200
        for kills in range(KILLS):
            # A random moment, as progress: somewhere in the next share of what
            # is left, so all the kills land mid-stream whatever the speed.
            done = _committed(log_path)
            share = (N_RECORDS - done) // (KILLS - kills + 1)
            target = done + rng.randint(1, max(1, share))
            proc = _forward_proc(log_path, server.url)
            while proc.poll() is None and _committed(log_path) < target:
                assert time.monotonic() < deadline, "the forwarder made no progress"
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.02))  # anywhere inside the next batch
            assert proc.poll() is None, (
                f"the forwarder finished before kill {kills + 1}: "
                + proc.stderr.read().decode()[-3000:]
            )
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert _committed(log_path) < N_RECORDS
        proc = _forward_proc(log_path, server.url)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-3000:]
        _check_stream([server.url], log_id, N_RECORDS)
    finally:
        server.stop()


def test_cluster_node_killed_and_restarted_mid_stream(tmp_path):
    exe = require_nats()
    nodes = start_cluster(exe, tmp_path, 3)
    try:
        urls = ",".join(n.url for n in nodes)
        log_path = tmp_path / "outbox"
        n = 30_000
        log_id = _fill_log(log_path, n)
        _wait_cluster_ready([n.url for n in nodes])
        proc = _forward_proc(log_path, urls, replicas=3)
        deadline = time.monotonic() + 60
        while proc.poll() is None and _committed(log_path) < n // 4:
            assert time.monotonic() < deadline, "the forwarder made no progress"
            time.sleep(0.005)
        victim = nodes[1]
        victim.kill()
        assert proc.poll() is None and _committed(log_path) < n, "node killed too late"
        time.sleep(1.0)
        victim.start()
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err.decode()[-3000:]
        _check_stream([n.url for n in nodes], log_id, n, by_sequence=True)
    finally:
        for node in nodes:
            node.stop()


def _wait_cluster_ready(urls):
    """A JetStream cluster answers API calls only once it elected a meta leader."""
    import nats

    async def probe():
        nc = await nats.connect(servers=urls)
        js = nc.jetstream()
        deadline = time.monotonic() + 30
        while True:
            try:
                await js.account_info()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        await nc.close()

    asyncio.run(probe())


INGEST_CHILD = """
import sys
from engine.bridge import JetStreamIngest
servers, stream, log_path = sys.argv[1:4]
JetStreamIngest(servers, stream, "ingest", log_path, batch=200, ack_wait=1.0).run(
    until_caught_up=True)
"""


def test_ingest_killed_mid_stream_keeps_each_message_once(tmp_path):
    exe = require_nats()
    server = NatsServer(exe, tmp_path, "solo").start()
    n = 20_000
    try:
        async def publish():
            import nats

            nc = await nats.connect(servers=[server.url])
            js = nc.jetstream()
            await js.add_stream(name="IN", subjects=["in.>"])
            for i in range(n):
                await js.publish_async("in.x", _payload(i), headers={"Nats-Msg-Id": f"m{i}"})
            await js.publish_async_completed()
            await nc.close()

        asyncio.run(publish())
        log_path = tmp_path / "inbox"
        rng = random.Random(99)
        for _ in range(8):
            proc = subprocess.Popen(
                [sys.executable, "-c", INGEST_CHILD, server.url, "IN", str(log_path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            time.sleep(rng.uniform(0.4, 1.0))
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        proc = subprocess.Popen(
            [sys.executable, "-c", INGEST_CHILD, server.url, "IN", str(log_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-3000:]
        reader = engine.LogReader(log_path, start=0)
        keys = []
        for rec in reader:
            keys.append(bytes(rec.key))
            i = int(bytes(rec.key)[1:])
            assert bytes(rec.value) == _payload(i)
        reader.close()
        assert len(keys) == n, f"{len(keys)} records for {n} messages"
        assert set(keys) == {b"m%d" % i for i in range(n)}
    finally:
        server.stop()


def test_server_frozen_mid_stream_and_thawed(tmp_path):
    """SIGSTOP the server while the forwarder publishes (the TCP connection
    stays up, nothing answers), SIGCONT it seconds later: the forwarder times
    out its acks, finds the connection dead or alive by a PING, resumes from
    the stream's last record, and the stream ends with every record once."""
    import threading

    from engine.bridge import JetStreamForwarder

    exe = require_nats()
    server = NatsServer(exe, tmp_path, "solo").start()
    try:
        log_path = tmp_path / "outbox"
        n = 30_000
        log_id = _fill_log(log_path, n)
        fwd = JetStreamForwarder(log_path, group="js", servers=server.url, stream="ORDERS",
                                 subject="orders", max_in_flight=256, ack_timeout=1.0,
                                 commit_interval=0)
        result = {}

        def run():
            try:
                result["status"] = fwd.run(until_caught_up=True)
            except BaseException as exc:  # surfaced by the assertion below
                result["error"] = exc

        t = threading.Thread(target=run, daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while _committed(log_path) < n // 5:
            assert time.monotonic() < deadline and t.is_alive(), result
            time.sleep(0.002)
        server.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(3.0)
            assert t.is_alive(), f"the forwarder finished against a frozen server: {result}"
        finally:
            server.proc.send_signal(signal.SIGCONT)
        t.join(120)
        assert not t.is_alive(), "the forwarder did not finish after the thaw"
        assert "error" not in result, result["error"]
        assert result["status"].resyncs >= 1
        _check_stream([server.url], log_id, n)
    finally:
        server.stop()
