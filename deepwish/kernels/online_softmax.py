"""The online softmax's step over one key tile (FlashAttention's recurrence, base 2), shared by every
attention kernel: the flash forward, split-KV decoding, NSA's branches and sparse MLA.

    m' = max(m, rowmax(s)),  l' = l·2^(m - m') + rowsum(2^(s - m')),  acc' = acc·2^(m - m') + 2^(s - m')·v

s [rows, keys] holds the scores already multiplied by log2(e) (and by the softmax scale), with
-inf where a pair is not visible; m starts finite (e.g. -1e30) so a row with nothing visible
yet stays NaN-free. Inlined by Triton: one definition, no call at run time."""
import triton
import triton.language as tl


@triton.jit
def online_softmax_step(acc, m_i, l_i, s, v, PREC: tl.constexpr):
    """(acc, m_i, l_i) after one tile of scores s [rows, keys] and values v [keys, dv]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def online_softmax_step_lazy(acc, m_i, l_i, s, v, PREC: tl.constexpr, SLACK: tl.constexpr):
    """The same recurrence with a stale maximum: acc and l are rescaled only when some row's
    maximum grew by more than SLACK (log2 units) since the last rescale; otherwise the tile is
    exponentiated against the old m, so its p stays <= 2^SLACK (exact in fp32 for l and acc, and
    in the 16-bit p of the dot, whose relative precision does not depend on magnitude). The final
    o = acc / l and lse = m + log2(l) are the same quantities as the eager step's, up to rounding.
    Why: the [rows, dv] rescale of acc is a multiply per accumulator element per tile, which at
    dv 512 competes with the tile's matmuls; after the first few tiles a row's maximum rarely moves
    by 2^SLACK, so the branch (one per tile, uniform over the program) is rarely taken."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if tl.max(m_new - m_i, 0) > SLACK:
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    p = tl.exp2(s - m_i[:, None])
    l_i = l_i + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, m_i, l_i


@triton.jit
def online_softmax_step_scaled(acc, m_i, l_i, s, c, v, PREC: tl.constexpr, SLACK: tl.constexpr):
    """online_softmax_step (SLACK 0) or online_softmax_step_lazy (SLACK > 0) on the scores c·s,
    given as s and the factor c > 0 (softmax scale · log2(e), or the softcap's): the row maximum
    is taken on s and multiplied once per row (c > 0 keeps the argmax), and the factor goes into the
    exponent's fused multiply-add, 2^(c·s - m): one multiply per score fewer than scaling s first.
    Same quantities as the unscaled steps, up to fp32 rounding (the product is not rounded before
    the subtraction)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * c)
    if SLACK > 0:
        if tl.max(m_new - m_i, 0) > SLACK:
            alpha = tl.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
    else:
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    p = tl.exp2(s * c - m_i[:, None])
    l_i = l_i + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, m_i, l_i
