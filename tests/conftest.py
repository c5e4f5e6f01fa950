"""Test-wide set-up. Runs before any test module imports jax."""

import os

# Four simulated CPU devices, so sharding tests run in-process; single-device code is unaffected
# (arrays live on device 0 unless sharded).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# Nothing may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
