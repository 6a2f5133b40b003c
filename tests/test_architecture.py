"""docs/ARCHITECTURE.md stays true: its stage list, the rooms' import rules, its registries."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.runtime.registry import STAGES

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "ARCHITECTURE.md").read_text()
COMMANDS = ("pipelines.pairs", "pipelines.recommend", "pipelines.nightly")


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def modules(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def test_the_stage_table_lists_every_stage_in_pipeline_order():
    listed = re.findall(r"^\| `([a-z_]+)` \|", DOC.split("## The rooms")[0], re.M)
    assert listed == [s.name for s in STAGES]


def test_binllm_core_never_imports_ray_pipelines_or_jobs():
    for path in modules("binllm_core"):
        bad = {m for m in imports_of(path) if m.split(".")[0] in ("ray", "pipelines", "jobs")}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_a_stage_imports_no_other_stage_and_no_command():
    for path in modules("pipelines/stages"):
        if path.name == "__init__.py":
            continue
        bad = {
            m
            for m in imports_of(path)
            if m.startswith("pipelines.stages") or m.startswith(COMMANDS)
        }
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_rendering_prompts_imports_no_torch():
    code = (
        "import sys\n"
        "import binllm_core.modes, binllm_core.prompts.render, binllm_core.prompts.aux_rows\n"
        "import binllm_core.prompts.user_pairs, binllm_core.prompts.token_lengths\n"
        "import binllm_core.prompts.ranking_groups\n"
        "import binllm_core.llm.backbone, pipelines.stages.render\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))[:3])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("root", ["binllm_core", "pipelines"])
def test_no_folder_holds_more_than_about_ten_modules(root):
    for folder in [REPO / root, *(p for p in (REPO / root).rglob("*") if p.is_dir())]:
        if folder.name == "__pycache__":
            continue
        count = len([p for p in folder.glob("*.py") if p.name != "__init__.py"])
        assert count <= 11, f"{folder.relative_to(REPO)} holds {count} modules"


def test_every_registry_the_page_names_is_there():
    named = re.findall(r"`([a-z_/]+)\.py::([A-Z_]+)`", DOC)
    assert len(named) >= 9
    for path, name in named:
        module = importlib.import_module(path.replace("/", "."))
        assert isinstance(getattr(module, name, None), (dict, tuple)), f"{path}.py::{name}"
