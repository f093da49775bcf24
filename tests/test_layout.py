"""The architecture, enforced from the imports (docs/design.md).

Library packages take models, arrays and keyword arguments; only `run/` knows
ConfigDicts, work dirs and file names. Imports go one way:
nn, quant, data <- robust, train <- deploy <- run.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "brkeras")
# A package may import packages at its level or to its left, never to its right.
ORDER = ("nn", "quant", "data", "robust", "train", "deploy", "run")
SHARED = ("brkeras._keras", "brkeras.errors")  # usable from anywhere


def modules():
    out = []
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
                out.append((rel, path))
    return sorted(out)


def imports(path):
    """Every module name imported anywhere in the file (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "brkeras":  # from brkeras import data -> brkeras.data
                names.update(f"brkeras.{a.name}" for a in node.names)
    return names


def package_of(name):
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "brkeras" else None


def test_every_module_lives_in_a_package_of_the_layout():
    top = {rel for rel, _ in modules() if "/" not in rel}
    assert top == {"__init__.py", "_keras.py", "errors.py"}, top
    assert {rel.split("/")[0] for rel, _ in modules() if "/" in rel} == set(ORDER)


@pytest.mark.parametrize("rel,path", [m for m in modules() if "/" in m[0]])
def test_imports_flow_one_way(rel, path):
    pkg = rel.split("/")[0]
    names = imports(path)
    if pkg != "run":
        assert "ml_collections" not in names, f"{rel} imports ml_collections: only run/ may"
    for name in names:
        dep = package_of(name)
        if dep is None or name in SHARED or dep in ("_keras", "errors"):
            continue
        assert dep in ORDER, f"{rel} imports {name}, which is not in the layout"
        assert ORDER.index(dep) <= ORDER.index(pkg) or (
            {pkg, dep} <= {"nn", "quant", "data"} and dep != "run"), (
            f"{rel} (package {pkg}) imports {name} (package {dep}): imports go "
            f"{' <- '.join(ORDER)}")


def test_only_run_knows_work_dir_file_names():
    literals = ("config.json", "metrics.jsonl", "state.json", "eval.json", "export.json",
                "bench.json", "summary.json")
    for rel, path in modules():
        if rel.startswith("run/"):
            continue
        src = open(path).read()
        code = [n.value for n in ast.walk(ast.parse(src))
                if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        hits = [s for s in code if s in literals]
        assert not hits, f"{rel} names work-dir files {hits}; only run/workdir.py defines them"


def test_run_file_names_are_defined_once():
    """Outside run/workdir.py no run module spells a stage output's file name."""
    literals = ("eval.json", "export.json", "bench.json", "summary.json", "summary.md",
                "report.md", "state.json", "metrics.jsonl", "config.json")
    for rel, path in modules():
        if not rel.startswith("run/") or rel == "run/workdir.py":
            continue
        consts = [n.value for n in ast.walk(ast.parse(open(path).read()))
                  if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        assert not [c for c in consts if c in literals], rel


def test_config_name_lists_match_the_registries():
    """run/config.py keeps the names light (no TensorFlow import for --help); they
    must equal the registries they mirror."""
    from brkeras.quant import binary_relax, group_sparsity
    from brkeras.robust import evaluation, losses
    from brkeras.run import config as config_lib
    from brkeras.train import distribute
    assert set(config_lib.PRECISIONS) == set(binary_relax.PRECISIONS)
    assert tuple(config_lib.LOSSES) == tuple(losses.NAMES)
    assert tuple(config_lib.STRATEGIES) == tuple(distribute.STRATEGIES)
    assert tuple(config_lib.SPARSITY_PENALTIES) == tuple(group_sparsity.PENALTIES)
    assert tuple(config_lib.SPARSITY_COSTS) == tuple(group_sparsity.COST_MEASURES)
    assert tuple(config_lib.BR_PRECISIONS) == tuple(binary_relax.BR_PRECISIONS)
    assert set(config_lib.base_config().eval.attacks) <= set(evaluation.ATTACKS)
