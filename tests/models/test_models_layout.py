"""models/ is a library: no module under it imports from stages/ (checked on the source, so a new import fails
here whether or not anything runs it)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT  # noqa: E402


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module an `import` or `from ... import` anywhere in the file names (relative imports resolved
    against the file's package under `root`)."""
    package = path.relative_to(root).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            names.add(".".join([*base, *([node.module] if node.module else [])]))
    return names


def test_no_module_under_models_imports_stages():
    offenders = {
        str(path.relative_to(ROOT)): sorted(name for name in imported_modules(path) if name.split(".")[0] == "stages")
        for path in sorted((ROOT / "models").rglob("*.py"))
    }
    assert not {path: names for path, names in offenders.items() if names}


def test_the_import_check_sees_absolute_relative_and_nested_imports(tmp_path):
    fake = tmp_path / "models" / "heads" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from .. import errors\nfrom .base import AuxHead\n\n\ndef f():\n    import stages.errors\n")
    assert imported_modules(fake, tmp_path) == {"models", "models.heads.base", "stages.errors"}
