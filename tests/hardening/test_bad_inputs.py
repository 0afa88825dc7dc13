"""One table of bad inputs across the areas hardened for issue 13 (denoise_update, weight files, PCM, audio files,
the engine's file arguments, the commands), each of which must give a clear error: the expected exception type and
a message naming the argument or file.  `python -m pytest tests/hardening -q -rA` lists them; the count of cases
is the "bad inputs tried" figure of the issue's closing note (a crash or a silent acceptance fails the case)."""
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lipforcing import ops
from lipforcing._weights import CheckpointError


def _tiny_sd():
    from lipforcing.config import ModelConfig
    from lipforcing.model import build_model

    return {k: v.contiguous() for k, v in build_model(ModelConfig.from_name("tiny"), causal=True).state_dict().items()}


def _du(**kw):
    args = dict(x_t=torch.randn(3, 8), flow=torch.randn(3, 8), t=0.9, t_next=0.3, noise=torch.randn(3, 8))
    args.update(kw)
    return lambda tmp: ops.denoise_update(args.pop("x_t"), args.pop("flow"), args.pop("t"), args.pop("t_next"),
                                          backend="reference", **args)


def _overlap_outs():
    buf = torch.empty(60)
    return buf[:24].view(3, 8), buf[5:29].view(3, 8)


def _model_file(tmp, name, payload=None, *, metadata=None, sd=None, mutate=None):
    path = tmp / name
    if payload is not None:
        path.write_bytes(payload)
    else:
        sd = dict(sd or _tiny_sd())
        if mutate:
            mutate(sd)
        save_file(sd, path, metadata=metadata)
    return path


def _load(path, **kw):
    from lipforcing import load_model

    return load_model(path, **kw)


def _meta(**changes):
    from lipforcing.config import ModelConfig

    return {"lipforcing_config": json.dumps({**ModelConfig.from_name("tiny").to_dict(), **changes})}


def _nan(sd):
    sd["blocks.0.ffn.0.weight"] = sd["blocks.0.ffn.0.weight"].clone()
    sd["blocks.0.ffn.0.weight"][0, 0] = float("nan")


def _ints(sd):
    for k in sd:
        sd[k] = (sd[k] * 1000).round().to(torch.int32)
    return sd


def _lora(tmp, rank, alpha):
    w = _tiny_sd()
    save_file(w, tmp / "base.safetensors")
    q = w["blocks.0.self_attn.q.weight"]
    save_file({"blocks.0.self_attn.q.lora_A.weight": torch.randn(rank, q.shape[1]),
               "blocks.0.self_attn.q.lora_B.weight": torch.randn(q.shape[0], rank),
               "blocks.0.self_attn.q.alpha": torch.tensor(alpha)}, tmp / "lora.safetensors")
    return [tmp / "base.safetensors", tmp / "lora.safetensors"]


def _pickled_module(tmp):
    torch.save(torch.nn.Linear(2, 2), tmp / "m.pt")
    return tmp / "m.pt"


def _fifo(tmp):
    os.mkfifo(tmp / "p.safetensors")
    return tmp / "p.safetensors"


def _pcm(x):
    from lipforcing.audio import to_mono_float

    return lambda tmp: to_mono_float(x, 16000)


def _burst(value, dtype=np.float32):
    x = np.random.uniform(-0.5, 0.5, 800).astype(dtype)
    x[np.random.randint(0, 800, 3)] = value
    return x


def _float_wav(tmp, value):
    import struct

    x = _burst(value)
    (tmp / "w.wav").write_bytes(b"RIFF" + struct.pack("<I", 36 + x.nbytes) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 3, 1, 16000, 64000, 4, 32) + b"data" + struct.pack("<I", x.nbytes) + x.tobytes())
    return tmp / "w.wav"


def _read_audio(path):
    from lipforcing.media import read_audio

    return read_audio(path)


def _vae(path):
    from lipforcing import load_vae

    return load_vae(path)


def _cli_inputs(tmp):
    from tests.cli.helpers import make_video, make_wav

    make_video(tmp / "v.mp4", 4, 32)
    make_wav(tmp / "a.wav", 0.3, 16000)


def _cli_setup(tmp, setup):
    """The command-line cases' input files in ``tmp``, plus the case's special one."""
    _cli_inputs(tmp)
    if setup == "symlink":
        (tmp / "s.mp4").symlink_to(tmp / "v.mp4")
    elif setup == "hardlink":
        os.link(tmp / "a.wav", tmp / "h.mp4")
    elif setup == "ckpt":
        (tmp / "c.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{}")
    elif setup == "fifo":
        os.mkfifo(tmp / "p.json")


def _engine(**kw):
    import lipforcing
    from tests.stream.helpers import RES, SMALL_VAE, small_config

    kw.setdefault("vae", SMALL_VAE)
    return lipforcing.Engine.load(model=small_config(), resolution=RES, **kw)


CASES = [
    # (id, call(tmp) -> anything, exception, regex the message must match)
    ("denoise out buffers overlap", lambda tmp: _du(out=_overlap_outs())(tmp), ValueError, r"must not overlap"),
    ("denoise out overlaps x_t", lambda tmp: (lambda b: _du(x_t=b[:24].view(3, 8), out=(b[8:32].view(3, 8),
                                                                                        torch.empty(3, 8)))(tmp))(
        torch.randn(64)), ValueError, r"out\[0\] partly overlaps x_t"),
    ("denoise requires_grad", _du(x_t=torch.randn(3, 8, requires_grad=True)), ValueError, r"no backward.*x_t"),
    ("denoise NaN 0-d t", _du(t=torch.tensor(float("nan"))), ValueError, r"^t must be in \[0, 1\]"),
    ("denoise NaN per-sample t", _du(t=torch.tensor([0.5, float("nan"), 0.1])), ValueError, r"^t must be in"),
    ("denoise inf t_next", _du(t_next=float("inf")), ValueError, r"^t_next must be in"),
    ("denoise int noise", _du(noise=torch.ones(3, 8, dtype=torch.int32)), ValueError, r"^noise must have dtype"),
    ("denoise float64 out", _du(out=(torch.empty(3, 8, dtype=torch.float64), torch.empty(3, 8))), ValueError,
     r"^out\[0\] must have dtype"),
    ("model empty file", lambda tmp: _load(_model_file(tmp, "e.safetensors", b""), config="tiny"), CheckpointError,
     r"e.safetensors is empty"),
    ("model truncated safetensors", lambda tmp: _load(_model_file(tmp, "t.safetensors", b"\x40" + b"\x00" * 7 + b"{"),
                                                      config="tiny"), CheckpointError,
     r"t.safetensors is not a readable safetensors file"),
    ("model garbage .pt", lambda tmp: _load(_model_file(tmp, "g.pt", os.urandom(2000)), config="tiny"),
     CheckpointError, r"g.pt is not a readable torch file"),
    ("model pickled module .pt", lambda tmp: _load(_pickled_module(tmp), config="tiny"), CheckpointError,
     r"refusing to load checkpoint .*m.pt"),
    ("model FIFO", lambda tmp: _load(_fifo(tmp), config="tiny"), CheckpointError, r"p.safetensors is a FIFO"),
    ("model metadata num_layers 200000", lambda tmp: _load(_model_file(tmp, "m.safetensors",
                                                                       metadata=_meta(num_layers=200000))),
     CheckpointError, r"num_layers = 200000 \(limit 1024\)"),
    ("model metadata dim 2**40", lambda tmp: _load(_model_file(tmp, "d.safetensors", metadata=_meta(dim=2 ** 40))),
     CheckpointError, r"dim = 1099511627776 \(limit"),
    ("model metadata layers != tensors", lambda tmp: _load(_model_file(tmp, "l.safetensors",
                                                                       metadata=_meta(num_layers=9))),
     CheckpointError, r"num_layers 9, but the tensors hold 4 blocks"),
    ("model NaN weight", lambda tmp: _load(_model_file(tmp, "n.safetensors", mutate=_nan), config="tiny"),
     CheckpointError, r"NaN or inf values in 1 tensor\(s\): blocks.0.ffn.0.weight"),
    ("model integer weights", lambda tmp: _load(_model_file(tmp, "i.safetensors", mutate=_ints), config="tiny"),
     CheckpointError, r"i\.safetensors holds non-floating-point tensors \(torch.int32\)"),
    ("LoRA rank 0", lambda tmp: _load(_lora(tmp, 0, 4.0), config="tiny"), CheckpointError, r"LoRA rank 0"),
    ("LoRA NaN alpha", lambda tmp: _load(_lora(tmp, 2, float("nan")), config="tiny"), CheckpointError,
     r"blocks.0.self_attn.q.alpha"),
    ("VAE missing file", lambda tmp: _vae(tmp / "Wan2.1_VAE.pth"), FileNotFoundError, r"Wan2.1_VAE.pth"),
    ("VAE truncated .pth", lambda tmp: _vae(_model_file(tmp, "v.pth", b"PK\x03\x04" + os.urandom(100))),
     CheckpointError, r"VAE checkpoint .*v.pth is not a readable torch file"),
    ("VAE FIFO", lambda tmp: _vae(_fifo(tmp)), CheckpointError, r"is a FIFO"),
    ("PCM float32 1e30 burst", _pcm(_burst(1e30)), ValueError, r"^pcm has 3 sample\(s\) beyond"),
    ("PCM float64 -1e20 burst", _pcm(_burst(-1e20, np.float64)), ValueError, r"^pcm has 3 sample\(s\) beyond"),
    ("PCM int16-as-float", _pcm(_burst(32767.0)), ValueError, r"^pcm has .* \(int16 samples as floats"),
    ("PCM NaN", _pcm(_burst(np.nan)), ValueError, r"^pcm contains 3 non-finite"),
    ("PCM stereo", _pcm(np.zeros((100, 2), np.float32)), ValueError, r"^pcm must be 1-D mono"),
    ("PCM int32", _pcm(np.zeros(100, np.int32)), TypeError, r"^pcm must have dtype int16, float32 or float64"),
    ("wav file 1e20 samples", lambda tmp: _read_audio(_float_wav(tmp, 1e20)), ValueError,
     r"w.wav: the audio has 3 sample\(s\) beyond"),
    ("audio file not audio", lambda tmp: _read_audio(_model_file(tmp, "x.wav", b"not audio at all")), ValueError,
     r"x.wav: cannot decode it as audio"),
    ("Engine.load missing vae path", lambda tmp: _engine(vae="/missing/vae.pth"), FileNotFoundError,
     r"vae '/missing/vae.pth': no such file"),
    ("Engine.load truncated text", lambda tmp: _engine(text=_model_file(tmp, "t.safetensors", b"\x10" + b"\x00" * 7)),
     CheckpointError, r"prompt embedding .*t.safetensors is not a readable"),
    ("Engine.load threads 0", lambda tmp: _engine(threads=0), ValueError, r"threads must be >= 1"),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_a_clear_error(tmp_path, call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call(tmp_path)
    msg = str(info.value)
    assert "weights_only=False" not in msg and "Traceback" not in msg


CLI_CASES = [
    ("sync -o symlink to --video", ["sync", "--video", "{tmp}/v.mp4", "--audio", "{tmp}/a.wav", "-o", "{tmp}/s.mp4"],
     "symlink", r"would overwrite the input --video"),
    ("sync -o hard link to --audio", ["sync", "--video", "{tmp}/v.mp4", "--audio", "{tmp}/a.wav", "-o",
                                      "{tmp}/h.mp4"], "hardlink", r"would overwrite the input --audio"),
    ("sync truncated checkpoint", ["sync", "--video", "{tmp}/v.mp4", "--audio", "{tmp}/a.wav", "-o", "{tmp}/o.mp4",
                                   "--checkpoint", "{tmp}/c.safetensors", "--device", "cpu"], "ckpt",
     r"c.safetensors"),
    ("sync missing video", ["sync", "--video", "{tmp}/none.mp4", "-o", "{tmp}/o.mp4"], None, r"none.mp4"),
    ("demo -o a folder", ["demo", "-o", "{tmp}"], None, r"is a folder"),
    ("demo --seconds 0", ["demo", "--seconds", "0", "-o", "{tmp}/d.mp4"], None, r"--seconds must be"),
    # profile's outputs are checked before the profile runs (they used to fail with a traceback at the very end)
    ("profile --plot a folder", ["profile", "--device", "cpu", "--chunks", "1", "--plot", "{tmp}"], None,
     r"--plot .*: is a folder"),
    ("profile --plot .xyz", ["profile", "--device", "cpu", "--chunks", "1", "--plot", "{tmp}/p.xyz"], None,
     r"--plot .*p.xyz: matplotlib cannot write '.xyz' files \(use .*\.png"),
    ("profile --json a folder", ["profile", "--device", "cpu", "--chunks", "1", "--json", "{tmp}"], None,
     r"--json .*: is a folder"),
    ("profile --json a FIFO", ["profile", "--device", "cpu", "--chunks", "1", "--json", "{tmp}/p.json"], "fifo",
     r"--json .*p.json: is a FIFO"),
]


@pytest.mark.parametrize("argv, setup, match", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_command_line_is_one_line_exit_2(tmp_path, capsys, argv, setup, match):
    from lipforcing.cli import main

    _cli_setup(tmp_path, setup)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(match, err), err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name in before} == before
