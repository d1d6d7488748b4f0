"""The freeze gate on a small kernel tree in tmp_path: what passes, what fails and what it says.

The evidence files are made in the format `kernel-driver certify` writes (its own
frozen_file_digests and CHECK_IDS); running the real harness is certify's own tests' business.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result

import kernel_driver
from kernel_driver import certify, freeze
from kernel_driver.errors import ExitCode

Cli = Callable[..., Result]

MIGRATION = """\
CREATE TABLE kernel.probe (id integer);

CREATE FUNCTION kernel.kernel_version() RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT '{version}'::text
$$;
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A checkout holding the frozen files (small stand-ins) and a 1.0.0 kernel."""
    root = tmp_path / "checkout"
    (root / "sql" / "migrations").mkdir(parents=True)
    (root / "sql" / "migrations" / "0001_kernel.sql").write_text(MIGRATION.format(version="1.0.0"))
    for name in freeze.FROZEN_PATHS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {name}\n")
    return root


def write_evidence(root: Path, version: str, failed: tuple[str, ...] = (), only: tuple[str, ...] = certify.CHECK_IDS,
                   path: Path | None = None) -> Path:
    """Evidence as `kernel-driver certify` writes it, for the tree as it is now."""
    path = path or root / freeze.evidence_path(version)
    path.parent.mkdir(parents=True, exist_ok=True)
    checks = [{"id": check, "status": "FAIL" if check in failed else "PASS"} for check in only]
    path.write_text(json.dumps({
        "kernel_version": version,
        "frozen_files": certify.frozen_file_digests(root),
        "checks": checks,
    }))
    return path


def frozen(cli: Cli, root: Path, version: str = "1.0.0") -> Path:
    """Certify and freeze the tree as it is."""
    write_evidence(root, version)
    result = cli("freeze", "update", "--root", str(root))
    assert result.exit_code == 0, result.output
    return root


def bump(root: Path, version: str, slug: str = "next") -> Path:
    migrations = root / "sql" / "migrations"
    migration = migrations / f"{len(list(migrations.glob('*.sql'))) + 1:04d}_{slug}.sql"
    migration.write_text(MIGRATION.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION").format(version=version))
    return migration


def sha(path: Path) -> str:
    return freeze.frozen_hashes(path.parents[1])[f"kernel_driver/{path.name}"] or ""


def test_first_freeze_then_check_passes(cli: Cli, tree: Path) -> None:
    frozen(cli, tree)

    manifest = json.loads((tree / "freeze" / "manifest.json").read_text())
    assert manifest["kernel_version"] == "1.0.0"
    assert manifest["evidence"] == "evidence/1.0.0.json"
    assert list(manifest["files"]) == ["sql/migrations/0001_kernel.sql", *freeze.FROZEN_PATHS]
    result = cli("freeze", "check", "--root", str(tree))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"kernel 1.0.0 is frozen: {len(manifest['files'])} files match freeze/manifest.json, " \
                            "certified by evidence/1.0.0.json\n"


def test_changed_frozen_file_fails_saying_what_and_how(cli: Cli, tree: Path) -> None:
    frozen(cli, tree)
    worker = tree / "kernel_driver" / "worker.py"
    before = sha(worker)
    worker.write_text("# a quick fix\n")

    result = cli("freeze", "check", "--root", str(tree))

    assert result.exit_code == ExitCode.FAILED
    report = result.stderr
    assert f"changed kernel_driver/worker.py\n          manifest {before}\n          now      {sha(worker)}" in report
    assert "kernel_version() is still 1.0.0: changed frozen files need a new version" in report
    for step in ("new migration", "kernel-driver certify --out evidence/<new version>.json",
                 "kernel-driver freeze update", "[KERNEL]"):
        assert step in report
    assert report.splitlines()[-1] == (
        "error: the kernel freeze is broken: 1 frozen file(s) differ from freeze/manifest.json; "
        "1 problem(s) with the version or its evidence"
    )


def test_new_migration_is_a_frozen_change(cli: Cli, tree: Path) -> None:
    frozen(cli, tree)
    bump(tree, "1.1.0")

    result = cli("freeze", "check", "--root", str(tree))

    assert result.exit_code == ExitCode.FAILED
    assert "added   sql/migrations/0002_next.sql\n          manifest None" in result.stderr
    assert "the migrations define kernel_version() 1.1.0, freeze/manifest.json freezes 1.0.0" in result.stderr


def test_update_refuses_a_change_without_a_version_bump(cli: Cli, tree: Path) -> None:
    frozen(cli, tree)
    (tree / "docs" / "EXECUTION_CONTRACT.md").write_text("a weaker contract\n")
    write_evidence(tree, "1.0.0")  # even a clean certification of the change

    result = cli("freeze", "update", "--root", str(tree))

    assert result.exit_code == ExitCode.FAILED
    assert result.stderr == (
        "error: frozen files changed but kernel_version() is 1.0.0 and freeze/manifest.json already "
        "freezes 1.0.0: bump the version in a new migration\n"
    )


def test_bumped_and_certified_change_is_frozen(cli: Cli, tree: Path) -> None:
    frozen(cli, tree)
    (tree / "kernel_driver" / "queries.py").write_text("# calls claim_queued_jobs_v2\n")
    bump(tree, "1.1.0")
    assert cli("freeze", "check", "--root", str(tree)).exit_code == ExitCode.FAILED

    frozen(cli, tree, "1.1.0")

    assert json.loads((tree / "freeze" / "manifest.json").read_text())["kernel_version"] == "1.1.0"
    assert cli("freeze", "check", "--root", str(tree)).exit_code == 0
    assert (tree / "evidence" / "1.0.0.json").exists(), "the old version's evidence stays"


@pytest.mark.parametrize("evidence, reason", [
    ({"failed": ("Q3",)}, "check Q3 is FAIL, not PASS"),
    ({"only": ("Q1", "E1")}, "check Q2 is not run, not PASS"),
])
def test_update_refuses_evidence_that_did_not_pass(cli: Cli, tree: Path, evidence: dict, reason: str) -> None:
    write_evidence(tree, "1.0.0", **evidence)

    result = cli("freeze", "update", "--root", str(tree))

    assert result.exit_code == ExitCode.FAILED
    assert reason in result.stderr
    assert not (tree / "freeze" / "manifest.json").exists()


def test_update_refuses_evidence_of_other_files(cli: Cli, tree: Path) -> None:
    write_evidence(tree, "1.0.0")
    worker = tree / "kernel_driver" / "worker.py"
    certified = sha(worker)
    worker.write_text("# changed after certification\n")

    result = cli("freeze", "update", "--root", str(tree))

    assert result.exit_code == ExitCode.FAILED
    assert f"was certified with kernel_driver/worker.py at sha256 {certified}, not {sha(worker)}" in result.stderr


def test_evidence_from_elsewhere_is_copied_into_place(cli: Cli, tree: Path, tmp_path: Path) -> None:
    outside = write_evidence(tree, "1.0.0", path=tmp_path / "staging-evidence.json")

    result = cli("freeze", "update", "--root", str(tree), "--evidence", str(outside))

    assert result.exit_code == 0, result.output
    assert (tree / "evidence" / "1.0.0.json").read_bytes() == outside.read_bytes()
    assert cli("freeze", "check", "--root", str(tree)).exit_code == 0
    again = cli("freeze", "update", "--root", str(tree))
    assert again.stdout.startswith("already frozen: kernel 1.0.0")


@pytest.mark.parametrize("spoil, reason", [
    (lambda path: path.unlink(), "no evidence for kernel 1.0.0"),
    (lambda path: path.write_text(path.read_text().replace('"PASS"', '"FAIL"', 1)), "check Q1 is FAIL"),
])
def test_gate_fails_without_passing_evidence(
    cli: Cli, tree: Path, spoil: Callable[[Path], object], reason: str
) -> None:
    frozen(cli, tree)
    spoil(tree / "evidence" / "1.0.0.json")

    result = cli("freeze", "check", "--root", str(tree))

    assert result.exit_code == ExitCode.FAILED
    assert reason in result.stderr


def test_no_manifest_yet(cli: Cli, tree: Path) -> None:
    result = cli("freeze", "check", "--root", str(tree))

    assert result.exit_code == ExitCode.FAILED
    assert "there is no freeze/manifest.json yet: run make freeze" in result.stderr


@pytest.mark.parametrize("command", ["check", "update", "version"])
def test_not_a_checkout_is_one_error_line(cli: Cli, tmp_path: Path, command: str) -> None:
    result = cli("freeze", command, "--root", str(tmp_path))

    assert result.exit_code == 2
    assert result.stderr == f"error: {tmp_path} is not a kernel checkout: it has no sql/migrations/\n"


def test_unreadable_manifest_is_one_error_line(cli: Cli, tree: Path) -> None:
    (tree / "freeze").mkdir()
    (tree / "freeze" / "manifest.json").write_text("{not json")

    result = cli("freeze", "check", "--root", str(tree))

    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: manifest {tree / 'freeze' / 'manifest.json'} is not valid JSON")
    assert len(result.stderr.splitlines()) == 1


def test_version_is_the_last_definition_in_the_migrations(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text(MIGRATION.format(version="1.0.0"))
    (tmp_path / "0002_b.sql").write_text(
        "create or replace function kernel.kernel_version() returns text\n"
        "language sql as $function$ select '1.2.3'::text $function$;\n"
    )
    (tmp_path / "0003_c.sql").write_text("SELECT '9.9.9';  -- not a kernel_version() definition\n")

    assert freeze.migrations_version(tmp_path) == "1.2.3"


def test_the_checkout_version_is_what_the_migrations_define() -> None:
    assert freeze.kernel_version() == freeze.migrations_version(freeze.CHECKOUT / "sql" / "migrations")
    assert freeze.version_key(freeze.kernel_version()) >= (1, 0, 0)


def test_every_module_of_the_certification_harness_is_frozen() -> None:
    package = freeze.CHECKOUT / "kernel_driver" / "certify"
    modules = sorted(f"kernel_driver/certify/{path.name}" for path in package.glob("*.py"))
    assert modules == sorted(name for name in freeze.FROZEN_PATHS if name.startswith("kernel_driver/certify/"))


def test_the_driver_s_version_is_the_kernel_it_ships() -> None:
    # One number: kernel_driver.__version__ (pyproject.toml reads it) = the last kernel_version().
    assert kernel_driver.__version__ == freeze.kernel_version()
    assert importlib.metadata.version("kernel-driver") == kernel_driver.__version__


def test_certify_records_the_gates_file_list(tree: Path) -> None:
    (tree / "docs" / "EXECUTION_KERNEL_FREEZE.md").unlink()

    listed = [entry["path"] for entry in certify.frozen_file_digests(tree)]

    assert listed == ["sql/migrations/0001_kernel.sql",
                      *(name for name in freeze.FROZEN_PATHS if name != "docs/EXECUTION_KERNEL_FREEZE.md")]
