"""SyncNet v2: layout / state-dict compatibility, weight loading, offset search (LSE-C / LSE-D), reward weight."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from lipforcing.distill import SyncNet
from lipforcing.distill.syncnet import (offset_distances, score_embeddings, sync_confidence, sync_embeddings,
                                        sync_reward_weight)


# ---------------------------------------------------------------------------------------------------------------
# The public SyncNet v2 layout (joonson/syncnet_python SyncNetModel.S), written out from its layer list:
# Sequential index -> (kind, shape of weight).  BatchNorm entries carry weight/bias/running stats of size C.

def _expected_layout(embed=1024):
    conv_aud = {0: (1, 64, 3, 3), 4: (64, 192, 3, 3), 8: (192, 384, 3, 3), 11: (384, 256, 3, 3),
                14: (256, 256, 3, 3), 18: (256, 512, 5, 4)}
    conv_lip = {0: (3, 96, 5, 7, 7), 4: (96, 256, 1, 5, 5), 8: (256, 256, 1, 3, 3), 11: (256, 256, 1, 3, 3),
                14: (256, 256, 1, 3, 3), 18: (256, 512, 1, 6, 6)}
    keys = {}
    for stack, convs in (("netcnnaud", conv_aud), ("netcnnlip", conv_lip)):
        for i, (cin, cout, *k) in convs.items():
            keys[f"{stack}.{i}.weight"] = (cout, cin, *k)
            keys[f"{stack}.{i}.bias"] = (cout,)
            for s in ("weight", "bias", "running_mean", "running_var"):   # BatchNorm right after each conv
                keys[f"{stack}.{i + 1}.{s}"] = (cout,)
            keys[f"{stack}.{i + 1}.num_batches_tracked"] = ()
    for stack in ("netfcaud", "netfclip"):      # Linear(512,512), BatchNorm1d(512), ReLU, Linear(512, embed)
        keys[f"{stack}.0.weight"] = (512, 512)
        keys[f"{stack}.0.bias"] = (512,)
        for s in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{stack}.1.{s}"] = (512,)
        keys[f"{stack}.1.num_batches_tracked"] = ()
        keys[f"{stack}.3.weight"] = (embed, 512)
        keys[f"{stack}.3.bias"] = (embed,)
    return keys


def test_state_dict_layout_matches_v2():
    sd = SyncNet().state_dict()
    expected = _expected_layout()
    assert set(sd) == set(expected)
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    # 13.6 M parameters (the 54.5 MB of float32 storage of syncnet_v2.model)
    assert sum(p.numel() for p in SyncNet().parameters()) == 13_631_616


def test_forward_shapes():
    net = SyncNet(embed_dim=32).eval()
    with torch.no_grad():
        assert net.forward_aud(torch.randn(3, 1, 13, 20)).shape == (3, 32)
        assert net.forward_lip(torch.rand(2, 3, 5, 224, 224) * 255).shape == (2, 32)
    with pytest.raises(ValueError, match="13, 20"):
        net.forward_aud(torch.randn(3, 13, 20))
    with pytest.raises(ValueError, match="224"):
        net.forward_lip(torch.randn(1, 3, 5, 112, 112))


# ---------------------------------------------------------------------------------------------------------------
# loading

def _randomized(net):
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t).abs() + 0.1)
    return net


def test_from_file_roundtrip_old_style_file(tmp_path):
    src = _randomized(SyncNet(embed_dim=64))
    # old PyTorch files have no num_batches_tracked; SyncNetInstance state dicts carry a "__S__." prefix
    sd = {"__S__." + k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "syncnet_v2.model", _use_new_zipfile_serialization=False)   # pre-1.6 format
    net = SyncNet.from_file(tmp_path / "syncnet_v2.model")
    assert not net.training and net.embed_dim == 64
    for k, v in src.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(net.state_dict()[k], v), k


def test_from_file_safetensors(tmp_path):
    from safetensors.torch import save_file
    src = _randomized(SyncNet(embed_dim=16))
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "s.safetensors")
    net = SyncNet.from_file(tmp_path / "s.safetensors")
    assert torch.equal(net.netfclip[3].weight, src.netfclip[3].weight)


def test_from_file_refuses_pickled_module(tmp_path):
    torch.save(SyncNet(embed_dim=8), tmp_path / "full.model")
    with pytest.raises(ValueError, match="pickled"):
        SyncNet.from_file(tmp_path / "full.model")


def test_from_file_wrong_keys(tmp_path):
    sd = SyncNet(embed_dim=8).state_dict()
    sd.pop("netcnnlip.18.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="netcnnlip.18.weight"):
        SyncNet.from_file(tmp_path / "bad.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="SyncNet v2"):
        SyncNet.from_file(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        SyncNet.from_file(tmp_path / "nope.model")


# ---------------------------------------------------------------------------------------------------------------
# offset search

def _calc_pdist_loop(f1, f2, vshift):
    """syncnet_python's calc_pdist + mean, written from its description: zero-pad the audio features by vshift
    on both sides; video i is compared with padded audio i .. i + 2 vshift; mean over i per offset."""
    n, d = f1.shape
    f2p = torch.cat([torch.zeros(vshift, d), f2, torch.zeros(vshift, d)])
    rows = []
    for i in range(n):
        rows.append(torch.stack([torch.norm(f1[i] - f2p[i + k] + 1e-6) for k in range(2 * vshift + 1)]))
    return torch.stack(rows).mean(0)


def _overlap_loop(f1, f2, vshift):
    n = f1.shape[0]
    out = []
    for s in range(-vshift, vshift + 1):
        pairs = [torch.norm(f1[i] - f2[i + s] + 1e-6) for i in range(n) if 0 <= i + s < n]
        out.append(torch.stack(pairs).mean())
    return torch.stack(out)


@pytest.mark.parametrize("n,vshift", [(25, 15), (7, 3), (40, 0), (5, 9)])
def test_offset_distances_match_loops(n, vshift):
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, 12, generator=g), torch.randn(n, 12, generator=g)
    torch.testing.assert_close(offset_distances(a, b, vshift), _calc_pdist_loop(a, b, vshift))
    if n > vshift:
        torch.testing.assert_close(offset_distances(a, b, vshift, padding="overlap"), _overlap_loop(a, b, vshift))


@pytest.mark.parametrize("lag", [-12, -3, 0, 5, 15])
def test_offset_sign_convention(lag):
    """Video lagging the audio by `lag` frames (lip[i] looks like aud[i - lag]) gives offset == lag."""
    n, vshift = 40, 15
    g = torch.Generator().manual_seed(lag + 100)
    aud = torch.randn(n + 40, 8, generator=g)
    lip = aud[20 - lag:20 - lag + n]
    aud = aud[20:20 + n]
    for padding in ("zeros", "overlap"):
        md = offset_distances(lip, aud, vshift, padding=padding)
        assert vshift - int(md.argmin()) == lag


# ---------------------------------------------------------------------------------------------------------------
# end to end with a hand-built SyncNet: lip embedding = "mouth open in any of frames d..d+2" (d = 0, 1, 2),
# audio embedding = "loud in MFCC frames 4d..4d+6" (the max-pooled c0 = log energy, thresholded)

def _hand_built_syncnet():
    net = SyncNet(embed_dim=16)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for m in net.modules():                      # BatchNorm: identity in eval mode (running mean 0, var 1)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.fill_(1.0)
        lip = net.netcnnlip                          # channel j carries the mean brightness of frame j
        for j in range(5):
            lip[0].weight[j, :, j] = 1.0 / (3 * 49)
            lip[4].weight[j, j, 0] = 1.0 / 25
            for i in (8, 11, 14):
                lip[i].weight[j, j, 0] = 1.0 / 9
            lip[18].weight[j, j, 0] = 1.0 / 36
        aud = net.netcnnaud                          # channel 0 carries the MFCC map (max-pooled)
        for i in (0, 4, 8, 11, 14):
            aud[i].weight[0, 0, 1, 1] = 1.0
        for d in range(3):
            aud[18].weight[d, 0, 0, d] = 1.0         # pooled row 0 (c0..c4), time column d
        fa, fl = net.netfcaud, net.netfclip          # e_d = relu(z) - relu(z - 1): a saturating threshold
        for d in range(3):
            fa[0].weight[2 * d, d] = fa[0].weight[2 * d + 1, d] = 1.0
            fa[0].bias[2 * d], fa[0].bias[2 * d + 1] = -16.0, -17.0      # loud frames have c0 ~ 20
            for k in range(3):
                fl[0].weight[2 * d, d + k] = fl[0].weight[2 * d + 1, d + k] = 2.0 / 255
            fl[0].bias[2 * d + 1] = -1.0
            for f in (fa, fl):
                f[3].weight[d, 2 * d], f[3].weight[d, 2 * d + 1] = 1.0, -1.0
    return net


def _clip(T, seed):
    """Mouth open (white frame) exactly while the audio is loud (noise bursts), closed (black) in silence."""
    g = np.random.default_rng(seed)
    open_ = np.zeros(T, bool)
    t, state = 0, False
    while t < T:
        r = int(g.integers(2, 6))
        open_[t:t + r] = state
        state, t = not state, t + r
    frames = np.zeros((T, 48, 48, 3), np.uint8)
    frames[open_] = 255
    noise = (g.standard_normal(T * 640) * 3000).astype(np.int16)
    loud = np.repeat(open_, 640)
    loud[:-16] &= loud[16:]        # end each burst 16 samples early: no pre-emphasis echo in the next frame
    audio = np.where(loud, noise, 0).astype(np.int16)
    return frames, audio


def _delayed(T, lag, seed=0, start=15):
    """T frames and T * 640 samples of a longer synced clip; the video lags the audio by `lag` frames."""
    frames, audio = _clip(T + 2 * start, seed)
    return frames[start - lag:start - lag + T], audio[start * 640:(start + T) * 640]


def test_sync_confidence_aligned_vs_shifted():
    net = _hand_built_syncnet().train()              # evaluation must switch to eval mode and back
    T = 26
    aligned, audio = _delayed(T, 0)
    shifted, audio2 = _delayed(T, 10)
    assert np.array_equal(audio, audio2)
    score = sync_confidence(net, np.stack([aligned, shifted]), np.stack([audio, audio]))
    assert net.training
    assert score.confidence.shape == score.distance.shape == score.offset.shape == (2,)
    assert score.mean_dists.shape == (2, 31)
    assert int(score.offset[0]) == 0
    assert score.confidence[0] > score.confidence[1] + 0.2
    assert score.distance[0] < 1e-3 < score.distance[1]
    # LSE-C is median - min of the per-offset mean distances; LSE-D the min
    for b in range(2):
        md = score.mean_dists[b]
        torch.testing.assert_close(score.confidence[b], md.median() - md.min())
        torch.testing.assert_close(score.distance[b], md.min())


def test_best_offset_recovers_shift():
    net = _hand_built_syncnet().eval()
    frames, audio = _delayed(26, -6, seed=1)         # video leads the audio by 6 frames
    lip, aud = sync_embeddings(net, frames, audio)
    assert lip.shape == aud.shape == (21, 16)
    score = score_embeddings(lip, aud)
    assert int(score.offset) == -6
    # at that offset every real (overlapping) pair of windows matches exactly; k = vshift - offset
    assert float(offset_distances(lip, aud, 15, padding="overlap")[15 + 6]) < 1e-3


def test_float_audio_is_scaled_like_int16():
    net = _hand_built_syncnet()
    frames, audio = _clip(8, seed=2)
    a = sync_confidence(net, frames, audio, vshift=2)
    b = sync_confidence(net, torch.from_numpy(frames), torch.from_numpy(audio.astype(np.float32) / 32768), vshift=2)
    assert a.confidence.shape == () and a.mean_dists.shape == (5,)
    torch.testing.assert_close(a.mean_dists, b.mean_dists, atol=1e-4, rtol=1e-4)


def test_sync_confidence_input_errors():
    net = SyncNet(embed_dim=8)
    frames = np.zeros((10, 32, 32, 3), np.uint8)
    audio = np.zeros(6400, np.int16)
    with pytest.raises(TypeError, match="uint8"):
        sync_confidence(net, frames.astype(np.float32), audio)
    with pytest.raises(ValueError, match="frames"):
        sync_confidence(net, np.zeros((10, 32, 32), np.uint8), audio)
    with pytest.raises(ValueError, match="audio"):
        sync_confidence(net, frames, np.zeros((2, 6400), np.int16))
    with pytest.raises(ValueError, match="at least"):
        sync_confidence(net, frames[:5], audio)
    with pytest.raises(ValueError, match="non-finite"):
        sync_confidence(net, frames, np.full(6400, np.nan, np.float32))
    with pytest.raises(TypeError, match="SyncNet"):
        sync_confidence(nn.Linear(1, 1), frames, audio)


# ---------------------------------------------------------------------------------------------------------------
# reward

def test_reward_weight_value_and_no_grad():
    c = torch.tensor([0.0, 1.5, 7.0], requires_grad=True)
    w = sync_reward_weight(c * 1.0)
    assert not w.requires_grad and w.grad_fn is None
    torch.testing.assert_close(w, torch.exp(2.0 * c.detach()))
    torch.testing.assert_close(sync_reward_weight(torch.tensor(1.0), beta=0.5), torch.tensor(np.exp(0.5)).float())
    assert float(sync_reward_weight(3)) == pytest.approx(np.exp(6.0), rel=1e-6)
    # used as a loss weight it passes no gradient back to the confidence
    loss_per_sample = torch.ones(3, requires_grad=True)
    (sync_reward_weight(c * 2) * loss_per_sample).sum().backward()
    assert c.grad is None
    torch.testing.assert_close(loss_per_sample.grad, torch.exp(4.0 * c.detach()))
