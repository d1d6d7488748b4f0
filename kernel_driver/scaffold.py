"""Start the next migration: ``make migration NAME=slug VERSION=X.Y.Z`` (sql/README.md).

Writes ``sql/migrations/<next number>_<slug>.sql`` with the two lines every kernel migration
needs already in place: the new ``kernel_version()`` and the ledger row (``migrate`` refuses a
file that does not record itself). Refuses a version that does not go up.

    python -m kernel_driver.scaffold SLUG VERSION [--sql-dir DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kernel_driver import freeze, migrate

VERSION_SQL = """\
CREATE OR REPLACE FUNCTION kernel.kernel_version() RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT '{version}'::text
$$;
"""

TEMPLATE = """\
-- {name}.sql: the execution kernel v{version}.
--
-- What changes, and why (the issue, the measurement). Append-only once it has landed on main:
-- the next change is the next file.

-- The version ---------------------------------------------------------------------

""" + VERSION_SQL + """
INSERT INTO kernel.schema_migrations (version, name) VALUES ({number}, '{name}')
ON CONFLICT (version) DO NOTHING;
"""


def version_sql(version: str) -> str:
    """The statement that makes `version` the kernel's version (every migration ends with it)."""
    return VERSION_SQL.format(version=version)


def scaffold(sql_dir: Path, slug: str, version: str) -> Path:
    folder = sql_dir / "migrations"
    existing = migrate.load_migrations(sql_dir)
    number = (existing[-1].version if existing else 0) + 1
    name = f"{number:04d}_{slug}"
    if not migrate.MIGRATION_FILE.match(f"{name}.sql"):
        raise SystemExit(f"error: {slug!r} is not a migration slug: lowercase letters, digits and _")
    if not freeze.VERSION_LITERAL.fullmatch(f"'{version}'"):
        raise SystemExit(f"error: {version!r} is not a version X.Y.Z")
    current = freeze.migrations_version(folder)
    if freeze.version_key(version) <= freeze.version_key(current):
        raise SystemExit(f"error: version {version} does not go up from the current kernel {current}")
    path = folder / f"{name}.sql"
    path.write_text(TEMPLATE.format(name=name, number=number, version=version))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kernel_driver.scaffold", description=__doc__.split("\n\n")[0])
    parser.add_argument("slug", help="what the migration is about, e.g. fair_scheduling")
    parser.add_argument("version", help="the kernel version it ships, e.g. 1.2.0")
    parser.add_argument("--sql-dir", type=Path, default=Path(__file__).resolve().parent.parent / "sql")
    args = parser.parse_args()
    path = scaffold(args.sql_dir, args.slug, args.version)
    print(f"wrote {path}: write the change above the version; then make schema, make freeze")


if __name__ == "__main__":
    main()
