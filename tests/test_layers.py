"""Imports point down the layers: utils/ at the bottom; dataset/ and models/ on it, neither
importing the other; helper.py over them; band_prediction.py (very large images) and
config.py (the shared flags and run set-up) beside each other over helper; run_state.py (a
training run's files) over config; the entry points train_deep_globe.py, predict.py and
bench/ on top, each importing no other. The rule is written out here, not read from the code."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each part of the code (a package or a top-level module) and the parts it may import.
LOWER = {"utils": set(), "dataset": {"utils"}, "models": {"utils"}, "helper": {"utils", "dataset", "models"}}
LOWER["band_prediction"] = {"helper", *LOWER["helper"]}
LOWER["config"] = {"helper", *LOWER["helper"]}
LOWER["run_state"] = {"config", *LOWER["config"]}
ENTRY_POINTS = ("train_deep_globe", "predict", "bench")
LOWER.update({entry: {"run_state", "band_prediction", *LOWER["run_state"]} for entry in ENTRY_POINTS})
PACKAGES = {"utils", "dataset", "models", "bench"}  # whose modules import each other
ALLOWED = {part: lower | ({part} if part in PACKAGES else set()) for part, lower in LOWER.items()}


def _part(path: Path) -> str:
    """The part of the code a file belongs to: its package, or its own name at the top."""
    relative = path.relative_to(ROOT)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _sources() -> list[Path]:
    """Every Python file of the code: at the top and in any folder but the tests."""
    return sorted(p for p in ROOT.glob("**/*.py") if not p.relative_to(ROOT).parts[0].startswith(("tests", ".")))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, top-level or inside functions; relative
    imports resolved against the file's package."""
    found = []
    package = path.relative_to(ROOT).parent.parts
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                modules = [f"{base}.{node.module}" if node.module else f"{base}.{alias.name}" for alias in node.names]
                found += [(node.lineno, module.lstrip(".")) for module in modules]
            else:
                found.append((node.lineno, node.module or ""))
    return found


def test_every_part_of_the_code_has_its_place():
    """A new package or top-level module needs its row in the rule."""
    assert {_part(path) for path in _sources()} <= set(ALLOWED)
    assert {_part(path) for path in _sources()} >= {"utils", "dataset", "models", "helper", "config", "band_prediction",
                                                    "run_state", *ENTRY_POINTS}


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    part = _part(path)
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}" for line, module in _imports(path)
             if ((target := module.split(".")[0]) in ALLOWED and target not in ALLOWED[part]) or target == "tests"]
    assert not wrong, f"{part} may import only {', '.join(sorted(ALLOWED[part])) or 'no other part'}: " + "; ".join(wrong)


def test_the_rule_itself():
    """The rule's intent, spelt out: no entry point is imported by any part, bench by nothing
    outside it, models and dataset not by each other, config and band_prediction not by helper
    nor by each other."""
    for entry in ENTRY_POINTS:
        assert {part for part, allowed in ALLOWED.items() if entry in allowed} <= ({entry} & PACKAGES)
    assert "models" not in ALLOWED["dataset"] and "dataset" not in ALLOWED["models"]
    assert not {"config", "band_prediction"} & ALLOWED["helper"]
    assert "config" not in ALLOWED["band_prediction"] and "band_prediction" not in ALLOWED["config"]
    assert ALLOWED["utils"] == {"utils"}
