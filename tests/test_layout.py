"""The package layout rule: the ``fedmoco`` core never imports ``server/`` or ``clients/``.

A site installs the core and its client; the coordinator the core and its server. Any
import of the other side from the core, even a lazy one inside a function, would pull the
whole federation stack into every evaluation command and break that split.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("server", "clients")


def forbidden_imports(source: str, filename: str) -> list[str]:
    """``file:line: statement`` for every import of a FORBIDDEN top-level package in ``source``,
    at any depth (module level, inside functions, under ``if TYPE_CHECKING``)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in FORBIDDEN:
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_core_never_imports_server_or_clients():
    files = sorted((ROOT / "fedmoco").rglob("*.py"))
    assert len(files) > 10  # the scan really looked at the package
    bad = [hit for f in files for hit in forbidden_imports(f.read_text(), str(f.relative_to(ROOT)))]
    assert not bad, "the fedmoco core imports server/ or clients/:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, hits", [
    ("import server.simulation", 1),
    ("from clients.app import app", 1),
    ("def f():\n    from server import queue\n    import clients\n", 2),
    ("import serverless, clientside\nfrom .server import x\nfrom fedmoco import server_utils", 0),
])
def test_the_scan_finds_module_level_and_lazy_imports(source, hits):
    assert len(forbidden_imports(source, "x.py")) == hits
