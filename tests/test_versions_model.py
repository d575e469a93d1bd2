"""VersionedStore against a pure-Python model: a dict of key -> (version, value).

The state machine puts (blind, CAS right, CAS wrong), deletes, applies
batches (some failing), snapshots, damages snapshots, reopens, and checks a
follower, all against the model; tiny segments make the log roll and retention
run all the time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Dict, Optional, Tuple

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import engine
from engine.versions import VersionedStore

KEYS = st.sampled_from([b"a", b"b", b"c", "d", "é", b""])
VALUES = st.binary(max_size=40)


def _k(key) -> bytes:
    return key.encode() if isinstance(key, str) else key


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="qe-versions-model-")
        self.path = os.path.join(self.dir, "s")
        self.model: Dict[bytes, Tuple[int, bytes]] = {}
        self.revision = 0
        self.follower = None
        self.store = self._open()

    def _open(self) -> VersionedStore:
        return VersionedStore(self.path, durability="none", snapshot_every=7, segment_bytes=4096)

    def teardown(self) -> None:
        if self.follower is not None:
            self.follower.close()
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _version(self, key: bytes) -> int:
        return self.model.get(key, (0, b""))[0]

    # -- writes ------------------------------------------------------------

    @rule(key=KEYS, value=VALUES)
    def put_blind(self, key, value):
        k = _k(key)
        ver = self.store.put(key, value)
        assert ver == self._version(k) + 1
        self.model[k] = (ver, value)
        self.revision += 1

    @rule(key=KEYS, value=VALUES, right=st.booleans(), delta=st.integers(1, 3))
    def put_cas(self, key, value, right, delta):
        k = _k(key)
        cur = self._version(k)
        expected = cur if right else cur + delta
        try:
            ver = self.store.put(key, value, expected_version=expected)
        except engine.VersionConflict as e:
            assert not right
            assert (e.key, e.expected, e.actual) == (k, expected, cur)
            return
        assert right and ver == cur + 1
        self.model[k] = (ver, value)
        self.revision += 1

    @rule(key=KEYS, value=VALUES)
    def put_merge(self, key, value):
        k = _k(key)
        cur = self.model.get(k)
        ver = self.store.put(key, value, self._version(k) + 5, lambda kk, c, p: (c or b"") + p)
        assert ver == self._version(k) + 1
        self.model[k] = (ver, (cur[1] if cur else b"") + value)
        self.revision += 1

    @rule(key=KEYS, use_expected=st.booleans(), right=st.booleans())
    def delete(self, key, use_expected, right):
        k = _k(key)
        cur = self._version(k)
        expected: Optional[int] = None
        if use_expected:
            expected = cur if right else cur + 1
        try:
            existed = self.store.delete(key, expected_version=expected)
        except engine.VersionConflict as e:
            assert use_expected and not right and e.actual == cur
            return
        assert existed == (k in self.model)
        if existed:
            del self.model[k]
            self.revision += 1

    @rule(
        ops=st.lists(
            st.tuples(
                st.sampled_from(["put", "put_cas", "delete", "check"]),
                KEYS,
                VALUES,
                st.booleans(),
            ),
            max_size=5,
        )
    )
    def apply(self, ops):
        shadow = dict(self.model)
        batch = []
        expect_conflict = False
        results = []
        writes = 0
        for kind, key, value, right in ops:
            k = _k(key)
            cur = shadow.get(k, (0, b""))[0]
            exp = cur if right else cur + 2
            if kind == "put":
                batch.append(("put", key, value))
            elif kind == "put_cas":
                batch.append(("put", key, value, exp))
            elif kind == "delete":
                batch.append(("delete", key, exp))
            else:
                batch.append(("check", key, exp))
            if kind != "put" and not right:
                expect_conflict = True
                break
            if kind in ("put", "put_cas"):
                shadow[k] = (cur + 1, value)
                results.append(cur + 1)
                writes += 1
            elif kind == "delete":
                if k in shadow:
                    del shadow[k]
                    writes += 1
                results.append(0)
            else:
                results.append(cur)
        try:
            out = self.store.apply(batch)
        except engine.VersionConflict:
            assert expect_conflict
            return
        assert not expect_conflict
        assert out == results
        self.model = shadow
        if writes:
            self.revision += 1  # a batch is ONE record

    # -- durability --------------------------------------------------------

    @rule()
    def snapshot(self):
        assert self.store.snapshot() == self.revision

    @rule()
    def reopen(self):
        self.store.close()
        self.store = self._open()

    @rule(where=st.floats(0.0, 0.999))
    def damage_newest_snapshot_and_reopen(self, where):
        self.store.close()
        snaps = sorted(p for p in os.listdir(self.path) if p.endswith(".snap"))
        if snaps:
            f = os.path.join(self.path, snaps[-1])
            size = os.path.getsize(f)
            pos = int(where * size)
            with open(f, "r+b") as fh:
                fh.seek(pos)
                b = fh.read(1)
                fh.seek(pos)
                fh.write(bytes([b[0] ^ 0x40]))
        self.store = self._open()
        if snaps:
            assert self.store.stats()["open"]["snapshots_rejected"] >= 1

    @precondition(lambda self: self.follower is None)
    @rule()
    def start_follower(self):
        self.follower = VersionedStore.follow(self.path)

    @precondition(lambda self: self.follower is not None)
    @rule()
    def check_follower(self):
        self.follower.refresh()
        assert dict(self.follower.items()) == self.model
        assert self.follower.revision == self.revision

    # -- invariants --------------------------------------------------------

    @invariant()
    def matches_model(self):
        assert dict(self.store.items()) == self.model
        assert len(self.store) == len(self.model)
        assert self.store.revision == self.revision
        for k in (b"a", b"b", b"zz"):
            assert self.store.get(k) == (self.model[k] if k in self.model else (0, None))


StoreModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("QE_MODEL_EXAMPLES", "25")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestVersionedStoreModel = StoreModel.TestCase
