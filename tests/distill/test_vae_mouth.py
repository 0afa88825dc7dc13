"""mouth_fidelity: the VAE diagnostics that say whether the mouth survives the round trip."""
import numpy as np
import torch

from lipforcing.distill.stages.vae import mouth_fidelity, stream_mouth_track


class _Stub:
    """encode/decode like a VAE; ``decode`` optionally draws the same grey frame whatever the input (a VAE that
    ignores the mouth) or the frames in reverse order (a mouth that moves, but out of step)."""

    device, dtype = torch.device("cpu"), torch.float32
    temporal_factor = 4

    def __init__(self, mode):
        self.mode = mode

    def encode(self, x, normalize=True):
        return x

    def decode(self, z, normalize=True):
        if self.mode == "constant":
            return torch.zeros_like(z)
        if self.mode == "reverse":
            return z.flip(2)
        if self.mode == "groups":          # keeps only each latent group's average frame: 0, then 1-4, 5-8, ...
            out = z.clone()
            for i in range(1, z.shape[2], 4):
                out[:, :, i:i + 4] = z[:, :, i:i + 4].mean(2, keepdim=True)
            return out
        return z


def test_identity_keeps_the_mouth_and_a_vae_that_ignores_it_scores_zero():
    seeds = [int(s) for s in torch.randint(0, 10**6, (2,))]
    same = mouth_fidelity(_Stub("identity"), seeds, 21, 32, speech="synthetic")
    assert abs(same["mouth_contrast"] - 1) < 1e-6 and abs(same["mouth_track"] - 1) < 1e-6
    const = mouth_fidelity(_Stub("constant"), seeds, 21, 32, speech="synthetic")
    assert const["mouth_contrast"] == 0                   # open and closed clips -> the same frame
    assert np.isnan(const["mouth_track"])                 # constant darkness: no correlation to report
    rev = mouth_fidelity(_Stub("reverse"), seeds, 21, 32, speech="synthetic")
    assert rev["mouth_contrast"] > 0.95 and rev["mouth_track"] < 0.9


def test_warmup_trains_the_frames_after_a_streamed_prefix(monkeypatch):
    """warmup_frames: iteration k renders prefix + frames frames (prefix a multiple of 4 up to warmup_frames) and
    its loss is the loss of frames prefix + 1 .. of the whole-clip reconstruction (the caches the prefix left)."""
    import lipforcing.distill.stages.vae as vs

    cfg = vs.VAEStageConfig(size=32, frames=9, warmup_frames=12, iterations=0, output_dir="/nonexistent/vae",
                            speech="synthetic", latent_l2=0.0, resume=False,
                            vae=dict(dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
                                     temporal_downsample=[True, True]))
    st = vs.VAEStage(cfg)
    seen = []
    real = vs.world_video_batch

    def spy(seeds, frames, size, speech="auto", split="train"):
        seen.append(frames)
        return real(seeds, frames, size, speech, split)

    monkeypatch.setattr(vs, "world_video_batch", spy)
    losses = {}
    for k in range(12):
        monkeypatch.setattr(st, "clip_and_step", lambda name, loss: losses.__setitem__(len(seen), loss.item()) or 0.0)
        st.step(k)
    prefixes = [n - 9 for n in seen]
    assert set(prefixes) <= {0, 4, 8, 12} and len(set(prefixes)) >= 3, prefixes
    # recompute the loss of the last iteration with a prefix from the whole clip
    k = max(i for i, p in enumerate(prefixes) if p)
    prefix = prefixes[k]
    video, box = real([st.seed_of(k, "clip", 0)], prefix + 9, 32, "synthetic")
    with torch.no_grad():
        rec = st.vae.decoder(st.vae.conv2(st.vae.conv1(st.vae.encoder(video))[:, :16]))
    first = prefix + 1 if prefix else 0
    rec, video, box = rec[:, :, first:], video[:, :, first:], box[:, :, first:]
    w = 1.0 + (cfg.mouth_weight - 1.0) * box
    err = rec - video
    want = float((w * (err.abs() + err ** 2)).mean() / w.mean())
    assert abs(losses[k + 1] - want) < 1e-5 * max(1.0, want)


def test_stream_mouth_track_and_its_temporal_ceiling():
    seeds = [int(s) for s in torch.randint(0, 10**6, (2,))]
    same = stream_mouth_track(_Stub("identity"), seeds, 41, 32, speech="synthetic", skip=21)
    assert abs(same["stream_mouth_track"] - 1) < 1e-6
    assert 0 < same["stream_mouth_track_ceiling"] < 0.999          # speech moves the mouth within a latent group
    grp = stream_mouth_track(_Stub("groups"), seeds, 41, 32, speech="synthetic", skip=21)
    assert abs(grp["stream_mouth_track"] - grp["stream_mouth_track_ceiling"]) < 0.02   # uint8 rounding only
    assert grp["stream_mouth_track_ceiling"] == same["stream_mouth_track_ceiling"]
    rev = stream_mouth_track(_Stub("reverse"), seeds, 41, 32, speech="synthetic", skip=21)
    assert rev["stream_mouth_track"] < 0.9
