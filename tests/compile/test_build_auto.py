"""LIPFORCING_CUDA=AUTO builds the CUDA extension only when a CUDA GPU is visible at build time, for that GPU's
architecture unless CMAKE_CUDA_ARCHITECTURES is given.  The GPU is faked with an ``nvidia-smi`` script on PATH.

The no-GPU case only configures a C++ project (about a second), so it runs in the default tier; the GPU cases
run nvcc's configure checks and belong to the compile tier."""
import os
import shutil
import subprocess

import pytest

from tests.compile.conftest import ROOT, pybind11_dir

needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not on PATH")


def _configure(tmp_path, smi_output: str | None, *extra: str) -> str:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    if smi_output is None:
        script.write_text("#!/bin/sh\necho 'No devices were found' >&2\nexit 6\n")
    else:
        script.write_text(f"#!/bin/sh\nprintf '{smi_output}'\n")
    script.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("LIPFORCING_CUDA", None)
    pybind = [f"-Dpybind11_DIR={pybind11_dir()}"] if smi_output is not None else []   # not reached without a GPU
    result = subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path / "build"), "-DLIPFORCING_CUDA=AUTO", *pybind,
                             *extra], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@needs_cmake
@pytest.mark.skipif(os.path.exists("/dev/nvidia0"), reason="a real GPU is visible")
def test_auto_without_a_gpu_builds_nothing(tmp_path):
    out = _configure(tmp_path, None)
    assert "no CUDA GPU visible at build time, building no CUDA extension" in out
    assert "building the CUDA extension" not in out
    assert not (tmp_path / "build" / "CMakeFiles" / "_C.dir").exists()


@needs_cmake
@pytest.mark.compile
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("smi, extra, archs", [("9.0\\n", (), "90"), ("8.6\\n8.6\\n9.0\\n", (), "86;90"),
                                               ("9.0\\n", ("-DCMAKE_CUDA_ARCHITECTURES=80",), "80")])
def test_auto_with_a_gpu_builds_for_its_architecture(tmp_path, smi, extra, archs):
    out = _configure(tmp_path, smi, *extra)
    assert f"building the CUDA extension for architectures {archs}\n" in out, out[-2000:]
    # the Hopper kernels (csrc/*_sm90.cu, sm_90a only) come with 90 in the architectures, and only then
    assert ("building the sm_90a (wgmma + TMA) kernels" in out) == ("90" in archs.split(";")), out[-2000:]


@needs_cmake
@pytest.mark.compile
def test_auto_with_a_pre_sm80_gpu_builds_nothing(tmp_path):
    out = _configure(tmp_path, "7.5\\n")
    assert "older than sm_80" in out and "building the CUDA extension" not in out
