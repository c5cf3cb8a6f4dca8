"""`benchmarks/bench_sparse_decode.py --model-shapes`: the shapes match the served models', the table names
them, and the modes that run at Qwen3-8B's shapes refuse other shapes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_sparse_decode  # noqa: E402
import bench_vllm_e2e  # noqa: E402


def test_gqa_shapes_are_the_served_models_attention(tmp_path):
    for name, shapes in bench_sparse_decode.GQA_SHAPES.items():
        cfg = json.loads((bench_vllm_e2e.THROUGHPUT_MODELS[name](tmp_path, 131072) / "config.json").read_text())
        assert shapes == dict(num_q_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
                              head_dim=cfg["head_dim"]), name


def test_the_table_names_its_shapes():
    results = dict(device="d", date="t", command="c", copy_bandwidth_TBps=3.0, rows=[],
                   gqa_shapes=dict(bench_sparse_decode.GQA_SHAPES["llama-3.2-1b"], model="llama-3.2-1b"))
    assert "GQA shapes llama-3.2-1b: 32 q / 8 kv heads of 64" in bench_sparse_decode.markdown(results)


@pytest.mark.parametrize("flags", [[], ["--no-recall", "--recall-only"], ["--no-recall", "--breakdown"],
                                   ["--no-recall", "--tune"]])
def test_modes_at_qwen3_shapes_refuse_other_shapes(flags, capsys):
    with pytest.raises(SystemExit):
        bench_sparse_decode.main(["--model-shapes", "llama-3.2-1b", *flags])
    assert "--model-shapes llama-3.2-1b applies to the GQA timing rows only" in capsys.readouterr().err


def test_the_gqa_timing_rows_take_other_shapes(capsys):
    # Past the shape check, the timing rows' own requirement stops this CPU run.
    with pytest.raises(SystemExit, match="only --recall-only runs with --device cpu"):
        bench_sparse_decode.main(["--model-shapes", "llama-3.2-1b", "--no-recall", "--no-mla", "--device", "cpu"])
    assert "applies to the GQA timing rows only" not in capsys.readouterr().err
