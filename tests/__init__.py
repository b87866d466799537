"""ca-flax's tests, by area; shared helpers in `tests.helpers`. Run pytest from the repo root."""
