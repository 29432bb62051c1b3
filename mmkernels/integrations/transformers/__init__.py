"""mmkernels in Hugging Face transformers models.

    import mmkernels
    mmkernels.integrations.transformers.register()   # the "mmkernels" attention backend
    model = CLIPModel.from_pretrained(name, attn_implementation="mmkernels")

- backend.py: the attention backend that `register()` adds to transformers' registries.
- attention.py, losses.py, fusion.py: the family patchers `mmkernels.patch` uses (listed in
  `mmkernels.integrations.patching.PATCHER_MODULES`): the registry families' attention, the
  contrastive losses, and the fusion models' hand-written attention.
- compat.py: whether a patch applies to the installed transformers, decided by the code it mirrors;
  `python -m mmkernels.integrations.transformers.compat check|record`. fingerprints.py holds what
  `record` wrote.

Importing this package imports transformers; its other modules are imported on first access.
"""
import importlib
import pkgutil

from mmkernels.integrations.transformers.backend import (
    BACKEND_NAME,
    mmkernels_attention_forward,
    mmkernels_attention_mask,
    register,
)

__all__ = ["BACKEND_NAME", "register", "mmkernels_attention_forward", "mmkernels_attention_mask"]

_SUBMODULES = frozenset(info.name for info in pkgutil.iter_modules(__path__))


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
