"""Tests of the PyTorch converter and parity with our PyTorch reference (inference and training)."""
