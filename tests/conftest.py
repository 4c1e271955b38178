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
