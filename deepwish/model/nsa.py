"""Native Sparse Attention (Yuan et al. 2025, "Native Sparse Attention: Hardware-Aligned and
Natively Trainable Sparse Attention", arXiv 2502.11089): the `nsa` mixer and its decoding cache.

Every query head attends three ways over the same rotated queries, keys and values (GQA: query
head h reads KV head h // G, G = H / Hkv) and mixes the results with per-head gates:

    o = g_cmp · o_cmp + g_slc · o_slc + g_win · o_win,      [g_cmp, g_slc, g_win] = σ(W_g x)

- compressed: blocks of l tokens every d tokens (l = model.nsa_cmp_len, d = model.nsa_cmp_stride;
  32 / 16) are each compressed to one key and one value by a learnable MLP φ with an intra-block
  position embedding; queries attend to the compressed tokens whose whole block is in their past
  (kernels/nsa: `nsa_compressed`);
- selected: the compressed-attention probabilities, summed over the G heads of a KV group, score
  the selection blocks of l' tokens (model.nsa_select_len, 64) they overlap; the top n blocks
  (model.nsa_n_select, 16) — always with the document's first block and the nsa_n_local (2)
  blocks ending with the query's — are attended token by token (`nsa_selected`);
- window: causal attention over the last w tokens (model.nsa_window, 512) through the project's
  attention kernels (model/attention.py `causal_attention`, the backend of model.attn_backend).
No branch attends across a document boundary of a packed row (ctx.doc_ids).

Choices and deviations from the paper (which leaves most of these open):
- φ: k̃ = mean_i(k_i + p_i) + W_2·silu(W_1·flatten(k_i + p_i)) over the l keys of a block, with p
  [l, D] a learned intra-block position embedding, W_1 [D, l·D], W_2 [D, D]; the same form,
  separate weights, for values. Shared across KV heads. The mean-pooling term makes φ start near
  mean pooling (W_2 is small at initialisation), so a model initialised from dense weights
  (`train --init-from`) begins with meaningful compressed tokens.
- Positions: the blocks are compressed from the keys after the QK-norm and before rotary, and the
  compressed key is then rotated at the position of the block's last token; queries are the
  rotated queries of the other branches. The score of a query at p against a block therefore
  carries the relative distance p − (block end) ≥ 0, as the raw branches carry p − s.
- Blocks are aligned to document positions (block j of a document covers its positions
  [j·d, j·d + l − 1]); a document shorter than l has no compressed token (its queries get o_cmp = 0
  and select from the initial and local blocks alone). Selection blocks are aligned to row
  positions (the kernel's rule, kernels/nsa), so in a packed row whose documents do not start at
  multiples of l' the selection differs from the same documents in separate rows (the window and
  compressed branches do not).
- Block importance is kernels/nsa/reference.py's rule: a compressed token's group-summed probability
  counts once for every selection block its range overlaps (not eq. 9's triangular weights).
- n_init = 1 (the paper's one initial block); n_local from model.nsa_n_local.
- Gates: W_g is one [3H, d] linear map without bias (N(0, init_std) like other gates, so every gate
  starts near 0.5); model.nsa_gate=sum drops it and adds the three branches.
- The query's own KV group shares one selection (the paper's GQA rule); the group size is any
  divisor of n_heads on the torch path, <= 16 (and head_dim <= 256) on the Triton path, checked
  when the model is built.

Decoding (NSACache): raw rotated K and V (selected and window branches) at their positions, the
un-rotated keys the compression reads (one more [B, Hkv, L, D] buffer: the simplest exact source;
a ring of l + speculation slack slots would do), and the compressed K / V with the row position of each block's end.
A chunk (prefill, one decode token, a k+1 verification) writes its keys, compresses every block
that ends inside it into slot (end − l + 1)/d (blocks that do not exist go to one trash slot whose
end is never visible), then attends over the whole static cache. All shapes are fixed and nothing
here synchronises with the host, so with the Triton kernels a decode step is graph-capturable
(decode_graph.py; the torch reference kernel reads max(q_pos) on the host), and a slot is
a function of position, so rejected speculative tokens are simply rewritten later (speculative.py
treats the cache as positional). The cache serves one document per row (no doc_ids).
Cost note: the training path compresses only the T//d + 1 candidate block ends of a row; the
cache path compresses T//d + 1 candidates per chunk (one per decode step, most of them the trash).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepwish.config import ConfigError, ModelConfig
from deepwish.kernels.gemv import takes_gemv
from deepwish.model.attention import (ATTENDING_MIXERS, DECODE_KERNEL_MAX_ROWS, FusedQKV, _interpreting,
                                      attention_mask, causal_attention, kernel_inputs, resolve_attn_backend,
                                      sdpa_folded_groups)
from deepwish.model.cache import take_rows_, write_rows_
from deepwish.model.norm import RMSNorm
from deepwish.model.rope import apply_rotary

NEVER = 2 ** 62  # block end of a slot that holds no block: beyond every query, so never visible


def block_ends(doc_pos: torch.Tensor, cmp_len: int, stride: int, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens that end a compression block, packed to the front: doc_pos [B, T] (positions in
    the token's document, consecutive within it) -> (rows [B, n_slots] int64 indices into T,
    valid [B, n_slots] bool). A token at document position p ends block (p − l + 1)/d when p >= l − 1
    and d divides p − l + 1. Fixed shapes, no host synchronisation: ends beyond n_slots would be
    dropped, so n_slots must bound their number (T//d + 1 does for any T consecutive positions)."""
    B, T = doc_pos.shape
    ends_here = (doc_pos >= cmp_len - 1) & ((doc_pos - (cmp_len - 1)) % stride == 0)
    slot = torch.where(ends_here, ends_here.long().cumsum(1) - 1, n_slots).clamp(max=n_slots)
    rows = torch.zeros(B, n_slots + 1, dtype=torch.long, device=doc_pos.device)
    rows.scatter_(1, slot, torch.arange(T, device=doc_pos.device).expand(B, T))
    valid = torch.zeros(B, n_slots + 1, dtype=torch.bool, device=doc_pos.device).scatter_(1, slot, ends_here)
    return rows[:, :n_slots], valid[:, :n_slots]


def chunk_block_ends(positions: torch.Tensor, cmp_len: int, stride: int, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`block_ends` for a chunk of consecutive positions p0 .. p0 + T - 1 in every row (a cached
    forward: one document a row), in closed form: the first end is at row r0 = max((l - 1 - p0) mod
    d, l - 1 - p0), the next ones every d rows. The same valid rows, packed to the front (the others
    point at the chunk's last row; their blocks go to the trash slot), in a handful of ops instead
    of a cumulative sum and two scatters: a decode step runs this in every NSA layer."""
    T = positions.shape[1]
    before = (cmp_len - 1) - positions[:, :1]                          # [B, 1]
    first = torch.maximum(before % stride, before)
    rows = first + torch.arange(0, n_slots * stride, stride, device=positions.device)
    return rows.clamp(max=T - 1), rows < T


def block_rows(ends: torch.Tensor, cmp_len: int) -> torch.Tensor:
    """ends [B, N] -> the l rows of each block [B, N·l] (end − l + 1 .. end, clamped at 0 for pads)."""
    offs = torch.arange(1 - cmp_len, 1, device=ends.device)
    return (ends[:, :, None] + offs).clamp_min(0).flatten(1)


class Compression(nn.Module):
    """φ: the l tokens of a block of one KV head [..., l, D] -> one token [..., D] (module docstring)."""

    # pos: a learned table like an embedding; down adds onto the mean pooling, so it starts small
    PARAM_ROLES = {"pos": "embedding", "down.weight": "matrix_out"}

    def __init__(self, cmp_len: int, dim: int):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(cmp_len, dim))
        self.up = nn.Linear(cmp_len * dim, dim, bias=False)
        self.down = nn.Linear(dim, dim, bias=False)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        x = blocks + self.pos.to(blocks.dtype)
        return x.mean(-2) + self.down(F.silu(self.up(x.flatten(-2))))


@dataclass
class NSACache:
    k: torch.Tensor  # [B, Hkv, L, D] rotated keys (selected and window branches)
    v: torch.Tensor  # [B, Hkv, L, D]
    k_raw: torch.Tensor  # [B, Hkv, L, D] keys before rotary: what the compression reads
    k_cmp: torch.Tensor  # [B, N + 1, Hkv, D] compressed keys (rotated at the block end); slot N: trash
    v_cmp: torch.Tensor  # [B, N + 1, Hkv, D]
    cmp_end: torch.Tensor  # [B, N + 1] int64: row position of each block's last token (NEVER: none)

    POSITIONAL = True  # every entry is a function of position: speculative rollback needs no copy

    @classmethod
    def empty(cls, batch: int, max_len: int, n_kv_heads: int, head_dim: int, cmp_len: int, stride: int,
              dtype=torch.float32, device=None) -> "NSACache":
        n = max(0, (max_len - cmp_len) // stride + 1)
        kv = lambda L: torch.zeros(batch, n_kv_heads, L, head_dim, dtype=dtype, device=device)  # noqa: E731
        cmp = lambda: torch.zeros(batch, n + 1, n_kv_heads, head_dim, dtype=dtype, device=device)  # noqa: E731
        return cls(kv(max_len), kv(max_len), kv(max_len), cmp(), cmp(),
                   torch.full((batch, n + 1), NEVER, dtype=torch.long, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def n_blocks(self) -> int:
        return self.cmp_end.shape[1] - 1

    def write(self, positions: torch.Tensor, k: torch.Tensor, k_raw: torch.Tensor, v: torch.Tensor) -> None:
        """k, k_raw, v [B, T, Hkv, D] at slots `positions` [B, T]."""
        for buf, t in ((self.k, k), (self.k_raw, k_raw), (self.v, v)):
            write_rows_(buf, 2, positions, t.transpose(1, 2))

    def write_blocks(self, slot: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, end: torch.Tensor) -> None:
        """slot [B, n] (n_blocks = trash), k_cmp, v_cmp [B, n, Hkv, D], end [B, n] (NEVER for the trash)."""
        for buf, t in ((self.k_cmp, k_cmp), (self.v_cmp, v_cmp), (self.cmp_end, end)):
            write_rows_(buf, 1, slot, t)

    def reset(self) -> None:
        for t in (self.k, self.v, self.k_raw, self.k_cmp, self.v_cmp):
            t.zero_()
        self.cmp_end.fill_(NEVER)

    def reorder(self, index: torch.Tensor) -> None:
        """Row b becomes row index[b] (beam search); in place."""
        for t in (self.k, self.v, self.k_raw, self.k_cmp, self.v_cmp, self.cmp_end):
            take_rows_(t, index)


class NSA(FusedQKV):
    """The `nsa` mixer (module docstring). Projections, QK-norm and rotary as the Qwen3 attention
    (same parameter names, so dense weights load into it; model.fuse_projections: one matmul for q,
    k and v without gradients, and QK-norm and rotary once over the q and k heads together)."""

    PARAM_ROLES = {"o_proj.weight": "matrix_out", "gate_proj.weight": "gate"}

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cmp_len, self.cmp_stride = cfg.nsa_cmp_len, cfg.nsa_cmp_stride
        self.select_len, self.n_select, self.n_local = cfg.nsa_select_len, cfg.nsa_n_select, cfg.nsa_n_local
        self.window_size = cfg.nsa_window  # not `window`: make_ring_cache would take it for an swa layer
        first = next((i for i, (m, _) in enumerate(cfg.layer_types) if m in ATTENDING_MIXERS), layer_idx)
        self.backends = resolve_attn_backend(cfg.attn_backend, cfg.head_dim, announce=layer_idx == first)
        # kernels/nsa, resolved once (announced by the first nsa layer); 'auto' on a CPU tensor takes torch
        from deepwish.kernels.nsa import resolve_nsa_backend
        first_nsa = next(i for i, (m, _) in enumerate(cfg.layer_types) if m == "nsa")
        self.kernel_requested = cfg.nsa_backend
        self.kernel_backend = resolve_nsa_backend(cfg.nsa_backend, "cuda" if torch.cuda.is_available() else "cpu",
                                                  announce=layer_idx == first_nsa)
        if self.kernel_backend == "triton":  # the shapes the Triton kernels tile, named at build time
            from deepwish.kernels.nsa.triton import MAX_HEAD_DIM, check_group
            try:
                check_group(cfg.n_heads, cfg.n_kv_heads)
                if cfg.head_dim > MAX_HEAD_DIM:
                    raise ValueError(f"head_dim={cfg.head_dim} > {MAX_HEAD_DIM}")
            except ValueError as e:
                raise ConfigError(f"layer {layer_idx} (nsa): model.nsa_backend={cfg.nsa_backend} resolved to triton, "
                                  f"which cannot run this shape: {e}; use model.nsa_backend=torch") from None
        self.mask_backend = "torch" if self.backends.decode == "torch" else "sdpa"
        d, H, Hkv, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, H * D, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(d, Hkv * D, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(d, Hkv * D, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(H * D, d, bias=cfg.attn_bias)
        self.qkv_sizes = (H * D, Hkv * D, Hkv * D)
        self.matmul, self.pdl = cfg.decode_matmul, cfg.decode_pdl   # the fused projection's matmul (kernels/gemv)
        self._qkv = None
        self.fuse_projections = cfg.fuse_projections
        self.q_norm = RMSNorm(D, cfg.norm_eps, cfg.norm_zero_centered) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.norm_eps, cfg.norm_zero_centered) if cfg.qk_norm else None
        self.k_compress = Compression(self.cmp_len, D)
        self.v_compress = Compression(self.cmp_len, D)
        self.gate_proj = nn.Linear(d, 3 * H, bias=False) if cfg.nsa_gate == "sigmoid" else None
        # the gates read the same x as q, k and v: their rows join the fused projection (one matmul a
        # decoding step, not two), where no projection has a bias (the fused bias would need one)
        self.gates_fused = self.gate_proj is not None and not cfg.attn_bias
        if self.gates_fused:
            self.qkv_sizes += (3 * H,)
        self.scale = D ** -0.5
        self.decode_fusion = cfg.decode_fusion  # residual_forward: the block's norm and add in the GEMVs
        self.decode_prologue = cfg.decode_prologue  # QK-norm, rotary and the three cache writes in one kernel
        if self.fuse_projections:
            self.pack_qkv_()

    def fused_linears(self) -> tuple[nn.Linear, ...]:
        return (self.q_proj, self.k_proj, self.v_proj) + ((self.gate_proj,) if self.gates_fused else ())

    def make_cache(self, batch: int, max_len: int, dtype, device) -> NSACache:
        return NSACache.empty(batch, max_len, self.n_kv_heads, self.head_dim, self.cmp_len, self.cmp_stride,
                              dtype=dtype, device=device)

    # ---- pieces ------------------------------------------------------------------------------
    def compress(self, k_src: torch.Tensor, v_src: torch.Tensor, rows: torch.Tensor, cos: torch.Tensor | None,
                 sin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """k_src, v_src [B, Hkv, S, D] (un-rotated keys, values), rows [B, N] the block ends in S,
        cos / sin [B, N, R/2] at the block ends (None: no rotary) -> k_cmp, v_cmp [B, N, Hkv, D]."""
        B, Hkv, _, D = k_src.shape
        N, l = rows.shape[1], self.cmp_len
        idx = block_rows(rows, l)[:, None, :, None].expand(-1, Hkv, -1, D)
        k_blk = k_src.gather(2, idx).view(B, Hkv, N, l, D).transpose(1, 2)  # [B, N, Hkv, l, D]
        v_blk = v_src.gather(2, idx).view(B, Hkv, N, l, D).transpose(1, 2)
        k_cmp, v_cmp = self.k_compress(k_blk), self.v_compress(v_blk)
        if cos is not None:
            k_cmp = apply_rotary(k_cmp, cos, sin)
        return k_cmp, v_cmp

    def sparse_branches(self, q, k_cmp, v_cmp, cmp_end, k, v, q_pos, doc_ids, pdl="off"):
        """The compressed and selected branches (kernels/nsa) -> o_cmp, o_slc [B, T, H, D]; pdl: their
        decoding launches' (the cache path passes model.decode_pdl)."""
        from deepwish.kernels.nsa import nsa_compressed, nsa_selected
        backend = self.sparse_backend(q.device)
        o_cmp, sel_idx = nsa_compressed(q, k_cmp, v_cmp, cmp_end, q_pos=q_pos, doc_ids=doc_ids,
                                        cmp_len=self.cmp_len, select_len=self.select_len, n_select=self.n_select,
                                        n_init=1, n_local=self.n_local, scale=self.scale, S=k.shape[1],
                                        backend=backend, pdl=pdl)
        o_slc = nsa_selected(q, k, v, sel_idx, q_pos=q_pos, doc_ids=doc_ids, select_len=self.select_len,
                             scale=self.scale, backend=backend, pdl=pdl)
        return o_cmp, o_slc

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, ctx, cache: NSACache | None = None) -> tuple[torch.Tensor, dict]:
        B, T, _ = x.shape
        return self.o_proj(self.heads(x, ctx, cache).reshape(B, T, -1)), {}

    def residual_forward(self, x: torch.Tensor, norm: nn.Module, ctx, cache=None) -> tuple[torch.Tensor, dict] | None:
        """x + self(norm(x)) for a decode step (model.decode_fusion, as the dense layers'
        `Attention.residual_forward`): the block's RMSNorm in the prologues of the fused projection and
        of the gate projection (kernels/gemv), the residual add in o_proj's epilogue; None where that
        path does not apply (model/block.py residual_branch composes the ops)."""
        fused = None if not self.decode_fusion or self.q_norm is None else self._fused_qkv()
        if (fused is None or not self.takes_prologue(x, ctx, cache) or not takes_gemv(x, fused[0], self.matmul)
                or x.dtype != self.o_proj.weight.dtype or x.dtype != cache.k.dtype):
            return None
        from deepwish.kernels.gemv.triton import gemv
        B, T, _ = x.shape
        o = self.heads(x, ctx, cache, norm).reshape(B, T, -1)
        return gemv(o, self.o_proj.weight, self.o_proj.bias, residual=x, pdl=self.pdl), {}

    def heads(self, x: torch.Tensor, ctx, cache: NSACache | None = None, norm: nn.Module | None = None) -> torch.Tensor:
        """The gated sum of the three branches [B, T, H, D], before o_proj. `norm`: x is the residual
        stream, normed in the projections' prologues (residual_forward: the decode prologue's path)."""
        B, T, _ = x.shape
        fused = None if self.q_norm is None else self._fused_qkv()
        y = None   # the fused projection's output: q, k, v (and the gates' logits, gates_fused)
        n_qkv = sum(self.qkv_sizes[:3])
        if fused is not None and self.takes_prologue(x, ctx, cache):
            # the dense layers' decode prologue kernel (kernels/attention/decode.py), with the raw keys:
            # q out, k (rotated), v and k before rotary written into the cache at their positions
            from deepwish.kernels.attention.decode import decode_prologue
            y = self.fused_projection(x, fused, norm)
            q = decode_prologue(y[..., :n_qkv], self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, ctx.cos,
                                ctx.sin, ctx.positions, cache.k, cache.v, self.n_heads, self.q_norm.zero_centered,
                                pdl=self.pdl, k_raw_cache=cache.k_raw)
            k = v = k_raw = None   # in the cache already
        elif fused is not None:   # one matmul; the compression reads k before rotary (k_raw)
            y = self.fused_projection(x, fused)
            q, k, v, k_raw = self.joint_qk(y, ctx)
        else:
            q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
            k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
            v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            k_raw = k
            if ctx.cos is not None:
                q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if cache is None:
            o_cmp, o_slc, o_win = self.attend_rows(q, k, v, k_raw, ctx)
        else:
            o_cmp, o_slc, o_win = self.attend_cache(q, k, v, k_raw, ctx, cache)
        if self.gate_proj is None:
            return o_cmp + o_slc + o_win
        if y is not None and self.gates_fused:   # the gates' logits, from the fused projection
            g = y[..., n_qkv:]
        elif norm is not None:
            from deepwish.kernels.gemv.triton import gemv
            g = gemv(x, self.gate_proj.weight, norm=(norm.weight, norm.eps, norm.zero_centered), pdl=self.pdl)
        else:
            g = self.gate_proj(x)
        if cache is not None and self.sparse_backend(x.device) == "triton" and not torch.is_grad_enabled():
            from deepwish.kernels.nsa.gates import gated_sum  # the same sum in one launch
            return gated_sum(g, o_cmp, o_slc, o_win, pdl=self.pdl)
        # contiguous: the CPU's sigmoid rounds a strided view's elements differently (scalar, not vector
        # code), so the fused layout's logits would differ from the three matmuls' in the last bit
        g = torch.sigmoid(g.contiguous()).view(B, T, self.n_heads, 3).to(o_win.dtype)
        return g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win

    def block_ends(self, ctx, cached: bool):
        """The blocks ending in this forward's T tokens -> (rows [B, n] into T, valid [B, n], cos, sin
        [B, n, R/2] at those rows or None), found from document positions (a cache's chunk: consecutive
        positions, one document a row)."""
        ends = chunk_block_ends if cached else block_ends
        rows, valid = ends(ctx.positions, self.cmp_len, self.cmp_stride, ctx.positions.shape[1] // self.cmp_stride + 1)
        cos = sin = None
        if ctx.cos is not None:
            at = rows[:, :, None].expand(-1, -1, ctx.cos.shape[-1])
            cos, sin = ctx.cos.gather(1, at), ctx.sin.gather(1, at)
        return rows, valid, cos, sin

    def sparse_backend(self, device: torch.device) -> str:
        """kernels/nsa's backend for tensors on `device` ('auto' resolved at build time to triton takes
        the torch path for CPU tensors)."""
        return self.kernel_backend if device.type == "cuda" or self.kernel_requested != "auto" else "torch"

    def compress_kernel(self, T: int, device: torch.device) -> bool:
        """Whether a cached chunk of T tokens compresses its blocks in one launch
        (kernels/nsa/compress.py): decode-sized chunks on the Triton backend."""
        if self.sparse_backend(device) != "triton":
            return False
        from deepwish.kernels.nsa.triton import DECODE_MAX_T
        return T <= DECODE_MAX_T

    def window_kernel(self, T: int, device: torch.device) -> bool:
        """Whether T cached tokens' window branch runs the split-KV decode kernel (kernels/attention)."""
        rows = T * (1 << (self.n_heads // self.n_kv_heads - 1).bit_length())
        return (self.backends.decode == "triton" and rows <= DECODE_KERNEL_MAX_ROWS
                and (device.type == "cuda" or _interpreting()))

    def takes_prologue(self, x: torch.Tensor, ctx, cache) -> bool:
        """Whether this cached forward writes its keys and values through the decode prologue kernel
        (model.decode_prologue, as the dense layers: rotary present, the window on the split-KV kernel)."""
        return (self.decode_prologue and isinstance(cache, NSACache) and ctx.cos is not None
                and ctx.doc_ids is None and self.window_kernel(x.shape[1], x.device))

    def attend_rows(self, q, k, v, k_raw, ctx):
        """Training / prefill without a cache: every branch over the rows themselves."""
        B, T = q.shape[:2]
        rows, valid, cos, sin = self.block_ends(ctx, cached=False)
        k_cmp, v_cmp = self.compress(k_raw.transpose(1, 2), v.transpose(1, 2), rows, cos, sin)
        if ctx.doc_ids is not None:  # positions that do not restart per document must not make a block span two
            valid = valid & (ctx.doc_ids.gather(1, (rows - (self.cmp_len - 1)).clamp_min(0)) == ctx.doc_ids.gather(1, rows))
        cmp_end = torch.where(valid, rows, NEVER)
        q_pos = torch.arange(T, device=q.device).expand(B, T)
        qk, kk, vk, kc, vc = kernel_inputs(q, k, v, k_cmp, v_cmp)
        o_cmp, o_slc = self.sparse_branches(qk, kc, vc, cmp_end, kk, vk, q_pos, ctx.doc_ids)
        o_win = causal_attention(q, k, v, ctx, self.window_size, self.scale, self.backends)
        return o_cmp, o_slc, o_win

    def compress_chunk_(self, cache: NSACache, ctx) -> None:
        """The blocks ending in a cached chunk (its rows written), compressed into the cache's slots in
        torch (kernels/nsa/compress.py is the one-launch form)."""
        rows, valid, cos, sin = self.block_ends(ctx, cached=True)
        end = ctx.positions.gather(1, rows)   # slot = position: the block ends' slots are their positions
        k_cmp, v_cmp = self.compress(cache.k_raw, cache.v, end, cos, sin)
        slot = torch.where(valid, (end - (self.cmp_len - 1)) // self.cmp_stride, cache.n_blocks)
        slot = slot.clamp(0, cache.n_blocks)  # a block past the cache's last slot cannot end inside it
        cache.write_blocks(slot, k_cmp, v_cmp, torch.where(valid, end, NEVER))

    def attend_cache(self, q, k, v, k_raw, ctx, cache: NSACache):
        """Prefill / decode / verification over the cache (module docstring)."""
        if ctx.doc_ids is not None:
            raise ValueError("nsa: a cached forward serves one document per row; doc_ids is not supported with a cache")
        pos = ctx.positions  # slot = position = row position
        if k is not None:   # None: the decode prologue wrote them (forward)
            cache.write(pos, k, k_raw, v)
        if self.compress_kernel(q.shape[1], q.device):
            from deepwish.kernels.nsa.compress import compress_cache_blocks
            compress_cache_blocks(cache.k_raw, cache.v, pos, self.k_compress, self.v_compress, ctx.cos, ctx.sin,
                                  cache.k_cmp, cache.v_cmp, cache.cmp_end, self.cmp_stride, pdl=self.pdl)
        else:
            self.compress_chunk_(cache, ctx)
        q = q.to(cache.k.dtype)  # the cache's dtype: casting q is cheap, casting the cache is not
        o_cmp, o_slc = self.sparse_branches(q, cache.k_cmp, cache.v_cmp, cache.cmp_end, cache.k.transpose(1, 2),
                                            cache.v.transpose(1, 2), pos, None, self.pdl)
        if self.window_kernel(q.shape[1], q.device):
            from deepwish.kernels.attention.decode import decode_attention
            o_win = decode_attention(q, cache.k, cache.v, pos, None, window=self.window_size, scale=self.scale,
                                     pdl=self.pdl)
        else:
            k_pos = torch.arange(cache.max_len, device=q.device).expand(q.shape[0], -1)
            mask = attention_mask(pos, k_pos, self.window_size)
            o_win = sdpa_folded_groups(q.transpose(1, 2), cache.k, cache.v, mask, self.scale,
                                       self.mask_backend).transpose(1, 2)
        return o_cmp, o_slc, o_win
