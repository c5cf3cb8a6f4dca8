"""Index calibration files (`vllm_asynctls.calibration`): the calibration run, the file, the knob.

The engine check (a file's channels are the ones every layer holds while serving) rides on the
lagged-selection engine of `test_plugin_engine.py`, which already starts one; here no engine starts.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import random_prompts

from asynctls_tip_kernels import sparse_decode_reference as ref
from vllm_asynctls.calibration import IndexCalibration, calibrate_index_channels, layer_number, load_calibration, main
from vllm_asynctls.config import AsyncTLSConfig
from vllm_asynctls.evaluation.recall import capture_qk


@pytest.fixture(scope="module")
def tiny_model(qwen3_gqa_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(qwen3_gqa_path, dtype=torch.float32).eval()


def _file(tmp_path, name="channels.json", **changes) -> str:
    cal = IndexCalibration("tiny", "std", True, 4, 2, 8, 100, (((0, 1, 2, 3), (1, 3, 5, 7)), ((0, 2, 4, 6), (4, 5, 6, 7))))
    data = dict(cal.to_json(), **changes)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_calibration_chooses_each_layers_channels_from_all_sequences(tiny_model, qwen3_gqa_path):
    seqs = random_prompts(qwen3_gqa_path, (300, 170), seed=3)
    cal = calibrate_index_channels(tiny_model, seqs, 16, metric="std", query_stride=4, progress=False)
    num_layers = tiny_model.config.num_hidden_layers
    assert (cal.num_layers, cal.num_kv_heads, cal.head_dim, cal.index_channels) == (num_layers, 2, 64, 16)
    assert cal.calibration_tokens == 470 and cal.uses_queries and cal.metric == "std"
    # Independently: the layer's keys of both sequences and the queries of every 4th position (and the last).
    captures = [capture_qk(tiny_model, s, sorted(set(range(0, len(s), 4)) | {len(s) - 1})) for s in seqs]
    for layer in range(num_layers):
        keys = torch.cat([c[layer].keys for c in captures])
        queries = torch.cat([c[layer].queries for c in captures])
        assert keys.shape[0] == 470 and queries.shape[0] == 76 + 44  # every 4th position plus the last
        expected = ref.choose_index_channels(keys, 16, metric="std", queries=queries)
        assert torch.equal(cal.channels(layer), expected), layer
    # The queries change the choice: ranked by the keys alone, some layer keeps other channels.
    keys_only = calibrate_index_channels(tiny_model, seqs, 16, metric="std", use_queries=False, progress=False)
    assert any(keys_only.layers[l] != cal.layers[l] for l in range(num_layers))
    with pytest.raises(ValueError, match=r"index_channels must be in \[1, 64\] \(the key head dim\); got 65"):
        calibrate_index_channels(tiny_model, seqs, 65, progress=False)


def test_file_round_trip_and_cli(tmp_path, tiny_model, qwen3_gqa_path):
    seqs = random_prompts(qwen3_gqa_path, (200,), seed=1)
    cal = calibrate_index_channels(tiny_model, seqs, 8, metric="mean_abs", progress=False, model_name="tiny")
    assert load_calibration(cal.save(tmp_path / "a.json")) == cal
    # The command over a text file, 80 tokens per forward pass.
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 40))
    out = main([qwen3_gqa_path, "--out", str(tmp_path / "cli.json"), "--text", str(text), "--max-tokens", "80",
                "--index-channels", "16", "--device", "cpu"])
    got = load_calibration(out)
    assert (got.index_channels, got.num_kv_heads, got.metric, got.uses_queries) == (16, 2, "std", True)
    assert got.num_layers == tiny_model.config.num_hidden_layers and got.calibration_tokens > 80


@pytest.mark.parametrize("changes, match", [
    ({"format": "something-else"}, "not an index calibration file"),
    ({"version": 2}, "unsupported version 2"),
    ({"layers": [[[0, 1, 2, 3]]]}, "layer 0 has 1 kv heads"),
    ({"layers": [[[3, 2, 1, 0], [0, 1, 2, 3]]]}, "distinct ascending"),
    ({"layers": [[[0, 1, 2, 9], [0, 1, 2, 3]]]}, r"must be in \[0, 8\)"),
    ({"layers": [[[0, 1, 2], [0, 1, 2, 3]]]}, "expected 4 distinct"),
])
def test_bad_files_say_what_is_wrong(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        load_calibration(_file(tmp_path, **changes))
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"format": "asynctls-index-channels", "version": 1}))
    with pytest.raises(ValueError, match=r"missing field\(s\) \['model'"):
        load_calibration(missing)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not a readable JSON file"):
        load_calibration(tmp_path / "broken.json")


def test_knob_is_validated_and_checked_against_the_model(tmp_path):
    path = _file(tmp_path)
    assert AsyncTLSConfig(index_calibration_file=path).index_calibration().num_layers == 2
    with pytest.raises(ValueError, match=r"asynctls knob index_calibration_file: cannot read '/nowhere.json'"):
        AsyncTLSConfig(index_calibration_file="/nowhere.json")
    with pytest.raises(ValueError, match="index_calibration_file must be null or a file path; got 3"):
        AsyncTLSConfig(index_calibration_file=3)
    with pytest.raises(ValueError, match="index_calibration_file needs index_bits 4 or 8"):
        AsyncTLSConfig(index_calibration_file=path, index_bits=16)

    class Model:  # the slice of vllm_config the check reads
        class model_config:
            kv_heads = 2

            class hf_text_config:
                num_hidden_layers = 2

            @classmethod
            def get_total_num_kv_heads(cls):
                return cls.kv_heads

    cfg = AsyncTLSConfig(index_calibration_file=path, index_channels=4)
    assert cfg.check_index_calibration(Model, 8, 4, is_mla=False).layers[1][1] == (4, 5, 6, 7)
    for args, what in (((16, 4), "key head dim 8; this model has 16"), ((8, 6), "index_channels 4; this model has 6")):
        with pytest.raises(ValueError, match=f"asynctls knob index_calibration_file '.*channels.json': .*{what}"):
            cfg.check_index_calibration(Model, *args, is_mla=False)
    Model.model_config.kv_heads = 3
    with pytest.raises(ValueError, match="kv heads per layer 2; this model has 3"):
        cfg.check_index_calibration(Model, 8, 4, is_mla=False)
    Model.model_config.kv_heads = 2
    Model.model_config.hf_text_config.num_hidden_layers = 4
    with pytest.raises(ValueError, match="the file has layers 2; this model has 4"):
        cfg.check_index_calibration(Model, 8, 4, is_mla=False)
    with pytest.raises(ValueError, match="implemented for GQA / MHA models"):
        cfg.check_index_calibration(Model, 8, 4, is_mla=True)
    assert AsyncTLSConfig().check_index_calibration(None, 8, 4, is_mla=False) is None


def test_tensor_parallel_ranks_take_their_kv_heads_rows(tmp_path):
    from vllm_asynctls.calibration import tensor_parallel_kv_heads

    # vLLM's QKVParallelLinear: equal consecutive shares, or one head replicated over consecutive ranks.
    assert [tensor_parallel_kv_heads(8, r, 4) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [tensor_parallel_kv_heads(2, r, 4) for r in range(4)] == [[0], [0], [1], [1]]
    assert tensor_parallel_kv_heads(2, 0, 1) == [0, 1]
    cal = load_calibration(_file(tmp_path))
    assert cal.channels(0, [1]).tolist() == [[1, 3, 5, 7]] and cal.channels(1).shape == (2, 4)


def test_layer_number_of_vllm_layer_names():
    assert layer_number("model.layers.3.self_attn.attn") == 3
    assert layer_number("language_model.model.layers.17.self_attn.attn") == 17
    with pytest.raises(ValueError, match="cannot tell the layer number"):
        layer_number("encoder.0.layers.1.attn")


def test_pca_basis_is_calibrated_online_from_the_first_real_write(monkeypatch):
    # index_basis="pca": the layer's first real write calibrates each kv head's basis from its keys (no
    # file), the token index on the leading directions; index_bits=16 calibrates too (the summaries
    # are in the basis).
    from vllm_asynctls import layer_index

    monkeypatch.setattr(layer_index, "_is_dummy_run", lambda: False)
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(40, 2, 32, generator=gen) * torch.linspace(0.1, 3.0, 32)
    slots = torch.arange(40)
    slots[3] = -1  # padding: not a calibration key
    for bits in (4, 16):
        cfg = AsyncTLSConfig(index_basis="pca", selection_block_size=16, num_blocks=8, token_budget=64,
                             index_bits=bits).sparse_config(head_dim=32, is_mla=False)
        layer = layer_index.LayerIndex(cfg, num_kv_heads=2, head_dim=32, is_mla=False)
        layer.ensure(8, 16, torch.float32, "cpu")
        layer.write(keys, slots)
        assert layer.calibrated and layer.index.basis is not None
        torch.testing.assert_close(layer.index.basis, ref.choose_index_basis(keys[slots >= 0]), atol=0, rtol=0)
        assert torch.equal(layer.index.channel_ids, torch.arange(cfg.index_channels).expand(2, -1))
        assert layer.index.block_scale.abs().sum() > 0


def test_index_basis_knob_is_validated():
    assert AsyncTLSConfig(index_basis="pca").sparse_config(head_dim=128, is_mla=False).index_basis == "pca"
    with pytest.raises(ValueError, match="asynctls knob index_basis must be one of"):
        AsyncTLSConfig(index_basis="svd")
    with pytest.raises(ValueError, match="index_calibration_file holds index channels, so it needs index_basis"):
        AsyncTLSConfig(index_basis="pca", index_calibration_file="calibration.json")
