"""The throughput report of `benchmarks/bench_vllm_e2e.py` (the table RESULTS quotes), from result files
as the throughput workers write them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_vllm_e2e  # noqa: E402


def _row(context, requests, tok_s, ms, runs):
    return {"context": context, "requests": requests, "requests_fit": requests * 4, "decode_tok_s": tok_s,
            "ms_per_step": ms, "ms_per_step_runs": runs}


def test_report_gives_ratios_and_each_repeats_step_time(tmp_path, capsys):
    (tmp_path / "tput_dense.json").write_text(json.dumps({"rows": [
        _row(32768, 16, 2000.0, 8.0, [7.9, 8.1]), _row(65536, 16, 1000.0, 16.0, [12.0, 20.5])]}))
    (tmp_path / "tput_asynctls_2048.json").write_text(json.dumps({"rows": [
        _row(32768, 16, 3000.0, 5.3, [5.2, 5.4]), {"context": 65536, "requests": 0, "requests_fit": 0}]}))
    bench_vllm_e2e.stage_report(tmp_path)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| context | backend |") and "ms/step per repeat" in lines[0]
    assert lines[2:] == [
        "| 32K | dense | 16 (64) | 2000 | 8.0 | 7.9 / 8.1 | 1.00x |",
        "| 64K | dense | 16 (64) | 1000 | 16.0 | 12.0 / 20.5 | 1.00x |",
        "| 32K | asynctls_2048 | 16 (64) | 3000 | 5.3 | 5.2 / 5.4 | 1.50x |",  # a context that did not fit: no row
    ]


def test_check_runs_are_compared_with_vllms_backend_on_the_same_cache():
    ref = bench_vllm_e2e.check_reference
    assert ref("asynctls_cover") == ref("asynctls_cover_kv_bf16") == ref("flash_attn_fp8") == "flash_attn"
    assert ref("asynctls_256_fp8") == ref("asynctls_cover_lagged_fp8") == "flash_attn_fp8"
    assert ref("asynctls_cover_fp8_scaled") == "flash_attn_fp8_scaled" and ref("flash_attn_fp8_scaled") == "flash_attn"
    assert ref("mla_asynctls_cover") == ref("mla_triton_fp8") == ref("mla_triton_kv_bf16") == "mla_triton"
    assert ref("mla_asynctls_256_fp8") == "mla_triton_fp8"
    assert ref("mla_asynctls_cover_fp8_scaled") == "mla_triton_fp8_scaled"
