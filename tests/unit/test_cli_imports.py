"""The CLI loads only what a command needs (issue 8, item 5): the daemon starts without the
certification harness, the demo, the sinks or aiosmtpd."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

import kernel_driver
from kernel_driver.cli import LAZY_COMMANDS, main

# What `kernel-driver run` imports: the CLI, the command's own body (logs, worker), then exit.
RUN_IMPORTS = """
import json, sys
from kernel_driver.cli import main
try:
    main(["run", "--help"], standalone_mode=False)
except SystemExit:
    pass
import kernel_driver.logs, kernel_driver.worker
print(json.dumps(sorted(sys.modules)))
"""

NOT_FOR_THE_DAEMON = ("kernel_driver.certify", "kernel_driver.demo", "kernel_driver.testing.sinks",
                      "kernel_driver.testing.seed", "aiosmtpd")


def test_the_daemon_does_not_import_certification_demo_or_sinks() -> None:
    result = subprocess.run([sys.executable, "-c", RUN_IMPORTS], capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert "kernel_driver.worker" in loaded  # the probe did load the daemon
    unwanted = [name for name in loaded if name.startswith(NOT_FOR_THE_DAEMON)]
    assert unwanted == []


def test_lazy_commands_are_listed_and_resolve() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for name in LAZY_COMMANDS:
        assert f"  {name} " in result.output
        command = CliRunner().invoke(main, [name, "--help"])
        assert command.exit_code == 0, command.output
        assert "Usage:" in command.output


PACKAGE = Path(kernel_driver.__file__).parent
LEAVES = ("kernel_driver.errors", "kernel_driver.frozen", "kernel_driver.config")


def imported_modules(path: Path) -> set[str]:
    """Every kernel_driver module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("kernel_driver")}


def module_name(path: Path) -> str:
    return ".".join(("kernel_driver", *path.relative_to(PACKAGE).with_suffix("").parts))


def test_imports_go_one_way_nothing_imports_the_cli_and_the_leaves_import_nothing() -> None:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    importers_of_cli = sorted(
        name for name, path in files.items()
        if name not in ("kernel_driver.cli", "kernel_driver.__main__") and "kernel_driver.cli" in imported_modules(path)
    )
    assert importers_of_cli == []
    for leaf in LEAVES:
        assert imported_modules(files[leaf]) == set(), leaf
