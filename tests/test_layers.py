"""The package's layers, read from its source with `ast` (nothing of mmkernels is imported or run).

- Imports point one way: ops -> {nn, distributed} -> integrations -> train. Nothing in ops imports
  nn, distributed, integrations or mmkernels' root (ops may load the compiled extension
  mmkernels._C); distributed imports only ops; nn imports ops and distributed (nn.ClipLoss and
  nn.SigLipLoss take open_clip's world_size and call the distributed losses, never the reverse);
  integrations import ops, nn and distributed;
  train imports only the public API: `mmkernels` (the names of its __all__ but integrations),
  `mmkernels.nn` and `mmkernels.distributed`. Every import counts, those inside functions too.
- ops/ holds the shared modules and one folder per op family; each family folder has exactly
  __init__.py, kernels.py, plan.py, launch.py, registered.py and reference.py.
- A family's kernels.py holds @triton.jit functions only (and the constants they use); its
  registered.py registers the custom ops, each under its op name (`def clip_block_stats` is
  "mmkernels::clip_block_stats"), and no other module registers one.
- mmkernels/__init__.py states its public API in an explicit __all__.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmkernels"
OPS = PACKAGE / "ops"
FAMILIES = ("attention", "contrastive", "region")
FAMILY_FILES = {"__init__.py", "kernels.py", "plan.py", "launch.py", "registered.py", "reference.py"}
SHARED_OPS_MODULES = {"__init__.py", "_common.py", "_args.py", "_dispatch.py", "_extension.py", "masks.py"}
PUBLIC_NAMES = {"clip_loss", "siglip_loss", "info_nce_loss", "cross_attention", "region_mask", "RegionMaskOutput",
                "masked_region_loss", "patch", "unpatch", "PatchHandle", "AttnSpec"}
# which layers each layer may import (besides modules outside mmkernels)
ALLOWED = {
    "ops": {"ops"},
    "nn": {"ops", "nn", "distributed"},
    "distributed": {"ops", "distributed"},
    "integrations": {"ops", "nn", "distributed", "integrations"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


SOURCES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def _is_module(name: str) -> bool:
    return name in SOURCES or name == "mmkernels._C"


def layer_of(module: str) -> str | None:
    """The layer of a module name: ops, nn, distributed, integrations, train, bench, testing or
    root (mmkernels itself); None outside mmkernels."""
    parts = module.split(".")
    if parts[0] != "mmkernels":
        return None
    if len(parts) == 1:
        return "root"
    if parts[1] in ("ops", "_C"):
        return "ops"
    return parts[1]


def _tree(module: str) -> ast.Module:
    return ast.parse(SOURCES[module].read_text(), filename=str(SOURCES[module]))


def imports(module: str) -> list[tuple[int, str, str | None]]:
    """(line, module imported, name taken from it or None) for every import statement of `module`;
    `from package import submodule` gives the submodule."""
    is_package = SOURCES[module].name == "__init__.py"
    found = []
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".")
                package = package[: len(package) - node.level + (1 if is_package else 0)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((node.lineno, full, None) if _is_module(full) else (node.lineno, base, alias.name))
    return found


def modules_of(layer: str) -> list[str]:
    return [m for m in SOURCES if m != "mmkernels" and layer_of(m) == layer]


def _where(module: str, line: int) -> str:
    return f"{SOURCES[module].relative_to(PACKAGE.parent)}:{line}"


# --------------------------------------------------------------------------- the import graph


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_the_layers_below_it(layer):
    bad = [
        f"{_where(module, line)} imports {target}{'.' + name if name else ''} ({layer_of(target)})"
        for module in modules_of(layer)
        for line, target, name in imports(module)
        if layer_of(target) is not None and layer_of(target) not in ALLOWED[layer]
    ]
    assert not bad, f"{layer} may import only {sorted(ALLOWED[layer])}:\n" + "\n".join(bad)


def root_all() -> list[str]:
    """mmkernels/__init__.py's __all__, read from its source."""
    for node in _tree("mmkernels").body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return []


def _train_public() -> set[str]:
    return (set(root_all()) - {"integrations"}) | {"nn", "distributed"}


def test_train_uses_only_the_public_api():
    """Imports of mmkernels' root (its __all__, less integrations), mmkernels.nn and
    mmkernels.distributed (no private names), and attributes read off those modules alike."""
    public = _train_public()
    bad = []
    for module in modules_of("train"):
        aliases = {}  # local name -> the mmkernels module it is bound to
        for node in ast.walk(_tree(module)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if layer_of(alias.name) is not None:
                        aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else "mmkernels"
        for line, target, name in imports(module):
            layer = layer_of(target)
            if layer in (None, "train"):
                continue
            if target == "mmkernels" and (name is None or name in public):
                continue
            if target in ("mmkernels.nn", "mmkernels.distributed") and not (name or "").startswith("_"):
                continue
            bad.append(f"{_where(module, line)} imports {target}{'.' + name if name else ''}")
        for node in ast.walk(_tree(module)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                owner = aliases[node.value.id]
                if (owner == "mmkernels" and node.attr not in public) or node.attr.startswith("_") and \
                        not (node.attr.startswith("__") and node.attr.endswith("__")):
                    bad.append(f"{_where(module, node.lineno)} uses {owner}.{node.attr}")
    assert not bad, f"train may use only {sorted(public)}, mmkernels.nn and mmkernels.distributed:\n" + "\n".join(bad)


def test_root_states_its_public_api():
    names = root_all()
    assert names, "mmkernels/__init__.py has no __all__"
    missing = PUBLIC_NAMES - set(names)
    assert not missing, f"mmkernels.__all__ lacks {sorted(missing)}"


# --------------------------------------------------------------------------- the ops layout


def test_ops_holds_the_shared_modules_and_one_folder_per_family():
    modules = {p.name for p in OPS.glob("*.py")}
    folders = {p.name for p in OPS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert modules <= SHARED_OPS_MODULES, f"modules in ops/ that belong in a family folder: {sorted(modules - SHARED_OPS_MODULES)}"
    assert folders == set(FAMILIES), f"family folders: expected {sorted(FAMILIES)}, got {sorted(folders)}"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_folder_has_exactly_the_six_files(family):
    folder = OPS / family
    assert folder.is_dir(), f"mmkernels/ops/{family}/ does not exist"
    files = {p.name for p in folder.iterdir() if p.name != "__pycache__"}
    assert files == FAMILY_FILES, (f"mmkernels/ops/{family}/: missing {sorted(FAMILY_FILES - files)}, "
                                   f"unexpected {sorted(files - FAMILY_FILES)}")


def _dotted(node) -> str:
    """'triton.jit' for the expression triton.jit, triton.jit(...) and the like."""
    if isinstance(node, ast.Call):
        return _dotted(node.func)
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_module_holds_only_triton_jit_functions(family):
    module = f"mmkernels.ops.{family}.kernels"
    if module not in SOURCES:
        pytest.fail(f"{module} does not exist")
    bad = []
    for node in _tree(module).body:
        if isinstance(node, ast.FunctionDef):
            decorators = {_dotted(d) for d in node.decorator_list}
            if not decorators & {"triton.jit", "jit"}:
                bad.append(f"{_where(module, node.lineno)} {node.name} is not a @triton.jit function")
        elif not isinstance(node, (ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign, ast.Expr)):
            bad.append(f"{_where(module, node.lineno)} {type(node).__name__}")
        elif isinstance(node, ast.Expr) and not isinstance(node.value, ast.Constant):
            bad.append(f"{_where(module, node.lineno)} a statement")
    assert not bad, "\n".join(bad)


def registrations(module: str) -> list[tuple[int, str, str]]:
    """(line, function name, op name) for each function that torch.library.custom_op / triton_op decorates."""
    found = []
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                if isinstance(d, ast.Call) and _dotted(d).split(".")[-1] in ("custom_op", "triton_op") and d.args:
                    op = d.args[0].value if isinstance(d.args[0], ast.Constant) else "?"
                    found.append((node.lineno, node.name, op))
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_registered_ops_carry_their_op_names(family):
    module = f"mmkernels.ops.{family}.registered"
    if module not in SOURCES:
        pytest.fail(f"{module} does not exist")
    found = registrations(module)
    assert found, f"{module} registers no op"
    bad = [f"{_where(module, line)} def {name} registers {op!r}" for line, name, op in found
           if op != f"mmkernels::{name}"]
    assert not bad, "each custom op's Python name is its op name:\n" + "\n".join(bad)


def test_only_the_registered_modules_register_ops():
    bad = [f"{_where(module, line)} registers {op!r}" for module in SOURCES if not module.endswith(".registered")
           for line, _, op in registrations(module)]
    assert not bad, "custom ops are registered in ops/<family>/registered.py only:\n" + "\n".join(bad)
