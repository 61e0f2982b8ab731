"""The house rules: the spine alone at the top, a package per concern, floors imported one way (docs/architecture.md),
small modules with one sentence each, imports at the top, no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

SPINE = ("bot", "async_task_manager", "dingtalk_sender", "codebuddy_client", "config")
PACKAGES = sorted(path.parent for path in ROOT.glob("*/__init__.py") if path.parent.name != "tests")
MODULES = sorted([*ROOT.glob("*.py"), *(path for package in PACKAGES for path in package.glob("*.py"))])


def _name(path: Path) -> str:
    """The dotted module name of a project file: `tasks/board.py` → `tasks.board`."""
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


NAMES = {_name(path) for path in MODULES}
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 250
# The one import inside a function: the DingTalk SDK reads DINGTALK_OPENAPI_ENDPOINT at import, so bot.py
# imports it only after bot.py's run_daemon has set it (docs/wire-facts.md §1).
LATE_IMPORTS = {("dingtalk/stream.py", "sdk")}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _project_imports(tree: ast.Module) -> set[str]:
    """The project modules a module imports at its top: `from tasks import texts` counts as `tasks.texts`."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return (names & NAMES) - {package.name for package in PACKAGES}


def _graph() -> dict[str, set[str]]:
    return {_name(path): _project_imports(_tree(path)) for path in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_small_and_opens_with_its_one_sentence(path):
    tree = _tree(path)
    docstring = ast.get_docstring(tree)
    assert docstring, f"{path.name} has no opening docstring"
    assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_MODULE_LINES
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno - node.lineno + 1 <= MAX_CLASS_LINES, f"{path.name}: class {node.name}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_are_at_the_top(path):
    late = []
    for function in ast.walk(_tree(path)):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                where = (str(path.relative_to(ROOT)), function.name)
                if isinstance(node, (ast.Import, ast.ImportFrom)) and where not in LATE_IMPORTS:
                    late.append(f"{path.name}:{node.lineno} in {function.name}()")
    assert not late, late


def test_module_imports_have_no_cycles():
    graph = _graph()
    done: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, "import cycle: " + " → ".join((*trail, name))
        if name in done:
            return
        for imported in graph[name]:
            visit(imported, (*trail, name))
        done.add(name)

    for name in graph:
        visit(name, ())


# The floors, lowest first (docs/architecture.md). A module imports only from its own floor — its own side of it,
# where a floor has sides that never import each other — or from the floors below. The most specific name wins:
# `tasks.task` (the task model) stands below `store`, the rest of `tasks` (the engine) above it; `projects.catalog`
# (the projects file, read with the settings) beside `config`, the rest of `projects` (a feature) with the features.
FLOORS: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("common",),),
    (("config", "projects.catalog"),),
    (("dingtalk", "dingtalk_sender"), ("codebuddy", "codebuddy_client")),
    (("tasks.task",),),
    (("store",),),
    (("tasks", "async_task_manager"),),
    (("cards",), ("files",), ("cluster",), ("projects",), ("schedules",), ("usage",)),
    (("chat",),),
    (("ops",),),
    (("bot",),),
)


def floor_of(name: str) -> tuple[int, int]:
    """(floor, side) of a module: the longest name in FLOORS that is the module or one of its packages."""
    best: tuple[int, tuple[int, int]] | None = None
    for floor, sides in enumerate(FLOORS):
        for side, prefixes in enumerate(sides):
            for prefix in prefixes:
                if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), (floor, side))
    assert best is not None, f"{name} stands on no floor: give its package a place in FLOORS (docs/architecture.md)"
    return best[1]


def wrong_way_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes up a floor or across to another side of the same floor."""
    wrong = []
    for name, imported in sorted(graph.items()):
        here = floor_of(name)
        for other in sorted(imported):
            there = floor_of(other)
            if there[0] > here[0] or (there[0] == here[0] and there[1] != here[1]):
                wrong.append(f"{name} → {other}")
    return wrong


def test_every_import_goes_down_the_floors():
    assert not wrong_way_imports(_graph())


def test_the_floor_rule_catches_an_import_up_or_across():
    graph = _graph()
    assert wrong_way_imports({**graph, "store.base": graph["store.base"] | {"tasks.board"}}) == [
        "store.base → tasks.board"]
    assert wrong_way_imports({**graph, "cards.api": graph["cards.api"] | {"files.outbox"}}) == [
        "cards.api → files.outbox"]
    assert wrong_way_imports({**graph, "dingtalk.route": {"codebuddy.sandbox"}}) == [
        "dingtalk.route → codebuddy.sandbox"]


def test_only_the_spine_stands_at_the_top():
    assert sorted(path.stem for path in ROOT.glob("*.py")) == sorted(SPINE)


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_a_package_init_is_a_docstring_naming_its_concern(package):
    tree = _tree(package / "__init__.py")
    assert ast.get_docstring(tree), f"{package.name}/__init__.py names no concern"
    assert len(tree.body) == 1, f"{package.name}/__init__.py holds more than its docstring (no re-exports)"


def test_the_cli_processes_and_the_wire_helpers_know_nothing_above_them():
    graph = _graph()
    # The CLI's processes: the pool holds them, each speaks the protocol; neither knows tasks, chats or config.
    assert graph["codebuddy.warm_pool"] <= {"codebuddy.warm_sessions", "codebuddy.process_tree"}
    assert graph["codebuddy.warm_sessions"] <= {"codebuddy.process_tree", "codebuddy.cli_output",
                                                "codebuddy.tool_requests"}
    assert not graph["codebuddy.cli_output"] and not graph["codebuddy.tool_requests"]
    assert not graph["codebuddy.process_tree"] and not graph["dingtalk.message_parts"]
    assert not graph["common.setting_values"] and not graph["dingtalk.route"]
