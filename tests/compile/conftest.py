"""Compile tier: one build of the CUDA extension shared by every compile test (nvcc is slow on 2 cores)."""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from types import ModuleType

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCHS = (80, 90)


def pybind11_dir() -> str:
    return subprocess.run([sys.executable, "-m", "pybind11", "--cmakedir"], capture_output=True, text=True,
                          check=True).stdout.strip()


@dataclass
class BuiltExtension:
    module: ModuleType  # lipforcing._C loaded from the build dir
    so_path: str
    log: str  # compiler output, including ptxas -v resource usage per kernel and arch

    def binary(self) -> bytes:
        return open(self.so_path, "rb").read()

    def spill_bytes(self, kernel_substring: str) -> dict[int, int]:
        """Max spill-store bytes reported by ptxas per sm arch for functions whose name contains the substring."""
        out: dict[int, int] = {}
        current = None
        for line in self.log.splitlines():
            if "Compiling entry function" in line:
                current = line if kernel_substring in line else None
            elif current is not None and "bytes spill stores" in line:
                arch = int(current.split("for 'sm_")[1][:2]) if "for 'sm_" in current else -1
                spill = int(line.split("bytes spill stores")[0].split()[-1])
                out[arch] = max(out.get(arch, 0), spill)
        return out

    def sass_opcodes(self, kernel_substring: str, arch: int) -> dict[str, int]:
        """Opcode counts (mnemonic before the first dot: LDGSTS = cp.async, LDSM = ldmatrix, HMMA, ...) summed over
        the sm_<arch> SASS of the functions whose mangled name contains the substring, leaving out the never-true
        ``@!PT`` padding.  Skips without cuobjdump (Triton bundles one)."""
        from tests.compile.compile_report import cuobjdump

        tool = cuobjdump()
        if tool is None:
            pytest.skip("cuobjdump not found")
        sass = subprocess.run([tool, "-sass", "-arch", f"sm_{arch}", self.so_path], capture_output=True, text=True,
                              check=True).stdout
        counts: dict[str, int] = {}
        inside = False
        for line in sass.splitlines():
            m = re.match(r"\s*Function : (\S+)", line)
            if m:
                inside = kernel_substring in m.group(1)
                continue
            m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
            if inside and m and (m.group(1) or "").strip() != "@!PT":
                counts[m.group(2)] = counts.get(m.group(2), 0) + 1
        return counts


    def check_sm90_kernel(self, kernel: str, instructions) -> dict[str, str]:
        """The checks every sm_90a kernel of the extension passes: 4 instantiations (fp16/bf16 x head_dim 64/128)
        compiled for sm_90a only, no spills, and SASS with each of ``instructions``, P V reading V transposed and no
        local memory.  Returns {function name: SASS} (skips without cuobjdump)."""
        from tests.compile.compile_report import sass_by_function

        entries = [line for line in self.log.splitlines() if "Compiling entry function" in line and kernel in line]
        assert len(entries) == 4, entries
        assert all("for 'sm_90a'" in line for line in entries), entries
        assert self.spill_bytes(kernel) == {90: 0}
        sass = sass_by_function(self.so_path)
        if sass is None:
            pytest.skip("cuobjdump not found")
        ours = {name: text for name, text in sass.items() if kernel in name}
        assert len(ours) == 4, list(ours)
        for name, text in ours.items():
            for instr in instructions(name) if callable(instructions) else instructions:
                assert instr in text, f"{instr} missing in {name}"
            assert ".tnspB" in text, f"P V must read V transposed (MN-major) in {name}"
            assert "STL" not in text and "LDL" not in text, f"local memory in {name}"
        return sass


@pytest.fixture(scope="session")
def built_extension(tmp_path_factory) -> BuiltExtension:
    """lipforcing._C built from this checkout with LIPFORCING_CUDA=ON for sm_80 and sm_90 (once per session)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    build = tmp_path_factory.mktemp("ext_build")
    arch = ";".join(str(a) for a in ARCHS)
    subprocess.run(["cmake", "-S", ROOT, "-B", str(build), "-DLIPFORCING_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
                    "-DCMAKE_CUDA_FLAGS=-Xptxas=-v", f"-Dpybind11_DIR={pybind11_dir()}",
                    f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"], check=True,
                   capture_output=True)
    result = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    (so,) = glob.glob(str(build / "_C*.so"))
    spec = importlib.util.spec_from_file_location("_C", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return BuiltExtension(module, so, log)
