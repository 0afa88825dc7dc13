"""bench/gpu_train.sh (the prepared GPU training call) runs end to end here: ``SMOKE=1 DEVICE=cpu`` trains every stage
for 2 iterations at tiny sizes (the VAE resumed from the committed run), builds data, evaluates, packs the staging
folder after every stage, and ``--unpack`` restores it.  About a minute or two of CPU: compile tier, not default."""
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.compile
def test_gpu_train_smoke(tmp_path):
    if not list(REPO.glob("runs/records/vae-*/run/latest")):
        pytest.skip("no committed VAE run under runs/records/vae-*/run")
    env = {**os.environ, "SMOKE": "1", "DEVICE": "cpu", "OUT": str(tmp_path / "out"),
           "TRAIN_ROOT": str(tmp_path / "root"), "UNPACK_TO": str(tmp_path / "unpacked")}
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_train.sh")], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    stages = [line.split() for line in (tmp_path / "root" / "train" / "stages.txt").read_text().splitlines()
              if not line.startswith("#")]
    assert sorted(s[0] for s in stages) == sorted(["syncnet", "vae", "data", "teacher", "df", "sf", "eval"])
    assert all(s[1] == "0" for s in stages), stages
    back = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "train.log" in back and any(n.startswith("train.tar.gz") for n in back) and len(back) <= 8, back
    assert all((tmp_path / "out" / n).stat().st_size <= 15 * 2**20 for n in back)
    first = next(n for n in back if n.startswith("train.tar.gz"))
    u = subprocess.run(["bash", str(REPO / "bench" / "gpu_train.sh"), "--unpack", str(tmp_path / "out" / first)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert u.returncode == 0, u.stderr
    (dest,) = (tmp_path / "unpacked").iterdir()
    t = dest / "train"
    for run in ("vae", "syncnet", "teacher", "df", "sf"):
        ck = t / run / (t / run / "latest").read_text().strip()
        assert json.loads((ck / "trainer.json").read_text())["iteration"] >= 2, run
        assert len(list((t / run).glob("ckpt-*"))) == 1, f"{run}: only the latest checkpoint comes back"
    vae_it = json.loads((t / "vae" / (t / "vae" / "latest").read_text().strip() / "trainer.json").read_text())
    assert vae_it["iteration"] > 2 and vae_it["config"]["workers"] >= 1            # resumed, rendered by the pool
    assert (t / "data" / "world" / "meta" / "text.safetensors").is_file()
    assert not list((t / "data").rglob("*clip-*"))                                   # the latents stay on the device
    rows = json.loads((t / "eval" / "eval.json").read_text())["rows"]
    assert {"ground_truth", "teacher_cfg1.0", "teacher_cfg4.5", "df", "sf", "untrained"} <= set(rows)
