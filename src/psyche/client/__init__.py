"""The client runtime: one node of a run (see :mod:`psyche.client.runtime`)."""
