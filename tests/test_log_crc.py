"""CRC32C: the hardware and portable paths against the RFC 3720 vector and each other."""

from __future__ import annotations

import os
import random
import zlib

import pytest

from engine import _log

HW = _log._crc32c_hw_available()


def _ref_crc32c(data: bytes) -> int:
    # bit-at-a-time reference, independent of the C code
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    return c ^ 0xFFFFFFFF


@pytest.mark.parametrize("impl", ["auto", "sw", pytest.param("hw", marks=pytest.mark.skipif(not HW, reason="no CRC32C instruction (portable build or CPU)"))])
def test_rfc3720_vector(impl):
    assert _log._crc32c(b"123456789", impl) == 0xE3069283
    assert _log._crc32c(b"", impl) == 0
    # RFC 3720 B.4: 32 bytes of zeros / of 0xff
    assert _log._crc32c(bytes(32), impl) == 0x8A9136AA
    assert _log._crc32c(b"\xff" * 32, impl) == 0x62A8AB43


def test_hw_detected_where_the_cpu_has_it():
    if os.environ.get("ENGINE_PORTABLE", "0") not in ("", "0"):
        pytest.skip("portable build")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " sse4_2" in flags or " crc32" in flags:
        assert HW


def test_reference_agrees_on_small_inputs():
    rng = random.Random(1)
    for n in range(0, 80):
        data = rng.randbytes(n)
        assert _log._crc32c(data, "sw") == _ref_crc32c(data)
        assert _log._crc32c(data) == _ref_crc32c(data)


def test_paths_agree_on_random_data_every_alignment():
    rng = random.Random(2)
    blob = rng.randbytes(70000)
    mv = memoryview(blob)
    for _ in range(400):
        a = rng.randrange(0, 1000)
        n = rng.choice([rng.randrange(0, 64), rng.randrange(0, 4096), rng.randrange(0, 69000 - a)])
        piece = mv[a:a + n]
        sw = _log._crc32c(piece, "sw")
        assert _log._crc32c(piece) == sw
        if HW:
            assert _log._crc32c(piece, "hw") == sw


def test_incremental_equals_whole():
    rng = random.Random(3)
    data = rng.randbytes(5000)
    for cut in (0, 1, 7, 8, 9, 4095, 5000):
        for impl in (["sw", "hw"] if HW else ["sw"]):
            head = _log._crc32c(data[:cut], impl)
            assert _log._crc32c(data[cut:], impl, head) == _log._crc32c(data, impl)


def test_not_crc32_ieee():
    # guards against a table built from the wrong polynomial
    assert _log._crc32c(b"123456789") != zlib.crc32(b"123456789")


def test_bad_arguments():
    with pytest.raises(ValueError, match="impl"):
        _log._crc32c(b"x", "fast")
    with pytest.raises(TypeError):
        _log._crc32c("text")
    with pytest.raises(ValueError, match="crc"):
        _log._crc32c(b"x", "sw", -1)
    if not HW:
        with pytest.raises(RuntimeError):
            _log._crc32c(b"x", "hw")
