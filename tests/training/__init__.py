"""Tests of training: configs, steps, sharding, processes, checkpoints, resume, ImageNet input."""
