"""README.md's code must work as written: every ```python block runs (in a fresh namespace, on
this machine's device), and every command line in a ```bash block names something that exists
(`python -m fastres ...` lines are parsed by the CLI's own parser, without running them)."""
import re
import shlex
from pathlib import Path

import pytest

from fastres.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
BASH = [code for lang, code in BLOCKS if lang == "bash"]


@pytest.mark.parametrize("code", PYTHON, ids=[f"python{i}" for i in range(len(PYTHON))])
def test_python_block_runs(code, monkeypatch):
    # The folded torch path on the CPU: the README's models are full-size (the kernels
    # themselves are tested elsewhere; through the interpreter these would take minutes).
    monkeypatch.setenv("FASTRES_BACKEND", "torch")
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


def _commands(block: str):
    """The command lines of a bash block: comments dropped, continuations joined, && split."""
    text = re.sub(r"\\\n", " ", block)
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        for cmd in filter(None, (c.strip() for c in line.split("&&"))):
            yield shlex.split(cmd)


OTHER_COMMANDS = {("pip", "install"), ("python", "-c"), ("python", "-m", "pytest")}


@pytest.mark.parametrize("block", BASH, ids=[f"bash{i}" for i in range(len(BASH))])
def test_bash_block_commands_exist(block):
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
