"""The import direction between the project's packages, checked on the source with ``ast``.

Layers, lowest first: ``prompt_store`` < ``server`` (engine core, then its HTTP layer ``server.api`` /
``server.app``) < ``training``, ``bench`` < ``softprompt_cli`` (the root command). Nothing imports upward:
``prompt_store`` never imports the server, the server never imports ``training`` or ``bench``, offline training
and evaluation use the engine without the HTTP layer, and only the root command knows every package. Imports
inside functions and under ``TYPE_CHECKING`` count too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("prompt_store", "server", "training", "bench", "softprompt_cli")
HTTP_LAYER = ("server.api", "server.app")

# (what a rule covers, imports it forbids, why)
RULES = [
    (("prompt_store",), ("server", "training", "bench", "softprompt_cli"), "prompt_store sits below the server"),
    (("server",), ("training", "bench", "softprompt_cli"), "the runtime never imports tooling built on it"),
    (("training",), HTTP_LAYER + ("softprompt_cli",), "offline training / eval use the engine, not the HTTP layer"),
    (("bench",), ("softprompt_cli",), "only the root command imports softprompt_cli"),
]


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of everything ``source`` imports. ``from a import b`` yields ``a`` and ``a.b`` (``b``
    may be a submodule); relative imports are resolved against ``module``."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                if not is_package:
                    anchor = anchor[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base:
                out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}" if base else alias.name) for alias in node.names]
    return out


def project_modules(root: Path = ROOT) -> list[tuple[str, Path]]:
    mods = []
    for pkg in PACKAGES:
        assert (root / pkg / "__init__.py").is_file(), pkg
        mods += [(module_name(p, root), p) for p in sorted((root / pkg).rglob("*.py"))]
    return mods


def _forbidden(mod: str) -> list[tuple[tuple[str, ...], str]]:
    """What ``mod`` may not import, with the reason."""
    rules = [(forbidden, why) for covered, forbidden, why in RULES if _under(mod, covered)]
    if _under(mod, ("server",)) and not _under(mod, HTTP_LAYER + ("server.cli",)):
        rules.append((HTTP_LAYER, "the engine core sits below the HTTP layer"))
    return rules


def violations(root: Path = ROOT) -> list[str]:
    """One line per offending import statement: ``path:line: module imports name (reason)``."""
    found = []
    for mod, path in project_modules(root):
        imports = imported_names(path.read_text(encoding="utf-8"), mod, path.name == "__init__.py")
        for forbidden, why in _forbidden(mod):
            seen: set[int] = set()
            for line, name in imports:
                if line not in seen and _under(name, forbidden):
                    seen.add(line)
                    found.append(f"{path.relative_to(root)}:{line}: {mod} imports {name} ({why})")
    return found


def test_no_module_imports_upward():
    assert violations() == []


def test_offline_eval_loads_no_http_layer():
    """At run time too: the modules offline evaluation uses load neither FastAPI nor the server's HTTP layer."""
    code = ("import sys\nimport training.cli, training.evaluate, training.eval_backends, training.eval_cli, "
            "training.fewshot, training.report, server.engine, server.request_builder\n"
            "print(sorted(m for m in sys.modules\n"
            "             if m.startswith(('fastapi', 'starlette', 'uvicorn', 'server.api', 'server.app'))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_package_is_checked():
    names = {m for m, _ in project_modules()}
    for expected in ("prompt_store.registry", "server.api.service", "server.request_builder", "training.evaluate",
                     "bench.cli", "softprompt_cli"):
        assert expected in names


@pytest.mark.parametrize(("source", "module", "is_package", "expected"), [
    ("import training.cli", "server.cli", False, {"training.cli"}),
    ("from bench.serve_bench import main", "server.x", False, {"bench.serve_bench", "bench.serve_bench.main"}),
    ("from server import api", "training.evaluate", False, {"server", "server.api"}),
    ("def f():\n    from server.api.service import build_request\n", "training.evaluate", False,
     {"server.api.service", "server.api.service.build_request"}),
    ("from ..api import errors", "server.engine_x.mod", False, {"server.api", "server.api.errors"}),
    ("from . import service", "server.api", True, {"server.api", "server.api.service"}),
    ("from .errors import APIError", "server.api.generate", False, {"server.api.errors", "server.api.errors.APIError"}),
])
def test_import_parser(source, module, is_package, expected):
    assert {name for _, name in imported_names(source, module, is_package)} == expected


def test_a_forbidden_import_is_reported(tmp_path):
    """The checker is not vacuous: an upward import planted in a copy of the tree is found."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "server" / "cli.py").write_text("def f():\n    from training.cli import train_main\n")
    (tmp_path / "prompt_store" / "x.py").write_text("from server import engine\n")
    (tmp_path / "training" / "evaluate.py").write_text("from server.api.service import build_request\n")
    (tmp_path / "server" / "engine.py").write_text("from .api.errors import APIError\n")
    found = violations(tmp_path)
    assert len(found) == 4, found
    assert "server/cli.py:2: server.cli imports training.cli (the runtime never imports tooling built on it)" in found
    assert any("prompt_store.x imports server" in f for f in found)
    assert any("training.evaluate imports server.api" in f for f in found)
    assert any("server.engine imports server.api" in f for f in found)
