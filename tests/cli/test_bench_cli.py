"""`lipforcing bench --compare` and the benchmark JSON schema (no GPU needed)."""
import json

from lipforcing.benchmarking import Row, compare, write
from lipforcing.cli import main


def _rows(scale):
    return [Row("chunk_attention", "triton", {"Lq": 3072, "Lk": 7168, "H": 12}, "bfloat16", 100.0 * scale,
                90.0 * scale, 110.0 * scale, tflops=5.0 / scale),
            Row("denoise_update", "cuda", {"n": 196608}, "float32", 4.0 * scale, 3.5 * scale, 4.5 * scale)]


def test_schema_and_compare(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write(_rows(1.0), str(a))
    write(_rows(0.5)[:1], str(b))
    doc = json.loads(a.read_text())
    for key in ("op", "backend", "shape", "dtype", "median_us", "p20_us", "p80_us", "tflops", "gbps", "gpu", "torch",
                "triton", "cuda", "commit", "date"):
        assert key in doc["rows"][0], key
    (row,) = compare(str(a), str(b))  # only the common row
    assert row[0][0] == "chunk_attention" and abs(row[3] - 2.0) < 1e-9
    assert main(["bench", "--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "chunk_attention" in out and "2.00" in out


def test_missing_file_is_one_line_error(tmp_path, capsys):
    assert main(["bench", "--compare", str(tmp_path / "nope.json"), str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err


def test_compare_rejects_files_that_are_not_results(tmp_path, capsys, _fresh_random_inputs):
    import random

    rng = random.Random(_fresh_random_inputs)
    good = tmp_path / "good.json"
    write(_rows(rng.uniform(0.5, 2.0)), str(good))
    junk = tmp_path / "junk.json"
    junk.write_bytes(bytes(rng.randrange(256) for _ in range(64)))
    no_rows = tmp_path / "profile.json"
    no_rows.write_text(json.dumps({"schema": "lipforcing.profile/1", "fps": rng.random()}))
    bad_rows = tmp_path / "bad_rows.json"
    bad_rows.write_text(json.dumps({"rows": [{"op": "x"}]}))
    for bad, needle in ((junk, "not a JSON file"), (no_rows, "not a benchmark result"),
                        (bad_rows, "not a benchmark result")):
        for argv in (["bench", "--compare", str(bad), str(good)], ["bench", "--compare", str(good), str(bad)]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("lipforcing bench: error:"), err
            assert bad.name in err[0] and needle in err[0]


def test_explicit_bench_dir_that_is_not_a_suite(tmp_path, capsys):
    assert main(["bench", "--bench-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--bench-dir" in err and "conftest.py" in err


def test_without_a_gpu_bench_says_so(capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the message for a machine without a GPU")
    assert main(["bench", "--op", "denoise_update"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA GPU" in err and "--compare" in err
