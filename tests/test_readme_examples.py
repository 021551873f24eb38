"""Every `llmexp` command in the README's bash blocks composes, and its `llmexp plan` lines plan as their comments say.

A command that needs a GPU, a cluster or the user's checkpoint cannot run here, but a
misspelled key, an option that was renamed or an override Hydra cannot parse is a README that
lies: those fail here. `llmexp cp` lines run (in a scratch directory), so the lines that use
the file they write compose from it.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import List, Tuple

import pytest
from hydra._internal.utils import get_args_parser

from llmexp.cli import main as cli
from llmexp.configuration.compose import CONFIG_NAME, compose_config, sweep_points
from llmexp.configuration.secrets import secrets_to_environment

REPO = Path(__file__).resolve().parents[1]
# Subcommands whose arguments are not overrides (paths of runs, servers): nothing to compose.
NOT_COMPOSED = ("serve", "report", "gather", "cancel", "plugins")


def readme_commands() -> List[Tuple[List[str], str]]:
    """Each `llmexp ...` line of the README's bash blocks (continuations joined): its arguments and its comment."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            args = shlex.split(line, comments=True)
            while args and re.match(r"^[A-Z_]+=", args[0]):  # VAR=value before the command
                args = args[1:]
            if args[:1] == ["llmexp"]:
                comment = line.split(" # ", 1)[1] if " # " in line else ""
                commands.append((args[1:], comment))
    return commands


def needs_example_plugin(argv: List[str]) -> bool:
    """A command of a worked plugin example (its technique, or its config folder) when that example is not installed."""
    import tomllib

    from llmexp.techniques.plugin_manager import techniques

    offered = {
        name for project in (REPO / "examples").glob("*/pyproject.toml")
        for name in tomllib.loads(project.read_text())["project"].get("entry-points", {}).get("llmexp", {})
    }
    chosen = {arg.split("=", 1)[1] for arg in argv if arg.startswith("technique=")}
    in_examples = any(arg.startswith("examples/") for arg in argv)
    return bool((chosen & offered) - set(techniques()) or in_examples and not offered <= set(techniques()))


def compose_command(argv: List[str]) -> None:
    """Compose every job of ``llmexp <argv>`` as the command would before running; a ``UserError`` if it cannot."""
    args = get_args_parser().parse_args(secrets_to_environment(argv))
    config_name, config_dir = args.config_name or CONFIG_NAME, args.config_dir
    points = sweep_points(args.overrides, config_name, config_dir) if args.multirun else [args.overrides]
    for overrides in points:
        compose_config(overrides, config_name, config_dir)


def test_the_readme_has_its_examples():
    assert len(readme_commands()) > 80


def test_every_readme_command_composes_and_its_plans_say_what_their_comments_say(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweeps").symlink_to(REPO / "sweeps")  # `--config-dir sweeps`, as from the repository root
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # plans say where the weights come from, without the network
    # secret-named overrides move into LLMEXP_SECRET_<n> variables: this process's, which later tests' runs inherit
    monkeypatch.setattr(os, "environ", os.environ.copy())
    failures = []
    for argv, comment in readme_commands():
        if argv[:1] == ["cp"]:
            if (tmp_path / argv[-1]).exists():
                continue  # the README shows the same cp twice
            with pytest.raises(SystemExit) as done:
                cli.main(argv)
            if done.value.code != 0:
                failures.append(f"llmexp {' '.join(argv)}: exit {done.value.code}: {capsys.readouterr().err}")
            continue
        if needs_example_plugin(argv):
            continue
        if argv[:1] == ["plan"]:
            from llmexp.cli import plan as plan_command
            expected = 2 if "refused" in comment else 0
            code = plan_command.main(argv[1:])
            if code != expected:
                failures.append(f"llmexp {' '.join(argv)}: plan exit {code}, not {expected}: {capsys.readouterr()}")
            continue
        if argv[:1] and argv[0] in NOT_COMPOSED or "--help" in argv:
            continue
        try:
            compose_command(argv)
        except Exception as error:  # noqa: BLE001  every failure is listed, not just the first
            failures.append(f"llmexp {' '.join(argv)}: {error}")
    capsys.readouterr()
    assert not failures, "\n".join(failures)
