"""Optimizers: Muon for hidden matrices, AdamW for everything else, assigned in one place.

Muon itself (and its pure functions: batched Newton–Schulz, Polar Express coefficients, NorMuon)
lives in train/muon.py. Embeddings, the output head, norms, biases, routers/gates and every 1-D
parameter stay on AdamW (the Muon write-up and Moonlight, arXiv:2502.16982, both keep these on
Adam: they are not "hidden" linear maps). Weight decay is decoupled.

Groups follow parameter roles (model/roles.py), never names: hidden matrices, embeddings, head and
scalars/gates (norms, biases, gates, learned scalars), each with its own learning rate and weight
decay (train.embed_lr, head_lr, scalar_lr, embed_wd, head_wd, scalar_wd, muon_wd; at their
defaults: train.lr everywhere but Muon's train.muon_lr, train.weight_decay everywhere but the
scalars, which take none).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deepwish.model.roles import DECAY_ROLES, MUON_ROLES, ROLES, param_roles
from deepwish.train.muon import (NS_COEFFS, POLAR_EXPRESS_COEFFS, DistributedMuon, Muon,  # noqa: F401 (re-exported)
                                 newton_schulz, normuon_normalize)


class ChainedOptimizer:
    """Several optimizers stepped together, seen as one: `param_groups` is their concatenation
    (the schedule scales every group's `base_lr`), state_dict is keyed by name.

    overlap (train.optimizer_overlap): on CUDA, every optimizer after the first steps on a second
    stream while the first steps on the current one. Muon's step is Newton–Schulz matmuls
    (compute-bound), AdamW's on embeddings, head and norms is elementwise (memory-bound): side by
    side the second can fill what the first leaves of the memory system. The side stream waits for
    the current one before (gradients, clipping and the schedule's lr are in place) and the
    current one waits for the side stream after, so what follows the step sees every update; the
    updates themselves are the sequential ones (disjoint parameters, same kernels)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], overlap: bool = False):
        if not optimizers:
            raise ValueError("ChainedOptimizer needs at least one optimizer")
        self.optimizers = optimizers
        self.overlap = overlap
        self._side: tuple[torch.device, torch.cuda.Stream] | None = None  # made at the first overlapped step

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def _overlap_device(self) -> torch.device | None:
        """The CUDA device every parameter lives on when the step can overlap, else None."""
        if not self.overlap or len(self.optimizers) < 2:
            return None
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            return None  # CPU (and CPU-offloaded shards): sequential
        return next(iter(devices))

    def take_grad_scale(self, coef: torch.Tensor) -> set[int]:
        """Gradient clipping's coefficient (a 0-d tensor, <= 1), for the next step only, handed to the
        optimizers that apply it inside their update as `grad_scale` = 1 / coef (torch's fused-optimizer
        protocol: each gradient is divided by it as it is read), over plain (not FSDP2-sharded) tensors:
        torch's fused Adam/AdamW (which writes the scaled gradient back) and Muon (which reads it
        scaled in its momentum pass and leaves the gradient as it was). Returns the ids of the
        parameters whose gradients those will scale; the caller scales the rest (train/parallel.py
        clip_grad_norm)."""
        from torch.distributed.tensor import DTensor
        taken: set[int] = set()
        for opt in self.optimizers.values():
            params = [p for g in opt.param_groups for p in g["params"]]
            fused_adam = isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) and opt.defaults.get("fused")
            muon = isinstance(opt, Muon) and not isinstance(opt, DistributedMuon)
            if (fused_adam or muon) and not any(isinstance(p, DTensor) for p in params):
                opt.grad_scale = 1.0 / coef.to(torch.float32)  # read by the step, cleared after it
                taken.update(id(p) for p in params)
        return taken

    def step(self) -> None:
        try:
            self._step()
        finally:  # a coefficient from take_grad_scale serves one step
            for opt in self.optimizers.values():
                opt.__dict__.pop("grad_scale", None)

    def _step(self) -> None:
        if self._side is None or not self.overlap:
            device = self._overlap_device()
            if device is None:
                for opt in self.optimizers.values():
                    opt.step()
                return
            self._side = (device, torch.cuda.Stream(device))
        device, side = self._side
        main = torch.cuda.current_stream(device)
        first, *rest = self.optimizers.values()
        side.wait_stream(main)
        with torch.cuda.stream(side):  # queued first, so its kernels are there to fill the gaps
            for opt in rest:
                opt.step()
        first.step()
        main.wait_stream(side)

    def warm_up(self) -> int:
        """Each optimizer's kernel warm-up (Muon.warm_up) where it has one; the number of shape
        buckets warmed. Nothing any optimizer holds changes."""
        return sum(opt.warm_up() for opt in self.optimizers.values() if hasattr(opt, "warm_up"))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state has parts {sorted(state)}, expected {sorted(self.optimizers)} "
                             f"(was the checkpoint written with another train.optimizer?)")
        for name, opt in self.optimizers.items():
            try:
                opt.load_state_dict(state[name])
            except ValueError as e:  # torch's count/size check of the parameter groups
                saved = [len(g["params"]) for g in state[name].get("param_groups", [])]
                here = {g.get("name", "?"): len(g["params"]) for g in opt.param_groups}
                raise ValueError(
                    f"{name} state does not fit this run's parameter groups ({e}): saved groups of {saved} "
                    f"parameters, here {here}. The groups follow parameter roles (train/optim.py GROUP_ROLES); "
                    f"a checkpoint written while they were drawn otherwise (before 2026-12-04 a tied token table "
                    f"was in the embeddings' group, now the head's) trains on with --init-from CHECKPOINT "
                    f"(weights only, a fresh optimizer)") from None


@dataclass
class ParamAssignment:
    """Names of the parameters in each family (for printing and for tests)."""
    muon: list[str]
    adamw_decay: list[str]
    adamw_no_decay: list[str]


def classify_params(model: nn.Module) -> tuple[dict[str, list[nn.Parameter]], ParamAssignment]:
    """Split parameters into muon / adamw_decay / adamw_no_decay by their roles (model/roles.py),
    asserting full, exclusive cover.

    Muon: hidden matrices and stacks of them (roles matrix, matrix_out, expert, expert_out).
    AdamW with decay: embeddings and the output head (a tied token table is the head).
    AdamW without decay: norms, biases, routers/gates, convolution kernels, scalars.
    """
    roles = param_roles(model)
    groups: dict[str, list[nn.Parameter]] = {"muon": [], "adamw_decay": [], "adamw_no_decay": []}
    names: dict[str, list[str]] = {k: [] for k in groups}
    for name, p in model.named_parameters():  # a tied parameter once, under its first name
        if not p.requires_grad:
            continue
        role = roles[name]
        kind = "muon" if role in MUON_ROLES else "adamw_decay" if role in DECAY_ROLES else "adamw_no_decay"
        groups[kind].append(p)
        names[kind].append(name)

    # The assertion the design asks for: every trainable parameter in exactly one group.
    all_ids = [id(p) for g in groups.values() for p in g]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(all_ids) == len(set(all_ids)), "a parameter was assigned to two optimizer groups"
    missing = trainable - set(all_ids)
    assert not missing, f"{len(missing)} trainable parameters have no optimizer group"
    return groups, ParamAssignment(names["muon"], names["adamw_decay"], names["adamw_no_decay"])


# Optimizer groups by role class (model/roles.py): what each is, its lr and weight-decay fields.
GROUP_ROLES = {
    "matrix": MUON_ROLES,  # hidden matrices: Muon (optimizer=muon) or AdamW (optimizer=adamw)
    "embedding": frozenset({"embedding"}),  # token, value and position embeddings
    "head": frozenset({"head"}),  # the LM head (a tied token table too: Transformer declares it so)
    "scalar": frozenset(ROLES) - MUON_ROLES - DECAY_ROLES,  # norms, biases, gates, convolutions, scalars
}


def group_settings(cfg) -> dict[str, tuple[float, float]]:
    """{group: (lr, weight decay)} from TrainConfig `cfg`: a 0 lr is train.lr (train.muon_lr for
    Muon's matrices), a negative decay train.weight_decay."""
    def wd(x: float) -> float:
        return cfg.weight_decay if x < 0 else x

    matrix_lr = cfg.muon_lr if cfg.optimizer == "muon" else cfg.lr
    return {"matrix": (matrix_lr, wd(cfg.muon_wd)), "embedding": (cfg.embed_lr or cfg.lr, wd(cfg.embed_wd)),
            "head": (cfg.head_lr or cfg.lr, wd(cfg.head_wd)), "scalar": (cfg.scalar_lr or cfg.lr, wd(cfg.scalar_wd))}


def param_groups(model: nn.Module, cfg) -> dict[str, list[dict]]:
    """Optimizer groups for `cfg.optimizer` (TrainConfig): {'muon': [...], 'adamw': [...]}, one group
    per role class (GROUP_ROLES) that has parameters, each with its own lr and weight decay
    (`group_settings`): hidden matrices on Muon (or on AdamW with optimizer=adamw), embeddings,
    head and scalars/gates on AdamW. Every group carries `name` and `base_lr`, which the schedule
    multiplies into `lr` each step."""
    if cfg.optimizer not in ("muon", "adamw"):
        raise ValueError(f"train.optimizer={cfg.optimizer!r} is not muon or adamw")
    classify_params(model)  # asserts the full, exclusive cover
    roles = param_roles(model)
    settings = group_settings(cfg)
    out: dict[str, list[dict]] = {"muon": [], "adamw": []}
    for group, members in GROUP_ROLES.items():
        params = [p for n, p in model.named_parameters() if p.requires_grad and roles[n] in members]
        if not params:
            continue
        lr, wd = settings[group]
        opt = "muon" if group == "matrix" and cfg.optimizer == "muon" else "adamw"
        out[opt].append(dict(params=params, lr=lr, base_lr=lr, weight_decay=wd, name=group))
    return out


def build_optimizer(model: nn.Module, cfg, distributed: bool = False) -> ChainedOptimizer:
    """Muon (hidden matrices) + AdamW (the rest) for optimizer='muon'; AdamW alone for 'adamw'.

    distributed: the parameters are FSDP2 shards or DDP replicas (DistributedMuon)."""
    pg = param_groups(model, cfg)
    opts: dict[str, torch.optim.Optimizer] = {}
    if pg["muon"]:
        opts["muon"] = (DistributedMuon if distributed else Muon)(
            pg["muon"], lr=cfg.muon_lr, momentum=cfg.muon_momentum, ns_steps=cfg.muon_ns_steps,
            weight_decay=pg["muon"][0]["weight_decay"], ns_schedule=cfg.muon_ns_schedule, normuon=cfg.muon_normuon,
            backend=cfg.muon_backend)
    if pg["adamw"]:
        # foreach on CPU keeps the update bitwise-reproducible and fast; fused is CUDA-only.
        on_cuda = any(p.is_cuda for g in pg["adamw"] for p in g["params"])  # False for CPU-offloaded shards
        opts["adamw"] = torch.optim.AdamW(pg["adamw"], lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8,
                                          fused=on_cuda or None, foreach=None if on_cuda else True)
    return ChainedOptimizer(opts, overlap=cfg.optimizer_overlap)
