"""omni_jax: Qwen2.5-Omni in JAX/Flax.

    from omni_jax import OmniModel, Processor
"""
from __future__ import annotations

__all__ = ["OmniModel", "Processor", "OmniConfig", "RuntimeOptions"]


def __getattr__(name: str):
    # Imported lazily so `import omni_jax` (e.g. for the CLI's --help) stays fast.
    if name == "OmniModel":
        from omni_jax.api import OmniModel

        return OmniModel
    if name == "Processor":
        from omni_jax.processing.processor import Processor

        return Processor
    if name in ("OmniConfig", "RuntimeOptions"):
        from omni_jax import config

        return getattr(config, name)
    raise AttributeError(f"module 'omni_jax' has no attribute {name!r}")
