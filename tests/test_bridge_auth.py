"""The JetStream bridge connects as NATS users do, against a real nats-server:

* an NKEY user (``authorization { users = [{nkey: U...}] }``): the seed as a
  file or a string, on the lean publish connection and on nats-py;
* operator mode (operator, account and user JWTs made here, signed as ``nsc``
  signs them): a creds file;
* TLS with ``verify: true``: a CA, a server and a client certificate made here;
* ``NATS_URL`` when no server is given; the CLI's ``--creds``/``--nkey``/``--tls-*``.

Each setup moves real records through the forwarder and back through the
ingest, and each refuses the wrong identity (another user's seed, no client
certificate) with an :class:`AuthError` that says so, at once.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from nats_servers import NatsServer, require_nats

import engine

nw = pytest.importorskip("engine._nats_wire")
nkeys = pytest.importorskip("nkeys")
nacl_signing = pytest.importorskip("nacl.signing")

pytestmark = pytest.mark.timeout(120)


# -- keys and JWTs, made as nsc makes them ------------------------------------

def new_seed(prefix: int) -> str:
    """A fresh NKEY seed of the given kind (nkeys.PREFIX_BYTE_USER ...)."""
    raw = bytes(nacl_signing.SigningKey.generate())
    return nkeys.encode_seed(raw, prefix).decode()


def public_key(seed: str) -> str:
    return nkeys.from_seed(bytearray(seed.encode())).public_key.decode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(issuer_seed: str, subject: str, name: str, nats: Dict[str, Any]) -> str:
    """A NATS JWT (v2): ``header.claims.signature``, base64url without padding,
    the signature Ed25519 by the issuer over ``header.claims``."""
    claims: Dict[str, Any] = {"jti": "", "iat": int(time.time()), "iss": public_key(issuer_seed),
                              "name": name, "sub": subject, "nats": nats}
    digest = hashlib.new("sha512_256", json.dumps(claims).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    head = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64url(json.dumps(claims).encode())
    kp = nkeys.from_seed(bytearray(issuer_seed.encode()))
    return f"{head}.{body}." + _b64url(kp.sign(f"{head}.{body}".encode()))


def creds_text(jwt: str, seed: str) -> str:
    """A creds file as ``nsc generate creds`` writes it."""
    return (f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n"
            "*************************************************************\n")


_UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
              "wildcards": True, "conn": -1, "leaf": -1}


def operator_setup(tmp: Path) -> Tuple[str, str, str]:
    """(server config text, user JWT, user seed) of an operator with a system
    account and an account ``ORDERS`` (JetStream enabled), resolved from memory."""
    op, sys_acc, acc, user = (new_seed(nkeys.PREFIX_BYTE_OPERATOR),
                              new_seed(nkeys.PREFIX_BYTE_ACCOUNT),
                              new_seed(nkeys.PREFIX_BYTE_ACCOUNT),
                              new_seed(nkeys.PREFIX_BYTE_USER))
    op_jwt = make_jwt(op, public_key(op), "OP", {
        "type": "operator", "version": 2, "system_account": public_key(sys_acc)})
    sys_jwt = make_jwt(op, public_key(sys_acc), "SYS", {
        "limits": _UNLIMITED, "type": "account", "version": 2})
    acc_jwt = make_jwt(op, public_key(acc), "ORDERS", {
        "limits": {**_UNLIMITED, "mem_storage": -1, "disk_storage": -1, "streams": -1,
                   "consumer": -1},
        "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2})
    user_jwt = make_jwt(acc, public_key(user), "orders", {
        "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
        "type": "user", "version": 2})
    (tmp / "op.jwt").write_text(op_jwt)
    conf = (f"operator: {tmp / 'op.jwt'}\nsystem_account: {public_key(sys_acc)}\n"
            f"resolver: MEMORY\nresolver_preload: {{\n  {public_key(sys_acc)}: {sys_jwt}\n"
            f"  {public_key(acc)}: {acc_jwt}\n}}\n")
    return conf, user_jwt, user


# -- TLS certificates ----------------------------------------------------------

def _openssl() -> str:
    exe = shutil.which("openssl")
    if exe is None:
        pytest.fail("the openssl command (Debian package openssl) makes the test certificates")
    return exe


def make_certs(d: Path) -> Dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, EC P-256."""
    openssl = _openssl()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    run("req", "-x509", *ec, "-days", "1", "-keyout", str(d / "ca.key"), "-out",
        str(d / "ca.pem"), "-subj", "/CN=queue-engine test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, usage, san in (("server", "serverAuth", "IP:127.0.0.1,DNS:localhost"),
                             ("client", "clientAuth", "DNS:orders-client")):
        ext = d / f"{name}.ext"
        ext.write_text(f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                       f"extendedKeyUsage={usage}\nsubjectAltName={san}\n"
                       f"authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
        run("req", *ec, "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"),
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
            "-out", str(d / f"{name}.pem"), "-extfile", str(ext))
    return {"ca": d / "ca.pem", "server": d / "server.pem", "server_key": d / "server.key",
            "client": d / "client.pem", "client_key": d / "client.key"}


# -- the round trip ------------------------------------------------------------

def round_trip(tmp: Path, stream: str, n: int = 300, **conn: Any) -> None:
    """Forward ``n`` records to ``stream`` and ingest them back into another
    log, both bridges connected with ``conn``; every record arrives once, in order."""
    from engine.bridge import JetStreamForwarder, JetStreamIngest

    src, dst = tmp / f"{stream}-out", tmp / f"{stream}-in"
    values = [b"%s-%d" % (stream.encode(), i) for i in range(n)]
    with engine.Log(src, durability="none") as log:
        log.append_many(values)
        log_id = log.log_id
    subject = stream.lower()
    fwd = JetStreamForwarder(src, "g", conn.pop("servers", None), stream, subject,
                             max_in_flight=64, **conn)
    st = fwd.run(until_caught_up=True)
    assert st.records == n and st.resyncs == 0
    ing = JetStreamIngest(fwd.servers, stream, "back", dst, durability="none", **conn)
    assert ing.run(until_caught_up=True).records == n
    reader = engine.LogReader(dst, start=0)
    got = [(bytes(r.key), bytes(r.value)) for r in reader]
    reader.close()
    assert got == [(f"{log_id}:{i}".encode(), v) for i, v in enumerate(values)]


def refused(match: str, stream: str, tmp: Path, **conn: Any) -> List[str]:
    """Both bridges refuse to start with ``conn``, at once, saying why (the
    messages are returned)."""
    from engine.bridge import JetStreamForwarder, JetStreamIngest

    src = tmp / f"{stream}-refused"
    with engine.Log(src, durability="none") as log:
        log.append(b"never sent")
    servers = conn.pop("servers", None)
    messages = []
    for make in (lambda: JetStreamForwarder(src, "g", servers, stream, stream.lower(), **conn),
                 lambda: JetStreamIngest(servers, stream, "d", tmp / "unused", **conn)):
        t0 = time.monotonic()
        with pytest.raises(nw.AuthError, match=match) as err:
            make().run(until_caught_up=True)
        assert time.monotonic() - t0 < 10  # refused, not retried until a timeout
        messages.append(str(err.value))
    return messages


# -- NKEY users ----------------------------------------------------------------

@pytest.fixture(scope="module")
def nkey_server(tmp_path_factory):
    exe = require_nats()
    d = tmp_path_factory.mktemp("nkey")
    seed = new_seed(nkeys.PREFIX_BYTE_USER)
    (d / "nkey.conf").write_text(
        f"authorization {{ users = [ {{ nkey: {public_key(seed)} }} ] }}\n")
    srv = NatsServer(exe, d, "nkey", extra=["-c", str(d / "nkey.conf")]).start()
    yield srv, seed
    srv.stop()


def test_nkey_seed_file_and_string(nkey_server, tmp_path):
    srv, seed = nkey_server
    seed_file = tmp_path / "user.nk"
    seed_file.write_text(seed + "\n")
    round_trip(tmp_path, "NKFILE", servers=srv.url, nkey_seed=seed_file)
    round_trip(tmp_path, "NKSTR", servers=srv.url, nkey_seed=seed)
    # A decorated seed file (as nsc writes one) works too.
    deco = tmp_path / "deco.nk"
    deco.write_text(f"# orders\n-----BEGIN USER NKEY SEED-----\n{seed}\n"
                    "------END USER NKEY SEED------\n")
    round_trip(tmp_path, "NKDECO", servers=srv.url, nkey_seed=deco)


def test_nkey_wrong_or_missing_seed_is_refused(nkey_server, tmp_path):
    srv, _ = nkey_server
    other = new_seed(nkeys.PREFIX_BYTE_USER)
    refused("Authorization Violation", "NKBAD", tmp_path, servers=srv.url, nkey_seed=other)
    refused("Authorization Violation", "NKNONE", tmp_path, servers=srv.url)


def test_lean_connection_signs_the_nonce(nkey_server):
    """The lean connection alone: a right seed is accepted (PING/PONG after
    CONNECT), a wrong one is an AuthError naming the server's refusal."""
    srv, seed = nkey_server

    async def go():
        conn = await nw.open_wire([srv.url], credentials=nw.Credentials(nkey_seed=seed))
        assert conn.info.get("nonce")  # the server did ask for a signature
        await conn.ping(5)
        conn.close()
        wrong = nw.Credentials(nkey_seed=new_seed(nkeys.PREFIX_BYTE_USER))
        with pytest.raises(nw.AuthError, match="Authorization Violation"):
            await nw.open_wire([srv.url], credentials=wrong)

    asyncio.run(go())


# -- operator mode: creds files ------------------------------------------------

@pytest.fixture(scope="module")
def operator_server(tmp_path_factory):
    exe = require_nats()
    d = tmp_path_factory.mktemp("operator")
    conf, user_jwt, user_seed = operator_setup(d)
    (d / "op.conf").write_text(conf)
    srv = NatsServer(exe, d, "op", extra=["-c", str(d / "op.conf")]).start()
    yield srv, user_jwt, user_seed
    srv.stop()


def test_creds_file(operator_server, tmp_path):
    srv, user_jwt, user_seed = operator_server
    creds = tmp_path / "orders.creds"
    creds.write_text(creds_text(user_jwt, user_seed))
    round_trip(tmp_path, "CREDS", servers=srv.url, creds=creds)


def test_creds_with_the_wrong_seed_is_refused(operator_server, tmp_path):
    srv, user_jwt, _ = operator_server
    creds = tmp_path / "stolen.creds"  # the right JWT, someone else's key
    creds.write_text(creds_text(user_jwt, new_seed(nkeys.PREFIX_BYTE_USER)))
    refused("Authorization Violation", "CREDBAD", tmp_path, servers=srv.url, creds=creds)

    async def lean():  # the publish connection on its own says the same
        with pytest.raises(nw.AuthError, match="Authorization Violation"):
            await nw.open_wire([srv.url], credentials=nw.Credentials(creds=creds))

    asyncio.run(lean())


# -- TLS with client certificates ----------------------------------------------

@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    exe = require_nats()
    d = tmp_path_factory.mktemp("mtls")
    certs = make_certs(d)
    (d / "tls.conf").write_text(
        f"tls {{\n  cert_file: {certs['server']}\n  key_file: {certs['server_key']}\n"
        f"  ca_file: {certs['ca']}\n  verify: true\n  timeout: 2\n}}\n")
    srv = NatsServer(exe, d, "mtls", extra=["-c", str(d / "tls.conf")]).start()
    yield srv, certs
    srv.stop()


def test_tls_client_certificate(tls_server, tmp_path):
    srv, certs = tls_server
    # nats:// URL: the server's INFO says TLS is required, both clients upgrade.
    round_trip(tmp_path, "MTLS", servers=srv.url, tls_ca=certs["ca"],
               tls_cert=certs["client"], tls_key=certs["client_key"])


def test_tls_without_a_client_certificate_is_refused(tls_server, tmp_path):
    srv, certs = tls_server
    why = "did not accept our client certificate"
    refused(why, "MTLSNONE", tmp_path, servers=srv.url, tls_ca=certs["ca"])

    async def lean():
        with pytest.raises(nw.AuthError, match=why):
            await nw.open_wire([srv.url], tls=nw.tls_context(certs["ca"]))

    asyncio.run(lean())


def test_tls_untrusted_server_is_refused(tls_server, tmp_path):
    srv, certs = tls_server
    why = "CERTIFICATE_VERIFY_FAILED.*give its CA"
    refused(why, "MTLSCA", tmp_path, servers=srv.url,
            tls_cert=certs["client"], tls_key=certs["client_key"])  # the system's CAs

    async def lean():
        with pytest.raises(nw.AuthError, match=why):
            await nw.open_wire([srv.url], tls=nw.tls_context(
                None, certs["client"], certs["client_key"]))

    asyncio.run(lean())


# -- NATS_URL and the CLI ------------------------------------------------------

def test_nats_url_and_cli_options(nkey_server, tmp_path, monkeypatch):
    from engine.cli import main

    srv, seed = nkey_server
    monkeypatch.setenv("NATS_URL", f"nats://127.0.0.1:1, {srv.url}")  # a list; one is down
    assert nw.resolve_servers(None) == ["nats://127.0.0.1:1", srv.url]
    round_trip(tmp_path, "ENVURL", nkey_seed=seed)  # servers=None: $NATS_URL

    seed_file = tmp_path / "user.nk"
    seed_file.write_text(seed)
    path = tmp_path / "cli-out"
    with engine.Log(path, durability="none") as log:
        log.append_many([b"c%d" % i for i in range(50)])
    argv = ["bridge", "jetstream", "forward", str(path), "--stream", "CLI", "--subject", "cli",
            "--until-caught-up"]
    assert main(argv + ["--nkey", str(seed_file)]) == 0
    assert engine.LogReader(path, group="jetstream").committed() == 50
    monkeypatch.setenv("NATS_NKEY", str(seed_file))  # the nats tool's variable
    back = tmp_path / "cli-in"
    assert main(["bridge", "jetstream", "ingest", str(back), "--stream", "CLI",
                 "--durable", "d", "--until-caught-up"]) == 0
    reader = engine.LogReader(back, start=0)
    assert [bytes(r.value) for r in reader] == [b"c%d" % i for i in range(50)]
    reader.close()


def test_cli_says_why_it_was_refused(nkey_server, tmp_path, monkeypatch, capsys):
    from engine.cli import main

    srv, _ = nkey_server
    monkeypatch.setenv("NATS_URL", srv.url)
    wrong = tmp_path / "wrong.nk"
    wrong.write_text(new_seed(nkeys.PREFIX_BYTE_USER))
    path = tmp_path / "out"
    engine.Log(path, durability="none").close()
    assert main(["bridge", "jetstream", "forward", str(path), "--stream", "X", "--subject",
                 "x", "--until-caught-up", "--nkey", str(wrong)]) == 1
    assert "Authorization Violation" in capsys.readouterr().err


# -- settings checked before connecting ------------------------------------------

def test_seed_and_creds_files_are_checked_up_front(tmp_path):
    user = new_seed(nkeys.PREFIX_BYTE_USER)
    damaged = user[:-3] + ("A" if user[-3] != "A" else "B") + user[-2:]
    with pytest.raises(ValueError, match="damaged") as err:
        nw.Credentials(nkey_seed=damaged)
    assert damaged not in str(err.value)  # a secret never lands in a message
    with pytest.raises(ValueError, match="no NKEY seed found") as err:
        nw.Credentials(nkey_seed=user[:-1])  # a character lost in a copy
    assert user[:-1] not in str(err.value)
    with pytest.raises(ValueError, match="account seed"):
        nw.Credentials(nkey_seed=new_seed(nkeys.PREFIX_BYTE_ACCOUNT))
    with pytest.raises(ValueError, match="cannot read"):
        nw.Credentials(nkey_seed=tmp_path / "missing.nk")
    (tmp_path / "empty.nk").write_text("nothing here\n")
    with pytest.raises(ValueError, match="no NKEY seed"):
        nw.Credentials(nkey_seed=tmp_path / "empty.nk")
    (tmp_path / "half.creds").write_text(
        f"-----BEGIN USER NKEY SEED-----\n{user}\n------END USER NKEY SEED------\n")
    with pytest.raises(ValueError, match="not a NATS creds file"):
        nw.Credentials(creds=tmp_path / "half.creds")
    with pytest.raises(ValueError, match="not both"):
        nw.Credentials(creds=tmp_path / "half.creds", nkey_seed=user)
    assert user not in repr(nw.Credentials(nkey_seed=user))
    # The signature: Ed25519 over the nonce, base64url without padding.
    fields = nw.Credentials(nkey_seed=user).connect_fields("a-nonce")
    assert fields["nkey"] == public_key(user) and "=" not in fields["sig"]
    sig = base64.urlsafe_b64decode(fields["sig"] + "==")
    assert nkeys.from_seed(bytearray(user.encode())).verify(b"a-nonce", sig)


def test_connection_settings_are_checked_up_front(tmp_path, monkeypatch):
    from engine.bridge import JetStreamIngest

    assert nw.redact("nats://u:pw@h:1") == "nats://u:***@h:1"
    assert nw.redact("tls://t0ken@h") == "tls://***@h"
    assert nw.redact("nats://h:1") == "nats://h:1"
    monkeypatch.delenv("NATS_URL", raising=False)
    assert nw.resolve_servers(None) == [nw.DEFAULT_URL]
    assert nw.resolve_servers(["nats://a:1", "tls://b:2"]) == ["nats://a:1", "tls://b:2"]
    with pytest.raises(ValueError, match="at least one"):
        nw.resolve_servers(" , ")
    monkeypatch.setenv("NATS_URL", "http://nope:1")
    with pytest.raises(nw.WireError, match="not a NATS URL"):
        JetStreamIngest(None, "S", "d", tmp_path / "x")
    with pytest.raises(ValueError, match="not both"):
        JetStreamIngest("nats://h:1", "S", "d", tmp_path / "x", tls=ssl.create_default_context(),
                        tls_ca=tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="tls_key needs tls_cert"):
        nw.tls_context(key=tmp_path / "k.pem")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="not a usable PEM"):
        nw.tls_context(cert=tmp_path / "junk.pem")


# -- TLS before INFO (servers configured with handshake_first) -------------------

def test_tls_handshake_first(tmp_path):
    """A server that speaks TLS from the first byte and asks for an NKEY
    signature: the lean connection handshakes first, then answers the nonce."""
    certs = make_certs(tmp_path)
    seed = new_seed(nkeys.PREFIX_BYTE_USER)
    seen: List[Dict[str, Any]] = []

    async def go():
        sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        sctx.load_cert_chain(certs["server"], certs["server_key"])

        async def serve(reader, writer):
            writer.write(b'INFO {"server_id":"fake","headers":true,"max_payload":1048576,'
                         b'"tls_required":true,"nonce":"n0nce-4-test"}\r\n')
            while True:
                line = await reader.readline()
                if not line:
                    return
                if line.startswith(b"CONNECT "):
                    seen.append(json.loads(line[8:]))
                elif line.startswith(b"PING"):
                    writer.write(b"PONG\r\n")
                    await writer.drain()

        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=sctx)
        port = server.sockets[0].getsockname()[1]
        try:
            ctx = nw.tls_context(certs["ca"])
            conn = await nw.open_wire([f"nats://127.0.0.1:{port}"], tls=ctx,
                                      credentials=nw.Credentials(nkey_seed=seed),
                                      tls_handshake_first=True)
            assert conn.alive
            conn.close()
            # Without handshake_first the client waits for a plain INFO that
            # never comes (the server waits for a TLS hello): no connection.
            with pytest.raises(nw.WireError):
                await nw.open_wire([f"nats://127.0.0.1:{port}"], tls=ctx, timeout=1.0)
        finally:
            server.close()

    asyncio.run(go())
    assert seen and seen[0]["nkey"] == public_key(seed)
    sig = base64.urlsafe_b64decode(seen[0]["sig"] + "==")
    assert nkeys.from_seed(bytearray(seed.encode())).verify(b"n0nce-4-test", sig)


# -- user/password and token in the URL ----------------------------------------

@pytest.mark.parametrize("auth,good,bad", [
    (["--user", "orders", "--pass", "s3cret"], "orders:s3cret@", "orders:wrong@"),
    (["--auth", "t0ken"], "t0ken@", "wrong@"),
])
def test_user_password_and_token_in_the_url(auth, good, bad, tmp_path):
    exe = require_nats()
    srv = NatsServer(exe, tmp_path, "userpass", extra=auth).start()
    try:
        url = f"nats://{{}}127.0.0.1:{srv.port}"
        round_trip(tmp_path, "URLAUTH", servers=url.format(good))
        for msg in refused("Authorization Violation", "URLBAD", tmp_path,
                           servers=url.format(bad)):
            assert "wrong" not in msg  # the password / token is not repeated

        async def lean():
            with pytest.raises(nw.AuthError, match="Authorization Violation") as err:
                await nw.open_wire([url.format(bad)])
            assert "wrong" not in str(err.value)

        asyncio.run(lean())
    finally:
        srv.stop()
