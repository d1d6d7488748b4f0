"""The console's world: two tenants in a fresh kernel database, and the console over it.

Tenant A has a run that ended partly failed (one of its three items failed), a queued run and a
campaign ready to deploy; tenant B has a run of its own. Tokens: one admin, one per tenant.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from psycopg_pool import ConnectionPool

from kernel_driver.config import Settings
from kernel_driver.console.app import Console, create_app
from kernel_driver.console.auth import Access, Tokens
from kernel_driver.queries import Kernel
from kernel_driver.testing.seed import SeededCampaign, seed_campaign
from tests.sql.helpers import drain_run

ADMIN_TOKEN = "admin-token-0123456789"
TENANT_A_TOKEN = "tenant-a-token-0123456789"
TENANT_B_TOKEN = "tenant-b-token-0123456789"


@dataclass(frozen=True)
class World:
    tenant_a: uuid.UUID
    tenant_b: uuid.UUID
    partly_failed_run: uuid.UUID  # A's: 1 failed item of 3, ended partial
    queued_run: uuid.UUID  # A's: deployed, not yet claimed
    ready_campaign: SeededCampaign  # A's: passes the launch checklist, never deployed
    unready_campaign: SeededCampaign  # A's: no audience
    other_run: uuid.UUID  # B's
    other_campaign: SeededCampaign  # B's

    def tokens(self) -> list[tuple[str, Access]]:
        return [(ADMIN_TOKEN, Access(None)), (TENANT_A_TOKEN, Access(self.tenant_a)),
                (TENANT_B_TOKEN, Access(self.tenant_b))]


@pytest.fixture
def world(conn, kernel_schema) -> World:
    kernel = Kernel(conn, kernel_schema)
    failing = seed_campaign(conn, kernel_schema, contacts=3, provider="noop", name="spring sale")
    outcomes = iter(["failed", "sent", "sent"])
    partly_failed = drain_run(conn, kernel.deploy_campaign(failing.campaign_id), lambda item: next(outcomes))
    tenant_a = failing.tenant_id
    queued = seed_campaign(conn, kernel_schema, contacts=2, provider="noop", name="summer sale", tenant_id=tenant_a)
    ready = seed_campaign(conn, kernel_schema, contacts=2, provider="noop", name="autumn sale", tenant_id=tenant_a)
    unready = seed_campaign(conn, kernel_schema, contacts=0, provider="noop", name="winter sale", tenant_id=tenant_a)
    other = seed_campaign(conn, kernel_schema, contacts=2, provider="noop", name="tenant b news")
    return World(
        tenant_a=tenant_a, tenant_b=other.tenant_id, partly_failed_run=partly_failed,
        queued_run=kernel.deploy_campaign(queued.campaign_id), ready_campaign=ready, unready_campaign=unready,
        other_run=kernel.deploy_campaign(other.campaign_id), other_campaign=other,
    )


@pytest.fixture
def console(db_dsn, kernel_schema, world) -> Iterator[Console]:
    with ConnectionPool(db_dsn, min_size=1, max_size=2, timeout=10,
                        kwargs={"autocommit": True, "prepare_threshold": None}) as pool:
        yield Console(Settings(dsn=db_dsn, schema=kernel_schema), Tokens(world.tokens()), pool)


@pytest.fixture
def client(console):
    return create_app(console).test_client()
