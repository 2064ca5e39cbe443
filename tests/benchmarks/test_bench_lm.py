"""benchmarks/bench_lm.py --smoke runs end to end (tiny shapes, interpreter on CPU): every row checked against the
reference and timed, JSON rows on their own or under a key of another benchmark's file, the budget honoured."""

import json

from benchmarks import bench_lm

PROVIDERS = {"decode": {"triton-halves", "triton-interleaved", "sdpa2"},
             "varlen": {"triton-varlen", "triton-padded", "sdpa2-padded"}}


def test_bench_lm_smoke_writes_decode_and_varlen_rows(tmp_path, capsys):
    path = tmp_path / "lm.json"
    assert bench_lm.main(["--smoke", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("decode B=") == 6 and out.count("varlen B=") == 3
    data = json.loads(path.read_text())
    assert data["benchmark"] == "lm" and data["bandwidth_bytes_per_s"] == 4.3e12
    for form, providers in PROVIDERS.items():
        rows = [r for r in data["rows"] if r["form"] == form]
        assert {r["provider"] for r in rows} == providers
        assert all(r["ms"] and r["max_err"] <= 1e-4 for r in rows), rows
    decode = [r for r in data["rows"] if r["form"] == "decode"]
    # floor: B·Hkv·L·4d fp32 elements at 4.3e12 B/s (smoke: H=2, Hkv=1, d=16)
    assert {(r["B"], r["L"], r["floor_us"]) for r in decode} == {(1, 40, 1 * 40 * 64 * 4 / 4.3e6),
                                                                 (3, 100, 3 * 100 * 64 * 4 / 4.3e6)}
    assert all(r["us_per_token"] == r["us"] / r["B"] and r["over_floor"] > 0 for r in decode)


def test_bench_lm_json_key_keeps_the_other_benchmark_and_budget_skips(tmp_path):
    path = tmp_path / "bench_diff_attn.json"
    path.write_text(json.dumps({"benchmark": "diff_attn", "rows": [{"provider": "triton"}]}))
    assert bench_lm.main(["--smoke", "--json", str(path), "--json-key", "lm", "--budget-s", "0"]) == 0
    data = json.loads(path.read_text())
    assert data["rows"] == [{"provider": "triton"}] and data["benchmark"] == "diff_attn"
    assert len(data["lm"]["rows"]) == 9 and all("time budget" in r["skipped"] for r in data["lm"]["rows"])
