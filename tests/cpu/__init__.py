"""Tests of the CPU path: the C++ kernels, inference over CPU devices, huge pages."""
