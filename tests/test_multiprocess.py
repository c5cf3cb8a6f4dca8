"""Scale-out on CPU: TIPTrainer with 2 processes (gloo DDP and FSDP2) and asynctls under vLLM tensor parallelism 2.

TIP (about 60 s: three launches of `benchmarks/tip_multiprocess_check.py`, run side by side). One real training
step over the same 4 prompts with fixed completions, in six layouts: 1 process x batch 4, 1 process x batch 2 x
2 accumulation steps, and 2 processes x batch 2 or x batch 1 x 2 accumulation steps, under DDP and under FSDP2
(accelerate's FSDP plugin, student sharded per decoder layer). Shown:
- the loss and the reduced gradient of every layout equal the single-process full-batch ones (float32, 1e-5), and
  so do the weights after the AdamW step: the selected-token normaliser spans processes and micro-batches and TRL's
  division by the process count undoes the averaging of DDP's all-reduce and FSDP's reduce-scatter;
- under FSDP2 each process really holds half of the student; with the `lm_head` in an FSDP unit of its own (a
  sharded DTensor when the loss reads it) TIPTrainer gathers it and reduce-scatters its gradient;
- each process selects on its own rollouts (every selection call sees one rank's micro-batch) and, with a rule
  that ranks within each rollout, chooses the single-process positions;
- the quadrant counts are reduced over processes before logging: 2 processes log the single-process shares;
- teeth: dividing by each process's own selected count, skipping TIPTrainer's teacher broadcast (under FSDP's
  CPU-RAM-efficient loading the second process then holds an all-zero teacher), or gathering a sharded head with
  TRL's replicated-gradient `full_tensor()`, moves the gradient (and the first two the loss) far out of those
  tolerances.

vLLM (about 60-90 s: two engine starts). vLLM's CPU build runs `tensor_parallel_size=2` (gloo, `mp` executor) once
each rank is bound to its own cores with `VLLM_CPU_OMP_THREADS_BIND` (its automatic binding wants one NUMA node per
rank). On the tiny GQA model (2 kv heads, so 1 kv head per rank) asynctls at TP=2 gives TP=1's greedy tokens on
~1.5K-token prompts with a small budget, and each rank's counters show every decode token served sparse. Both
engines take their index channels from one calibration file (`index_calibration_file`): each rank holds its own
kv head's row of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import random_prompts
from vllm_engines import shutdown_engine

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "tip_multiprocess_check.py"
SINGLE_LAYOUTS = ("4x1", "2x2")  # per_device x grad_accum with 1 process
DDP_LAYOUTS = ("2x1", "1x2")  # with 2 processes
# With 2 processes, FSDP2; `head_sharded`: every nn.Linear, the lm_head included, in an FSDP unit of its own.
FSDP_LAYOUTS = ("fsdp2_2x1", "fsdp2_1x2", "fsdp2_2x1_head_sharded")
FSDP_VARIANTS = (  # must differ
    "fsdp2_2x1_local_normaliser", "fsdp2_2x1_unsynced_teacher", "fsdp2_2x1_replicated_head_grad",
)  # fmt: skip
MULTI_LAYOUTS = DDP_LAYOUTS + FSDP_LAYOUTS
TIMEOUT_S = 300
LEARNING_RATE = 1e-3  # the check script's AdamW learning rate


# ----------------------------------------------------------------------------------------------
# TIPTrainer: 1 process vs 2 processes
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tip_runs(teacher_student_paths, tmp_path_factory):
    teacher, student = teacher_student_paths
    out = tmp_path_factory.mktemp("tip_multiprocess")
    common = [str(CHECK), "--out", str(out), "--teacher", teacher, "--student", student]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    launches = {
        "single": [sys.executable, *common, "--runs", ",".join(SINGLE_LAYOUTS)],
        # accelerate's `--cpu` alone starts one process; its torch.distributed launcher plus the script's
        # `PartialState(cpu=True)` gives a 2-process gloo group on a machine without GPUs.
        "ddp": [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", "0", *common, "--runs", ",".join(DDP_LAYOUTS),
        ],
        # FSDP2 through accelerate's plugin, with its default CPU-RAM-efficient loading (only process 0 reads the
        # checkpoints); the script lets the plugin take the gloo group (`_allow_fsdp_on_cpu`).
        "fsdp": [
            sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
            "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", "0", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
            "--fsdp_transformer_layer_cls_to_wrap", "Qwen3DecoderLayer", "--fsdp_reshard_after_forward", "true",
            "--fsdp_cpu_ram_efficient_loading", "true", "--fsdp_sync_module_states", "true", *common,
            "--runs", "2x1,1x2,2x1:head_sharded,2x1:local_normaliser,2x1:unsynced_teacher,2x1:replicated_head_grad",
        ],
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in launches.items()
    }
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in procs.values():
                other.kill()
            pytest.fail(f"{name} launch did not finish in {TIMEOUT_S} s")
        assert proc.returncode == 0, f"{name} launch failed:\n{output[-4000:]}"

    def load(processes, layout):
        folder = out / f"{processes}proc_{layout}"
        return (
            json.loads((folder / "summary.json").read_text()),
            torch.load(folder / "grad.pt"),
            torch.load(folder / "weights.pt"),
        )

    return {(1, layout): load(1, layout) for layout in SINGLE_LAYOUTS} | {
        (2, layout): load(2, layout) for layout in MULTI_LAYOUTS + FSDP_VARIANTS
    }


def _assert_loss_and_gradient_equal(summary, grad, reference, reference_grad):
    assert abs(summary["loss"] - reference["loss"]) <= 1e-5 * abs(reference["loss"])
    assert abs(summary["grad_norm"] - reference["grad_norm"]) <= 1e-5 * reference["grad_norm"]
    torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=2e-5)


def _assert_weights_equal(weights, reference_weights):
    # AdamW's first step moves each weight by lr * g / (|g| + eps): entries whose gradient is float32 noise of the
    # reduction (|g| ~ 1e-7) may move by a fraction of lr. Every weight within 5% of one step, all but 0.1% of them
    # within 1e-6 (measured: 12 of 426752 entries differ, by at most 2.8e-5; the variants below move 1.7% to 19% of
    # the entries, by up to 2 lr).
    torch.testing.assert_close(weights, reference_weights, rtol=0, atol=0.05 * LEARNING_RATE)
    assert ((weights - reference_weights).abs() > 1e-6).float().mean() < 1e-3


@pytest.mark.parametrize("key", [(1, "2x2")] + [(2, k) for k in MULTI_LAYOUTS], ids=lambda k: f"{k[0]}proc_{k[1]}")
def test_loss_gradient_and_step_equal_single_process_full_batch(tip_runs, key):
    reference, reference_grad, reference_weights = tip_runs[(1, "4x1")]
    summary, grad, weights = tip_runs[key]
    assert summary["ranks_agree_on_gradient"]
    _assert_loss_and_gradient_equal(summary, grad, reference, reference_grad)
    _assert_weights_equal(weights, reference_weights)
    assert reference["grad_norm"] > 1.0  # a real gradient, not two zeros compared


@pytest.mark.parametrize("layout", FSDP_LAYOUTS)
def test_fsdp2_shards_the_student(tip_runs, layout):
    summary = tip_runs[(2, layout)][0]
    assert summary["mode"] == "fsdp2" and summary["distributed_type"] == "DistributedType.FSDP"
    assert [r["student_wrapper"] for r in summary["per_rank"]] == ["fsdp2", "fsdp2"]
    # Each process stores about half of the parameters (shards of dim 0, padded where a dim is odd).
    assert all(0.45 <= r["student_local_share"] <= 0.55 for r in summary["per_rank"])
    assert [r["teacher_device"] for r in summary["per_rank"]] == ["cpu", "cpu"]  # the student's (cuda:<rank> on GPUs)
    assert [r["student_wrapper"] for r in tip_runs[(2, "2x1")][0]["per_rank"]] == ["DistributedDataParallel"] * 2


def test_fsdp2_sharded_head_reaches_the_loss_as_a_dtensor(tip_runs):
    """The `head_sharded` runs exercise `trl_tip.loss._full_tensor`'s gather (the plain FSDP2 runs hold the head
    whole in the root unit's forward), so their equality above covers the reduce-scatter of its gradient."""
    for layout, sharded in [("fsdp2_2x1", False), ("fsdp2_2x1_head_sharded", True)]:
        selections = tip_runs[(2, layout)][0]["selections"]
        assert {s["student_head_reached_loss_sharded"] for s in selections} == {sharded}, layout


@pytest.mark.parametrize("variant", FSDP_VARIANTS)
def test_fsdp2_variants_that_must_differ_do_differ(tip_runs, variant):
    reference, reference_grad, reference_weights = tip_runs[(1, "4x1")]
    summary, grad, weights = tip_runs[(2, variant)]
    assert summary["per_rank"][0]["student_wrapper"] == "fsdp2"
    if variant.endswith("replicated_head_grad"):  # the forward is right, only the head's gradient is not
        assert abs(summary["loss"] - reference["loss"]) <= 1e-5 * reference["loss"]
    else:
        assert abs(summary["loss"] - reference["loss"]) > 0.1 * reference["loss"]
    with pytest.raises(AssertionError):
        _assert_loss_and_gradient_equal(summary, grad, reference, reference_grad)
    with pytest.raises(AssertionError):
        _assert_weights_equal(weights, reference_weights)
    if variant.endswith("unsynced_teacher"):
        # Process 0 loaded the real teacher and selects as one process does; process 1's zero teacher does not.
        by_rollout = _by_rollout(reference)
        changed = {
            s["rank"] for s in summary["selections"] if s["selected"] != by_rollout[tuple(s["completion"])]["selected"]
        }
        assert changed == {1}


def _fake_trainer(teacher, *, processes=2, fsdp=True, deepspeed=False, device="meta"):
    from types import SimpleNamespace

    accelerator = SimpleNamespace(num_processes=processes, device=torch.device(device), unwrap_model=lambda m: m)
    return SimpleNamespace(
        teacher_model=teacher, accelerator=accelerator, is_fsdp_enabled=fsdp, is_deepspeed_enabled=deepspeed
    )


@pytest.mark.parametrize(
    "case, moved",
    [("fsdp", True), ("device_map", False), ("one_process", False), ("ddp", False), ("deepspeed", False)],
)
def test_teacher_placed_and_broadcast_under_fsdp_only(monkeypatch, case, moved):
    """Under FSDP the parents leave the teacher where it was loaded (TRL #2580): TIPTrainer moves it to the
    process's device and broadcasts process 0's weights; elsewhere it leaves the teacher alone."""
    import trl_tip.trainer as tip_trainer

    broadcasts = []
    monkeypatch.setattr(tip_trainer, "_broadcast_from_main_process", broadcasts.append)
    monkeypatch.setattr(tip_trainer, "is_fsdp_enabled", lambda: False)  # no FSDP launch environment here
    teacher = torch.nn.Linear(4, 4)
    if case == "device_map":
        teacher.hf_device_map = {"": "cpu"}
    trainer = _fake_trainer(
        teacher, processes=1 if case == "one_process" else 2, fsdp=case != "ddp", deepspeed=case == "deepspeed"
    )
    tip_trainer._place_teacher_under_fsdp(trainer)
    assert teacher.weight.device.type == ("meta" if moved else "cpu")
    assert broadcasts == ([teacher] if case in ("fsdp", "device_map") else [])


def _by_rollout(summary):
    return {tuple(s["completion"]): s for s in summary["selections"]}


@pytest.mark.parametrize("layout", MULTI_LAYOUTS)
def test_each_rank_selects_on_its_own_rollouts(tip_runs, layout):
    reference = _by_rollout(tip_runs[(1, "4x1")][0])
    summary = tip_runs[(2, layout)][0]
    per_device = int(next(part for part in layout.split("_") if "x" in part).split("x")[0])
    selections = summary["selections"]
    # Every rollout was scored exactly once, by one rank, in a call that held only that rank's micro-batch.
    assert sorted(tuple(s["completion"]) for s in selections) == sorted(reference)
    assert {s["rank"] for s in selections} == {0, 1}
    assert all(s["micro_batch_rollouts"] == per_device for s in selections)
    # `divergence` ranks within a rollout: the positions are the single-process ones.
    for s in selections:
        assert s["selected"] == reference[tuple(s["completion"])]["selected"]
    # The normaliser each rank divides by: the all-process selected count over the process count (TRL's DDP rule).
    total = sum(len(s["selected"]) for s in selections)
    assert all(s["num_items_in_batch"] == total / 2 for s in selections)
    assert all(s["num_items_in_batch"] == total for s in reference.values())


@pytest.mark.parametrize("layout", ["2x1", "fsdp2_2x1"])
def test_quadrant_statistics_reduced_across_ranks(tip_runs, layout):
    reference = tip_runs[(1, "4x1")][0]["logs"]
    logs = tip_runs[(2, layout)][0]["logs"]
    keys = [k for k in reference if k.startswith("tip/")]
    assert {f"tip/share_q{q}" for q in (1, 2, 3, 4)} <= set(keys)
    # A rank alone holds 2 of the 4 rollouts: only the all-process sums reproduce the full-batch shares.
    for key in keys:
        assert logs[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-7), key
    assert len({reference[f"tip/share_q{q}"] for q in (1, 2, 3, 4)}) > 1  # the types are not all one quadrant


# ----------------------------------------------------------------------------------------------
# asynctls under vLLM tensor parallelism 2 (CPU build)
# ----------------------------------------------------------------------------------------------

TP_KNOBS = dict(
    token_budget=128, num_blocks=8, selection_block_size=16, sink_tokens=16, local_tokens=16,
    index_bits=4, dense_threshold=256,
)  # fmt: skip
TP_LENGTHS = (1500, 1300)
TP_MAX_TOKENS = 16
TP_ATTENDED_MAX = 16 + 16 + 128


def _tp_engine_run(model_path: str, tp: int, prompts, calibration_file: str):
    """Greedy tokens of an asynctls engine at this TP (index channels from `calibration_file`), each rank's
    counters and each rank's index channels per layer (rank order)."""
    from vllm import LLM, SamplingParams

    from vllm_asynctls.calibration import index_channels_in_use
    from vllm_asynctls.counters import read_counters

    llm = LLM(
        model=model_path,
        attention_backend="asynctls",
        additional_config={"asynctls": dict(TP_KNOBS, index_calibration_file=calibration_file)},
        tensor_parallel_size=tp,
        distributed_executor_backend="mp",
        dtype="float32",
        gpu_memory_utilization=0.3,
        max_model_len=4096,
        enforce_eager=True,
        seed=0,
    )
    try:
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(max_tokens=TP_MAX_TOKENS, temperature=0.0, ignore_eos=True),
            use_tqdm=False,
        )
        return ([list(o.outputs[0].token_ids) for o in outputs], llm.collective_rpc(read_counters),
                llm.apply_model(index_channels_in_use))
    finally:
        shutdown_engine(llm)


@pytest.fixture(scope="module")
def tp_calibration_file(qwen3_gqa_path, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from vllm_asynctls.calibration import calibrate_index_channels

    model = AutoModelForCausalLM.from_pretrained(qwen3_gqa_path, dtype="float32").eval()
    cal = calibrate_index_channels(model, random_prompts(qwen3_gqa_path, (500,), seed=9), 32, progress=False)
    return str(cal.save(tmp_path_factory.mktemp("tp_calibration") / "channels.json"))


@pytest.fixture(scope="module")
def tp_runs(qwen3_gqa_path, tp_calibration_file):
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip(f"tensor parallelism 2 on CPU needs 2 CPUs to bind, this process may use {allowed}")
    # Counters are read with `collective_rpc(read_counters)`; vLLM ships a callable to its workers only with this.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    prompts = random_prompts(qwen3_gqa_path, TP_LENGTHS, seed=3)
    runs = {1: _tp_engine_run(qwen3_gqa_path, 1, prompts, tp_calibration_file)}
    # vLLM's automatic CPU binding gives each rank a NUMA node and refuses 2 ranks on a 1-node machine ("Not enough
    # allowed NUMA nodes to bind threads of 2 local CPUWorkers"); bind one core per rank by hand instead.
    previous = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{allowed[0]}|{allowed[1]}"
    try:
        runs[2] = _tp_engine_run(qwen3_gqa_path, 2, prompts, tp_calibration_file)
    finally:
        if previous is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = previous
    return runs


@pytest.mark.engine
def test_asynctls_tp2_greedy_tokens_equal_tp1(tp_runs):
    (tokens_tp1, *_), (tokens_tp2, *_) = tp_runs[1], tp_runs[2]
    assert all(len(t) == TP_MAX_TOKENS for t in tokens_tp1)
    assert tokens_tp2 == tokens_tp1
    assert len({tuple(t) for t in tokens_tp1}) == len(tokens_tp1)  # prompt-dependent outputs


@pytest.mark.engine
def test_asynctls_tp2_every_rank_decodes_sparse(tp_runs):
    _, (counters_tp1,), _ = tp_runs[1]
    _, counters_tp2, _ = tp_runs[2]
    assert len(counters_tp2) == 2
    for c in (counters_tp1, *counters_tp2):
        # Both requests decode sparse on every rank (the first generated token comes from prefill).
        assert c["decode_tokens_sparse"] == len(TP_LENGTHS) * (TP_MAX_TOKENS - 1)
        assert c["decode_tokens_dense"] == 0 and c["sparse_share"] == 1.0
        # The budget means the same per kv head at any TP: sinks + local + budget, at most.
        assert 0.9 * TP_ATTENDED_MAX <= c["tokens_read_per_sparse_decode"] <= TP_ATTENDED_MAX
    # Each rank selects on its own kv head; TP=1 averages the same two heads.
    mean_tp2 = sum(c["tokens_read_per_sparse_decode"] for c in counters_tp2) / 2
    assert mean_tp2 == pytest.approx(counters_tp1["tokens_read_per_sparse_decode"], rel=1e-6)


@pytest.mark.engine
def test_asynctls_tp2_ranks_take_their_kv_heads_calibration_channels(tp_runs, tp_calibration_file):
    from vllm_asynctls.calibration import load_calibration

    cal = load_calibration(tp_calibration_file)
    (_, _, (tp1,)), (_, _, tp2) = tp_runs[1], tp_runs[2]
    assert tp1 == [[list(head) for head in layer] for layer in cal.layers]  # both kv heads, every layer
    # The tiny model's 2 kv heads split over 2 ranks: rank r holds kv head r, with its row of the file.
    assert tp2 == [[[list(layer[r])] for layer in cal.layers] for r in range(2)]
    assert all(layer[0] != layer[1] for layer in cal.layers)  # a rank taking the other's row would fail
