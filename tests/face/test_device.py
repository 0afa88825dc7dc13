"""The face stage's torch part (crop warp, paste-back) on the engine's device: on CUDA it gives the CPU's result
(within one grey level, where float rounding can differ), frames without a face and pixels outside the blend
region stay bit-exact, and an engine on that device keeps its face stage there.  The "cpu" case runs the same code
everywhere; the "cuda" case needs a GPU (``-m gpu``)."""
import numpy as np
import pytest
import torch

import lipforcing
from lipforcing.face import FacePipeline, pingpong_index
from lipforcing.face.paste import paste_back
from tests.face.helpers import astronaut, clip, fresh_rng

pytest.importorskip("cv2")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def blend_region(fp, matrix, shape) -> np.ndarray:
    hit = paste_back(torch.zeros(*shape, dtype=torch.uint8), torch.full(fp.resolution + (3,), 255.0), matrix,
                     (fp.weight > 0).float().cpu())
    return hit[..., 0].numpy() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_crop_and_paste_on_the_device(device):
    rng, seed = fresh_rng()
    frames, _, bg = clip(astronaut(), (720, 1280), 2, rng, start=(600, 340), end=(620, 350), scale=(1.8, 1.9),
                         angle=(-4, 4))
    frames = np.concatenate([frames[:1], bg[None], frames[1:]])          # frame 1 has no face
    cpu = FacePipeline((512, 512))
    dev = FacePipeline((512, 512), device=device)
    track = cpu.track(frames)
    assert track.found.tolist() == [True, False, True], seed
    want = cpu.crops(frames, track)
    got = dev.crops(frames, track)
    assert got.device.type == device and got.dtype == torch.uint8
    diff = (got.cpu().int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (seed, int(diff.max()))
    # a generated crop: the CPU crop with noise, pasted on both devices
    gen = (want.int() + torch.randint(-40, 41, want.shape, dtype=torch.int32)).clamp(0, 255).to(torch.uint8)
    for i in range(len(frames)):
        ref = cpu.paste(frames[i], gen[i], track, i).numpy()
        out = dev.paste(torch.from_numpy(frames[i]).to(device), gen[i].to(device), track, i)
        assert out.device.type == device
        out = out.cpu().numpy()
        if not track.found[i]:
            assert np.array_equal(out, frames[i])                         # no face: bit-exact
            continue
        region = blend_region(cpu, track.matrices[i], frames[i].shape)
        assert np.array_equal(out[~region], frames[i][~region]), seed     # outside the blend: bit-exact
        d = np.abs(out.astype(int) - ref)
        assert d.max() <= 1 and (d[region] > 0).mean() < 0.01, (seed, d.max())
        assert (out[region] != frames[i][region]).any()                   # the noisy crop was pasted in


@pytest.mark.parametrize("device", DEVICES)
def test_engine_face_stage_on_the_device(device):
    """A full-frame session on an engine on ``device``: the face stage runs there, Frame.image is the full frame
    with only the blend region changed, a faceless frame passes through."""
    rng, seed = fresh_rng()
    frames, _, bg = clip(astronaut(), (360, 640), 6, rng, start=(280, 170), end=(300, 180), scale=(1.0, 1.05))
    frames[3] = bg
    e = lipforcing.Engine.load(model="tiny", seed=0, device=device, dtype="fp32",
                               backend="reference" if device == "cpu" else "auto")
    try:
        s = e.session(frames)
        fp, track = s.face.pipeline, s.face.track
        assert fp.device.type == device and fp.weight.device.type == device
        s.push_audio(np.random.default_rng(seed).normal(0, 0.1, 9600).astype(np.float32))
        s.end_of_speech()
        out = list(s.frames())
        s.close()
    finally:
        e.close()
    assert len(out) == 15
    for f in out:
        i = pingpong_index(f.index, len(frames))
        assert f.image.shape == (360, 640, 3) and f.face.shape == (32, 32, 3)
        if i == 3:
            assert np.array_equal(f.image, frames[3]), seed
            continue
        region = blend_region(fp, track.matrices[i], (360, 640, 3))
        assert np.array_equal(f.image[~region], frames[i][~region]), seed
