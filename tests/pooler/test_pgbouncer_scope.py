"""Tenant scoping through a real PgBouncer in transaction mode (issue 7, part 4).

Behind a transaction pooler the clients of one LOGIN role take turns on the same server
connection. A scope set on the session (1.0's documented ``SET execution_kernel.tenant_id``)
stays on that connection and scopes whichever client comes next; ``kernel.scope()`` (like
``SET LOCAL``) ends with its transaction, so no client ever sees rows of a scope it did not set.
"""

from __future__ import annotations

import random
import threading
import uuid
from dataclasses import dataclass, field

import psycopg
import pytest
from psycopg import sql

from tests.integration.daemon import client_dsn
from tests.pooler.conftest import StartPgBouncer, connect

Scope = tuple[uuid.UUID, uuid.UUID | None] | None  # (tenant, workspace or None), or unscoped


@dataclass
class Tenants:
    a: uuid.UUID = field(default_factory=uuid.uuid4)
    b: uuid.UUID = field(default_factory=uuid.uuid4)
    a1: uuid.UUID = field(default_factory=uuid.uuid4)  # A's workspaces
    a2: uuid.UUID = field(default_factory=uuid.uuid4)
    b1: uuid.UUID = field(default_factory=uuid.uuid4)  # B's

    def rows(self) -> set[tuple[uuid.UUID, uuid.UUID]]:
        return {(self.a, self.a1), (self.a, self.a2), (self.b, self.b1)}

    def visible_in(self, scope: Scope) -> set[tuple[uuid.UUID, uuid.UUID]]:
        if scope is None:
            return set()
        tenant, workspace = scope
        return {(t, w) for t, w in self.rows() if t == tenant and workspace in (None, w)}


@pytest.fixture
def tenants(db_dsn: str, kernel_schema: str) -> Tenants:
    """Tenant A with workspaces a1 and a2, tenant B with b1: campaigns and contacts in each."""
    found = Tenants()
    s = sql.Identifier(kernel_schema)
    with connect(db_dsn) as owner:
        for tenant, workspace in sorted(found.rows()):
            owner.execute(sql.SQL(
                "INSERT INTO {s}.campaigns (tenant_id, workspace_id, name, channel)"
                " SELECT %s, %s, 'campaign ' || g, 'email' FROM generate_series(1, 2) AS g").format(s=s),
                [tenant, workspace])
            owner.execute(sql.SQL(
                "INSERT INTO {s}.contacts (tenant_id, workspace_id, email)"
                " SELECT %s, %s, 'c' || g || '@example.com' FROM generate_series(1, 3) AS g").format(s=s),
                [tenant, workspace])
    return found


def visible(conn: psycopg.Connection, schema: str) -> set[tuple[uuid.UUID, uuid.UUID]]:
    """The (tenant, workspace) pairs of every campaign, contact and workspace the session sees."""
    return set(conn.execute(sql.SQL(
        "SELECT tenant_id, workspace_id FROM {s}.campaigns"
        " UNION SELECT tenant_id, workspace_id FROM {s}.contacts"
        " UNION SELECT tenant_id, id FROM {s}.workspaces").format(s=sql.Identifier(schema))).fetchall())


def scope(conn: psycopg.Connection, schema: str, tenant: uuid.UUID, workspace: uuid.UUID | None = None) -> None:
    conn.execute(sql.SQL("SELECT {}.scope(%s, %s)").format(sql.Identifier(schema)), [tenant, workspace])


def backend(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_a_session_level_scope_leaks_to_the_next_client_of_the_server_connection(pgbouncer, tenants):
    """Why the contract calls session scoping unsafe: 1.0's documented way, through the pooler."""
    app = pgbouncer.login("app")
    first, second = connect(pgbouncer.dsn(app)), connect(pgbouncer.dsn(app))
    first.execute("SELECT set_config('execution_kernel.tenant_id', %s, false)", [str(tenants.a)])
    assert visible(first, pgbouncer.schema) == tenants.visible_in((tenants.a, None))

    # The second client never set a tenant, yet its statements run on the first one's server
    # connection, which still carries tenant A: it counts A's rows.
    assert backend(first) == backend(second)
    assert visible(second, pgbouncer.schema) == tenants.visible_in((tenants.a, None))

    # The control: the same role straight to PostgreSQL, unscoped, sees nothing.
    with connect(client_dsn(pgbouncer.direct_dsn, user=app)) as direct:
        assert visible(direct, pgbouncer.schema) == set()
    first.close()
    second.close()


def test_a_dsn_scope_does_not_survive_the_pooler(start_pgbouncer: StartPgBouncer, tenants):
    """``options=-c execution_kernel.tenant_id=…`` scopes a direct connection; PgBouncer refuses
    the startup parameter, and when told to ignore it, drops it: the client runs unscoped (or, on a
    server connection a session-level SET scoped, as someone else)."""
    strict = start_pgbouncer(pool_size=1)
    lenient = start_pgbouncer(pool_size=1, ignore_startup_parameters="extra_float_digits, options")

    with connect(client_dsn(strict.direct_dsn, user=strict.login("app"), tenant=tenants.a)) as direct:
        assert visible(direct, strict.schema) == tenants.visible_in((tenants.a, None))  # the control
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter: options"):
        connect(client_dsn(strict.dsn(strict.login("app")), tenant=tenants.a))
    with connect(client_dsn(lenient.dsn(lenient.login("app")), tenant=tenants.a)) as pooled:
        assert pooled.execute("SELECT current_setting('execution_kernel.tenant_id', true)").fetchone()[0] in (None, "")
        assert visible(pooled, lenient.schema) == set()


def test_a_transaction_scope_ends_with_its_transaction(pgbouncer, tenants):
    app = pgbouncer.login("app")
    s = pgbouncer.schema
    first, second, third = (connect(pgbouncer.dsn(app)) for _ in range(3))

    with first.transaction():
        scope(first, s, tenants.a)
        assert visible(first, s) == tenants.visible_in((tenants.a, None))
        pid = backend(first)
    assert backend(second) == pid  # the same server connection, handed on at COMMIT
    assert visible(second, s) == set()

    with third.transaction():
        scope(third, s, tenants.b)
        assert backend(third) == pid
        assert visible(third, s) == tenants.visible_in((tenants.b, None))
    assert visible(first, s) == set()  # a client's own scope ended with its transaction too

    # A transaction that fails, or rolls back, takes its scope with it.
    with pytest.raises(psycopg.errors.DivisionByZero), first.transaction():
        scope(first, s, tenants.a, tenants.a2)
        first.execute("SELECT 1 / 0")
    assert visible(second, s) == set()
    with first.transaction():
        scope(first, s, tenants.a)
        raise psycopg.Rollback
    assert visible(second, s) == set()
    assert backend(second) == pid
    for conn in (first, second, third):
        conn.close()


@pytest.mark.parametrize("pool_size", [1, 2])
def test_no_client_ever_sees_rows_of_a_scope_it_did_not_set(start_pgbouncer, tenants, pool_size):
    """Application and reader clients, several threads each, interleave transactions through the
    pooler, each scoped to A, one of A's workspaces, B, or nothing; some fail or roll back. At the
    start of each, nothing is in scope; inside, exactly the rows of its own scope are visible."""
    bouncer = start_pgbouncer(pool_size=pool_size)
    scopes: list[Scope] = [None, (tenants.a, None), (tenants.a, tenants.a1), (tenants.a, tenants.a2),
                           (tenants.b, None)]
    clients = [("app", bouncer.login("app"))] * 4 + [("reader", bouncer.login("reader"))] * 2
    iterations = 40
    start = threading.Barrier(len(clients))
    used: list[tuple[str, int, int, Scope]] = []  # (role, client, backend pid, scope)
    failures: list[BaseException] = []

    def client(number: int, role: str, user: str) -> None:
        rng = random.Random(number)
        try:
            with connect(bouncer.dsn(user)) as conn:
                start.wait(10)
                for _ in range(iterations):
                    chosen = rng.choice(scopes)
                    ending = rng.choice(["commit", "commit", "rollback", "error"])
                    try:
                        with conn.transaction():
                            inherited = conn.execute(sql.SQL(
                                "SELECT {s}.current_tenant(), {s}.current_workspace(), pg_backend_pid()"
                            ).format(s=sql.Identifier(bouncer.schema))).fetchone()
                            assert inherited[:2] == (None, None), f"client {number} inherited {inherited}"
                            used.append((role, number, inherited[2], chosen))
                            if chosen is not None:
                                scope(conn, bouncer.schema, *chosen)
                            if rng.random() < 0.3:
                                conn.execute("SELECT pg_sleep(0.002)")  # let the others queue up
                            seen = visible(conn, bouncer.schema)
                            assert seen == tenants.visible_in(chosen), f"client {number} in {chosen} saw {seen}"
                            if ending == "error":
                                conn.execute("SELECT 1 / 0")
                            if ending == "rollback":
                                raise psycopg.Rollback
                    except psycopg.errors.DivisionByZero:
                        pass
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
            start.abort()

    threads = [threading.Thread(target=client, args=(n, role, user)) for n, (role, user) in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert len(used) == len(clients) * iterations

    # The control: the clients of each role really took turns on at most pool_size server
    # connections, under different scopes, so a scope left behind would have been seen.
    for role in ("app", "reader"):
        pids = {pid for r, _, pid, _ in used if r == role}
        assert len(pids) <= pool_size, (role, pids)
        shared = [pid for pid in pids
                  if len({c for r, c, p, _ in used if r == role and p == pid}) > 1
                  and len({sc for r, _, p, sc in used if r == role and p == pid}) > 2]
        assert shared, f"no {role} server connection served several clients and scopes"
