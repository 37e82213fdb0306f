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
