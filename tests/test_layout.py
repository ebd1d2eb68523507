"""The package's layering: every import points down (no circle), rules never import the
pass, and checkpoints written before the layout move still load after it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import pfa_fx
from tests.nets import MLP, Mixed

PACKAGE = Path(pfa_fx.__file__).parent
DATA = Path(__file__).parent / "data"
PASS_MODULES = {"pfa_fx.convert", "pfa_fx.rewrite", "pfa_fx.install", "pfa_fx.graph_module"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Modules of pfa_fx that ``path`` imports (at any depth of its code, lazy imports too),
    with the subpackages Python runs on the way (``pfa_fx.rules`` for ``pfa_fx.rules.fa``).
    The root package is left out: it is the public facade, run first by any import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            # `from . import ops` imports a module; `from .x import y` a name of x (or a submodule)
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        for t in targets:
            parts = t.split(".")
            for i in range(2, len(parts) + 1):
                found.add(".".join(parts[:i]))
    return {m for m in found if m.startswith("pfa_fx.")}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    # a module's own packages are always run before it: no edge to them
    return {
        name: {m for m in _imports(p, name) if m in files and m != name and not name.startswith(m + ".")}
        for name, p in files.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_package_has_no_import_circle():
    graph = _graph()
    assert len(graph) > 15  # the walk found the package
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_the_cycle_check_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_rule_imports_the_pass_or_a_front_end():
    graph = _graph()
    rules = [n for n in graph if n.startswith("pfa_fx.rules.")]
    assert len(rules) >= 9
    for rule in rules:
        bad = {m for m in graph[rule] if m in PASS_MODULES or m.startswith("pfa_fx.capture")}
        assert not bad, f"{rule} imports the pass: {sorted(bad)}"


def test_the_import_walk_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "pfa_fx" / "rules"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("def f():\n    from ..convert import _attr\n    from .. import ops\n")
    assert {"pfa_fx.convert", "pfa_fx.ops"} <= _imports(f, "pfa_fx.rules.x")


@pytest.mark.parametrize("path", sorted(DATA.glob("pre_layout_*.pth")), ids=lambda p: p.stem)
def test_a_checkpoint_saved_before_the_layout_move_loads_after_it(path):
    saved = torch.load(path, weights_only=False)
    torch.manual_seed(0)
    net = Mixed() if saved["net"] == "Mixed" else MLP()
    then = {} if saved["rule"] == "bp" else {"scale": "xavier"}  # the default when it was saved
    gm = pfa_fx.convert(net, saved["rule"], seed=3, **then, **saved["options"])
    gm.load_state_dict(saved["state_dict"])  # strict, and checked against the recorded conversion
    mine = gm.state_dict()
    assert mine.keys() == saved["state_dict"].keys()
    for k, v in saved["state_dict"].items():
        assert torch.equal(mine[k], v) if isinstance(v, torch.Tensor) else mine[k] == v, k
    # the recorded output came from another CPU's kernels (last bits differ): bit for bit
    # against the unconverted net with the same weights, computed here
    native = Mixed() if saved["net"] == "Mixed" else MLP()
    native.load_state_dict({k: v for k, v in saved["state_dict"].items() if "pfa_feedback" not in k})
    assert torch.equal(gm(saved["x"]), native(saved["x"]))
    torch.testing.assert_close(gm(saved["x"]), saved["out"])
