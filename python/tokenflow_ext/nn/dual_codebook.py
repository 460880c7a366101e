"""DualCodebookQuantizer: a drop-in replacement for TokenFlow's ``VectorQuantizer`` with ``split=[32, 8]``."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .._parts import bool_arg, float_arg, normalize_parts, promote_floats
from ..ops.codebook_gather import codebook_gather
from ..ops.codebook_search import codebook_search
from ._stats import entropy_loss, mean_squared_distance_sum
from .codebook_ema import ema_update_, kmeans_init_

OFFICIAL_USAGE_WINDOW = 131072


class DualCodebookQuantizer(nn.Module):
    """TokenFlow's shared-index quantizer on the fused kernels (no N x K distance matrix, no one-hot).

    The index is ``argmin_k ||z_s - e_s(k)||^2 + w ||z_p - e_p(k)||^2`` on l2-normalised parts (``w`` =
    ``pixel_weight``, the paper's ``w_dis``; the official code hard-codes 1.0).

    Drop-in contract (official ``VectorQuantizer``):

    - parameters ``embedding_vqkd.weight`` ``(K, Ds)`` and ``embedding_vqgan.weight`` ``(K, Dp)``, buffer
      ``codebook_used`` (the usage window): official state dicts load with ``strict=True``;
    - the same initialisation order (normal init of ``nn.Embedding``, ``uniform_(-1/K, 1/K)``, row
      normalisation; semantic first), so ``torch.manual_seed(s)`` gives bit-identical codebooks;
    - ``forward(z)`` with ``z`` of shape ``(B, Ds + Dp, H, W)`` returns ``(z_q, (vq_loss, commit_loss,
      entropy_loss, codebook_usage, d_norm_sem, d_norm_pix), (None, None, indices))``, ``indices`` int64
      ``(B*H*W,)`` in row-major ``(b, h, w)`` order. In eval the three losses are ``None`` and the usage 0.

    Official quirks fixed: the usage window is a real buffer (training works on the CPU too) and a batch
    larger than the window keeps its last ``usage_window`` indices; the non-l2 path works; the entropy loss
    (only computed when its ratio > 0; 0 otherwise) and the two ``d_norm`` logging values run in bounded
    memory (chunked with recomputation, and closed-form codebook moments).

    Options (off by default, as in the released checkpoints), for both codebooks together:

    - ``kmeans_init``: on the first training batch, cosine k-means (``kmeans_iters`` iterations) over the
      normalised features of all ranks initialises the codebooks (buffer ``kmeans_initted``);
    - ``ema``: the codebooks are not trained by gradient but by an exponential moving average
      (``ema_decay``) of the features assigned to each code, re-normalised (official ``norm_ema_inplace``);
      then ``vq_loss`` is 0 and ``commit_loss = beta * (mean_s + mean_p)`` as in the official EMA mode.
      Under ``torch.distributed`` the statistics are all-reduced: every rank keeps identical codebooks.
    """

    def __init__(self, codebook_size: int = 32768, semantic_dim: int = 32, pixel_dim: int = 8, beta: float = 0.25,
                 entropy_loss_ratio: float = 0.0, l2_norm: bool = True, show_usage: bool = True,
                 pixel_weight: float = 1.0, *, usage_window: int = OFFICIAL_USAGE_WINDOW,
                 deterministic: bool | None = None, kmeans_init: bool = False, kmeans_iters: int = 10,
                 ema: bool = False, ema_decay: float = 0.99):
        super().__init__()
        pixel_weight = float_arg("DualCodebookQuantizer", "pixel_weight", pixel_weight)
        l2_norm = bool_arg("DualCodebookQuantizer", "l2_norm", l2_norm)
        if codebook_size < 1 or semantic_dim < 1 or pixel_dim < 1:
            raise ValueError("DualCodebookQuantizer: codebook_size, semantic_dim and pixel_dim must be >= 1")
        if pixel_weight < 0:
            raise ValueError(f"DualCodebookQuantizer: pixel_weight must be >= 0, got {pixel_weight}")
        self.n_e = codebook_size
        self.e_dim = semantic_dim + pixel_dim
        self.split = [semantic_dim, pixel_dim]
        self.beta = beta
        self.entropy_loss_ratio = entropy_loss_ratio
        self.l2_norm = l2_norm
        self.show_usage = show_usage
        self.pixel_weight = pixel_weight
        self.deterministic = deterministic
        # The official order, for RNG parity: Embedding (consumes normal RNG), uniform_, normalise; twice.
        self.embedding_vqkd = self._make_codebook(codebook_size, semantic_dim)
        self.embedding_vqgan = self._make_codebook(codebook_size, pixel_dim)
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(usage_window))
            # how many of the window's last slots hold real indices (the rest are the initial zeros); not in
            # the state dict (official keys): a loaded window counts as full, trainers keep the count
            self.usage_filled = 0
        if (kmeans_init or ema) and not l2_norm:
            raise ValueError("DualCodebookQuantizer: kmeans_init and ema work on l2-normalised codebooks")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"DualCodebookQuantizer: ema_decay must be in [0, 1), got {ema_decay}")
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.ema = ema
        self.ema_decay = ema_decay
        if kmeans_init:
            self.register_buffer("kmeans_initted", torch.tensor(False))
        if ema:
            self.embedding_vqkd.weight.requires_grad_(False)
            self.embedding_vqgan.weight.requires_grad_(False)

    def _make_codebook(self, size: int, width: int) -> nn.Embedding:
        embedding = nn.Embedding(size, width)
        embedding.weight.data.uniform_(-1.0 / size, 1.0 / size)
        if self.l2_norm:
            embedding.weight.data = F.normalize(embedding.weight.data, p=2, dim=-1)
        return embedding

    def extra_repr(self) -> str:
        return (f"codebook_size={self.n_e}, semantic_dim={self.split[0]}, pixel_dim={self.split[1]}, "
                f"beta={self.beta}, entropy_loss_ratio={self.entropy_loss_ratio}, l2_norm={self.l2_norm}, "
                f"pixel_weight={self.pixel_weight}")

    def _unit_codebooks(self) -> tuple[torch.Tensor, torch.Tensor]:
        semantic, pixel = self.embedding_vqkd.weight, self.embedding_vqgan.weight
        if self.l2_norm:
            return F.normalize(semantic, p=2, dim=-1), F.normalize(pixel, p=2, dim=-1)
        return semantic, pixel

    def forward(self, z: torch.Tensor):
        if z.dim() != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"DualCodebookQuantizer: z must be (B, {self.e_dim}, H, W), got {tuple(z.shape)}")
        semantic, pixel = self.embedding_vqkd.weight, self.embedding_vqgan.weight
        channel_last = z.permute(0, 2, 3, 1)
        z_hat = normalize_parts(channel_last, self.split[0]) if self.l2_norm else channel_last
        if self.training and self.kmeans_init and not bool(self.kmeans_initted):
            kmeans_init_(semantic.data, pixel.data, z_hat.detach().reshape(-1, self.e_dim),
                         iterations=self.kmeans_iters, pixel_weight=self.pixel_weight)
            self.kmeans_initted.fill_(True)
        indices, _ = codebook_search(channel_last.detach(), semantic.detach(), pixel.detach(),
                                     pixel_weight=self.pixel_weight, l2_norm=self.l2_norm)
        codes = codebook_gather(indices, semantic, pixel, l2_norm=self.l2_norm, deterministic=self.deterministic)
        flat_indices = indices.reshape(-1)

        z_flat = z_hat.detach().reshape(-1, self.e_dim)
        unit_semantic, unit_pixel = self._unit_codebooks()  # with grad: the entropy loss below reuses them
        # logged in the dtype the official N x K formula has: that of z and the codebooks together
        log_dtype = torch.promote_types(z.dtype, semantic.dtype)
        d_norm_semantic = mean_squared_distance_sum(z_flat[:, :self.split[0]], unit_semantic.detach()).to(log_dtype)
        d_norm_pixel = mean_squared_distance_sum(z_flat[:, self.split[0]:], unit_pixel.detach()).to(log_dtype)

        vq_loss = commit_loss = entropy = None
        usage = 0
        empty = z_hat.numel() == 0
        if empty:
            d_norm_semantic, d_norm_pixel = d_norm_semantic.new_zeros(()), d_norm_pixel.new_zeros(())
        if self.training and empty:
            # The means of an empty batch are NaN; zeros that stay connected to z and both codebooks keep a DDP
            # step valid (every parameter still gets a gradient, of zero).
            warnings.warn("DualCodebookQuantizer: empty training batch; its losses are zero", stacklevel=2)
            vq_loss = (codes - z_hat.detach()).sum() * 0.0
            commit_loss = (codes.detach() - z_hat).sum() * 0.0
            entropy = z.new_zeros((), dtype=torch.float32)
        elif self.training:
            if self.show_usage:
                usage = self._update_usage(flat_indices)
            if self.ema:  # codes were gathered before the update, as in the official order
                ema_update_(semantic.data, pixel.data, z_flat, flat_indices, decay=self.ema_decay)
                vq_loss = z.new_zeros((), dtype=torch.float32)
                squared = (codes.detach() - z_hat) ** 2
                commit_loss = self.beta * (squared[..., :self.split[0]].mean() + squared[..., self.split[0]:].mean())
            else:
                vq_loss = torch.mean((codes - z_hat.detach()) ** 2)
                commit_loss = self.beta * torch.mean((codes.detach() - z_hat) ** 2)
            entropy = z.new_zeros((), dtype=torch.float32)
            if self.entropy_loss_ratio > 0:
                # mixed dtypes (fp16 z, fp32 codebooks) meet in their promoted dtype, as in the search
                flat, books_s, books_p = promote_floats(z_hat.reshape(-1, self.e_dim), unit_semantic, unit_pixel)
                entropy = self.entropy_loss_ratio * entropy_loss(
                    flat[:, :self.split[0]], flat[:, self.split[0]:], books_s, books_p,
                    pixel_weight=self.pixel_weight)

        z_q = z_hat + (codes - z_hat).detach()
        z_q = z_q.permute(0, 3, 1, 2)
        return z_q, (vq_loss, commit_loss, entropy, usage, d_norm_semantic, d_norm_pixel), (None, None, flat_indices)

    @torch.no_grad()
    def _update_usage(self, indices: torch.Tensor) -> float:
        window = self.codebook_used
        count, length = indices.numel(), window.numel()
        self.usage_filled = min(length, self.usage_filled + count)
        if count >= length:
            window.copy_(indices[-length:].to(window.dtype))
        elif count > 0:
            window[:-count] = window[count:].clone()
            window[-count:] = indices.to(window.dtype)
        return torch.unique(window).numel() / self.n_e

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "codebook_used" in state_dict:
            self.usage_filled = self.codebook_used.numel()

    def get_codebook_entry(self, indices: torch.Tensor, shape=None, channel_first: bool = True) -> torch.Tensor:
        """Rows of both (normalised) codebooks by index: ``(..., Ds + Dp)``; with ``shape = (B, C, H, W)``
        reshaped to it (``channel_first``) or to ``(B, H, W, C)``, as the official method."""
        rows = codebook_gather(indices, self.embedding_vqkd.weight, self.embedding_vqgan.weight, l2_norm=self.l2_norm,
                               deterministic=self.deterministic)
        if shape is None:
            return rows
        if channel_first:
            return rows.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2).contiguous()
        return rows.reshape(shape)
