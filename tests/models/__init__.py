"""Tests of the models: layouts, parameter counts, initializers, convolution formulations."""
