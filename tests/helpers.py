"""Shared test data: devices, dtypes and codebook problems."""

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make_problem(n, k, semantic_dim=32, pixel_dim=8, *, dtype=torch.float32, device="cpu", seed=0):
    """Random x (n, Ds + Dp) and codebooks (k, Ds), (k, Dp) (pixel None when pixel_dim == 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, semantic_dim + pixel_dim, generator=g)
    semantic = torch.randn(k, semantic_dim, generator=g)
    pixel = torch.randn(k, pixel_dim, generator=g) if pixel_dim else None
    move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return move(x), move(semantic), move(pixel)


def make_near_tie_problem(n, k, semantic_dim=32, pixel_dim=8, *, noise=1e-3, dtype=torch.float32, device="cpu",
                          seed=0):
    """Clustered data with genuine near-ties: codes k and k + (k_total + 1) // 2 are 1e-6 apart, and
    x = code[pick] + small noise. Returns (x, semantic, pixel, pick)."""
    g = torch.Generator().manual_seed(seed)
    width = semantic_dim + pixel_dim
    base = torch.randn((k + 1) // 2, width, generator=g)
    codes = torch.cat([base, base + 1e-6 * torch.randn(base.shape, generator=g)])[:k]
    pick = torch.randint(0, k, (n,), generator=g)
    x = codes[pick] + noise * torch.randn(n, width, generator=g)
    semantic = codes[:, :semantic_dim]
    pixel = codes[:, semantic_dim:] if pixel_dim else None
    move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return move(x), move(semantic), move(pixel), pick.to(device)


def tie_tolerance(dtype):
    # distances are computed in fp32 (fp64 for fp64): two codes within rounding of each other may swap
    return 1e-9 if dtype == torch.float64 else 1e-4
