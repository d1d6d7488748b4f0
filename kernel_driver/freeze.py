"""`kernel-driver freeze`: the freeze gate of the execution kernel.

``freeze/manifest.json`` names the kernel version and the sha256 of every frozen file. The gate
(``kernel-driver freeze check``, part of ``make test-kernel``) passes only while every frozen file
still has its recorded sha256 and ``evidence/<version>.json`` (written by ``kernel-driver
certify``) records those same sha256 with every check PASS. Changing a frozen file therefore
takes a new migration that bumps ``kernel_version()``, a certification and ``freeze update``:
the policy in docs/EXECUTION_KERNEL_FREEZE.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from kernel_driver.config import Settings
from kernel_driver.errors import BadUsage, ChecksFailed
from kernel_driver.frozen import CHECK_IDS, FROZEN_PATHS

CHECKOUT = Path(__file__).resolve().parent.parent  # the checkout this driver runs from
MANIFEST = Path("freeze/manifest.json")
EVIDENCE_DIR = Path("evidence")
MIGRATIONS_DIR = Path("sql/migrations")

# Besides every migration. queries.py is the outbox contract (the only code that calls the
# kernel's SQL functions) and worker.py the job processor: the seed's two frozen edge functions.

# kernel.kernel_version() as a migration defines it; the last definition is the kernel's version.
KERNEL_VERSION_FUNCTION = re.compile(
    r"CREATE\s+(?:OR\s+REPLACE\s+)?FUNCTION\s+kernel\.kernel_version\s*\(\s*\)"
    r".*?AS\s+(\$\w*\$)(?P<body>.*?)\1",
    re.IGNORECASE | re.DOTALL,
)
VERSION_LITERAL = re.compile(r"'(\d+\.\d+\.\d+)'")

CHANGE_STEPS = """\
To change the frozen kernel (docs/EXECUTION_KERNEL_FREEZE.md):
  1. put the change in a new migration sql/migrations/NNNN_<slug>.sql that also replaces
     kernel.kernel_version() with the next version (the migrations now say {version})
  2. certify it: kernel-driver migrate, then kernel-driver certify --out evidence/<new version>.json
     (in staging with real providers: docs/certification.md)
  3. kernel-driver freeze update --evidence evidence/<new version>.json
     (make freeze does 2 and 3 in a scratch database with local providers)
  4. open the PR with the [KERNEL] prefix and the checklist; two reviewers approve it"""


class FreezeError(Exception):
    """The tree cannot be checked: not a checkout, or an unreadable manifest or evidence."""


class FreezeRefused(Exception):
    """``freeze update`` will not write the manifest; the message says what is missing."""


# --- what is frozen, and its fingerprint ------------------------------------------------------


def frozen_files(root: Path = CHECKOUT) -> list[Path]:
    """The frozen files, relative to the checkout ``root``: every migration, then the rest.

    A frozen file that is missing is still listed: ``frozen_hashes`` reports it as None.
    """
    migrations = sorted((root / MIGRATIONS_DIR).glob("*.sql"))
    return [path.relative_to(root) for path in migrations] + [Path(name) for name in FROZEN_PATHS]


def frozen_hashes(root: Path = CHECKOUT) -> dict[str, str | None]:
    """Each frozen file's sha256 by its posix path (None for a frozen file that is missing)."""
    hashes = {}
    for name in frozen_files(root):
        path = root / name
        hashes[name.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return hashes


def kernel_version(root: Path = CHECKOUT) -> str:
    """The version ``kernel.kernel_version()`` returns once the checkout's migrations are applied."""
    if not (root / MIGRATIONS_DIR).is_dir():
        raise FreezeError(f"{root} is not a kernel checkout: it has no {MIGRATIONS_DIR}/")
    return migrations_version(root / MIGRATIONS_DIR)


def migrations_version(folder: Path) -> str:
    """The version the last definition of ``kernel.kernel_version()`` in ``folder`` returns."""
    version = None
    for path in sorted(folder.glob("*.sql")):
        for match in KERNEL_VERSION_FUNCTION.finditer(path.read_text()):
            literal = VERSION_LITERAL.search(match["body"])
            if literal is None:
                raise FreezeError(f"{path.name}: kernel.kernel_version() must return a literal 'X.Y.Z'")
            version = literal[1]
    if version is None:
        raise FreezeError(f"no migration in {folder} defines kernel.kernel_version()")
    return version


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def evidence_path(version: str) -> Path:
    return EVIDENCE_DIR / f"{version}.json"


# --- manifest and evidence --------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    kernel_version: str
    files: dict[str, str | None]

    def to_json(self) -> str:
        data = {
            "kernel_version": self.kernel_version,
            "evidence": evidence_path(self.kernel_version).as_posix(),
            "files": self.files,
        }
        return json.dumps(data, indent=2) + "\n"


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise FreezeError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise FreezeError(f"{what} {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise FreezeError(f"{what} {path} must hold a JSON object")
    return data


def read_manifest(root: Path) -> Manifest | None:
    path = root / MANIFEST
    if not path.exists():
        return None
    data = read_json(path, "manifest")
    if not isinstance(data.get("kernel_version"), str) or not isinstance(data.get("files"), dict):
        raise FreezeError(f"manifest {path} lacks kernel_version or files")
    return Manifest(data["kernel_version"], data["files"])


@dataclass(frozen=True)
class Evidence:
    """What `kernel-driver certify` recorded: the version, the frozen files' sha256, each check."""

    path: Path
    kernel_version: str | None
    files: Mapping[str, str | None]
    checks: Mapping[str, str]  # check id → PASS | FAIL

    @classmethod
    def read(cls, path: Path) -> Evidence:
        data = read_json(path, "evidence")
        try:
            files = {entry["path"]: entry["sha256"] for entry in data.get("frozen_files") or []}
            checks = {check["id"]: check["status"] for check in data.get("checks") or []}
        except (KeyError, TypeError) as exc:
            raise FreezeError(f"evidence {path} was not written by kernel-driver certify") from exc
        return cls(path, data.get("kernel_version"), files, checks)

    def problems(self, version: str, files: Mapping[str, str | None]) -> list[str]:
        """Why this evidence does not certify ``version`` made of ``files``; empty when it does."""
        found = []
        if self.kernel_version != version:
            found.append(f"{self.path} certifies kernel {self.kernel_version}, not {version}")
        for name in sorted(files.keys() | self.files.keys()):
            if files.get(name) != self.files.get(name):
                found.append(
                    f"{self.path} was certified with {name} at sha256 {self.files.get(name)}, "
                    f"not {files.get(name)}"
                )
        for check in CHECK_IDS:
            status = self.checks.get(check, "not run")
            if status != "PASS":
                found.append(f"{self.path}: check {check} is {status}, not PASS")
        return found


# --- the gate ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileChange:
    name: str
    recorded: str | None  # in the manifest
    current: str | None  # in the tree

    def describe(self) -> str:
        kind = "added" if self.recorded is None else "missing" if self.current is None else "changed"
        return f"  {kind:<8}{self.name}\n          manifest {self.recorded}\n          now      {self.current}"


@dataclass(frozen=True)
class GateResult:
    version: str  # what the migrations define
    changes: list[FileChange]
    problems: list[str]
    frozen_before: bool = True  # False: there is no manifest yet

    @property
    def ok(self) -> bool:
        return not self.changes and not self.problems

    def report(self) -> str:
        """Everything that is wrong, and what to do about it."""
        lines = [f"{len(self.changes)} frozen file(s) differ from {MANIFEST}:"] if self.changes else []
        lines += [change.describe() for change in self.changes]
        lines += [f"  {problem}" for problem in self.problems]
        if self.frozen_before:
            lines += ["", CHANGE_STEPS.format(version=self.version)]
        return "\n".join(lines)

    def summary(self) -> str:
        parts = []
        if self.changes:
            parts.append(f"{len(self.changes)} frozen file(s) differ from {MANIFEST}")
        if self.problems:
            parts.append(f"{len(self.problems)} problem(s) with the version or its evidence")
        return "the kernel freeze is broken: " + "; ".join(parts)


def check(root: Path = CHECKOUT) -> GateResult:
    """Compare the tree with the manifest, and the manifest with its evidence."""
    version = kernel_version(root)
    current = frozen_hashes(root)
    manifest = read_manifest(root)
    if manifest is None:
        return GateResult(version, [], [f"there is no {MANIFEST} yet: run make freeze"], frozen_before=False)
    changes = [
        FileChange(name, manifest.files.get(name), current.get(name))
        for name in sorted(manifest.files.keys() | current.keys())
        if manifest.files.get(name) != current.get(name)
    ]
    problems = []
    if version != manifest.kernel_version:
        problems.append(
            f"the migrations define kernel_version() {version}, {MANIFEST} freezes "
            f"{manifest.kernel_version}: certify {version}, then run freeze update"
        )
    elif changes:
        problems.append(f"kernel_version() is still {version}: changed frozen files need a new version")
    evidence_file = root / evidence_path(manifest.kernel_version)
    if evidence_file.exists():
        problems += Evidence.read(evidence_file).problems(manifest.kernel_version, manifest.files)
    else:
        problems.append(f"no evidence for kernel {manifest.kernel_version}: {evidence_file} is missing")
    return GateResult(version, changes, problems)


def update(root: Path = CHECKOUT, evidence_file: Path | None = None) -> tuple[Manifest, bool]:
    """Freeze the tree as it is, given evidence that certifies it; the manifest, and whether it
    changed. Evidence given from elsewhere is copied to ``evidence/<version>.json``."""
    version = kernel_version(root)
    current = frozen_hashes(root)
    missing = [name for name, sha in current.items() if sha is None]
    if missing:
        raise FreezeRefused(f"frozen files are missing: {', '.join(missing)}")
    target = root / evidence_path(version)
    source = evidence_file or target
    if not source.exists():
        raise FreezeRefused(f"no evidence at {source}: run kernel-driver certify --out {evidence_path(version)}")
    problems = Evidence.read(source).problems(version, current)
    if problems:
        raise FreezeRefused(f"{source} does not certify these files: " + "; ".join(problems))
    new = Manifest(version, current)
    old = read_manifest(root)
    if old == new:
        return new, False
    if old is not None and version_key(version) <= version_key(old.kernel_version):
        raise FreezeRefused(
            f"frozen files changed but kernel_version() is {version} and {MANIFEST} already freezes "
            f"{old.kernel_version}: bump the version in a new migration"
        )
    if source.resolve() != target.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    (root / MANIFEST).parent.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).write_text(new.to_json())
    return new, True


# --- the commands -----------------------------------------------------------------------------

root_option = click.option(
    "--root", type=click.Path(file_okay=False, path_type=Path), default=CHECKOUT,
    help="The kernel checkout [default: the one this driver runs from].",
)


@click.group()
def freeze() -> None:
    """The freeze gate: frozen files, their sha256 in freeze/manifest.json, their certification."""


@freeze.command("check")
@root_option
def check_command(root: Path) -> None:
    """Fail unless every frozen file matches freeze/manifest.json and evidence/<version>.json
    certifies them with every check PASS. Needs no database. Exit 0 frozen, 1 broken."""

    try:
        result = check(root)
    except FreezeError as exc:
        raise BadUsage(str(exc)) from exc
    if not result.ok:
        click.echo(result.report(), err=True)
        raise ChecksFailed(result.summary())
    click.echo(
        f"kernel {result.version} is frozen: {len(frozen_files(root))} files match {MANIFEST}, "
        f"certified by {evidence_path(result.version)}"
    )


@freeze.command("update")
@root_option
@click.option("--evidence", type=click.Path(dir_okay=False, path_type=Path),
              help="The certification of the current files [default: evidence/<version>.json].")
def update_command(root: Path, evidence: Path | None) -> None:
    """Rewrite freeze/manifest.json for the current files, only when the evidence certifies them
    (every check PASS) and the version was bumped. Exit 0 written or up to date, 1 refused."""

    try:
        manifest, changed = update(root, evidence)
    except FreezeError as exc:
        raise BadUsage(str(exc)) from exc
    except FreezeRefused as exc:
        raise ChecksFailed(str(exc)) from exc
    verb = "froze" if changed else "already frozen:"
    click.echo(f"{verb} kernel {manifest.kernel_version} ({len(manifest.files)} files) in {MANIFEST}")


@freeze.command("version")
@root_option
def version_command(root: Path) -> None:
    """Print the kernel version the checkout's migrations define."""

    try:
        click.echo(kernel_version(root))
    except FreezeError as exc:
        raise BadUsage(str(exc)) from exc


@freeze.command("certify")
@click.pass_obj
def certify_command(settings: Settings) -> None:
    """Certify this checkout in a scratch database and write evidence/<version>.json.

    The scratch database lives on KERNEL_DSN's server when given, else on an embedded
    PostgreSQL; it is dropped afterwards. Exit 0 when every check passed, 1 when one failed.
    """
    from kernel_driver import db, migrate

    try:
        out = CHECKOUT / evidence_path(kernel_version(CHECKOUT))
    except FreezeError as exc:
        raise BadUsage(str(exc)) from exc
    out.parent.mkdir(exist_ok=True)
    with db.postgres_server(settings.dsn) as server, migrate.scratch_kernel(server, CHECKOUT / "sql") as scratch:
        # The DSN travels in the environment, where `ps` does not show it.
        scratch_env = {**os.environ, "KERNEL_DSN": scratch.dsn, "KERNEL_SCHEMA": scratch.schema}
        command = [sys.executable, "-m", "kernel_driver", "certify", "--out", str(out)]
        click.get_current_context().exit(subprocess.run(command, env=scratch_env, check=False).returncode)
