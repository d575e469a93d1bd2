"""verify() reads each segment window by window: records that cross a window
edge or are larger than a window, damage and stray bytes past the first
window are found exactly where a check of the whole image finds them."""

import os
import random
import subprocess
import sys

import pytest

import engine
from engine import _log

SEG = 4 << 20  # several verify windows per segment


def _segments(d):
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".seg"))


def _fields(r):
    return (r.records, r.next_offset, r.end_position, r.sealed, r.error, r.error_position)


def _same_as_whole_image(d):
    """verify(d) agrees, segment by segment, with scan_segment of the whole file."""
    res = _log.verify(d)
    segs = _segments(d)
    assert len(res) == len(segs)
    for r, path in zip(res, segs):
        with open(path, "rb") as f:
            whole = _log.scan_segment(f.read(), r.base_offset)
        assert _fields(r) == _fields(whole), (path, r, whole)
    return res


def _fill(d):
    rng = random.Random(7)
    # small, odd-sized, window-crossing and larger-than-a-window records
    sizes = [rng.choice([1, 7, 64, 100, 4093, 70_000, 300_001, 1_000_000]) for _ in range(60)]
    with engine.Log(d, durability="none", segment_bytes=SEG) as log:
        for i, n in enumerate(sizes):
            log.append(bytes([i % 251]) * n, key=b"k%d" % i if i % 3 else None)
    return sizes


def test_clean_log_with_records_across_and_above_the_window(tmp_path):
    d = str(tmp_path / "log")
    sizes = _fill(d)
    res = _same_as_whole_image(d)
    assert all(r.error is None for r in res)
    assert sum(r.records for r in res) == len(sizes)
    assert len(res) > 2  # sealed segments and the active one


@pytest.mark.parametrize("where", [0.3, 0.6, 0.95])
def test_a_flipped_byte_past_the_first_window_is_found_where_the_whole_scan_finds_it(tmp_path, where):
    d = str(tmp_path / "log")
    _fill(d)
    seg = _segments(d)[0]
    with open(seg, "rb") as f:
        whole = _log.scan_segment(f.read())
    at = int(whole.end_position * where)
    assert at > 256 << 10
    with open(seg, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x10]))
    res = _same_as_whole_image(d)
    assert res[0].error is not None and res[0].error_position <= at


def test_stray_bytes_after_the_last_record_past_the_first_window(tmp_path):
    d = str(tmp_path / "log")
    with engine.Log(d, durability="none", segment_bytes=SEG) as log:
        for i in range(10):
            log.append(b"v%d" % i)
    seg = _segments(d)[-1]
    with open(seg, "r+b") as f:
        f.seek(SEG - 5)
        f.write(b"\x01")
    res = _same_as_whole_image(d)
    assert res[-1].error == "non-zero bytes after the last record"


def test_a_record_cut_by_the_file_end_is_a_length_error(tmp_path):
    d = str(tmp_path / "log")
    with engine.Log(d, durability="none", segment_bytes=SEG) as log:
        log.append(b"x" * 10)
    seg = _segments(d)[-1]
    with open(seg, "r+b") as f:
        # a length word that runs past the end of the file
        f.seek(64 + 48)
        f.write((SEG).to_bytes(4, "little"))
    res = _same_as_whole_image(d)
    assert res[-1].error == "record length out of bounds"


@pytest.mark.skipif(not _log._crc32c_hw_available(), reason="no CRC32C instruction on this CPU")
def test_crc_lanes_agree_with_the_table():
    # lengths around the three-lane step (3 x 4096 bytes) and its multiples
    rng = random.Random(3)
    for n in [12287, 12288, 12289, 24576 + 13, 3 * 12288 - 1, 100_003]:
        data = rng.randbytes(n + 5)
        for start in (0, 3):
            view = memoryview(data)[start:start + n]
            for crc in (0, 0xDEADBEEF):
                assert _log._crc32c(view, impl="hw", crc=crc) == _log._crc32c(view, impl="sw", crc=crc)


MEASURE = """
import resource, sys
from engine import _log
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res = _log.verify(sys.argv[1])
assert all(r.error is None for r in res), res
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_verify_memory_does_not_grow_with_the_segment(tmp_path):
    d = str(tmp_path / "log")
    seg = 64 << 20
    with engine.Log(d, durability="none", segment_bytes=seg) as log:
        for i in range(100):
            log.append(b"v%d" % i)
    out = subprocess.run([sys.executable, "-c", MEASURE, d], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    grew_kib = int(out.stdout.split()[-1])
    # a window, not a copy of the 64 MiB segment
    assert grew_kib < (seg >> 10) // 4, grew_kib
