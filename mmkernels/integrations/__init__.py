"""Patches into other libraries, loaded on first use: `mmkernels.integrations.transformers.register()`
imports transformers only then. Nothing inside mmkernels depends on these modules, except that
`mmkernels.patch` / `unpatch` / `PatchHandle` come from `patching` (which imports torch only, and the
family patchers on first use)."""
import importlib

_INTEGRATIONS = ("transformers", "patching", "torch_mha", "hf_common", "hf_compat", "hf_attention", "hf_losses",
                 "transformers_fusion")


def __getattr__(name):
    if name in _INTEGRATIONS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
