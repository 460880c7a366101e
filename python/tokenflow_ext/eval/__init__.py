"""Evaluation: reconstruction scores of a tokenizer by the official protocol (``eval.reconstruction``,
``eval.protocol``), FID / rFID building blocks (``eval.fid``), FID of generated folders (``eval.generation``) and
the CLIP score (``eval.clip_score``). Command line: ``python -m tokenflow_ext eval {reconstruction,generation}``."""

from .clip_score import clip_score
from .fid import (FID_WEIGHTS_FILE, FID_WEIGHTS_URL, FIDInceptionV3, activation_statistics, frechet_distance,
                  load_statistics, save_statistics)
from .generation import fid_between
from .reconstruction import ReconstructionEval, evaluate_reconstruction

__all__ = ["FID_WEIGHTS_FILE", "FID_WEIGHTS_URL", "FIDInceptionV3", "ReconstructionEval", "activation_statistics",
           "clip_score", "evaluate_reconstruction", "fid_between", "frechet_distance", "load_statistics",
           "save_statistics"]
