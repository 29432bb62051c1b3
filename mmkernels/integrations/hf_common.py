"""What the transformers patchers share: the version gate and the model family of a module.

The patches follow transformers' model code (which modules read `config._attn_implementation`, what
a model's forward returns). They were tested on the versions in TESTED_TRANSFORMERS (the test suite
runs against each). On another version, `mmkernels.patch` leaves the transformers models as they are:
each item is listed in the handle's `skipped` with the reason (StrictPatchError under strict=True)
and one warning is emitted. MMKERNELS_PATCH_UNTESTED_TRANSFORMERS=1 patches anyway, at the user's
risk.
"""
from __future__ import annotations

import os
import re
import warnings

import transformers

__all__ = ["TESTED_TRANSFORMERS", "family", "untested_version_reason"]

# The oldest and the newest (major, minor) the patches were tested on: 5.7 (the oldest the
# attention backend supports), 5.17 (the GPU machine's) and 5.24.
TESTED_TRANSFORMERS = ((5, 7), (5, 24))
_ALLOW_ENV = "MMKERNELS_PATCH_UNTESTED_TRANSFORMERS"
_warned = False


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def untested_version_reason(version: str | None = None) -> str | None:
    """None when the installed (or given) transformers version was tested, else the reason to skip."""
    version = transformers.__version__ if version is None else version
    low, high = TESTED_TRANSFORMERS
    found = _major_minor(version)
    if found is not None and low <= found <= high:
        return None
    if os.environ.get(_ALLOW_ENV) == "1":
        return None
    reason = (
        f"transformers {version} is not a version mmkernels' patches were tested on "
        f"({low[0]}.{low[1]} to {high[0]}.{high[1]}); set {_ALLOW_ENV}=1 to patch anyway"
    )
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"mmkernels.patch left the transformers models unpatched: {reason}", stacklevel=4)
    return reason


def family(module) -> str | None:
    """The transformers model family a module's class comes from ("clip", "siglip2", ...), or None."""
    parts = type(module).__module__.split(".")
    if len(parts) >= 3 and parts[0] == "transformers" and parts[1] == "models":
        return parts[2]
    return None
