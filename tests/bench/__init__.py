"""Tests of the benchmark (end to end; no timings asserted)."""
