"""Fast latent-to-video decoders behind the engine's stream-decoder interface.

* :class:`TAEHV` / :class:`TAEHVConfig` — the TAEHV tiny video autoencoder (public ``taew2_1`` key names),
  presets ``"taew2_1"`` and ``"tiny"``.
* :class:`TAEHVStreamDecoder` — per-latent streaming decode with a fixed-size state (``reset``, ``decode``,
  ``flush``: the same interface as the Wan VAE's ``stream_decoder()``).
* :func:`load_decoder` — ``taew2_1.pth`` / ``.safetensors`` (and tiny checkpoints saved by ``lipforcing train
  --stage decoder``).
"""
from lipforcing.decoders.loading import load_decoder, save_decoder
from lipforcing.decoders.streaming import TAEHVStreamDecoder
from lipforcing.decoders.taehv import TAEHV, TAEHVConfig
from lipforcing.vae.streaming import StreamingDecoder

__all__ = ["TAEHV", "TAEHVConfig", "TAEHVStreamDecoder", "StreamingDecoder", "load_decoder", "save_decoder"]
