"""Optimizers: Muon for hidden matrices, AdamW for everything else, assigned in one place.

Muon (K. Jordan et al., "Muon: an optimizer for hidden layers", 2024) takes SGD-momentum with
Nesterov, then replaces the update of each weight matrix by its nearest semi-orthogonal matrix,
computed approximately by a quintic Newton–Schulz iteration. Embeddings, the output head, norms,
biases, routers/gates and every 1-D parameter stay on AdamW (the Muon write-up and Moonlight,
arXiv:2502.16982, both keep these on Adam: they are not "hidden" linear maps).

Choices and deviations:
- Update scale: `max(1, rows/cols) ** 0.5` (the original Muon scale, with its own learning rate
  `muon_lr`, default 0.02) rather than Moonlight's `0.2 * sqrt(max(rows, cols))` that matches
  AdamW's update RMS and shares AdamW's learning rate. Keeping a separate learning rate keeps the
  two families tunable independently; `rows` is the output dimension (`size(-2)`).
- Stacked expert weights `[E, rows, cols]` are orthogonalised per expert (a batched
  Newton–Schulz), never as one flattened matrix.
- Weight decay is decoupled (`p <- p * (1 - lr * wd)`), as in AdamW; 1-D parameters get none.
- Muon orthogonalises whole matrices. Under FSDP2 a parameter is a shard: train/parallel.py must
  gather the full gradient before `newton_schulz` (DESIGN.md: never orthogonalise shards).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deepwish.model.roles import DECAY_ROLES, MUON_ROLES, param_roles

# Quintic coefficients chosen to maximise the slope at zero while keeping the iteration
# inside ~[0.7, 1.2] (Muon write-up); they trade exact convergence for speed.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate U V^T of G = U S V^T (singular values pushed into ~[0.7, 1.2]).

    G: [..., m, n] (a matrix or a batch of matrices, e.g. experts [E, m, n]).
    Returns a tensor of G's shape and dtype. Works in bf16 on CUDA (the iteration is stable in
    bf16 and that is where its cost lies) and in fp32 elsewhere. Tall matrices are transposed
    so the Gram matrix X X^T is the smaller one.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    # Frobenius normalisation bounds the spectral norm by 1, inside the iteration's basin.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum + Nesterov + Newton–Schulz orthogonalisation, for 2-D / stacked 3-D matrices.

    Per parameter p with gradient g:  m <- mu*m + g;  u = g + mu*m (Nesterov) [or m];
    o = newton_schulz(u) * max(1, rows/cols)**0.5;  p <- p*(1 - lr*wd) - lr*o.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0):
        if lr < 0 or not 0.0 <= momentum < 1.0 or ns_steps < 1 or weight_decay < 0:
            raise ValueError(f"Muon: invalid lr={lr}, momentum={momentum}, ns_steps={ns_steps}, "
                             f"weight_decay={weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon takes 2-D matrices or 3-D stacks of matrices, got shape "
                                     f"{tuple(p.shape)}; put it in an AdamW group")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(g)
                u = g.add(buf, alpha=mu) if group["nesterov"] else buf
                o = newton_schulz(u, steps=group["ns_steps"])
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(o, alpha=-lr * scale)
        return loss


def _comm_device(t) -> torch.device:
    """Device the process group communicates on: the DTensor mesh's, else the backend's."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        kind = t.device_mesh.device_type
    else:
        kind = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")


def _full_matrix(u: torch.Tensor) -> torch.Tensor:
    """The whole matrix behind `u`: all-gathered from its shards for a DTensor (moved to the mesh's
    device first when the shards are CPU-offloaded), `u` itself for a replicated plain tensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(u, DTensor):
        return u
    local = u.to_local()
    dev = _comm_device(u)
    if local.device != dev:
        u = DTensor.from_local(local.to(dev), u.device_mesh, u.placements, run_check=False,
                               shape=u.shape, stride=u.stride())
    return u.full_tensor()


def _local_part(o_full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The part of the full update `o_full` that lives on this rank, on p's (local) device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(p, DTensor):
        return o_full.to(p.device)
    # Every rank holds the same o_full: slice locally, no communication (src_data_rank=None).
    part = distribute_tensor(o_full, p.device_mesh, p.placements, src_data_rank=None).to_local()
    return part.to(p.to_local().device)


class DistributedMuon(Muon):
    """Muon for data-parallel runs: the same update as `Muon`, with whole matrices orthogonalised.

    Parameters may be FSDP2 DTensor shards or plain tensors replicated by DDP. Momentum stays
    local (sharded like the parameter). Per step, matrices are taken in a fixed order in rounds
    of `world_size`: matrix i of a round is gathered whole and orthogonalised by rank
    i % world_size only (the Newton–Schulz work is spread round-robin, as in Moonlight's
    distributed Muon, arXiv:2502.16982), then broadcast from that rank; each rank keeps its own
    slice. Holding one round at a time bounds the extra memory to `world_size` full matrices.

    Simplification: the gather is an all-gather (every rank receives every matrix of the round,
    though only the owner needs it), which costs about one more FSDP all-gather of the Muon
    parameters per step; a gather to the owner alone would halve that traffic.
    """

    @torch.no_grad()
    def step(self, closure=None):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("DistributedMuon needs an initialised process group; use Muon on one device")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = dist.get_rank(), dist.get_world_size()
        work = []  # (param, nesterov update u, group) in the same order on every rank
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                work.append((p, p.grad.add(buf, alpha=mu) if group["nesterov"] else buf, group))
        for start in range(0, len(work), world):
            chunk = work[start:start + world]
            fulls = [_full_matrix(u) for _, u, _ in chunk]
            outs = []
            for j, ((p, _, group), u_full) in enumerate(zip(chunk, fulls)):
                # contiguous: NCCL broadcasts only dense tensors (NS returns a transposed view for tall ones)
                o = (newton_schulz(u_full, steps=group["ns_steps"]).contiguous() if j == rank
                     else torch.empty_like(u_full, memory_format=torch.contiguous_format))
                outs.append(o)
            handles = [dist.broadcast(o, src=j, async_op=True) for j, o in enumerate(outs)]
            for h in handles:
                h.wait()
            for (p, _, group), o in zip(chunk, outs):
                lr, wd = group["lr"], group["weight_decay"]
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                if wd:
                    p.mul_(1.0 - lr * wd)
                local = p.to_local() if hasattr(p, "to_local") else p
                local.add_(_local_part(o, p), alpha=-lr * scale)
        return loss


class ChainedOptimizer:
    """Several optimizers stepped together, seen as one: `param_groups` is their concatenation
    (the schedule scales every group's `base_lr`), state_dict is keyed by name."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        if not optimizers:
            raise ValueError("ChainedOptimizer needs at least one optimizer")
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

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
            opt.load_state_dict(state[name])


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
    AdamW with decay: embeddings and the output head.
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


def param_groups(model: nn.Module, cfg) -> dict[str, list[dict]]:
    """Optimizer groups for `cfg.optimizer` (TrainConfig): {'muon': [...], 'adamw': [...]}.

    Every group carries `base_lr`, which the schedule multiplies into `lr` each step.
    """
    groups, _ = classify_params(model)
    if cfg.optimizer not in ("muon", "adamw"):
        raise ValueError(f"train.optimizer={cfg.optimizer!r} is not muon or adamw")
    adamw_groups = []
    muon_groups = []
    if cfg.optimizer == "muon":
        if groups["muon"]:
            muon_groups.append(dict(params=groups["muon"], lr=cfg.muon_lr, base_lr=cfg.muon_lr,
                                    weight_decay=cfg.weight_decay, name="muon"))
    else:
        groups["adamw_decay"] = groups["muon"] + groups["adamw_decay"]
    if groups["adamw_decay"]:
        adamw_groups.append(dict(params=groups["adamw_decay"], lr=cfg.lr, base_lr=cfg.lr,
                                 weight_decay=cfg.weight_decay, name="adamw_decay"))
    if groups["adamw_no_decay"]:
        adamw_groups.append(dict(params=groups["adamw_no_decay"], lr=cfg.lr, base_lr=cfg.lr,
                                 weight_decay=0.0, name="adamw_no_decay"))
    return {"muon": muon_groups, "adamw": adamw_groups}


def build_optimizer(model: nn.Module, cfg, distributed: bool = False) -> ChainedOptimizer:
    """Muon (hidden matrices) + AdamW (the rest) for optimizer='muon'; AdamW alone for 'adamw'.

    distributed: the parameters are FSDP2 shards or DDP replicas (DistributedMuon)."""
    pg = param_groups(model, cfg)
    opts: dict[str, torch.optim.Optimizer] = {}
    if pg["muon"]:
        opts["muon"] = (DistributedMuon if distributed else Muon)(pg["muon"], lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                            ns_steps=cfg.muon_ns_steps, weight_decay=cfg.weight_decay)
    if pg["adamw"]:
        # foreach on CPU keeps the update bitwise-reproducible and fast; fused is CUDA-only.
        on_cuda = any(p.is_cuda for g in pg["adamw"] for p in g["params"])  # False for CPU-offloaded shards
        opts["adamw"] = torch.optim.AdamW(pg["adamw"], lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8,
                                          fused=on_cuda or None, foreach=None if on_cuda else True)
    return ChainedOptimizer(opts)
