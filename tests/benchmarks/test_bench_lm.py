"""benchmarks/bench_lm.py --smoke runs end to end (tiny shapes, interpreter on CPU) and checks its rows."""

from benchmarks import bench_lm


def test_bench_lm_smoke_prints_decode_and_varlen_rows(capsys):
    bench_lm.main(["--smoke"])
    out = capsys.readouterr().out
    assert out.count("decode B=") == 4 and out.count("varlen B=") == 1
