"""Remote data: the same sample → tokens mapping through local files, plain HTTP ranges and `psyche data-server`."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import uvicorn

from psyche.data import DataMissingError, SampleIndexError, open_provider, tokenize_corpus
from psyche.data.server import create_data_app
from psyche.localports import free_port

TEXT = "\n%\n".join(
    f"Fortune number {i}: a penny saved is {i} pennies earned, said the {['owl', 'fox', 'cat'][i % 3]}."
    for i in range(400)
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-data")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    tokenize_corpus(corpus=[corpus], vocab_size=300, out_dir=root / "tokens", progress=False)
    return root / "tokens"


@pytest.fixture(scope="module")
def data_server(folder):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_data_app(folder), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield port
    server.should_exit = True
    thread.join(10)


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_provider_maps_samples_to_the_same_tokens(folder, data_server, split):
    kw = dict(split=split, seq_len=16, shuffle_seed=7, repeat=(split == "train"))
    local = open_provider(folder, **kw)
    http = open_provider(f"http://127.0.0.1:{data_server}", provider="http", **kw)
    server = open_provider(f"psyche://127.0.0.1:{data_server}", **kw)
    assert local.num_samples == http.num_samples == server.num_samples > 0
    indices = list(range(0, min(local.num_samples, 40))) + ([local.num_samples + 3] if split == "train" else [])
    for i in indices:
        want = local.sample(i)
        np.testing.assert_array_equal(http.sample(i), want)
        np.testing.assert_array_equal(server.sample(i), want)
    assert server.batch(indices[:4]).equal(local.batch(indices[:4]))


def test_remote_errors_are_clear(folder, data_server):
    val = open_provider(f"psyche://127.0.0.1:{data_server}", split="val", seq_len=16)
    with pytest.raises(SampleIndexError):
        val.sample(val.num_samples)
    with pytest.raises(DataMissingError, match="not found"):
        open_provider(f"http://127.0.0.1:{data_server}/nothing-here", provider="http", split="train", seq_len=16)
    with pytest.raises(DataMissingError, match="cannot reach"):
        open_provider(f"psyche://127.0.0.1:{free_port()}", split="train", seq_len=16)
