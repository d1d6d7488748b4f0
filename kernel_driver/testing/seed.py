"""Seed host tables with a campaign and its audience: for the demo, certification and tests.

Everything goes into a fresh tenant and workspace (random ids) unless given, so seeded rows
never mix with real ones. Contacts are generated server-side, so a million costs one statement.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

EMAIL_CONTENT = {"subject": "Hello from the execution kernel", "text": "This is a test message."}
VOICE_CONTENT = {"from": "+15550000000", "script": "Hello, this is a test call from the execution kernel."}


@dataclass(frozen=True)
class SeededCampaign:
    tenant_id: uuid.UUID
    workspace_id: uuid.UUID
    campaign_id: uuid.UUID
    contacts: int
    reachable: int

    def address(self, n: int, channel: str) -> str:
        """The address contact number `n` (1-based) was given, when it has one."""
        if channel == "email":
            return f"c{n}@{self.workspace_id.hex[:12]}.example.test"
        return f"+1555{n:07d}"


def _audience_tenant(conn: psycopg.Connection, schema: str) -> str:
    """With its tenant_id (1.7) the audience trigger need not look it up row by row; the upgrade
    tests seed older kernels too, whose audience has no such column."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute"
        " WHERE attrelid = format('%%I.campaign_audience', %s::text)::regclass AND attname = 'tenant_id')",
        (schema,),
    ).fetchone()
    return ", tenant_id" if row and row[0] else ""


def seed_campaign(
    conn: psycopg.Connection,
    schema: str,
    *,
    contacts: int,
    channel: str = "email",
    provider: str = "noop",
    settings: dict[str, Any] | None = None,
    content: dict[str, Any] | None = None,
    unsubscribed_every: int = 0,
    no_address_every: int = 0,
    max_per_second: float | None = None,
    tenant_id: uuid.UUID | None = None,
    workspace_id: uuid.UUID | None = None,
    name: str = "seeded campaign",
) -> SeededCampaign:
    """Insert a campaign of `contacts` contacts (every n-th unsubscribed / without address) and
    the workspace's provider config for the channel, in one transaction."""
    tenant_id = tenant_id or uuid.uuid4()
    workspace_id = workspace_id or uuid.uuid4()
    campaign_id = uuid.uuid4()
    address_column = "email" if channel == "email" else "phone"
    tenant_column = _audience_tenant(conn, schema)
    params = {
        "tenant": tenant_id,
        "workspace": workspace_id,
        "campaign": campaign_id,
        "n": contacts,
        "unsub": unsubscribed_every,
        "noaddr": no_address_every,
    }
    statements = [
        """INSERT INTO {schema}.campaigns (id, tenant_id, workspace_id, name, channel, content)
           VALUES (%(campaign)s, %(tenant)s, %(workspace)s, %(name)s, %(channel)s, %(content)s)""",
        """INSERT INTO {schema}.provider_configs (workspace_id, channel, provider, settings, tenant_id, max_per_second)
           VALUES (%(workspace)s, %(channel)s, %(provider)s, %(settings)s, %(tenant)s, %(rate)s)
           ON CONFLICT ON CONSTRAINT provider_configs_pkey DO UPDATE
           SET provider = EXCLUDED.provider, settings = EXCLUDED.settings, max_per_second = EXCLUDED.max_per_second""",
        """INSERT INTO {schema}.contacts (tenant_id, workspace_id, """ + address_column + """, unsubscribed)
           SELECT %(tenant)s, %(workspace)s,
                  CASE WHEN %(noaddr)s > 0 AND g %% %(noaddr)s = 0 THEN NULL
                       ELSE """ + _address_sql(channel) + """ END,
                  %(unsub)s > 0 AND g %% %(unsub)s = 0
           FROM generate_series(1, %(n)s) AS g""",
        "INSERT INTO {schema}.campaign_audience (campaign_id, contact_id" + tenant_column + ")"
        " SELECT %(campaign)s, id" + tenant_column + " FROM {schema}.contacts WHERE workspace_id = %(workspace)s",
    ]
    params.update(
        name=name,
        channel=channel,
        content=json.dumps(content if content is not None else default_content(channel)),
        provider=provider,
        settings=json.dumps(settings or {}),
        rate=max_per_second,
    )
    with conn.transaction():
        for statement in statements:
            conn.execute(sql.SQL(statement).format(schema=sql.Identifier(schema)), params)
        reachable = conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {schema}.contacts WHERE workspace_id = %s"
                " AND NOT unsubscribed AND " + address_column + " IS NOT NULL"
            ).format(schema=sql.Identifier(schema)),
            (workspace_id,),
        ).fetchone()
    return SeededCampaign(tenant_id, workspace_id, campaign_id, contacts, reachable[0] if reachable else 0)


def default_content(channel: str) -> dict[str, Any]:
    return EMAIL_CONTENT if channel == "email" else VOICE_CONTENT


def _address_sql(channel: str) -> str:
    # Must match SeededCampaign.address.
    if channel == "email":
        return "'c' || g || '@' || left(replace(%(workspace)s::text, '-', ''), 12) || '.example.test'"
    return "'+1555' || lpad(g::text, 7, '0')"
