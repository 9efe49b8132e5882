"""Load HF checkpoints into deepwish models and write deepwish models as HF checkpoints.

A directory with `config.json` and `model.safetensors` (or `model.safetensors.index.json` and
its shards) is read through the family's name table. Every deepwish parameter and persistent
buffer must be produced by the table, every table input must exist with the right shape, and
every checkpoint tensor must be consumed (or be one the family declares as ignorable); anything
else is an error that lists all the problems at once. Nothing is left at random init.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepwish.config import ModelConfig, runtime_overrides
from deepwish.model.transformer import Transformer

# architecture name in config.json -> module holding config_from_hf / config_to_hf / name_table
FAMILIES = {
    "Qwen3ForCausalLM": "deepwish.hf.qwen3",
    "Qwen3MoeForCausalLM": "deepwish.hf.qwen3",
    "Qwen3NextForCausalLM": "deepwish.hf.qwen3_next",
    "DeepseekV3ForCausalLM": "deepwish.hf.deepseek",
    "DeepseekV32ForCausalLM": "deepwish.hf.deepseek",
}
FAMILY_OF_CONFIG = {
    "qwen3": "deepwish.hf.qwen3", "qwen3_moe": "deepwish.hf.qwen3", "qwen3_next": "deepwish.hf.qwen3_next",
    "deepseek_v3": "deepwish.hf.deepseek", "deepseek_v32": "deepwish.hf.deepseek",
}


class CheckpointError(ValueError):
    """An HF checkpoint that cannot be loaded exactly; the message lists every problem."""


def _family_module(arch: str):
    if arch not in FAMILIES:
        raise CheckpointError(f"unsupported architecture {arch!r}; supported: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[arch])


def read_hf_config(path: str | Path) -> dict:
    path = Path(path)
    f = path / "config.json"
    if not f.exists():
        raise CheckpointError(f"{path}: no config.json (is this an HF checkpoint directory?)")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{f}: expected a JSON object, got {type(d).__name__}")
    if not d.get("architectures") or not isinstance(d["architectures"], list):
        raise CheckpointError(f"{f}: no 'architectures' entry")
    return d


def _family_config(d: dict, source: str) -> ModelConfig:
    """The family's config mapping, with a partial or mistyped config.json one error naming the field."""
    arch = d["architectures"][0]
    fam = _family_module(arch)
    try:
        return fam.config_from_hf(d)
    except KeyError as e:
        raise CheckpointError(f"{source}: config.json lacks the field {e.args[0]!r} that {arch} needs") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}: config.json has a value {arch} cannot use ({e})") from None


def config_from_hf(path_or_dict) -> ModelConfig:
    d = path_or_dict if isinstance(path_or_dict, dict) else read_hf_config(path_or_dict)
    return _family_config(d, "config" if isinstance(path_or_dict, dict) else str(path_or_dict))


class _TensorFiles:
    """Lazy access to the tensors of single-file or sharded safetensors checkpoints."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e})") from None
            self.where = {k: path / v for k, v in wm.items()}
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors files")
            self.where = {}
            for f in files:
                with _safe_open(f) as h:
                    for k in h.keys():
                        self.where[k] = f
        self._open: dict[Path, object] = {}

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, key: str) -> torch.Tensor:
        f = self.where[key]
        if f not in self._open:
            if not f.exists():
                raise CheckpointError(f"shard {f} named in the index does not exist")
            self._open[f] = _safe_open(f)
        try:
            return self._open[f].get_tensor(key)
        except Exception as e:  # safetensors raises its own error type for short or corrupt files
            raise CheckpointError(f"{f}: cannot read tensor {key!r} (truncated or corrupt file? {e})") from None

    def close(self):
        self._open.clear()


def _safe_open(f: Path):
    try:
        return safe_open(f, "pt")
    except Exception as e:  # a truncated or garbage file: safetensors' own error type, or OSError
        raise CheckpointError(f"{f}: not a readable safetensors file (truncated or corrupt? {e})") from None


def _reset_buffers(model: Transformer) -> None:
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()


def load_hf(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
            overrides: tuple[str, ...] | list[str] = ()) -> Transformer:
    """Build a deepwish model from an HF checkpoint directory (exact weights, checked names).
    `overrides`: `model.KEY=VALUE` for config.RUNTIME_MODEL_FIELDS (backends, decode options)."""
    path = Path(path)
    d = read_hf_config(path)
    fam = _family_module(d["architectures"][0])
    cfg = runtime_overrides(_family_config(d, str(path)), overrides)
    if dtype is None:
        name = d.get("dtype") or d.get("torch_dtype") or "float32"
        dtype = getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32
    files = _TensorFiles(path)
    fit = getattr(fam, "fit_config_to_checkpoint", None)
    if fit is not None:  # e.g. DeepSeek: MTP modules announced by the config but absent from the files
        cfg = fit(cfg, files.keys())
    table = fam.name_table(cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v for k, v in model.state_dict().items()}
    problems: list[str] = []
    produced = {e.ours for e in table}
    for k in expected:
        if k not in produced:
            problems.append(f"deepwish tensor {k} has no source in the {fam.__name__} name table")
    have = files.keys()
    used: set[str] = set()
    state = {}
    for e in table:
        missing = [h for h in e.hf if h not in have]
        used.update(h for h in e.hf if h in have)  # expected by the table, so never "unexpected"
        if missing:
            problems.append(f"missing in checkpoint: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} (for {e.ours})")
            continue
        tensors = [files.get(h) for h in e.hf]
        dequant = getattr(fam, "dequantize", None)
        if dequant is not None:
            tensors = [dequant(h, t, files, have, used) for h, t in zip(e.hf, tensors)]
        t = e.pack(tensors)
        if e.ours not in expected:
            problems.append(f"name table produced {e.ours}, which the model does not have")
            continue
        if tuple(t.shape) != tuple(expected[e.ours].shape):
            problems.append(f"shape mismatch for {e.ours}: checkpoint gives {tuple(t.shape)}, "
                            f"model expects {tuple(expected[e.ours].shape)} (from {e.hf[0]})")
            continue
        keep_fp32 = expected[e.ours].dtype == torch.float32 and getattr(fam, "FP32_KEYS", ()) and \
            any(s in e.ours for s in fam.FP32_KEYS)
        state[e.ours] = t.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
    ignorable = getattr(fam, "IGNORABLE", ())
    unexpected = sorted(k for k in have - used if not any(s in k for s in ignorable))
    if unexpected:
        problems.append(f"unexpected tensors in checkpoint ({len(unexpected)}): {', '.join(unexpected[:6])}"
                        f"{' ...' if len(unexpected) > 6 else ''}")
    files.close()
    if problems:
        raise CheckpointError(f"cannot load {path} as {d['architectures'][0]}:\n  - " + "\n  - ".join(problems))
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=True, assign=True)
    _reset_buffers(model)
    return model.to(device).eval()


def save_hf(model: Transformer, path: str | Path, dtype: torch.dtype | None = None,
            max_shard_bytes: int = 4 * 1024**3, tokenizer=None) -> Path:
    """Write `model` as an HF checkpoint directory (config.json + safetensors)."""
    cfg = model.cfg
    if cfg.family not in FAMILY_OF_CONFIG or cfg.gpt_options:
        what = (f"family {cfg.family!r}" if cfg.family not in FAMILY_OF_CONFIG
                else f"the GPT-family option(s) {', '.join(cfg.gpt_options)}")
        raise CheckpointError(f"HF export is not supported for {what}: no HF model class computes this model "
                              f"(exportable families: {', '.join(FAMILY_OF_CONFIG)}); use the deepwish checkpoint "
                              f"itself (deepwish generate --ckpt RUN)")
    if any(m == "nsa" for m, _ in cfg.layer_types):  # the name table would silently drop NSA's own weights
        raise CheckpointError("HF export is not supported for Native Sparse Attention (mixer nsa) layers: no HF "
                              "model class computes them; use the deepwish checkpoint itself (deepwish generate --ckpt RUN)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fam = importlib.import_module(FAMILY_OF_CONFIG[cfg.family])
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for e in fam.name_table(cfg):
        for k, t in zip(e.hf, e.unpack(sd[e.ours])):
            t = t.detach().to("cpu")
            keep_fp32 = any(s in e.ours for s in getattr(fam, "FP32_KEYS", ()))  # e.g. DeepSeek router bias
            if dtype is not None and t.is_floating_point() and not keep_fp32:
                t = t.to(dtype)
            out[k] = t.contiguous().clone()
    hf_cfg = fam.config_to_hf(cfg)
    first = next(iter(out.values()))
    hf_cfg["dtype"] = str(dtype or first.dtype).replace("torch.", "")
    (path / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in out.items():
        nb = t.numel() * t.element_size()
        if size + nb > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nb
    for old in list(path.glob("*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, s in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(s, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in s})
        total = sum(t.numel() * t.element_size() for t in out.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer is not None:  # a deepwish Tokenizer saves into a directory; a raw `tokenizers` one to a file
        tokenizer.save(path) if hasattr(tokenizer, "fingerprint") else tokenizer.save(str(path / "tokenizer.json"))
    return path
