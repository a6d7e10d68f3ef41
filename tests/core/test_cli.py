import subprocess
import sys

from dynprune.cli import COMMANDS, main


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_an_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_console_script_runs():
    res = subprocess.run(
        [sys.executable, "-m", "dynprune.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert res.stdout.startswith("dynprune ")


def test_every_command_has_help(capsys):
    for name in COMMANDS:
        try:
            code = main([name, "--help"])
        except SystemExit as exc:  # argparse-based commands exit after printing help
            code = exc.code
        assert code == 0, name
