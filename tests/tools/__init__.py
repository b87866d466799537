"""Tests of the tools: predict, visualize, export, profiling and the quickstart notebook."""
