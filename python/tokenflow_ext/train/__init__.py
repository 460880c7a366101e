"""Training: data, losses, the shared loop and checkpoints, and one trainer per model family.

- :mod:`.tokenizer`: TokenFlow tokenizer training (``python -m tokenflow_ext train tokenizer``);
- :mod:`.flowtok`: FlowTok training (``python -m tokenflow_ext train flowtok``).

Launch with ``torchrun --nproc-per-node N -m tokenflow_ext train ...`` for DDP over N processes.
"""

from .loop import DistributedSetup, LoopConfig, ModelEMA, Trainer

__all__ = ["DistributedSetup", "LoopConfig", "ModelEMA", "Trainer"]
