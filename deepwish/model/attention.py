"""Grouped-query attention (Qwen3), with the options later families need:

- per-head QK RMSNorm (Qwen3, Qwen3-Next), applied before rotary;
- an output gate (Qwen3-Next "gated attention"): q_proj emits [query | gate] per head, and
  sigmoid(gate) scales the attention output before o_proj;
- partial rotary (Qwen3-Next rotates the first quarter of each head);
- a sliding window (for `swa` layers), or per-layer windows from `window_pattern` (GPT family),
  grown during training by the window schedule (`scheduled_window`, a cap from the Objective);
- GPT-family options: q, k, v as one [3, H·D, d] stack (one matmul; Muon orthogonalises each
  slice), a soft-cap on the scores, value embeddings
  (a per-token table row added, gated per KV head, to the values) and no rotary at all when the
  model uses learned absolute positions (ctx.cos is None).

Shapes: x [B, T, d]; q [B, T, H, D]; k, v [B, T, Hkv, D]. Heads are grouped: query head h uses
key/value head h // (H / Hkv).

Training and prefill without a cache go through `causal_attention`, by `model.attn_backend`
(resolved once per model by `resolve_attn_backend`, one printed line):
- triton: the own flash-attention kernel (kernels/attention/triton.py) with document ids and
  the window passed as such: no [T, T] mask, O(sum doc_len²) / O(T·W) work;
- flex: torch FlexAttention with a block mask built once per forward and window;
- sdpa: torch SDPA, flash on plain causal input, a dense [B, 1, T, T] mask otherwise;
- torch: explicit fp32 softmax (the readable reference);
- auto: the own kernel for packed/windowed input, SDPA flash for plain causal input and the
  split-KV kernel for cached decoding on CUDA (measured, reports/attention.md); sdpa on the CPU.
With a cache, keys and values are written at their positions and attention runs over the whole
static cache under a `slot <= position` mask, so shapes never change between decode steps; on
the triton (and auto, CUDA) backend a step of a few tokens runs the split-KV kernel
(kernels/attention/decode.py) instead of a masked SDPA.
"""
from __future__ import annotations

import os
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from deepwish.config import WINDOW_BLOCK, ConfigError, ModelConfig
from deepwish.kernels.backend import resolve_backend
from deepwish.kernels.gemv import Linear, linear, takes_gemv
from deepwish.model.cache import KVCache
from deepwish.model.norm import RMSNorm, rms_norm
from deepwish.model.rope import apply_rotary


DECODE_KERNEL_MAX_ROWS = 128  # query rows (tokens x heads per KV head) one split-KV program holds


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class AttnBackends(NamedTuple):
    """What model.attn_backend resolved to, per kind of call."""
    packed: str  # training/prefill with documents or a window: triton | flex | sdpa | torch
    plain: str  # training/prefill on plain causal input
    decode: str  # a few tokens over a cache: triton (split-KV kernel) | sdpa | torch (masked)


def resolve_attn_backend(requested: str, head_dim: int = 128, announce: bool = True,
                         v_head_dim: int | None = None) -> AttnBackends:
    """model.attn_backend -> AttnBackends. An explicit name is used for every call it can serve
    (flex has no cached path: decode then takes masked SDPA). 'auto' takes, on CUDA, by the
    H200 measurements of reports/attention.md (2026-12-03):
    - packed or windowed input: the own kernel, then FlexAttention. At the trainer's shape (B8 x
      T2k, D128, 4 documents per row) fwd+bwd took 1.05 ms against FlexAttention's 1.21 in two
      runs, at D256 0.65-0.70x FlexAttention's time; at T16k-64k, D128, it is within 0.87-1.08x
      of FlexAttention, and it needs no compile. Unequal q·k / value dims (MLA's 192 / 128)
      too: the bf16 GPU test passes there (errors equal SDPA's own bf16 errors);
    - plain causal input: SDPA flash (1.5-1.7x faster than either kernel at D128);
    - cached decoding (1 or k+1 tokens): the own split-KV kernel (no [T, L] mask, 80% of copy
      bandwidth at 32k, batch 1, in a CUDA graph; 5-17x SDPA's masked verification).
    sdpa for all of it on the CPU."""
    def triton_unusable():
        if not torch.cuda.is_available() and not (requested == "triton" and _interpreting()):
            return "no CUDA device (TRITON_INTERPRET=1 runs the kernel on CPU when 'triton' is asked for by name)"
        try:
            import deepwish.kernels.attention.triton  # noqa: F401
        except ImportError as e:
            return f"the Triton kernel cannot be imported ({e})"
        return None

    def flex_unusable():
        if not torch.cuda.is_available():
            return "FlexAttention trains on CUDA only"
        try:
            import deepwish.kernels.attention.flex  # noqa: F401
        except ImportError as e:
            return f"FlexAttention cannot be imported ({e})"
        return None

    candidates = {"triton": triton_unusable, "flex": flex_unusable, "sdpa": lambda: None, "torch": lambda: None}
    order = ["triton", "flex", "sdpa"]
    if v_head_dim is not None and v_head_dim != head_dim:
        order = ["triton", "sdpa"]  # FlexAttention was not measured with unequal dims
    packed = resolve_backend("attention", requested, candidates, order, announce=False)
    if requested == "auto":
        plain = "sdpa"
        decode = "triton" if triton_unusable() is None else "sdpa"
    else:
        plain = packed
        decode = {"flex": "sdpa"}.get(packed, packed)
    chosen = AttnBackends(packed, plain, decode)
    if announce:
        print(f"[deepwish] attention: backend {requested} -> packed/windowed {packed}, plain causal {plain}, "
              f"cached decode {decode}", file=sys.stderr)
    return chosen


def kernel_inputs(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v in the one dtype a kernel computes in. SDPA is on autocast's list and casts its
    inputs itself; the Triton and FlexAttention paths are not, and under autocast their inputs
    arrive mixed (QK-norm and rotary return fp32, v comes from a bf16 matmul): cast them as SDPA
    would, to autocast's dtype when it is on, else to the promoted dtype."""
    dev = ts[0].device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = ts[0].dtype
        for t in ts[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in ts)


def scheduled_window(final: int, cap_blocks: int) -> int:
    """The window a layer attends with under the window schedule's cap of `cap_blocks` blocks of
    WINDOW_BLOCK tokens (0 = no cap): min(final, cap). A full-attention layer (final 0) is never
    capped. The cap is a whole number of blocks that changes a few times per run, so a compiled
    block sees few distinct windows (one graph each), not one per step."""
    if final <= 0 or cap_blocks <= 0:
        return final
    return min(final, cap_blocks * WINDOW_BLOCK)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx, window: int, scale: float,
                     backends: AttnBackends, softcap: float = 0.0) -> torch.Tensor:
    """Causal attention without a cache: q [B,T,H,Dqk], k [B,T,Hkv,Dqk], v [B,T,Hkv,Dv] -> [B,T,H,Dv],
    documents from ctx.doc_ids, window > 0 for sliding-window layers, softcap > 0: scores c·tanh(s/c)."""
    packed = ctx.doc_ids is not None or window > 0
    backend = backends.packed if packed else backends.plain
    if backend in ("triton", "flex"):
        q, k, v = kernel_inputs(q, k, v)
    if backend == "triton":
        from deepwish.kernels.attention.triton import flash_attention
        return flash_attention(q, k, v, doc_ids=ctx.doc_ids, window=window, scale=scale, softcap=softcap,
                               bounds=ctx.doc_bounds)
    if backend == "flex":
        from deepwish.kernels.attention.flex import flex_attention
        return flex_attention(q, k, v, doc_ids=ctx.doc_ids, window=window, scale=scale, softcap=softcap,
                              mask=ctx.flex_mask(window))
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if packed:
        o = sdpa(qt, kt, vt, ctx.mask(window), scale, False, backend, softcap)
    else:
        o = sdpa(qt, kt, vt, None, scale, True, backend, softcap)
    return o.transpose(1, 2)


def sparse_backend(requested: str, backends: AttnBackends) -> str:
    """The backend of block-sparse layers: the own kernel has no block links, so 'auto' takes
    FlexAttention where the packed path would take the own kernel (SDPA with the dense block mask
    on the CPU); 'triton' asked for by name is an error naming the alternatives."""
    if backends.packed != "triton":
        return backends.packed
    if requested == "triton":
        raise ConfigError("model.attn_backend=triton: block-sparse (B) layers of window_pattern need flex, sdpa or "
                          "torch (the own kernel has no block links); auto takes flex on CUDA")
    return "flex" if torch.cuda.is_available() else "sdpa"


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx, local: int, stride: int, scale: float,
                     backend: str, softcap: float = 0.0) -> torch.Tensor:
    """Block-sparse causal attention without a cache (model/block_sparse.py): shapes as causal_attention."""
    if backend == "flex":
        from deepwish.kernels.attention.flex import flex_attention
        q, k, v = kernel_inputs(q, k, v)
        return flex_attention(q, k, v, doc_ids=ctx.doc_ids, softcap=softcap, scale=scale,
                              mask=ctx.flex_sparse_mask(local, stride))
    o = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx.sparse_mask(local, stride), scale, False,
             backend, softcap)
    return o.transpose(1, 2)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int = 0,
                   q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask [B, 1, Tq, Tk]: key visible iff k_pos <= q_pos (within the window, same doc)."""
    m = k_pos[:, None, :] <= q_pos[:, :, None]
    if window > 0:
        m = m & (k_pos[:, None, :] > q_pos[:, :, None] - window)
    if q_doc is not None:
        m = m & (k_doc[:, None, :] == q_doc[:, :, None])
    return m[:, None]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
         causal: bool, backend: str, softcap: float = 0.0) -> torch.Tensor:
    """softmax(q kᵀ·scale + mask) v with grouped heads. q [B,H,Tq,D], k,v [B,Hkv,Tk,D].
    softcap > 0 (scores c·tanh(s/c)) takes the explicit path: SDPA has no score modifier."""
    rep = q.shape[1] // k.shape[1]
    if backend == "torch" or softcap > 0:  # explicit fp32 softmax: the readable reference
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        if causal:
            tq, tk = q.shape[2], k.shape[2]
            mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v.float()).type_as(q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          scale=scale, enable_gqa=rep > 1)


def sdpa_folded_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                       backend: str, softcap: float = 0.0) -> torch.Tensor:
    """`sdpa` with a mask, grouped heads folded into query rows: the rep query heads that share a
    key/value head become rep·Tq rows of that head (same scores, each row keeping its mask row),
    so keys are never repeated. With a mask, flash attention is out and an SDPA backend without
    grouped-head support would otherwise fall back to the math kernel, which repeats K/V and
    upcasts them: decode over a long cache then moves several times the cache's bytes.
    q [B,H,Tq,D], k,v [B,Hkv,Tk,D], mask [B,1,Tq,Tk] -> [B,H,Tq,Dv]."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    if rep == 1:
        return sdpa(q, k, v, mask, scale, False, backend, softcap)
    qf = q.reshape(B, Hkv, rep * T, D)  # head g·rep + r, query t -> row r·T + t of head g
    o = sdpa(qf, k, v, mask.repeat(1, 1, rep, 1), scale, False, backend, softcap)
    return o.reshape(B, H, T, o.shape[-1])


def _views_of(fused, lins) -> bool:
    """Are the linears' weights (and biases) still consecutive row slices of `fused` = (w, b)?"""
    if fused is None:
        return False
    return _slices_of(fused[0], fused[1], *(m.weight for m in lins), *(m.bias for m in lins))


@torch.compiler.assume_constant_result
def _slices_of(w, b, *weights_then_biases) -> bool:
    """Evaluated once when torch.compile traces (a storage address is not traceable; the arguments are
    tensors or None, which the tracer passes as they are); a compiled step is bound to its parameters
    as they were then."""
    n = len(weights_then_biases) // 2
    for whole, parts in ((w, weights_then_biases[:n]), (b, weights_then_biases[n:])):
        if whole is None:
            if any(p is not None for p in parts):
                return False
            continue
        if any(p is None or type(p.data) is not torch.Tensor or p.is_meta or p.dtype != whole.dtype
               or p.device != whole.device for p in parts):
            return False
        offset = 0
        for p in parts:
            if p.data_ptr() != whole.data_ptr() + offset * whole.element_size() or not p.is_contiguous():
                return False
            offset += p.numel()
        if offset != whole.numel():
            return False
    return True


ATTENDING_MIXERS = ("gqa", "gated_gqa", "swa", "mla", "dsa", "nsa")


VALUE_EMBED_GATE_DIM = 12  # leading input channels the value-embedding gate reads (modded-nanogpt's choice)


class FusedQKV(nn.Module):
    """The fused q/k/v view (model.fuse_projections) of a mixer with q_proj, k_proj, v_proj and
    qkv_sizes (their output widths); Attention and NSA build on it. A mixer may fuse more
    projections of the same input after those three (`fused_linears`, with their widths appended
    to qkv_sizes: NSA's gates)."""
    # Decoding one token is a matrix-vector product per projection: three launches that each read
    # a slice of weights, where one read of [Wq; Wk; Wv] does. Training keeps three parameters
    # (their names, roles and Muon's per-matrix orthogonalisation), so the fusion is a view: the
    # three weights are row slices of one [q+2kv, d] tensor, made once here and again after every
    # move or cast (`_apply`); in-place updates (optimizer steps, load_state_dict) write into it.
    # The fused matmul runs only without gradients (decode, prefill, evaluation), and only while
    # the three parameters still are its slices: anything that replaces a parameter's storage
    # (FSDP, load_state_dict(assign=True), `p.data = ...`) makes `_fused_qkv` return None and the
    # three matmuls run as before. Same products, one launch: on the CPU the logits are identical.
    def fused_linears(self) -> tuple[nn.Linear, ...]:
        """The projections whose weights are row slices of the fused one, in qkv_sizes' order."""
        return self.q_proj, self.k_proj, self.v_proj

    def pack_qkv_(self) -> None:
        """Make q_proj/k_proj/v_proj's weights (and biases) row views of one fused tensor."""
        lins = self.fused_linears()
        ws = [m.weight for m in lins]
        if any(w.is_meta or type(w.data) is not torch.Tensor for w in ws) or len({(w.dtype, w.device) for w in ws}) > 1:
            self._qkv = None  # meta (built before materialising) or sharded: nothing to view into
            return
        with torch.no_grad():
            w = torch.cat([x.detach() for x in ws])
            b = torch.cat([m.bias.detach() for m in lins]) if self.q_proj.bias is not None else None
        for m, part in zip(lins, w.split(self.qkv_sizes)):
            m.weight.data = part
        if b is not None:
            for m, part in zip(lins, b.split(self.qkv_sizes)):
                m.bias.data = part
        self._qkv = (w, b)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.fuse_projections and not _views_of(self._qkv, self.fused_linears()):
            self.pack_qkv_()  # a move or cast gave each parameter its own storage: view them again
        return self

    def __setstate__(self, state):
        super().__setstate__(state)  # deepcopy and unpickling: parameters copied one by one
        if self.fuse_projections and not _views_of(self._qkv, self.fused_linears()):
            self.pack_qkv_()

    def _fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if not self.fuse_projections or torch.is_grad_enabled():
            return None
        return self._qkv if _views_of(self._qkv, self.fused_linears()) else None

    def joint_qk(self, y: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection's output y [B, T, sum(qkv_sizes)] with q and k normed and rotated as one
        [B, T, H+Hkv, D] tensor: the q and k heads lie side by side in y, so QK-norm (one weight row
        per head) and rotary run once over both, the same operations per element as q and k apart,
        with half the launches. -> q [B,T,H,D], k [B,T,Hkv,D] (rotated), v [B,T,Hkv,D], and k normed
        but not rotated (what NSA's compression reads). Needs n_heads, n_kv_heads, head_dim, q_norm
        and k_norm."""
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        n_qk = self.qkv_sizes[0] + self.qkv_sizes[1]
        qk = y[..., :n_qk].unflatten(-1, (H + Hkv, D))
        w = torch.cat([self.q_norm.weight.expand(H, D), self.k_norm.weight.expand(Hkv, D)])
        qk = rms_norm(qk, w, self.q_norm.eps, self.q_norm.zero_centered)
        k_normed = qk[:, :, H:]
        if ctx.cos is not None:
            qk = apply_rotary(qk, ctx.cos, ctx.sin)
        q, k = qk.split((H, Hkv), dim=2)
        return q, k, y[..., n_qk:n_qk + self.qkv_sizes[2]].unflatten(-1, (Hkv, D)), k_normed

    def fused_projection(self, x: torch.Tensor, fused, norm: nn.Module | None = None) -> torch.Tensor:
        """x [B, T, d] -> y [B, T, sum(qkv_sizes)]: the fused matmul (kernels/gemv where it serves).
        norm: x is the residual stream and the block's RMSNorm runs in the GEMV's prologue
        (residual_forward's decode path; the caller has checked that the GEMV takes x)."""
        if norm is None:
            return linear(x, *fused, backend=self.matmul, pdl=self.pdl)
        from deepwish.kernels.gemv.triton import gemv
        return gemv(x, *fused, norm=(norm.weight, norm.eps, norm.zero_centered), pdl=self.pdl)


class Attention(FusedQKV):
    # o_proj writes into the residual stream; the value-embedding gate scores, it maps nothing; the fused
    # [q; k; v] stack is three hidden matrices, which Muon orthogonalises one by one (model/roles.py)
    PARAM_ROLES = {"o_proj.weight": "matrix_out", "ve_gate.weight": "gate", "qkv_weight": "matrix"}

    def __init__(self, cfg: ModelConfig, layer_idx: int, gated: bool = False, window: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.gated = gated
        self.layer_idx = layer_idx
        self.window = window or cfg.layer_windows[layer_idx]  # final window; the schedule grows towards it
        self.softcap = cfg.attn_softcap
        # block-sparse layer (model/block_sparse.py): (local blocks, long-link stride)
        self.sparse = (cfg.sparse_local, cfg.sparse_stride) if cfg.block_sparse_layer(layer_idx) else None
        first = next((i for i, (m, _) in enumerate(cfg.layer_types) if m in ATTENDING_MIXERS), layer_idx)
        self.backends = resolve_attn_backend(cfg.attn_backend, cfg.head_dim, announce=layer_idx == first)
        self.backend = "torch" if self.backends.decode == "torch" else "sdpa"  # the masked path over a cache
        if self.sparse is not None:
            self.sparse_backend = sparse_backend(cfg.attn_backend, self.backends)
        d = cfg.d_model
        q_out, kv_out = self.n_heads * self.head_dim * (2 if gated else 1), self.n_kv_heads * self.head_dim
        self.qkv_sizes = (q_out, kv_out, kv_out)
        if cfg.fused_qkv:
            # One [3, H·D, d] stack (modded-nanogpt): one matmul for q, k and v, while Muon, which
            # orthogonalises a 3-D parameter slice by slice, still sees three matrices, not one [3HD, d].
            self.qkv_weight = nn.Parameter(torch.empty(3, q_out, d))
        else:
            self.q_proj = nn.Linear(d, q_out, bias=cfg.attn_bias)
            self.k_proj = nn.Linear(d, kv_out, bias=cfg.attn_bias)
            self.v_proj = nn.Linear(d, kv_out, bias=cfg.attn_bias)
        self.matmul = cfg.decode_matmul  # the backend of decode-sized inference matmuls (kernels/gemv)
        self._qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the fused view (pack_qkv_)
        self.fuse_projections = cfg.fuse_projections and not cfg.fused_qkv
        self.decode_prologue = cfg.decode_prologue
        self.decode_fusion = cfg.decode_fusion  # residual_forward: the block's norm and add in the GEMVs
        self.pdl = cfg.decode_pdl  # the decode kernels' programmatic dependent launch (kernels/pdl.py)
        if self.fuse_projections:
            self.pack_qkv_()
        self.ve_gate = (nn.Linear(min(VALUE_EMBED_GATE_DIM, d), self.n_kv_heads, bias=False)
                        if layer_idx in cfg.value_embed_layers else None)
        self.o_proj = Linear(self.n_heads * self.head_dim, d, bias=cfg.attn_bias, backend=self.matmul,
                             pdl=self.pdl)  # HF: o_proj too
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.norm_zero_centered) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.norm_zero_centered) if cfg.qk_norm else None
        self.scale = self.head_dim ** -0.5

    def make_cache(self, batch: int, max_len: int, dtype, device) -> KVCache:
        return KVCache.empty(batch, max_len, self.n_kv_heads, self.head_dim, dtype=dtype, device=device)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,T,d] -> the q (with gate rows when gated), k, v projections, flat per token."""
        if hasattr(self, "qkv_weight"):
            return F.linear(x, self.qkv_weight.flatten(0, 1)).split(self.qkv_sizes, dim=-1)
        fused = self._fused_qkv()
        if fused is not None:
            return self.fused_projection(x, fused).split(self.qkv_sizes, dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, ctx, cache: KVCache | None = None) -> tuple[torch.Tensor, dict]:
        B, T, _ = x.shape
        fused = None if self.gated or self.q_norm is None else self._fused_qkv()
        if fused is not None and self.takes_decode_step(x, ctx, cache):
            return self.o_proj(self.decode_step(x, fused, ctx, cache).reshape(B, T, -1)), {}
        if fused is not None:
            q, k, v, _ = self.joint_qk(self.fused_projection(x, fused), ctx)
        else:
            q, k, v = self.project_qkv(x)
            q = q.reshape(B, T, self.n_heads, -1)
            if self.gated:  # per head: [query | gate], as in Qwen3-Next's released weights
                q, gate = q.split(self.head_dim, dim=-1)
            k = k.reshape(B, T, self.n_kv_heads, self.head_dim)
            v = v.reshape(B, T, self.n_kv_heads, self.head_dim)
        if self.ve_gate is not None:  # value embedding: a table row per token, gated per KV head (2·σ: 1 at 0)
            ve = ctx.value_embed.view(B, T, self.n_kv_heads, self.head_dim)  # this layer's rows (BlockContext)
            g = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))
            v = v + g[..., None] * ve
        if fused is None:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if ctx.cos is not None:  # None: learned absolute positions, no rotary
                q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if cache is None and self.sparse is not None:
            local, stride = self.sparse
            local = min(local, ctx.window_blocks) if ctx.window_blocks > 0 else local  # the window schedule
            o = sparse_attention(q, k, v, ctx, local, stride, self.scale, self.sparse_backend, self.softcap)
        elif cache is None:
            window = scheduled_window(self.window, ctx.window_blocks)
            o = causal_attention(q, k, v, ctx, window, self.scale, self.backends, self.softcap)
        else:
            o = self.attend_cache(q, k, v, ctx, cache)
        if self.gated:
            o = o * torch.sigmoid(gate)
        return self.o_proj(o.reshape(B, T, -1)), {}


    def decode_kernel(self, T: int, device: torch.device) -> bool:
        """Whether T new tokens attend over a cache through the own split-KV kernel."""
        rows = T * (1 << (self.n_heads // self.n_kv_heads - 1).bit_length())
        return (self.sparse is None and self.backends.decode == "triton" and rows <= DECODE_KERNEL_MAX_ROWS
                and (device.type == "cuda" or _interpreting()))

    def takes_decode_step(self, x: torch.Tensor, ctx, cache) -> bool:
        """Whether this cached forward runs `decode_step` (model.decode_prologue, Qwen3's layers over
        a plain cache; the caller has the fused projection in hand)."""
        return (self.decode_prologue and isinstance(cache, KVCache) and ctx.cos is not None and self.ve_gate is None
                and self.decode_kernel(x.shape[1], x.device))

    def decode_step(self, x: torch.Tensor, fused, ctx, cache: KVCache, norm: nn.Module | None = None) -> torch.Tensor:
        """The cached path of the fused projection in three launches (model.decode_prologue): the
        projection, then QK-norm, rotary and the k/v cache write together, then the split-KV kernel
        (plain cache: slot = position) -> the attention output [B, T, H, D] before o_proj. `norm`: x is
        the stream, normed in the projection's prologue (residual_forward)."""
        from deepwish.kernels.attention.decode import decode_attention, decode_prologue
        y = self.fused_projection(x, fused, norm)
        q = decode_prologue(y, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, ctx.cos, ctx.sin,
                            ctx.positions, cache.k, cache.v, self.n_heads, self.q_norm.zero_centered, pdl=self.pdl)
        return decode_attention(q.to(cache.k.dtype), cache.k, cache.v, ctx.positions, None,
                                window=self.window, scale=self.scale, softcap=self.softcap, pdl=self.pdl)

    def residual_forward(self, x: torch.Tensor, norm: nn.Module, ctx, cache=None) -> tuple[torch.Tensor, dict] | None:
        """x + self(norm(x)) for a decode step in five launches (model.decode_fusion): the block's
        RMSNorm in the fused projection's prologue, `decode_step`'s prologue, split-KV and merge kernels
        (no merge where one split covers the cache), and the residual add in o_proj's epilogue
        (kernels/gemv); None where that path does not apply (the caller composes the ops:
        model/block.py residual_branch)."""
        if not self.decode_fusion or self.gated or self.q_norm is None:
            return None
        fused = self._fused_qkv()
        if (fused is None or not self.takes_decode_step(x, ctx, cache) or not takes_gemv(x, fused[0], self.matmul)
                or x.dtype != self.o_proj.weight.dtype or x.dtype != cache.k.dtype):
            return None
        from deepwish.kernels.gemv.triton import gemv
        B, T, _ = x.shape
        o = self.decode_step(x, fused, ctx, cache, norm).reshape(B, T, -1)
        return gemv(o, self.o_proj.weight, self.o_proj.bias, residual=x, pdl=self.pdl), {}

    def attend_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx, cache) -> torch.Tensor:
        """Write k, v [B,T,Hkv,D] into the cache and attend q [B,T,H,D] over it -> [B,T,H,D]."""
        T = q.shape[1]
        slot_is_position = isinstance(cache, KVCache)  # a plain cache: slot j holds position j
        kernel = self.decode_kernel(T, q.device)
        if kernel and slot_is_position:  # the kernel reads slot = position itself: no key positions
            k, v = cache.update(ctx.positions, k.transpose(1, 2), v.transpose(1, 2))
            k_pos = None
        else:
            k, v, k_pos = cache.keys_for(ctx.positions, k.transpose(1, 2), v.transpose(1, 2))
        if self.sparse is not None:  # the decode kernel has no block links: the masked path
            from deepwish.model.block_sparse import block_sparse_mask
            mask = block_sparse_mask(ctx.positions, k_pos, *self.sparse)
            return sdpa_folded_groups(q.transpose(1, 2), k, v, mask, self.scale, self.backend,
                                      self.softcap).transpose(1, 2)
        if kernel:
            from deepwish.kernels.attention.decode import decode_attention
            q = q.to(k.dtype)  # the cache's dtype: casting q is cheap, casting the cache is not
            return decode_attention(q, k, v, ctx.positions, k_pos,  # None: stops at the last position
                                    window=self.window, scale=self.scale, softcap=self.softcap, pdl=self.pdl)
        # every layer of a plain cache sees the same key positions: one mask per window and step
        mask = (ctx.cache_mask(self.window, k_pos) if slot_is_position
                else attention_mask(ctx.positions, k_pos, self.window))
        return sdpa_folded_groups(q.transpose(1, 2), k, v, mask, self.scale, self.backend,
                                  self.softcap).transpose(1, 2)
