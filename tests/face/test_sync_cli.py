"""`lipforcing sync` on a portrait video of odd size (361x641, lossless FFV1 input): the output keeps the portrait
shape (padded by one row and column for H.264, the padding repeating the edge) and, outside the face's blend
region, is no further from the input than the input re-encoded the same way."""
import numpy as np
import pytest
import torch

from lipforcing.cli import main
from lipforcing.face import FacePipeline
from lipforcing.face.paste import paste_back
from lipforcing.media import VideoWriter, read_video
from tests.face.helpers import astronaut, clip, fresh_rng

av = pytest.importorskip("av")
pytest.importorskip("cv2")

H, W, N = 641, 361, 10


def write_lossless(path, frames) -> None:
    """(N, h, w, 3) uint8 frames -> an FFV1 video (any size, odd too; decodes to exactly these frames)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=25)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "bgr0"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="bgr0")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_sync_odd_portrait_video(tmp_path, capsys):
    from tests.cli.helpers import make_wav

    rng, seed = fresh_rng()
    frames, _, _ = clip(astronaut(), (H, W), N + 2, rng, start=(rng.uniform(160, 200), rng.uniform(280, 360)),
                        end=(rng.uniform(160, 200), rng.uniform(280, 360)), scale=(1.2, 1.3), angle=(-4, 4))
    video, wav, out = tmp_path / "portrait.mkv", tmp_path / "speech.wav", tmp_path / "out.mp4"
    write_lossless(video, frames)
    assert np.array_equal(read_video(video)[0], frames)              # the command reads exactly these frames
    make_wav(wav, 0.4, 16000, seed=seed)
    assert main(["sync", "--video", str(video), "--audio", str(wav), "-o", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "padded to 362x642" in captured.err
    got, fps = read_video(out)
    assert fps == 25.0 and got.shape == (N, H + 1, W + 1, 3), got.shape
    # the padding repeats the last row / column (up to H.264's error)
    assert np.abs(got[:, :H, W].astype(int) - got[:, :H, W - 1]).mean() < 1.0
    assert np.abs(got[:, H, :W].astype(int) - got[:, H - 1, :W]).mean() < 1.0
    got = got[:, :H, :W]
    # every pixel the paste-back may touch (same face stage: the tiny engine's 32x32 crop, default mouth mask),
    # grown by 16 px for H.264's blocks
    fp = FacePipeline((32, 32))
    track = fp.track(frames[:N])
    assert track.found.all(), seed
    hit = np.zeros((H, W), bool)
    for i in range(N):
        hit |= paste_back(torch.zeros(H, W, 3, dtype=torch.uint8), torch.full((32, 32, 3), 255.0),
                          track.matrices[i], (fp.weight > 0).float())[..., 0].numpy() > 0
    ys, xs = np.nonzero(hit)
    box = np.zeros_like(hit)
    box[max(ys.min() - 16, 0):ys.max() + 16, max(xs.min() - 16, 0):xs.max() + 16] = True
    assert 0 < box.mean() < 0.25, box.mean()
    control = tmp_path / "control.mp4"                              # the input through the same H.264 writer
    with VideoWriter(control, width=W + 1, height=H + 1, fps=25, sample_rate=None) as w:
        for f in frames[:N]:
            w.write(np.pad(f, ((0, 1), (0, 1), (0, 0)), mode="edge"))
    ctrl = read_video(control)[0][:, :H, :W]
    err = np.abs(got[:, ~box].astype(np.int16) - frames[:N, ~box]).astype(np.float64)
    ctrl_err = np.abs(ctrl[:, ~box].astype(np.int16) - frames[:N, ~box]).astype(np.float64)
    assert err.mean() <= 1.2 * ctrl_err.mean() + 0.05, (seed, err.mean(), ctrl_err.mean())
    # inside the blend region the (random-weight) model's mouth differs from the input
    assert np.abs(got[:, hit].astype(np.int16) - frames[:N, hit]).mean() > 2 * ctrl_err.mean(), seed


def test_sync_takes_vae_text_and_audio_encoder(tmp_path, capsys, monkeypatch):
    """--vae and --text reach the engine (the regenerated mouth changes with them, the rest of the frame does not);
    --audio-encoder is handed to Engine.load with the others."""
    from safetensors.torch import save_file

    import lipforcing
    from lipforcing.vae import VAEConfig, WanVAE
    from tests.cli.helpers import make_wav

    rng, seed = fresh_rng()
    h, w = 240, 320
    frames, _, _ = clip(astronaut(), (h, w), 8, rng, start=(150, 120), end=(160, 125), scale=(0.8, 0.8))
    video, wav = tmp_path / "v.mkv", tmp_path / "s.wav"
    write_lossless(video, frames)
    make_wav(wav, 0.24, 16000, seed=seed)
    torch.manual_seed(seed)
    vae = WanVAE(VAEConfig.from_name("tiny"))
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    save_file({"text": torch.randn(1, 7, 32)}, str(tmp_path / "text.safetensors"))
    base = ["sync", "--video", str(video), "--audio", str(wav), "--device", "cpu"]
    assert main(base + ["-o", str(tmp_path / "plain.mp4")]) == 0
    assert main(base + ["-o", str(tmp_path / "flags.mp4"), "--vae", str(tmp_path / "vae.pth"), "--text",
                        str(tmp_path / "text.safetensors")]) == 0
    capsys.readouterr()
    plain, flags = read_video(tmp_path / "plain.mp4")[0], read_video(tmp_path / "flags.mp4")[0]
    assert plain.shape == flags.shape == (6, h, w, 3)
    fp = FacePipeline((32, 32))
    track = fp.track(frames[:6])
    hit = np.zeros((h, w), bool)
    for i in range(6):
        hit |= paste_back(torch.zeros(h, w, 3, dtype=torch.uint8), torch.full((32, 32, 3), 255.0),
                          track.matrices[i], (fp.weight > 0).float())[..., 0].numpy() > 0
    diff = np.abs(plain.astype(np.int16) - flags).mean(-1)
    assert diff[:, hit].mean() > 5, (seed, diff[:, hit].mean())        # another VAE and prompt: another mouth
    ys, xs = np.nonzero(hit)
    box = np.zeros_like(hit)
    box[max(ys.min() - 16, 0):ys.max() + 16, max(xs.min() - 16, 0):xs.max() + 16] = True
    assert diff[:, ~box].mean() < 0.5, (seed, diff[:, ~box].mean())     # same background (up to H.264)

    seen = {}

    def fake_load(cls, checkpoint=None, **kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(lipforcing.Engine, "load", classmethod(fake_load))
    enc = tmp_path / "wav2vec2"
    enc.mkdir()
    assert main(base + ["-o", str(tmp_path / "x.mp4"), "--audio-encoder", str(enc), "--vae",
                        str(tmp_path / "vae.pth"), "--text", str(tmp_path / "text.safetensors")]) == 2
    assert "stop here (with --vae" in capsys.readouterr().err
    assert (seen["audio_encoder"], seen["vae"], seen["text"]) == (str(enc), str(tmp_path / "vae.pth"),
                                                                   str(tmp_path / "text.safetensors"))
