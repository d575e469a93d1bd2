"""verify() scans several segments at once (``threads``): whatever the count,
every segment's result is the one the serial scan gives (record count, next
offset, end, sealed, error and its position), the chain rules between
segments hold the same, and an exception is the one the serial scan raises
first, in segment order."""

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine
from engine import _log

SEG = 64 << 10  # small segments: many of them from a few hundred records
HDR = _log.SEGMENT_HEADER_SIZE


def _segments(d):
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".seg"))


def _fields(r):
    return (r.segment, r.base_offset, r.records, r.next_offset, r.end_position, r.sealed,
            r.error, r.error_position, r.bytes_scanned)


def _fill(d, n=900, seed=3):
    rng = random.Random(seed)
    with engine.Log(d, durability="none", segment_bytes=SEG) as log:
        for i in range(n):
            log.append(bytes([i % 251]) * rng.choice([1, 40, 64, 300, 2000]),
                       key=b"k%d" % i if i % 4 == 0 else None)
    segs = _segments(d)
    assert len(segs) >= 4, segs
    return segs


def _by_definition(d):
    """The serial definition, independent of verify: scan_segment of each
    whole file, then the chain rules (every segment but the last is sealed
    and its end marker names the next base)."""
    segs = _segments(d)
    bases = [int(os.path.basename(p)[:-4]) for p in segs]
    out = []
    for i, (path, base) in enumerate(zip(segs, bases)):
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            out.append((path, base, 0, base, 0, False, "empty segment file", 0, 0))
            continue
        r = _log.scan_segment(data, base)
        err, at = r.error, r.error_position
        if err is None and i < len(segs) - 1:
            if not r.sealed:
                err, at = "segment is not sealed but a later segment exists", r.end_position
            elif r.next_offset != bases[i + 1]:
                err = f"end marker names offset {r.next_offset}, next segment starts at {bases[i + 1]}"
                at = r.end_position
        out.append((path, r.base_offset, r.records, r.next_offset, r.end_position, r.sealed, err, at,
                    r.bytes_scanned))
    return out


def _check_all_thread_counts(d):
    """verify at 1, 2, 3 and 8 threads agrees with the definition; returns it."""
    want = _by_definition(d)
    for threads in (1, 2, 3, 8):
        got = [_fields(r) for r in _log.verify(d, threads=threads)]
        assert got == want, threads
    return want


def _flip(path, at):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x41]))


def _record_bytes(path):
    with open(path, "rb") as f:
        return _log.scan_segment(f.read()).end_position


def test_clean_log_of_many_segments(tmp_path):
    d = str(tmp_path / "log")
    segs = _fill(d)
    want = _check_all_thread_counts(d)
    assert all(w[6] is None for w in want)
    assert len(want) == len(segs)
    assert sum(w[2] for w in want) == 900
    # the default thread count gives the same
    assert [_fields(r) for r in _log.verify(d)] == want


def test_damage_in_several_segments_is_reported_in_each(tmp_path):
    """Corrupt middles of two sealed segments and a torn tail in the last
    one: each segment reports its own first error, none is lost or moved."""
    d = str(tmp_path / "log")
    segs = _fill(d)
    mid1, mid2 = segs[1], segs[len(segs) - 3]
    at1 = _record_bytes(mid1) // 2
    _flip(mid1, at1)
    _flip(mid2, HDR + 40)
    last = segs[-1]
    end = _record_bytes(last)
    with open(last, "r+b") as f:  # a torn write: half a record past the end
        f.seek(end)
        f.write(b"\x60\x00\x00\x00" + b"\xee" * 20)
    want = _check_all_thread_counts(d)
    bad = [w[0] for w in want if w[6] is not None]
    assert bad == [mid1, mid2, last]
    # the first error of each is at or before its damage
    assert want[1][7] <= at1
    assert want[len(segs) - 3][7] <= HDR + 40
    assert want[-1][7] == end


def test_empty_truncated_and_hostile_header_segments(tmp_path):
    d = str(tmp_path / "log")
    segs = _fill(d)
    open(segs[1], "wb").close()  # empty file
    with open(segs[2], "r+b") as f:  # hostile header: random bytes
        f.write(random.Random(5).randbytes(HDR))
    with open(segs[3], "r+b") as f:  # cut inside a record
        f.truncate(_record_bytes(segs[3]) - 13)
    want = _check_all_thread_counts(d)
    assert want[1][6] == "empty segment file"
    assert want[2][6] is not None and want[2][2] == 0
    assert want[3][6] is not None
    assert want[0][6] is None


def test_a_missing_segment_breaks_the_chain_the_same_way(tmp_path):
    d = str(tmp_path / "log")
    segs = _fill(d)
    os.unlink(segs[2])
    want = _check_all_thread_counts(d)
    assert want[1][6].startswith("end marker names offset")


def test_the_first_exception_in_segment_order_is_raised(tmp_path):
    """Two segments cannot be opened (dangling links): the serial scan
    raises for the earlier one, so does every thread count."""
    d = str(tmp_path / "log")
    segs = _fill(d)
    for p in (segs[2], segs[4]):
        os.unlink(p)
        os.symlink(str(tmp_path / "nowhere" / os.path.basename(p)), p)
    for threads in (1, 2, 3, 8):
        with pytest.raises(FileNotFoundError) as ei:
            _log.verify(d, threads=threads)
        assert ei.value.filename == segs[2], threads


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_threads_must_be_a_positive_int(tmp_path, bad):
    d = str(tmp_path / "log")
    with engine.Log(d, durability="none") as log:
        log.append(b"x")
    with pytest.raises(ValueError):
        _log.verify(d, threads=bad)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_damage_agrees_with_the_serial_definition(tmp_path_factory, data):
    d = str(tmp_path_factory.mktemp("log") / "log")
    segs = _fill(d, n=500, seed=data.draw(st.integers(0, 3)))
    for _ in range(data.draw(st.integers(1, 6))):
        path = segs[data.draw(st.integers(0, len(segs) - 1))]
        size = os.path.getsize(path)
        kind = data.draw(st.sampled_from(["flip", "zero", "truncate", "garbage"]))
        if size == 0:
            continue
        at = data.draw(st.integers(0, size - 1))
        if kind == "flip":
            _flip(path, at)
        elif kind == "truncate":
            with open(path, "r+b") as f:
                f.truncate(at)
        else:
            n = data.draw(st.integers(1, 64))
            with open(path, "r+b") as f:
                f.seek(at)
                f.write(bytes(n) if kind == "zero" else data.draw(st.binary(min_size=n, max_size=n)))
    _check_all_thread_counts(d)
