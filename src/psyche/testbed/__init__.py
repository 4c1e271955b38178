"""A WAN on one machine for tests and benchmarks: namespaces, shaped links, faults, CPU shares.

See :mod:`psyche.testbed.bed` for the topology and what each knob does.
"""

from psyche.testbed.bed import Link, Node, Testbed, leftovers, sweep
from psyche.testbed.system import TestbedError, TestbedUnavailable, missing_requirement

__all__ = ["Link", "Node", "Testbed", "TestbedError", "TestbedUnavailable", "leftovers", "missing_requirement",
           "sweep"]
