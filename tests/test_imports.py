"""The module graph: every module imports on its own, no module imports another in a circle (lazy imports inside
functions and imports under TYPE_CHECKING count too), and no module imports a private name from another."""

import ast
import subprocess
import sys
from pathlib import Path

import loramix

ROOT = Path(loramix.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str]]:
    """(module imported, name imported) for every `from ... import` of a loramix module in `path`: at the top, inside
    functions (lazy) and under TYPE_CHECKING alike."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        elif node.module and node.module.split(".")[0] == "loramix":
            target = node.module
        else:
            continue
        for alias in node.names:
            module = f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
            found.append((module, alias.name))
    return found


def test_every_module_imports_on_its_own():
    script = (
        "import importlib, sys\n"
        f"names = {sorted(m for m in _modules() if not m.endswith('__main__'))!r}\n"  # __main__ runs the CLI
        "bad = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m == 'loramix' or m.startswith('loramix.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        bad.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", result.stdout


def test_no_import_circle_and_no_private_names_across_modules():
    modules = _modules()
    edges: dict[str, set[str]] = {}
    private = []
    for name, path in modules.items():
        for module, imported in _imports(name, path, modules):
            if module in modules and module != name:
                edges.setdefault(name, set()).add(module)
            if imported.startswith("_") and not imported.startswith("__"):
                private.append(f"{name} imports {imported} from {module}")
    assert not private, private

    # a depth-first search for a back edge names one circle, if there is any
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(modules):
        if node not in state:
            circle = visit(node)
            assert circle is None, " -> ".join(circle)


def test_the_library_does_not_depend_on_the_demo():
    """The demo is an application of the library: only itself and the command line (which runs it) import it."""
    modules = _modules()
    apps = ("loramix.demo", "loramix.cli", "loramix.commands", "loramix.__main__")
    offenders = [
        f"{name} imports {module}"
        for name, path in modules.items()
        if not name.startswith(apps)
        for module, _ in _imports(name, path, modules)
        if module == "loramix.demo" or module.startswith("loramix.demo.")
    ]
    assert not offenders, offenders
