"""The tests' optional tools, found or reported missing.

albor needs only requirements.txt. Some tests also need an oracle from requirements-dev.txt
(PyTorch, transformers, tokenizers, Jupyter, NVRTC) or the CUDA compiler nvcc. A test asks for
one here; where it is missing, that test (or module) is skipped with a reason that says what
to install, so a machine with only requirements.txt still collects and runs everything else.

CI installs every oracle and sets ALBOR_REQUIRE_ORACLES=1: there a missing one fails instead
of skipping, so a broken install cannot pass as a row of skips.
"""
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEV_REQUIREMENTS = "pip install -r requirements-dev.txt"


def missing(reason):
    """Skip the calling test or module, saying why; under ALBOR_REQUIRE_ORACLES=1, fail it."""
    __tracebackhide__ = True  # pytest reports the skip at the caller's line
    if os.environ.get("ALBOR_REQUIRE_ORACLES") == "1":
        pytest.fail(f"{reason} (ALBOR_REQUIRE_ORACLES=1: every oracle must be installed)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def oracle(module):
    """The imported module (e.g. "torch"), or the caller is skipped: see missing()."""
    __tracebackhide__ = True  # pytest reports the skip at the caller's line
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing(f"{module} is not installed ({error}): {DEV_REQUIREMENTS}")


# ---------------------------------------------------------------------------------------------
# NVRTC, the CUDA compiler CuPy uses, as a library: libnvrtc.so.<major>, any major version (the
# dev machines have CUDA 12's, the GPU machine CUDA 13's).

NVRTC_NAME = re.compile(r"libnvrtc\.so\.(\d+)$")  # not libnvrtc-builtins.so.*, not libnvrtc.alt.so.*


def nvrtc_folders():
    """Where an NVRTC library may lie, most specific first: the nvidia-cuda-nvrtc wheels'
    folders (nvidia/cuda_nvrtc/lib for CUDA 12, nvidia/cu13/lib for CUDA 13, and whatever the
    next one is called), the CUDA toolkit's, then the loader's path: LD_LIBRARY_PATH and the
    cache of ldconfig."""
    folders = []
    for site in sys.path:
        folders += sorted(Path(site or ".").glob("nvidia/*/lib"))
    for cuda in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if cuda:
            folders += [Path(cuda) / "lib64", Path(cuda) / "lib", Path(cuda) / "targets/x86_64-linux/lib"]
    folders += [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    return folders + loader_cache_folders()


def loader_cache_folders():
    """The folders of the NVRTC libraries the dynamic loader's cache knows (`ldconfig -p`
    lines such as "libnvrtc.so.12 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libnvrtc.so.12")."""
    ldconfig = shutil.which("ldconfig") or shutil.which("ldconfig", path="/sbin:/usr/sbin")
    if ldconfig is None:
        return []
    listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout
    return [Path(line.split(" => ")[1]).parent for line in listing.splitlines()
            if " => " in line and NVRTC_NAME.match(line.split()[0])]


def find_nvrtc(folders):
    """The first folder's libnvrtc.so.<major> (the highest major if it has several), or None."""
    for folder in folders:
        found = [p for p in folder.glob("libnvrtc.so.*") if NVRTC_NAME.match(p.name)]
        if found:
            return max(found, key=lambda p: int(NVRTC_NAME.match(p.name).group(1)))
    return None


def nvrtc_library():
    """The path of this machine's NVRTC library, or the caller is skipped: see missing()."""
    __tracebackhide__ = True  # pytest reports the skip at the caller's line
    found = find_nvrtc(nvrtc_folders())
    if found is None:
        missing(f"no libnvrtc.so.<version> found (in an nvidia-cuda-nvrtc wheel, the CUDA toolkit "
                f"or the loader's path): {DEV_REQUIREMENTS}")
    return found


def nvcc():
    """The path of the CUDA compiler nvcc (the PATH, then /usr/local/cuda), or the caller is skipped."""
    __tracebackhide__ = True  # pytest reports the skip at the caller's line
    found = shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin")
    if found is None:
        missing("nvcc not found on the PATH or in /usr/local/cuda/bin: install the CUDA toolkit")
    return found


def mpiexec():
    """The path of an MPI launcher, with mpi4py importable (requirements-mpi.txt, which
    requirements-dev.txt includes), or the caller is skipped: see missing()."""
    __tracebackhide__ = True  # pytest reports the skip at the caller's line
    oracle("mpi4py")
    import distributed
    found = distributed.find_mpiexec()
    if found is None:
        missing("no mpiexec beside this Python or on the PATH: pip install -r requirements-mpi.txt")
    return found
