"""Reference of TokenFlow's quantizer modules: the official ``VectorQuantizer.forward`` and the multi-scale
loop of ``TokenFlow.encode``, as eager N x K formulas (including the one-hot, the N x K entropy softmax and
the N x K ``d_norm`` logging). Used by the module tests and as the benchmark baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _entropy(affinity, temperature=0.01):
    flat = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(flat, dim=-1)
    log_probs = F.log_softmax(flat + 1e-5, dim=-1)
    avg_probs = probs.mean(dim=0)
    avg_entropy = -torch.sum(avg_probs * torch.log(avg_probs + 1e-5))
    return -torch.mean(torch.sum(probs * log_probs, dim=-1)) - avg_entropy


def official_quantizer_forward(z, semantic_weight, pixel_weight_matrix, *, beta=0.25, entropy_loss_ratio=0.0,
                               training=False, pixel_weight=1.0):
    """One scale of the official l2 quantizer. z (B, Ds + Dp, H, W) -> (z_q, losses, indices (N,))."""
    split = [semantic_weight.shape[1], pixel_weight_matrix.shape[1]]
    z = z.permute(0, 2, 3, 1).contiguous()
    z_s, z_p = (F.normalize(part, p=2, dim=-1) for part in torch.split(z, split, dim=-1))
    e_s, e_p = F.normalize(semantic_weight, p=2, dim=-1), F.normalize(pixel_weight_matrix, p=2, dim=-1)
    z_hat = torch.cat([z_s, z_p], dim=-1)
    flat_s, flat_p = z_s.reshape(-1, split[0]), z_p.reshape(-1, split[1])
    d_s = (flat_s ** 2).sum(1, keepdim=True) + (e_s ** 2).sum(1) - 2 * flat_s @ e_s.t()
    d_p = (flat_p ** 2).sum(1, keepdim=True) + (e_p ** 2).sum(1) - 2 * flat_p @ e_p.t()
    d_norm_s, d_norm_p = torch.mean(torch.sum(d_s ** 2, dim=-1)), torch.mean(torch.sum(d_p ** 2, dim=-1))
    d = d_s + pixel_weight * d_p
    indices = torch.argmin(d, dim=1)
    z_q = torch.cat([e_s, e_p], dim=-1)[indices].view(z.shape)
    F.one_hot(indices, e_s.shape[0])  # the official code always builds it
    vq_loss = commit_loss = entropy = None
    if training:
        vq_loss = torch.mean((z_q - z_hat.detach()) ** 2)
        commit_loss = beta * torch.mean((z_q.detach() - z_hat) ** 2)
        entropy = entropy_loss_ratio * _entropy(-d)
    z_q = z_hat + (z_q - z_hat).detach()
    return z_q.permute(0, 3, 1, 2), (vq_loss, commit_loss, entropy, d_norm_s, d_norm_p), indices


def official_multiscale_encode(h, semantic_weight, pixel_weight_matrix, scales, **kwargs):
    """TokenFlow.encode's residual loop without scale drop -> (features, averaged losses, indices (B, sum s^2))."""
    size = scales[-1]
    residual, features, losses, indices = h, 0.0, [], []
    for scale in scales:
        quantized, loss, idx = official_quantizer_forward(F.interpolate(residual, size=(scale, scale), mode="area"),
                                                          semantic_weight, pixel_weight_matrix, **kwargs)
        upsampled = F.interpolate(quantized, size=(size, size), mode="bicubic")
        features = features + upsampled
        residual = residual - upsampled.detach()
        losses.append(loss)
        indices.append(idx.reshape(-1, scale * scale))
    averaged = tuple(None if g[0] is None else sum(g) / len(g) for g in zip(*losses))
    return features, averaged, torch.cat(indices, dim=1)
