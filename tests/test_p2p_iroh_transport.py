"""The iroh transport adapter: bytes cross real QUIC endpoints exactly, with the bindings' slow copy replaced."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from psyche.p2p import iroh_transport
from psyche.p2p.iroh_transport import IrohTransport, install_fast_buffer_copy
from psyche.p2p.transport import read_exactly

SIZES = [0, 1, 4099, (1 << 20) + 1, 16 << 20]


async def _echo_sizes(sizes: list[int]) -> list[tuple[bytes, bytes]]:
    """Send one random payload per size on its own stream from a to b; return (sent, received) pairs."""
    a = await IrohTransport.bind(os.urandom(32))
    b = await IrohTransport.bind(os.urandom(32))
    try:
        async def receive_all() -> list[bytes]:
            conn = await b.accept()
            assert conn is not None and conn.remote_id == a.local_id
            got = []
            for n in sizes:
                s = await conn.accept_stream()
                got.append(await read_exactly(s, n) if n else b"")
                assert await s.read(1 << 16) == b""  # nothing beyond what was sent
            return got

        receiver = asyncio.create_task(receive_all())
        conn = await a.connect(b.local_id, b.address)
        sent = []
        for n in sizes:
            data = os.urandom(n)
            sent.append(data)
            s = await conn.open_stream()
            if n:
                await s.write(data)
            await s.finish()
        got = await asyncio.wait_for(receiver, 120)
        return list(zip(sent, got))
    finally:
        await a.close()
        await b.close()


def test_bytes_cross_real_endpoints_exactly():
    assert iroh_transport.FAST_BUFFER_COPY, "the installed iroh bindings should copy with one memmove"
    for sent, got in asyncio.run(_echo_sizes(SIZES)):
        assert len(got) == len(sent) and got == sent


def test_fixed_binding_is_left_alone_and_slow_loop_replaced():
    import ctypes

    class Fixed:
        def write(self, value):
            ctypes.memmove(0, value, 0)  # what uniffi >= 0.32 generates (never called here)

    class Slow:
        def write(self, value):
            for i, byte in enumerate(value):
                pass

    class Unknown:
        def write(self, value):
            return value

    original = Fixed.write
    assert install_fast_buffer_copy(Fixed) and Fixed.write is original
    assert install_fast_buffer_copy(Slow) and Slow.write is iroh_transport._memmove_write
    assert install_fast_buffer_copy(Slow)  # idempotent
    unknown = Unknown.write
    assert not install_fast_buffer_copy(Unknown) and Unknown.write is unknown
    assert not install_fast_buffer_copy(type("NoWrite", (), {}))


def test_switched_off_keeps_the_bindings_copy_and_still_works():
    code = (
        "import asyncio, sys; sys.path.insert(0, 'tests');"
        "from psyche.p2p import iroh_transport as t; from test_p2p_iroh_transport import _echo_sizes;"
        "assert not t.FAST_BUFFER_COPY;"
        "assert all(a == b for a, b in asyncio.run(_echo_sizes([0, 1, 4099])))"
    )
    env = {**os.environ, iroh_transport.FAST_COPY_ENV: "0"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("size", [3, 70_000])
def test_memmove_write_handles_buffers_that_are_not_bytes(size):
    import iroh.iroh_ffi as ffi

    data = os.urandom(size)
    for value in (bytearray(data), memoryview(data)):
        rb = ffi._UniffiFfiConverterBytes.lower(value)
        with rb.consume_with_stream() as s:
            assert ffi._UniffiFfiConverterBytes.read(s) == data
