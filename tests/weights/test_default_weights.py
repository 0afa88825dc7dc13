"""The embedded default model: weight bundles (``lipforcing.weights``) and ``Engine.load()`` without a checkpoint.

Every test builds its own small bundle in tmp_path (a 2-block tiny student with perturbed weights, a 4x VAE of
width 2, a random prompt embedding of random length) with ``write_default``, the function that ships the real one.
"""
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import lipforcing
import lipforcing.weights as W
from lipforcing.model.loading import save_model
from lipforcing.vae import VAEConfig, WanVAE
from lipforcing.weights import WeightsError
from tests.stream.helpers import assert_same_frames, drain, reference_frames, speech

BACKEND = "reference"
VAE = VAEConfig(dim=2, z_dim=16, dim_mult=(1, 1, 1), num_res_blocks=1, temporal_downsample=(True, True))


def _student(layers: int = 2):
    net = lipforcing.build_model(lipforcing.ModelConfig.from_name("tiny").replace(num_layers=layers), causal=True)
    with torch.no_grad():          # the zero-initialised layers too: outputs must depend on every weight
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _vae(cfg=VAE):
    net = WanVAE(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return net


def _write(folder, **kw):
    args = dict(student=_student(), vae=_vae(), text=torch.randn(int(torch.randint(3, 12, ())), 32),
                resolution=int(torch.randint(2, 4, ())) * 16, commands=["lipforcing train --stage sf ..."],
                commit="0" * 40, evaluation={"sync": 0.81, "mouth_psnr": 24.5}, name="test-bundle")
    args.update(kw)
    return W.write_default(folder, **args)


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    """A bundle in tmp_path/bundle, made the default through LIPFORCING_DEFAULT_WEIGHTS."""
    m = _write(tmp_path / "bundle")
    monkeypatch.setenv(W.ENV_VAR, str(m.folder))
    return m


def _frames(engine, n_samples: int, ref_seed: int):
    ref = reference_frames(3, engine.resolution[0], seed=ref_seed)
    with engine.session(ref, seed=5) as s:
        s.push_audio(speech(n_samples, seed=1))
        s.end_of_speech()
        return drain(s)


def _same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------ Engine.load()
def test_default_load_equals_loading_the_files_explicitly(bundle, caplog):
    with caplog.at_level(logging.INFO, logger="lipforcing.engine"):
        e = lipforcing.Engine.load(backend=BACKEND)
    lines = [r.getMessage() for r in caplog.records if "default model" in r.getMessage()]
    assert len(lines) == 1 and str(bundle.folder) in lines[0] and "test-bundle" in lines[0], lines
    assert e.manifest == bundle and not e.random_weights and e.decoder is None
    assert e.resolution == bundle.resolution and e.config == bundle.model
    assert isinstance(e.audio, lipforcing.audio.MelFeatures) and e.audio.n_mels == 8
    f = bundle.folder
    explicit = lipforcing.Engine.load(str(f / "student.safetensors"), vae=str(f / "vae.safetensors"),
                                      text=str(f / "text.safetensors"), resolution=bundle.resolution,
                                      backend=BACKEND)
    assert _same_params(e.model, explicit.model) and _same_params(e.vae, explicit.vae)
    torch.testing.assert_close(e.context, explicit.context, rtol=0, atol=0)
    n = 640 * 9 - int(torch.randint(0, 640, ()))                # one chunk (9 frames, the last one partial)
    ref_seed = int(torch.randint(0, 1000, ()))
    out = _frames(e, n, ref_seed)
    assert len(out) == -(-n // 640)
    assert_same_frames(out, _frames(explicit, n, ref_seed))
    # a bundle folder given as the checkpoint loads the same engine
    assert _same_params(lipforcing.Engine.load(str(f), backend=BACKEND).model, e.model)
    # and random weights are something else (so the comparison above can fail)
    rnd = lipforcing.Engine.load(model=bundle.model, vae=str(f / "vae.safetensors"), resolution=bundle.resolution,
                                 text=str(f / "text.safetensors"), backend=BACKEND)
    assert rnd.random_weights and rnd.manifest is None and not _same_params(rnd.model, e.model)
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(out, _frames(rnd, n, ref_seed)))


def test_stored_weights_are_the_given_ones_in_fp16(tmp_path):
    student, vae, text = _student(), _vae(), torch.randn(1, 5, 32)
    m = W.write_default(tmp_path / "b", student=student, vae=vae, text=text, resolution=32)
    assert {e["dtype"] for e in (m.files["student"], m.files["vae"])} == {"float16"}
    got, got_vae = m.load_student().state_dict(), m.load_vae().state_dict()
    for k, v in student.state_dict().items():
        assert torch.equal(got[k], v.half().float()), k
    for k, v in vae.state_dict().items():
        assert torch.equal(got_vae[k], v.half().float()), k
    assert torch.equal(m.load_text(), text)
    assert m.produced_by["commit"] and m.eval == {}
    assert all(os.stat(m.path(p)).st_mode & 0o044 == 0o044 for p in W.PARTS)     # readable package data


def test_no_default_gives_random_tiny_weights(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(W.ENV_VAR, raising=False)
    monkeypatch.setattr(W, "DEFAULT_FOLDER", tmp_path / "empty")          # nothing shipped
    assert W.default_manifest() is None
    with caplog.at_level(logging.WARNING, logger="lipforcing.engine"):
        e = lipforcing.Engine.load(backend=BACKEND, seed=3)
    assert e.random_weights and e.manifest is None and e.resolution == (32, 32)
    assert "random weights of the 'tiny' model" in caplog.text and "no default model shipped" in caplog.text
    assert _same_params(e.model, lipforcing.Engine.load(model="tiny", seed=3, backend=BACKEND).model)


def test_shipped_folder_is_the_default_and_random_weights_stay_reachable(tmp_path, monkeypatch):
    m = _write(tmp_path / "shipped")
    monkeypatch.delenv(W.ENV_VAR, raising=False)
    monkeypatch.setattr(W, "DEFAULT_FOLDER", m.folder)                    # as if shipped in the package
    e = lipforcing.Engine.load(backend=BACKEND)
    assert e.manifest is not None and e.manifest.folder == m.folder and not e.random_weights
    # a named model without a checkpoint, or the default turned off: random weights
    tiny = lipforcing.Engine.load(model="tiny", seed=4, backend=BACKEND)
    assert tiny.random_weights and tiny.manifest is None and tiny.config.num_layers == 4
    monkeypatch.setenv(W.ENV_VAR, "none")
    off = lipforcing.Engine.load(seed=4, backend=BACKEND)
    assert off.random_weights and _same_params(off.model, tiny.model)
    # explicit parts replace the bundle's
    monkeypatch.delenv(W.ENV_VAR)
    text = torch.randn(1, 3, 32)
    e2 = lipforcing.Engine.load(backend=BACKEND, resolution=64, text=text)
    assert e2.resolution == (64, 64) and torch.equal(e2.context, text) and _same_params(e2.model, e.model)
    with pytest.raises(ValueError, match="does not match the model of the bundle"):
        lipforcing.Engine.load(str(m.folder), model="1.3b")


def test_env_var_naming_a_folder_without_a_bundle(tmp_path, monkeypatch):
    monkeypatch.setenv(W.ENV_VAR, str(tmp_path / "nothing"))
    with pytest.raises(WeightsError, match="LIPFORCING_DEFAULT_WEIGHTS=.*nothing: no manifest.json"):
        lipforcing.Engine.load()


# ------------------------------------------------------------------------------------------------ validation
def _edit_manifest(m, fn):
    p = m.folder / W.MANIFEST
    data = json.loads(p.read_text())
    fn(data)
    p.write_text(json.dumps(data))


def _flip_byte(path: Path):
    b = bytearray(path.read_bytes())
    i = len(b) - 1 - int(torch.randint(0, 64, ()))          # inside the tensor data, not the header
    b[i] ^= 0x5A
    path.write_bytes(bytes(b))


CORRUPTIONS = {
    "hash": (lambda m: _flip_byte(m.path("vae")), r"vae\.safetensors: sha256 [0-9a-f]{64} does not match"),
    "truncated": (lambda m: m.path("student").write_bytes(m.path("student").read_bytes()[:-7]),
                  r"student\.safetensors: \d+ bytes, but .* records"),
    "missing": (lambda m: m.path("text").unlink(), r"text\.safetensors: missing \(listed as the text file"),
    "no manifest": (lambda m: (m.folder / W.MANIFEST).unlink(), "manifest.json is missing"),
    "json": (lambda m: (m.folder / W.MANIFEST).write_text("{ not json"), "manifest.json is not readable JSON"),
    "format": (lambda m: _edit_manifest(m, lambda d: d.update(format=2)), "format 2 is not supported"),
    "path": (lambda m: _edit_manifest(m, lambda d: d["files"]["vae"].update(path="../vae.safetensors")),
             "files.vae must be"),
    "parts": (lambda m: _edit_manifest(m, lambda d: d["files"].pop("text")), "must list exactly"),
    "resolution": (lambda m: _edit_manifest(m, lambda d: d.update(resolution=[40, 40])), "invalid resolution"),
    "model": (lambda m: _edit_manifest(m, lambda d: d["model"].update(dim=1 << 20)), "invalid model config"),
    "n_mels": (lambda m: _edit_manifest(m, lambda d: d["audio"].update(n_mels=20)), "2 \\* n_mels = 40 features"),
    "framing": (lambda m: _edit_manifest(m, lambda d: d["audio"].update(hop=160)), "framed differently.*hop 160"),
    "probe": (lambda m: _edit_manifest(m, lambda d: d["audio"]["probe_mean"].__setitem__(3, 1.0 + d["audio"][
        "probe_mean"][3])), "computes different features"),
    "kind": (lambda m: _edit_manifest(m, lambda d: d["audio"].update(kind="wav2vec2")), "kind 'mel'"),
    "probe type": (lambda m: _edit_manifest(m, lambda d: d["audio"].update(probe_mean="x")),
                   "computes different features"),
    "vae config": (lambda m: _edit_manifest(m, lambda d: d["vae"].update(dim_mult="oops")), "invalid VAE config"),
}


@pytest.mark.parametrize("what", sorted(CORRUPTIONS))
def test_broken_bundles_are_errors_naming_the_file(bundle, what):
    damage, message = CORRUPTIONS[what]
    damage(bundle)
    with pytest.raises(WeightsError, match=message):
        W.read_manifest(bundle.folder)
    with pytest.raises(WeightsError):      # the same through Engine.load() (never random weights instead)
        lipforcing.Engine.load()


def _replace_file(m, part: str, write):
    """Swap a bundle file for another one and record its hash, so only the shape checks can catch it."""
    write(m.path(part))
    _edit_manifest(m, lambda d: d["files"][part].update(sha256=W._sha256(m.path(part)),
                                                        bytes=m.path(part).stat().st_size))


def test_files_that_do_not_fit_the_recorded_configs(bundle):
    from safetensors.torch import save_file

    _replace_file(bundle, "student", lambda p: save_model(_student(layers=3), p))
    with pytest.raises(WeightsError, match=r"student\.safetensors does not hold the student the manifest"):
        lipforcing.Engine.load()
    _replace_file(bundle, "student", lambda p: save_model(_student(), p))
    _replace_file(bundle, "vae", lambda p: save_file(WanVAE(VAE.replace(dim=4)).state_dict(), str(p)))
    with pytest.raises(WeightsError, match=r"vae\.safetensors does not hold the VAE the manifest"):
        lipforcing.Engine.load()
    _replace_file(bundle, "vae", lambda p: save_file(WanVAE(VAE).state_dict(), str(p)))
    _replace_file(bundle, "text", lambda p: save_file({"text": torch.randn(1, 4, 31)}, str(p)))
    with pytest.raises(WeightsError, match=r"text\.safetensors: not the \(1, L, text_dim=32\) prompt"):
        lipforcing.Engine.load()
    _replace_file(bundle, "text", lambda p: save_file({"text": torch.randn(1, 4, 32)}, str(p)))
    assert lipforcing.Engine.load(backend=BACKEND).manifest is not None


def test_write_default_inputs(tmp_path):
    from lipforcing.distill import checkpoint as ckpt

    student, vae = _student(), _vae()
    save_model(student, tmp_path / "student.safetensors")
    # a vae stage export: weights + its config in the metadata
    ckpt.save_tensors(vae.state_dict(), tmp_path / "vae.safetensors",
                      {"stage": "vae", "vae_config": json.dumps(vae.config.to_dict())})
    text = torch.randn(7, 32)
    ckpt.save_tensors({"text": text[None]}, tmp_path / "text.safetensors", {})
    run = tmp_path / "runs" / "vae"                        # a run folder: its latest checkpoint's vae.safetensors
    (run / "ckpt-000002").mkdir(parents=True)
    os.replace(tmp_path / "vae.safetensors", run / "ckpt-000002" / "vae.safetensors")
    (run / "latest").write_text("ckpt-000002\n")
    m = W.write_default(tmp_path / "b", student=tmp_path / "student.safetensors", vae=str(run),
                        text=tmp_path / "text.safetensors", resolution=(32, 48),
                        dtype="fp32", commands=["a", "b"], evaluation={"sync": 0.5})
    assert m.produced_by["sources"]["vae"] == str(run / "ckpt-000002" / "vae.safetensors")
    assert m.resolution == (32, 48) and m.produced_by["commands"] == ["a", "b"] and m.eval == {"sync": 0.5}
    assert _same_params(m.load_student(), student) and _same_params(m.load_vae(), vae)
    assert torch.equal(m.load_text(), text[None])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        W.write_default(m.folder, student=student, vae=vae, text=text, resolution=32)
    W.write_default(m.folder, student=student, vae=vae, text=text, resolution=32, overwrite=True)
    with pytest.raises(ValueError, match="multiples of 16"):
        W.write_default(tmp_path / "c", student=student, vae=vae, text=text, resolution=(32, 40))
    with pytest.raises(ValueError, match="text_dim=32"):
        W.write_default(tmp_path / "c", student=student, vae=vae, text=torch.randn(5, 30), resolution=32)
    with pytest.raises(ValueError, match="n_mels 6"):
        W.write_default(tmp_path / "c", student=student, vae=vae, text=text, resolution=32, audio={"n_mels": 6})
    with torch.no_grad():
        next(student.parameters()).view(-1)[0] = 1e6        # beyond fp16's range
    with pytest.raises(WeightsError, match="not finite in the storage dtype"):
        W.write_default(tmp_path / "d", student=student, vae=vae, text=text, resolution=32)
    assert not (tmp_path / "c" / W.MANIFEST).exists() and not (tmp_path / "d" / W.MANIFEST).exists()


# ------------------------------------------------------------------------------------------------ the package
def test_the_package_default_folder_holds_a_valid_bundle_or_none():
    folder = W.DEFAULT_FOLDER
    if (folder / W.MANIFEST).is_file():
        m = W.read_manifest(folder)                          # hashes, configs and the audio front end
        assert m.load_student().config == m.model
        assert sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors") == sorted(
            e["path"] for e in m.files.values()), "weight files in the folder that the manifest does not list"
    else:
        stray = sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []
        assert not stray, f"{folder} holds {stray} but no manifest.json (write it with lipforcing.weights.write_default)"


def test_build_config_ships_the_default_folder():
    """The wheel takes every file under lipforcing/ that git does not ignore (scikit-build-core's wheel.packages
    minus wheel.exclude / sdist.exclude): the bundle's files must not match any of those ignore rules."""
    import pathspec

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[2]
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["scikit-build"]
    assert cfg["wheel"]["packages"]["lipforcing"] == "lipforcing"
    build_rules = [*cfg.get("wheel", {}).get("exclude", []), *cfg.get("sdist", {}).get("exclude", [])]
    names = ("manifest.json", "student.safetensors", "vae.safetensors", "text.safetensors",
             "decoder.safetensors")          # the decoder: optional
    for name in names:
        path = f"lipforcing/weights/default/{name}"
        assert not pathspec.GitIgnoreSpec.from_lines(build_rules).match_file(path), f"{path}: excluded by pyproject"
        # every .gitignore on the way (the root's and any below it), each relative to its own folder
        for folder in [root, *(root / path).parents]:
            ignore = folder / ".gitignore"
            if folder.is_relative_to(root) and ignore.is_file():
                rel = (root / path).relative_to(folder).as_posix()
                spec = pathspec.GitIgnoreSpec.from_lines(ignore.read_text().splitlines())
                assert not spec.match_file(rel), f"{path} is ignored by {ignore}, so it would not be packaged"


@pytest.mark.compile
def test_wheel_ships_the_default_bundle(tmp_path):
    """A real (pure-Python) wheel of the source tree with bundle files dropped into lipforcing/weights/default/."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[2]
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    src = tmp_path / "src"
    for rel in filter(None, listed):
        if (root / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, src / rel)
    W.write_default(src / "lipforcing" / "weights" / "default", student=_student(), vae=_vae(),
                    text=torch.randn(4, 32), resolution=32, overwrite=True)
    env = dict(os.environ, LIPFORCING_CUDA="OFF")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, env=env)
    (whl,) = (tmp_path / "dist").glob("lipforcing-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for name in ("manifest.json", "student.safetensors", "vae.safetensors", "text.safetensors"):
        assert f"lipforcing/weights/default/{name}" in names, f"{name} is not in the wheel"
