"""Compile tier: the CUDA extension builds with nvcc (LIPFORCING_CUDA=ON) into a fresh build dir and imports
without a GPU; LIPFORCING_CUDA=OFF gives a pure-Python wheel that still ships lipforcing.kernels."""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.compile


def _pybind11_dir() -> str:
    return subprocess.run([sys.executable, "-m", "pybind11", "--cmakedir"], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_extension_builds_and_imports(tmp_path):
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", ROOT, "-B", str(build), "-DLIPFORCING_CUDA=ON",
                    "-DCMAKE_CUDA_ARCHITECTURES=80;90", f"-Dpybind11_DIR={_pybind11_dir()}",
                    f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"], check=True,
                   capture_output=True)
    result = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (so,) = glob.glob(str(build / "_C*.so"))
    # static CUDA runtime, no libtorch: only system libraries are linked
    ldd = subprocess.run(["ldd", so], capture_output=True, text=True).stdout
    assert "libcudart" not in ldd and "libtorch" not in ldd and "libc10" not in ldd, ldd
    spec = importlib.util.spec_from_file_location("_C", so)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    assert ext.runtime_version() >= 12000
    if ext.device_count() == 0:
        with pytest.raises(RuntimeError, match="CUDA"):
            ext.require_device("test")


def test_cuda_on_without_compiler_fails_clearly(tmp_path):
    env = dict(os.environ, CUDACXX="/nonexistent/nvcc", PATH="/usr/bin:/bin")
    result = subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path / "b"), "-DLIPFORCING_CUDA=ON",
                             f"-Dpybind11_DIR={_pybind11_dir()}"], capture_output=True, text=True, env=env)
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
