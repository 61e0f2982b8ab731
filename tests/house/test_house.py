"""The house rules of issue 10: small modules, one sentence each, imports at the top, one way, no cycles."""

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


def test_the_spine_imports_one_way():
    graph = _graph()
    assert graph["config"] <= {"common.setting_values", "common.redaction"} and not graph["common.setting_values"]
    assert graph["codebuddy_client"] <= {"config", "common.redaction", "codebuddy.sandbox", "codebuddy.cli_setup",
                                         "codebuddy.warm_pool",
                                         "codebuddy.warm_sessions", "codebuddy.process_tree"}
    assert graph["codebuddy.sandbox"] <= {"config"}
    # The CLI's processes: the pool holds them, each speaks the protocol; neither knows tasks, chats or config.
    assert graph["codebuddy.warm_pool"] <= {"codebuddy.warm_sessions", "codebuddy.process_tree"}
    assert graph["codebuddy.warm_sessions"] <= {"codebuddy.process_tree"}
    assert not graph["codebuddy.process_tree"]
    assert graph["codebuddy.cli_setup"] <= {"config"}
    assert graph["dingtalk_sender"] <= {"config", "common.redaction", "dingtalk.message_parts", "dingtalk.json_http",
                                        "dingtalk.route"}
    assert not graph["dingtalk.message_parts"]
    assert graph["dingtalk.json_http"] <= {"config"}
    assert "bot" not in set().union(*graph.values())  # nothing imports the entry point
    assert not any(name.startswith("chat.") for name in graph["async_task_manager"])  # tasks never see the chat
