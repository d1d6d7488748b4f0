"""`kernel-driver runs show RUN_ID` and `runs list`: what a run did, from the terminal (UX1).

`show` prints what `run_details` returns: the run, its lineage and schedule (priority, start,
deadline, send window), a table of its jobs (what a scheduled one waits until), its item counts
and its first items. `list` shows each run's priority and what its scheduled jobs wait for.
A session scoped to a tenant (options=-c execution_kernel.tenant_id=…
in the DSN) sees only that tenant's runs; another tenant's run is "not found".
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import click

from kernel_driver.compatibility import kernel_database
from kernel_driver.config import Settings
from kernel_driver.errors import BadUsage, ChecksFailed
from kernel_driver.queries import ITEM_STATUSES, RUN_STATUSES, TERMINAL_RUN_STATUSES, Kernel

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
    retried_by = [entry["id"] for entry in lineage if entry.get("retry_of_run_id") == run["id"]]
    if retried_by:
        text += f"; retried by {', '.join(retried_by)}"
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


def render_run(details: dict[str, Any], event_limit: int = 20) -> str:
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
            ("JOB", "STATUS", "ATTEMPTS", "CONTACTS", "LOCKED_BY", "LEASE_UNTIL", "TIME_ZONE", "WAITS_UNTIL",
             "LAST_ERROR"),
            [(job["id"], job["status"], job["attempts"], job["contact_count"], job["locked_by"],
              job["lease_expires_at"], job.get("time_zone"),
              job["run_after"] if job["status"] == "scheduled" else None, job["last_error"])
             for job in details["jobs"]],
        ),
        "",
        f"items ({total_items}): {counts_text(details['item_counts'])}",
    ]
    shown_status = details.get("item_status")
    if items:
        of = details["item_counts"].get(shown_status, 0) if shown_status else total_items
        lines.append(f"first {len(items)} of {of} {shown_status + ' ' if shown_status else ''}items:")
        lines += table(
            ("CONTACT", "STATUS", "RECIPIENT", "PROVIDER_MESSAGE_ID", "ERROR"),
            [(item["contact_id"], item["status"], item["recipient"], item["provider_message_id"],
              item["error"] or item["skip_reason"]) for item in items],
        )
    events = details.get("events") or []
    if events and event_limit:
        shown = events[-event_limit:]
        lines += ["", f"timeline (last {len(shown)} of {len(events)} state changes):"]
        lines += table(
            ("AT", "ENTITY", "JOB", "FROM", "TO", "WORKER", "DETAIL"),
            [(e["occurred_at"], e["entity"], e["job_id"], e["from_status"], e["to_status"], e["worker"], e["detail"])
             for e in shown],
        )
    return "\n".join(lines)


def parse_uuid(text: str, what: str = "run id") -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise BadUsage(f"{what} {text!r} is not a uuid") from None


def parse_time(text: str | None, option: str) -> datetime | None:
    """An ISO 8601 time with its offset: a time without one would be read in whatever zone the
    database session has, which is a guess."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise BadUsage(f"{option} {text!r} is not an ISO 8601 time (e.g. 2027-01-04T09:00+01:00)") from None
    if value.tzinfo is None:
        raise BadUsage(f"{option} {text!r} has no UTC offset: write it with one, e.g. {text}+00:00")
    return value


@click.group()
def runs() -> None:
    """Look at campaign runs: their jobs, outbox items and lineage."""


@runs.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print run_details as JSON instead of tables.")
@click.option("--items", "item_limit", type=click.IntRange(0, 100000), default=20, show_default=True,
              help="How many outbox items to list.")
@click.option("--item-status", type=click.Choice(ITEM_STATUSES),
              help="List only the items in this status (their first --items, in id order).")
@click.option("--events", "event_limit", type=click.IntRange(0, 200), default=20, show_default=True,
              help="How many of the latest state changes to list.")
@click.option("--watch", is_flag=True, help="Redraw every --interval seconds until the run ends.")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=1.0, show_default=True)
@click.pass_obj
def show(settings: Settings, run_id: str, as_json: bool, item_limit: int, item_status: str | None,
         event_limit: int, watch: bool, interval: float) -> None:
    """Show a run: status, lineage, schedule, jobs, item counts, its first items and its
    latest state changes."""

    run_uuid = parse_uuid(run_id)
    with kernel_database(settings) as conn:
        kernel = Kernel(conn, settings.schema)
        while True:
            details = kernel.run_details(run_uuid, 0 if item_status else item_limit)
            if item_status:
                details["items"] = kernel.run_items(run_uuid, item_status, None, item_limit) if item_limit else []
                details["item_status"] = item_status
            if watch:
                click.clear()
            click.echo(json.dumps(details, indent=2) if as_json else render_run(details, event_limit))
            if not watch or details["run"]["status"] in TERMINAL_RUN_STATUSES:
                return
            time.sleep(interval)


def confirm(action: str, yes: bool) -> None:
    """Ask before changing a run, unless --yes (no terminal and no --yes: refused, exit 1)."""
    if not yes and not click.confirm(f"{action}?", default=False):
        raise ChecksFailed(f"not confirmed: {action} (pass --yes to skip the question)")


@runs.command()
@click.argument("run_id")
@click.option("--include-unknown", is_flag=True,
              help="Also re-send items whose outcome is unknown (they may have reached the provider).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print the new run id as JSON.")
@click.pass_obj
def retry(settings: Settings, run_id: str, include_unknown: bool, yes: bool, as_json: bool) -> None:
    """A new run, linked to RUN, for the contacts whose latest item failed (UX2)."""

    run_uuid = parse_uuid(run_id)
    with kernel_database(settings) as conn:
        kernel = Kernel(conn, settings.schema)
        counts = kernel.run_details(run_uuid, 0)["item_counts"]
        targets = f"{counts.get('failed', 0)} failed" + (
            f" and {counts.get('unknown', 0)} unknown" if include_unknown else "")
        confirm(f"Retry run {run_uuid} ({targets} items)", yes)
        new_run = kernel.retry_campaign_run(run_uuid, include_unknown)
    click.echo(json.dumps({"run_id": str(new_run), "retry_of_run_id": str(run_uuid)}) if as_json
               else f"retry run {new_run} created for run {run_uuid}")


@runs.command()
@click.argument("run_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def cancel(settings: Settings, run_id: str, yes: bool) -> None:
    """Cancel RUN: its scheduled and queued jobs stop, undispatched items are skipped; calls in
    flight are still recorded."""

    run_uuid = parse_uuid(run_id)
    with kernel_database(settings) as conn:
        kernel = Kernel(conn, settings.schema)
        status = kernel.run_details(run_uuid, 0)["run"]["status"]
        confirm(f"Cancel run {run_uuid} (now {status})", yes)
        kernel.cancel_campaign_run(run_uuid)
    click.echo(f"run {run_uuid} cancelled")


@runs.command("list")
@click.option("--limit", type=click.IntRange(1, 10000), default=20, show_default=True, help="How many runs.")
@click.option("--campaign", help="Only this campaign's runs.")
@click.option("--status", type=click.Choice(RUN_STATUSES), help="Only runs in this status.")
@click.option("--since", metavar="TIME", help="Only runs created since TIME (ISO 8601 with offset).")
@click.option("--tenant", help="Only this tenant's runs (an unscoped operator's view).")
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@click.pass_obj
def list_runs(settings: Settings, limit: int, campaign: str | None, status: str | None, since: str | None,
              tenant: str | None, as_json: bool) -> None:
    """The latest runs, newest first."""

    campaign_id = parse_uuid(campaign, "campaign id") if campaign else None
    tenant_id = parse_uuid(tenant, "tenant id") if tenant else None
    since_time = parse_time(since, "--since")
    with kernel_database(settings) as conn:
        found = Kernel(conn, settings.schema).latest_runs(
            limit, campaign_id=campaign_id, status=status, since=since_time, tenant_id=tenant_id)
    if as_json:
        click.echo(json.dumps([{**asdict(r), "id": str(r.id), "created_at": r.created_at.isoformat(),
                                "start_at": r.start_at.isoformat() if r.start_at else None,
                                "retry_of_run_id": str(r.retry_of_run_id) if r.retry_of_run_id else None}
                               for r in found], indent=2))
        return
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
