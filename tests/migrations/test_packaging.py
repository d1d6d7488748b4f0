"""The SQL ships inside the wheel and is loaded from the installed package; a checkout (an
editable install has no packaged copy) falls back to its own sql/ directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kernel_driver import migrate

REPO = Path(__file__).resolve().parents[2]


PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run([*PIP, "wheel", "--no-deps", "-w", str(wheels), str(REPO)], check=True)
    (built,) = wheels.glob("kernel_driver-*.whl")
    names = zipfile.ZipFile(built).namelist()
    for path in sorted((REPO / "sql" / "migrations").glob("*.sql")):
        assert f"kernel_driver/sql/migrations/{path.name}" in names
    return built


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the project installed from its wheel, and nothing else."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([*PIP, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    return target


@pytest.fixture(scope="module")
def plain_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel and its dependencies, without the testing extra."""
    venv = tmp_path_factory.mktemp("plain") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q",
                    "install", str(wheel)], check=True, timeout=600)
    return venv / "bin"


def run_installed(site: Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python with the installed copy first on the path, away from the checkout."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=site.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_installed_package_loads_its_own_sql(site: Path) -> None:
    code = (
        "import json, kernel_driver\n"
        "from kernel_driver import migrate\n"
        "print(json.dumps([kernel_driver.__file__, str(migrate.sql_root()),"
        " [[m.name, m.sha256] for m in migrate.load_migrations()]]))"
    )
    result = run_installed(site, code)
    assert result.returncode == 0, result.stderr
    module, root, files = json.loads(result.stdout)

    assert Path(module).is_relative_to(site)
    assert Path(root) == site / "kernel_driver" / "sql"
    checkout = migrate.load_migrations(REPO / "sql")
    assert files == [[m.name, m.sha256] for m in checkout]


def test_installed_package_migrates(site: Path, empty_db_dsn: str, kernel_schema: str) -> None:
    code = "from kernel_driver.cli import main; main(prog_name='kernel-driver')"
    args = ("--dsn", empty_db_dsn, "--schema", kernel_schema, "migrate")
    result = run_installed(site, code, *args)
    assert result.returncode == 0, result.stderr
    first = migrate.load_migrations(REPO / "sql")[0]
    assert f"applied {first.name}" in result.stdout


def test_checkout_falls_back_to_its_sql_directory() -> None:
    if (Path(migrate.__file__).parent / "sql").is_dir():
        pytest.skip("kernel_driver is installed from a wheel here, not from the checkout")
    assert migrate.sql_root() == REPO / "sql"
    assert migrate.load_migrations() == migrate.load_migrations(REPO / "sql")


def kernel_driver_in(bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_dir / "kernel-driver"), *args], capture_output=True, text=True, timeout=120,
                          cwd=bin_dir)


def test_a_plain_install_runs_the_kernel_without_the_testing_libraries(
    plain_venv: Path, empty_db_dsn: str, kernel_schema: str
) -> None:
    for library in ("aiosmtpd", "pgserver"):
        probe = subprocess.run([str(plain_venv / "python"), "-c", f"import {library}"], capture_output=True)
        assert probe.returncode != 0, f"{library} came with a plain install"
    where = ("--dsn", empty_db_dsn, "--schema", kernel_schema)
    for args in (("migrate",), ("migrate", "--status"), ("run", "--until-idle", "--poll-interval", "0.05"),
                 ("runs", "list"), ("freeze", "--help")):
        result = kernel_driver_in(plain_venv, *where, *args)
        assert result.returncode == 0, (args, result.stderr)
    listing = kernel_driver_in(plain_venv, "--help")
    assert listing.returncode == 0 and re.search(r"certify +\(needs kernel-driver\[testing\]\)", listing.stdout)
    for command in ("certify", "demo"):
        refused = kernel_driver_in(plain_venv, *where, command)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith(f"error: kernel-driver {command} needs aiosmtpd")
        assert "pip install 'kernel-driver[testing]'" in refused.stderr
