"""The test suite's own machinery: optional oracles (tests/oracles.py) and the caller's
environment (tests/conftest.py).

CI proves the rest: .ci/run collects the whole suite in a virtual environment holding only
requirements.txt and pytest, where every missing oracle must be a skip, never an error.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import oracles

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# A missing oracle skips the test that needs it, with the reason; under CI's
# ALBOR_REQUIRE_ORACLES=1 it fails it instead.

def test_a_missing_oracle_skips_and_says_what_to_install(monkeypatch):
    monkeypatch.delenv("ALBOR_REQUIRE_ORACLES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no_such_oracle is not installed .*requirements-dev.txt"):
        oracles.oracle("no_such_oracle")
    assert oracles.oracle("json") is sys.modules["json"]


def test_ci_makes_a_missing_oracle_a_failure(monkeypatch):
    monkeypatch.setenv("ALBOR_REQUIRE_ORACLES", "1")
    with pytest.raises(pytest.fail.Exception, match="no_such_oracle is not installed"):
        oracles.oracle("no_such_oracle")


# ---------------------------------------------------------------------------------------------
# NVRTC of any major version

def touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def test_find_nvrtc_takes_any_major_version_and_nothing_else(tmp_path):
    cuda13 = touch(tmp_path / "cu13", "libnvrtc-builtins.so.13.0", "libnvrtc.alt.so.13", "libnvrtc.so.13")
    assert oracles.find_nvrtc([cuda13]) == cuda13 / "libnvrtc.so.13"
    both = touch(tmp_path / "both", "libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so.13.0.88")
    assert oracles.find_nvrtc([both]) == both / "libnvrtc.so.13"   # the newest
    only_others = touch(tmp_path / "others", "libnvrtc-builtins.so.12.9", "libnvrtc.so", "libcudart.so.13")
    assert oracles.find_nvrtc([only_others, tmp_path / "missing"]) is None
    assert oracles.find_nvrtc([only_others, cuda13, both]) == cuda13 / "libnvrtc.so.13"  # the first folder


def test_nvrtc_folders_cover_the_wheels_the_toolkit_and_the_loader_path(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    cu12, cu13 = touch(site / "nvidia/cuda_nvrtc/lib"), touch(site / "nvidia/cu13/lib", "libnvrtc.so.13")
    monkeypatch.setattr(sys, "path", [str(site)] + sys.path)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.setenv("LD_LIBRARY_PATH", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    folders = oracles.nvrtc_folders()
    for folder in (cu12, cu13, tmp_path / "cuda/lib64", tmp_path / "a", tmp_path / "b"):
        assert folder in folders, folder
    assert oracles.nvrtc_library() == cu13 / "libnvrtc.so.13"


# ---------------------------------------------------------------------------------------------
# The caller's environment changes nothing

def test_the_suite_ignores_the_callers_tqdm_and_kernel_settings():
    """TQDM_DISABLE=1 (common in CI logs) and ALBOR_KERNELS=0 would hide the progress bar a test
    looks for and turn kernels.cu off on a GPU; conftest.py clears both before albor and tqdm
    load them."""
    env = {**os.environ, "TQDM_DISABLE": "1", "ALBOR_KERNELS": "0", "OPENBLAS_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_tokenizer.py::test_progress_bar_is_shown_when_asked",
                             "tests/test_suite.py::test_conftest_cleared_the_variables_that_would_change_the_tests"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_conftest_cleared_the_variables_that_would_change_the_tests():
    assert not [name for name in os.environ if name.startswith("TQDM_") or name == "ALBOR_KERNELS"]
