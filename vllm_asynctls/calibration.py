"""Index-channel calibration files: the optional offline step of the token index.

Design note
-----------
By default each layer's index channels are chosen online, from the keys of the first prefill the
engine serves (`layer_index.py`: no download, no offline step). A calibration file fixes them per
layer instead, from a run of the model over calibration text with its queries as well as its keys
(Double Sparsity's offline calibration): a channel then ranks by the spread of its `q . k` term,
`|q_c| std(k_c)` (`choose_index_channels(..., metric="std", queries=...)`), not by the keys alone.

    python -m vllm_asynctls.calibration MODEL --out channels.json [--text FILE ...]
    vllm serve MODEL --attention-backend asynctls \
        --additional-config '{"asynctls": {"index_calibration_file": "channels.json"}}'

The calibration text defaults to the project's synthetic long-context suite (filler prose with
needles; no dataset download); text of the workload, given with `--text`, is better. The model runs
once per text in transformers (Llama-style attention: `q_proj` / `k_proj`, optional `q_norm` /
`k_norm`, RoPE), through `vllm_asynctls.evaluation.recall.capture_qk`, which records post-RoPE keys
of every position and queries every `query_stride` positions.

The file is JSON, readable and diffable: `{"format": "asynctls-index-channels", "version": 1,
"model", "metric", "uses_queries", "index_channels", "num_kv_heads", "head_dim",
"calibration_tokens", "layers": [[[channel, ...] per kv head] per layer]}`. The plugin checks it
against the model at start-up (layer count, kv heads, head dim, `index_channels`), so a file made for
another model fails `LLM(...)` with a clear error instead of serving with the wrong channels. Each
attention layer takes the row of its decoder layer (the number in vLLM's layer name) and, under tensor
parallelism, the rows of the kv heads its rank holds (`tensor_parallel_kv_heads`). Every worker reads
the file, so give a path they all see.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

FORMAT = "asynctls-index-channels"
VERSION = 1

__all__ = ["CalibrationCapture", "IndexCalibration", "calibrate_index_channels", "capture_calibration", "index_channels_in_use", "layer_number", "load_calibration",
           "main", "tensor_parallel_kv_heads"]


def layer_number(layer_name: str) -> int:
    """The decoder layer a vLLM attention layer name belongs to, by vLLM's own `extract_layer_index`
    ("model.layers.3.self_attn.attn" -> 3)."""
    from vllm.model_executor.models.utils import extract_layer_index

    try:
        return extract_layer_index(layer_name)
    except (AssertionError, ValueError):
        raise ValueError(f"cannot tell the layer number of attention layer {layer_name!r} (expected one integer "
                         "among its dotted parts); index_calibration_file supports decoder-only models") from None


@dataclass(frozen=True)
class IndexCalibration:
    """Per-layer index channels from a calibration run; `layers[l][h]` are kv head h's channels in
    layer l, ascending."""

    model: str
    metric: str
    uses_queries: bool
    index_channels: int
    num_kv_heads: int
    head_dim: int
    calibration_tokens: int
    layers: tuple[tuple[tuple[int, ...], ...], ...]

    def __post_init__(self) -> None:
        for l, heads in enumerate(self.layers):
            if len(heads) != self.num_kv_heads:
                raise ValueError(f"layer {l} has {len(heads)} kv heads; the file says num_kv_heads={self.num_kv_heads}")
            for h, chans in enumerate(heads):
                if len(chans) != self.index_channels or len(set(chans)) != len(chans) or list(chans) != sorted(chans):
                    raise ValueError(f"layer {l}, kv head {h}: expected {self.index_channels} distinct ascending "
                                     f"channels; got {list(chans)}")
                if chans and not (0 <= chans[0] and chans[-1] < self.head_dim):
                    raise ValueError(f"layer {l}, kv head {h}: channels must be in [0, {self.head_dim}); got {list(chans)}")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def check_model(self, num_layers: int, num_kv_heads: int, head_dim: int, index_channels: int) -> None:
        """Raise ValueError naming the first mismatch between the file and a model's attention layers."""
        for what, ours, theirs in (("layers", self.num_layers, num_layers),
                                   ("kv heads per layer", self.num_kv_heads, num_kv_heads),
                                   ("key head dim", self.head_dim, head_dim),
                                   ("index_channels", self.index_channels, index_channels)):
            if ours != theirs:
                raise ValueError(f"the file has {what} {ours}; this model has {theirs} (the file was calibrated on "
                                 f"{self.model!r}; make one for this model with "
                                 f"`python -m vllm_asynctls.calibration MODEL --out FILE`)")

    def channels(self, layer: int, kv_heads: Sequence[int] | None = None, device=None) -> torch.Tensor:
        """(len(kv_heads), index_channels) int64 channel ids of decoder layer `layer` for the model's kv
        heads `kv_heads` (default: all of them; a tensor-parallel rank passes its own,
        `tensor_parallel_kv_heads`)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"the calibration file has layers 0..{self.num_layers - 1}; got layer {layer}")
        heads = self.layers[layer] if kv_heads is None else [self.layers[layer][h] for h in kv_heads]
        return torch.tensor(heads, dtype=torch.int64, device=device)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file atomically (a temporary file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(path)
        return path

    @classmethod
    def from_json(cls, data: Any) -> "IndexCalibration":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not an index calibration file (expected \"format\": {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ValueError(f"unsupported version {data.get('version')!r}; this plugin reads version {VERSION}")
        names = ("model", "metric", "uses_queries", "index_channels", "num_kv_heads", "head_dim",
                 "calibration_tokens", "layers")
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"missing field(s) {missing}")
        layers = tuple(tuple(tuple(int(c) for c in head) for head in layer) for layer in data["layers"])
        return cls(str(data["model"]), str(data["metric"]), bool(data["uses_queries"]), int(data["index_channels"]),
                   int(data["num_kv_heads"]), int(data["head_dim"]), int(data["calibration_tokens"]), layers)


def tensor_parallel_kv_heads(total_kv_heads: int, rank: int, world_size: int) -> list[int]:
    """The model's kv heads a tensor-parallel rank holds, as vLLM's `QKVParallelLinear` splits them:
    consecutive equal shares, or with fewer kv heads than ranks one head replicated over
    `world_size // total_kv_heads` consecutive ranks."""
    if total_kv_heads >= world_size:
        per_rank = total_kv_heads // world_size
        return list(range(rank * per_rank, (rank + 1) * per_rank))
    return [rank // (world_size // total_kv_heads)]


_LOADED: dict[tuple[str, int, int], IndexCalibration] = {}


def load_calibration(path: str | os.PathLike) -> IndexCalibration:
    """Read and validate a calibration file (cached per path and modification time). Raises ValueError
    saying what is wrong with it."""
    p = Path(path)
    try:
        stat = p.stat()
    except OSError as e:
        raise ValueError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    key = (str(p.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _LOADED:
        try:
            data = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{str(path)!r} is not a readable JSON file: {e}") from None
        try:
            _LOADED[key] = IndexCalibration.from_json(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{str(path)!r}: {e}") from None
    return _LOADED[key]


@dataclass
class CalibrationCapture:
    """What a calibration run records, per layer: the keys of every position and the queries of every
    `query_stride`-th one (float32, on the CPU), over `tokens` tokens. One capture serves any number of
    channel choices (`choose`)."""

    keys: list[torch.Tensor]  # per layer (N, Hkv, D)
    queries: list[torch.Tensor]  # per layer (M, Hq, D)
    tokens: int

    def choose(self, index_channels: int, metric: str = "std", use_queries: bool = True,
               model_name: str = "") -> IndexCalibration:
        """Every layer's channels by the reference's `choose_index_channels`."""
        from asynctls_tip_kernels import sparse_decode_reference as ref

        _check_choice(index_channels, metric, self.keys[0].shape[-1])
        chosen = []
        for keys, queries in zip(self.keys, self.queries):
            ch = ref.choose_index_channels(keys, index_channels, metric=metric, queries=queries if use_queries else None)
            chosen.append(tuple(tuple(int(c) for c in head) for head in ch.tolist()))
        num_kv_heads, head_dim = self.keys[0].shape[1], self.keys[0].shape[2]
        return IndexCalibration(model_name, metric, use_queries, index_channels, num_kv_heads, head_dim, self.tokens,
                                tuple(chosen))


def _check_choice(index_channels: int, metric: str, head_dim: int) -> None:
    from asynctls_tip_kernels.sparse_config import INDEX_CHANNEL_METRICS

    if metric not in INDEX_CHANNEL_METRICS:
        raise ValueError(f"metric must be one of {INDEX_CHANNEL_METRICS}; got {metric!r}")
    if not 1 <= index_channels <= head_dim:
        raise ValueError(f"index_channels must be in [1, {head_dim}] (the key head dim); got {index_channels}")


@torch.no_grad()
def capture_calibration(model: torch.nn.Module, token_ids: Iterable[Sequence[int]], query_stride: int = 8,
                        progress: bool = True, check: tuple[int, str] | None = None) -> CalibrationCapture:
    """Run `model` (transformers, Llama-style attention) over each token sequence and record every
    layer's keys and the queries of every `query_stride`-th position (and the last). `check`:
    (index_channels, metric) to validate against the model once the first pass tells its head dim."""
    from tqdm.auto import tqdm

    from vllm_asynctls.evaluation.recall import capture_qk

    if isinstance(query_stride, bool) or not isinstance(query_stride, int) or query_stride < 1:
        raise ValueError(f"query_stride must be an int >= 1; got {query_stride!r}")
    sequences = [list(ids) for ids in token_ids]
    if not sequences or any(len(ids) == 0 for ids in sequences):
        raise ValueError("calibration needs at least one non-empty token sequence")
    keys: list[list[torch.Tensor]] = []
    queries: list[list[torch.Tensor]] = []
    for ids in tqdm(sequences, desc="calibration forward passes", disable=not progress):
        positions = sorted(set(range(0, len(ids), query_stride)) | {len(ids) - 1})
        layers = capture_qk(model, ids, positions)
        if not keys:
            if check is not None:
                _check_choice(*check, layers[0].keys.shape[-1])
            keys, queries = [[] for _ in layers], [[] for _ in layers]
        for l, layer in enumerate(layers):
            keys[l].append(layer.keys.cpu())
            queries[l].append(layer.queries.cpu())
    return CalibrationCapture([torch.cat(k) for k in keys], [torch.cat(q) for q in queries],
                              sum(len(ids) for ids in sequences))


def calibrate_index_channels(model: torch.nn.Module, token_ids: Iterable[Sequence[int]], index_channels: int,
                             metric: str = "std", use_queries: bool = True, query_stride: int = 8,
                             model_name: str = "", progress: bool = True) -> IndexCalibration:
    """Run `model` over each token sequence (`capture_calibration`) and choose every layer's index
    channels from all their keys (and, with `use_queries`, the captured queries) with the reference's
    `choose_index_channels`."""
    from asynctls_tip_kernels.sparse_config import INDEX_CHANNEL_METRICS

    if metric not in INDEX_CHANNEL_METRICS:  # before any forward pass
        raise ValueError(f"metric must be one of {INDEX_CHANNEL_METRICS}; got {metric!r}")
    capture = capture_calibration(model, token_ids, query_stride, progress, check=(index_channels, metric))
    return capture.choose(index_channels, metric, use_queries, model_name)


def index_channels_in_use(model: torch.nn.Module) -> list[list[list[int]]]:
    """For `LLM.apply_model`: the index channels each asynctls attention layer holds now, in module
    order ([] for a layer whose index is not allocated yet; 0..C-1, its leading directions, for a layer
    with `index_basis="pca"`: see `index_bases_in_use`). A diagnostic."""
    out = []
    for module in model.modules():
        layer_index = getattr(getattr(module, "impl", None), "layer_index", None)
        if layer_index is not None:
            index = layer_index.index
            out.append([] if index is None else index.channel_ids.tolist())
    return out


def index_bases_in_use(model: torch.nn.Module) -> list[tuple[int, ...] | None]:
    """For `LLM.apply_model`: the shape of the basis each asynctls attention layer's index holds now
    (`index_basis="pca"`: the identity until the layer's first real write calibrates it), None without
    one, in module order. A diagnostic."""
    out = []
    for module in model.modules():
        layer_index = getattr(getattr(module, "impl", None), "layer_index", None)
        if layer_index is not None:
            basis = None if layer_index.index is None else layer_index.index.basis
            out.append(None if basis is None else tuple(basis.shape))
    return out


def _calibration_texts(args, tokenizer) -> list[list[int]]:
    if args.text:
        out = []
        for path in args.text:
            ids = tokenizer(Path(path).read_text(), add_special_tokens=False)["input_ids"]
            out += [ids[i:i + args.max_tokens] for i in range(0, len(ids), args.max_tokens)]
        return [ids for ids in out if ids]
    from vllm_asynctls.evaluation import long_context_suite as suite

    samples = suite.build_suite(tokenizer, args.lengths, args.samples_per_length, args.seed)
    return [tokenizer(s.prompt, add_special_tokens=False)["input_ids"] for s in samples]


def main(argv: list[str] | None = None) -> Path:
    from asynctls_tip_kernels.sparse_config import INDEX_CHANNEL_METRICS

    p = argparse.ArgumentParser(prog="python -m vllm_asynctls.calibration",
                                description="Write an AsyncTLS index calibration file for a model.")
    p.add_argument("model", help="transformers checkpoint folder or hub id ('smollm2': SmolLM2-135M-Instruct "
                                 "from its registry package)")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--index-channels", type=int, default=None,
                   help="channels per kv head (default: 32, capped at the head dim and kept even)")
    p.add_argument("--metric", default="std", choices=INDEX_CHANNEL_METRICS,
                   help="key statistic: std (default) or mean_abs")
    p.add_argument("--no-queries", action="store_true", help="rank channels by the keys alone")
    p.add_argument("--text", action="append", default=[], help="calibration text file (repeatable); default: "
                   "the synthetic long-context suite")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens per forward pass of --text files")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096], help="suite prompt lengths")
    p.add_argument("--samples-per-length", type=int, default=1, help="suite samples per task and length")
    p.add_argument("--seed", type=int, default=1, help="suite seed (the accuracy benchmark uses 0)")
    p.add_argument("--query-stride", type=int, default=8, help="keep the query of every N-th position")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_asynctls.config import AsyncTLSConfig

    model_path = args.model
    if model_path == "smollm2":
        from vllm_asynctls.evaluation.real_model import smollm2_checkpoint

        model_path = str(smollm2_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    channels = args.index_channels or AsyncTLSConfig().resolved_index_channels(head_dim, is_mla=False)
    texts = _calibration_texts(args, tokenizer)
    t0 = time.perf_counter()
    cal = calibrate_index_channels(model, texts, channels, metric=args.metric, use_queries=not args.no_queries,
                                   query_stride=args.query_stride, model_name=args.model)
    out = cal.save(args.out)
    print(f"{out}: {cal.num_layers} layers x {cal.num_kv_heads} kv heads x {cal.index_channels} channels "
          f"({cal.metric}{' with queries' if cal.uses_queries else ''}) from {cal.calibration_tokens} tokens "
          f"in {time.perf_counter() - t0:.0f} s")
    return out


if __name__ == "__main__":
    main()
