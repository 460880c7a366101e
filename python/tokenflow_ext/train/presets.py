"""Trial sizes for the training CLI and the checks on user-written configs.

The official model sizes train for days on GPUs; a first run on a laptop or a CPU box wants a model that
takes a step in well under a second. ``--config tiny`` (tokenizer) and ``--preset tiny`` (FlowTok) pick such a
size. They are not official variants: their checkpoints record the full config, so ``from_pretrained``
rebuilds them without guessing.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from typing import Any

# A 64 px TokenFlow tokenizer: CLIP-style semantic tower (patch 16, 4x4 grid), 3 scales, 1024 codes, a
# 4-stage pixel CNN. About 4M parameters.
TOKENIZER_TRIAL_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=64, scales=(1, 2, 4), semantic_width=128, semantic_layers=2, semantic_heads=2,
                 semantic_patch=16, semantic_mlp_width=256, semantic_pretrain_size=64, decoder_width=128,
                 decoder_layers=2, decoder_heads=2, decoder_grid=4, decoder_out_dim=128, codebook_size=1024,
                 pixel_channels=32, channel_multipliers=(1, 1, 2, 2, 4), encoder_res_blocks=1,
                 decoder_channels=32, decoder_res_blocks=1, z_channels=64),
}

# FlowTok with a 2-block, 64-wide transformer and a 1-layer text projector (CLIP features stay 768-wide),
# with trial schedule defaults: a short warm-up and a fast EMA, so a few hundred steps show progress.
FLOWTOK_TRIAL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(preset=(2, 64, 2), flow_kwargs=dict(text_layers=1, text_heads=2, text_hidden=64),
                 warmup_steps=100, ema_decay=0.99),
}


def read_json_object(path: str, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; errors name ``what`` (the flag), the file, and the line and column."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: file not found")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    return parse_json_object(text, f"{what} {path}")


def parse_json_object(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a JSON object of fields, got {type(value).__name__}")
    return value


def check_fields(fields: dict[str, Any], allowed: set[str] | list[str], where: str) -> None:
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; the fields are: {', '.join(sorted(allowed))}")


def tokenizer_config_fields() -> set[str]:
    from ..models.tokenflow.config import TokenFlowConfig  # noqa: PLC0415

    return {field.name for field in dataclasses.fields(TokenFlowConfig)}


def flow_transformer_options() -> set[str]:
    """The keyword options of ``FlowTransformer`` that ``--flow-kwargs`` may set."""
    from ..models.flowtok.dit import FlowTransformer  # noqa: PLC0415

    parameters = inspect.signature(FlowTransformer.__init__).parameters
    return {name for name, p in parameters.items() if p.kind == p.KEYWORD_ONLY}
