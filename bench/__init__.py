"""Benchmark harness for popsync against mpop, getmail6, fetchmail and poplib (issue 5)."""

__all__: list[str] = []
