"""Crop warp and paste-back against plain oracles; the round trip crop -> identity generator -> paste-back on real
pictures in 720p frames: PSNR > 40 dB inside the blend region, bit-exact outside it and on faceless frames."""
import numpy as np
import pytest
import torch

from lipforcing.face import FacePipeline, mouth_mask
from lipforcing.face.align import crop_matrix, fit_similarity, invert, warp_to_crop
from lipforcing.face.paste import blend_weight, footprint, paste_back
from tests.face.helpers import astronaut, clip, fresh_rng, procedural_face, psnr

cv2 = pytest.importorskip("cv2")


def random_affine(rng, scale):
    a = rng.uniform(-0.4, 0.4)
    s = scale * rng.uniform(0.8, 1.25)
    return np.array([[s * np.cos(a), -s * np.sin(a), rng.uniform(-5, 5)],
                     [s * np.sin(a), s * np.cos(a), rng.uniform(-5, 5)]])


def test_fit_similarity_recovers_a_similarity():
    rng, seed = fresh_rng()
    S = random_affine(rng, 2.0)
    src = rng.uniform(0, 100, (rng.integers(3, 9), 2))
    np.testing.assert_allclose(fit_similarity(src, src @ S[:, :2].T + S[:, 2]), S, atol=1e-9, err_msg=str(seed))
    np.testing.assert_allclose(invert(invert(S)), S, atol=1e-12)
    with pytest.raises(ValueError, match="coincident"):
        fit_similarity(np.ones((3, 2)), np.zeros((3, 2)))


def test_crop_matrix_puts_anchors_on_the_template():
    rng, _ = fresh_rng()
    anchors = np.array([[17.0, 20.0], [58.0, 20.0], [37.5, 40.0]]) * rng.uniform(1, 4) + rng.uniform(0, 300, 2)
    M = crop_matrix(anchors, (512, 512))
    got = anchors @ M[:, :2].T + M[:, 2]
    # template in a 75 x 100 box, box resized to the 512 x 512 crop (LatentSync's 420 x 560 -> 512 x 512)
    np.testing.assert_allclose(got, [[17 * 512 / 75, 20 * 5.12], [58 * 512 / 75, 20 * 5.12],
                                     [37.5 * 512 / 75, 40 * 5.12]], atol=1e-9)


def test_warp_matches_opencv_bilinear():
    rng, seed = fresh_rng()
    frame = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    M = random_affine(rng, 0.7)                       # frame -> crop (continuous coordinates)
    h, w = 19, 23
    ours = warp_to_crop(torch.from_numpy(frame)[None], M[None], (h, w), mode="bilinear")[0].numpy()
    inv = invert(M)
    Mc = M.copy()
    Mc[:, 2] += M[:, :2] @ [0.5, 0.5] - 0.5           # cv2 uses pixel-centre coordinates
    ref = cv2.warpAffine(frame, Mc, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    # compare where the 2x2 neighbourhood lies inside the frame (the two treat the border differently)
    yy, xx = np.mgrid[0:h, 0:w]
    src = np.stack([xx + 0.5, yy + 0.5], -1) @ inv[:, :2].T + inv[:, 2] - 0.5
    inside = (src[..., 0] >= 0) & (src[..., 0] <= 52) & (src[..., 1] >= 0) & (src[..., 1] <= 36)
    assert inside.sum() > 50
    assert np.abs(ours.astype(int) - ref)[inside].max() <= 1, seed


def paste_oracle(frame, crop, M, weight):
    """Per-pixel loops: crop coordinates of each frame pixel centre, bilinear taps with zeros outside."""
    H, W = frame.shape[:2]
    h, w = crop.shape[:2]
    out = frame.copy()
    src = np.concatenate([crop.astype(np.float64), weight[..., None].astype(np.float64)], -1)
    for i in range(H):
        for j in range(W):
            u, v = M @ [j + 0.5, i + 0.5, 1.0]
            x, y = u - 0.5, v - 0.5
            x0, y0 = int(np.floor(x)), int(np.floor(y))
            acc = np.zeros(4)
            for dy in (0, 1):
                for dx in (0, 1):
                    yy, xx = y0 + dy, x0 + dx
                    if 0 <= yy < h and 0 <= xx < w:
                        acc += (1 - abs(x - xx)) * (1 - abs(y - yy)) * src[yy, xx]
            a = min(max(acc[3], 0.0), 1.0)
            if a > 0:
                out[i, j] = np.clip(np.round(frame[i, j] + a * (acc[:3] - frame[i, j])), 0, 255)
    return out


def test_paste_back_matches_oracle():
    rng, seed = fresh_rng()
    frame = rng.integers(0, 256, (29, 41, 3), dtype=np.uint8)
    crop = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    weight = blend_weight(torch.from_numpy(rng.random((16, 16)) < 0.9) | mouth_mask(16, 16))
    M = random_affine(rng, 0.8)
    M[:, 2] += [-4, -2]
    got = paste_back(torch.from_numpy(frame), torch.from_numpy(crop), M, weight).numpy()
    want = paste_oracle(frame, crop, M, weight.numpy())
    assert np.abs(got.astype(int) - want).max() <= 1, seed
    assert (got == want).mean() > 0.97


def test_blend_weight_is_feathered_inside_the_region():
    m = mouth_mask(128, 128)
    w = blend_weight(m)
    assert w.shape == (128, 128) and w.dtype == torch.float32
    assert (w[~m] == 0).all()                                   # nothing outside the region
    edge = round(float(m.sum()) ** 0.5 / 20)
    assert w.max() == pytest.approx(1.0, abs=1e-5)
    outside = torch.nn.functional.pad((~m).float()[None, None], (edge,) * 4, value=1.0)   # beyond the crop = out
    ring = m & (torch.nn.functional.max_pool2d(outside, 2 * edge + 1, 1)[0, 0] > 0)        # within edge px of it
    assert (w[ring] == 0).all()                                 # exactly 0 within `edge` px of the boundary
    values = w[(w > 0) & (w < 1)]
    assert values.numel() > 100                                 # a soft transition, not a hard edge
    with pytest.raises(ValueError, match="empty"):
        blend_weight(torch.zeros(8, 8, dtype=torch.bool))


def test_footprint():
    M = np.array([[2.0, 0, -20], [0, 2.0, -10]])               # frame (10..42, 5..37) -> a 64 x 64 crop
    assert footprint(M, (64, 64), (100, 100)) == (9, 4, 43, 38)
    assert footprint(M, (64, 64), (20, 30)) == (9, 4, 30, 20)
    assert footprint(np.array([[1.0, 0, 500], [0, 1.0, 0]]), (8, 8), (50, 50)) is None


@pytest.mark.parametrize("region", ["mouth", "face"])
@pytest.mark.parametrize("kind,size", [("astronaut", (720, 1280)), ("procedural", (1280, 720))])
def test_round_trip_identity_generator(kind, size, region):
    """Crops pasted back unchanged reproduce the frame: PSNR > 40 dB where the blend weight is positive, and every
    other pixel bit-exact; a frame whose face was removed comes back bit-exact."""
    rng, seed = fresh_rng()
    src = astronaut() if kind == "astronaut" else procedural_face()
    H, W = size
    frames, _, bg = clip(src, size, 2, rng, start=(0.4 * W, 0.45 * H), end=(0.45 * W, 0.5 * H),
                         scale=(1.6, 1.8), angle=(-5, 5))
    frames = np.concatenate([frames[:1], bg[None], frames[1:]])      # frame 1: the face is gone
    fp = FacePipeline((512, 512), region=region)
    track = fp.track(frames)
    assert track.found.tolist() == [True, False, True]
    crops = fp.crops(frames, track)
    assert crops.shape == (3, 512, 512, 3) and crops.dtype == torch.uint8
    for i in range(len(frames)):
        out = fp.paste(frames[i], crops[i], track, i).numpy()
        if not track.found[i]:
            assert np.array_equal(out, frames[i])
            continue
        hit = paste_back(torch.zeros(H, W, 3, dtype=torch.uint8), torch.full((512, 512, 3), 255.0),
                         track.matrices[i], (fp.weight > 0).float()).numpy()[..., 0] > 0
        assert hit.sum() > 2000
        assert np.array_equal(out[~hit], frames[i][~hit]), seed
        assert psnr(out[hit], frames[i][hit]) > 40, (seed, psnr(out[hit], frames[i][hit]))


def test_generated_mouth_lands_in_the_mouth():
    """A crop painted solid inside the mask changes the frame only around the face's mouth."""
    rng, seed = fresh_rng()
    frames, Gs, _ = clip(astronaut(), (720, 1280), 1, rng, start=(640, 360), end=(640, 360), scale=(2.0, 2.0))
    fp = FacePipeline((256, 256))
    track = fp.track(frames)
    crop = fp.crops(frames, track)[0].clone()
    crop[fp.generate_mask] = torch.tensor([0, 255, 0], dtype=torch.uint8)
    out = fp.paste(frames[0], crop, track, 0).numpy()
    ys, xs = np.nonzero((out != frames[0]).any(-1))
    # the astronaut's mouth is near (118, 137) in the source picture; the placement scales by 2 about its centre
    mouth = Gs[0] @ [118.0, 137.0, 1.0]
    assert abs(np.median(xs) - mouth[0]) < 25 and abs(np.median(ys) - mouth[1]) < 35, (seed, np.median(xs),
                                                                                      np.median(ys), mouth)
