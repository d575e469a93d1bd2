"""Real nats-server processes for the bridge tests: one server or a 3-node
JetStream cluster, on loopback ports, each node with its own storage directory.

In CI (``CI=true``) a missing ``nats-server`` is a failure (``.ci/run`` installs
the Debian package); on a developer machine the bridge tests are skipped with
the install line.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest


def require_nats() -> str:
    exe = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None
    )
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("nats-server is not installed; .ci/run installs it (apt-get install nats-server)")
        pytest.skip("nats-server not installed (apt-get install nats-server)")
    try:
        import nats  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail('nats-py is not installed; the [test] extra must bring it')
        pytest.skip('nats-py not installed (pip install "queue-engine[nats]")')
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """One nats-server process with JetStream enabled."""

    def __init__(
        self,
        exe: str,
        workdir: Path,
        name: str,
        cluster_port: Optional[int] = None,
        routes: Optional[List[int]] = None,
        cluster_name: str = "qe",
        extra: Optional[List[str]] = None,
    ) -> None:
        self.exe = exe
        self.name = name
        self.port = free_port()
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.cluster_name = cluster_name
        self.extra = list(extra or [])  # more nats-server flags (e.g. --tls ...)
        self.store = workdir / f"{name}-store"
        self.store.mkdir(parents=True, exist_ok=True)
        self.logfile = workdir / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        cmd = [
            self.exe, "-js", "-sd", str(self.store), "-a", "127.0.0.1",
            "-p", str(self.port), "-n", self.name, *self.extra,
        ]
        if self.cluster_port is not None:
            cmd += ["--cluster_name", self.cluster_name,
                    "--cluster", f"nats://127.0.0.1:{self.cluster_port}"]
            if self.routes:
                cmd += ["--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.logfile.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server {self.name} did not listen within 10 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


def start_cluster(exe: str, workdir: Path, nodes: int = 3) -> List[NatsServer]:
    cports = [free_port() for _ in range(nodes)]
    servers = [
        NatsServer(exe, workdir, f"n{i}", cluster_port=cports[i],
                   routes=[p for j, p in enumerate(cports) if j != i])
        for i in range(nodes)
    ]
    for s in servers:
        s.start()
    return servers


async def read_stream_raw(url: str, stream: str, subject: str, expect: int,
                          timeout: float = 30.0) -> List[Tuple[int, Dict[str, str], bytes]]:
    """The first ``expect`` messages of ``stream`` on ``subject``, in stream
    order, as (stream sequence, headers, payload).

    An ephemeral push consumer (deliver all, no acks) delivers to a raw
    socket of our own that parses the frames in bulk: nats-py's per-message
    machinery reads ~5k messages/s on a loaded CI machine, this ~100k/s, and
    the checks of a 100,000-record stream are what the crash tests wait on.
    """
    import secrets

    import nats
    import nats.js.api as api

    host, _, port = url.split("://", 1)[-1].rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    inbox = f"_INBOX.check.{secrets.token_hex(8)}".encode()
    nc = None
    try:
        await asyncio.wait_for(reader.readline(), timeout)  # INFO
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,'
                     b'"protocol":1}\r\nSUB %s 1\r\nPING\r\n' % inbox)
        while (await asyncio.wait_for(reader.readline(), timeout)).strip() != b"PONG":
            pass
        nc = await nats.connect(servers=[url])
        info = await nc.jetstream().add_consumer(stream, api.ConsumerConfig(
            deliver_subject=inbox.decode(), ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.ALL, filter_subject=subject))
        out: List[Tuple[int, Dict[str, str], bytes]] = []
        buf = b""
        while len(out) < expect:
            data = await asyncio.wait_for(reader.read(1 << 20), timeout)
            if not data:
                raise ConnectionError("the server closed the check connection")
            buf += data
            pos = 0
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                parts = buf[pos:eol].split(b" ")
                if parts[0] == b"PING":
                    writer.write(b"PONG\r\n")
                    pos = eol + 2
                    continue
                if parts[0] not in (b"MSG", b"HMSG"):
                    pos = eol + 2  # +OK, PONG, INFO
                    continue
                total = int(parts[-1])
                hsize = int(parts[-2]) if parts[0] == b"HMSG" else 0
                if eol + 2 + total + 2 > len(buf):
                    break
                body = buf[eol + 2:eol + 2 + total]
                pos = eol + 2 + total + 2
                headers: Dict[str, str] = {}
                for hl in body[:hsize].split(b"\r\n")[1:]:
                    k, sep, v = hl.partition(b":")
                    if sep:
                        headers[k.decode()] = v.strip().decode()
                if len(parts) < 4 + (parts[0] == b"HMSG"):
                    continue  # no reply subject: a status/heartbeat, not a message
                tokens = parts[3].split(b".")
                seq = int(tokens[5] if len(tokens) == 9 else tokens[7])
                out.append((seq, headers, body[hsize:]))
            buf = buf[pos:]
        await nc.jetstream().delete_consumer(stream, info.name)
        return out[:expect]
    finally:
        writer.close()
        if nc is not None:
            await nc.close()
