"""The house by role, checked: folders by role, imports only downward, no cycles, small modules and
functions, no private names across modules, hook names spelled in one place.

These read the source (ast), so they run in a second and need no model.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mechlie"
# Lower layers never import higher ones: a module may import its own layer and those to its left.
LAYERS = ("core", "read", "causal", "control", "sae", "report", "studies")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# A longer function is allowed when its docstring says why, with this phrase.
LONG_MARKER = "long because"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) for every import of a mechlie module in ``path``."""
    tree = ast.parse(path.read_text())
    # Imports under `if TYPE_CHECKING:` are for annotations only and never run: not a dependency.
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mechlie"):
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("mechlie")]
    return out


def _target(module: str, names: list[str]) -> list[str]:
    """The mechlie modules an import statement loads (``from mechlie.core import io`` loads core.io)."""
    targets = [module]
    for n in names:
        if f"{module}.{n}" in MODULES:
            targets.append(f"{module}.{n}")
    return targets


def test_every_module_lives_in_a_role_folder():
    loose = [m for m in MODULES if m != "mechlie" and _layer(m) is None]
    assert loose == [], f"modules outside core/read/causal/control/sae/report/studies: {loose}"


def test_imports_only_go_down_the_layers():
    bad = []
    for module, path in MODULES.items():
        mine = _layer(module)
        if mine is None:
            continue
        for imported, names, line in _imports(path):
            for target in _target(imported, names):
                theirs = _layer(target)
                if theirs is not None and LAYERS.index(theirs) > LAYERS.index(mine):
                    bad.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {target} ({theirs})")
    assert bad == [], "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_import_graph_has_no_cycles():
    graph = {
        m: {t for imp, names, _ in _imports(p) for t in _target(imp, names) if t in MODULES and t != m}
        for m, p in MODULES.items()
    }
    # Package __init__ files re-export lazily or not at all; an edge into a package is not a cycle by itself.
    graph = {m: {t for t in ts if not (MODULES[t].name == "__init__.py")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle.extend(stack[stack.index(t) :] + [t] if t in stack else [m, t])
                return True
            if state.get(t) is None and visit(t, stack + [t]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if state.get(m) is None and visit(m, [m]):
            break
    assert cycle == [], f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_are_small(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_MODULE_LINES, f"{module} has {n} lines (at most {MAX_MODULE_LINES})"


def test_long_functions_say_why():
    bad = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                doc = (ast.get_docstring(node) or "").lower()
                if n > MAX_FUNCTION_LINES and LONG_MARKER not in doc:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert bad == [], f"functions over {MAX_FUNCTION_LINES} lines whose docstring does not say why:\n" + "\n".join(bad)


def test_no_private_names_imported_across_modules():
    bad = []
    for root in (PKG, ROOT / "analyses"):
        for path in sorted(root.rglob("*.py")):
            for imported, names, line in _imports(path):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {private} from {imported}")
    assert bad == [], "private names imported across modules:\n" + "\n".join(bad)


def test_hook_names_are_spelled_in_one_place():
    """Only mechlie.core.hooks spells ``blocks.L.hook_...`` names; everything else asks it."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "core" / "hooks.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
                if text.startswith("blocks.") and "hook_" in text:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert bad == [], "hand-built hook names (use mechlie.core.hooks.hook_name or Site):\n" + "\n".join(bad)


def test_scripts_are_thin_launchers():
    fat = {}
    for path in sorted((ROOT / "analyses").glob("*.py")):
        code = [l for l in path.read_text().splitlines() if l.strip() and not l.strip().startswith("#")]
        if len(code) > 45:
            fat[path.name] = len(code)
    assert fat == {}, f"analyses scripts with more than 45 non-blank lines (docstring included): {fat}"


def test_no_global_grad_switch():
    """``torch.set_grad_enabled(False)`` as a statement leaks into every later study run in the same
    process (reproduce.py runs them in one): a study once left SAE training without gradients."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Call)
                and ast.unparse(node.value.func).endswith("set_grad_enabled")
            ):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert bad == [], "global grad switches (use `with torch.no_grad():`):\n" + "\n".join(bad)
