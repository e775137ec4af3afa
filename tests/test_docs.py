"""The README's and the docs' code must work as written: every ```python block runs (in a fresh
namespace, on this machine's device), every command line in a ```bash block names something that
exists (`python -m fastres ...` lines are parsed by the CLI's own parser, without running them),
and every relative link points at a file (and heading) that exists."""
import re
import shlex
from pathlib import Path

import pytest

from fastres.tools.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _blocks(lang: str):
    """(page, index, code) for every ```lang block of every page."""
    for page in PAGES:
        found = re.findall(r"```(\w+)\n(.*?)```", page.read_text(), flags=re.S)
        for i, code in enumerate(code for block_lang, code in found if block_lang == lang):
            yield pytest.param(page, code, id=f"{_name(page)}-{lang}{i}")


@pytest.mark.parametrize("page, code", list(_blocks("python")))
def test_python_block_runs(page, code, monkeypatch):
    # The folded torch path on the CPU: the README's models are full-size (the kernels
    # themselves are tested elsewhere; through the interpreter these would take minutes).
    monkeypatch.setenv("FASTRES_BACKEND", "torch")
    exec(compile(code, _name(page), "exec"), {"__name__": "__readme__"})


def _commands(block: str):
    """The command lines of a bash block: comments dropped, continuations joined, && split."""
    text = re.sub(r"\\\n", " ", block)
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        for cmd in filter(None, (c.strip() for c in line.split("&&"))):
            yield shlex.split(cmd)


OTHER_COMMANDS = {("pip", "install"), ("python", "-c"), ("python", "-m", "pytest")}


@pytest.mark.parametrize("page, block", list(_blocks("bash")))
def test_bash_block_commands_exist(page, block):
    parser = build_parser()
    for argv in _commands(block):
        if argv[0].endswith("python") and argv[1:3] == ["-m", "fastres"]:
            parser.parse_args(argv[3:])  # exits (SystemExit) on an unknown option
        elif argv[0] == "bash":
            assert (ROOT / argv[1]).is_file(), argv
            if argv[1] == "dev.sh":
                assert argv[2] in ("demo", "test"), argv
        else:
            name = (Path(argv[0]).name,) + tuple(argv[1:3])
            assert any(name[:len(known)] == known for known in OTHER_COMMANDS), argv


def _anchors(page: Path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no headings in code
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue  # a web address: not checked offline
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.is_file(), f"{_name(page)}: {target} does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{_name(page)}: no heading for {target}"
