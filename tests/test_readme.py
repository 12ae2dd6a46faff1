"""The README cannot drift: its command lines parse with the real CLI parser, and the files it names exist."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from lesionlab.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# paths inside the repository that the README may name (user paths such as DATA/ or study/runs are not checked)
REPO_PATH = re.compile(r"(?<![\w/.$-])((?:configs|docs|benchmarks|tests|lesionlab)/[\w./-]*[\w]|"
                       r"(?:Makefile|pyproject\.toml|requirements\.lock)\b)")


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)


def readme_commands(text: str = README) -> list[list[str]]:
    """Every `lesionlab ...` / `$L ...` command line of the README (code blocks and inline code), as argv lists."""
    lines = [ln for block in _code_blocks(text) for ln in block.splitlines()]
    # inline code that names a command with options (`lesionlab study` alone is a name, not a command line)
    lines += [c for c in re.findall(r"`((?:lesionlab|\$L) [^`]+)`", text) if " --" in c]
    out = []
    for ln in lines:
        ln = ln.strip()
        if "lesionlab.cli " in ln:  # torchrun ... -m lesionlab.cli train ...
            ln = "lesionlab " + ln.split("lesionlab.cli ", 1)[1]
        m = re.match(r"(?:\$L|lesionlab|\.venv/bin/lesionlab)\s+(.*)", ln)
        if not m:
            continue
        argv = shlex.split(m.group(1), comments=True)
        if argv:
            out.append(argv)
    return out


def layout_paths(text: str = README) -> list[str]:
    """The paths of the README's Layout tree (indented entries are children of the entry above them)."""
    section = text.split("## Layout", 1)[1]
    block = _code_blocks(section)[0]
    paths, parents = [], []  # parents: (indent, path) of the enclosing folders
    for ln in block.splitlines():
        if not ln.strip():
            continue
        indent = len(ln) - len(ln.lstrip())
        name = ln.split()[0]
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = (parents[-1][1] if parents else "") + name
        paths.append(path)
        if name.endswith("/"):
            parents.append((indent, path))
    return paths


def test_readme_has_commands_and_paths_to_check():
    cmds = readme_commands()
    assert len(cmds) >= 15 and {c[0] for c in cmds} >= {"validate", "split", "train", "study", "predict", "serve"}
    assert any("--fresh" in c for c in cmds)
    assert "configs/paper.yaml" in REPO_PATH.findall(README) and "lesionlab/workflows/study.py" in layout_paths()


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_parses(argv, capsys):
    parser, _ = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"README command `lesionlab {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()} ({e})")
    assert args.command == argv[0]


def _ignored_by_git(path: str) -> bool:
    r = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", path], capture_output=True)
    return r.returncode == 0  # 1: not ignored; 128: not a git checkout (nothing to say)


@pytest.mark.parametrize("path", sorted(set(REPO_PATH.findall(README)) | set(layout_paths())))
def test_readme_path_exists_in_a_clone(path):
    p = REPO / path
    assert p.exists(), f"README names {path}, which does not exist (or is a dangling link)"
    assert not _ignored_by_git(path), f"README names {path}, which git ignores: a fresh clone would lack it"


def test_readme_layout_covers_the_package_and_links_every_doc():
    """The other direction: nothing in the package goes unmentioned, and every results page is reachable."""
    listed = set(layout_paths())
    pkg = REPO / "lesionlab"
    entries = [f"lesionlab/{p.name}/" for p in pkg.iterdir() if p.is_dir() and not p.name.startswith("__")]
    entries += [f"lesionlab/{p.name}" for p in pkg.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    missing = sorted(e for e in entries if e not in listed)
    assert not missing, f"README's Layout section does not list {missing}"
    unlinked = sorted(d.name for d in (REPO / "docs").glob("*.md") if f"docs/{d.name}" not in README)
    assert not unlinked, f"README links no docs/{unlinked}"
