"""The documentation cannot go stale: every ``cm-policy`` command that the README and the pages
under docs/ show is read by the real command line (unknown commands, config groups, keys, options
or data sources fail, nothing is run), and every figure of the README's results table is found in
a result file its row links to."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from cm_policy.cli import UsageError, check_command

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]
SHELL_FENCES = ("bash", "sh", "shell", "console")
# A word that stands for a value the reader chooses (PATH, SOURCE, IN.hdf5, N, ...).
PLACEHOLDER = re.compile(r"(^|[=/,])[A-Z][A-Z0-9_]*(\.[a-z]+)?($|[/,.])|\.\.\.|\[|\]|<|>|\|")
REFUSED = (UsageError, HydraException, OmegaConfBaseException, ValueError, SystemExit)


def shell_lines(text: str) -> list[str]:
    """The lines of the page's shell code blocks, continuation lines joined."""
    lines, fence = [], None
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip().lower()
            continue
        if fence in SHELL_FENCES:
            if lines and lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1] + " " + stripped
            else:
                lines.append(stripped)
    return lines


def commands_in(line: str) -> list[list[str]]:
    """The ``cm-policy`` command lines (arguments after the program) in one shell line."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as exc:  # an unbalanced quote: the page shows a line no shell runs
        raise AssertionError(f"not a shell line ({exc}): {line}") from None
    found, current = [], None
    for token in [*tokens, "&&"]:
        if token in ("&&", "||", ";", "|"):
            if current is not None:
                found.append(current)
            current = None
        elif current is not None:
            current.append(token)
        elif token == "cm-policy" or token.endswith("/cm-policy"):
            current = []
    return found


def inline_commands(text: str) -> list[str]:
    """``cm-policy ...`` in inline code of the prose (outside code blocks)."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return [m for m in re.findall(r"`(cm-policy [^`]+)`", prose)]


def documented() -> list[tuple[str, list[str], bool]]:
    """(where, argv, runnable) of every command the pages show: a line of a shell block is
    runnable, a mention in the prose names a command (and may stop after its name)."""
    out = []
    for page in PAGES:
        text = page.read_text()
        name = page.relative_to(REPO)
        for line in shell_lines(text):
            out += [(f"{name}: {line}", argv, True) for argv in commands_in(line)]
        for span in inline_commands(text):
            out += [(f"{name}: `{span}`", argv, False) for argv in commands_in(span)]
    return out


def check_names(argv: list[str]) -> None:
    """The command, data command and data source or task a line names exist (the rest of the
    line may be placeholders)."""
    from cm_policy.cli import COMMANDS, DATA_COMMANDS, check_name

    debug = argv[:1] == ["--debug"]  # cm-policy --debug COMMAND ...
    words = [a for a in argv[int(debug) :] if not PLACEHOLDER.search(a)]
    if (debug and not words) or words[:1] in (["-h"], ["--help"]):
        return
    if not words or words[0] not in COMMANDS:
        raise UsageError(f"no command {argv[:1]}")
    if words[0] == "data" and len(words) > 1:
        if words[1] not in ("info", "verify", *DATA_COMMANDS):
            raise UsageError(f"no data command {words[1]!r}")
        if words[1] in DATA_COMMANDS and len(words) > 2 and "=" not in words[2]:
            check_name(words[1], words[2])


def with_example_task_file(argv: list[str], tmp_path: Path) -> list[str]:
    """A ``task=PATH.yaml`` whose file does not exist here (a user's buffer) stands for a
    task file as a conversion writes it: the command's other arguments are checked on it."""
    out = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "task" and value.endswith((".yaml", ".yml")) and not (REPO / value).exists():
            example = tmp_path / "example.zarr" / "task.yaml"
            example.parent.mkdir(exist_ok=True)
            example.write_text(
                "name: example\nenv: dataset\ndataset_path: .\ncontrol_hz: 15\naction_dim: 2\n"
                "low_dim:\n  observation_state: 6\nimage_keys: []\n"
            )
            arg = f"task={example}"
        out.append(arg)
    return out


def test_every_documented_command_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each command of a shell block read by ``check_command``; a command with a placeholder
    (PATH, SOURCE, [options], ...) or one mentioned in the prose: the names it uses."""
    monkeypatch.chdir(REPO)  # relative paths (eval/plans/...) as a reader runs them
    commands = documented()
    pages_with_commands = {where.split(":")[0] for where, _, _ in commands}
    assert len(commands) >= 40, f"only {len(commands)} commands found: is the extractor broken?"
    assert "README.md" in pages_with_commands
    assert len(pages_with_commands) >= 4, pages_with_commands
    failures = []
    for where, argv, runnable in commands:
        try:
            if runnable and not any(PLACEHOLDER.search(a) for a in argv):
                check_command(with_example_task_file(argv, tmp_path))
            else:
                check_names(argv)
        except REFUSED as exc:
            failures.append(f"{where}\n    -> {type(exc).__name__}: {exc}")
    assert not failures, "documented commands that do not parse:\n" + "\n".join(failures)


@pytest.mark.parametrize(
    "argv",
    [
        ["trian"],
        ["train", "task=nosuch"],
        ["train", "training.nosuch=1"],
        ["train", "method=isd", "model.crop_size=84"],
        ["eval", "checkpoint=runs/x", "n_episode=50"],
        ["serve", "checkpoint=runs/x", "prot=8765"],
        ["export", "checkpoint=runs/x", "out=p.onnx", "opset=x", "exporterr=dynamo"],
        ["run", "training.stepz=10"],
        ["data", "convert", "nosuch", "a", "b.zarr"],
        ["data", "convert", "lerobot", "a", "b.zarr", "resise=96,96"],
        ["data", "convert", "lerobot", "b.zarr"],
        ["data", "generate", "pusht", "n_episode=10"],
        ["data", "info"],
        ["campaign", "eval/plans/pusht_long.yaml", "--job", "2"],
        ["campaign", "eval/plans/pusht_long.yaml", "--runs", "nosuch"],
        ["campaign", "eval/plans/pusht_long.yaml", "--set", "markz_min=[60]"],
        ["campaign", "eval/plans/nosuch.yaml"],
    ],
)
def test_a_wrong_command_is_refused_by_the_check(argv: list[str], monkeypatch):
    """The check fails where the command would: each mistake a page could hold."""
    monkeypatch.chdir(REPO)
    with pytest.raises((*REFUSED, FileNotFoundError)):
        check_command(argv)


def test_the_extractor_finds_commands_in_every_form():
    """Blocks with prompts of several commands, continuation lines, comments, env prefixes and
    the venv's path; inline code in prose."""
    text = (
        "Run `cm-policy eval checkpoint=runs/a` first.\n\n```bash\n"
        "# a comment: cm-policy nothing\n"
        "CM_POLICY_DEBUG=1 cm-policy train task=pusht_state \\\n    training.steps=5  # fast\n"
        "python3 -m venv .venv && .venv/bin/cm-policy run && echo done\n"
        "```\n\n```python\ncm-policy not_a_shell_block\n```\n"
    )
    lines = shell_lines(text)
    assert [argv for line in lines for argv in commands_in(line)] == [
        ["train", "task=pusht_state", "training.steps=5"],
        ["run"],
    ]
    assert inline_commands(text) == ["cm-policy eval checkpoint=runs/a"]


# --- the README's results table ------------------------------------------------------------------
NUMBER = re.compile(r"(?<![\w.])\d+\.\d+(?!\.?\d)")
LINK = re.compile(r"\[([^\]]*)\]\(([^)]+)\)")


def results_rows() -> list[str]:
    """The rows of the README's results table (the table under '## Results')."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [r for r in rows[2:] if not set(r) <= set("|-: ")]


def test_readme_figures_are_those_of_the_files_they_cite():
    """Each number of a results row (0.942, 3.64 ms, ...) appears in a file that row links to,
    so a new result cannot leave an old figure behind."""
    rows = results_rows()
    assert len(rows) >= 5, "the README's results table is missing"
    problems = []
    for row in rows:
        links = [target for _, target in LINK.findall(row)]
        files = [REPO / target.split("#")[0] for target in links if "://" not in target]
        if not files:
            problems.append(f"cites no result file: {row[:80]}")
            continue
        missing = [f for f in files if not f.is_file()]
        if missing:
            problems.append(f"links missing files {missing}: {row[:80]}")
            continue
        cited = "\n".join(f.read_text() for f in files)
        shown = LINK.sub(lambda m: m.group(1), row)  # numbers of the link texts too, not paths
        for number in NUMBER.findall(shown):
            if not re.search(rf"(?<![\d.]){re.escape(number)}(?!\d)", cited):
                problems.append(
                    f"{number} is in none of {[str(f.name) for f in files]}: {row[:80]}"
                )
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_page():
    """At most ~150 lines, no table cell over ~80 characters; the headline, own data and
    deployment reachable from it."""
    text = (REPO / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines"
    rows = [LINK.sub(lambda m: m.group(1), line) for line in lines if line.startswith("|")]
    cells = [c.strip() for row in rows for c in row.split("|")]  # as shown: link texts
    widest = max(cells, key=len, default="")
    assert len(widest) <= 80, f"a {len(widest)}-character table cell: {widest}"
    for page in ("docs/data.md", "docs/deployment.md", "docs/results.md"):
        assert f"]({page}" in text, f"the README does not link {page}"
