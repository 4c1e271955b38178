"""Ctrl-C on a client: the runtime stops even when the cancel lands at an awkward moment.

Python 3.11's ``asyncio.wait_for`` returns normally when the task is cancelled just as
the inner wait completes, losing the cancel; a client that lost it trained on to the
end of the run and exited 0 instead of withdrawing (seen on CI).
"""

from __future__ import annotations

import asyncio

import pytest

from psyche.client.runtime import ClientRuntime
from psyche.testing.runtime import RuntimeSwarm, tiny_config, write_token_folder


async def _idle_runtime(swarm: RuntimeSwarm) -> tuple[ClientRuntime, asyncio.Task]:
    """A real runtime following a run that waits for members: its loop only waits for news."""
    client = swarm.add()  # one of two: no start
    await swarm.until(lambda: client.id in swarm.state.pending and client.runtime._notice is not None)
    await asyncio.sleep(0.05)  # inside the wait for the next wake-up
    assert client.task is not None
    return client.runtime, client.task


async def _ends_cancelled(task: asyncio.Task) -> None:
    done, _ = await asyncio.wait([task], timeout=3)
    assert task in done, "the runtime kept running after Ctrl-C"
    with pytest.raises(asyncio.CancelledError):
        task.result()


def test_a_cancel_that_lands_as_the_runtime_wakes_still_stops_it(tmp_path):
    async def scenario():
        async with RuntimeSwarm(tiny_config(write_token_folder(tmp_path / "tokens"))) as swarm:
            runtime, task = await _idle_runtime(swarm)
            runtime._wake.set()  # news arrived in the same loop turn as the signal
            task.cancel()
            await _ends_cancelled(task)

    asyncio.run(scenario())


def test_stop_ends_the_runtime_even_without_a_cancel(tmp_path):
    async def scenario():
        async with RuntimeSwarm(tiny_config(write_token_folder(tmp_path / "tokens"))) as swarm:
            runtime, task = await _idle_runtime(swarm)
            runtime.stop()
            await _ends_cancelled(task)

    asyncio.run(scenario())
