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
    """(acc, m_i, l_i) after one tile of scores s [rows, keys] and values v [keys, dv]: the scaled
    step below with factor 1 and an eager rescale (s already holds the base-2 scores)."""
    return online_softmax_step_scaled(acc, m_i, l_i, s, 1.0, v, PREC, 0.0)


@triton.jit
def online_softmax_step_scaled(acc, m_i, l_i, s, c, v, PREC: tl.constexpr, SLACK: tl.constexpr):
    """The step on the base-2 scores c·s, given as s and the factor c > 0 (softmax scale · log2(e),
    or the softcap's). SLACK 0 rescales acc and l at every tile (FlashAttention's recurrence above).
    SLACK > 0 keeps a stale maximum: acc and l are rescaled only when some row's maximum grew by
    more than SLACK (log2 units) since the last rescale; otherwise the tile is exponentiated against
    the old m, so its p stays <= 2^SLACK (exact in fp32 for l and acc, and in the 16-bit p of the
    dot, whose relative precision does not depend on magnitude); o = acc / l and lse = m + log2(l)
    are the same quantities. Why: the [rows, dv] rescale of acc is a multiply per accumulator
    element per tile (at dv 512 it competes with the tile's matmuls), and after the first tiles a
    row's maximum rarely moves by 2^SLACK, so the branch (one per tile, uniform over the program)
    is rarely taken. The row maximum
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

