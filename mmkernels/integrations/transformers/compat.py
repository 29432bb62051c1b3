"""Compatibility with the installed transformers, decided by its code, not by its version number.

Each transformers patcher declares the upstream definitions it replaces or mirrors (`declare`): the
attention forward of a family and the eager formula it stands in for, the model forward whose loss
it swaps, the mask helpers it reads. A definition's *fingerprint* is the SHA-256 of its normalised
source: the module file parsed with `ast`, the definition (decorators included) found by its
qualified name, docstrings dropped, printed back with `ast.unparse`. Comments, blank lines and
formatting do not change it; any change to the code does.

`fingerprints.RECORDED` holds the fingerprints of every transformers release the test suite
passed on. `mmkernels.patch` applies a patcher where every definition it declares has a recorded
fingerprint, whatever the version number says; where one differs (or is gone), that patcher's
modules are left as they are, listed in the handle with a reason that names the changed definition
(StrictPatchError under strict=True). `MMKERNELS_PATCH_UNTESTED_TRANSFORMERS=1` patches anyway.

A new transformers release, step by step:

    python -m mmkernels.integrations.transformers.compat check    # which declared definitions changed
    # read those changes against the patches, run the test suite with the new release
    # (MMKERNELS_PATCH_UNTESTED_TRANSFORMERS=1 while its fingerprints are not recorded yet), then:
    python -m mmkernels.integrations.transformers.compat record   # adds its fingerprints to fingerprints.py

`record --source DIR --version V` reads a transformers tree that is not installed (an unpacked
wheel), so older releases can be recorded without installing them.
"""
from __future__ import annotations

import argparse
import copy
import ast
import functools
import hashlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

from mmkernels.integrations.patching import _load_patchers

__all__ = ["ALLOW_ENV", "declare", "declared", "family", "fingerprint", "incompatibility", "unrecorded"]

ALLOW_ENV = "MMKERNELS_PATCH_UNTESTED_TRANSFORMERS"

# key -> upstream definitions, "module:Qualified.name"; filled by the patcher modules at import.
_DECLARED: dict[str, tuple[str, ...]] = {}
_warned: set = set()


def declare(key: str, *names: str) -> tuple[str, ...]:
    """Record that the patch `key` (e.g. "attention: clip") replaces or mirrors `names`
    ("transformers.models.clip.modeling_clip:CLIPAttention.forward", ...). Returns `names`."""
    for name in names:
        if name.count(":") != 1:
            raise ValueError(f"expected an upstream name of the form 'module:Qualified.name', got {name!r}")
    _DECLARED[key] = tuple(names)
    return tuple(names)


def declared() -> dict[str, tuple[str, ...]]:
    """Every declaration made so far (import the patcher modules first), key -> names."""
    return dict(_DECLARED)


def family(module) -> str | None:
    """The transformers model family a module's class comes from ("clip", "siglip2", ...), or None:
    the attention patches declare, and look up their compatibility, per family."""
    parts = type(module).__module__.split(".")
    if len(parts) >= 3 and parts[0] == "transformers" and parts[1] == "models":
        return parts[2]
    return None


def _module_source(module: str, root: str | None = None) -> str | None:
    """The source text of `module` (installed, or under the folder `root`), None if there is none."""
    if root is not None:
        path = Path(root, *module.split(".")).with_suffix(".py")
        return path.read_text() if path.is_file() else None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin).read_text()


@functools.lru_cache(maxsize=None)
def _tree(module: str, root: str | None) -> ast.Module | None:
    source = _module_source(module, root)
    return None if source is None else ast.parse(source)


def _find(tree: ast.Module, qualname: str):
    node = tree
    for part in qualname.split("."):
        body = getattr(node, "body", [])
        found = [n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 and n.name == part]
        if not found:
            return None
        node = found[-1]  # a later definition of the same name is the one that counts
    return node


class _DropDocstrings(ast.NodeTransformer):
    def _strip(self, node):
        self.generic_visit(node)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _strip


def fingerprint(name: str, root: str | None = None) -> str | None:
    """The fingerprint (16 hex digits) of an upstream definition "module:Qualified.name" as installed
    (or under the folder `root`), or None where the module or the definition does not exist."""
    module, qualname = name.split(":")
    tree = _tree(module, root)
    node = None if tree is None else _find(tree, qualname)
    if node is None:
        return None

    text = ast.unparse(_DropDocstrings().visit(copy.deepcopy(node)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _recorded() -> dict:
    from mmkernels.integrations.transformers.fingerprints import RECORDED

    return RECORDED


def unrecorded(names) -> list[str]:
    """The names among `names` whose installed code has no recorded fingerprint (changed or gone)."""
    recorded = _recorded()
    return [name for name in names if fingerprint(name) not in recorded.get(name, {})]


def _short(name: str) -> str:
    module, qualname = name.split(":")
    return f"{module.rsplit('.', 1)[-1]}.{qualname}"


def _tested_versions(names) -> str:
    recorded = _recorded()
    versions = sorted({v for name in names for vs in recorded.get(name, {}).values() for v in vs}, key=_version_key)
    if not versions:
        return "no recorded release"
    return f"transformers {versions[0]}" + (f" to {versions[-1]}" if len(versions) > 1 else "")


def incompatibility(key: str) -> str | None:
    """None where every definition the patch `key` declares is one the tests ran on (or
    MMKERNELS_PATCH_UNTESTED_TRANSFORMERS=1 is set); else the reason to leave it unpatched, naming
    the changed definitions. Warns once per reason."""
    names = _DECLARED[key]
    changed = unrecorded(names)
    if not changed or os.environ.get(ALLOW_ENV) == "1":
        return None
    import transformers

    what = ", ".join(_short(n) + (" (gone)" if fingerprint(n) is None else "") for n in changed)
    reason = (f"transformers {transformers.__version__} changed {what}, which this patch mirrors; the code it was "
              f"tested on is that of {_tested_versions(names)} (set {ALLOW_ENV}=1 to patch anyway)")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"mmkernels.patch leaves {key} unpatched: {reason}", stacklevel=4)
    return reason


def clear_cache() -> None:
    """Forget the parsed sources (after the installed code changed, or in tests)."""
    _tree.cache_clear()
    _warned.clear()


def _record(version: str, root: str | None) -> int:
    _load_patchers()
    recorded = {name: {fp: tuple(vs) for fp, vs in fps.items()} for name, fps in _recorded().items()}
    missing = []
    for names in _DECLARED.values():
        for name in names:
            fp = fingerprint(name, root)
            if fp is None:
                missing.append(name)
                continue
            versions = recorded.setdefault(name, {}).get(fp, ())
            if version not in versions:
                recorded[name][fp] = tuple(sorted(set(versions) | {version}, key=_version_key))
    path = Path(__file__).with_name("fingerprints.py")
    header = path.read_text().split("RECORDED = ", 1)[0]
    lines = ["RECORDED = {"]
    for name in sorted(recorded):
        lines.append(f"    {name!r}: {{")
        for fp, versions in sorted(recorded[name].items(), key=lambda item: _version_key(item[1][0])):
            lines.append(f"        {fp!r}: ({', '.join(map(repr, versions))},),")
        lines.append("    },")
    path.write_text(header + "\n".join(lines) + "\n}\n")
    for name in missing:
        print(f"not in transformers {version}: {name}", file=sys.stderr)
    print(f"recorded transformers {version}: {sum(map(len, _DECLARED.values()))} definitions, "
          f"{len(missing)} missing, into {path}")
    return 1 if missing else 0


def _version_key(version: str):
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def _check() -> int:
    _load_patchers()
    import transformers

    bad = 0
    for key, names in sorted(_DECLARED.items()):
        changed = unrecorded(names)
        bad += bool(changed)
        print(f"{'CHANGED' if changed else 'known  '}  {key}" + (f": {', '.join(map(_short, changed))}" if changed else ""))
    print(f"transformers {transformers.__version__}: {bad} of {len(_DECLARED)} patches meet code they were not tested on")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkernels.integrations.transformers.compat",
                                     description="Fingerprints of the transformers code mmkernels' patches mirror.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="list the patches whose upstream code is not a recorded one")
    record = sub.add_parser("record", help="record the fingerprints of a release the tests passed on")
    record.add_argument("--source", help="a transformers tree that is not installed (the folder holding transformers/)")
    record.add_argument("--version", help="its version (required with --source)")
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check()
    if args.source is not None and args.version is None:
        parser.error("--source needs --version")
    if args.source is None:
        import transformers

        return _record(args.version or transformers.__version__, None)
    return _record(args.version, args.source)


if __name__ == "__main__":
    # Run the imported module's main: the patchers declare into that module, not into __main__.
    from mmkernels.integrations.transformers.compat import main as _main

    raise SystemExit(_main())
