"""Ctrl-C on a client: the runtime stops even when the cancel lands at an awkward moment.

Python 3.11's ``asyncio.wait_for`` returns normally when the task is cancelled just as
the inner wait completes, losing the cancel; a client that lost it trained on to the
end of the run and exited 0 instead of withdrawing (seen on CI).
"""

from __future__ import annotations

import asyncio

import pytest

from psyche.client.runtime import ClientRuntime
from psyche.coordinator import Join
from psyche.ledger.embedded import EmbeddedLedger
from psyche.ledger.server import CoordinatorServer
from psyche.ledger.store import Store
from psyche.identity import Identity
from psyche.p2p import MemoryNetwork, P2PNode
from tests.test_server import CFG


async def _idle_runtime(tmp_path) -> tuple[ClientRuntime, asyncio.Task]:
    """A real runtime following a run that waits for members: its loop only waits for news."""
    authority, me = Identity.generate(), Identity.generate()
    host = CoordinatorServer(Store(tmp_path / "run.sqlite"), host_key=authority.public_key).create_run(
        CFG, authority.public_key)
    assert host.apply(Join(p2p_address="mem:x"), me.public_key) is None  # one of two: no start
    node = P2PNode(me, CFG.run_id, MemoryNetwork().transport(me.public_key))
    runtime = ClientRuntime(EmbeddedLedger(host, me), node, trainer=None, identity=me)
    task = asyncio.create_task(runtime.run())
    for _ in range(100):
        await asyncio.sleep(0.01)
        if runtime.coord is not None:
            break
    await asyncio.sleep(0.05)  # inside the wait for the next wake-up
    return runtime, task


async def _ends_cancelled(task: asyncio.Task) -> None:
    done, _ = await asyncio.wait([task], timeout=3)
    assert task in done, "the runtime kept running after Ctrl-C"
    with pytest.raises(asyncio.CancelledError):
        task.result()


def test_a_cancel_that_lands_as_the_runtime_wakes_still_stops_it(tmp_path):
    async def scenario():
        runtime, task = await _idle_runtime(tmp_path)
        runtime._wake.set()  # news arrived in the same loop turn as the signal
        task.cancel()
        await _ends_cancelled(task)
        await runtime.node.close()

    asyncio.run(scenario())


def test_stop_ends_the_runtime_even_without_a_cancel(tmp_path):
    async def scenario():
        runtime, task = await _idle_runtime(tmp_path)
        runtime.stop()
        await _ends_cancelled(task)
        await runtime.node.close()

    asyncio.run(scenario())
