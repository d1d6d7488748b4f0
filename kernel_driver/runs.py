"""`kernel-driver runs show RUN_ID` and `runs list`: what a run did, from the terminal (UX1).

`show` prints what `run_details` returns: the run, its lineage and schedule (priority, start,
deadline, send window), a table of its jobs (what a scheduled one waits until), its item counts
and its first items. `list` shows each run's priority and what its scheduled jobs wait for.
A session scoped to a tenant (options=-c execution_kernel.tenant_id=…
in the DSN) sees only that tenant's runs; another tenant's run is "not found".
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click

from kernel_driver.config import Settings
from kernel_driver.db import database
from kernel_driver.errors import BadUsage
from kernel_driver.queries import Kernel

CELL_WIDTH = 60  # longer cells (errors) are cut, so a row stays one line


def cell(value: Any) -> str:
    text = "-" if value is None or value == "" else " ".join(str(value).split())
    return text if len(text) <= CELL_WIDTH else text[: CELL_WIDTH - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Left-aligned columns, two spaces apart, indented by two."""
    cells = [list(headers)] + [[cell(value) for value in row] for row in rows]
    widths = [max(len(line[column]) for line in cells) for column in range(len(headers))]
    return [
        "  " + "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    ]


def counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{status} {n}" for status, n in sorted(counts.items())) or "none"


def lineage_text(run: dict[str, Any], lineage: Sequence[dict[str, Any]]) -> str:
    text = f"generation {run['generation']} of {len(lineage) or 1}"
    if run.get("retry_of_run_id"):
        text += f"; retry of {run['retry_of_run_id']}"
    if run["root_run_id"] != run["id"]:
        text += f"; root {run['root_run_id']}"
    return text


def waiting_text(start_at: datetime | None, scheduled_jobs: int) -> str:
    """What a run's scheduled jobs wait for: its start, while it is ahead, else a send window."""
    if scheduled_jobs == 0:
        return "-"
    if start_at is not None and start_at > datetime.now(UTC):
        return f"starts {start_at.isoformat(sep=' ', timespec='seconds')}"
    return f"{scheduled_jobs} jobs wait for their send window"


def schedule_text(run: dict[str, Any]) -> str:
    config = run.get("run_config") or {}
    parts = [f"priority {run.get('priority', 0)}",
             f"start {run['start_at']}" if run.get("start_at") else "start at once"]
    if run.get("deadline"):
        parts.append(f"deadline {run['deadline']}")
    if window := config.get("send_window"):
        parts.append(f"send window {window['start']}-{window['end']} in each contact's time zone")
    return "; ".join(parts)


def render_run(details: dict[str, Any]) -> str:
    run = details["run"]
    config = run.get("run_config") or {}
    items = details["items"]
    total_items = sum(details["item_counts"].values())
    start_at = datetime.fromisoformat(run["start_at"]) if run.get("start_at") else None
    waiting = waiting_text(start_at, details["job_counts"].get("scheduled", 0))
    lines = [
        f"run       {run['id']}",
        f"status    {run['status']}" + (f" ({run['error_message']})" if run.get("error_message") else ""),
        f"channel   {run['channel']} via {config.get('provider', '?')}",
        f"campaign  {run['campaign_id']} ({config.get('campaign_name', '?')})",
        f"lineage   {lineage_text(run, details.get('lineage') or [])}",
        f"schedule  {schedule_text(run)}",
        f"times     created {run['created_at']}, started {run.get('started_at') or '-'},"
        f" completed {run.get('completed_at') or '-'}",
        "",
        f"jobs ({len(details['jobs'])}): {counts_text(details['job_counts'])}"
        + ("" if waiting == "-" else f" ({waiting})"),
        *table(
            ("JOB", "STATUS", "ATTEMPTS", "CONTACTS", "LOCKED_BY", "TIME_ZONE", "WAITS_UNTIL", "LAST_ERROR"),
            [(job["id"], job["status"], job["attempts"], job["contact_count"], job["locked_by"], job.get("time_zone"),
              job["run_after"] if job["status"] == "scheduled" else None, job["last_error"])
             for job in details["jobs"]],
        ),
        "",
        f"items ({total_items}): {counts_text(details['item_counts'])}",
    ]
    if items:
        lines.append(f"first {len(items)} of {total_items} items:")
        lines += table(
            ("CONTACT", "STATUS", "RECIPIENT", "PROVIDER_MESSAGE_ID", "ERROR"),
            [(item["contact_id"], item["status"], item["recipient"], item["provider_message_id"],
              item["error"] or item["skip_reason"]) for item in items],
        )
    return "\n".join(lines)


def parse_run_id(text: str) -> uuid.UUID:

    try:
        return uuid.UUID(text)
    except ValueError:
        raise BadUsage(f"run id {text!r} is not a uuid") from None


@click.group()
def runs() -> None:
    """Look at campaign runs: their jobs, outbox items and lineage."""


@runs.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print run_details as JSON instead of tables.")
@click.option("--items", "item_limit", type=click.IntRange(0, 100000), default=20, show_default=True,
              help="How many outbox items to list.")
@click.pass_obj
def show(settings: Settings, run_id: str, as_json: bool, item_limit: int) -> None:
    """Show a run: status, lineage, jobs, item counts and its first items."""

    run_uuid = parse_run_id(run_id)
    with database(settings) as conn:
        details = Kernel(conn, settings.schema).run_details(run_uuid, item_limit)
    click.echo(json.dumps(details, indent=2) if as_json else render_run(details))


@runs.command("list")
@click.option("--limit", type=click.IntRange(1, 10000), default=20, show_default=True, help="How many runs.")
@click.pass_obj
def list_runs(settings: Settings, limit: int) -> None:
    """The latest runs, newest first."""

    with database(settings) as conn:
        found = Kernel(conn, settings.schema).latest_runs(limit)
    rows = [
        (r.id, r.status, r.channel, r.generation, r.priority, r.created_at.isoformat(timespec="seconds"),
         waiting_text(r.start_at, r.scheduled_jobs), r.campaign)
        for r in found
    ]
    if not rows:
        click.echo("no runs")
        return
    headers = ("RUN", "STATUS", "CHANNEL", "GEN", "PRIORITY", "CREATED", "WAITING", "CAMPAIGN")
    click.echo("\n".join(table(headers, rows)))
