"""Official-style eager inference paths of the whole models: the benchmark baseline and the tests' oracle.

Each class subclasses our module, so it has exactly the same state dict (official keys) and loads the same
checkpoints, but its inference methods compute the way the official code does (written from the official
TokenFlow / LlamaGen / OpenAI CLIP / Hugging Face SigLIP / FlowTok sources, not copied):

- pixel CNN (LlamaGen ``Encoder`` / ``Decoder``): NCHW convolutions, ``x * sigmoid(x)`` as the nonlinearity,
  ``AttnBlock`` as ``bmm`` + ``softmax`` + ``bmm`` over a ``(B, HW, HW)`` score matrix;
- CLIP tower (OpenAI CLIP ``VisionTransformer``): sequence-first ``(L, N, E)`` tokens through
  ``nn.MultiheadAttention``'s general path (``F.multi_head_attention_forward``), QuickGELU MLP;
- SigLIP tower (Hugging Face eager attention): separate q, k, v projections, ``matmul`` + float32
  ``softmax`` + ``matmul``; all layers, ``post_layernorm`` and the pooling head run (the official tokenizer
  calls the full model with ``output_hidden_states=True`` and reads ``hidden_states[-2]``);
- semantic decoder (BEiT ``VisionTransformer``): ``q * scale @ k^T``, ``softmax``, ``@ v``;
- quantizer: :func:`official_multiscale_encode` (N x K distances, one-hot, d_norm logging);
- ``decode_code``: summed bicubic codes, then the official ``decode`` (semantic and pixel halves);
- FlowTok (``libs/model/flowtok_t2i.py`` with timm's ``Attention``): fused qkv linear and
  ``F.scaled_dot_product_attention`` (timm's fused path), adaLN on every row, and the sampler's two forward
  passes per step (conditional, then unconditional) with an eager CFG + Euler update.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..models.flowtok.dit import FlowTransformer, modulate
from ..models.tokenflow.clip_vision import CLIPVisionTower
from ..models.tokenflow.siglip_vision import SiglipVisionTower
from ..models.tokenflow.tokenizer import TokenFlowTokenizer
from .quantizer import official_multiscale_encode


# ------------------------------------------------------------------------------------------ pixel CNN

def _swish(x):
    return x * torch.sigmoid(x)


def _resnet(block, x):
    h = block.conv1(_swish(block.norm1(x)))
    h = block.conv2(_swish(block.norm2(h)))
    return (x if block.nin_shortcut is None else block.nin_shortcut(x)) + h


def _attn(block, x):
    normed = block.norm(x)
    q, k, v = block.q(normed), block.k(normed), block.v(normed)
    b, c, h, w = q.shape
    scores = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w)) * (int(c) ** -0.5)
    scores = F.softmax(scores, dim=2)
    attended = torch.bmm(v.reshape(b, c, h * w), scores.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + block.proj_out(attended)


def _level(stage, h):
    for i, block in enumerate(stage.res):
        h = _resnet(block, h)
        if len(stage.attn):
            h = _attn(stage.attn[i], h)
    return h


def _mid(mid, h):
    return _resnet(mid[2], _attn(mid[1], _resnet(mid[0], h)))


def official_pixel_encoder(encoder, x):
    h = encoder.conv_in(x)
    for stage in encoder.conv_blocks:
        h = _level(stage, h)
        if hasattr(stage, "downsample"):
            h = stage.downsample.conv(F.pad(h, (0, 1, 0, 1), mode="constant", value=0))
    return encoder.conv_out(_swish(encoder.norm_out(_mid(encoder.mid, h))))


def official_pixel_decoder(decoder, z):
    h = _mid(decoder.mid, decoder.conv_in(z))
    for stage in decoder.conv_blocks:
        h = _level(stage, h)
        if hasattr(stage, "upsample"):
            h = stage.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return decoder.conv_out(_swish(decoder.norm_out(h)))


# ------------------------------------------------------------------------------------------ ViT towers

def official_clip_tokens(tower: CLIPVisionTower, x):
    """OpenAI CLIP ``VisionTransformer`` with ``return_patch_tokens=True``: ``ln_post`` of the patch tokens."""
    tokens = tower.conv1(x)
    grid_h, grid_w = tokens.shape[-2:]
    tokens = tokens.reshape(tokens.shape[0], tokens.shape[1], -1).permute(0, 2, 1)
    cls = tower.class_embedding.to(tokens.dtype) + torch.zeros(tokens.shape[0], 1, tokens.shape[-1],
                                                               dtype=tokens.dtype, device=tokens.device)
    tokens = torch.cat([cls, tokens], dim=1) + tower.positional_embedding_for(grid_h, grid_w).to(tokens.dtype)
    tokens = tower.ln_pre(tokens).permute(1, 0, 2)  # NLD -> LND
    for block in tower.transformer.resblocks:
        attn = block.attn
        normed = block.ln_1(tokens)
        tokens = tokens + F.multi_head_attention_forward(
            normed, normed, normed, attn.embed_dim, attn.num_heads, attn.in_proj_weight, attn.in_proj_bias,
            None, None, False, 0.0, attn.out_proj.weight, attn.out_proj.bias, training=False,
            need_weights=False)[0]
        tokens = tokens + block.mlp(block.ln_2(tokens))
    return tower.ln_post(tokens.permute(1, 0, 2)[:, 1:])


def _siglip_attention(attn, x):
    b, n, c = x.shape
    heads = attn.heads
    head_dim = c // heads
    q, k, v = (proj(x).view(b, n, heads, head_dim).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    weights = torch.matmul(q, k.transpose(2, 3)) * head_dim ** -0.5
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(weights, v).transpose(1, 2).contiguous().reshape(b, n, c)
    return attn.out_proj(out)


def official_siglip_hidden_states(tower: SiglipVisionTower, x):
    """Hugging Face ``SiglipVisionModel(x, output_hidden_states=True)``: every layer, ``post_layernorm`` and
    the pooling head run; returns the hidden states (``[0]`` embeddings ... ``[-1]`` last layer)."""
    vision = tower.vision_model
    h = vision.embeddings(x)
    states = [h]
    for layer in vision.encoder.layers:
        residual = h
        h = residual + _siglip_attention(layer.self_attn, layer.layer_norm1(h))
        h = h + layer.mlp(layer.layer_norm2(h))
        states.append(h)
    last = vision.post_layernorm(h)
    head = vision.head
    probe = head.probe.expand(last.shape[0], -1, -1)
    pooled = head.attention(probe, last, last)[0]  # need_weights defaults to True, as called officially
    pooled = pooled + head.mlp(head.layernorm(pooled))
    del pooled
    return states


def official_semantic_decoder(decoder, codes):
    tokens = decoder.embed(codes)  # the embedding is the official one; the blocks below compute as it does
    for block in decoder.blocks:
        attn = block.attn
        b, n, c = tokens.shape
        head_dim = c // attn.heads
        normed = block.norm1(tokens)
        bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias, requires_grad=False), attn.v_bias))
        qkv = F.linear(normed, attn.qkv.weight, bias).reshape(b, n, 3, attn.heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * head_dim ** -0.5, qkv[1], qkv[2]
        scores = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        tokens = tokens + attn.proj((scores @ v).transpose(1, 2).reshape(b, n, c))
        tokens = tokens + block.mlp(block.norm2(tokens))
    return decoder.fc_norm(tokens[:, 1:])


# ------------------------------------------------------------------------------------------ TokenFlow

class OfficialStyleTokenFlow(TokenFlowTokenizer):
    """:class:`TokenFlowTokenizer` with the official computation order (same keys; see the module doc).

    ``OfficialStyleTokenFlow.like(tokenizer)`` builds one with the tokenizer's config and weights."""

    @classmethod
    def like(cls, tokenizer: TokenFlowTokenizer) -> "OfficialStyleTokenFlow":
        model = cls(tokenizer.config)
        model.load_state_dict(tokenizer.state_dict())  # the same keys, strictly
        parameter = next(tokenizer.parameters())
        return model.to(device=parameter.device, dtype=parameter.dtype).train(tokenizer.training)

    def official_semantic(self, images):
        x = images if self.scaling_layer is None else self.scaling_layer(images)
        if isinstance(self.encoder_vqkd, SiglipVisionTower):
            tokens = official_siglip_hidden_states(self.encoder_vqkd, x)[-2]
        else:
            tokens = official_clip_tokens(self.encoder_vqkd, x)
        codes = self.encode_task_layer(tokens.type_as(self.encode_task_layer[-1].weight))
        grid = self.config.semantic_grid
        return codes.transpose(1, 2).reshape(codes.shape[0], codes.shape[-1], grid, grid)

    def official_pixel(self, images):
        size = self.config.pixel_size
        x = images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="bicubic")
        return self.quant_conv(official_pixel_encoder(self.encoder, x))

    @torch.no_grad()
    def official_encode(self, images):
        """Official ``encode`` in eval mode -> ``(features, losses, indices)``."""
        h = torch.cat([self.official_semantic(images), self.official_pixel(images)], dim=1)
        return official_multiscale_encode(h, self.quantize.embedding_vqkd.weight, self.quantize.embedding_vqgan.weight,
                                          self.config.scales)

    @torch.no_grad()
    def official_decode(self, features):
        """Official ``decode`` -> ``(semantic, image)``."""
        dim = self.config.semantic_code_dim
        semantic = self.decode_task_layer(official_semantic_decoder(self.decoder_vqkd, features[:, :dim]))
        image = official_pixel_decoder(self.decoder, self.post_quant_conv(features[:, dim:]))
        if image.shape[-1] != self.config.image_size:
            size = self.config.image_size
            image = F.interpolate(image, size=(size, size), mode="bicubic")
        return semantic, image

    @torch.no_grad()
    def official_decode_code(self, indices):
        """Official ``decode_code`` (both halves) -> ``(semantic, image)``."""
        size = self.config.scales[-1]
        e_s = F.normalize(self.quantize.embedding_vqkd.weight, p=2, dim=-1)
        e_p = F.normalize(self.quantize.embedding_vqgan.weight, p=2, dim=-1)
        features, position = 0.0, 0
        for scale in self.residual_quantizer.scales_for_length(indices.shape[1]):
            rows = torch.cat([e_s, e_p], dim=-1)[indices[:, position:position + scale * scale]]
            position += scale * scale
            grid = rows.reshape(indices.shape[0], scale, scale, -1).permute(0, 3, 1, 2)
            features = features + F.interpolate(grid, size=(size, size), mode="bicubic")
        return self.official_decode(features)


# ------------------------------------------------------------------------------------------ FlowTok

class OfficialStyleFlowTransformer(FlowTransformer):
    """:class:`FlowTransformer` whose ``forward`` follows the official nnet (timm ``Attention``, adaLN per
    row); same keys. ``OfficialStyleFlowTransformer.like(nnet)`` copies config and weights."""

    @classmethod
    def like(cls, nnet: FlowTransformer) -> "OfficialStyleFlowTransformer":
        model = copy.deepcopy(nnet)
        model.__class__ = cls
        return model

    def forward(self, x, t, null_indicator=None):
        if null_indicator is None:
            null_indicator = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(null_indicator)
        for block in self.blocks:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
            normed = modulate(block.norm1(h), shift_msa, scale_msa)
            b, n, width = normed.shape
            heads = block.attn.heads
            q, k, v = block.attn.qkv(normed).reshape(b, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
            attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, width)
            h = h + gate_msa.unsqueeze(1) * block.attn.proj(attended)
            h = h + gate_mlp.unsqueeze(1) * block.mlp(modulate(block.norm2(h), shift_mlp, scale_mlp))
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        return self.final_layer.linear(modulate(self.final_layer.norm_final(h), shift, scale))


@torch.no_grad()
def official_flowtok_sample(nnet: FlowTransformer, x0: torch.Tensor, num_steps: int = 20,
                            guidance_scale: float = 2.0) -> torch.Tensor:
    """The official solver loop from text latents ``x0``: per step a conditional and an unconditional forward
    pass, ``x += dt * (v_u + s (v_c - v_u))`` on the FlowTok time grid (``linspace(0, 1 - 1e-5, steps)``)."""
    batch = x0.shape[0]
    times = torch.linspace(0, 1 - 1e-5, num_steps, device=x0.device)
    dt = (1 - 1e-5) / num_steps
    cond = torch.zeros(batch, dtype=torch.bool, device=x0.device)
    x = x0
    for t_value in times:
        t = t_value.repeat(batch)
        v_cond, v_uncond = nnet(x, t, cond), nnet(x, t, ~cond)
        x = x + dt * (v_uncond + guidance_scale * (v_cond - v_uncond))
    return x
