"""Compile tier: the CUDA extension builds with nvcc (LIPFORCING_CUDA=ON) into a fresh build dir and imports
without a GPU; LIPFORCING_CUDA=OFF gives a pure-Python wheel that still ships lipforcing.kernels."""
import glob
import os
import subprocess
import sys
import zipfile

import pytest

from tests.compile.conftest import ROOT, pybind11_dir

pytestmark = pytest.mark.compile


def test_cuda_extension_builds_and_imports(built_extension):
    # static CUDA runtime, no libtorch: only system libraries are linked
    ldd = subprocess.run(["ldd", built_extension.so_path], capture_output=True, text=True).stdout
    assert "libcudart" not in ldd and "libtorch" not in ldd and "libc10" not in ldd, ldd
    ext = built_extension.module
    assert ext.runtime_version() >= 12000
    for op in ("chunk_attention", "audio_cross_attention", "denoise_update"):
        assert hasattr(ext, op), op
    if ext.device_count() == 0:
        with pytest.raises(RuntimeError, match="CUDA"):
            ext.require_device("test")


def test_cuda_on_without_compiler_fails_clearly(tmp_path):
    env = dict(os.environ, CUDACXX="/nonexistent/nvcc", PATH="/usr/bin:/bin")
    result = subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path / "b"), "-DLIPFORCING_CUDA=ON",
                             f"-Dpybind11_DIR={pybind11_dir()}"], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "LIPFORCING_CUDA=ON but no CUDA compiler was found" in result.stdout + result.stderr


def test_pure_python_wheel_ships_kernels(tmp_path):
    env = dict(os.environ, LIPFORCING_CUDA="OFF")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    ROOT], check=True, capture_output=True, env=env)
    (whl,) = glob.glob(str(tmp_path / "lipforcing-*.whl"))
    names = zipfile.ZipFile(whl).namelist()
    assert "lipforcing/kernels/__init__.py" in names
    assert "lipforcing/ops/reference.py" in names
    assert not any(n.startswith("kernels/") for n in names), "no top-level kernels package"
    assert not any("_C" in n and n.endswith(".so") for n in names)
