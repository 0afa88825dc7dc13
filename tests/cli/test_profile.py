"""`lipforcing profile`: the JSON document, the plot, the FLOP count and the errors (tiny preset, CPU)."""
import json

import pytest
import torch

from lipforcing import ModelConfig
from lipforcing.cli import main
from lipforcing.engine import STAGES
from lipforcing.profiling import StageTimer, chunk_key_frames, dit_pass_flops

TOP_LEVEL = ("schema", "model", "preset", "random_weights", "config", "device", "dtype", "backend", "compile",
             "cuda_graphs", "threads", "timer", "resolution", "latent_size", "tokens_per_latent_frame", "chunk_frames",
             "first_chunk_frames", "chunks", "frames", "wall_s", "fps", "steady_state_fps", "realtime_factor",
             "time_to_first_frame_s", "algorithmic_latency_s", "latency", "chunk_latency_ms", "per_chunk_ms",
             "stages", "stage_sum_ms", "chunk_span_sum_ms", "stage_coverage", "dit", "memory", "warmup",
             "environment")


@pytest.fixture(scope="module")
def profile_doc(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    js, png = out / "p.json", out / "p.png"
    n = torch.get_num_threads()
    try:
        rc = main(["profile", "--model", "tiny", "--device", "cpu", "--chunks", "4", "--warmup", "1", "--json",
                   str(js), "--plot", str(png), "--no-progress"])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    return json.loads(js.read_text()), png


def test_json_has_every_field(profile_doc):
    doc, _ = profile_doc
    for key in TOP_LEVEL:
        assert key in doc, key
    for key in ("gpu", "torch", "triton", "cuda", "commit", "date"):
        assert key in doc["environment"], key
    for key in ("p50", "p90", "p99", "mean", "min", "max"):
        assert key in doc["chunk_latency_ms"], key
    for key in ("flops_total", "flops_per_chunk_steady", "flops_per_pass_steady", "time_ms", "achieved_tflops"):
        assert key in doc["dit"], key
    for key in ("peak_bytes", "kind", "weights_bytes", "kv_cache_bytes"):
        assert key in doc["memory"], key
    assert set(doc["stages"]) == set(STAGES)
    assert doc["device"] == "cpu" and doc["timer"] == "perf_counter" and doc["random_weights"]


def test_values_are_sane(profile_doc):
    doc, _ = profile_doc
    assert doc["chunks"] == 4 and doc["frames"] == 9 + 3 * 12      # first chunk 9 frames, then 12
    assert len(doc["per_chunk_ms"]) == 4
    assert doc["fps"] > 0 and doc["steady_state_fps"] > 0 and doc["wall_s"] > 0
    assert 0 < doc["time_to_first_frame_s"] < doc["wall_s"]
    lat = doc["chunk_latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    # frames out / wall time cannot beat frames / (sum of chunk compute)
    assert doc["fps"] <= doc["frames"] / (doc["chunk_span_sum_ms"] / 1e3) * 1.001
    # the stages tile the chunk: their sum is within 10 % of the chunk's time, per chunk and in total
    for i, span in enumerate(doc["per_chunk_ms"]):
        total = sum(doc["stages"][s]["per_chunk_ms"][i] for s in STAGES)
        assert abs(total - span) <= 0.1 * span, (i, total, span)
    assert abs(doc["stage_sum_ms"] - doc["chunk_span_sum_ms"]) <= 0.1 * doc["chunk_span_sum_ms"]
    assert abs(sum(s["share"] for s in doc["stages"].values()) - 1) < 1e-6
    for s in STAGES:
        assert doc["stages"][s]["total_ms"] > 0, s
    assert doc["dit"]["achieved_tflops"] > 0 and doc["dit"]["flops_total"] > 0
    assert doc["memory"]["peak_bytes"] > doc["memory"]["weights_bytes"] > 0
    assert doc["warmup"]["chunks"] == 1 and doc["warmup"]["seconds"] > 0


def test_plot_is_a_png(profile_doc):
    _, png = profile_doc
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_flops_match_the_published_arithmetic():
    # /work/shared/notes/kernels.md section C, one pass over a 3072-token chunk with a 12-frame (12288-key) window
    # and a 512-token prompt: 1.3B 7.68 (linear) + 6.96 (self) + 0.29 (text) = 14.95 TFLOP; 14B 105.7 TFLOP.
    for name, linear, self_attn, text, total in (("1.3b", 7.68e12, 6.96e12, 0.29e12, 14.95e12),
                                                 ("14b", 73.44e12, 30.92e12, 1.29e12, 105.7e12)):
        f = dit_pass_flops(ModelConfig.from_name(name), q_tokens=3072, k_tokens=12288, text_tokens=512)
        assert f["linear"] == pytest.approx(linear, rel=0.01)
        assert f["self_attn"] == pytest.approx(self_attn, rel=0.01)
        assert f["cross_attn_text"] == pytest.approx(text, rel=0.02)
        assert f["total"] == pytest.approx(total, rel=0.01)      # embedding, head and audio are < 1 %
    # the student's own window (1 sink + 6 frames = 7168 keys): only the self-attention term shrinks
    cfg = ModelConfig.from_name("1.3b")
    a = dit_pass_flops(cfg, q_tokens=3072, k_tokens=12288, text_tokens=512)
    b = dit_pass_flops(cfg, q_tokens=3072, k_tokens=7168, text_tokens=512)
    assert b["self_attn"] == pytest.approx(a["self_attn"] * 7168 / 12288)
    assert b["total"] - b["self_attn"] == pytest.approx(a["total"] - a["self_attn"])
    assert b["total"] == pytest.approx(12.0e12, rel=0.01)


def test_key_frames_follow_the_window_rule():
    # chunks of 3 latent frames, window of 6 frames including the chunk, 1 sink frame: 3, 6, then 1 + 6 forever
    cfg = ModelConfig.from_name("1.3b")
    assert [chunk_key_frames(cfg, c) for c in range(6)] == [3, 6, 7, 7, 7, 7]
    assert [chunk_key_frames(cfg.replace(window_frames=None), c) for c in range(3)] == [3, 6, 9]


def test_stage_timer_groups_chunks():
    timer = StageTimer("cpu")
    seq = [("audio_features", 0.000, 0.001), ("vae_encode", 0.001, 0.003), ("dit_pass_1", 0.003, 0.006),
           ("denoise_update", 0.006, 0.007), ("dit_pass_2", 0.007, 0.010), ("denoise_update", 0.010, 0.012),
           ("vae_decode", 0.012, 0.015), ("cache_write", 0.016, 0.020),
           ("audio_features", 0.030, 0.031), ("cache_write", 0.031, 0.035)]
    timer.records = [(n, a, b, a) for n, a, b in seq]
    first, second = timer.chunks()
    assert first["stages"]["denoise_update"] == pytest.approx(3.0)     # entered twice: 1 ms + 2 ms
    assert first["span_ms"] == pytest.approx(20.0)
    assert second["span_ms"] == pytest.approx(5.0) and set(second["stages"]) == {"audio_features", "cache_write"}


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("lipforcing profile: error:")
    for n in needles:
        assert n in err, (n, err)


def test_big_model_on_cpu_is_refused(capsys):
    _one_line_error(capsys, ["profile", "--model", "1.3b", "--device", "cpu"], "--model tiny", "--force")


def test_option_errors(capsys, tmp_path):
    _one_line_error(capsys, ["profile", "--device", "cpu", "--cuda-graphs"], "CUDA")
    _one_line_error(capsys, ["profile", "--device", "cpu", "--checkpoint", str(tmp_path / "nope.safetensors")],
                    "no such file")
    _one_line_error(capsys, ["profile", "--device", "cpu", "--chunks", "0"], "--chunks")
    _one_line_error(capsys, ["profile", "--device", "cpu", "--json", str(tmp_path / "no" / "dir" / "p.json")],
                    "does not exist")
    _one_line_error(capsys, ["profile", "--device", "tpu"], "cpu")


def test_resolution_and_seed_errors(capsys):
    _one_line_error(capsys, ["profile", "--device", "cpu", "--resolution", "40"], "--resolution", "40")
    _one_line_error(capsys, ["profile", "--device", "cpu", "--resolution", "0"], "--resolution")
    with pytest.raises(SystemExit) as exc:       # was a numpy traceback from the synthetic input
        main(["profile", "--device", "cpu", "--seed", "-1"])
    assert exc.value.code == 2 and "--seed" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_without_gpu(capsys):
    _one_line_error(capsys, ["profile", "--device", "cuda"], "--device cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [[], ["--cuda-graphs"]], ids=["eager", "cuda_graphs"])
def test_profile_on_gpu(tmp_path, extra):
    js = tmp_path / "p.json"
    assert main(["profile", "--model", "tiny", "--device", "cuda", "--chunks", "3", "--json", str(js),
                 "--no-progress", *extra]) == 0
    doc = json.loads(js.read_text())
    assert doc["timer"] == "cuda_events" and doc["memory"]["kind"] == "torch.cuda.max_memory_allocated"
    assert doc["environment"]["gpu"] != "cpu" and doc["cuda_graphs"] == bool(extra)
    lat = doc["chunk_latency_ms"]
    assert doc["fps"] > 0 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    # device-time stages never exceed the chunk's device span (host gaps between stages are not in any stage)
    for i, span in enumerate(doc["per_chunk_ms"]):
        assert sum(doc["stages"][s]["per_chunk_ms"][i] for s in STAGES) <= span * 1.001
