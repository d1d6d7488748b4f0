"""`kernel-driver campaigns check` and `kernel-driver deploy`: the launch checklist and a deploy
from the terminal (issue 11), through the kernel's own functions.

The checks are the kernel's (`check_campaign_launch_prerequisites`); this module only adds what
an operator should do about each failed one. A session scoped to a tenant (options=-c
execution_kernel.tenant_id=… in the DSN) sees only its campaigns.
"""

from __future__ import annotations

import json

import click

from kernel_driver.compatibility import kernel_database
from kernel_driver.config import Settings
from kernel_driver.errors import ChecksFailed
from kernel_driver.queries import Kernel, LaunchCheck
from kernel_driver.runs import parse_time, parse_uuid, table

# What to do about each check the kernel can fail (tests/integration/test_operate.py: one per
# check the kernel has).
ADVICE = {
    "campaign_exists": "check the campaign id, and the tenant the DSN is scoped to",
    "channel_supported": "set campaigns.channel to email or voice",
    "content_complete": "fill the content the channel needs (email: subject, text, from; voice: script)",
    "audience_not_empty": "add contacts to kernel.campaign_audience",
    "reachable_contacts": "give the contacts an address for the channel (email or phone), not all unsubscribed",
    "provider_configured": "add a kernel.provider_configs row for the workspace and the channel",
    "provider_settings_valid": "fix the provider settings named in the detail (docs/providers.md)",
    "no_active_run": "wait for the active run to end, or cancel it: kernel-driver runs cancel RUN",
}


def checklist(checks: list[LaunchCheck]) -> str:
    return "\n".join(table(
        ("CHECK", "RESULT", "DETAIL", "TO DO"),
        [(c.check_name, "pass" if c.passed else "FAIL", c.detail, None if c.passed else ADVICE.get(c.check_name))
         for c in checks],
    ))


@click.group()
def campaigns() -> None:
    """Campaigns: the launch checklist."""


@campaigns.command()
@click.argument("campaign")
@click.option("--workspace", required=True, help="The workspace the campaign must belong to.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.pass_obj
def check(settings: Settings, campaign: str, workspace: str, as_json: bool) -> None:
    """The launch checklist of CAMPAIGN: one line per check, with what to do about a failed
    one. Exits 1 when the campaign is not ready to deploy."""

    campaign_id, workspace_id = parse_uuid(campaign, "campaign id"), parse_uuid(workspace, "workspace id")
    with kernel_database(settings) as conn:
        checks = Kernel(conn, settings.schema).launch_checks(campaign_id, workspace_id)
    ready = all(c.passed for c in checks)
    if as_json:
        click.echo(json.dumps({"ready": ready, "checks": [
            {"check": c.check_name, "passed": c.passed, "detail": c.detail,
             "to_do": None if c.passed else ADVICE.get(c.check_name)} for c in checks]}, indent=2))
    else:
        click.echo(checklist(checks))
        click.echo("ready to deploy" if ready else "not ready: fix the failed checks above")
    if not ready:
        raise ChecksFailed(f"campaign {campaign_id} is not ready to deploy")


@click.command()
@click.argument("campaign")
@click.option("--at", "start_at", metavar="TIME", help="Start at TIME (ISO 8601 with offset); default: now.")
@click.option("--priority", type=click.IntRange(-1000, 1000),
              help="Higher first within the tenant [default: the campaign's].")
@click.option("--deadline", metavar="TIME", help="Send nothing after TIME (ISO 8601 with offset).")
@click.option("--batch-size", type=click.IntRange(1, 100000), default=1000, show_default=True,
              help="Contacts per job.")
@click.option("--json", "as_json", is_flag=True, help="Print the new run as JSON.")
@click.pass_obj
def deploy(settings: Settings, campaign: str, start_at: str | None, priority: int | None, deadline: str | None,
           batch_size: int, as_json: bool) -> None:
    """Deploy CAMPAIGN: a new run, now or at --at. Refused (exit 5) with the failed launch
    checks when the campaign is not ready, or while it has an active run."""

    campaign_id = parse_uuid(campaign, "campaign id")
    start, end = parse_time(start_at, "--at"), parse_time(deadline, "--deadline")
    with kernel_database(settings) as conn:
        kernel = Kernel(conn, settings.schema)
        run_id = kernel.deploy_campaign(campaign_id, batch_size, start_at=start, priority=priority, deadline=end)
        run = kernel.run_details(run_id, 0)["run"]
    if as_json:
        click.echo(json.dumps({key: run[key] for key in ("id", "status", "priority", "start_at", "deadline")}))
        return
    when = f"starts {run['start_at']}" if run["start_at"] else "starts now"
    click.echo(f"deployed run {run_id}: {when}, priority {run['priority']}"
               + (f", deadline {run['deadline']}" if run["deadline"] else ""))

