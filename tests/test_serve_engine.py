"""The batching engine of psyche serve, in process on a real (tiny, trained) model: completions
that join a running batch at different steps, left-padded against each other, decode exactly
what ``model.generate`` decodes for each alone; seeded sampling repeats whatever batch it
lands in; a swap lets the batch in flight finish on its model."""

import asyncio

import pytest

from psyche.generate import Generator
from psyche.serve.engine import Engine, Failed, Finished, Sampling, Started, Text, load_served
from tests.test_serve import trained_checkpoint

PROMPTS = ["the cat", "a dog ran in the", "the", "a red ball and the mat", "the park", "a dog"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory.mktemp("engine") / "checkpoint", step=7, seed=1)


async def complete(engine: Engine, prompts: list[str], sampling: Sampling, stagger: float) -> list[tuple]:
    """Submit ``prompts`` ``stagger`` seconds apart (so later ones join a running batch);
    each one's (text, finish reason, step that answered)."""
    tickets = []
    for p in prompts:
        tickets.append(engine.submit(p, sampling))
        await asyncio.sleep(stagger)

    async def read(ticket) -> tuple:
        text, reason, step = "", None, None
        async for ev in ticket.events():
            if isinstance(ev, Started):
                step = ev.model.step
            elif isinstance(ev, Text):
                text += ev.text
            elif isinstance(ev, Finished):
                reason = ev.reason
            elif isinstance(ev, Failed):
                raise AssertionError(ev.message)
        return text, reason, step

    return list(await asyncio.gather(*(read(t) for t in tickets)))


def test_joined_rows_decode_what_each_alone_would(folder):
    reference = Generator.from_checkpoint(folder)
    alone = ["".join(reference.stream(p, max_new_tokens=60, temperature=0)) for p in PROMPTS]
    engine = Engine(load_served(folder), max_batch=4)
    try:
        out = asyncio.run(complete(engine, PROMPTS, Sampling(max_tokens=60, temperature=0), stagger=0.01))
        assert [text for text, _, _ in out] == alone
        stats = engine.stats()
        # Six completions in batches of at most 4, most joining a batch already running.
        assert stats["batched_completions"] == 6 and stats["batches"] < 6, stats

        # The same seed gives the same sample, alone or in company.
        sampling = Sampling(max_tokens=30, temperature=1.3, seed=11, logit_bias=((0, -100.0),))
        lone = asyncio.run(complete(engine, ["the cat"], sampling, stagger=0))[0][0]
        crowd = asyncio.run(complete(engine, ["a dog", "the cat", "the"], sampling, stagger=0.005))
        assert crowd[1][0] == lone
    finally:
        engine.stop()


def test_a_swap_lets_the_batch_in_flight_finish_on_its_model(folder, tmp_path):
    old = load_served(folder)
    new = load_served(trained_checkpoint(tmp_path / "new", step=8, seed=2, steps=5))
    engine = Engine(old, max_batch=8)

    async def scenario() -> tuple:
        sampling = Sampling(max_tokens=400, temperature=0, logit_bias=((0, -100.0),))
        first = engine.submit("the cat", sampling)
        events = first.events()
        assert isinstance(await anext(events), Started)
        await anext(events)  # the batch is decoding
        engine.swap(new)
        later = engine.submit("the cat", Sampling(max_tokens=5))
        text = "".join([ev.text async for ev in events if isinstance(ev, Text)])
        later_started = [ev async for ev in later.events() if isinstance(ev, Started)]
        return text, later_started[0].model.step

    try:
        text, later_step = asyncio.run(scenario())
        assert len(text) > 300 and later_step == 8  # the long one whole; the next on the new model
    finally:
        engine.stop()


def test_a_follower_loads_only_the_checkpoint_the_run_recorded(folder, tmp_path, monkeypatch):
    """The weights are checked against the recorded sha256: a folder already rewritten is not
    served (nor copied again for the same record), the recorded one is, and a location this
    machine cannot read is said once while the model served stays."""
    import shutil

    from psyche.serve import follow
    from psyche.serve.follow import Follower, Published, weights_sha256

    class Records:
        run_id = "run-1"
        record: Published | None = None

        def describe(self) -> str:
            return "a test run"

        async def latest(self):
            return self.record

        async def close(self) -> None:
            pass

    copies = []
    copytree = shutil.copytree
    monkeypatch.setattr(follow.shutil, "copytree", lambda a, b: (copies.append(a), copytree(a, b))[1])
    source, said = Records(), []
    engine = Engine()
    follower = Follower(source, engine, say=said.append)

    async def scenario() -> list[bool]:
        source.record = Published(7, str(folder), b"\0" * 32)  # the folder holds other weights now
        moved = [await follower.poll_once(), await follower.poll_once()]
        source.record = Published(7, str(folder), weights_sha256(folder))
        loaded = await follower.poll_once()
        source.record = Published(9, str(tmp_path / "elsewhere"), b"\1" * 32)
        unreadable = [await follower.poll_once(), await follower.poll_once()]
        return [*moved, loaded, *unreadable]

    assert asyncio.run(scenario()) == [False, False, True, False, False]
    assert copies.count(folder) == 2  # the moved record once (not at each poll), the good one once
    served = engine.served
    assert served is not None and (served.name, served.step, served.run_id) == ("run-1", 7, "run-1")
    assert served.checkpoint == str(folder)
    assert sum("cannot read" in line for line in said) == 1 and "still serving step 7" in said[-1]
