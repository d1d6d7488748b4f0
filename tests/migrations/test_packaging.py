"""The SQL ships inside the wheel and is loaded from the installed package; a checkout (an
editable install has no packaged copy) falls back to its own sql/ directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kernel_driver import migrate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the project installed from its wheel, and nothing else."""
    wheels = tmp_path_factory.mktemp("wheels")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(REPO)], check=True)
    (wheel,) = wheels.glob("kernel_driver-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for path in sorted((REPO / "sql" / "migrations").glob("*.sql")):
        assert f"kernel_driver/sql/migrations/{path.name}" in names
    target = tmp_path_factory.mktemp("site")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    return target


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
