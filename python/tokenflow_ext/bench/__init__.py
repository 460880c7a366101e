"""Benchmark harness: the timing helper, the cases of each op family, and the report writers."""
