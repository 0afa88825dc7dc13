"""A weight bundle that ships a TAEHV decoder (``decoder.safetensors``, issue 15): written by ``write_default``,
checked by ``read_manifest`` (sha256, fit to the VAE), loaded by ``Manifest.load_decoder`` and used by
``Engine.load()`` unless ``decoder="wan"``.

Every bundle is built in tmp_path from the small parts of test_default_weights.py (a 4x VAE with z_dim 16) plus a
TAEHV of small random widths with random weights (fresh every run).
"""
import hashlib
import json
import logging

import numpy as np
import pytest
import torch

import lipforcing
import lipforcing.weights as W
from lipforcing.decoders import TAEHV, TAEHVConfig, TAEHVStreamDecoder, load_decoder, save_decoder
from lipforcing.weights import WeightsError
from tests.decoders.reference import randomize_
from tests.weights.test_default_weights import BACKEND, _edit_manifest, _flip_byte, _frames, _same_params, _vae, \
    _write


def _taehv(factor: int = 4, latent_channels: int = 16) -> TAEHV:
    """A small TAEHV with random widths and random weights that upsamples ``factor`` x (PyTorch's default random
    initialisation for other than 16 latent channels, test_taehv_model's unit-gain one otherwise)."""
    w = [int(v) for v in torch.randint(2, 7, (5,))]
    cfg = TAEHVConfig.for_spatial_factor(factor, latent_channels=latent_channels, encoder_width=w[0],
                                         decoder_widths=tuple(w[1:]))
    net = TAEHV(cfg)
    if latent_channels == 16:           # randomize_ probes the network with 16 channels
        randomize_(net)
    return net.eval().requires_grad_(False)


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _equal_weights(a: TAEHV, b: TAEHV, cast=None) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sb[k], cast(v) if cast else v) for k, v in sa.items())


# ------------------------------------------------------------------------------------------------ writing/reading
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_round_trip(tmp_path, dtype):
    dec = _taehv()
    m = _write(tmp_path / "b", decoder=dec, dtype=dtype)
    p = tmp_path / "b" / "decoder.safetensors"
    assert m.has_decoder and m.path("decoder") == p and p.is_file()
    entry = m.files["decoder"]
    assert entry == {"path": "decoder.safetensors", "sha256": _sha256(p), "bytes": p.stat().st_size,
                     "dtype": {"fp16": "float16", "fp32": "float32"}[dtype]}
    data = json.loads((m.folder / W.MANIFEST).read_text())
    assert data["format"] == 1 and data["files"]["decoder"] == entry
    assert data["decoder"] == {"latent_channels": 16, "encoder_width": dec.config.encoder_width,
                               "decoder_widths": list(dec.config.decoder_widths),
                               "spatial_upscale": [False, True, True]}
    assert m.decoder_config == dec.config and W.read_manifest(m.folder) == m
    got = m.load_decoder()
    assert isinstance(got, TAEHV) and got.config == dec.config and not got.training
    cast = (lambda v: v.half().float()) if dtype == "fp16" else None
    assert _equal_weights(dec, got, cast)
    assert _equal_weights(dec, m.load_decoder(dtype=torch.float16), lambda v: v.half())
    # the file is a plain decoder checkpoint too: load_decoder reads its config (4x) off the metadata
    again = load_decoder(p)
    assert again.config == dec.config and _equal_weights(got, again)
    z = torch.randn(1, 3, 16, 2, 2)           # (N, T, C, h, w) raw latents
    ref = dec if dtype == "fp32" else TAEHV(dec.config).eval()
    if dtype == "fp16":
        ref.load_state_dict({k: v.half().float() for k, v in dec.state_dict().items()})
    torch.testing.assert_close(got.decode_video(z), ref.decode_video(z), rtol=0, atol=0)


def test_decoder_from_a_file_or_a_decoder_run_folder(tmp_path):
    dec = _taehv()
    save_decoder(dec, tmp_path / "taehv.safetensors")
    m = _write(tmp_path / "a", decoder=tmp_path / "taehv.safetensors", dtype="fp32")
    assert m.produced_by["sources"]["decoder"] == str(tmp_path / "taehv.safetensors")
    assert _equal_weights(dec, m.load_decoder())
    run = tmp_path / "runs" / "decoder"                     # lipforcing train --stage decoder's layout
    (run / "ckpt-000003").mkdir(parents=True)
    save_decoder(dec, run / "ckpt-000003" / "decoder.safetensors")
    (run / "latest").write_text("ckpt-000003\n")
    m = _write(tmp_path / "b", decoder=str(run), dtype="fp32")
    assert m.produced_by["sources"]["decoder"] == str(run / "ckpt-000003" / "decoder.safetensors")
    assert _equal_weights(dec, m.load_decoder())
    with pytest.raises(FileNotFoundError, match="no decoder.safetensors there"):
        _write(tmp_path / "c", decoder=tmp_path / "runs")
    with pytest.raises(TypeError, match="decoder must be a TAEHV"):
        _write(tmp_path / "c", decoder=torch.nn.Linear(2, 2))
    assert not (tmp_path / "c" / W.MANIFEST).exists()


def test_a_changed_decoder_file_is_refused(tmp_path, monkeypatch):
    m = _write(tmp_path / "b", decoder=_taehv())
    monkeypatch.setenv(W.ENV_VAR, str(m.folder))
    _flip_byte(m.path("decoder"))
    with pytest.raises(WeightsError, match=r"decoder\.safetensors: sha256 [0-9a-f]{64} does not match"):
        W.read_manifest(m.folder)
    with pytest.raises(WeightsError, match=r"decoder\.safetensors: sha256"):
        lipforcing.Engine.load(backend=BACKEND)
    m.path("decoder").unlink()
    with pytest.raises(WeightsError, match=r"decoder\.safetensors: missing \(listed as the decoder file"):
        W.read_manifest(m.folder)


@pytest.mark.parametrize("misfit", ["channels", "upscale"])
def test_a_decoder_that_does_not_fit_the_vae_is_refused_at_write(tmp_path, misfit):
    dec = _taehv(latent_channels=4) if misfit == "channels" else _taehv(factor=8)
    message = ("takes 4 latent channels but the VAE has z_dim 16" if misfit == "channels"
               else "upsamples 8x .* 4x smaller")
    with pytest.raises(WeightsError, match=r"b/decoder\.safetensors: the TAEHV decoder " + message):
        _write(tmp_path / "b", decoder=dec)
    save_decoder(dec, tmp_path / "misfit.safetensors")
    with pytest.raises(WeightsError, match=r"misfit\.safetensors: the TAEHV decoder " + message):
        _write(tmp_path / "b", decoder=tmp_path / "misfit.safetensors")
    assert not (tmp_path / "b").exists()                   # nothing written


READ_MISFITS = {
    "channels": (lambda d: d["decoder"].update(latent_channels=4), r"decoder\.safetensors: the TAEHV decoder "
                 "takes 4 latent channels but the VAE has z_dim 16"),
    "upscale": (lambda d: d["decoder"].update(spatial_upscale=[True, True, True]),
                r"decoder\.safetensors: the TAEHV decoder upsamples 8x"),
    "no config": (lambda d: d.pop("decoder"), "files.decoder is listed but the 'decoder' config entry is missing"),
    "no file": (lambda d: d["files"].pop("decoder"), "a 'decoder' config but no decoder file"),
    "bad config": (lambda d: d["decoder"].update(spatial_upscale=[1, 1, 1]), "invalid decoder config"),
    "fields": (lambda d: d["decoder"].pop("encoder_width"), "'decoder' must hold the TAEHVConfig fields"),
    "extra part": (lambda d: d["files"].update(critic=d["files"]["text"]), "must list exactly"),
}


@pytest.mark.parametrize("what", sorted(READ_MISFITS))
def test_a_manifest_whose_decoder_does_not_fit_is_refused_at_read(tmp_path, monkeypatch, what):
    m = _write(tmp_path / "b", decoder=_taehv())
    monkeypatch.setenv(W.ENV_VAR, str(m.folder))
    edit, message = READ_MISFITS[what]
    _edit_manifest(m, edit)
    with pytest.raises(WeightsError, match=message):
        W.read_manifest(m.folder)
    with pytest.raises(WeightsError, match=message):      # never a bundle without its decoder instead
        lipforcing.Engine.load(backend=BACKEND)


def test_a_swapped_decoder_file_is_refused_at_load(tmp_path):
    """A decoder file replaced (and its hash re-recorded) by one of another config: load_decoder names it."""
    m = _write(tmp_path / "b", decoder=_taehv())
    for other in (TAEHV(m.decoder_config.replace(encoder_width=m.decoder_config.encoder_width + 1)),
                  TAEHV(m.decoder_config.replace(spatial_upscale=(True, True, False)))):   # same shapes, other 4x
        save_decoder(other, m.path("decoder"))
        _edit_manifest(m, lambda d: d["files"]["decoder"].update(sha256=_sha256(m.path("decoder")),
                                                                 bytes=m.path("decoder").stat().st_size))
        with pytest.raises(WeightsError, match=r"decoder\.safetensors does not hold the TAEHV decoder the manifest"):
            W.read_manifest(m.folder).load_decoder()


def test_a_bundle_without_decoder_is_unchanged(tmp_path, monkeypatch):
    m = _write(tmp_path / "b")
    data = json.loads((m.folder / W.MANIFEST).read_text())
    assert data["format"] == 1 and "decoder" not in data and sorted(data["files"]) == sorted(W.PARTS)
    assert not m.has_decoder and m.decoder_config is None and m.load_decoder() is None
    monkeypatch.setenv(W.ENV_VAR, str(m.folder))
    assert lipforcing.Engine.load(backend=BACKEND).decoder_name == "wan-vae"
    # an existing (pre-decoder) manifest as it was written: no "decoder" key at all, PARTS only
    m2 = _write(tmp_path / "c", decoder=_taehv())
    _edit_manifest(m2, lambda d: (d.pop("decoder"), d["files"].pop("decoder")))
    m2.path("decoder").unlink()
    old = W.read_manifest(m2.folder)
    assert not old.has_decoder and old.load_decoder() is None
    # overwriting a bundle that had a decoder with one that has none removes the old decoder file
    _write(tmp_path / "d", decoder=_taehv())
    _write(tmp_path / "d", overwrite=True)
    assert not (tmp_path / "d" / "decoder.safetensors").exists() and not W.read_manifest(tmp_path / "d").has_decoder


# ------------------------------------------------------------------------------------------------ Engine.load()
def test_engine_decodes_with_the_bundled_decoder_unless_told_wan(tmp_path, monkeypatch, caplog):
    dec = _taehv()
    m = _write(tmp_path / "b", decoder=dec, dtype="fp32")
    monkeypatch.setenv(W.ENV_VAR, str(m.folder))
    with caplog.at_level(logging.INFO, logger="lipforcing.engine"):
        e = lipforcing.Engine.load(backend=BACKEND)
    lines = [r.getMessage() for r in caplog.records if "default model" in r.getMessage()]
    assert len(lines) == 1 and "decoded by the bundle's TAEHV decoder" in lines[0], lines
    assert e.decoder_name == "taehv" and e.manifest == m and _equal_weights(dec, e.decoder)
    assert isinstance(e.stream_decoder(), TAEHVStreamDecoder)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lipforcing.engine"):
        wan = lipforcing.Engine.load(backend=BACKEND, decoder="wan")
    lines = [r.getMessage() for r in caplog.records if "default model" in r.getMessage()]
    assert len(lines) == 1 and "decoded by the Wan VAE decoder (decoder='wan'" in lines[0], lines
    assert wan.decoder_name == "wan-vae" and wan.decoder is None and _same_params(wan.model, e.model)
    # the bundle folder given as the checkpoint: the same
    assert lipforcing.Engine.load(str(m.folder), backend=BACKEND).decoder_name == "taehv"
    assert lipforcing.Engine.load(str(m.folder), backend=BACKEND, decoder="wan").decoder_name == "wan-vae"
    # another VAE given: the bundle's decoder (trained on the bundle VAE's latents) is not used
    assert lipforcing.Engine.load(backend=BACKEND, vae=_vae()).decoder_name == "wan-vae"
    # same frame accounting either way, different pictures
    n = 640 * int(torch.randint(9, 14, ())) - int(torch.randint(0, 640, ()))
    ref_seed = int(torch.randint(0, 1000, ()))
    a, b = _frames(e, n, ref_seed), _frames(wan, n, ref_seed)
    assert len(a) == len(b) == -(-n // 640)
    for fa, fb in zip(a, b):
        assert (fa.index, fa.pts, fa.chunk_id) == (fb.index, fb.pts, fb.chunk_id)
        np.testing.assert_array_equal(fa.audio, fb.audio)
        assert fa.image.shape == fb.image.shape == (*m.resolution, 3)
    assert any(not np.array_equal(fa.image, fb.image) for fa, fb in zip(a, b))
    # the TAEHV frames are those of the bundle's decoder given explicitly
    f = m.folder
    explicit = lipforcing.Engine.load(str(f / "student.safetensors"), vae=str(f / "vae.safetensors"),
                                      text=str(f / "text.safetensors"), resolution=m.resolution, backend=BACKEND,
                                      decoder=str(f / "decoder.safetensors"))
    for fa, fc in zip(a, _frames(explicit, n, ref_seed)):
        np.testing.assert_array_equal(fa.image, fc.image)
