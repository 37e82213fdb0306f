"""Block-sparse attention = dense attention with the explicit mask built from the spec's formula (§2.4)."""

import math

import pytest
import torch

from phi3.blocksparse import SparseKVCache, SparsePattern, blocksparse_prefill


def spec_block_mask(n_heads, n_blocks, block, local, vert, homo=False):
    """The spec's plain reference, written independently: block mask [H, nQblk, nKblk] from the formula."""
    step = 0 if homo else max(1, int(vert / n_heads))
    qb = torch.arange(n_blocks)[:, None]
    kb = torch.arange(n_blocks)[None, :]
    heads = []
    for h in range(n_heads):
        heads.append((qb >= kb) & (((qb - kb) < local) | ((kb + h * step + 1) % vert == 0)))
    return torch.stack(heads)


def reference_attention(q, k, v, pattern, scale, past=0):
    """Dense attention, K/V repeat_interleave'd to all heads, mask = kron(block mask, ones(B, B)) sliced to
    the last q_len rows, AND causal (exactly as mlx-lm does it)."""
    b, H, Tq, d = q.shape
    S = k.shape[2]
    B = pattern.block
    nblk = math.ceil(S / B)
    blocks = spec_block_mask(H, nblk, B, pattern.local_blocks, pattern.vert_stride, pattern.homo_head)
    token = torch.kron(blocks.int(), torch.ones(B, B, dtype=torch.int)).bool()[:, :S, :S][:, -Tq:, :]
    causal = torch.arange(S)[None, :] <= torch.arange(S - Tq, S)[:, None]
    mask = token & causal
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


# small blocks keep the tests fast while exercising band, vertical blocks and head phases
PATTERNS = [SparsePattern(block=8, local_blocks=4, vert_stride=4, n_heads=8),  # step max(1, 4/8)=1
            SparsePattern(block=8, local_blocks=3, vert_stride=8, n_heads=4),  # step 2: heads share phases
            SparsePattern(block=8, local_blocks=2, vert_stride=3, n_heads=4, homo_head=True)]


def qkv(pattern, T, kv=2, d=16, b=2):
    H = pattern.n_heads
    return torch.randn(b, H, T, d), torch.randn(b, kv, T, d), torch.randn(b, kv, T, d)


def test_pattern_matches_spec_formula_for_the_release():
    p = SparsePattern()  # 64 / 16 / 8 / 32 heads
    pos = torch.arange(0, 4096, 16)
    got = p.allowed(pos, pos)  # [H, T, T]
    blocks = spec_block_mask(32, 64, 64, 16, 8)
    expected = blocks[:, pos[:, None] // 64, pos[None, :] // 64] & (pos[None, :] <= pos[:, None])
    assert torch.equal(got, expected)
    assert [p.phase(h) for h in range(9)] == [7, 6, 5, 4, 3, 2, 1, 0, 7]  # heads h, h+8 share a pattern


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("T", [5, 8, 37, 64, 129, 200])
def test_prefill_equals_dense_with_explicit_mask(pattern, T):
    q, k, v = qkv(pattern, T)
    scale = 1 / 16
    got = blocksparse_prefill(q, k, v, pattern, scale)
    expected = reference_attention(q, k, v, pattern, scale)
    assert (got - expected).abs().max() < 1e-5


def test_release_pattern_prefill_non_multiple_of_64():
    """The released 64/16/8 pattern at 2500 tokens (past the 1024-token band), 32 heads over 8 KV heads."""
    p = SparsePattern()
    q, k, v = torch.randn(1, 32, 2500, 8), torch.randn(1, 8, 2500, 8), torch.randn(1, 8, 2500, 8)
    got = blocksparse_prefill(q, k, v, p, 1 / 8)
    expected = reference_attention(q, k, v, p, 1 / 8)
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("chunks", [[1] * 70, [13, 1, 1, 30, 7, 1, 50], [64, 64, 11]])
def test_cache_decode_and_chunked_prefill_equal_dense(pattern, chunks):
    T = sum(chunks)
    q, k, v = qkv(pattern, T)
    scale = 1 / 16
    expected = reference_attention(q, k, v, pattern, scale)
    cache = SparseKVCache(2, 2, T, 16, pattern, torch.float32)
    outs, start = [], 0
    for n in chunks:
        pos = torch.arange(start, start + n).expand(2, n)
        outs.append(cache.attend(q[:, :, start:start + n], k[:, :, start:start + n], v[:, :, start:start + n], pos, scale))
        start += n
    assert (torch.cat(outs, 2) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("chunks", [[40, 24, 40, 96, 37], [8, 8, 16, 300], [128, 72, 9], [12, 20, 50, 3, 5, 40]])  # blocks of 8
def test_fused_prefill_chunks_continuing_the_cache_equal_dense(pattern, chunks):
    """Prompt chunks after the first (block-aligned starts, any length) through `prefill_chunk`: band
    keys from the ring plus the chunk, vertical keys from each head's slot of the store."""
    T = sum(chunks)
    q, k, v = qkv(pattern, T)
    expected = reference_attention(q, k, v, pattern, 1 / 16)
    cache = SparseKVCache(2, 2, T, 16, pattern, torch.float32)
    outs, start = [], 0
    for n in chunks:
        pos = torch.arange(start, start + n).expand(2, n)
        args = q[:, :, start:start + n], k[:, :, start:start + n], v[:, :, start:start + n], pos
        if start == 0:
            outs.append(blocksparse_prefill(*args[:3], pattern, 1 / 16))
            cache.write(args[1], args[2], pos)
        else:
            assert cache.can_prefill_chunk(args[0], pos) == (start % pattern.block == 0)
            fn = cache.prefill_chunk if cache.can_prefill_chunk(args[0], pos) else cache.attend
            outs.append(fn(*args, 1 / 16))
        start += n
    assert (torch.cat(outs, 2) - expected).abs().max() < 1e-5


def test_prefill_chunk_declines_what_it_cannot_take():
    pattern = PATTERNS[0]
    cache = SparseKVCache(2, 2, 64, 16, pattern, torch.float32)
    q, k, v = qkv(pattern, 32)
    cache.write(k[:, :, :16], v[:, :, :16], torch.arange(16).expand(2, 16))
    pos = torch.arange(16, 32).expand(2, 16).clone()
    assert cache.can_prefill_chunk(q[:, :, 16:], pos)
    assert not cache.can_prefill_chunk(q[:, :, 16:17], pos[:, :1])  # one token: decode
    assert not cache.can_prefill_chunk(q[:, :, 16:].bfloat16().half(), pos)  # no fused kernel for fp16
    shifted = pos.clone()
    shifted[1] -= 1  # row 1 is elsewhere
    assert not cache.can_prefill_chunk(q[:, :, 16:], shifted)
    assert not cache.can_prefill_chunk(q[:, :, 17:], pos[:, 1:])  # not where the cache ends
    gappy = SparseKVCache(2, 2, 64, 16, pattern, torch.float32)
    written = torch.arange(16).expand(2, 16).clone()
    written[1, 10] = -1  # row 1 never got position 10 (its length is still 16)
    gappy.write(k[:, :, :16], v[:, :, :16], written)
    assert not gappy.can_prefill_chunk(q[:, :, 16:], pos)


def test_cache_keeps_only_attendable_keys():
    """Release pattern, 32 heads / 8 KV heads: a KV head keeps the 1024-position ring plus 4 of every 8
    blocks (its 4 query heads' phases), so at 32K a sparse layer holds ~0.53 of a dense cache."""
    p = SparsePattern()
    T = 32768
    cache = SparseKVCache(1, 8, T, 128, p, torch.bfloat16, device="meta")
    dense = 2 * 8 * T * 128 * 2
    assert cache.nbytes() == 2 * 8 * (1024 + T // 2) * 128 * 2
    assert cache.nbytes() / dense < 0.54


def test_rows_with_different_lengths_and_padding():
    pattern = PATTERNS[0]
    T = 45
    q, k, v = qkv(pattern, T)
    scale = 1 / 16
    pad = 6  # row 1 is left-padded: its tokens are the first T - pad of row 0's
    pos = torch.arange(T).expand(2, T).clone()
    pos[1] = torch.arange(T) - pad
    pos[1, :pad] = -1
    k[1, :, pad:], v[1, :, pad:], q[1, :, pad:] = k[0, :, :T - pad], v[0, :, :T - pad], q[0, :, :T - pad]
    cache = SparseKVCache(2, 2, T, 16, pattern, torch.float32)
    out = torch.cat([cache.attend(q[:, :, :30], k[:, :, :30], v[:, :, :30], pos[:, :30], scale)] +
                    [cache.attend(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], pos[:, i:i + 1], scale)
                     for i in range(30, T)], 2)
    expected = reference_attention(q[:1], k[:1], v[:1], pattern, scale)
    assert (out[0] - expected[0]).abs().max() < 1e-5
    assert (out[1, :, pad:] - expected[0, :, :T - pad]).abs().max() < 1e-5
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("chunk,band", [(1, 1), (3, 2), (5, 1), (9, 4), (8, 8), (8, 3)])
def test_prefill_any_query_chunk_is_exact(pattern, chunk, band):
    """The fused CPU path merges up to three partial softmaxes per chunk of query blocks; any chunk size
    (aligned to the vertical stride or not) and any number of band blocks per call (dividing the chunk
    or not) gives the dense result, as does the block-by-block path."""
    from phi3.blocksparse import _prefill_by_block

    q, k, v = qkv(pattern, 300)
    expected = reference_attention(q, k, v, pattern, 1 / 16)
    got = blocksparse_prefill(q, k, v, pattern, 1 / 16, chunk_blocks=chunk, band_blocks=band)
    assert (got - expected).abs().max() < 1e-5
    assert (_prefill_by_block(q, k, v, pattern, 1 / 16) - expected).abs().max() < 1e-5
