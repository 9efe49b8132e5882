"""Mixture of experts: routers, grouped expert computation, shared experts, balance signals.

Routers (pure functions, each unit-tested):
- `route_softmax` (Qwen3-MoE, Qwen3-Next): softmax over experts in fp32, top-k, optional
  renormalisation of the k weights (`norm_topk_prob`).
- `route_sigmoid_grouped` (DeepSeek-V3): sigmoid scores; `e_score_correction_bias` is added only
  to *choose* experts and never weights them; experts are split into `n_group` groups, a group
  is scored by the sum of its top-2 biased scores, the best `topk_group` groups are kept and the
  others masked with -inf (a 0 fill would let a masked expert win when biased scores go
  negative); `norm_topk_prob` and `routed_scaling_factor` are applied independently.
- `route_centroid`: each expert owns a learned centroid (the router's weight rows); a token's
  score for an expert is the cosine similarity of the normalised token and the normalised
  centroid, divided by `router_temperature`, softmaxed over experts. Cosine scores are bounded,
  so no expert wins by the norm of its row alone; the temperature sets how sharp routing is.
  Selection then follows the sigmoid router: the correction bias chooses but never weights,
  group-limited routing keeps `topk_group` of `n_group` groups (`select_experts`), and the
  Switch and sequence-wise balance losses read the softmax scores.

Experts are stored stacked, `w_gate_up` [E, 2I, d] and `w_down` [E, d, I], and computed
without a Python loop over experts: assignments are sorted by expert, then either
`torch._grouped_mm` (CUDA, bf16) or a padded batched matmul over [E, capacity, d] runs them all.

Balance: every forward returns per-expert token counts and the auxiliary losses beside its output
(the block contract, model/block.py); the DeepSeek auxiliary-loss-free correction bias is a buffer
updated outside autograd by `update_correction_bias` (the trainer calls
`Transformer.update_router_bias` with the step's summed loads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepwish.config import ModelConfig
from deepwish.model.mlp import SwiGLU, activation


def route_softmax(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, E] -> (weights [N, k] fp32, indices [N, k], probs [N, E] fp32)."""
    probs = logits.float().softmax(-1)
    weights, indices = probs.topk(top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, indices, probs


def select_experts(scores: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                   norm_topk_prob: bool, routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N, E] fp32, bias [E] -> (weights [N, k] fp32, indices [N, k]): the biased scores
    choose (group-limited when n_group > 1), the unbiased scores weight."""
    choice = scores + bias.float()
    N, E = choice.shape
    if n_group > 1:
        grouped = choice.view(N, n_group, E // n_group)
        group_score = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)  # [N, G]
        keep = group_score.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(N, E)
    indices = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, indices


def route_sigmoid_grouped(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                          norm_topk_prob: bool, routed_scaling_factor: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, E], bias [E] -> (weights [N, k] fp32, indices [N, k], scores [N, E] fp32)."""
    scores = logits.float().sigmoid()
    weights, indices = select_experts(scores, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
    return weights, indices, scores


def centroid_scores(x: torch.Tensor, centroids: torch.Tensor, temperature: float) -> torch.Tensor:
    """x [N, d], centroids [E, d] -> softmax_e(cos(x_n, c_e) / temperature) [N, E] fp32."""
    cos = F.normalize(x.float(), dim=-1) @ F.normalize(centroids.float(), dim=-1).t()
    return (cos / temperature).softmax(-1)


def route_centroid(x: torch.Tensor, centroids: torch.Tensor, bias: torch.Tensor, temperature: float, top_k: int,
                   n_group: int, topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, d], centroids [E, d], bias [E] -> (weights [N, k] fp32, indices [N, k], scores [N, E] fp32)."""
    scores = centroid_scores(x, centroids, temperature)
    weights, indices = select_experts(scores, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
    return weights, indices, scores


def switch_aux_loss(probs: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch-Transformer balance loss E·Σ_e f_e·P_e (f_e: routed fraction, P_e: mean prob)."""
    counts = torch.zeros(n_experts, device=probs.device, dtype=torch.float32)
    counts.scatter_add_(0, indices.reshape(-1), torch.ones(indices.numel(), device=probs.device))
    f = counts / probs.shape[0]
    return n_experts * (f * probs.mean(0)).sum()


def sequence_aux_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int, batch: int) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss: mean over sequences of Σ_i f_i·P_i, with
    f_i = E/(k·T)·(tokens of the sequence routed to i) and P_i the mean normalised score."""
    N, k = indices.shape
    T = N // batch
    s = scores / scores.sum(-1, keepdim=True)
    p = s.view(batch, T, n_experts).mean(1)  # [B, E]
    counts = torch.zeros(batch, n_experts, device=scores.device)
    counts.scatter_add_(1, indices.view(batch, T * k), torch.ones(batch, T * k, device=scores.device))
    f = counts * n_experts / (k * T)
    return (f * p).sum(-1).mean()


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens per expert [E] (int64) of indices [N, k]. A scatter-add, not `torch.bincount`:
    bincount reads the maximum back to the host on CUDA, which breaks CUDA-graph capture."""
    flat = indices.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's on CUDA when it is on, else x's.
    (Under autocast the residual stream, and so x, stays fp32; a plain nn.Linear would still
    compute in bf16, and so do the experts.)"""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


def _grouped_mm_available(x: torch.Tensor, dtype: torch.dtype) -> bool:
    return x.is_cuda and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def grouped_swiglu(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                   w_gate_up: torch.Tensor, w_down: torch.Tensor, act=F.silu) -> torch.Tensor:
    """Σ_k weights[n,k] · GLU_{indices[n,k]}(x[n]) with GLU = down(act(gate)·up) (SwiGLU for
    the default SiLU).  x [N, d], indices/weights [N, k]."""
    N, d = x.shape
    E = w_gate_up.shape[0]
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    token = order // k
    counts = expert_counts(flat, E)
    xs = x[token]
    dtype = _compute_dtype(x)
    if _grouped_mm_available(x, dtype):
        offs = counts.cumsum(0).to(torch.int32)
        with torch.autocast("cuda", enabled=False):
            h = torch._grouped_mm(xs.to(dtype), w_gate_up.to(dtype).transpose(-2, -1), offs=offs)
            gate, up = h.chunk(2, dim=-1)
            ys = torch._grouped_mm(act(gate) * up, w_down.to(dtype).transpose(-2, -1), offs=offs)
    else:
        # Padded batched matmul: [E, C, d] with C the largest expert load. During decode (few
        # tokens) C = N avoids a device->host sync so the step stays graph-capturable.
        cap = N if N <= 256 else int(counts.max())
        start = counts.cumsum(0) - counts
        slot = torch.arange(N * k, device=x.device) - start[expert]
        buf = x.new_zeros(E, cap, d)
        buf[expert, slot] = xs
        gate, up = torch.bmm(buf, w_gate_up.transpose(1, 2)).chunk(2, dim=-1)
        ys = torch.bmm(act(gate) * up, w_down.transpose(1, 2))[expert, slot]
    # Combine without atomics: `order` is a permutation, so the rows go back to token order by a
    # gather with its inverse (argsort and indexing, as above: no host sync, capturable), and each
    # token's k weighted outputs are summed by a plain reduction (fp32 accumulation, one rounding),
    # straight into x's dtype (under autocast: fp32 x, bf16 ys, an unrounded sum). index_add_ would
    # accumulate them with atomic adds on CUDA, in an order that changes from run to run and, in
    # bf16, rounded after every add: two runs of one decode step (eager, or replayed from a CUDA
    # graph) could then pick different greedy tokens. (On CPU index_add_ sums in fp32 and rounds once.)
    by_token = ys[torch.argsort(order)].view(N, k, d)
    return (by_token * weights.to(ys.dtype)[..., None]).sum(1, dtype=x.dtype)


class Router(nn.Linear):
    """Expert scores x Wᵀ in fp32 (bias-free), whatever the activations' dtype: top-k choices on
    bf16 scores flip between near-ties, and HF's MoE routers score in fp32 too."""

    def __init__(self, d_model: int, n_experts: int):
        super().__init__(d_model, n_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class MoE(nn.Module):
    # model/roles.py: stacked experts are hidden matrices (their output projection writes into the
    # residual stream); router and shared-expert gate rows are scores, not hidden maps
    PARAM_ROLES = {"w_gate_up": "expert", "w_down": "expert_out", "router.weight": "gate",
                   "shared_gate.weight": "gate"}

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        E, d, inner = cfg.n_experts, cfg.d_model, cfg.d_ff_expert
        self.n_experts, self.top_k = E, cfg.n_experts_per_tok
        self.router = Router(d, E)
        self.act = activation(cfg.hidden_act)
        self.w_gate_up = nn.Parameter(torch.empty(E, 2 * inner, d))
        self.w_down = nn.Parameter(torch.empty(E, d, inner))
        if cfg.router in ("sigmoid", "centroid"):  # aux-loss-free balancing's correction bias
            self.register_buffer("e_score_correction_bias", torch.zeros(E))
        else:
            self.e_score_correction_bias = None
        self.shared = None
        self.shared_gate = None
        if cfg.n_shared_experts > 0:  # DeepSeek: shared experts act as one wide SwiGLU
            self.shared = SwiGLU(d, inner * cfg.n_shared_experts, cfg.hidden_act)
        elif cfg.d_ff_shared > 0:  # Qwen3-Next: one shared expert, optionally gated
            self.shared = SwiGLU(d, cfg.d_ff_shared, cfg.hidden_act)
            if cfg.shared_expert_gate:
                self.shared_gate = nn.Linear(d, 1, bias=False)
        # initialised by role in Transformer.reset_parameters; a standalone MoE gets the same std
        nn.init.normal_(self.w_gate_up, std=cfg.init_std)
        nn.init.normal_(self.w_down, std=cfg.init_std)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.cfg
        if c.router == "centroid":  # the router's rows are the experts' centroids (cosine, not a linear map)
            return route_centroid(x, self.router.weight, self.e_score_correction_bias, c.router_temperature, self.top_k,
                                  c.n_group, c.topk_group, c.norm_topk_prob, c.routed_scaling_factor)
        logits = self.router(x)
        if c.router == "sigmoid":
            return route_sigmoid_grouped(logits, self.e_score_correction_bias, self.top_k, c.n_group, c.topk_group,
                                         c.norm_topk_prob, c.routed_scaling_factor)
        w, idx, probs = route_softmax(logits, self.top_k, c.norm_topk_prob)
        return w * c.routed_scaling_factor if c.routed_scaling_factor != 1.0 else w, idx, probs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """x [B, T, d] -> (y [B, T, d], {"moe_load": [E] tokens per expert, "moe_aux": balance
        loss, present in training when a coefficient is set})."""
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        weights, indices, scores = self.route(flat)
        y = grouped_swiglu(flat, indices, weights, self.w_gate_up, self.w_down, self.act)
        if self.shared is not None:
            s = self.shared(flat)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(flat)) * s
            y = y + s
        stats = {"moe_load": expert_counts(indices, self.n_experts).detach()}
        aux = None
        if self.training and self.cfg.router_aux_loss_coef > 0:
            aux = self.cfg.router_aux_loss_coef * switch_aux_loss(scores, indices, self.n_experts)
        if self.training and self.cfg.seq_aux_loss_coef > 0:
            seq = self.cfg.seq_aux_loss_coef * sequence_aux_loss(scores, indices, self.n_experts, B)
            aux = seq if aux is None else aux + seq
        if aux is not None:
            stats["moe_aux"] = aux
        return y.view(B, T, d), stats

    @torch.no_grad()
    def update_correction_bias(self, tokens_per_expert: torch.Tensor, rate: float) -> None:
        """Aux-loss-free balancing (DeepSeek-V3 §2.1.2): nudge under-loaded experts up and
        over-loaded ones down by `rate`, by the sign of (mean load - load)."""
        if self.e_score_correction_bias is None:
            raise RuntimeError("correction bias exists only for the sigmoid and centroid routers")
        load = tokens_per_expert.float()
        self.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))
