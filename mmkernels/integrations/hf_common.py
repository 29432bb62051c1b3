"""What the transformers patchers share: the model family of a module. (Whether a patch applies to the
installed transformers is decided by its code: see hf_compat.)"""
from __future__ import annotations

__all__ = ["family"]


def family(module) -> str | None:
    """The transformers model family a module's class comes from ("clip", "siglip2", ...), or None."""
    parts = type(module).__module__.split(".")
    if len(parts) >= 3 and parts[0] == "transformers" and parts[1] == "models":
        return parts[2]
    return None
