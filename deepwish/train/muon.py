"""Muon: momentum, then each hidden matrix's update replaced by its nearest semi-orthogonal matrix.

Muon (K. Jordan et al., "Muon: an optimizer for hidden layers", 2024) takes SGD-momentum with
Nesterov, then replaces the update of each weight matrix by an approximation of its polar factor
U V^T (G = U S V^T), computed by a quintic Newton–Schulz iteration X <- a X + b (X X^T) X +
c (X X^T)^2 X. Optimizer groups (which parameters take Muon) live in train/optim.py.

Pure functions (shared by every optimizer option that needs them):
- `newton_schulz(G, steps, schedule)`: batched over any leading dims, bf16 matmuls on CUDA with
  the normalisation in fp32; `schedule` picks the coefficients:
  "jordan"        the original fixed (3.4445, -4.7750, 2.0315), chosen to maximise the slope at 0
                  while keeping the iteration inside ~[0.7, 1.2] (fast, not convergent);
  "polar_express" the per-iteration minimax schedule of Polar Express (Amsel et al.,
                  arXiv:2505.16932, their coefficients for l = 1e-3 with their safety factor 1.01),
                  which converges to the polar factor in about 6 steps.
- `normuon_normalize(O, v, beta2)`: NorMuon (arXiv:2510.05491): a per-neuron (per output row)
  second moment of the orthogonalised update, each row divided by its root. Deviation: the paper
  then rescales to an AdamW-like RMS (0.2·sqrt(mn)/||Ô||); we rescale to the Frobenius norm of
  the orthogonalised update instead, so `muon_lr` and the shape scale below keep their meaning.

Speed: the step groups the matrices of a parameter group by shape (and device, dtype) and runs one
batched Newton–Schulz per group: three batched matmuls per iteration for all of a model's q
projections at once, instead of ~40 small launches per matrix. Two backends (`backend`, from
`train.muon_backend`, default auto: triton on CUDA, torch elsewhere), the same update to bf16 noise:
  torch   bmm / baddbmm / baddbmm per iteration (cuBLAS); momentum and the parameter update are
          foreach ops, the stack one copy per matrix;
  triton  kernels/muon/triton.py: the two symmetric products (A = X Xᵀ, A²) computed on and above
          the diagonal only (-25% Newton–Schulz FLOPs on Qwen3-0.6B), fused epilogues (no copy of
          X per iteration), the normalisation folded into the first iteration, and per shape
          bucket one pass for momentum + Nesterov + stack and one for weight decay + update;
          which Newton–Schulz matmuls run as kernels or through cuBLAS is timed once per stack
          shape (kernels/muon/triton.py NS_KERNELS="auto").

Choices and deviations:
- Update scale: `max(1, rows/cols) ** 0.5` (the original Muon scale, with its own learning rate
  `muon_lr`, default 0.02) rather than Moonlight's `0.2 * sqrt(max(rows, cols))` that matches
  AdamW's update RMS and shares AdamW's learning rate. `rows` is the output dimension (`size(-2)`).
- Stacked expert weights `[E, rows, cols]` are orthogonalised per expert, never as one matrix.
- Weight decay is decoupled (`p <- p * (1 - lr * wd)`), as in AdamW.
- Muon orthogonalises whole matrices. Under FSDP2 a parameter is a shard: `DistributedMuon`
  brings each whole gradient to one owner rank and sends the owner's result back in slices.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from deepwish.kernels.muon.reference import newton_schulz as torch_newton_schulz

# Quintic coefficients of the original Muon (Jordan et al.): one triple reused every iteration.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express (arXiv:2505.16932), per iteration, for an input spectrum in [1e-3, 1]; after the
# listed ones the last (the classical quintic 15/8, -10/8, 3/8) repeats. The paper divides all but
# the last by the safety factor (a/f, b/f^3, c/f^5, f = 1.01) and normalises by f·||X||_F.
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_SAFETY = 1.01
POLAR_EXPRESS_COEFFS = tuple((a / POLAR_EXPRESS_SAFETY, b / POLAR_EXPRESS_SAFETY ** 3, c / POLAR_EXPRESS_SAFETY ** 5)
                             for a, b, c in _POLAR_EXPRESS_RAW[:-1]) + (_POLAR_EXPRESS_RAW[-1],)
NS_SCHEDULES = ("jordan", "polar_express")
NS_EPS = 1e-7  # added to the Frobenius norm before the division
MUON_BACKENDS = ("auto", "torch", "triton")


def ns_coefficients(schedule: str, steps: int) -> tuple[list[tuple[float, float, float]], float]:
    """(one (a, b, c) per iteration, factor f of the normalisation X / (f·||X||_F))."""
    if steps < 1:
        raise ValueError(f"Newton–Schulz needs steps >= 1, got {steps}")
    if schedule == "jordan":
        return [NS_COEFFS] * steps, 1.0
    if schedule == "polar_express":
        c = list(POLAR_EXPRESS_COEFFS[:steps])
        return c + [POLAR_EXPRESS_COEFFS[-1]] * (steps - len(c)), POLAR_EXPRESS_SAFETY
    raise ValueError(f"unknown Newton–Schulz schedule {schedule!r}; choose from {', '.join(NS_SCHEDULES)}")


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = NS_EPS, schedule: str = "jordan",
                  backend: str = "torch", sumsq: torch.Tensor | None = None) -> torch.Tensor:
    """Approximate polar factor U V^T of each matrix of G = U S V^T.

    G: [..., m, n] (a matrix or any batch of matrices: experts [E, m, n], a shape group [N, m, n]).
    Returns a tensor of G's shape and dtype. The matmuls run in bf16 on CUDA (the iteration is
    stable in bf16 and that is where its cost lies) and in fp32 elsewhere; the Frobenius
    normalisation is computed in fp32 before the cast. For tall matrices the Gram matrix is X^T X
    (the smaller one).
    backend: "torch" (below) or "triton" (kernels/muon/triton.py: the same iteration with symmetric
    Gram products and fused epilogues); sumsq: the triton path's per-matrix sums of squares of G
    [N] fp32 when the caller has them (Muon's fused momentum pass), else computed from G (the
    torch path always computes them).
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    coeffs, f = ns_coefficients(schedule, steps)
    if backend == "triton":
        from deepwish.kernels.muon import triton as kernels
        return kernels.newton_schulz(G, coeffs, f, eps, compute_dtype(G.device), sumsq=sumsq)
    if backend != "torch":
        raise ValueError(f"newton_schulz: unknown backend {backend!r}; choose from torch, triton")
    return torch_newton_schulz(G, coeffs, f, eps, compute_dtype(G.device))


def compute_dtype(device: torch.device) -> torch.dtype:
    """Dtype of the Newton–Schulz matmuls: bf16 on CUDA, fp32 elsewhere (CPU tests stay exact)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def normuon_normalize(O: torch.Tensor, v: torch.Tensor, beta2: float = 0.95, eps: float = 1e-8,
                      all_rows=None) -> torch.Tensor:
    """NorMuon's per-neuron normalisation of an orthogonalised update (module docstring).

    O: [..., m, n] orthogonalised update (rows are output neurons); v: [..., m, 1] fp32 running
    mean of each row's mean square, updated in place: v <- beta2 v + (1 - beta2) mean_j O_ij^2.
    Returns O / (sqrt(v) + eps), rescaled to O's Frobenius norm per matrix, in O's dtype.
    all_rows: when O holds only some rows of each matrix (a row shard), a function that sums the
    per-matrix sums of squares [2, ...] over the holders of the other rows (an all-reduce).
    """
    if v.shape != (*O.shape[:-1], 1):
        raise ValueError(f"normuon: second moment of shape {tuple(v.shape)} for an update of shape {tuple(O.shape)}; "
                         f"expected {(*O.shape[:-1], 1)}")
    O32 = O.float()
    v.lerp_(O32.square().mean(dim=-1, keepdim=True), 1.0 - beta2)
    out = O32 / (v.sqrt() + eps)
    sums = torch.stack([O32.square().sum(dim=(-2, -1), keepdim=True), out.square().sum(dim=(-2, -1), keepdim=True)])
    if all_rows is not None:
        sums = all_rows(sums)
    return (out * (sums[0] / sums[1].clamp_min(1e-30)).sqrt()).to(O.dtype)


def shape_scale(shape) -> float:
    """Muon's update scale max(1, rows/cols)**0.5 for a matrix (stack) of this shape."""
    return max(1.0, shape[-2] / shape[-1]) ** 0.5


# Upper bound of one batched Newton–Schulz call, in elements (a shape group is split beyond it):
# bounds the stacked copies (fp32 input, bf16 iterates) at a few GiB for huge expert stacks.
BUCKET_NUMEL = 1 << 28


def shape_buckets(tensors: list[torch.Tensor], max_numel: int = BUCKET_NUMEL) -> list[list[int]]:
    """Indices of `tensors` grouped by (shape, device, dtype), in first-seen order, each group
    split into runs of at most `max_numel` elements (at least one tensor per run)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(tuple(t.shape), t.device, t.dtype)].append(i)
    out = []
    for idx in groups.values():
        per = max(1, max_numel // max(1, tensors[idx[0]].numel()))
        out += [idx[k:k + per] for k in range(0, len(idx), per)]
    return out


class Muon(torch.optim.Optimizer):
    """Momentum + Nesterov + Newton–Schulz orthogonalisation, for 2-D / stacked 3-D matrices.

    Per parameter p with gradient g:  m <- mu*m + g;  u = g + mu*m (Nesterov) [or m];
    o = newton_schulz(u) [-> normuon_normalize(o)] * max(1, rows/cols)**0.5;
    p <- p*(1 - lr*wd) - lr*o. Same-shape matrices are orthogonalised together (module docstring).
    A `grad_scale` attribute (torch's fused-optimizer protocol; set for one step by
    train/optim.py ChainedOptimizer.take_grad_scale) divides every g as it is read: gradient
    clipping without its own pass over the gradients.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, ns_schedule: str = "jordan",
                 normuon: bool = False, normuon_beta2: float = 0.95, backend: str = "auto"):
        if backend not in MUON_BACKENDS:
            raise ValueError(f"Muon: unknown backend {backend!r}; choose from {', '.join(MUON_BACKENDS)}")
        if lr < 0 or not 0.0 <= momentum < 1.0 or ns_steps < 1 or weight_decay < 0 or not 0.0 <= normuon_beta2 < 1.0:
            raise ValueError(f"Muon: invalid lr={lr}, momentum={momentum}, ns_steps={ns_steps}, "
                             f"weight_decay={weight_decay}, normuon_beta2={normuon_beta2}")
        ns_coefficients(ns_schedule, ns_steps)  # an unknown schedule fails here, not at the first step
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay, ns_schedule=ns_schedule, normuon=normuon,
                        normuon_beta2=normuon_beta2)
        super().__init__(params, defaults)
        self.backend = backend
        self._resolved: dict[torch.device, str] = {}  # device -> torch | triton
        self._tables = None  # kernels/muon/triton.py AddressTables, made on the first triton step
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon takes 2-D matrices or 3-D stacks of matrices, got shape "
                                     f"{tuple(p.shape)}; put it in an AdamW group")

    def backend_for(self, device: torch.device) -> str:
        """The backend that runs on `device`: `backend`, with auto resolved once per device."""
        if device not in self._resolved:
            from deepwish.kernels.backend import resolve_triton_or_torch
            self._resolved[device] = resolve_triton_or_torch("muon", "deepwish.kernels.muon.triton", self.backend, device)
        return self._resolved[device]

    def _momentum(self, group: dict, params: list, local) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Update the momentum buffers of `params` (foreach); returns (grads, buffers) as the
        tensors `local` maps them to (DTensor shards -> their local tensors), the gradients divided
        by `grad_scale` where one was handed over (new tensors: the gradients stay as they are)."""
        mu = group["momentum"]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            bufs.append(local(state["momentum_buffer"]))
        grads = [local(p.grad) for p in params]
        if self.__dict__.get("grad_scale") is not None:
            grads = torch._foreach_div(grads, self.grad_scale.to(grads[0].device))
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        return grads, bufs

    @staticmethod
    def _stacked_update(group: dict, grads: list, bufs: list, idx: list[int], device: torch.device) -> torch.Tensor:
        """[len(idx), *shape] Nesterov updates u = g + mu m (or m) of the tensors `idx`, written
        straight into one stack in the compute dtype (one rounding from fp32, no fp32 copy)."""
        U = torch.empty((len(idx), *grads[idx[0]].shape), dtype=compute_dtype(device), device=device)
        for j, i in enumerate(idx):
            if group["nesterov"]:
                torch.add(grads[i].to(device), bufs[i].to(device), alpha=group["momentum"], out=U[j])
            else:
                U[j].copy_(bufs[i])
        return U

    def _orthogonalise(self, group: dict, params: list, U: torch.Tensor, normuon: bool = True,
                       sumsq: torch.Tensor | None = None) -> torch.Tensor:
        """[N, *shape] stacked updates of `params` -> orthogonalised (and NorMuon-normalised unless
        `normuon` is False: DistributedMuon normalises each rank's rows after the return)."""
        O = newton_schulz(U, steps=group["ns_steps"], schedule=group["ns_schedule"],
                          backend=self.backend_for(U.device), sumsq=sumsq)
        if group["normuon"] and normuon:
            vs = []
            for p in params:
                state = self.state[p]
                if "normuon_v" not in state:
                    state["normuon_v"] = torch.zeros(*p.shape[:-1], 1, dtype=torch.float32, device=U.device)
                vs.append(state["normuon_v"])
            V = torch.stack([v.to(U.device) for v in vs])
            O = normuon_normalize(O, V, beta2=group["normuon_beta2"])
            for v, new in zip(vs, V.unbind(0)):
                v.copy_(new)
        return O

    @staticmethod
    def _apply(group: dict, targets: list[torch.Tensor], O: torch.Tensor, shape) -> None:
        """p <- p (1 - lr wd) - lr scale o for the (local) tensors `targets` and stacked updates O
        (any dtype and strides: each add reads its slice as it is, no converted copy)."""
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            torch._foreach_mul_(targets, 1.0 - lr * wd)
        alpha = -lr * shape_scale(shape)
        for t, o in zip(targets, O.unbind(0)):
            t.add_(o.to(t.device), alpha=alpha)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            fused = [p for p in params if self.backend_for(p.grad.device) == "triton"]
            for idx in shape_buckets([p.grad for p in fused]):
                self._fused_bucket_step(group, [fused[i] for i in idx], fused[idx[0]].grad.device)
            params = [p for p in params if self.backend_for(p.grad.device) == "torch"]
            if not params:
                continue
            grads, bufs = self._momentum(group, params, lambda t: t)
            for idx in shape_buckets(grads):
                ps = [params[i] for i in idx]
                U = self._stacked_update(group, grads, bufs, idx, grads[idx[0]].device)
                self._apply(group, ps, self._orthogonalise(group, ps, U), ps[0].shape)
        return loss

    @torch.no_grad()
    def warm_up(self) -> int:
        """Compile and autotune the triton step's kernels (and time its Newton–Schulz choice,
        `pick_ns_kernels`) for every shape bucket before training, so the first real step does
        not pay for it: one step of a twin optimizer with the same settings over scratch tensors
        of each bucket's shapes, one bucket at a time (memory: one bucket's parameters, gradients
        and momentum). Parameters, gradients and this optimizer's state are not touched. Returns the
        number of buckets warmed (0 where the torch backend runs: nothing to compile)."""
        warmed = 0
        for group in self.param_groups:
            params = [p for p in group["params"] if self.backend_for(p.device) == "triton"]
            settings = {k: v for k, v in group.items() if k != "params"}
            for idx in shape_buckets(params):
                scratch = [torch.zeros_like(params[i], memory_format=torch.contiguous_format) for i in idx]
                for s in scratch:
                    s.grad = torch.randn_like(s)
                Muon([dict(settings, params=scratch)], backend="triton").step()
                warmed += 1
        return warmed

    def _fused_bucket_step(self, group: dict, ps: list, device: torch.device) -> None:
        """The step of one shape bucket with the triton backend's fused passes (momentum + Nesterov
        + stack + sums of squares; Newton–Schulz; weight decay + update)."""
        from deepwish.kernels.muon import triton as kernels

        if self._tables is None:
            self._tables = kernels.AddressTables()
        bufs = []
        for p in ps:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            bufs.append(state["momentum_buffer"])
        U, sumsq = kernels.momentum_stack([p.grad for p in ps], bufs, group["momentum"], group["nesterov"],
                                          compute_dtype(device), self._tables,
                                          grad_scale=self.__dict__.get("grad_scale"))
        lr = group["lr"]
        decay, alpha = 1.0 - lr * group["weight_decay"], -lr * shape_scale(ps[0].shape)
        if not group["normuon"] and group["ns_steps"] >= 2:
            # the last iteration's epilogue updates the parameters: the result is never stored
            coeffs, f = ns_coefficients(group["ns_schedule"], group["ns_steps"])
            kernels.newton_schulz(U, coeffs, f, NS_EPS, compute_dtype(device), sumsq=sumsq,
                                  apply=(ps, decay, alpha, self._tables))
            return
        O = self._orthogonalise(group, ps, U, sumsq=sumsq)
        kernels.apply_update(ps, O.contiguous(), decay, alpha, self._tables)


# ---- data parallel ---------------------------------------------------------------------------------
def _comm_device(t) -> torch.device:
    """Device the process group communicates on: the DTensor mesh's, else the backend's."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        kind = t.device_mesh.device_type
    else:
        kind = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def shard_rows(d0: int, world: int) -> list[int]:
    """Rows of dim 0 on each rank under Shard(0) (torch.chunk's split, as FSDP2 shards): ceil-sized
    chunks, the last ones smaller or empty."""
    c = -(-d0 // world)
    return [max(0, min(c, d0 - r * c)) for r in range(world)]


class DistributedMuon(Muon):
    """Muon for data-parallel runs: the same update as `Muon`, whole matrices orthogonalised.

    Parameters may be FSDP2 DTensor shards (Shard(0) on a 1-D mesh) or plain tensors replicated by
    DDP. Momentum stays local (sharded like the parameter). Each matrix has one owner rank
    (round-robin over the step's matrices in a fixed order, as in Moonlight's distributed Muon,
    arXiv:2502.16982); per shape bucket:
      sharded:    one all-to-all sends every rank's slice of each matrix to its owner only (each
                  matrix moves once, in the compute dtype: bf16 on CUDA); the owner stacks its
                  whole matrices and runs one batched Newton–Schulz; a second all-to-all sends each
                  rank only its own slice of the result. Per step that moves 2·(W-1)/W of the
                  Muon parameters' bytes per rank, where an all-gather of inputs plus a broadcast
                  of outputs moved 2·(W-1) of them.
      replicated: every rank already holds the whole gradient; owners orthogonalise theirs and
                  one all-gather (padded to the largest owner's count) hands every rank all results.
    All buckets' gathers are issued asynchronously first, so the orthogonalisation of one bucket
    runs while the next bucket's gather is in flight, and the returns overlap the next buckets' work.
    Memory: each rank holds its owned whole matrices (about 1/W of the Muon parameters) at once.
    NorMuon runs after the return, on each rank's own rows (its row statistics are local: shards
    are whole rows, or whole experts), its state sharded like the parameter; only the per-matrix
    norms of a row-sharded 2-D matrix are summed over ranks (one small all-reduce per bucket).
    """

    def warm_up(self) -> int:
        """No warm-up: its step gathers whole matrices across ranks (a twin step would have to
        communicate too); the first step compiles and autotunes as it runs."""
        return 0

    @torch.no_grad()
    def step(self, closure=None):
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor, Shard

        if not dist.is_initialized():
            raise RuntimeError("DistributedMuon needs an initialised process group; use Muon on one device")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = []  # (group, params, local updates u, process group, rank, world, sharded)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads, bufs = self._momentum(group, params, _local)
            us = torch._foreach_add(grads, bufs, alpha=group["momentum"]) if group["nesterov"] else bufs
            keys = defaultdict(list)
            for i, p in enumerate(params):
                if isinstance(p, DTensor):
                    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                        raise ValueError(f"DistributedMuon handles Shard(0) on a 1-D mesh, got {p.placements} "
                                         f"on a {p.device_mesh.ndim}-D mesh for shape {tuple(p.shape)}")
                    pg = p.device_mesh.get_group()
                else:
                    pg = None
                keys[(tuple(p.shape), isinstance(p, DTensor), id(pg), us[i].device, us[i].dtype)].append(i)
            for (shape, sharded, _, _, _), idx in keys.items():
                pg = params[idx[0]].device_mesh.get_group() if sharded else None
                buckets.append((group, [params[i] for i in idx], [us[i] for i in idx], pg,
                                dist.get_rank(pg), dist.get_world_size(pg), sharded))
        # Owners: round-robin over all matrices in bucket order (the same order on every rank).
        turn = 0
        gathers = []
        for group, ps, us, pg, rank, world, sharded in buckets:
            owners = [(turn + k) % world for k in range(len(ps))]
            turn += len(ps)
            gathers.append(self._gather_to_owner(ps, us, owners, pg, rank, world, sharded))
        returns = []
        for (group, ps, us, pg, rank, world, sharded), gathered in zip(buckets, gathers):
            returns.append(self._orthogonalise_and_return(group, ps, gathered, pg, rank, world, sharded))
        for (group, ps, us, pg, rank, world, sharded), back in zip(buckets, returns):
            O = back()
            if group["normuon"]:
                O = self._normuon_local(group, ps, O, pg if sharded and world > 1 and ps[0].ndim == 2 else None)
            self._apply(group, [_local(p) for p in ps], O, ps[0].shape)
        return loss

    def _normuon_local(self, group, ps, O: torch.Tensor, row_group) -> torch.Tensor:
        """NorMuon on this rank's rows O [N, *local shape]; row_group: the process group over
        which a 2-D matrix's rows are split (None: the rows here are whole matrices)."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        vs = []
        for p in ps:
            st = self.state[p]
            if "normuon_v" not in st:
                local = torch.zeros(*_local(p).shape[:-1], 1, dtype=torch.float32, device=_local(p).device)
                if isinstance(p, DTensor):
                    shape = (*p.shape[:-1], 1)
                    local = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=shape,
                                               stride=torch.empty(shape, device="meta").stride())
                st["normuon_v"] = local
            vs.append(_local(st["normuon_v"]))
        V = torch.stack([v.to(O.device) for v in vs])

        def all_rows(sums):
            dist.all_reduce(sums, group=row_group)
            return sums
        out = normuon_normalize(O, V, beta2=group["normuon_beta2"], all_rows=all_rows if row_group is not None else None)
        for v, new in zip(vs, V.unbind(0)):
            v.copy_(new)
        return out

    @staticmethod
    def _gather_to_owner(ps, us, owners, pg, rank, world, sharded):
        """Start moving each matrix's slices to its owner; returns (owners, mine, finish) where
        finish() -> [len(mine), *shape] whole updates of this rank's own matrices."""
        import torch.distributed as dist

        shape = tuple(ps[0].shape)
        dev = _comm_device(ps[0])
        dtype = compute_dtype(dev)
        mine = [k for k, o in enumerate(owners) if o == rank]
        if not sharded or world == 1:  # whole matrices already here
            full = torch.stack([us[k] for k in mine]).to(device=dev, dtype=dtype) if mine else None
            return owners, mine, lambda: full
        rows = shard_rows(shape[0], world)
        if us[0].shape[0] != rows[rank]:
            raise ValueError(f"DistributedMuon: rank {rank} holds {us[0].shape[0]} rows of a {shape} matrix, "
                             f"expected {rows[rank]} (torch.chunk sharding)")
        rest = 1
        for s in shape[1:]:
            rest *= s
        count = [owners.count(j) for j in range(world)]
        send = torch.cat([us[k].reshape(-1).to(device=dev, dtype=dtype)
                          for j in range(world) for k in range(len(ps)) if owners[k] == j])
        in_splits = [count[j] * rows[rank] * rest for j in range(world)]
        out_splits = [len(mine) * rows[r] * rest for r in range(world)]
        recv = torch.empty(sum(out_splits), device=dev, dtype=dtype)
        work = dist.all_to_all_single(recv, send, out_splits, in_splits, group=pg, async_op=True)

        def finish():
            work.wait()
            if not mine:
                return None
            pieces = [piece.view(len(mine), rows[r], *shape[1:]) for r, piece in enumerate(recv.split(out_splits))]
            return torch.cat(pieces, dim=1)
        return owners, mine, finish

    def _orthogonalise_and_return(self, group, ps, gathered, pg, rank, world, sharded):
        """Orthogonalise this rank's own matrices and start sending the results back; returns
        finish() -> [len(ps), *local shape] this rank's part of every matrix's update."""
        import torch.distributed as dist

        owners, mine, full = gathered
        full = full()
        O = self._orthogonalise(group, [ps[k] for k in mine], full, normuon=False) if mine else None
        shape = tuple(ps[0].shape)
        dev = _comm_device(ps[0])
        dtype = compute_dtype(dev)
        count = [owners.count(j) for j in range(world)]
        position = [owners[:k].count(owners[k]) for k in range(len(ps))]  # index in its owner's stack
        if world == 1:
            return lambda: O
        if not sharded:
            most = max(count)
            pad = torch.zeros(most, *shape, device=dev, dtype=dtype)
            if O is not None:
                pad[:len(mine)] = O
            outs = [torch.empty_like(pad) for _ in range(world)]
            work = dist.all_gather(outs, pad, group=pg, async_op=True)

            def finish():
                work.wait()
                return torch.stack([outs[owners[k]][position[k]] for k in range(len(ps))])
            return finish
        rows = shard_rows(shape[0], world)
        starts = [sum(rows[:r]) for r in range(world)]
        empty = torch.empty(0, device=dev, dtype=dtype)
        send = torch.cat([O[:, starts[r]:starts[r] + rows[r]].reshape(-1) for r in range(world)]) if O is not None else empty
        rest = 1
        for s in shape[1:]:
            rest *= s
        in_splits = [len(mine) * rows[r] * rest for r in range(world)]
        out_splits = [count[j] * rows[rank] * rest for j in range(world)]
        recv = torch.empty(sum(out_splits), device=dev, dtype=dtype)
        work = dist.all_to_all_single(recv, send, out_splits, in_splits, group=pg, async_op=True)

        def finish():
            work.wait()
            per_owner = [piece.view(count[j], rows[rank], *shape[1:]) for j, piece in enumerate(recv.split(out_splits))]
            return torch.stack([per_owner[owners[k]][position[k]] for k in range(len(ps))])
        return finish
