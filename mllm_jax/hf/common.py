"""Declarative HF <-> mllm_jax weight mapping, and safetensors I/O with numpy only.

A conversion is a list of ``Rule``s: an HF key pattern, our param path(s) and a named transform pair.
``{i}`` in a pattern expands over layer indices. Transforms are exact (transposes, splits and
concatenations), so HF -> ours -> HF reproduces every tensor bit for bit, dtype included.

Weights are read only from safetensors: nothing here ever unpickles a file (PyTorch ``.bin`` files are
converted once, by explicit opt-in: ``hf/pytorch_bin.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import ml_dtypes
import numpy as np

from mllm_jax import paths
from mllm_jax.errors import ConversionError

# safetensors dtype tag <-> numpy dtype (bf16 through ml_dtypes, which JAX uses too).
_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_TAGS = {v: k for k, v in _DTYPES.items()}


# ---------------------------------------------------------------- the other files of a HF directory

# Where stock HF repos keep a tokenizer (any one of these): a fast tokenizer.json, the config naming
# the others, a SentencePiece tokenizer.model (LLaMA) or spiece.model (T5, SigLIP), a BPE vocab.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json")
# and an image processor's settings (size, crop, mean / std)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def has_any_file(directory: str, names: Sequence[str]) -> bool:
    """Whether ``directory`` (local or ``gs://``) holds at least one of the files ``names``."""
    return any(paths.isfile(paths.join(directory, n)) for n in names)


# ---------------------------------------------------------------- safetensors


def read_file(path: str) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
        out[name] = np.array(arr)  # own the memory: the memmap closes with the file
    return out


def read_safetensors(model_dir: str) -> dict[str, np.ndarray]:
    """All tensors of a HF directory (single file or sharded with ``model.safetensors.index.json``)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(single):
        files = ["model.safetensors"]
    else:
        pickled = [n for n in os.listdir(model_dir) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = (
            f" (found {', '.join(sorted(pickled)[:3])}, which is only read by explicit opt-in)"
            if pickled
            else ""
        )
        raise ConversionError(
            f"{model_dir}: no model.safetensors or model.safetensors.index.json{hint}; safetensors is "
            f"required: convert it once with python -m mllm_jax.convert --from_hf={model_dir}"
            " --to_safetensors=OUT_DIR"
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(read_file(os.path.join(model_dir, name)))
    return tensors


def write_file(path: str, tensors: dict[str, np.ndarray]):
    header, offset, order = {}, 0, sorted(tensors)
    for name in order:
        arr = tensors[name]
        if arr.dtype not in _TAGS:
            raise ConversionError(f"cannot write tensor {name} of dtype {arr.dtype} to safetensors")
        header[name] = {
            "dtype": _TAGS[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in order:
            f.write(np.ascontiguousarray(tensors[name]).tobytes())
    os.replace(tmp, path)


def write_safetensors(model_dir: str, tensors: dict[str, np.ndarray], max_shard_bytes: int = 5 * 2**30):
    """Write HF-style safetensors, sharded with an index file above ``max_shard_bytes``."""
    os.makedirs(model_dir, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        write_file(os.path.join(model_dir, "model.safetensors"), shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_file(os.path.join(model_dir, fname), shard)
        weight_map.update({k: fname for k in shard})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{model_dir}: no config.json; expected a HuggingFace model directory")
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------- transforms

Transform = Callable[..., "np.ndarray | list[np.ndarray]"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """A named pair of exact inverse transforms between one HF tensor and our param(s)."""

    to_ours: Transform
    to_hf: Transform


SAME = Layout(lambda w: w, lambda w: w)
LINEAR = Layout(lambda w: w.T, lambda k: k.T)  # torch Linear [out, in] <-> Dense kernel [in, out]
CONV = Layout(lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))  # OIHW <-> HWIO
SPLIT3_LINEAR = Layout(  # fused [3D, in] (torch MultiheadAttention in_proj) <-> three kernels
    lambda w: [p.T for p in np.split(w, 3, axis=0)], lambda q, k, v: np.concatenate([q.T, k.T, v.T], axis=0)
)
SPLIT3 = Layout(lambda b: list(np.split(b, 3, axis=0)), lambda q, k, v: np.concatenate([q, k, v], axis=0))


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF key, may contain {i}
    ours: str | tuple[str, ...]  # our param path(s) joined with "/", may contain {i}
    layout: Layout = SAME
    layers: int = 0  # how many values {i} takes (0: no {i})

    def expand(self):
        ours = (self.ours,) if isinstance(self.ours, str) else self.ours
        if not self.layers:
            yield self.hf, ours
        for i in range(self.layers):
            yield self.hf.format(i=i), tuple(p.format(i=i) for p in ours)


# HF's names of the sizes every transformer config has -> our config fields.
DIMS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
}


def dims_from_hf(d: dict, defaults: dict | None = None) -> dict:
    """Our size fields from an HF config; without ``defaults`` (ours, by our names) each must be there."""
    return {ours: d[hf] if defaults is None else d.get(hf, defaults[ours]) for hf, ours in DIMS.items()}


def dims_to_hf(c) -> dict:
    return {hf: getattr(c, ours) for hf, ours in DIMS.items()}


def ln(hf: str, ours: str, layers: int = 0, bias: bool = True) -> list[Rule]:
    """A LayerNorm (without ``bias``: an RMSNorm): HF ``weight`` / ``bias`` <-> our ``scale`` / ``bias``."""
    rules = [Rule(f"{hf}.weight", f"{ours}/scale", SAME, layers)]
    return rules + ([Rule(f"{hf}.bias", f"{ours}/bias", SAME, layers)] if bias else [])


def dense(hf: str, ours: str, layers: int = 0, bias: bool = True) -> list[Rule]:
    """A torch Linear <-> our ``Dense``."""
    rules = [Rule(f"{hf}.weight", f"{ours}/kernel", LINEAR, layers)]
    return rules + ([Rule(f"{hf}.bias", f"{ours}/bias", SAME, layers)] if bias else [])


def prefixed(rules: Sequence[Rule], hf_prefix: str, our_prefix: str) -> list[Rule]:
    """Re-root a sub-model's rules (e.g. the vision tower's) inside a composite."""
    out = []
    for r in rules:
        ours = (r.ours,) if isinstance(r.ours, str) else r.ours
        out.append(dataclasses.replace(r, hf=hf_prefix + r.hf, ours=tuple(our_prefix + p for p in ours)))
    return out


def normalize_keys(
    tensors: dict[str, np.ndarray], aliases: Sequence[tuple[str, str]]
) -> dict[str, np.ndarray]:
    """Rename legacy/in-memory key prefixes to the canonical ones (first matching alias wins)."""
    out = {}
    for key, value in tensors.items():
        for old, new in aliases:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def _set(tree: dict, path: str, value):
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get(tree: dict, path: str):
    for p in path.split("/"):
        if not isinstance(tree, dict) or p not in tree:
            raise KeyError(path)
        tree = tree[p]
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def hf_to_params(tensors: dict[str, np.ndarray], rules: Sequence[Rule], what: str) -> dict:
    """Apply ``rules`` to HF tensors; every rule must find its key and every key must be used."""
    params: dict = {}
    used = set()
    for rule in rules:
        for hf_key, ours in rule.expand():
            if hf_key not in tensors:
                raise ConversionError(f"{what}: missing tensor {hf_key!r} in the checkpoint")
            value = rule.layout.to_ours(tensors[hf_key])
            values = value if isinstance(value, list) else [value]
            for path, v in zip(ours, values, strict=True):
                _set(params, path, np.asarray(v))
            used.add(hf_key)
    unused = sorted(set(tensors) - used)
    if unused:
        more = f" (and {len(unused) - 3} more)" if len(unused) > 3 else ""
        raise ConversionError(
            f"{what}: unexpected tensors {unused[:3]}{more}; is this the right architecture?"
        )
    return params


def params_to_hf(params: dict, rules: Sequence[Rule], what: str) -> dict[str, np.ndarray]:
    tensors = {}
    for rule in rules:
        for hf_key, ours in rule.expand():
            try:
                values = [np.asarray(_get(params, p)) for p in ours]
            except KeyError as e:
                raise ConversionError(f"{what}: params have no {e.args[0]!r}") from None
            tensors[hf_key] = np.ascontiguousarray(rule.layout.to_hf(*values))
    return tensors


def merge_config(base: dict | None, ours: dict) -> dict:
    """Our values over the original HF config (nested sub-configs merged too), so fields we do not
    model (token ids, dtype, names) survive a round trip."""
    out = dict(base or {})
    for k, v in ours.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_config(out[k], v)
        else:
            out[k] = v
    return out
