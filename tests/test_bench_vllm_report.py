"""The throughput report of `benchmarks/bench_vllm_e2e.py` (the table RESULTS quotes), from result files
as the throughput workers write them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

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
    assert lines[2:lines.index("")] == [
        "| 32K | dense | 16 (64) | 2000 | 8.0 | 7.9 / 8.1 | 1.00x | - | - |",
        "| 64K | dense | 16 (64) | 1000 | 16.0 | 12.0 / 20.5 | 1.00x | - | - |",
        "| 32K | asynctls_2048 | 16 (64) | 3000 | 5.3 | 5.2 / 5.4 | 1.50x | - | - |",  # a context that did not fit: no row
    ]


def test_report_gives_the_median_step_and_its_ratio_when_recorded(tmp_path, capsys):
    def stepped(row, median_ms, quartiles):
        return {**row, "step_ms_median": median_ms, "step_ms_quartiles": quartiles,
                "decode_tok_s_stepped": 1000 * row["requests"] / median_ms}

    (tmp_path / "tput_dense.json").write_text(json.dumps({"rows": [
        stepped(_row(32768, 16, 2000.0, 8.0, [7.9, 8.1]), 4.0, [3.9, 4.0, 4.4])]}))
    (tmp_path / "tput_asynctls_2048.json").write_text(json.dumps({"rows": [
        stepped(_row(32768, 16, 3000.0, 5.3, [5.2, 5.4]), 5.0, [4.8, 5.0, 5.1])]}))
    bench_vllm_e2e.stage_report(tmp_path)
    lines = capsys.readouterr().out.strip().splitlines()
    assert "median step ms (quartiles)" in lines[0]
    assert lines[2].endswith("| 1.00x | 4.00 (3.90-4.40) | 1.00x |")
    assert lines[3].endswith("| 1.50x | 5.00 (4.80-5.10) | 0.80x |")  # the two ways can disagree: both shown
    # ... and the report says where they part: dense's step 4.00 vs 8.0 ms, so the ratios 0.80x vs 1.50x
    # (asynctls' own 5.00 vs 5.3 ms is within 10%).
    start = lines.index("The two measures disagree by more than 10% (quote both, or rerun):")
    assert lines[start + 1:start + 4] == [
        "- 32K dense: median step 4.00 ms, timed runs 8.00 ms per step",
        "- 32K asynctls_2048: 0.80x dense by the median step, 1.50x by the timed runs",
        ""]


def _stepped_row(context, requests, ms, median_ms, tok_s=None):
    tok_s = tok_s or 1000 * requests / ms
    return {**_row(context, requests, tok_s, ms, [ms]), "step_ms_median": median_ms,
            "step_ms_quartiles": [median_ms, median_ms, median_ms], "decode_tok_s_stepped": 1000 * requests / median_ms}


def test_report_flags_a_median_step_above_the_timed_runs_and_a_ratio_moved_by_both_engines():
    # GLM's dense engine of 2026-11-27: median step 26.86 ms against 22.57 ms from the timed runs.
    assert bench_vllm_e2e.rate_disagreements("dense", [_stepped_row(32768, 64, 22.57, 26.86)], {}) == [
        "- 32K dense: median step 26.86 ms, timed runs 22.57 ms per step"]
    # Each engine 9% apart in opposite directions: neither step is flagged, the ratio (1.19x apart) is.
    dense = _stepped_row(32768, 16, 10.0, 10.9)
    sparse = _stepped_row(32768, 16, 5.0, 4.6)
    assert bench_vllm_e2e.rate_disagreements("dense", [dense], {32768: dense}) == []
    assert bench_vllm_e2e.rate_disagreements("asynctls_2048", [sparse], {32768: dense}) == [
        "- 32K asynctls_2048: 2.37x dense by the median step, 2.00x by the timed runs"]


def test_report_tolerates_a_gap_of_exactly_the_tolerance_and_skips_rows_it_cannot_compare():
    # 11.0 vs 10.0 ms: 10% of the smaller, not more.
    assert bench_vllm_e2e.rate_disagreements("dense", [_stepped_row(32768, 16, 10.0, 11.0)], {}) == []
    unstepped = _row(32768, 16, 2000.0, 8.0, [8.0])
    not_fit = {"context": 65536, "requests": 0, "requests_fit": 0}
    assert bench_vllm_e2e.rate_disagreements("asynctls_2048", [unstepped, not_fit], {32768: unstepped}) == []
    # A sparse row whose dense row was not stepped: its own two steps still compared, no ratio.
    assert bench_vllm_e2e.rate_disagreements("asynctls_2048", [_stepped_row(32768, 16, 5.0, 7.0)],
                                             {32768: unstepped}) == [
        "- 32K asynctls_2048: median step 7.00 ms, timed runs 5.00 ms per step"]


def test_report_is_silent_on_the_two_measures_when_they_agree(tmp_path, capsys):
    (tmp_path / "tput_dense.json").write_text(json.dumps({"rows": [_stepped_row(32768, 16, 8.0, 8.7)]}))
    (tmp_path / "tput_asynctls_2048.json").write_text(json.dumps({"rows": [_stepped_row(32768, 16, 4.0, 4.2)]}))
    bench_vllm_e2e.stage_report(tmp_path)
    out = capsys.readouterr().out
    assert "| 2.00x | 4.20 (4.20-4.20) | 2.07x |" in out and "disagree" not in out


def test_report_without_stepped_rows_prints_no_comparison(tmp_path, capsys):
    (tmp_path / "tput_dense.json").write_text(json.dumps({"rows": [_row(32768, 16, 2000.0, 8.0, [7.9, 8.1])]}))
    (tmp_path / "tput_asynctls_2048.json").write_text(json.dumps({"rows": [_row(32768, 16, 3000.0, 5.3, [5.3])]}))
    bench_vllm_e2e.stage_report(tmp_path)
    assert "disagree" not in capsys.readouterr().out


def test_report_lists_each_engines_kernel_compiles_while_serving(tmp_path, capsys):
    # Lines as vLLM's monitor writes them (verbose: with constexprs; default: the kernel name then a full stop).
    (tmp_path / "tput_dense.json").write_text(json.dumps({"rows": [_row(32768, 16, 2000.0, 8.0, [7.9, 8.1])]}))
    (tmp_path / "tput_dense.log").write_text("INFO Kernel JIT monitor activated; monitored JIT compilations ...\n")
    (tmp_path / "tput_asynctls_2048.json").write_text(json.dumps({"rows": [_row(32768, 16, 3000.0, 5.3, [5.3])]}))
    (tmp_path / "tput_asynctls_2048.log").write_text(
        "(EngineCore pid=7) WARNING [jit_monitor.py:132] Triton kernel JIT compilation during inference: "
        "_sparse_attn_split_kernel (constexprs={NUM_SPLITS=10}; signature={}). This causes a latency spike\n"
        "(EngineCore pid=7) WARNING [jit_monitor.py:132] Triton kernel JIT compilation during inference: "
        "_compute_slot_mapping_kernel. This causes a latency spike; consider extending warmup\n"
        "(EngineCore pid=7) WARNING [jit_monitor.py:132] Triton kernel JIT compilation during inference: "
        "_sparse_attn_split_kernel (constexprs={NUM_SPLITS=6}; signature={}). This causes a latency spike\n")
    (tmp_path / "tput_asynctls_1024.json").write_text(json.dumps({"rows": [_row(32768, 16, 3000.0, 5.3, [5.3])]}))
    bench_vllm_e2e.stage_report(tmp_path)
    out = capsys.readouterr().out
    assert "The dense engine's attention backend (vLLM's log): not recorded" in out  # a run before 2026-11-27
    tail = out.strip().splitlines()[-3:]
    assert tail == ["- dense: none", "- asynctls_1024: no log",
                    "- asynctls_2048: _sparse_attn_split_kernel x2, _compute_slot_mapping_kernel x1"]


class _Engine:
    """A stand-in for vLLM's LLMEngine: one token per request and step, every request done after max_tokens
    steps (`short` requests stop one token early)."""

    def __init__(self, short=()):
        self.requests, self.tokens, self.short = [], {}, set(short)

    def add_request(self, request_id, prompt, params):
        self.requests.append((request_id, prompt, params.max_tokens))
        self.tokens[request_id] = 0

    def has_unfinished_requests(self):
        return any(not self._done(r) for r in self.tokens)

    def _done(self, r):
        return self.tokens[r] >= self.requests[0][2] - (r in self.short)

    def step(self):
        outs = []
        for r in self.tokens:
            if not self._done(r):
                self.tokens[r] += 1
                outs.append(SimpleNamespace(request_id=r, finished=self._done(r),
                                            outputs=[SimpleNamespace(token_ids=[0] * self.tokens[r])]))
        return outs


def test_stepped_step_times_times_every_step_of_the_prompts_run():
    engine = _Engine()
    times = bench_vllm_e2e.stepped_step_times(engine, ["a", "b", "c"], 40, "t")
    assert len(times) == 40 and all(t >= 0 for t in times)
    assert engine.requests == [("t-0", "a", 40), ("t-1", "b", 40), ("t-2", "c", 40)]
    with pytest.raises(RuntimeError, match="expected 3 requests of 40 tokens"):
        bench_vllm_e2e.stepped_step_times(_Engine(short={"t-1"}), ["a", "b", "c"], 40, "t")


def test_check_runs_are_compared_with_vllms_backend_on_the_same_cache():
    ref = bench_vllm_e2e.check_reference
    assert ref("asynctls_cover") == ref("asynctls_cover_kv_bf16") == ref("flash_attn_fp8") == "flash_attn"
    assert ref("asynctls_256_fp8") == ref("asynctls_cover_lagged_fp8") == "flash_attn_fp8"
    assert ref("asynctls_cover_fp8_scaled") == "flash_attn_fp8_scaled" and ref("flash_attn_fp8_scaled") == "flash_attn"
    assert ref("mla_asynctls_cover") == ref("mla_triton_fp8") == ref("mla_triton_kv_bf16") == "mla_triton"
    assert ref("mla_asynctls_256_fp8") == "mla_triton_fp8"
    assert ref("mla_asynctls_cover_fp8_scaled") == "mla_triton_fp8_scaled"
    assert ref("hd64_asynctls_cover") == ref("hd64_asynctls_256") == "hd64_flash_attn"
    assert ref("hd64_flash_attn") == ref("hd64_triton_attn") == "hd64_flash_attn"


def test_throughput_model_shapes_load_as_transformers_configs(tmp_path):
    # Each shape model is a config.json vLLM loads with dummy weights; transformers must read it as the
    # architecture it names, with the attention shapes the rows quote (KV bytes from the latent for MLA).
    from transformers import AutoConfig

    want = {"qwen3-8b": (36, 32, 8 * 128 * 2 * 2), "llama-3.2-1b": (16, 32, 8 * 64 * 2 * 2),
            "deepseek-v2-lite": (27, 16, 576 * 2),
            "glm-4.7-flash": (47, 20, 576 * 2)}
    assert set(bench_vllm_e2e.THROUGHPUT_MODELS) == set(want)
    for name, make in bench_vllm_e2e.THROUGHPUT_MODELS.items():
        folder = make(tmp_path, 131072)
        cfg = AutoConfig.from_pretrained(folder)
        layers, heads, per_layer = want[name]
        assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.max_position_embeddings) == (layers, heads, 131072)
        raw = json.loads((folder / "config.json").read_text())
        assert bench_vllm_e2e.kv_bytes_per_token(raw) == layers * per_layer, name
    llama = AutoConfig.from_pretrained(tmp_path / "llama-3.2-1b-shapes")
    assert (llama.model_type, llama.head_dim, llama.num_key_value_heads) == ("llama", 64, 8)
    assert llama.rope_parameters["rope_type"] == "llama3" and llama.rope_parameters["factor"] == 32.0
    glm = AutoConfig.from_pretrained(tmp_path / "glm-4.7-flash-shapes")
    assert (glm.qk_nope_head_dim, glm.qk_rope_head_dim, glm.v_head_dim, glm.q_lora_rank) == (192, 64, 256, 768)


def test_throughput_engines_take_the_request_cap_and_the_caches_bytes():
    kw = bench_vllm_e2e.throughput_engine_kwargs("asynctls", 70000, kv_bytes=5e9, max_seqs=40)
    assert (kw["max_num_seqs"], kw["kv_cache_memory_bytes"], kw["block_size"]) == (40, 5_000_000_000, 64)
    assert "gpu_memory_utilization" not in kw
    dense = bench_vllm_e2e.throughput_engine_kwargs("default", 70000)
    assert (dense["max_num_seqs"], dense["gpu_memory_utilization"]) == (bench_vllm_e2e.MAX_SEQS, 0.9)
    assert "block_size" not in dense and "kv_cache_memory_bytes" not in dense


def test_throughput_stages_pass_the_request_cap_and_keep_the_dense_backend(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_spawn(out, name, timeout, **args):
        calls.append((name, args))
        (out / f"{name}.log").write_text(
            "INFO [cuda.py:482] Using FLASH_ATTN attention backend out of potential backends: ['FLASH_ATTN']\n"
            "INFO [cuda.py:482] Using FLASH_ATTN attention backend out of potential backends: ['FLASH_ATTN']\n")
        return {"kv_tokens": 1000, "rows": [], "max_seqs": args["max_seqs"]}

    monkeypatch.setattr(bench_vllm_e2e, "spawn", fake_spawn)
    bench_vllm_e2e.stage_throughput(tmp_path, "dense", "32768", [2048], max_seqs=40, model_shapes="llama-3.2-1b")
    dense = json.loads((tmp_path / "tput_dense.json").read_text())
    assert dense["attention_backends"] == ["FLASH_ATTN"] and calls[-1][1]["max_seqs"] == 40
    dense["rows"] = [_row(32768, 16, 2000.0, 8.0, [8.0])]
    (tmp_path / "tput_dense.json").write_text(json.dumps(dense))
    bench_vllm_e2e.stage_report(tmp_path)
    assert "The dense engine's attention backend (vLLM's log): FLASH_ATTN" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--max-seqs 16 differs from the dense run's 40"):
        bench_vllm_e2e.stage_throughput(tmp_path, "asynctls", "32768", [2048], model_shapes="llama-3.2-1b")
    bench_vllm_e2e.stage_throughput(tmp_path, "asynctls", "32768", [2048], max_seqs=40, model_shapes="llama-3.2-1b")
    name, args = calls[-1]
    assert name == "tput_asynctls_2048" and args["max_seqs"] == 40
    assert int(args["kv_bytes"]) == 1000 * 16 * 8 * 64 * 2 * 2  # the dense run's tokens at Llama-3.2-1B's K/V bytes


def test_a_flagged_step_time_says_how_much_each_timed_run_exceeds_the_stepped_model():
    # First step 1 s, median 10 ms: by that model an 8-token run takes 1.08 s, a 136-token run 2.36 s. The
    # short run here took 0.5 s more, the long one 0.1 s more, so the timed rate reads 10 - 400 / 128 ms.
    t8, t136 = 1.0 + 8 * 0.010 + 0.5, 1.0 + 136 * 0.010 + 0.1
    ms_per_step = 1000 * (t136 - t8) / 128
    row = {**_stepped_row(32768, 16, ms_per_step, 10.0), "step_ms_first": 1000.0,
           "t_runs_s": {"136": [t136], "8": [t8]}}
    assert bench_vllm_e2e.rate_disagreements("dense", [row], {}) == [
        "- 32K dense: median step 10.00 ms, timed runs 6.88 ms per step (each timed run's seconds beyond the "
        "stepped model: 8 tokens +0.50; 136 tokens +0.10)"]


def test_a_timed_run_times_its_steps_and_adds_every_request():
    engine = _Engine()
    wall, steps = bench_vllm_e2e.timed_run(engine, ["a", "b"], 9, "run-8")
    assert len(steps) == 9 and wall >= sum(steps)
    assert engine.requests == [("run-8-0", "a", 9), ("run-8-1", "b", 9)]


def test_a_flagged_step_time_with_stepped_timed_runs_names_each_runs_steps():
    # The timed runs' own steps recorded: the report gives their median and the time outside them, so a
    # median step below the stepped run's shows in the runs themselves.
    row = {**_stepped_row(32768, 16, 7.0, 10.0), "step_ms_first": 1000.0,
           "t_runs_s": {"8": [1.2], "136": [2.1]},
           "t_runs_steps_ms": {"136": [[1000.0] + [7.0] * 136], "8": [[1000.0] + [10.0] * 8]}}
    assert bench_vllm_e2e.rate_disagreements("dense", [row], {}) == [
        "- 32K dense: median step 10.00 ms, timed runs 7.00 ms per step (each timed run: 8 tokens: 9 steps, "
        "first 1000 ms, median 10.00 ms, outside the steps 0.12 s; 136 tokens: 137 steps, first 1000 ms, "
        "median 7.00 ms, outside the steps 0.15 s)"]
