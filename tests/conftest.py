"""Test configuration shared by every test module.

* JAX runs with 64-bit types enabled (float64 cases need it). This changes JAX's *default* dtypes
  (``jnp.arange`` gives int64, ``jax.random.uniform`` float64), so tests state dtypes explicitly.
* JAX compilations are cached on disk for the length of one test session, in a temporary folder
  shared by the pytest-xdist workers: the parity tests recompile exactly the functions the JAX
  tests compiled, and XLA compile time dominates the suite. Set ``MEA_TEST_JAX_CACHE=off`` to
  disable it.
* Hypothesis: few examples, no deadline (a first call may compile).
"""

import os
import shutil
import tempfile

_CACHE_ENV = "MEA_TEST_JAX_CACHE"
_OWN_CACHE = None
if os.environ.get(_CACHE_ENV) is None:  # the controller (or a plain run) makes the folder;
    _OWN_CACHE = tempfile.mkdtemp(prefix="mea-jax-cache-")  # xdist workers inherit the variable
    os.environ[_CACHE_ENV] = _OWN_CACHE

try:
    import jax
except ImportError:  # the neutral tests still run
    jax = None
else:
    jax.config.update("jax_enable_x64", True)
    if os.environ[_CACHE_ENV] != "off":
        jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

try:
    import torch
except ImportError:
    torch = None
else:
    torch.set_num_threads(1)

from hypothesis import HealthCheck, settings  # noqa: E402 (after the framework set-up above)

settings.register_profile(
    "default",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_unconfigure(config):
    if _OWN_CACHE is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
