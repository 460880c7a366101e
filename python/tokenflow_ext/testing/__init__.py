"""Test support shipped with the package: the CUDA parity cases shared by the emulated CUDA tests and
``python -m tokenflow_ext verify-gpu``."""
