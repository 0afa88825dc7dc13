"""Wan2.1-compatible causal video VAE with bit-exact streaming encode/decode.

* :class:`WanVAE` — the network (official Wan2.1 module tree and key names), ``encode``/``decode`` of whole clips.
* :class:`StreamEncoder` / :class:`StreamDecoder` — piece-by-piece encode/decode carrying the causal caches
  (``vae.stream_encoder()``, ``vae.stream_decoder()``), bit-equal to the whole-clip methods.
* :class:`VAEConfig` — dimensions, presets ``"wan2.1"`` and ``"tiny"``.
* :func:`load_vae` — official ``Wan2.1_VAE.pth`` / safetensors and diffusers ``AutoencoderKLWan`` folders.
* :class:`LatentDecoder` — the interface a faster decoder implements to be plugged in with ``vae.set_decoder``.
"""
from lipforcing.vae.config import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, VAEConfig
from lipforcing.vae.loading import diffusers_key_map, infer_config, load_vae
from lipforcing.vae.model import WanVAE
from lipforcing.vae.streaming import DecoderStream, LatentDecoder, StreamDecoder, StreamEncoder

__all__ = [
    "VAEConfig", "WanVAE", "load_vae", "StreamEncoder", "StreamDecoder", "LatentDecoder", "DecoderStream",
    "diffusers_key_map", "infer_config", "WAN21_LATENTS_MEAN", "WAN21_LATENTS_STD",
]
