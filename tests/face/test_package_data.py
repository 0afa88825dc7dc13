"""The two bundled MediaPipe models and their Apache-2.0 notice are package data: tracked by git, unchanged (sha256
as the NOTICE states), and inside a wheel built from the source tree, where the installed package finds them."""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lipforcing.face import _nets

ROOT = Path(__file__).resolve().parents[2]
FILES = (_nets.DETECTOR, _nets.LANDMARKER, "LICENSE", "NOTICE")


def _git_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout.decode()
    return [p for p in out.split("\0") if p]


def test_models_match_their_notice():
    """Each model's sha256 is the one the NOTICE gives (the files are the unmodified mediapipe ones), and the
    licence text is Apache-2.0."""
    notice = (Path(_nets.MODELS) / "NOTICE").read_text()
    for name in (_nets.DETECTOR, _nets.LANDMARKER):
        m = re.search(re.escape(name) + r".*?sha256 ([0-9a-f]{64})", notice, re.S)
        assert m, f"NOTICE gives no sha256 for {name}"
        assert hashlib.sha256((Path(_nets.MODELS) / name).read_bytes()).hexdigest() == m.group(1), name
    assert "Apache License" in (Path(_nets.MODELS) / "LICENSE").read_text()[:200]
    assert "Apache License, Version 2.0" in notice


def test_models_are_not_ignored_by_git():
    """The wheel takes the files under lipforcing/ that git does not ignore: the models must be among them."""
    listed = set(_git_files())
    for name in FILES:
        assert f"lipforcing/face/models/{name}" in listed, f"{name} is ignored or missing: it would not be packaged"


@pytest.mark.slow
def test_wheel_ships_the_models(tmp_path):
    """A real pure-Python wheel of the source tree (LIPFORCING_CUDA=OFF, the tracked files only) holds the models,
    byte for byte, and the installed package's model folder is the one inside it."""
    pytest.importorskip("scikit_build_core")
    src = tmp_path / "src"
    for rel in _git_files():
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    env = dict(os.environ, LIPFORCING_CUDA="OFF")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, env=env, timeout=600)
    (whl,) = (tmp_path / "dist").glob("lipforcing-*.whl")
    with zipfile.ZipFile(whl) as z:
        for name in FILES:
            arc = f"lipforcing/face/models/{name}"
            assert arc in z.namelist(), f"{arc} is not in the wheel"
            assert z.read(arc) == (Path(_nets.MODELS) / name).read_bytes(), arc
        z.extractall(tmp_path / "site")
    # the unpacked wheel as the installed package: lipforcing.face._nets.MODELS points into it.  -S: no .pth files,
    # so the editable install's import hook (which would redirect to the source tree) stays out; the
    # site-packages folders come after the wheel on the path for the dependencies
    import site

    path = os.pathsep.join([str(tmp_path / "site"), *site.getsitepackages()])
    code = ("import lipforcing.face._nets as n, os; print(n.MODELS); "
            "print(os.path.isfile(os.path.join(n.MODELS, n.DETECTOR)))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=path)).stdout.split()
    assert Path(out[0]).resolve() == (tmp_path / "site" / "lipforcing" / "face" / "models").resolve(), out
    assert out[1] == "True"
