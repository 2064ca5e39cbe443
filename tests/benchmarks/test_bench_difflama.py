"""benchmarks/bench_difflama.py --smoke runs end to end (tiny DiffLlama layer, interpreter on CPU): every provider's
output checked against fp32 eager, a prefill row without and with padding and a decode row."""

import pytest

pytest.importorskip("transformers")

from benchmarks import bench_difflama  # noqa: E402


def test_bench_difflama_smoke_prints_prefill_and_decode_rows(capsys):
    bench_difflama.main(["--smoke"])
    out = capsys.readouterr().out
    assert out.count("prefill B=") == 2 and out.count("decode  B=") == 1
    assert out.count("| ours ") == 3 and out.count("| sdpa ") == 3 and "copies" in out
