"""``queue-engine bridge jetstream forward|ingest``: run a JetStream bridge until
interrupted, printing a one-line status every few seconds.

The connection options and their environment variables are those of the
``nats`` command-line tool: ``NATS_URL``, ``NATS_CREDS``, ``NATS_NKEY``,
``NATS_CA``, ``NATS_CERT``, ``NATS_KEY``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bridge = sub.add_parser("bridge", help="forward a log to NATS JetStream, or ingest from it")
    kinds = bridge.add_subparsers(dest="bridge_kind", metavar="KIND")
    kinds.required = True
    js = kinds.add_parser("jetstream", help="NATS JetStream (needs queue-engine[nats])")
    ops = js.add_subparsers(dest="op", metavar="OP")
    ops.required = True

    fwd = ops.add_parser("forward", help="publish every log record to a stream, exactly once")
    fwd.add_argument("log", help="log directory")
    fwd.add_argument("--group", default="jetstream",
                     help="the log's consumer group that records what was forwarded")
    fwd.add_argument("--stream", required=True,
                     help="JetStream stream to publish into (created if missing)")
    fwd.add_argument("--subject", required=True, help="subject every record is published on")
    fwd.add_argument("--max-in-flight", type=int, default=1024,
                     help="publishes awaiting their acknowledgement at most")
    fwd.add_argument("--commit-interval", type=float, default=0.1,
                     help="seconds between group-offset commits")
    fwd.add_argument("--replicas", type=int, default=1, help="replicas if the stream is created")
    _connection_args(fwd)
    fwd.add_argument("--until-caught-up", action="store_true", help="exit once the log is forwarded")
    fwd.add_argument("--status-interval", type=float, default=5.0,
                     help="seconds between status lines on stderr")
    fwd.set_defaults(func=_forward)

    ing = ops.add_parser("ingest", help="append a stream into a local log, each message once")
    ing.add_argument("log", help="log directory")
    ing.add_argument("--stream", required=True, help="JetStream stream to read")
    ing.add_argument("--durable", required=True, help="durable consumer name")
    ing.add_argument("--subject", default=None,
                     help="only messages on this subject (default: the whole stream)")
    ing.add_argument("--batch", type=int, default=256, help="messages fetched per request")
    ing.add_argument("--ack-wait", type=float, default=30.0, help="seconds before redelivery")
    _connection_args(ing)
    ing.add_argument("--until-caught-up", action="store_true",
                     help="exit once nothing is pending or unacknowledged")
    ing.add_argument("--status-interval", type=float, default=5.0,
                     help="seconds between status lines on stderr")
    ing.set_defaults(func=_ingest)


def _connection_args(p: argparse.ArgumentParser) -> None:
    """Where and as whom to connect; each option defaults to the environment
    variable the ``nats`` tool reads for it."""
    env = os.environ.get
    p.add_argument("--servers", default=None,
                   help="comma-separated NATS server URLs (nats:// or tls://, user:password@ "
                        "or token@ allowed; default: $NATS_URL, else nats://127.0.0.1:4222)")
    p.add_argument("--creds", default=env("NATS_CREDS"),
                   help="creds file: the user's JWT and NKEY seed (default: $NATS_CREDS)")
    p.add_argument("--nkey", default=env("NATS_NKEY"),
                   help="file holding an NKEY user seed (default: $NATS_NKEY)")
    p.add_argument("--tls-ca", default=env("NATS_CA"),
                   help="CA file that verifies the server (default: $NATS_CA, else the "
                        "system's trust store)")
    p.add_argument("--tls-cert", default=env("NATS_CERT"),
                   help="client certificate for servers that verify clients (default: $NATS_CERT)")
    p.add_argument("--tls-key", default=env("NATS_KEY"),
                   help="the client certificate's private key (default: $NATS_KEY)")
    p.add_argument("--tls-first", action="store_true",
                   help="start TLS before the server's greeting (servers with handshake_first)")


def _connection(args: argparse.Namespace) -> Dict[str, Any]:
    return dict(
        creds=args.creds or None, nkey_seed=args.nkey or None, tls_ca=args.tls_ca or None,
        tls_cert=args.tls_cert or None, tls_key=args.tls_key or None,
        tls_handshake_first=args.tls_first,
    )


def _print_status(status) -> None:
    print(status.line(), file=sys.stderr, flush=True)


def _forward(args: argparse.Namespace) -> int:
    from engine.bridge import JetStreamForwarder

    fwd = JetStreamForwarder(
        args.log,
        group=args.group,
        servers=args.servers,
        stream=args.stream,
        subject=args.subject,
        max_in_flight=args.max_in_flight,
        replicas=args.replicas,
        commit_interval=args.commit_interval,
        **_connection(args),
    )
    status = fwd.run(
        until_caught_up=args.until_caught_up,
        on_status=_print_status,
        status_interval=args.status_interval,
    )
    _print_status(status)
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from engine.bridge import JetStreamIngest

    ing = JetStreamIngest(
        args.servers, args.stream, args.durable, args.log, subject=args.subject,
        batch=args.batch, ack_wait=args.ack_wait, **_connection(args),
    )
    status = ing.run(
        until_caught_up=args.until_caught_up, on_status=_print_status,
        status_interval=args.status_interval,
    )
    _print_status(status)
    return 0
