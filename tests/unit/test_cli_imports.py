"""The CLI loads only what a command needs (issue 8, item 5): the daemon starts without the
certification harness, the demo, the sinks or aiosmtpd."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

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

NOT_FOR_THE_DAEMON = ("kernel_driver.certify", "kernel_driver.demo", "kernel_driver.sinks", "kernel_driver.seed",
                      "aiosmtpd")


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
