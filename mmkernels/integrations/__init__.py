"""Patches into other libraries, loaded on first use: `mmkernels.integrations.transformers.register()`
imports transformers only then. Nothing inside mmkernels depends on these modules, except that
`mmkernels.patch` / `unpatch` / `PatchHandle` come from `patching` (which imports torch only, and the
family patchers named in its `PATCHER_MODULES` on first use)."""
import importlib
import pkgutil

# The modules and packages in this folder (patching, torch_mha, transformers), each imported on first access.
_SUBMODULES = frozenset(info.name for info in pkgutil.iter_modules(__path__))


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
