"""Instance patching: `mmkernels.patch(model)` puts mmkernels into a model that already exists.

    handle = mmkernels.patch(model)   # any nn.Module; returns a PatchHandle
    print(handle)                     # module path -> mmkernels piece; what was left as it was, and why
    handle.undo()                     # or `with mmkernels.patch(model): ...`, or mmkernels.unpatch(model)

What a patch may change: instance attributes only (a module's `forward`, a transformers model's
`config` object, a private marker), each written into that module's `__dict__` and logged with what
was there before. Never a class, a module-level name, `torch.nn.functional` or a transformers global,
never a parameter or buffer: `state_dict()` keys and tensors stay the same, parameters keep their
identity (an optimizer built before the patch keeps training the model), and two models in one
process stay independent. The one process-wide effect any patcher has is adding the name "mmkernels"
to transformers' `AttentionInterface`/`AttentionMaskInterface` (see integrations/transformers/backend.py); no
existing name changes.

How `patch()` works
-------------------
It walks `model.named_modules()` (parents before children) and offers each module to the registered
family patchers of each enabled kind ("attention" if `attention=True`, "loss" if `losses=True`), in
registration order, until one returns True. A module already patched for that kind (by this call, or
by an earlier `patch()` of a model it belongs to), or already listed as skipped for it (a patcher of
an ancestor left it as it is, with its reason), is not offered again. Then every *attention-like*
module (an `nn.MultiheadAttention`, or a class whose name ends in "Attention") and every
*loss-like* module (one that owns a `logit_scale`, or a class named like a contrastive loss) that is
not covered is listed in `handle.skipped`, with the reason a patcher gave or "no mmkernels patch for
<class>". An attention-like module is covered when it, one of its descendants or one of its
attention-like ancestors is patched for attention (BertAttention is covered by a patched
BertSelfAttention and the reverse); a loss-like module when it or an ancestor is patched for the loss.
With `strict=True` a non-empty skipped list undoes everything and raises `StrictPatchError` naming each.
Patching a model that is already patched returns its handle (a no-op); with other options it raises.

The extension point: writing and registering a family patcher
-------------------------------------------------------------
A patcher is a function `patcher(module, path, ctx) -> bool`, registered for one kind:

    from mmkernels.integrations.patching import call_original, patch_state, register_patcher

    @register_patcher("attention")
    def _patch_lxmert_attention(module, path, ctx):
        if type(module) is not LxmertAttention:             # exact classes: a subclass may change forward
            return False
        ctx.replace_forward(module, path, "attention", "mmkernels.cross_attention (kv_lens from the visual mask)",
                            _lxmert_attention_forward, falls_back="head_mask, output_attentions=True")
        return True

    def _lxmert_attention_forward(self, hidden_states, context, attention_mask=None, output_attentions=False):
        if output_attentions:                                # something the kernels cannot give:
            return call_original(self, "output_attentions=True", hidden_states, context,
                                 attention_mask=attention_mask, output_attentions=output_attentions)
        ...                                                  # the same math through mmkernels.cross_attention

- Return True only when the module was handled (patched, or deliberately skipped with `ctx.skip`); return
  False to let the next patcher try. Never change anything before deciding.
- Change the module only through `ctx`: `ctx.replace_forward(...)` (a new `forward(self, ...)` bound to
  the instance; refused, and the module listed as skipped, where the instance already has a `forward`
  of its own, such as a hook library's wrapper, which the patch would bypass), `ctx.set_attribute(module, name, value)` (any other instance attribute, e.g. a private
  config copy), `ctx.mark_patched(module, path, kind, piece)` (a module patched through something
  else, such as the attention modules that read a swapped config). All of it is logged and undone
  exactly. `ctx.set_up(fn)` runs `fn()`, something process-wide the patch needs (registering a name
  with a library; idempotent), now and again in a process that loads a pickled copy of the model.
  `ctx.skip(path, kind, reason)` records an item the patcher recognises and leaves as it is.
  `ctx.keep_logits`, `ctx.global_loss`, `ctx.strict`, `ctx.is_patched(module, kind)` are there to
  read; `ctx.memo` is a dict shared by the patchers of one `patch()` call.
- The patched forward is a module-level function `forward(self, *args, **kwargs)` (or an instance of a
  module-level class holding only such functions: it is pickled by name); it finds everything through
  `self` (so a deep copy or a pickled copy of a patched model is a patched copy computing with its own
  weights), and `patch_state(self)` gives its `PatchState` (path, handle, handle options such as
  keep_logits; `global_loss_world`, decided at call time: see below).
- Per-call fallback: whatever the kernels cannot compute for a call (weights requested, a head mask,
  an unsupported option) goes to `call_original(self, reason, *args, **kwargs)`, which runs the
  module's own forward (its class's) and counts the call in `handle.fallbacks[(path, reason)]`; under `strict=True` it raises
  `StrictPatchError` instead. Never approximate silently. A call that is outside what the patch is
  for (a loss patch called without `return_loss`) passes `reason=None`: it runs the original
  forward, uncounted, also under strict.
- Registration: put the patchers in a module under mmkernels/integrations/ and add the module's name
  to `PATCHER_MODULES` below. `patch()` imports those modules on first use; one whose import fails
  because a library is missing (transformers) is left out, and one whose library lacks a name it
  imports (another version) is left out with a warning, so each module may import its library at
  the top.

The global loss
---------------
With `patch(model, global_loss=True)` a loss patch computes the loss of the global batch (every
process's local pairs concatenated in rank order) with `mmkernels.distributed` wherever a
torch.distributed process group of more than one process is initialised at the time of the call
(`PatchState.global_loss_world` says it: the group's size, or 0 for the local loss); elsewhere, and
always with `global_loss=False`, each process's local loss. `print(handle)` says which is in force
when it is printed.

Undo
----
Every change is a `(object, attribute, previous value or absent)` entry in the handle's log.
`undo()` first checks that every patched attribute still holds what the patch put there (else it
raises and changes nothing: something else wrapped the model after the patch, e.g. a hook library,
and restoring would drop that), then restores the log in reverse order: a previous instance
attribute is put back, one that did not exist is deleted. Outputs are then bit-identical to before
the patch. `undo()` twice is a no-op.

Copies and saved models
-----------------------
A copy of a patched model is patched: `copy.deepcopy(model)`, and a model saved whole while patched
(`pickle`, `torch.save(model)`) and loaded (`pickle.load`, `torch.load(..., weights_only=False)`),
in this process or another. The copy's patched forwards and private configs are its own, computing
with its own weights, and it has its own handle (active, with the records, skipped items and
fallback counts the original's had when copied; `mmkernels.patch(copy, **handle.options)` returns
it), which counts the copy's fallbacks and undoes it exactly: `mmkernels.unpatch(copy)` gives the
unpatched model's outputs bit for bit. Loading re-runs the patch's process-wide set-ups (the
"mmkernels" names in transformers' registries), so a fresh process needs no `patch()` call first;
it needs mmkernels importable, as any pickled object needs its classes. A model saved after `undo()`
loads unpatched, and state_dict checkpoints load in either state.
"""
from __future__ import annotations

import importlib
import inspect
import types
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = [
    "PATCHER_MODULES",
    "PatchContext",
    "PatchHandle",
    "PatchRecord",
    "PatchState",
    "SkippedItem",
    "StrictPatchError",
    "call_original",
    "is_attention_like",
    "is_loss_like",
    "patch",
    "patch_state",
    "register_patcher",
    "unpatch",
]

# The modules whose import registers the family patchers, in the order their patchers are tried.
PATCHER_MODULES = (
    "mmkernels.integrations.transformers.attention",
    "mmkernels.integrations.transformers.losses",
    "mmkernels.integrations.torch_mha",
    "mmkernels.integrations.transformers.fusion",
)
KINDS = ("attention", "loss")

_HANDLE_ATTR = "_mmkernels_handle"  # on the model passed to patch()
_STATE_ATTR = "_mmkernels_patch"  # on every module a handle patched


class _Absent:
    """The marker for "no instance attribute was there"; one object, also after copy or pickle."""

    def __reduce__(self):
        return "_ABSENT"

    def __repr__(self):
        return "<absent>"


_ABSENT = _Absent()


class StrictPatchError(RuntimeError):
    """Raised under `strict=True`: something attention- or loss-like was left unpatched, or a patched
    forward would have fallen back to the model's own code for a call."""


@dataclass(frozen=True)
class PatchRecord:
    """One patched module: `path` (as in named_modules, "" for the model itself), `kind` ("attention"
    or "loss"), `piece` (the mmkernels code it now runs) and `falls_back` (what still runs the model's
    own code for a call)."""

    path: str
    kind: str
    piece: str
    falls_back: str = ""


@dataclass(frozen=True)
class SkippedItem:
    """An attention- or loss-like module left as it was, and why."""

    path: str
    kind: str
    reason: str


@dataclass
class PatchState:
    """What a patched module carries (in its `__dict__`, not a parameter, buffer or submodule)."""

    handle: "PatchHandle"
    path: str
    kinds: set

    @property
    def keep_logits(self) -> bool:
        return self.handle.keep_logits

    @property
    def global_loss_world(self) -> int:
        """The number of processes whose batches this call's loss covers, decided now (a process
        group may be initialised or destroyed after the patch): the world size of the default
        process group when the handle has global_loss=True and such a group of more than one process
        is initialised; else 0 (each process's local loss)."""
        world = _process_group_world() if self.handle.global_loss else 0
        return world if world > 1 else 0


def _process_group_world() -> int:
    """The size of the default torch.distributed process group, 0 when none is initialised."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_world_size()


class _InstanceForward:
    """The instance `forward` that `PatchContext.replace_forward` sets: calls `function(module, ...)`
    as a method bound to the module would, with a bound method's `__func__`, `__self__`, `__name__`
    and `inspect.signature`. A bound method pickles as `getattr(module, name)`, which names nothing on
    the loaded module; this pickles as its function (by qualified name) and its module."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, function: Callable, module: nn.Module):
        self.__func__ = function
        self.__self__ = module

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    @property
    def __name__(self) -> str:
        return getattr(self.__func__, "__name__", type(self.__func__).__name__)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(types.MethodType(self.__func__, self.__self__))

    def __getstate__(self):
        return self.__func__, self.__self__

    def __setstate__(self, state) -> None:
        self.__func__, self.__self__ = state

    def __repr__(self) -> str:
        return f"<mmkernels forward {self.__name__} of {type(self.__self__).__name__}>"


@dataclass(frozen=True)
class _Patcher:
    kind: str
    fn: Callable


_PATCHERS: list[_Patcher] = []
_loaded = False


def register_patcher(kind: str):
    """Decorator: register `fn(module, path, ctx) -> bool` as a family patcher of `kind`
    ("attention" or "loss"). Registering the same function again (a module reload) replaces it."""
    if kind not in KINDS:
        raise ValueError(f"expected kind to be one of {KINDS}, got {kind!r}")

    def decorator(fn):
        key = (fn.__module__, fn.__qualname__)
        _PATCHERS[:] = [p for p in _PATCHERS if (p.fn.__module__, p.fn.__qualname__) != key]
        _PATCHERS.append(_Patcher(kind, fn))
        return fn

    return decorator


def _load_patchers() -> None:
    global _loaded
    if _loaded:
        return
    for name in PATCHER_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as error:
            if error.name is None or error.name.startswith("mmkernels"):
                raise  # our own bugs surface
            if not (isinstance(error, ModuleNotFoundError) and "." not in error.name):
                # the library is installed, in a version without what the module imports
                warnings.warn(f"mmkernels.patch leaves the patchers of {name} out: {error}", stacklevel=3)
    _loaded = True


def patch_state(module: nn.Module) -> PatchState | None:
    """The `PatchState` of a module that a handle patched, or None."""
    state = module.__dict__.get(_STATE_ATTR)
    return state if isinstance(state, PatchState) and state.handle.active else None


def call_original(module: nn.Module, reason: str | None, *args, **kwargs):
    """Run the module's own forward (its class's) for this call.

    reason: why the kernels cannot compute this call; it is counted in the handle's `fallbacks`
    (under strict=True StrictPatchError is raised instead). None means the call is outside what the
    patch covers (e.g. no loss was asked for): it runs as it is, uncounted, also under strict.
    """
    state = patch_state(module)
    if state is None:
        raise RuntimeError(f"call_original: {type(module).__name__} is not patched by mmkernels")
    if reason is not None:
        if state.handle.strict:
            raise StrictPatchError(
                f"mmkernels.patch(strict=True): {state.path or type(module).__name__} "
                f"({type(module).__name__}) would fall back to its own code for this call: {reason}"
            )
        state.handle.fallbacks[(state.path, reason)] += 1
    return type(module).forward(module, *args, **kwargs)


def is_attention_like(module: nn.Module) -> bool:
    """nn.MultiheadAttention, or a module whose class name ends in "Attention"."""
    return isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith("Attention")


_LOSS_NAME_WORDS = ("clip", "siglip", "contrastive")


def is_loss_like(module: nn.Module) -> bool:
    """A module that is not attention-like and owns a `logit_scale` (a parameter, buffer, tensor or
    number; not None), or a class named like a contrastive loss ("...Loss" with clip, siglip or
    contrastive in the name). An attention module's own logit_scale (open_clip's scaled-cosine
    attention) scales its scores: it is no loss."""
    if is_attention_like(module):
        return False
    scale = module._parameters.get("logit_scale", module._buffers.get("logit_scale", module.__dict__.get("logit_scale")))
    own = isinstance(scale, (torch.Tensor, int, float))
    name = type(module).__name__
    named = name.endswith("Loss") and any(word in name.lower() for word in _LOSS_NAME_WORDS)
    return own or named


class PatchHandle:
    """What one `mmkernels.patch(model)` did, and how to undo it.

    records: tuple of PatchRecord (module path -> mmkernels piece); skipped: tuple of SkippedItem
    (attention- or loss-like modules left as they are, and why); fallbacks: Counter of calls that
    ran the model's own code, keyed by (module path, reason). `print(handle)` shows all three.
    `undo()` restores the model exactly; the handle is also a context manager.
    """

    def __init__(self, model: nn.Module, *, attention: bool, losses: bool, keep_logits: bool, strict: bool,
                 global_loss: bool = False):
        self.model = model
        self.attention = attention
        self.losses = losses
        self.keep_logits = keep_logits
        self.global_loss = global_loss
        self.strict = strict
        self.fallbacks: Counter = Counter()
        self._records: list[PatchRecord] = []
        self._skipped: dict[tuple[str, str], SkippedItem] = {}
        self._log: list[tuple[object, str, object, object]] = []  # (target, name, previous, new)
        self._set_ups: list[Callable[[], None]] = []
        self._active = True

    def __setstate__(self, state: dict) -> None:
        """Unpickling (a model saved while patched): the process-wide set-ups run again in this process."""
        self.__dict__.update(state)
        if self._active:
            for set_up in self._set_ups:
                set_up()

    @property
    def records(self) -> tuple[PatchRecord, ...]:
        return tuple(self._records)

    @property
    def skipped(self) -> tuple[SkippedItem, ...]:
        return tuple(self._skipped.values())

    @property
    def active(self) -> bool:
        """True until undo()."""
        return self._active

    @property
    def options(self) -> dict:
        return dict(attention=self.attention, losses=self.losses, keep_logits=self.keep_logits,
                    global_loss=self.global_loss, strict=self.strict)

    def _loss_scope(self) -> str:
        """Which loss the patched losses compute now, in words."""
        if not self.global_loss:
            return "local loss: each process's own batch (global_loss=False)"
        world = _process_group_world()
        if world > 1:
            return f"global loss over the process group (world {world}): mmkernels.distributed, global_loss=True"
        if world == 1:
            return "local loss: global_loss=True, but the process group has one process"
        return "local loss: global_loss=True, but no torch.distributed process group is initialised now"

    def undo(self) -> None:
        """Restore every attribute the patch changed (see the module docstring). Idempotent."""
        if not self._active:
            return
        for target, name, _previous, new in self._log:
            if target.__dict__.get(name, _ABSENT) is not new:
                raise RuntimeError(
                    f"mmkernels: cannot undo the patch of {type(target).__name__}.{name}: it was changed after "
                    "mmkernels.patch (another library wrapped it?); remove that change first, nothing was undone"
                )
        for target, name, previous, _new in reversed(self._log):
            if previous is _ABSENT:
                del target.__dict__[name]
            else:
                target.__dict__[name] = previous
        self._log.clear()
        self._active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __str__(self) -> str:
        title = type(self.model).__name__
        state = "active" if self._active else "undone"
        lines = [f"mmkernels.patch({title}): {len(self._records)} patched, {len(self._skipped)} left as they are ({state})"]
        if any(r.kind == "loss" for r in self._records):
            lines.append(f"losses: {self._loss_scope()}")
        if self._records:
            width = max(len(r.path or "(model)") for r in self._records)
            for r in self._records:
                line = f"  {r.path or '(model)':<{width}}  {r.kind:<9}  {r.piece}"
                lines.append(line + (f"  [falls back: {r.falls_back}]" if r.falls_back else ""))
        if self._skipped:
            lines.append("left as they are:")
            lines += [f"  {s.path or '(model)'}  {s.kind}: {s.reason}" for s in self._skipped.values()]
        if self.fallbacks:
            lines.append("calls that ran the model's own code:")
            lines += [f"  {path or '(model)'}: {reason}: {n} call(s)" for (path, reason), n in self.fallbacks.items()]
        return "\n".join(lines)

    __repr__ = __str__

    # -- used by PatchContext -------------------------------------------------------------------

    def _set(self, target: object, name: str, value: object) -> None:
        previous = target.__dict__.get(name, _ABSENT)
        target.__dict__[name] = value
        self._log.append((target, name, previous, value))


class PatchContext:
    """What a family patcher uses to change a module (every change is logged for undo). `memo` is a
    dict the patchers of one patch() call may share (e.g. what a patcher already did to a subtree)."""

    def __init__(self, handle: PatchHandle):
        self.handle = handle
        self.memo: dict = {}

    @property
    def keep_logits(self) -> bool:
        return self.handle.keep_logits

    @property
    def global_loss(self) -> bool:
        return self.handle.global_loss

    @property
    def strict(self) -> bool:
        return self.handle.strict

    def is_patched(self, module: nn.Module, kind: str | None = None) -> bool:
        """Whether a (live) handle patched `module`, for `kind` or for any kind."""
        state = patch_state(module)
        return state is not None and (kind is None or kind in state.kinds)

    def set_attribute(self, module: nn.Module, name: str, value: object) -> None:
        """Set an instance attribute (never a parameter, buffer or submodule), logged for undo."""
        if name in module._parameters or name in module._buffers or name in module._modules:
            raise ValueError(f"a patch must not replace the parameter, buffer or submodule {name!r}")
        if isinstance(value, (nn.Module, torch.Tensor)):
            raise TypeError(f"a patch must not add a module or tensor attribute, got {type(value).__name__} for {name!r}")
        self.handle._set(module, name, value)

    def mark_patched(self, module: nn.Module, path: str, kind: str, piece: str, falls_back: str = "") -> PatchState:
        """Record `module` as patched for `kind` (running `piece`) and mark it, so that no other
        patcher is offered it for that kind."""
        if kind not in KINDS:
            raise ValueError(f"expected kind to be one of {KINDS}, got {kind!r}")
        state = patch_state(module)
        if state is not None and state.handle is not self.handle:
            raise RuntimeError(f"{path or type(module).__name__} is already patched by another mmkernels.patch")
        if state is None:
            state = PatchState(self.handle, path, set())
            self.handle._set(module, _STATE_ATTR, state)
        if kind in state.kinds:
            raise RuntimeError(f"{path or type(module).__name__} is already patched for {kind}")
        state.kinds.add(kind)
        self.handle._records.append(PatchRecord(path, kind, piece, falls_back))
        return state

    def replace_forward(self, module: nn.Module, path: str, kind: str, piece: str, forward: Callable,
                        falls_back: str = "") -> bool:
        """Make `forward(module, *args, **kwargs)` the instance's forward (bound to it as a method is;
        `forward` must be picklable by name: a module-level function), and record it;
        `call_original(module, ...)` then runs the class's forward. Returns False, listing the module
        in `handle.skipped`, where the instance already has a `forward` of its own (a hook library's
        wrapper, or another patch): the patched forward would bypass it."""
        if "forward" in module.__dict__:
            self.skip(path, kind, "its forward is already replaced on the instance (a hook library's wrapper?); "
                                  "patch the model before wrapping it")
            return False
        self.mark_patched(module, path, kind, piece, falls_back)
        self.handle._set(module, "forward", _InstanceForward(forward, module))
        return True

    def set_up(self, set_up: Callable[[], None]) -> None:
        """Run `set_up()` (something process-wide the patch needs, such as registering a name with a
        library; idempotent, picklable by name: a module-level function) now, and again in any
        process that unpickles the patched model."""
        set_up()
        if set_up not in self.handle._set_ups:
            self.handle._set_ups.append(set_up)

    def skip(self, path: str, kind: str, reason: str) -> None:
        """Record an attention- or loss-like item left as it is, and why."""
        self.handle._skipped.setdefault((path, kind), SkippedItem(path, kind, reason))


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"expected {name} to be a bool, got {type(value).__name__}")


def _covered(kind: str, path: str, marked: dict, attention_like: set) -> bool:
    """Whether the module at `path` is covered for `kind`; `marked` maps the paths of the patched
    modules of the whole model to their kinds."""
    if kind in marked.get(path, ()):
        return True
    ancestors = [p for p in marked if p != path and (p == "" or path.startswith(p + "."))]
    if kind == "loss":
        return any("loss" in marked[p] for p in ancestors)
    prefix = path + "." if path else ""
    if any(p != path and p.startswith(prefix) and kind in kinds for p, kinds in marked.items()):
        return True
    return any(kind in marked[p] and p in attention_like for p in ancestors)


def patch(model: nn.Module, *, attention: bool = True, losses: bool = True, keep_logits: bool = True,
          global_loss: bool = False, strict: bool = False) -> PatchHandle:
    """Patch `model` in place (this instance only) to run mmkernels; returns its PatchHandle.

    attention: swap the attention of the supported families (nn.MultiheadAttention, transformers'
        CLIP/SigLIP/SigLIP2/BridgeTower, and any family a registered patcher handles).
    losses: compute the supported models' contrastive losses with mmkernels.clip_loss/siglip_loss/
        info_nce_loss.
    keep_logits: patched losses still return the logits, computed without autograd; False returns
        None there and never builds the N x N matrix.
    global_loss: under an initialised torch.distributed process group of more than one process, the
        patched contrastive losses compute the loss of the global batch (the processes' local pairs
        concatenated in rank order) with mmkernels.distributed, gradients scaled for DDP/FSDP's
        averaging (grad_scaling="ddp"): DDP(model) then trains as one process on the global batch.
        Without such a group, the local loss. Off by default: it changes what the model's loss means.
    strict: raise StrictPatchError if anything attention- or loss-like is left unpatched, or when a
        patched forward would fall back to the model's own code for a call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected model to be a torch.nn.Module, got {type(model).__name__}")
    options = dict(attention=attention, losses=losses, keep_logits=keep_logits, global_loss=global_loss,
                   strict=strict)
    for name, value in options.items():
        _check_flag(name, value)
    existing = model.__dict__.get(_HANDLE_ATTR)
    if isinstance(existing, PatchHandle) and existing.active:
        if existing.options != options:
            raise ValueError(
                f"model is already patched with {existing.options}; call mmkernels.unpatch(model) before "
                f"patching it with {options}"
            )
        return existing
    _load_patchers()
    handle = PatchHandle(model, **options)
    ctx = PatchContext(handle)
    kinds = [k for k, on in (("attention", attention), ("loss", losses)) if on]
    try:
        modules = list(model.named_modules())
        for path, module in modules:
            for kind in kinds:
                if ctx.is_patched(module, kind) or (path, kind) in handle._skipped:
                    continue  # patched, or deliberately left as it is by a patcher of an ancestor
                for patcher in _PATCHERS:
                    if patcher.kind == kind and patcher.fn(module, path, ctx):
                        break
        _list_uncovered(handle, modules, kinds)
        handle._set(model, _HANDLE_ATTR, handle)
    except BaseException:
        handle.undo()
        raise
    if strict and handle.skipped:
        handle.undo()
        listing = "; ".join(f"{s.path or '(model)'} ({s.kind}): {s.reason}" for s in handle.skipped)
        raise StrictPatchError(f"mmkernels.patch(strict=True) left these unpatched, nothing was changed: {listing}")
    return handle


def _list_uncovered(handle: PatchHandle, modules: list, kinds: list) -> None:
    marked, attention_like = {}, set()
    for path, module in modules:
        state = patch_state(module)
        if state is not None:
            marked[path] = state.kinds
        if is_attention_like(module):
            attention_like.add(path)
    reasons = {
        "attention": "no mmkernels patch for {}",
        "loss": "no mmkernels loss patch for {} (where the loss is computed outside the model, call "
                "mmkernels.clip_loss / mmkernels.siglip_loss there)",
    }
    for path, module in modules:
        for kind, like in (("attention", is_attention_like), ("loss", is_loss_like)):
            if kind in kinds and like(module) and not _covered(kind, path, marked, attention_like):
                reason = reasons[kind].format(type(module).__name__)
                handle._skipped.setdefault((path, kind), SkippedItem(path, kind, reason))


def unpatch(model: nn.Module) -> bool:
    """Undo `mmkernels.patch(model)`. Returns True if a patch was undone, False if there was none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected model to be a torch.nn.Module, got {type(model).__name__}")
    handle = model.__dict__.get(_HANDLE_ATTR)
    if not isinstance(handle, PatchHandle) or not handle.active:
        return False
    handle.undo()
    return True
