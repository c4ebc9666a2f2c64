"""The set-up check each notebook runs first: is everything it needs installed?

Uses the standard library only, so it can say what is missing before anything else fails.
`check_setup()` prints one line per requirement and raises SetupError (with the command that
fixes it) when something the notebook needs is missing. Run it from a shell too:

    python notebooks/setup_check.py            # the notebooks' needs
    python notebooks/setup_check.py kernels    # ... plus a way to run kernels.cu (notebook 4)
"""
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent   # the repository: albor.py, tokenizer.py, ...
MIN_PYTHON = (3, 10)
# import name -> the pip package (requirements-notebooks.txt lists the same)
PACKAGES = {"numpy": "numpy", "regex": "regex", "safetensors": "safetensors", "tqdm": "tqdm",
            "matplotlib": "matplotlib", "ipykernel": "ipykernel"}
INSTALL = "pip install -r requirements-notebooks.txt   (in the repository's root folder)"


class SetupError(RuntimeError):
    """Something a notebook needs is missing; the message says what and how to get it."""


def _version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def gpu_usable():
    """(True, "") when CuPy finds a CUDA GPU and ALBOR_DEVICE allows it, else (False, why)."""
    if os.environ.get("ALBOR_DEVICE", "").strip().lower() == "cpu":
        return False, "ALBOR_DEVICE=cpu"
    if importlib.util.find_spec("cupy") is None:
        return False, "CuPy is not installed"
    try:
        import cupy
        if cupy.cuda.is_available():
            return True, ""
        return False, "CuPy finds no CUDA GPU"
    except Exception as error:   # built for another CUDA version, no driver, ...
        return False, f"CuPy does not work here ({type(error).__name__}: {error})"


def emulator_route():
    """(True, how) when kernels.cu can run in the CPU emulator here, else (False, what to do).

    The emulator (tests/cuda_emu.h) switches between thousands of GPU "threads" on one CPU
    thread and finds the kernels' shared memory through glibc's dynamic loader: it needs Linux
    and g++ (tested on x86-64, and on arm64 under qemu: tests/emu_arm64_check.py). Windows runs
    it inside WSL2, a Mac inside a Linux container (WORKSHOP.md's set-up has both routes).
    """
    system = platform.system()
    if system != "Linux":
        route = ("Windows: open the repository in WSL2 (Ubuntu) and run Jupyter there"
                 if system == "Windows" else
                 "macOS: run the notebooks in a Linux container (WORKSHOP.md, 'Notebook 4 on a Mac')")
        return False, (f"the CPU emulator of kernels.cu needs Linux (glibc) and g++; this is "
                       f"{system}. {route}, or use a machine with an NVIDIA GPU and CuPy")
    if shutil.which("g++") is None:
        return False, ("the CPU emulator compiles kernels.cu with g++, which is not on the PATH: "
                       "sudo apt install g++ (Debian/Ubuntu/WSL2), sudo dnf install gcc-c++ (Fedora)")
    return True, f"g++ compiles kernels.cu for the CPU emulator (Linux {platform.machine()})"


def check_setup(kernels=False):
    """Print what this notebook needs and whether it is there; raise SetupError if not.

    kernels=True (notebook 4): also a way to run kernels.cu, an NVIDIA GPU with CuPy or the
    CPU emulator.
    """
    problems = []
    python_ok = sys.version_info >= MIN_PYTHON
    print(f"{'✓' if python_ok else '✗'} Python {platform.python_version()}"
          + ("" if python_ok else f" (needs {'.'.join(map(str, MIN_PYTHON))} or newer)"))
    if not python_ok:
        problems.append(f"Python {'.'.join(map(str, MIN_PYTHON))} or newer")
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    found = [f"{name} {_version(PACKAGES[name])}" for name in PACKAGES if name not in missing]
    print("✓ " + ", ".join(found))
    if missing:
        print("✗ missing: " + ", ".join(missing))
        problems.append(f"the packages {', '.join(missing)}: {INSTALL}")
    if not (ROOT / "albor.py").is_file():
        problems.append(f"albor's files one folder up ({ROOT}): open the notebooks from the "
                        "repository's notebooks/ folder")
    gpu, why_not = gpu_usable()
    print(f"✓ albor runs on {'the GPU (CuPy)' if gpu else 'the CPU (NumPy)'}"
          + ("" if gpu else f": {why_not}; fine, every notebook runs on a laptop CPU"))
    if kernels and not gpu:
        ok, how = emulator_route()
        print(f"{'✓' if ok else '✗'} kernels.cu: {how}")
        if not ok:
            problems.append(how)
    if problems:
        raise SetupError("this notebook needs " + "; and ".join(problems))
    print("set-up OK")


if __name__ == "__main__":
    try:
        check_setup(kernels="kernels" in sys.argv[1:])
    except SetupError as error:
        sys.exit(f"✗ {error}")
