"""When model methods run under ``torch.inference_mode()`` (shared by the TokenFlow and FlowTok models)."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
from torch import nn


def _requires_grad(values) -> bool:
    for value in values:
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return True
        if isinstance(value, (list, tuple)) and _requires_grad(value):
            return True
    return False


def called_for_inference(module: nn.Module, *args, **kwargs) -> bool:
    """A call is "for inference" when the module is in eval mode, autograd is on (under ``torch.no_grad()``
    the caller has already chosen: the call runs as is and returns normal tensors) and no tensor argument
    requires grad."""
    return (not module.training and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            and not _requires_grad(args) and not _requires_grad(kwargs.values()))


def normal_tensors(value):
    """``value`` with every inference tensor in it (also inside tuples, named tuples, lists and dicts)
    replaced by a normal copy, made outside inference mode."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple
        return type(value)(*(normal_tensors(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(normal_tensors(v) for v in value)
    if isinstance(value, dict):
        return {key: normal_tensors(v) for key, v in value.items()}
    return value


def inference_when_eval(method: Callable) -> Callable:
    """Run ``method`` under ``torch.inference_mode()`` when :func:`called_for_inference` says so: no
    autograd graph, no saved activations (a ``decode_indices`` of a model with trainable parameters would
    otherwise keep the whole decoder's activations alive). The results are handed back as normal tensors
    (a copy of the outputs, small next to the work): inference tensors would fail later in autograd, e.g.
    generated images fed to a tokenizer in training mode, or in in-place edits."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not called_for_inference(self, *args, **kwargs):
            return method(self, *args, **kwargs)
        with torch.inference_mode():
            result = method(self, *args, **kwargs)
        return normal_tensors(result)

    return wrapper


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` (and all their submodules) in eval mode for the block, then restore every mode."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, mode in saved:
            m.training = mode
