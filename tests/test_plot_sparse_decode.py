"""`benchmarks/plot_sparse_decode.py`: per-layer rows grouped by schedule, and a clear error without them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import plot_sparse_decode as plot  # noqa: E402


def _row(context, lagged=False, defer=None, budget=2048, batch=8, per_layer=True):
    row = dict(kind="gqa", B=batch, context=context, budget=budget, lagged=lagged, speedup=3.0)
    if defer is not None:
        row["defer_block_join"] = defer
    if per_layer:
        row.update(speedup_per_layer=context / 8192, over_floor_per_layer=2.0)
    return row


def test_rows_are_grouped_by_schedule_and_sorted(tmp_path):
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps({"rows": [_row(131072), _row(65536), _row(65536, per_layer=False),
                                      _row(65536, budget=1024), _row(65536, batch=32)]}))
    b.write_text(json.dumps({"rows": [_row(65536, lagged=True), _row(131072, lagged=True, defer=True),
                                      _row(65536, lagged=True, defer=False), {"kind": "recall", "B": 8}]}))
    rows = plot.per_layer_rows(plot.load_results([a, b]), batch=8, budget=2048)
    assert {k: [r["context"] for r in v] for k, v in rows.items()} == {
        "standard": [65536, 131072],
        "lagged, pipelined": [65536, 65536],
        "pipelined, block stage joined by the next layer": [131072],
    }
    out = tmp_path / "plot.png"
    plot.main([str(a), str(b), "--out", str(out)])
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"


def test_no_per_layer_rows_is_a_clear_error(tmp_path, capsys):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"rows": [_row(65536, per_layer=False)]}))
    with pytest.raises(SystemExit):
        plot.main([str(a), "--out", str(tmp_path / "x.png"), "--budget", "1024"])
    assert "no per-layer GQA rows for --batch 8 and --budget 1024" in capsys.readouterr().err


def test_files_of_different_shapes_are_refused_and_old_files_are_qwen3(tmp_path, capsys):
    old = tmp_path / "old.json"  # written before --model-shapes: Qwen3-8B's shapes
    old.write_text(json.dumps({"rows": [_row(65536)]}))
    llama = tmp_path / "llama.json"
    llama.write_text(json.dumps({"gqa_shapes": {"model": "llama-3.2-1b", "head_dim": 64}, "rows": [_row(65536)]}))
    assert plot.gqa_shapes(plot.load_results([old])) == "qwen3-8b"
    assert plot.gqa_shapes(plot.load_results([llama])) == "llama-3.2-1b"
    with pytest.raises(SystemExit):
        plot.main([str(old), str(llama), "--out", str(tmp_path / "x.png")])
    assert "different GQA shapes ['llama-3.2-1b', 'qwen3-8b']" in capsys.readouterr().err
    recall_only = tmp_path / "recall.json"  # no per-layer GQA rows: its (default) shapes do not count
    recall_only.write_text(json.dumps({"rows": [{"kind": "recall", "B": 2}]}))
    assert plot.gqa_shapes(plot.load_results([llama, recall_only])) == "llama-3.2-1b"


@pytest.mark.parametrize("shapes,title,targets", [(None, "Qwen3-8B shapes", True),
                                                   ("llama-3.2-1b", "Llama-3.2-1B shapes", False)])
def test_the_plot_names_its_shapes_and_marks_the_targets_only_at_qwen3(tmp_path, monkeypatch, shapes, title, targets):
    from matplotlib.figure import Figure

    data = {"rows": [_row(65536), _row(131072)]}
    if shapes:
        data["gqa_shapes"] = {"model": shapes}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    plot.main([str(path), "--out", str(tmp_path / "x.png")])
    fig = saved[0]
    assert title in fig._suptitle.get_text()
    labels = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert any(label.startswith("target") for label in labels) == targets
