"""The harness wing: simulators, workers and swarms that tests and benchmarks drive.

Nothing in a product package imports from here (an import-linter contract checks
it); only the CLI's ``psyche bench`` commands, the tests and ``bench/`` do.
"""
