"""Mutations of valid encodings, shared by the fuzz tests (tests/test_fuzz_decoders.py, tests/test_fuzz_http.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import event
from hypothesis import strategies as st

HOSTILE = [
    b"\xdd\xff\xff\xff\xff",  # msgpack array32 of 2**32-1 items
    b"\xdf\xff\xff\xff\xff",  # map32 of 2**32-1 pairs
    b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
    b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
    b"\xc9\xff\xff\xff\xff\x01",  # ext32 of 4 GiB
    b"\xcf" + b"\xff" * 8,  # uint64 max
    b"\xd3\x80" + bytes(7),  # int64 min
    b"\xcb\x7f\xf8" + bytes(6),  # float64 NaN
    b"\xcb\x7f\xf0" + bytes(6),  # float64 +inf
    b"\x91" * 300,  # 300 nested one-element arrays
    b"\xc1",  # the byte msgpack never uses
    b"\xff" * 9 + b"\x01",  # a 10-byte varint: 2**63 and more
    b"\x80" * 12,  # a varint that never ends
    b"\x00\x00\x00\x00",
    b"[" * 3000,  # JSON nested deeper than the parser goes
    b'{"step": 1' + b"0" * 30 + b"}",  # JSON: a step no 64-bit integer holds
    b"1e999999",  # JSON: infinity
]
"""Tokens that claim more than follows, or extreme values, spliced into valid encodings."""


def mutate(data: st.DataObject, base: bytes, donors: list[bytes]) -> bytes:
    """``base`` changed one to three times (``donors``: other valid encodings to splice in)."""
    out = bytearray(base)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        n = len(out)
        op = data.draw(st.sampled_from(["flip", "byte", "truncate", "extend", "delete", "duplicate", "splice",
                                        "hostile"]), label="op")
        if op in ("flip", "byte", "delete", "duplicate") and n == 0:
            op = "extend"
        if op == "flip":
            out[data.draw(st.integers(0, n - 1))] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "byte":
            out[data.draw(st.integers(0, n - 1))] = data.draw(st.integers(0, 255))
        elif op == "truncate":
            del out[data.draw(st.integers(0, n)):]
        elif op == "extend":
            out += data.draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            i = data.draw(st.integers(0, n - 1))
            del out[i : data.draw(st.integers(i + 1, n))]
        elif op == "duplicate":
            i = data.draw(st.integers(0, n - 1))
            j = data.draw(st.integers(i + 1, n))
            out[j:j] = out[i:j]
        elif op == "splice":
            other = data.draw(st.sampled_from(donors))
            out = out[: data.draw(st.integers(0, n))] + other[data.draw(st.integers(0, len(other))):]
        else:
            token = data.draw(st.sampled_from(HOSTILE))
            i = data.draw(st.integers(0, n))
            end = i + len(token) if data.draw(st.booleans()) else i
            out[i:end] = token
    return bytes(out)


def fuzzed(data: st.DataObject, corpus: list[bytes]) -> tuple[bytes | None, bytes]:
    """``(base, bytes)``: random bytes (base None) or a mutation of one of ``corpus``."""
    if data.draw(st.integers(0, 3), label="random?") == 0:
        return None, data.draw(st.binary(max_size=600), label="random bytes")
    base = data.draw(st.sampled_from(corpus), label="valid")
    return base, mutate(data, base, corpus)


def decodes_or_refuses(decode: Callable[[bytes], Any], raw: bytes, errors: type[BaseException] | tuple) -> Any:
    """``decode(raw)``, or None if it raised one of ``errors`` saying what is wrong; anything else propagates."""
    try:
        value = decode(raw)
    except errors as exc:
        assert str(exc), f"{type(exc).__name__} says nothing"
        event(f"{getattr(decode, '__name__', 'decoder')}: refused")
        return None
    event(f"{getattr(decode, '__name__', 'decoder')}: decoded")
    return value


