"""`deepwish train --init-from SRC`: a fresh run that starts from existing weights.

SRC is a deepwish run directory, a checkpoint directory (either format) or an HF directory.
Only the weights are read (the EMA weights instead with `--init-ema`): never the optimizer
state, the schedule position, the data position or the RNG states, which all start fresh. The
run's model section must describe the same network as the weights; the fields that only shape
training (initialisation, kernel choice, balancing-loss weights) may differ.

One change of network is allowed: dense attention layers (mixer gqa) of the weights may become
Native Sparse Attention layers (mixer nsa, model/nsa.py) here, every other layer and field equal.
The NSA layers take the dense q/k/v/o projections and QK-norms (same names); their new parameters
(compression MLPs, gates) keep the model's own initialisation, and the run names them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from deepwish.config import ConfigError, ModelConfig, from_dict, to_dict
from deepwish.weights import is_hf_dir, load_weights

# Model fields that do not change what the weights mean: free to differ from the source.
TRAINING_ONLY_FIELDS = ("init_std", "attn_backend", "gdn_backend", "dsa_backend", "router_aux_loss_coef",
                        "seq_aux_loss_coef", "bias_update_rate")


def source_config(path: str | Path) -> ModelConfig:
    """The model config the weights at `path` were made with (no tensor is read)."""
    if is_hf_dir(path):
        from deepwish.hf.io import config_from_hf
        return config_from_hf(path)
    from deepwish.train.checkpoint import read_meta
    meta = read_meta(path)
    return from_dict(meta["config"], source=str(meta["path"] / "meta.json")).model


# Parameters an NSA layer has and a dense attention layer has not (model/nsa.py).
NSA_NEW_PARAMS = ("k_compress.", "v_compress.", "gate_proj.")


def dense_to_nsa(theirs: ModelConfig, ours: ModelConfig) -> bool:
    """Some gqa layers of `theirs` are nsa layers in `ours`; every other layer (mixer and FFN) is equal."""
    if theirs.n_layers != ours.n_layers:
        return False
    pairs = list(zip(theirs.layer_types, ours.layer_types))
    return (any(t[0] == "gqa" and o[0] == "nsa" for t, o in pairs)
            and all(t[1] == o[1] and (t[0] == o[0] or (t[0], o[0]) == ("gqa", "nsa")) for t, o in pairs))


def init_problems(path: str | Path, model: ModelConfig) -> list[str]:
    """One problem naming every model field in which `model` differs from the weights at `path`."""
    try:
        source = source_config(path)
    except (OSError, ValueError) as e:  # a missing or unreadable source, named
        return [f"--init-from {path}: {e}"]
    theirs, ours = to_dict(source), to_dict(model)
    free = set(TRAINING_ONLY_FIELDS)
    if dense_to_nsa(source, model):  # the layer pattern and the NSA fields describe the new layers only
        free |= {k for k in ours if k.startswith("nsa_")} | {"mixer", "layer_mixers", "full_attention_interval",
                                                              "attn_mixer"}
    diff = [k for k in ours if k not in free and ours[k] != theirs.get(k)]
    if not diff:
        return []
    return [f"--init-from {path}: the model section differs from the weights' in "
            + ", ".join(f"{k} ({theirs.get(k)!r} in the weights vs {ours[k]!r} here)" for k in diff)]


def load_init_weights(path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The weights at `path` as a CPU state_dict (deepwish.weights: never the optimizer state);
    ema=True: the EMA weights of a deepwish checkpoint."""
    if is_hf_dir(path):
        if ema:
            raise ConfigError(f"--init-ema: {path} is an HF directory, which holds no EMA weights")
        from deepwish.hf.io import load_hf
        return load_hf(path, dtype=torch.float32).state_dict()
    return load_weights(path, ema=ema)[0]


def load_init(model: torch.nn.Module, path: str | Path, ema: bool = False) -> list[str]:
    """Load the weights at `path` into `model`. Returns the names of the parameters the weights do
    not hold, which keep the model's own initialisation: only the new parameters of NSA layers
    (NSA_NEW_PARAMS) may be missing; anything else missing or left over is an error naming it."""
    from deepwish.model.nsa import NSA

    missing, unexpected = model.load_state_dict(load_init_weights(path, ema=ema), strict=False)

    def nsa_new(name: str) -> bool:
        owner, _, rest = name.partition(".mixer.")
        return (bool(rest) and rest.startswith(NSA_NEW_PARAMS)
                and isinstance(model.get_submodule(owner + ".mixer"), NSA))

    bad = [n for n in missing if not nsa_new(n)]
    if bad or unexpected:
        raise ConfigError(f"--init-from {path}: the weights do not fit the model: "
                          + "; ".join(([f"missing {', '.join(bad)}"] if bad else [])
                                      + ([f"unexpected {', '.join(unexpected)}"] if unexpected else [])))
    return list(missing)
