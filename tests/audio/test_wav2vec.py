"""Wav2VecFeatures on a tiny random-init wav2vec 2.0 saved to a temp dir (nothing is downloaded)."""
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model  # noqa: E402

from lipforcing.audio import AudioFeatures, FeatureStream, Wav2VecFeatures  # noqa: E402

HIDDEN, LAYERS = 24, 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=48,
                         conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    d = tmp_path_factory.mktemp("w2v")
    Wav2Vec2Model(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def fe(model_dir):
    return Wav2VecFeatures(model_dir, window_frames=12, lookahead_frames=2, block_frames=1)


def _oracle(model_dir, x: torch.Tensor) -> torch.Tensor:
    """The paper's recipe written out step by step (independent of lipforcing.audio)."""
    m = Wav2Vec2Model.from_pretrained(model_dir).eval()
    norm = Wav2Vec2FeatureExtractor(do_normalize=True, sampling_rate=16000)
    v = torch.tensor(norm(x.numpy(), sampling_rate=16000).input_values[0], dtype=torch.float32)
    n = math.ceil(x.numel() / 640)                       # video frames
    v = F.pad(v, (0, n * 640 - v.numel()))[None]
    with torch.no_grad():
        cnn = m.feature_extractor(v)                     # (1, C, 50 Hz frames)
        cnn = F.interpolate(cnn, size=n, mode="linear", align_corners=True).transpose(1, 2)
        h, _ = m.feature_projection(cnn)
        enc = m.encoder
        h = enc.layer_norm(h + enc.pos_conv_embed(h))
        states = [h]
        for layer in enc.layers:
            out = layer(h)
            h = out[0] if isinstance(out, tuple) else out
            states.append(h)
    return torch.cat([h] + states, dim=-1)[0]            # last_hidden_state, then all hidden states


def test_feature_dim_from_config(fe):
    assert fe.feature_dim == (LAYERS + 2) * HIDDEN
    base = Wav2Vec2Config()                              # wav2vec2-base: 12 layers x 768
    assert (base.num_hidden_layers + 2) * base.hidden_size == 10752
    assert isinstance(fe, AudioFeatures) and isinstance(fe.stream(), FeatureStream)


@pytest.mark.parametrize("n", [640 * 7, 640 * 9 + 123, 700])
def test_frames_match_recipe(model_dir, fe, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.1 + 0.01
    got = fe.frames(x)
    assert got.shape == (math.ceil(n / 640), fe.feature_dim)
    torch.testing.assert_close(got, _oracle(model_dir, x), rtol=1e-4, atol=1e-4)


def test_empty(fe):
    assert fe.frames(torch.zeros(0)).shape == (0, fe.feature_dim)


@pytest.mark.parametrize("block,max_push", [(1, 2500), (3, 2500), (2, 10**6)])
def test_stream_matches_windowed_clip(fe, block, max_push):
    """Each streamed frame equals fe.frames on its documented window (bounded context), for any push split."""
    W, la, P = 12, 2, 640
    g = torch.Generator().manual_seed(block)
    x = torch.randn(P * 31 + 200, generator=g) * 0.1
    s = fe.stream(block_frames=block)
    out, i = [], 0
    while i < x.numel():
        k = int(torch.randint(1, max_push, (1,), generator=g))
        out.append(s.push(x[i:i + k]))
        i += k
        assert s._buf.data.numel() <= (W + 2) * P + max_push      # bounded history
    out.append(s.flush())
    got = torch.cat(out)
    n = math.ceil(x.numel() / P)
    assert got.shape == (n, fe.feature_dim)
    for f in range(n):
        u = f - f % block
        e = u + block + la
        st = max(0, e - W)
        ref = fe.frames(x[st * P:min(e, n) * P])[f - st]
        torch.testing.assert_close(got[f], ref, rtol=1e-4, atol=1e-4)
    # late frames really use a bounded window: they differ from the whole-utterance encoding
    assert not torch.allclose(got[n // 2], fe.frames(x)[n // 2], atol=1e-3)


def test_stream_emission_schedule(fe):
    s = fe.stream()                     # window 12, lookahead 2, block 1
    assert fe.lookahead_samples == 2 * 640
    assert s.push(torch.randn(640 * 3 - 1) * 0.1).shape[0] == 0
    assert s.push(torch.randn(1) * 0.1).shape[0] == 1
    assert s.push(torch.randn(640 * 2) * 0.1).shape[0] == 2
    assert s.flush().shape[0] == 2      # the two lookahead frames
    assert s.frames_emitted == 5


def test_errors(model_dir, tmp_path):
    with pytest.raises(ValueError, match="local_dir"):
        Wav2VecFeatures(tmp_path / "missing")
    with pytest.raises(ValueError, match="window_frames"):
        Wav2VecFeatures(model_dir, window_frames=2, lookahead_frames=2, block_frames=1)
    fe = Wav2VecFeatures(model_dir)
    with pytest.raises(ValueError, match="1-D"):
        fe.frames(torch.zeros(1, 640))
