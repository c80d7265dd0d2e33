"""bench/bench.py in its quickest mode, and the CPU fast paths of model.py that it measures.

    python -m pytest tests/test_bench.py -q
"""

import json

import pytest
import torch
import torch.nn.functional as F

from support.fastpaths import Linear
from model import Llama, LlamaConfig
from rope import RopeConfig


# ---- model.py's CPU fast paths give the results of the plain ones ----------------------------------

def test_single_row_linear_is_exact():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the fast path splits the weight rows over the threads
    try:
        for c_in, c_out in ((64, 96), (96, 64), (64, 97)):  # 97 rows: no even split, the plain path
            lin = Linear(c_in, c_out, bias=False)
            x = torch.randn(1, 1, c_in)
            with torch.no_grad():
                assert torch.equal(lin(x), F.linear(x, lin.weight))
            assert torch.equal(lin(x), F.linear(x, lin.weight))  # with grad: the plain path
    finally:
        torch.set_num_threads(threads)


def test_batch_one_prefill_and_decode_equal_full_forward():
    # batch 1 takes every fast path: row-split projections and grouped attention while decoding, and
    # a prefill chunk of 600 queries after a 600-token prefix, attended 512 queries at a time
    torch.manual_seed(0)
    rope = RopeConfig(method="yarn", factor=4.0, head_dim=16, original_max_position_embeddings=256)
    m = Llama(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, rope=rope)).eval()
    m.init_weights(std=0.2)
    seq = torch.randint(0, 96, (1, 1200))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            m.setup_cache(1, 1210, chunk_size=600)
            logits = m.prefill(seq)
            for _ in range(4):
                full = m(seq)[:, -1:]
                torch.testing.assert_close(logits, full, rtol=0, atol=1e-4)
                seq = torch.cat([seq, logits.argmax(-1)], 1)
                logits = m(seq[:, -1:], pos=seq.size(1) - 1, last_only=True)
    finally:
        torch.set_num_threads(threads)


# ---- the benchmark itself ----------------------------------------------------------------------------

def test_quick_bench_writes_ratios(tmp_path, capsys):
    pytest.importorskip("transformers")
    from bench import bench
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
    pytest.importorskip("transformers")
    from bench import bench
    for argv in (["--sizes", "huge"], ["--workloads", "eval-x"], ["--reps", "0"]):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
