"""Test-wide settings.

Property tests run on 2-core CI machines that are busy with the end-to-end
tests' processes, so Hypothesis must not judge by wall-clock speed: no
per-example deadline and no "input generation is slow" health check. The
number of examples is set per test (PSYCHE_FULL=1 raises it where supported).
"""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("psyche", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("psyche")


@pytest.fixture
def one_torch_thread():
    """One torch intra-op thread for the test (restored after): on tiny tensors more threads
    only add barrier waits on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The fortunes token folder in the project (built once from Debian's fortunes if missing)."""
    from psyche.data import ensure_default_dataset

    return ensure_default_dataset(Path(__file__).resolve().parents[1] / "data" / "fortunes", progress=False)


@pytest.fixture
def network(tmp_path, data_dir):
    """``make(name, **coordinator)``: a :class:`tests.netutil.Network` under ``tmp_path`` with
    :func:`tests.netutil.small_config`; every process it started is stopped afterwards."""
    from tests.netutil import Network, small_config

    nets: list[Network] = []

    def make(name: str, **coordinator) -> Network:
        net = Network(tmp_path, small_config(name, data=data_dir, **coordinator))
        nets.append(net)
        return net

    yield make
    for net in nets:
        net.stop()


@pytest.fixture
def testbed_run(tmp_path):
    """``start(cfg, nodes)``: a testbed of ``nodes`` (the first is the server's) with ``cfg``'s run on
    it, server and one client per other node started; returns ``(bed, net)``. Whatever happens,
    every process is stopped and the testbed torn down afterwards, and nothing of it may remain."""
    from psyche.testbed import Testbed, leftovers
    from psyche.testing.network import Network

    made: list[tuple[Testbed, Network]] = []

    def start(cfg, nodes) -> tuple[Testbed, Network]:
        bed = Testbed(nodes)
        bed.up()  # removes what it made if it fails
        net = Network(tmp_path, cfg, bed=bed)
        made.append((bed, net))
        net.start_server()
        for i in range(len(nodes) - 1):
            net.start_client(i)
        return bed, net

    try:
        yield start
    finally:
        for bed, net in made:
            try:
                net.stop()
            finally:
                bed.down()
        for bed, _ in made:
            # Other testbeds on this machine are none of this test's business.
            assert [x for x in leftovers() if f"psytb-{bed.tag}" in x] == [], f"testbed {bed.tag} left behind"
