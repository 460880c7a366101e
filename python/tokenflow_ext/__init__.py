"""tokenflow_ext: fused C++/CUDA kernels for the TokenFlow and FlowTok image tokenizers.

Public API::

    res = tokenflow_ext.quantize(x, semantic_codebook, pixel_codebook=None, *, pixel_weight=1.0, l2_norm=True)
    idx, dmin = tokenflow_ext.codebook_search(x, semantic_codebook, pixel_codebook=None, *, pixel_weight=1.0,
                                              l2_norm=True)
    rows = tokenflow_ext.codebook_gather(idx, semantic_codebook, pixel_codebook=None, *, l2_norm=True)
    codes = tokenflow_ext.sample_logits(logits, guidance=t, top_k=600, top_p=0.6, image_token_start=s,
                                        image_vocab_size=K, seed=0)   # fused CFG + top-k/top-p draw (t2i)
    tokenflow_ext.build_info()
    from tokenflow_ext import flow    # flow-matching ops, loss and sampler (FlowTok)
    tokenflow_ext.nn.DualCodebookQuantizer, tokenflow_ext.nn.MultiScaleQuantizer   # TokenFlow quantizer modules

The ops are also reachable as ``torch.ops.tokenflow_ext.*`` (they work under ``torch.compile``).
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers the ops with the dispatcher)
from . import flow, nn
from ._build import build_info
from .ops import codebook_gather, codebook_search, sample_logits
from .quantize import QuantizeResult, quantize

__version__ = _C.__version__

__all__ = ["QuantizeResult", "build_info", "flow", "nn", "codebook_gather", "codebook_search", "quantize", "sample_logits", "__version__"]
