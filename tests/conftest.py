"""Test session set-up: 8 virtual CPU devices and float64 support, before JAX starts."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

# Parity with PyTorch and the float64 references need float64 arrays; every test names its
# dtypes explicitly, so this changes no test's precision behind its back.
jax.config.update("jax_enable_x64", True)
