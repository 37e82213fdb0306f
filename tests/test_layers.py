"""Shared building blocks checked against formulas written out directly (the models' parity tests with
transformers cover them on small shapes only)."""

import pytest
import torch

from phi3.layers import apply_rotary


def rotate_by_pairs(x, angles, rot):
    """RoPE as rotations of the channel pairs (i, i + rot/2) by angle[t, i]: x [B, H, T, d], angles [T, rot/2]."""
    half = rot // 2
    a, b = x[..., :half].double(), x[..., half:rot].double()
    c, s = angles.cos().double(), angles.sin().double()
    return torch.cat((a * c - b * s, b * c + a * s, x[..., rot:].double()), -1)


@pytest.mark.parametrize("T", [1, 5, 300])  # the plain form below 32768 elements, the fused one above
@pytest.mark.parametrize("d,rot", [(96, 96), (128, 96)])  # full and partial rotary (phi-4-mini's 0.75)
@pytest.mark.parametrize("grad", [False, True])
def test_apply_rotary_rotates_channel_pairs(T, d, rot, grad):
    H = 32
    qkv = torch.randn(1, T, 3 * H * d)
    x = qkv[..., :H * d].view(1, T, H, d).transpose(1, 2)  # [1, H, T, d], strided like the models' q
    angles = torch.rand(T, rot // 2) * 100
    cos = angles.cos().repeat(1, 2)[None, None]  # [1, 1, T, rot], first half repeated as RotaryEmbedding builds it
    sin = angles.sin().repeat(1, 2)[None, None]
    with torch.set_grad_enabled(grad):
        got = apply_rotary(x.requires_grad_(grad) if grad else x, cos, sin)
    assert got.shape == x.shape
    assert (got.double() - rotate_by_pairs(x.detach(), angles, rot)).abs().max() < 1e-5


def attention_by_head(q, k, v, mask, scale):
    """softmax(q·kᵀ·scale)·v head by head in float64, query head h reading KV head h // G."""
    G = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("T,S", [(1, 300), (3, 40), (70, 200), (300, 420), (300, 300)])  # decode, short chunks (stacked), long ones, a whole prompt
@pytest.mark.parametrize("KV", [2, 8])  # GQA 4:1 and plain multi-head
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [True, False])  # long chunk unpadded: past keys + causal chunk, two flash calls
def test_attention_over_a_cache(T, S, dtype, KV, padded):
    """Queries over a cache, whichever path `attention` takes (the queries of a KV head stacked into
    one SDPA call, the native kernel for one bf16 query, past + causal chunk merged by log-sum-exp):
    the same as head-by-head attention, with or without a padded row, with a scale."""
    from phi3.layers import attention, attention_mask

    B, H, d = 2, 8, 16
    q, k, v = (torch.randn(B, n, t, d).to(dtype) for n, t in ((H, T), (KV, S), (KV, S)))
    k_pos = torch.arange(S).expand(B, S).clone()
    if padded:
        k_pos[1, :5] = -1  # row 1 left-padded
    mask = attention_mask(k_pos[:, S - T:], k_pos, None)  # [B, 1, T, S]
    with torch.no_grad():
        got = attention(q, k, v, mask, scale=0.3)
    expected = attention_by_head(q, k, v, mask, 0.3)
    assert got.shape == (B, H, T, d)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.double() - expected).abs().max() < tol


def test_first_visible_key():
    from phi3.layers import attention_mask, first_visible_key

    k_pos = torch.arange(40).expand(2, 40).clone()
    assert first_visible_key(None) == 0
    assert first_visible_key(attention_mask(k_pos[:, 30:], k_pos, None)) == 0  # no window: everything
    assert first_visible_key(attention_mask(k_pos[:, 39:], k_pos, 15)) == 25  # decode: the last 15 keys
    assert first_visible_key(attention_mask(k_pos[:, 30:], k_pos, 15)) == 16  # a chunk: its first query's window
    k_pos[1] = torch.arange(40) - 3  # row 1 three slots behind (left-padded): its window starts later
    k_pos[1, :3] = -1
    assert first_visible_key(attention_mask(k_pos[:, 39:], k_pos, 15)) == 25
    k_pos[0] = torch.arange(40) - 20  # row 0 twenty behind: it still sees slot 20
    k_pos[0, :20] = -1
    assert first_visible_key(attention_mask(k_pos[:, 39:], k_pos, 15)) == 25
    k_pos[0, 20:] = -1  # row 0 all padding: a padding query may see everything (softmax stays finite)
    assert first_visible_key(attention_mask(k_pos[:, 39:], k_pos, 15)) == 0


@pytest.mark.parametrize("T", [1, 4, 64])  # decode, a short chunk (stacked), a long one
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # fp16 / bf16: native decode
def test_attention_does_not_read_keys_behind_the_sliding_window(T, dtype, monkeypatch):
    """Slots that no query's window reaches hold NaN: `attention` leaves them out (an explicit mask
    would turn them into NaN outputs on SDPA's paths; the native decode kernel is handed only the
    window) and equals attention over the window."""
    from phi3 import cpu_kernels
    from phi3.layers import attention, attention_mask

    native_keys = []
    real = cpu_kernels.attend_cache
    monkeypatch.setattr(cpu_kernels, "attend_cache", lambda lib, q, k, *a: native_keys.append(k.shape[2]) or
                        real(lib, q, k, *a))

    B, H, KV, d, S, W = 2, 8, 2, 16, 200, 50
    q = torch.randn(B, H, T, d)
    k, v = torch.randn(B, KV, S, d).to(dtype), torch.randn(B, KV, S, d).to(dtype)
    k_pos = torch.arange(S).expand(B, S)
    mask = attention_mask(k_pos[:, S - T:], k_pos, W)  # [B, 1, T, S]
    lo = S - T + 1 - W
    k[:, :, :lo], v[:, :, :lo] = float("nan"), float("nan")
    with torch.no_grad():
        got = attention(q.to(dtype) if dtype == torch.float32 else q, k, v, mask, scale=0.3)
    expected = attention_by_head(q, k[:, :, lo:], v[:, :, lo:], mask[..., lo:], 0.3)
    assert not got.isnan().any()
    if T == 1 and dtype != torch.float32 and cpu_kernels.library() is not None:
        assert native_keys == [S - lo]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.double() - expected).abs().max() < tol
