"""`lipforcing profile --frame-size WxH`: full frames with a moving face, so the face stages are measured."""
import json

import pytest

from lipforcing.cli import main

pytest.importorskip("cv2")


def test_profile_measures_the_face_stages(tmp_path, capsys):
    path = tmp_path / "p.json"
    assert main(["profile", "--frame-size", "320x240", "--chunks", "1", "--warmup", "1", "--no-progress", "--device",
                 "cpu", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["frame_size"] == [240, 320] and doc["face_track_ms_per_frame"] > 0
    assert doc["stages"]["face_align"]["mean_ms_per_chunk"] > 0 and doc["stages"]["paste_back"]["mean_ms_per_chunk"] > 0
    out = capsys.readouterr().out
    assert "face tracking" in out and "paste_back" in out and "face_align" in out


@pytest.mark.parametrize("bad", ["1280", "axb", "32x32", "1280x720x3"])
def test_bad_frame_size(bad, capsys):
    assert main(["profile", "--frame-size", bad, "--device", "cpu"]) == 2
    assert f"--frame-size {bad}" in capsys.readouterr().err
