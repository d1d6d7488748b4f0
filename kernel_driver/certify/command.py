"""`kernel-driver certify`: choose the checks and the providers, run them, write the evidence."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kernel_driver import migrate
from kernel_driver.certify.evidence import certify_database
from kernel_driver.certify.harness import RealProvider
from kernel_driver.certify.records import CheckRecord
from kernel_driver.certify.suite import CHECKS, Check
from kernel_driver.config import Settings
from kernel_driver.db import database
from kernel_driver.errors import BadUsage, DatabaseError, ExitCode
from kernel_driver.frozen import CHECK_IDS
from kernel_driver.providers import ProviderConfigError, load_adapter


def select_checks(only: str | None) -> list[Check]:
    """The checks named in `only` ("Q1,e1"), in the harness's order; all when None."""
    if only is None:
        return list(CHECKS)
    wanted = {name.strip().upper() for name in only.split(",") if name.strip()}
    unknown = sorted(wanted - set(CHECK_IDS))
    if unknown or not wanted:
        raise ValueError(
            f"unknown check {', '.join(unknown) or '(none given)'} in --only; known: {', '.join(CHECK_IDS)}"
        )
    return [check for check in CHECKS if check.id in wanted]


def real_provider(
    adapter: str, settings_option: str, settings_json: str | None, to_option: str, to: str | None
) -> RealProvider | None:
    """Parse and validate --smtp-settings/--email-to (or the voice pair); None when neither is given."""
    if settings_json is None and to is None:
        return None
    if settings_json is None or to is None:
        raise ValueError(f"{settings_option} and {to_option} go together")
    try:
        settings = json.loads(settings_json)
    except ValueError as exc:
        raise ValueError(f"{settings_option} is not valid JSON: {exc}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{settings_option} must be a JSON object")
    problems = load_adapter(adapter).validate_settings(settings)
    if adapter == "twilio" and not settings.get("from"):
        problems.append("twilio setting 'from' (the caller id) is required for certification")
    if problems:
        raise ValueError(f"{settings_option}: " + "; ".join(problems))
    return RealProvider(settings, to)


def report_line(record: CheckRecord) -> None:
    line = f"{record.status} {record.id:<3} {record.title} ({record.duration_s:.1f} s)"
    click.echo(line + (f": {record.reason}" if record.reason else ""))


@click.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default="evidence.json", show_default=True,
              help="Where to write the evidence JSON.")
@click.option("--only", metavar="IDS", help=f"Comma-separated checks to run [default: all of {','.join(CHECK_IDS)}].")
@click.option("--smtp-settings", metavar="JSON", help="E1 through this SMTP server (smtp adapter settings).")
@click.option("--email-to", metavar="ADDRESS", help="E1's recipient when --smtp-settings is given.")
@click.option("--voice-settings", metavar="JSON",
              help="V1 through this Twilio-compatible API (twilio adapter settings).")
@click.option("--voice-to", metavar="NUMBER", help="V1's callee (E.164) when --voice-settings is given.")
@click.pass_obj
def certify(settings: Settings, out: Path, only: str | None, smtp_settings: str | None, email_to: str | None,
            voice_settings: str | None, voice_to: str | None) -> None:
    """Run the QA certification harness (Q1-Q3, E1, V1, UX1, UX2) and write the evidence JSON.

    Each check seeds its own rows in a fresh certification tenant and drives real daemons
    (scoped to that tenant) against local provider sinks, or the real providers given.
    Exit 0 when every selected check passed, 1 when one failed.
    """

    try:
        checks = select_checks(only)
        real_email = real_provider("smtp", "--smtp-settings", smtp_settings, "--email-to", email_to)
        real_voice = real_provider("twilio", "--voice-settings", voice_settings, "--voice-to", voice_to)
    except (ValueError, ProviderConfigError) as exc:
        raise BadUsage(str(exc)) from exc
    if not out.parent.is_dir():
        raise BadUsage(f"cannot write {out}: directory {out.parent} does not exist")

    with database(settings) as conn:
        kernel_version = migrate.kernel_version(conn, settings.schema)
        if kernel_version is None:
            raise DatabaseError(
                f"no kernel in schema {settings.schema}: run kernel-driver migrate first"
            )
        evidence = certify_database(conn, settings, checks, kernel_version, report_line, real_email, real_voice)

    partial = out.with_name(out.name + ".tmp")
    partial.write_text(json.dumps(evidence, indent=2) + "\n")
    partial.replace(out)
    summary = evidence["summary"]
    passed, selected = len(summary["passed"]), len(summary["selected"])
    click.echo(f"{summary['result']}: {passed} of {selected} checks passed; evidence in {out}")
    if summary["failed"]:
        click.get_current_context().exit(ExitCode.FAILED)
