"""Prometheus metrics for engine objects (``pip install "queue-engine[metrics]"``).

Every ring, log, log reader (consumer group), counter, store, deduplicator,
coordinator and scheduling queue has a ``stats()`` dict. :func:`register`
exposes one to ``prometheus_client`` through a custom collector that calls
``stats()`` at scrape time (nothing runs between scrapes)::

    from engine import metrics
    metrics.register(ring, name="orders")             # default REGISTRY
    metrics.register(log, name="orders-log", registry=my_registry)

Names follow the Prometheus conventions: ``engine_<kind>_<what>`` with
``_total`` for counters, ``_bytes`` and ``_seconds`` units, and a ``name``
label (``slot``, ``level``, ``group`` where a value is per consumer, level or
group), e.g. ``engine_ring_messages_put_total{name="orders"}``,
``engine_ring_consumer_lag_bytes{name="orders",slot="0"}``,
``engine_log_group_lag_records{name="orders-log",group="billing"}``.
Nested objects are exposed under their own kind: a store's log as
``engine_log_*{name="<store>/log"}``, a priority queue's level rings as
``engine_ring_*{name="<queue>.L0"}``.

:class:`LogDirectory` gives the stats of a log directory without opening it
for writing (any process, no lock): offsets, bytes, damaged segments, groups
and their lag. It scans every segment (a CRC pass), so register it only where
a scrape may take that long; ``queue-engine stats --prometheus`` uses it.

A closed object is skipped at scrape time (and dropped from the collector).
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from typing import Any, Dict, Iterator, List, Optional, Tuple

__all__ = ["register", "unregister", "families", "openmetrics_text", "LogDirectory"]

# (stats key, metric suffix, type, help). Types: "counter" (monotonic, gets
# _total), "gauge". Numeric keys not listed become gauges named after the key.
_Spec = Tuple[str, str, str, str]

_RING: List[_Spec] = [
    ("capacity", "capacity_bytes", "gauge", "Ring data area size."),
    ("max_message", "max_message_bytes", "gauge", "Largest message accepted."),
    ("max_consumers", "max_consumers", "gauge", "Consumer slots."),
    ("used_bytes", "used_bytes", "gauge", "Bytes written and not yet released by every consumer."),
    ("head", "head_bytes", "counter", "Producer position (bytes ever written)."),
    ("messages_put", "messages_put", "counter", "Messages put."),
    ("bytes_put", "bytes_put", "counter", "Payload bytes put."),
    ("messages_got", "messages_got", "counter", "Messages consumed (all consumers)."),
    ("producer_waits", "producer_waits", "counter", "Times the producer slept for room."),
    # "consumer_waits" (the sum over slots) is left out: engine_ring_consumer_waits_total
    # is per slot, and one family must not mix label sets
    ("consumer_waits", "", "", ""),
    ("lost", "messages_lost", "counter", "Messages claimed by a consumer that died (shared mode)."),
    ("closed", "closed", "gauge", "1 once the producer closed the ring."),
    ("producer_pid", "producer_pid", "gauge", "Pid of the producer (0: none)."),
]
_RING_CONSUMER: List[_Spec] = [
    (
        "lag_bytes",
        "consumer_lag_bytes",
        "gauge",
        "Bytes published and not yet read by this consumer.",
    ),
    ("messages_got", "consumer_messages_got", "counter", "Messages read by this consumer slot."),
    ("bytes_got", "consumer_bytes_got", "counter", "Payload bytes read by this consumer slot."),
    ("waits", "consumer_waits", "counter", "Times this consumer slept for data."),
    ("alive", "consumer_alive", "gauge", "1 while the consumer's process exists."),
]
_LOG: List[_Spec] = [
    ("start_offset", "start_offset", "gauge", "Oldest offset kept."),
    ("next_offset", "next_offset", "gauge", "Offset of the next record appended."),
    (
        "durable_offset",
        "durable_offset",
        "gauge",
        "Records below this offset are on stable storage.",
    ),
    ("records", "records", "gauge", "Records kept."),
    ("segments", "segments", "gauge", "Segment files."),
    ("segment_bytes", "segment_size_bytes", "gauge", "Configured segment size."),
    ("disk_bytes", "disk_bytes", "gauge", "Bytes of segment files on disk."),
    ("active_position", "active_position_bytes", "gauge", "Write position in the active segment."),
    ("appends", "appends", "counter", "Records appended by this writer."),
    ("syncs", "syncs", "counter", "Flushes to stable storage by this writer."),
    ("sync_seconds", "sync_seconds", "counter", "Time the flushes counted by syncs ran."),
    ("rolls", "rolls", "counter", "Segments rolled by this writer."),
    (
        "handoffs",
        "handoffs",
        "counter",
        "Threads woken after a group-commit sync that waited for the GIL's hand-off in the log.",
    ),
    (
        "handoffs_late",
        "handoffs_late",
        "counter",
        "Hand-off waits that ran out (the rest of that chain was woken at once).",
    ),
    (
        "writeback_ahead_bytes",
        "writeback_ahead_bytes",
        "counter",
        "Zero pages ahead of the tail written back while the log synced often.",
    ),
    (
        "recovered_bytes",
        "recovered_bytes",
        "gauge",
        "Torn tail bytes truncated by recovery at open.",
    ),
    ("was_clean", "was_clean", "gauge", "1 if the last writer closed the log cleanly."),
    ("damaged_segments", "damaged_segments", "gauge", "Segments with a damaged record (verify)."),
    ("closed", "closed", "gauge", "1 once closed."),
]
_READER: List[_Spec] = [
    ("position", "position", "gauge", "Next offset this reader returns."),
    ("committed", "committed_offset", "gauge", "The group's committed offset."),
    (
        "skipped",
        "skipped_records",
        "counter",
        "Records retention removed before this reader got to them.",
    ),
    ("closed", "closed", "gauge", "1 once closed."),
]
_COUNTER: List[_Spec] = [
    ("value", "value", "gauge", "Current value (sum of the shards)."),
    ("shards", "shards", "gauge", "Shards."),
    ("busy_shards", "busy_shards", "gauge", "Shards with a non-zero cell."),
    ("size_bytes", "size_bytes", "gauge", "Bytes mapped."),
]
_STORE: List[_Spec] = [
    ("keys", "keys", "gauge", "Keys held."),
    ("revision", "revision", "gauge", "Store revision (writes applied)."),
    ("conflicts", "conflicts", "counter", "Writes refused by a version check."),
    ("merges", "merges", "counter", "Conflicts resolved by the merge callback."),
    ("snapshots_written", "snapshots_written", "counter", "Snapshots written."),
    ("snapshot_offset", "snapshot_offset", "gauge", "Log offset of the last snapshot."),
]
_DEDUP: List[_Spec] = [
    ("remembered", "remembered", "gauge", "Message ids remembered."),
    ("repeats", "repeats", "counter", "Repeated message ids recognised."),
    ("window", "window", "gauge", "Ids remembered at most."),
    ("replayed_records", "replayed_records", "gauge", "Records replayed at open."),
    ("open_seconds", "open_seconds", "gauge", "Time taken to open."),
]
_TXN: List[_Spec] = [
    ("committed", "committed", "counter", "Transactions committed."),
    ("aborted", "aborted", "counter", "Transactions aborted."),
    ("active", "active", "gauge", "Transactions in progress."),
    (
        "unfinished",
        "unfinished",
        "gauge",
        "Decided transactions not yet acknowledged by every participant.",
    ),
    ("journal_records", "journal_records", "gauge", "Records in the coordinator journal."),
    ("incarnation", "incarnation", "gauge", "Coordinator restarts."),
]
_PQ: List[_Spec] = [
    ("aged", "aged", "counter", "Messages served early by aging."),
    ("delayed_held", "delayed_held", "gauge", "Delayed messages held by this consumer until due."),
    ("levels", "levels", "gauge", "Priority levels."),
    ("max_wait", "max_wait_seconds", "gauge", "Aging bound."),
]
_KQ: List[_Spec] = [
    ("partitions", "partitions", "gauge", "Partitions."),
    ("put", "messages_put", "counter", "Messages put by this handle."),
    ("epoch", "epoch", "gauge", "Group membership epoch (rebalances)."),
]

_KINDS: Dict[str, Tuple[str, List[_Spec]]] = {
    "Ring": ("ring", _RING),
    "Log": ("log", _LOG),
    "LogDirectory": ("log", _LOG),
    "LogReader": ("log_reader", _READER),
    "ShardedCounter": ("counter", _COUNTER),
    "CounterMap": ("counter_map", []),
    "VersionedStore": ("store", _STORE),
    "Deduplicator": ("dedup", _DEDUP),
    "Coordinator": ("txn", _TXN),
    "PriorityQueue": ("priority_queue", _PQ),
    "DurablePriorityQueue": ("priority_queue", _PQ),
    "KeyedQueue": ("keyed_queue", _KQ),
}

# A family: name -> (type, help, [(labels, value)]).
Families = Dict[str, Tuple[str, str, List[Tuple[Dict[str, str], float]]]]


def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, (int, float)):
        return float(v)
    return None


def _kind_of(obj: Any) -> Tuple[str, List[_Spec]]:
    for cls in type(obj).__mro__:
        if cls.__name__ in _KINDS:
            return _KINDS[cls.__name__]
    name = type(obj).__name__
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_"), []


def _add(fams: Families, name: str, typ: str, help_: str, labels: Dict[str, str], v: float) -> None:
    fam = fams.get(name)
    if fam is None:
        fam = fams[name] = (typ, help_, [])
    fam[2].append((labels, v))


def _emit(
    fams: Families, kind: str, specs: List[_Spec], st: Dict[str, Any], labels: Dict[str, str]
) -> None:
    known = {s[0] for s in specs}
    for key, suffix, typ, help_ in specs:
        v = _num(st.get(key))
        if v is not None and suffix:
            _add(fams, f"engine_{kind}_{suffix}", typ, help_, labels, v)
    for key, val in st.items():
        v = _num(val)
        if key in known or v is None or key.endswith("pid"):
            continue
        _add(fams, f"engine_{kind}_{key}", "gauge", f"stats()[{key!r}]", labels, v)


def _collect_stats(
    fams: Families, kind: str, specs: List[_Spec], st: Dict[str, Any], name: str
) -> None:
    lab = {"name": name}
    if kind == "ring":
        _emit(fams, "ring", specs, {k: v for k, v in st.items() if k != "consumers"}, lab)
        active = 0
        for c in st.get("consumers") or []:
            active += 1
            _emit(
                fams,
                "ring",
                _RING_CONSUMER,
                {k: c.get(k) for k, *_ in _RING_CONSUMER},
                {"name": name, "slot": str(c.get("slot"))},
            )
        _add(fams, "engine_ring_consumers", "gauge", "Consumer slots in use.", lab, float(active))
        return
    if kind == "priority_queue":
        flat = {k: v for k, v in st.items() if not isinstance(v, (list, dict))}
        _emit(fams, kind, specs, flat, lab)
        for what, suffix, typ, help_ in (
            ("put", "messages_put", "counter", "Messages put per level."),
            ("got", "messages_got", "counter", "Messages got per level."),
        ):
            for level, v in enumerate(st.get(what) or []):
                _add(
                    fams,
                    f"engine_{kind}_{suffix}",
                    typ,
                    help_,
                    {"name": name, "level": str(level)},
                    v,
                )
        for i, rs in enumerate(st.get("rings") or []):
            sub = rs.get("name") or (
                f"{name}.L{i}" if i < len(st.get("put") or []) else f"{name}.delay"
            )
            _collect_stats(fams, "ring", _RING, rs, sub)
        return
    if kind == "keyed_queue":
        _emit(
            fams, kind, specs, {k: v for k, v in st.items() if not isinstance(v, (list, dict))}, lab
        )
        _add(
            fams,
            f"engine_{kind}_members",
            "gauge",
            "Members of the consumer group seen by this handle.",
            lab,
            float(len(st.get("members") or [])),
        )
        return
    flat = {k: v for k, v in st.items() if not isinstance(v, (list, dict))}
    _emit(fams, kind, specs, flat, lab)
    if kind == "log":
        nxt = st.get("next_offset")
        for g, gv in (st.get("groups") or {}).items():
            gl = {"name": name, "group": str(g)}
            _add(
                fams,
                "engine_log_group_committed_offset",
                "gauge",
                "Committed offset of a consumer group.",
                gl,
                float(gv["committed"]),
            )
            lag = gv.get("lag")
            if lag is None and nxt is not None:
                lag = max(0, nxt - gv["committed"])
            if lag is not None:
                _add(
                    fams,
                    "engine_log_group_lag_records",
                    "gauge",
                    "Records appended and not yet committed by the group.",
                    gl,
                    float(lag),
                )
    if isinstance(st.get("log"), dict):
        _collect_stats(fams, "log", _LOG, st["log"], f"{name}/log")
    if isinstance(st.get("open"), dict):
        for k, v in st["open"].items():
            n = _num(v)
            if n is not None:
                _add(
                    fams,
                    f"engine_{kind}_open_{k}" if not k.startswith("open") else f"engine_{kind}_{k}",
                    "gauge",
                    f"stats()['open'][{k!r}]",
                    lab,
                    n,
                )


def families(objects: List[Tuple[Any, str]]) -> Families:
    """The metric families of ``(object, name)`` pairs, calling each
    ``stats()`` once; closed objects are skipped."""
    from engine.errors import Closed

    fams: Families = {}
    for obj, name in objects:
        try:
            st = obj.stats()
        except (Closed, ValueError, OSError):
            continue
        kind, specs = _kind_of(obj)
        _collect_stats(fams, kind, specs, st, name)
    return fams


def _fmt(v: float) -> str:
    """One sample value as the OpenMetrics text format spells it."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 2**63:
        return str(int(v))
    return repr(v)


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Snapshot:
    """A ``prometheus_client`` collector over families already gathered."""

    def __init__(self, fams: Families) -> None:
        self._fams = fams

    def collect(self) -> Iterator[Any]:
        return _metric_families(self._fams)


def openmetrics_text(fams: Families) -> str:
    """OpenMetrics text of ``fams``: ``prometheus_client``'s own exposition
    when it is installed, else the same format written here."""
    try:
        from prometheus_client import CollectorRegistry
        from prometheus_client.openmetrics.exposition import generate_latest
    except ImportError:
        return _openmetrics_text(fams)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Snapshot(fams))
    return generate_latest(reg).decode("utf-8")


def _openmetrics_text(fams: Families) -> str:
    out: List[str] = []
    for name in sorted(fams):
        typ, help_, samples = fams[name]
        base = name[:-6] if typ == "counter" and name.endswith("_total") else name
        out.append(f"# TYPE {base} {typ}")
        out.append(f"# HELP {base} {_esc(help_)}")
        sample = base + "_total" if typ == "counter" else base
        for labels, v in samples:
            lab = ",".join(f'{k}="{_esc(val)}"' for k, val in sorted(labels.items()))
            out.append(f"{sample}{{{lab}}} {_fmt(v)}" if lab else f"{sample} {_fmt(v)}")
    out.append("# EOF")
    return "\n".join(out) + "\n"


class LogDirectory:
    """Read-only stats of a log directory (no writer lock, any process):
    ``stats()`` -> path, segments, start/next offset, records, disk bytes,
    damaged segments and ``groups`` ({group: {committed, lag}}). Each call
    verifies every segment (a CRC pass over the data)."""

    def __init__(self, path: str) -> None:
        if not os.path.isdir(path):
            raise FileNotFoundError(2, "no log directory here", path)
        self.path = path

    def stats(self) -> Dict[str, Any]:
        from engine.logadmin import log_stats

        return log_stats(self.path)


# ---------------------------------------------------------------------------
# prometheus_client
# ---------------------------------------------------------------------------


class _Collector:
    """A ``prometheus_client`` custom collector: ``stats()`` of every
    registered object at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objs: List[Tuple[Any, str]] = []

    def add(self, obj: Any, name: str) -> None:
        with self._lock:
            self._objs = [(o, n) for o, n in self._objs if o is not obj] + [(obj, name)]

    def remove(self, obj: Any) -> bool:
        with self._lock:
            before = len(self._objs)
            self._objs = [(o, n) for o, n in self._objs if o is not obj]
            return len(self._objs) != before

    def _live(self) -> List[Tuple[Any, str]]:
        with self._lock:
            objs = list(self._objs)
        keep = [(o, n) for o, n in objs if not getattr(o, "closed", False)]
        if len(keep) != len(objs):
            with self._lock:
                self._objs = [(o, n) for o, n in self._objs if not getattr(o, "closed", False)]
        return keep

    def describe(self) -> List[Any]:
        # no fixed set of names (they depend on what is registered): skip
        # the registry's duplicate-name check rather than call stats() here
        return []

    def collect(self) -> Iterator[Any]:
        return _metric_families(families(self._live()))


def _metric_families(fams: Families) -> Iterator[Any]:
    """``fams`` as ``prometheus_client`` metric families."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    for name, (typ, help_, samples) in sorted(fams.items()):
        keys = sorted({k for labels, _ in samples for k in labels})
        if typ == "counter":
            fam: Any = CounterMetricFamily(name, help_, labels=keys)
        else:
            fam = GaugeMetricFamily(name, help_, labels=keys)
        for labels, v in samples:
            fam.add_metric([labels.get(k, "") for k in keys], v)
        yield fam


_collectors: weakref.WeakKeyDictionary[Any, _Collector] = weakref.WeakKeyDictionary()
_collectors_lock = threading.Lock()


def _registry(registry: Any) -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ImportError(
            'engine.metrics needs prometheus_client: pip install "queue-engine[metrics]"'
        ) from None
    return prometheus_client.REGISTRY if registry is None else registry


def _default_name(obj: Any) -> str:
    for attr in ("name", "path"):
        try:
            v = getattr(obj, attr, None)
        except Exception:
            v = None
        if isinstance(v, str) and v:
            return v
    return f"{_kind_of(obj)[0]}-{id(obj):x}"


def register(obj: Any, name: Optional[str] = None, registry: Any = None) -> Any:
    """Expose ``obj.stats()`` to ``prometheus_client`` under the ``name``
    label (default: the object's name or path). ``registry`` defaults to
    ``prometheus_client.REGISTRY``. Returns the collector (one per registry,
    shared by every object registered there). Registering the same object
    again replaces its name.

    Example::

        from prometheus_client import start_http_server
        metrics.register(engine.Ring.attach("orders"), name="orders")
        start_http_server(9100)
    """
    if not callable(getattr(obj, "stats", None)):
        raise TypeError(f"{type(obj).__name__} has no stats(): cannot register it")
    reg = _registry(registry)
    with _collectors_lock:
        col = _collectors.get(reg)
        if col is None:
            col = _collectors[reg] = _Collector()
            reg.register(col)
    col.add(obj, name if name is not None else _default_name(obj))
    return col


def unregister(obj: Any, registry: Any = None) -> bool:
    """Stop exposing ``obj``; False if it was not registered there."""
    reg = _registry(registry)
    with _collectors_lock:
        col = _collectors.get(reg)
    return col.remove(obj) if col is not None else False
