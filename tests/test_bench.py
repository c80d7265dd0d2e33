"""bench/bench.py in its quickest mode: it runs end to end and writes JSON with the ratios.

    python -m pytest tests/test_bench.py -q
"""

import json

import pytest

pytest.importorskip("transformers")

from bench import bench  # noqa: E402


def test_quick_bench_writes_ratios(tmp_path, capsys):
    out = tmp_path / "quick.json"
    rc = bench.main(["--quick", "--workloads", "eval-128,decode-16", "--threads", "1", "--min-time", "0",
                     "--cache-dir", str(tmp_path / "ckpt"), "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["checks"]["tiny"]["greedy_equal"] and res["checks"]["tiny"]["max_abs_logit_diff"] < 1e-4
    assert res["peak"]["matmul_flops"] > 0 and res["peak"]["copy_bytes_per_s"] > 0
    rows = {r["workload"]: r for r in res["results"]}
    assert set(rows) == {"eval-128", "decode-16"}
    for r in rows.values():
        assert r["speed_ratio"] > 0 and r["memory_ratio"] > 0
        assert r["speed_ratio"] == pytest.approx(r["ours_tokens_per_s"] / r["transformers_tokens_per_s"])
        assert r["ours_peak_mb"] > 0 and r["transformers_peak_mb"] > 0
    assert "ours_peak_fraction" in rows["eval-128"] and "ours_bandwidth_fraction" in rows["decode-16"]
    assert "speed x" in capsys.readouterr().out
    assert (tmp_path / "quick.md").read_text().startswith("| size |")


def test_bad_flags_exit_2(capsys):
    for argv in (["--sizes", "huge"], ["--workloads", "eval-x"], ["--reps", "0"]):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
