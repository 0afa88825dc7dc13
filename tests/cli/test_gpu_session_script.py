"""bench/gpu_session.sh (the prepared one-call GPU session) accepts every stage of its own default list, refuses an
unknown one before doing any work, and passes its arguments through to the commands it runs (checked here with a
stand-in ``lipforcing`` on PATH, so nothing heavy runs)."""
import os
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_session.sh"


def _run(tmp_path, **env):
    full = {**os.environ, "OUT": str(tmp_path / "out"), **env}
    return subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=120, cwd=REPO)


def _stages(tmp_path):
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        text = tar.extractfile("./stages.txt").read().decode()
    return [line.split() for line in text.splitlines()]


def test_default_stage_list_is_accepted(tmp_path):
    r = _run(tmp_path, BUDGET_S="0")          # no time: every stage is validated, then skipped
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    default = "build gpu profile_1.3b bench profile_14b model interp".split()
    assert [s[0] for s in _stages(tmp_path)] == default
    assert all(s[1] == "skipped" for s in _stages(tmp_path))


def test_unknown_stage_refused_before_any_work(tmp_path):
    r = _run(tmp_path, STAGES="build bogus")
    assert r.returncode == 2
    assert "unknown stage 'bogus'" in r.stdout
    assert not (tmp_path / "out" / "results.tar.gz").exists()


def test_profile_stage_compares_decoders(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "args.txt"
    stub = bin_dir / "lipforcing"
    stub.write_text(f'#!/usr/bin/env bash\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    r = _run(tmp_path, STAGES="profile_1.3b profile_14b", BUDGET_S="200",
             PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert r.returncode == 0, r.stdout[-2000:]
    calls = log.read_text().splitlines()
    assert len(calls) == 2, calls
    a13, a14 = (c.split() for c in calls)
    assert a13[:3] == ["profile", "--model", "1.3b"] and "--decoder" in a13
    assert a13[a13.index("--decoder") + 1] == "taehv"
    assert a14[:3] == ["profile", "--model", "14b"] and "--decoder" not in a14
    assert "--json" in a13 and a13[a13.index("--json") + 1].endswith("profile_1.3b_graphs.json")
    assert [s[:2] for s in _stages(tmp_path)] == [["profile_1.3b", "0"], ["profile_14b", "0"]]
