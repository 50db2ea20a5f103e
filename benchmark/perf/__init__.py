"""Performance benchmark scripts (run as ``python -m benchmark.perf.<name>``); not part of the test suite."""
