"""The commands with ``--decoder``: profile shows TAEHV's decode time next to the Wan VAE's, sync decodes with a
checkpoint given by path, and bad decoder files are one-line errors naming the option and the file."""
from __future__ import annotations

import json
import math
import re

import av
import numpy as np
import pytest
import torch

from lipforcing.cli import main
from lipforcing.decoders import TAEHV, save_decoder
from lipforcing.vae import WanVAE
from tests.cli.helpers import make_video, make_wav


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_profile_shows_both_decoders(tmp_path, capsys):
    js = tmp_path / "p.json"
    assert main(["profile", "--device", "cpu", "--chunks", "2", "--warmup", "1", "--resolution", "16", "--decoder",
                 "taehv", "--json", str(js), "--no-progress"]) == 0
    doc = json.loads(js.read_text())
    assert doc["decoder"] == "taehv"
    cmp = doc["decoder_comparison"]
    assert set(cmp["ms_per_chunk"]) == {"taehv", "wan-vae"} and all(v > 0 for v in cmp["ms_per_chunk"].values())
    assert cmp["frames_per_chunk"] == 12 and cmp["taehv_macs_per_frame"] > 0
    assert cmp["speedup_vs_wan_vae"] == pytest.approx(cmp["ms_per_chunk"]["wan-vae"] / cmp["ms_per_chunk"]["taehv"])
    out = capsys.readouterr().out
    assert "decoder taehv" in out and "decode (taehv)" in out and "wan-vae" in out


def test_sync_with_a_decoder_checkpoint(tmp_path, capsys):
    video, wav, out, ck = tmp_path / "face.mp4", tmp_path / "speech.wav", tmp_path / "out.mp4", tmp_path / "d.pth"
    make_video(video, 10, 32, seed=1)
    make_wav(wav, 0.7, 16000, seed=2)
    save_decoder(TAEHV("tiny"), ck)
    assert main(["sync", "--video", str(video), "--audio", str(wav), "-o", str(out), "--device", "cpu",
                 "--decoder", str(ck)]) == 0
    with av.open(str(out)) as c:
        frames = [f for f in c.decode(c.streams.video[0])]
    assert len(frames) == math.ceil(0.7 * 25)          # one frame per 640 samples, whatever the decoder


def test_bad_decoder_files_are_one_line_errors(tmp_path, capsys):
    video, wav = tmp_path / "face.mp4", tmp_path / "speech.wav"
    make_video(video, 4, 32, seed=1)
    make_wav(wav, 0.3, 16000, seed=2)
    wan = tmp_path / "Wan2.1_VAE.pth"
    torch.save(WanVAE("tiny").state_dict(), wan)
    base = ["sync", "--video", str(video), "--audio", str(wav), "-o", str(tmp_path / "o.mp4"), "--device", "cpu"]
    assert main(base + ["--decoder", str(wan)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"--decoder .*Wan2\.1_VAE\.pth.*not a TAEHV checkpoint.*load_vae", err[0])
    assert main(["profile", "--device", "cpu", "--chunks", "1", "--decoder", "missing.pth", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--decoder missing.pth: no such file" in err[0]


def test_demo_with_a_decoder_checkpoint(tmp_path, capsys):
    """demo --decoder PATH decodes with that checkpoint: same frame count and size as with the Wan VAE, other
    pictures (the output half of the side-by-side video)."""
    ck = tmp_path / "d.safetensors"
    save_decoder(TAEHV("tiny"), ck)
    outs = {}
    for name, dec in (("wan", "wan"), ("taehv", str(ck))):
        out = tmp_path / f"{name}.mp4"
        assert main(["demo", "-o", str(out), "--seconds", "0.6", "--decoder", dec]) == 0
        with av.open(str(out)) as c:
            outs[name] = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    assert len(outs["wan"]) == len(outs["taehv"]) == 15                 # 0.6 s at 25 fps, whatever the decoder
    assert outs["taehv"][0].shape == outs["wan"][0].shape == (360, 1280, 3)
    a, b = (np.stack(outs[k]).astype(np.float32) for k in ("wan", "taehv"))
    d_in, d_out = np.abs(a[..., :640, :] - b[..., :640, :]).mean(), np.abs(a[..., 640:, :] - b[..., 640:, :]).mean()
    assert d_out > 10 * d_in + 0.1             # the input half is the same clip (up to lossy coding), the output not
