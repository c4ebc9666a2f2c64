"""Shared test setup.

Tests marked ``gpu`` need CuPy and a CUDA device. On a machine without one they
are deselected (not skipped): CI has no GPU, and the GPU test script runs them
on a device machine.

The suite must not depend on the caller's environment variables. This file runs
before any test module imports albor or tqdm (both read their variables once, on
import), and clears the ones that would change what the tests see:
- TQDM_* (TQDM_DISABLE=1 is common in CI logs): a test looks for the progress bar;
- ALBOR_KERNELS: kernels.cu on a GPU, as by default; the tests that want the
  reference path switch albor.USE_KERNELS themselves.
ALBOR_DEVICE stays: cpu or auto give the same CPU run, and the GPU check sets
cuda on purpose to run the gpu tests on CuPy. OPENBLAS_NUM_THREADS stays too: it
changes only speed, and the tests that count worker threads set it for the
process they start.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

for _name in [name for name in os.environ if name.startswith("TQDM_")] + ["ALBOR_KERNELS"]:
    os.environ.pop(_name, None)


def _gpu_usable():
    try:
        import cupy
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _gpu_usable():
        return
    kept = [item for item in items if "gpu" not in item.keywords]
    dropped = [item for item in items if "gpu" in item.keywords]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
