"""``lipforcing train --stage decoder`` (the stage object, a few steps): the loss falls, checkpoints load with
load_decoder (public key names, config in the metadata), resume continues, config mistakes are one clear error."""
from __future__ import annotations

import pytest
import torch

import lipforcing
from lipforcing.decoders.train import DecoderStage, DecoderStageConfig
from lipforcing.distill.errors import TrainConfigError
from lipforcing.distill.stages import stage_classes


def _cfg(tmp_path, **kw):
    fields = dict(size=16, frames=5, batch_size=2, iterations=12, lr=2e-3, output_dir=str(tmp_path / "run"),
                  taehv={"encoder_width": 4, "decoder_widths": [8, 8, 4, 4]}, seed=int(torch.randint(0, 999, ())))
    fields.update(kw)
    return DecoderStageConfig(**fields)


def test_registered_as_a_train_stage():
    assert stage_classes("decoder") == (DecoderStageConfig, DecoderStage)


@pytest.mark.parametrize("target", ["vae", "pixels"])
def test_a_few_steps_reduce_the_loss_and_the_checkpoint_loads(tmp_path, target):
    stage = DecoderStage(_cfg(tmp_path, target=target))
    enc_before = {k: v.clone() for k, v in stage.taehv.encoder.state_dict().items()}
    held_out = [stage.batch(("held-out", i)) for i in range(2)]     # clips the run never trains on

    def held_out_loss():
        with torch.no_grad():
            return sum(float(((stage.taehv.decode_video(z, clamp=False) - t) ** 2).mean()) for z, t in held_out)

    before = held_out_loss()
    ran = stage.train()
    assert len(ran) == 12 and held_out_loss() < 0.95 * before
    for k, v in stage.taehv.encoder.state_dict().items():        # only the decoder is trained
        assert torch.equal(v, enc_before[k])
    ck = tmp_path / "run" / "ckpt-000012" / "decoder.safetensors"
    dec = lipforcing.load_decoder(ck)
    assert dec.config == stage.taehv.config
    z, _ = stage.batch(0)
    with torch.no_grad():
        assert torch.equal(dec.decode_video(z), stage.taehv.decode_video(z))
    # resume: the run continues from iteration 12 with the same weights
    again = DecoderStage(_cfg(tmp_path, target=target, iterations=13, seed=stage.cfg.seed))
    assert again.iteration == 12
    assert torch.equal(again.taehv.decoder[1].weight, stage.taehv.decoder[1].weight)


def test_config_errors(tmp_path):
    with pytest.raises(TrainConfigError, match="frames must be 1 \\+ 4k"):
        _cfg(tmp_path, frames=6)
    with pytest.raises(TrainConfigError, match="target must be"):
        _cfg(tmp_path, target="latents")
    with pytest.raises(TrainConfigError, match="unknown fields \\['spatial_upscale'\\]"):
        _cfg(tmp_path, taehv={"spatial_upscale": [True, True, True]})
    with pytest.raises(TrainConfigError, match="neither a file nor a preset"):
        DecoderStage(_cfg(tmp_path, vae="nope.safetensors"))
    with pytest.raises(TrainConfigError, match="size must be a multiple of the VAE's spatial factor 8"):
        DecoderStage(_cfg(tmp_path, size=20))
