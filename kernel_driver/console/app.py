"""The web console (issue 11): server-rendered pages over the kernel's tables and functions.

Every request that touches the database runs in one transaction as a kernel role: an admin
token's as SCHEMA_operator (every tenant); a tenant token's as SCHEMA_reader, or SCHEMA_app for
a change, with the transaction scoped to its tenant (`SCHEMA.scope`). Row-level security and
the functions' own scope checks decide what exists; another tenant's run is "not found", as it
is for the kernel. Changes go through the kernel's functions only (deploy, retry, cancel).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from flask import Flask, abort, g, make_response, redirect, render_template, request, send_file, url_for
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from kernel_driver import __version__
from kernel_driver.campaigns import ADVICE
from kernel_driver.config import Settings
from kernel_driver.console.auth import Access, Tokens
from kernel_driver.console.certification import Certifier
from kernel_driver.console.data import PAGE, Reads
from kernel_driver.db import KernelError, NotFound, wrap_errors
from kernel_driver.errors import BadUsage
from kernel_driver.frozen import CHECK_IDS
from kernel_driver.queries import ITEM_STATUSES, RUN_STATUSES, TERMINAL_RUN_STATUSES, Kernel
from kernel_driver.runs import parse_time

log = logging.getLogger("kernel_driver.console")

COOKIE = "kernel_console"
MAX_REQUEST_BYTES = 64 * 1024  # forms here are a few fields; anything bigger is refused (413)

# The kernel's refusals, as HTTP statuses: a missing or foreign id is 404, a bad argument 400,
# anything else the kernel refuses (not ready, active run, nothing to retry) 409.
STATUS_BY_SQLSTATE = {"KE002": 404, "KE008": 400}


class Console:
    """What the app's requests share: settings, tokens, the pool, the certification runner."""

    def __init__(self, settings: Settings, tokens: Tokens, pool: ConnectionPool) -> None:
        self.settings = settings
        self.tokens = tokens
        self.pool = pool
        self.certifier = Certifier(settings)
        self.csrf_key = secrets.token_bytes(32)

    def role(self, access: Access, write: bool) -> sql.Identifier:
        suffix = "operator" if access.is_admin else ("app" if write else "reader")
        return sql.Identifier(f"{self.settings.schema}_{suffix}")

    @contextmanager
    def session(self, access: Access, *, write: bool = False) -> Iterator[tuple[Kernel, Reads]]:
        """One transaction as the access's role and scope."""
        with self.pool.connection() as conn, conn.transaction(), wrap_errors():
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(self.role(access, write)))
            if access.tenant_id is not None:
                conn.execute(sql.SQL("SELECT {}.scope(%s)").format(sql.Identifier(self.settings.schema)),
                             (access.tenant_id,))
            yield Kernel(conn, self.settings.schema), Reads(conn, self.settings.schema)

    def csrf(self, token: str) -> str:
        return hmac.new(self.csrf_key, token.encode(), hashlib.sha256).hexdigest()


def create_app(console: Console) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.jinja_env.globals.update(version=__version__, item_statuses=ITEM_STATUSES, run_statuses=RUN_STATUSES)
    app.jinja_env.filters["when"] = when

    # --- who is asking ------------------------------------------------------------------

    def presented_token() -> str | None:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return header.removeprefix("Bearer ").strip()
        return request.cookies.get(COOKIE)

    @app.before_request
    def authenticate() -> Response | None:
        if request.endpoint in ("login", "static"):
            return None
        token = presented_token()
        access = console.tokens.access(token)
        if access is None or token is None:
            if request.method == "GET" and not request.headers.get("Authorization"):
                return redirect(url_for("login", next=request.full_path.rstrip("?")))
            abort(401)
        g.access, g.token = access, token
        if request.method == "POST" and not hmac.compare_digest(request.form.get("csrf", ""), console.csrf(token)):
            abort(403, "this form is stale or came from another site: reload the page and try again")
        return None

    @app.context_processor
    def page_globals() -> dict[str, Any]:
        access = g.get("access")
        return {"access": access, "csrf": console.csrf(g.token) if access else ""}

    def admin_only() -> None:
        if not g.access.is_admin:
            abort(403, "this page is for platform admins: sign in with the console's admin token")

    @app.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        token = request.values.get("token", "")
        target = request.values.get("next", "")
        if not target.startswith("/") or target.startswith("//"):
            target = url_for("runs")
        if token:
            if console.tokens.access(token) is None:
                return render_template("login.html", failed=True, next=target), 401
            response = make_response(redirect(target))
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=request.is_secure)
            return response
        return render_template("login.html", failed=False, next=target)

    @app.post("/logout")
    def logout() -> Any:
        response = make_response(redirect(url_for("login")))
        response.delete_cookie(COOKIE)
        return response

    # --- runs ---------------------------------------------------------------------------

    @app.get("/")
    def runs() -> Any:
        status = choice(request.args.get("status"), RUN_STATUSES, "status")
        campaign = optional_uuid(request.args.get("campaign"), "campaign")
        # A tenant's token gets no tenant condition here: row-level security alone hides the rest.
        tenant = optional_uuid(request.args.get("tenant"), "tenant") if g.access.is_admin else None
        before = cursor(request.args.get("before"), datetime.fromisoformat, uuid.UUID)
        with console.session(g.access) as (_, reads):
            page = reads.runs(status=status, campaign_id=campaign, tenant_id=tenant, before=before)
            counts = reads.run_status_counts(tenant)
        older = (f"{page[-1]['created_at'].isoformat()}|{page[-1]['id']}" if len(page) == PAGE else None)
        context = {"runs": page, "counts": counts, "status": status, "campaign": campaign, "tenant": tenant,
                   "older": older, "filters": {"status": status, "campaign": campaign, "tenant": tenant}}
        if request.args.get("fragment") == "runs":
            return render_template("_runs_table.html", **context)
        return render_template("runs.html", **context)

    @app.get("/runs/<uuid:run_id>")
    def run(run_id: uuid.UUID) -> Any:
        item_status = choice(request.args.get("items"), ITEM_STATUSES, "items")
        after_job = cursor(request.args.get("jobs_after"), datetime.fromisoformat, uuid.UUID)
        before_event = cursor(request.args.get("events_before"), datetime.fromisoformat, int)
        with console.session(g.access) as (kernel, reads):
            found = existing_run(reads, run_id)
            # All items in id order (run_items, by the primary key), or one status by job.
            if item_status is None:
                items = kernel.run_items(run_id, None, optional_uuid(request.args.get("after"), "after"), PAGE)
                next_items = items[-1]["id"] if len(items) == PAGE else None
            else:
                items = reads.items_of_status(run_id, item_status,
                                              cursor(request.args.get("after"), uuid.UUID, uuid.UUID))
                next_items = f"{items[-1]['job_id']}|{items[-1]['id']}" if len(items) == PAGE else None
            context = {
                "run": found, "lineage": reads.lineage(found["root_run_id"]),
                "job_counts": reads.job_counts(run_id), "item_counts": reads.item_counts(run_id),
                "jobs": reads.jobs(run_id, after_job), "items": items, "next_items": next_items,
                "events": reads.events(run_id, before_event),
                "item_status": item_status, "page": PAGE,
                "terminal": found["status"] in TERMINAL_RUN_STATUSES,
            }
            if request.args.get("fragment") == "summary":
                return render_template("_run_summary.html", **context)
            # The drawer opens over the runs list, as the list's first page shows it.
            behind = {"runs": reads.runs(status=None, campaign_id=None, tenant_id=None, before=None),
                      "counts": reads.run_status_counts(None), "status": None, "campaign": None, "tenant": None,
                      "older": None, "filters": {}}
        return render_template("run.html", **context, **behind)

    @app.route("/runs/<uuid:run_id>/retry", methods=["GET", "POST"])
    def retry(run_id: uuid.UUID) -> Any:
        if request.method == "POST":
            include_unknown = request.form.get("include_unknown") == "yes"
            with console.session(g.access, write=True) as (kernel, _):
                new_run = kernel.retry_campaign_run(run_id, include_unknown)
            return redirect(url_for("run", run_id=new_run))
        return confirmation(run_id, "retry")

    @app.route("/runs/<uuid:run_id>/cancel", methods=["GET", "POST"])
    def cancel(run_id: uuid.UUID) -> Any:
        if request.method == "POST":
            with console.session(g.access, write=True) as (kernel, _):
                kernel.cancel_campaign_run(run_id)
            return redirect(url_for("run", run_id=run_id))
        return confirmation(run_id, "cancel")

    def confirmation(run_id: uuid.UUID, action: str) -> Any:
        """The question before a retry or a cancel, with the item counts it concerns."""
        with console.session(g.access) as (_, reads):
            found = existing_run(reads, run_id)
            counts = reads.item_counts(run_id)
        return render_template("confirm.html", run=found, action=action, counts=counts)

    # --- campaigns: the launch checklist and deploy ---------------------------------------

    @app.get("/campaigns")
    def campaigns() -> Any:
        after = request.args.get("after") or None
        with console.session(g.access) as (_, reads):
            page = reads.campaigns(after)
        later = f"{page[-1]['name']} {page[-1]['id']}" if len(page) == PAGE else None
        return render_template("campaigns.html", campaigns=page, later=later)

    @app.get("/campaigns/<uuid:campaign_id>")
    def checklist(campaign_id: uuid.UUID) -> Any:
        with console.session(g.access) as (kernel, reads):
            campaign = reads.campaign(campaign_id)
            if campaign is None:
                raise NotFound(f"campaign {campaign_id} not found")
            checks = kernel.launch_checks(campaign_id, campaign["workspace_id"])
        return render_template("checklist.html", campaign=campaign, checks=checks, advice=ADVICE,
                               ready=all(c.passed for c in checks))

    @app.post("/campaigns/<uuid:campaign_id>/deploy")
    def deploy(campaign_id: uuid.UUID) -> Any:
        try:
            start_at = parse_time(request.form.get("start_at") or None, "start")
            priority = int(request.form["priority"]) if request.form.get("priority") else None
        except (BadUsage, ValueError) as exc:
            abort(400, exc.message if isinstance(exc, BadUsage) else "priority must be a whole number")
        with console.session(g.access, write=True) as (kernel, _):
            run_id = kernel.deploy_campaign(campaign_id, None, start_at=start_at, priority=priority)
        return redirect(url_for("run", run_id=run_id))

    # --- certification (platform admins) ------------------------------------------------

    @app.get("/certification")
    def certification() -> Any:
        admin_only()
        latest = console.certifier.latest
        if request.args.get("fragment") == "status":
            return render_template("_certification_status.html", latest=latest)
        return render_template("certification.html", latest=latest, check_ids=CHECK_IDS)

    @app.post("/certification")
    def start_certification() -> Any:
        admin_only()
        checks = [check for check in CHECK_IDS if request.form.get(f"check_{check}") == "on"]
        if not checks:
            abort(400, "choose at least one check")
        try:
            console.certifier.start(checks)
        except RuntimeError as exc:
            abort(409, str(exc))
        return redirect(url_for("certification"))

    @app.get("/certification/evidence.json")
    def evidence() -> Any:
        admin_only()
        latest = console.certifier.latest
        if latest is None or latest.evidence is None:
            abort(404, "no evidence yet: run the certification first")
        return send_file(latest.evidence, mimetype="application/json", as_attachment=True,
                         download_name=f"evidence-{latest.started_at:%Y%m%dT%H%M%SZ}.json")

    # --- errors: a page that says what went wrong, never a traceback ----------------------

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        return error_page(exc.code or 500, exc.name, exc.description or "")

    @app.errorhandler(KernelError)
    def kernel_error(exc: KernelError) -> Any:
        code = STATUS_BY_SQLSTATE.get(exc.sqlstate, 409)
        title = {404: "Not found", 400: "Bad request"}.get(code, "Refused by the kernel")
        return error_page(code, title, f"{exc.message} ({exc.sqlstate})")

    @app.errorhandler(PoolTimeout)
    @app.errorhandler(psycopg.OperationalError)
    def database_down(exc: Exception) -> Any:
        log.warning("database unavailable: %s", exc)
        return error_page(503, "Database unavailable",
                          "the console cannot reach its database just now; the page will work again once it can")

    @app.errorhandler(psycopg.errors.InsufficientPrivilege)
    def not_granted(exc: psycopg.Error) -> Any:
        log.warning("insufficient privilege: %s", exc)
        schema = console.settings.schema
        return error_page(503, "Console not granted its roles",
                          f"the console's database login must be a member of {schema}_reader, {schema}_app and"
                          f" {schema}_operator (GRANT {schema}_reader, {schema}_app, {schema}_operator TO …):"
                          f" {exc.diag.message_primary}")

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> Any:
        reference = secrets.token_hex(4)
        log.exception("internal error %s on %s %s", reference, request.method, request.path)
        return error_page(500, "Internal error",
                          f"something went wrong in the console (reference {reference}, in its log)")

    def error_page(code: int, title: str, detail: str) -> Any:
        if request.headers.get("Accept", "").startswith("application/json"):
            return {"error": title, "detail": detail}, code
        return render_template("error.html", code=code, title=title, detail=detail), code

    return app


# --- request arguments ---------------------------------------------------------------------


def existing_run(reads: Reads, run_id: uuid.UUID) -> dict[str, Any]:
    """The run, as the request's role and scope see it; KE002 (404) when it does not exist there."""
    found = reads.run(run_id)
    if found is None:
        raise NotFound(f"run {run_id} not found")
    return found


def choice(value: str | None, allowed: tuple[str, ...], name: str) -> str | None:
    if not value:
        return None
    if value not in allowed:
        abort(400, f"{name} must be one of {', '.join(allowed)}")
    return value


def optional_uuid(value: str | None, name: str) -> uuid.UUID | None:
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        abort(400, f"{name} {value[:80]!r} is not a uuid")


def cursor(value: str | None, first: Callable[[str], Any], second: Callable[[str], Any]) -> tuple[Any, Any] | None:
    """A keyset cursor `A|B` from a page's own next or older link."""
    if not value:
        return None
    try:
        a, _, b = value.partition("|")
        return first(a), second(b)
    except ValueError:
        abort(400, "the page cursor is malformed: follow the page's own links")


def when(value: datetime | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.isoformat(sep=" ", timespec="seconds")

