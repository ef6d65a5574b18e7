"""Every code block of the README and docs/ runs, and every relative link resolves.

- ``python``: run (in a subprocess, in the page's scratch folder); a block whose first line is
  ``# some/path.py`` is written to that file instead (a module the next blocks use).
- ``yaml``: checked as a training config (``seg-accel print-config`` validates it): a block
  whose first line names an existing config must equal that file; one naming a new file is
  written there; a fragment is checked on top of a small config, or of the config named in
  its first line ``# on top of PATH``.
- ``bash``: each command runs in the scratch folder, which holds ``configs/`` and the demo
  trained for a few iterations in ``work_dirs/segformer_synthetic``; the Hub page gets the
  local Hub server.
- ``text``: program output or a command synopsis (a runnable-looking command is an error).
The README's two commands at its top are run by test_repo.py (the tests) and the slow demo
test (the demo); here they are only recognised.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import CAMVID, REPO, script_env, tiny_config, write_yaml

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([A-Za-z]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
COMMAND_WORDS = {"seg-accel", "python", "accelerate", "bash", "pip", "sbatch", "pytest", "torchrun", "git", "hf"}
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_0-9]{2,}\b")  # CONFIG, WORK_DIR: a synopsis, not a command to run
FILE_LINE = re.compile(r"^# ([\w./-]+\.(?:py|yaml))\s*$")
ON_TOP = re.compile(r"^# on top of (\S+)")


@dataclass
class Block:
    page: Path
    lang: str
    text: str
    line: int

    def __str__(self) -> str:
        page = self.page.relative_to(REPO) if self.page.is_relative_to(REPO) else self.page
        return f"{page}:{self.line} ({self.lang})"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [Block(page, m.group(1), m.group(2), text[:m.start()].count("\n") + 1) for m in FENCE.finditer(text)]


def readme_commands() -> tuple[str, str]:
    """The demo command and the test command (the first line of .ci/run's test step)."""
    ci = next(line for line in (REPO / ".ci/run").read_text().splitlines() if line.startswith("bash scripts/setup.sh"))
    return ("bash scripts/setup.sh && .venv/bin/accelerate launch --config_file accelerate_config.yaml "
            "scripts/train.py configs/demo/segformer_synthetic.yaml", ci.strip())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The demo trained for 4 iterations: work_dirs/segformer_synthetic for the pages' commands."""
    root = tmp_path_factory.mktemp("demo")
    work = root / "work_dirs" / "segformer_synthetic"
    proc = subprocess.run([sys.executable, "-m", "seg_accel", "train", "demo/segformer_synthetic", "--work-dir",
                           str(work), "--cfg-options", "runner.max_iters=4", "data.val.num_samples=8",
                           "log_config.interval=2"], cwd=root, env=script_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def scratch_for(page: Path, tmp_path: Path, demo_run: Path) -> Path:
    scratch = tmp_path / "run"
    scratch.mkdir()
    (scratch / "configs").symlink_to(REPO / "configs")
    if CAMVID.is_dir():  # the CamVid configs read data/camvid from where they are run
        (scratch / "data").mkdir()
        (scratch / "data" / "camvid").symlink_to(CAMVID)
    shutil.copytree(demo_run, scratch / "work_dirs" / "segformer_synthetic")
    write_yaml(scratch / "tiny.yaml", tiny_config())
    return scratch


def run(command: list[str] | str, cwd: Path, block: Block, **kwargs) -> None:
    env = script_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if "HF_ENDPOINT" in os.environ:  # the Hub page: the local server
        env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{block} failed:\n{block.text}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def check_yaml(block: Block, scratch: Path) -> None:
    lines = block.text.splitlines()
    data = yaml.safe_load(block.text)
    named = FILE_LINE.match(lines[0]) if lines else None
    on_top = ON_TOP.match(lines[0]) if lines else None
    if named and (REPO / named.group(1)).is_file():  # shows a file of the repository: it must be that file
        assert data == yaml.safe_load((REPO / named.group(1)).read_text()), f"{block} differs from {named.group(1)}"
        path = REPO / named.group(1)
    elif named:  # a file the reader writes
        path = scratch / named.group(1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.text)
    else:
        base = REPO / on_top.group(1) if on_top else scratch / "tiny.yaml"
        assert base.is_file(), f"{block}: no config {base}"
        path = scratch / f"fragment_{block.line}.yaml"
        path.write_text(yaml.safe_dump({"_base_": str(base), **data}, sort_keys=False))
    run([sys.executable, "-m", "seg_accel", "print-config", str(path)], scratch, block)


def check_text(block: Block) -> None:
    for line in block.text.splitlines():
        words = line.split()
        runnable = words and (words[0] in COMMAND_WORDS or words[0] in ("from", "import"))
        assert not runnable or PLACEHOLDER.search(line), \
            f"{block}: '{line}' looks like code to run; use a python/bash block (it is then tested) or a synopsis"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_code_block_runs(page, tmp_path, demo_run, request):
    if page.name == "hub.md":
        request.getfixturevalue("hub_server")
    scratch = scratch_for(page, tmp_path, demo_run)
    found = blocks(page)
    if page.name == "README.md":  # the top two: run by test_repo.py and the slow demo test
        assert [b.text.strip() for b in found[:2]] == list(readme_commands())
        found = found[2:]
    for block in found:
        first = block.text.splitlines()[0] if block.text.strip() else ""
        if block.lang == "python":
            named = FILE_LINE.match(first)
            if named:
                path = scratch / named.group(1)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(block.text)
            else:
                (scratch / "block.py").write_text(block.text)
                run([sys.executable, "block.py"], scratch, block)
        elif block.lang == "yaml":
            check_yaml(block, scratch)
        elif block.lang == "bash":
            if "configs/camvid" in block.text and not CAMVID.is_dir():
                continue  # needs ../shared/data/camvid (absent here), linked as data/camvid
            run(["bash", "-e", "-c", block.text], scratch, block)
        elif block.lang == "text":
            check_text(block)
        else:
            pytest.fail(f"{block}: a code block is python, yaml, bash or text (output), got {block.lang!r}")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_links():
    broken = []
    for page in PAGES:
        text = FENCE.sub("", page.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no {file})")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{page.relative_to(REPO)}: {target} (no heading #{anchor})")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_index_and_the_readme():
    index = (REPO / "docs" / "index.md").read_text()
    readme = (REPO / "README.md").read_text()
    for page in (REPO / "docs").glob("*.md"):
        if page.name != "index.md":
            assert f"({page.name})" in index and f"(docs/{page.name})" in readme, page.name


def test_the_checks_catch_a_broken_block(tmp_path):
    """The harness is not a no-op: a failing command and a runnable line in a text block fail it."""
    page = tmp_path / "page.md"
    page.write_text("```bash\nfalse\n```\n\n```text\nseg-accel train configs/demo/segformer_synthetic.yaml\n```\n")
    bash, text = blocks(page)
    with pytest.raises(AssertionError):
        run(["bash", "-e", "-c", bash.text], tmp_path, bash)
    with pytest.raises(AssertionError):
        check_text(text)
    check_text(Block(page, "text", "seg-accel train CONFIG [--work-dir DIR]", 1))  # a synopsis is fine
