"""engine.metrics (prometheus collector over stats()), queue-engine stats
[--prometheus], LogReader.stats(), and logging through the "engine" logger
instead of print."""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import engine
from engine import metrics

prom = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry  # noqa: E402
from prometheus_client.openmetrics.exposition import generate_latest  # noqa: E402
from prometheus_client.openmetrics.parser import text_string_to_metric_families  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _value(reg, metric, **labels):
    return reg.get_sample_value(metric, labels)


def test_ring_metrics_are_read_at_scrape_time():
    reg = CollectorRegistry()
    ring = engine.Ring(capacity=1 << 16)
    p, c = ring.producer(), ring.consumer()
    metrics.register(ring, name="orders", registry=reg)
    p.put_many([b"abc"] * 3)
    assert _value(reg, "engine_ring_messages_put_total", name="orders") == 3
    assert _value(reg, "engine_ring_bytes_put_total", name="orders") == 9
    assert _value(reg, "engine_ring_capacity_bytes", name="orders") == 65536
    assert _value(reg, "engine_ring_consumer_lag_bytes", name="orders", slot="0") == 3 * 16
    c.get_many(10)
    p.put(b"z")
    assert _value(reg, "engine_ring_messages_put_total", name="orders") == 4
    assert _value(reg, "engine_ring_messages_got_total", name="orders") == 3
    assert _value(reg, "engine_ring_consumer_messages_got_total", name="orders", slot="0") == 3
    assert _value(reg, "engine_ring_consumer_lag_bytes", name="orders", slot="0") == 16
    assert _value(reg, "engine_ring_consumers", name="orders") == 1
    # closed objects disappear from the scrape
    ring.close()
    assert _value(reg, "engine_ring_messages_put_total", name="orders") is None


def test_every_kind_registers(tmp_path):
    reg = CollectorRegistry()
    lg = engine.Log(str(tmp_path / "log"), durability="none")
    lg.append_many([b"a"] * 5)
    rd = engine.LogReader(str(tmp_path / "log"), group="billing")
    rd.read_many(2)
    rd.commit()
    counter = engine.ShardedCounter()
    counter.add(7)
    store = engine.VersionedStore(str(tmp_path / "store"))
    store.put(b"k", b"v")
    with pytest.raises(engine.VersionConflict):
        store.put(b"k", b"w", expected_version=5)
    dedup = engine.Deduplicator(str(tmp_path / "dedup"))
    assert dedup.first_time(b"m1") and not dedup.first_time(b"m1")
    coord = engine.Coordinator(str(tmp_path / "tx"))
    pq = engine.PriorityQueue(levels=2)
    pq.put(b"x", priority=1)
    kq = engine.KeyedQueue(partitions=3)
    kq.put(b"y", key=1)
    for obj, name in [
        (lg, "log"),
        (rd, "reader"),
        (counter, "hits"),
        (store, "store"),
        (dedup, "dedup"),
        (coord, "coord"),
        (pq, "pq"),
        (kq, "kq"),
    ]:
        metrics.register(obj, name=name, registry=reg)

    assert _value(reg, "engine_log_next_offset", name="log") == 5
    assert _value(reg, "engine_log_appends_total", name="log") == 5
    assert _value(reg, "engine_log_reader_position", name="reader") == 2
    assert _value(reg, "engine_log_reader_committed_offset", name="reader") == 2
    assert _value(reg, "engine_counter_value", name="hits") == 7
    assert _value(reg, "engine_store_keys", name="store") == 1
    assert _value(reg, "engine_store_conflicts_total", name="store") == 1
    assert _value(reg, "engine_log_next_offset", name="store/log") == 1
    assert _value(reg, "engine_dedup_repeats_total", name="dedup") == 1
    assert _value(reg, "engine_txn_committed_total", name="coord") == 0
    assert _value(reg, "engine_priority_queue_messages_put_total", name="pq", level="1") == 1
    assert _value(reg, "engine_keyed_queue_messages_put_total", name="kq") == 1
    assert _value(reg, "engine_keyed_queue_partitions", name="kq") == 3

    # the text parses as OpenMetrics and follows the naming conventions
    text = generate_latest(reg).decode()
    fams = list(text_string_to_metric_families(text))
    assert fams
    for fam in fams:
        assert fam.name.startswith("engine_")
        if fam.type == "counter":
            assert all(
                s.name == fam.name + "_total"
                for s in fam.samples
                if not s.name.endswith("_created")
            )

    for obj in (rd, pq, kq, coord, dedup, store, counter, lg):
        obj.close()


def test_register_rejects_objects_without_stats_and_unregister():
    reg = CollectorRegistry()
    with pytest.raises(TypeError):
        metrics.register(object(), registry=reg)
    ring = engine.Ring(capacity=4096)
    metrics.register(ring, name="a", registry=reg)
    metrics.register(ring, name="b", registry=reg)  # renames, no duplicate
    assert _value(reg, "engine_ring_capacity_bytes", name="a") is None
    assert _value(reg, "engine_ring_capacity_bytes", name="b") == 4096
    assert metrics.unregister(ring, registry=reg)
    assert not metrics.unregister(ring, registry=reg)
    assert _value(reg, "engine_ring_capacity_bytes", name="b") is None
    ring.close()


def test_openmetrics_text_matches_prometheus_client():
    reg = CollectorRegistry()
    ring = engine.Ring(capacity=1 << 16)
    p = ring.producer()
    ring.consumer()
    p.put_many([b"x"] * 4)
    metrics.register(ring, name="r", registry=reg)
    fams = metrics.families([(ring, "r")])
    theirs = _samples(generate_latest(reg).decode())
    # with prometheus_client installed its exposition is used; without it,
    # the fallback writer must print the same samples
    assert _samples(metrics.openmetrics_text(fams)) == theirs
    assert _samples(metrics._openmetrics_text(fams)) == theirs
    ring.close()


def _samples(text):
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


@pytest.mark.parametrize("writer", ["openmetrics_text", "_openmetrics_text"])
def test_openmetrics_text_writes_nan_and_infinities(writer):
    fams = {
        "engine_x": ("gauge", "a gauge", [({"v": "nan"}, math.nan), ({"v": "pinf"}, math.inf),
                                          ({"v": "ninf"}, -math.inf), ({"v": "half"}, 0.5)]),
    }
    got = _samples(getattr(metrics, writer)(fams))
    assert math.isnan(got[("engine_x", (("v", "nan"),))])
    assert got[("engine_x", (("v", "pinf"),))] == math.inf
    assert got[("engine_x", (("v", "ninf"),))] == -math.inf
    assert got[("engine_x", (("v", "half"),))] == 0.5


def _cli(*args):
    # conftest puts the package under test on PYTHONPATH for children
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_stats_cli_prometheus(shm_name, tmp_path):
    ring = engine.Ring.create(shm_name, capacity=1 << 16)
    p = ring.producer()
    ring.consumer()
    p.put_many([b"hello"] * 3)
    path = str(tmp_path / "log")
    with engine.Log(path, durability="none") as lg:
        lg.append_many([b"v"] * 10)
    with engine.LogReader(path, group="billing") as rd:
        rd.read_many(4)
        rd.commit()

    out = _cli("stats", "--prometheus", path)
    assert out.returncode == 0, out.stderr
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(out.stdout)
        for s in f.samples
    }
    assert samples[("engine_ring_messages_put_total", (("name", shm_name),))] == 3
    assert samples[("engine_log_next_offset", (("name", path),))] == 10
    assert (
        samples[("engine_log_group_committed_offset", (("group", "billing"), ("name", path)))] == 4
    )
    assert samples[("engine_log_group_lag_records", (("group", "billing"), ("name", path)))] == 6
    assert out.stdout.rstrip().endswith("# EOF")

    out = _cli("stats", path)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st[shm_name]["messages_put"] == 3
    assert st[path]["groups"] == {"billing": {"committed": 4, "lag": 6}}

    out = _cli("stats", "--no-rings", str(tmp_path / "missing"))
    assert out.returncode == 1 and "missing" in out.stderr
    p.close()
    ring.close()


def test_reader_stats(tmp_path):
    path = str(tmp_path / "log")
    with engine.Log(path, durability="none") as lg:
        lg.append_many([b"a", b"b", b"c"])
    rd = engine.LogReader(path, group="g")
    rd.read()
    st = rd.stats()
    assert st["position"] == 1 and st["committed"] is None and st["group"] == "g"
    rd.commit()
    assert rd.stats()["committed"] == 1
    rd.close()
    assert rd.stats()["closed"] is True


def test_dead_consumer_release_is_logged(shm_name, caplog):
    ring = engine.Ring.create(shm_name, capacity=1 << 16)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            r = engine.Ring.attach(shm_name)
            c = r.consumer()  # noqa: F841  (held: os._exit runs no finalizer)
        finally:
            os._exit(0)  # leaves the slot registered to a dead pid
    os.waitpid(pid, 0)
    with caplog.at_level(logging.WARNING, logger="engine"):
        c = ring.consumer()  # max_consumers=1: must reap the dead one first
    assert any(
        r.name == "engine" and "dead process" in r.getMessage() and str(pid) in r.getMessage()
        for r in caplog.records
    )
    c.close()
    ring.close()


def _print_calls(path):
    tree = ast.parse(Path(path).read_text(), str(path))
    return [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
    ]


def test_library_code_never_prints():
    """Only the CLI tools and the benchmark print; the library logs through
    logging.getLogger("engine")."""
    pkg = ROOT / "engine"
    offenders = {}
    for f in sorted(pkg.rglob("*.py")):
        rel = f.relative_to(pkg).as_posix()
        if rel.startswith(("bench/", "cli/")) or rel == "__main__.py":
            continue
        lines = _print_calls(f)
        if lines:
            offenders[rel] = lines
    for f in sorted((ROOT / "pyx").glob("*.pyx")):
        text = f.read_text()
        lines = [
            i + 1 for i, line in enumerate(text.splitlines()) if line.strip().startswith("print(")
        ]
        if lines:
            offenders[f.name] = lines
    assert offenders == {}
