"""Test session set-up: 8 virtual CPU devices and float64 support, before JAX starts; the
fixture that runs a module on both paths of the statistics."""

import os
import tempfile

# The tests run on the CPU, also where a GPU plugin is installed (the GPU plan's test).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the session and the processes it starts (examples, doc blocks,
# distributed workers): the same computations compile once, not in every process, and not
# again after a switch of the statistics' path drops the in-memory caches.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jbn-tests-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from jbn import _stats  # noqa: E402

# Parity with PyTorch and the float64 references need float64 arrays; every test names its
# dtypes explicitly, so this changes no test's precision behind its back.
jax.config.update("jax_enable_x64", True)

# The statistics a CPU runs (the guarded ones), and those of GPUs and TPUs, forced here.
STATISTICS_PATHS = {"cpu path": None, "accelerator path": _stats.SHIFTED}


@pytest.fixture(scope="module", params=STATISTICS_PATHS.values(), ids=STATISTICS_PATHS.keys())
def statistics_path(request):
    """Runs every test of a module that uses it twice, once on each path of the statistics:
    ``pytestmark = pytest.mark.usefixtures("statistics_path")``. Yields the forced path
    (None: the platform's own)."""
    with _stats.scheme(path=request.param):
        yield request.param
