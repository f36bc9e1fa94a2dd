"""Benchmark, hot-path, soak and load harnesses (outside the installed wheel).

Run from the repository root: ``python -m bench``, ``python -m bench.hotpath``,
``python -m bench.soak``, ``python -m bench.load`` (or the Makefile targets).
"""
