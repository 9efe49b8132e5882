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
