-- 0002_kernel_1_1.sql: the execution kernel v1.1.0.
--
-- Tenant isolation that holds against a hostile session:
--   * the RLS predicates (current_tenant, current_workspace, in_scope) are SQL-standard
--     bodies, bound when they are created: a caller's search_path cannot shadow the
--     operators or functions they use (PostgreSQL 14 or newer);
--   * a workspace belongs to exactly one tenant (kernel.workspaces); every host row is
--     checked against it, and another tenant's workspace looks like a missing one (KE002);
--   * the worker form of complete_job refuses a NULL worker; an operator's completion
--     needs the new role kernel_operator (KE013);
--   * kernel.scope() scopes the current transaction, which is safe behind a pooler in
--     transaction mode (a session-level SET is not).
-- A hot path close to the floor:
--   * worker_step(): one transaction per batch of finished and started provider calls
--     for every job a daemon holds (fencing once per batch, results recorded, leases
--     renewed, finished jobs ended, new jobs claimed, new items inserted already
--     dispatched), with no session state (lease and tenant travel with each call);
--   * guard triggers that run only for the moves that need a check (WHEN clauses);
--     outbox indexes without status and a lower fillfactor, so recording is a HOT update.
-- Provider settings: the SQL rules are the adapters' rules (twilio needs neither
-- base_url nor from).
--
-- Every 1.0 function keeps its signature and contract, so 1.0 daemons keep working
-- during a rolling upgrade (docs/EXECUTION_KERNEL_FREEZE.md, "Upgrading").

DO $version$
BEGIN
    IF pg_catalog.current_setting('server_version_num')::integer < 140000 THEN
        RAISE EXCEPTION 'execution kernel 1.1 needs PostgreSQL 14 or newer; this server runs %',
            pg_catalog.current_setting('server_version')
            USING HINT = 'Upgrade the server (PostgreSQL 13 is out of support), or stay on kernel 1.0.0.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'kernel_operator') THEN
        CREATE ROLE kernel_operator NOLOGIN;
    END IF;
END
$version$;

-- Operators in the SQL-standard bodies below are bound now, to pg_catalog's.
SET LOCAL search_path = pg_catalog, pg_temp;
SET LOCAL ROLE kernel_owner;

-- Session scope, bound at creation -------------------------------------------

CREATE OR REPLACE FUNCTION kernel.current_tenant() RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE
-- SQL-standard body: parsed once, here, so it stays inlinable in the RLS policies and no
-- caller's search_path can change what nullif, the cast or the setting resolve to.
RETURN nullif(pg_catalog.current_setting('execution_kernel.tenant_id', TRUE), '')::pg_catalog.uuid;

CREATE OR REPLACE FUNCTION kernel.current_workspace() RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE
RETURN nullif(
    pg_catalog.current_setting('execution_kernel.workspace_id', TRUE), ''
)::pg_catalog.uuid;

CREATE OR REPLACE FUNCTION kernel.in_scope(p_tenant_id uuid, p_workspace_id uuid) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
RETURN p_tenant_id OPERATOR (pg_catalog.=) kernel.current_tenant()
AND (
    kernel.current_workspace() IS NULL
    OR p_workspace_id OPERATOR (pg_catalog.=) kernel.current_workspace()
);

COMMENT ON FUNCTION kernel.in_scope(uuid, uuid) IS
'RLS predicate: true when the row belongs to the session''s tenant (and workspace, when set). Bound at creation: the caller''s search_path cannot change it.';

CREATE FUNCTION kernel.scope(p_tenant_id uuid, p_workspace_id uuid DEFAULT NULL) RETURNS uuid
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_tenant_id IS NULL THEN
        RAISE EXCEPTION 'tenant_id must not be NULL' USING ERRCODE = 'KE008';
    END IF;
    -- Transaction-local (is_local): gone at COMMIT or ROLLBACK, so a pooled server
    -- connection carries no scope to the next client. (The SET clause above restores only
    -- search_path when the function returns.)
    PERFORM set_config('execution_kernel.workspace_id', coalesce(p_workspace_id::text, ''), TRUE);
    PERFORM set_config('execution_kernel.tenant_id', p_tenant_id::text, TRUE);
    RETURN p_tenant_id;
END
$$;

COMMENT ON FUNCTION kernel.scope(uuid, uuid) IS
'Scopes the current transaction to a tenant (and optionally one workspace), like SET LOCAL: call it right after BEGIN. Safe behind a transaction-mode pooler; a session-level SET is not.';

CREATE OR REPLACE FUNCTION kernel._require_scope() RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- Unscoped sessions are for the daemon, the platform operator and the owner.
    IF kernel.current_tenant() IS NULL
       AND NOT (pg_has_role(session_user, 'kernel_worker', 'MEMBER')
                OR pg_has_role(session_user, 'kernel_operator', 'MEMBER')
                OR pg_has_role(session_user, 'kernel_owner', 'MEMBER')) THEN
        RAISE EXCEPTION 'tenant scope required: role % must scope its transaction to a tenant', session_user
            USING ERRCODE = 'KE009',
                  HINT = 'BEGIN; SELECT kernel.scope(''<tenant uuid>''); … COMMIT; (or SET LOCAL execution_kernel.tenant_id)';
    END IF;
END
$$;

COMMENT ON FUNCTION kernel._require_scope() IS
'Raises KE009 when a session that is neither a worker, an operator nor the owner has no tenant scope.';

CREATE FUNCTION kernel._require_operator(p_what text) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT (pg_has_role(session_user, 'kernel_operator', 'MEMBER')
            OR pg_has_role(session_user, 'kernel_owner', 'MEMBER')) THEN
        RAISE EXCEPTION '% is for operators: role % is not a member of kernel_operator', p_what, session_user
            USING ERRCODE = 'KE013',
                  HINT = 'A daemon passes its worker id (complete_job(job, success, error, worker)).';
    END IF;
END
$$;

COMMENT ON FUNCTION kernel._require_operator(text) IS
'Raises KE013 unless the session user is a member of kernel_operator (or the owner).';

-- Workspaces: each belongs to one tenant -------------------------------------

CREATE TABLE kernel.workspaces (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- The target of the host tables' (tenant_id, workspace_id) foreign keys.
    CONSTRAINT workspaces_tenant_id_id_key UNIQUE (tenant_id, id)
);

COMMENT ON TABLE kernel.workspaces IS
'Which tenant owns each workspace. A workspace is registered by the first host row that names it and belongs to that row''s tenant for good; another tenant naming it gets KE002 (no such workspace).';

-- Register the workspaces of an existing 1.0 install. A workspace that two tenants already
-- share cannot be given to either without a decision, so the upgrade stops and says which.
DO $workspaces$
DECLARE
    _shared text;
BEGIN
    CREATE TEMPORARY TABLE _ws ON COMMIT DROP AS
    SELECT DISTINCT u.workspace_id, u.tenant_id FROM (
        SELECT workspace_id, tenant_id FROM kernel.campaigns
        UNION SELECT workspace_id, tenant_id FROM kernel.contacts
        UNION SELECT workspace_id, tenant_id FROM kernel.provider_configs WHERE tenant_id IS NOT NULL
        UNION SELECT workspace_id, tenant_id FROM kernel.campaign_runs
    ) AS u;
    SELECT string_agg(format('%s (tenants %s)', s.workspace_id, s.tenants), '; ') INTO _shared
    FROM (
        SELECT workspace_id, string_agg(tenant_id::text, ', ' ORDER BY tenant_id) AS tenants
        FROM _ws GROUP BY workspace_id HAVING count(*) > 1
    ) AS s;
    IF _shared IS NOT NULL THEN
        RAISE EXCEPTION 'cannot upgrade: these workspaces are used by more than one tenant: %', _shared
            USING HINT = 'Decide which tenant owns each (docs/EXECUTION_CONTRACT.md, "Tenancy"), move or delete the other tenant''s rows, then migrate again.';
    END IF;
    INSERT INTO kernel.workspaces (id, tenant_id) SELECT workspace_id, tenant_id FROM _ws;
    UPDATE kernel.provider_configs AS p SET tenant_id = w.tenant_id
    FROM kernel.workspaces AS w
    WHERE p.tenant_id IS NULL AND w.id = p.workspace_id;
    SELECT string_agg(format('%s/%s', workspace_id, channel), ', ') INTO _shared
    FROM kernel.provider_configs WHERE tenant_id IS NULL;
    IF _shared IS NOT NULL THEN
        RAISE EXCEPTION 'cannot upgrade: provider_configs % have no tenant_id and no tenant uses their workspace', _shared
            USING HINT = 'Set their tenant_id (or delete them), then migrate again.';
    END IF;
END
$workspaces$;

ALTER TABLE kernel.provider_configs ALTER COLUMN tenant_id SET NOT NULL;

ALTER TABLE kernel.campaigns
ADD CONSTRAINT campaigns_workspace_owner_fkey FOREIGN KEY (tenant_id, workspace_id)
REFERENCES kernel.workspaces (tenant_id, id);

ALTER TABLE kernel.contacts
ADD CONSTRAINT contacts_workspace_owner_fkey FOREIGN KEY (tenant_id, workspace_id)
REFERENCES kernel.workspaces (tenant_id, id);

ALTER TABLE kernel.provider_configs
ADD CONSTRAINT provider_configs_workspace_owner_fkey FOREIGN KEY (tenant_id, workspace_id)
REFERENCES kernel.workspaces (tenant_id, id);

CREATE FUNCTION kernel._workspace_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _scope uuid := kernel.current_tenant();
    _owner uuid;
BEGIN
    NEW.tenant_id := coalesce(NEW.tenant_id, _scope);
    IF NEW.tenant_id IS NULL OR NEW.workspace_id IS NULL THEN
        RAISE EXCEPTION '% rows need a tenant_id and a workspace_id', TG_TABLE_NAME
            USING ERRCODE = 'KE008', HINT = 'Scope the transaction (kernel.scope) or set tenant_id.';
    END IF;
    SELECT tenant_id INTO _owner FROM kernel.workspaces WHERE id = NEW.workspace_id;
    IF NOT FOUND AND (_scope IS NULL OR NEW.tenant_id = _scope) THEN
        -- First use registers the workspace; a concurrent first use by another tenant waits
        -- for this one and then finds it taken.
        INSERT INTO kernel.workspaces (id, tenant_id) VALUES (NEW.workspace_id, NEW.tenant_id)
        ON CONFLICT (id) DO NOTHING;
        SELECT tenant_id INTO _owner FROM kernel.workspaces WHERE id = NEW.workspace_id;
    END IF;
    -- Checked before the row reaches any unique index: another tenant's workspace (or a
    -- row for a tenant outside the session's scope) reveals nothing, not even its keys.
    IF _owner IS DISTINCT FROM NEW.tenant_id OR NEW.tenant_id <> coalesce(_scope, NEW.tenant_id) THEN
        RAISE EXCEPTION 'workspace % not found', NEW.workspace_id
            USING ERRCODE = 'KE002',
                  HINT = 'A workspace belongs to the tenant whose row named it first.';
    END IF;
    RETURN NEW;
END
$$;

COMMENT ON FUNCTION kernel._workspace_guard() IS
'Trigger: fills tenant_id from the scope, registers a new workspace to the row''s tenant, and refuses another tenant''s workspace as not found (KE002), before any unique check.';

CREATE TRIGGER campaigns_workspace_guard
BEFORE INSERT OR UPDATE OF tenant_id, workspace_id ON kernel.campaigns
FOR EACH ROW EXECUTE FUNCTION kernel._workspace_guard();

CREATE TRIGGER contacts_workspace_guard
BEFORE INSERT OR UPDATE OF tenant_id, workspace_id ON kernel.contacts
FOR EACH ROW EXECUTE FUNCTION kernel._workspace_guard();

CREATE TRIGGER provider_configs_workspace_guard
BEFORE INSERT OR UPDATE OF tenant_id, workspace_id ON kernel.provider_configs
FOR EACH ROW EXECUTE FUNCTION kernel._workspace_guard();

CREATE FUNCTION kernel._campaign_audience_scope_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- Before the foreign keys and the primary key look at the row: for a scoped session,
    -- another tenant's campaign or contact is missing, whether or not it exists.
    IF NOT EXISTS (
        SELECT 1 FROM kernel.campaigns AS c
        WHERE c.id = NEW.campaign_id AND kernel.in_scope(c.tenant_id, c.workspace_id)
    ) THEN
        RAISE EXCEPTION 'campaign % not found', NEW.campaign_id USING ERRCODE = 'KE002';
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM kernel.contacts AS p
        WHERE p.id = NEW.contact_id AND kernel.in_scope(p.tenant_id, p.workspace_id)
    ) THEN
        RAISE EXCEPTION 'contact % not found', NEW.contact_id USING ERRCODE = 'KE002';
    END IF;
    RETURN NEW;
END
$$;

COMMENT ON FUNCTION kernel._campaign_audience_scope_guard() IS
'Trigger for scoped sessions: an audience row naming a campaign or contact outside the scope is refused as not found (KE002), before any key check can reveal it.';

CREATE TRIGGER campaign_audience_scope_guard
BEFORE INSERT OR UPDATE ON kernel.campaign_audience
FOR EACH ROW WHEN (kernel.current_tenant() IS NOT NULL)
EXECUTE FUNCTION kernel._campaign_audience_scope_guard();

-- Provider settings: the same rules as the shipped adapters ------------------

CREATE FUNCTION kernel._setting_problem(p_kind text, p_value jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- kernel_driver/providers/settings.py, kind by kind; NULL when the value is fine.
    RETURN CASE p_kind
        WHEN 'text' THEN CASE WHEN jsonb_typeof(p_value) = 'string'
                                   AND btrim(p_value #>> '{}', E' \t\n\r\f\v') <> '' THEN NULL
                              ELSE 'must be a non-empty string' END
        WHEN 'tcp_port' THEN CASE WHEN jsonb_typeof(p_value) = 'number'
                                       AND (p_value #>> '{}')::numeric BETWEEN 1 AND 65535
                                       AND (p_value #>> '{}')::numeric % 1 = 0
                                       AND (p_value #>> '{}') !~ '[.eE]' THEN NULL
                                  ELSE 'must be an integer from 1 to 65535' END
        WHEN 'positive_number' THEN CASE WHEN jsonb_typeof(p_value) = 'number'
                                              AND (p_value #>> '{}')::numeric > 0 THEN NULL
                                         ELSE 'must be a number greater than 0' END
        WHEN 'non_negative_number' THEN CASE WHEN jsonb_typeof(p_value) = 'number'
                                                  AND (p_value #>> '{}')::numeric >= 0 THEN NULL
                                             ELSE 'must be a number, 0 or more' END
        WHEN 'boolean' THEN CASE WHEN jsonb_typeof(p_value) = 'boolean' THEN NULL
                                 ELSE 'must be true or false' END
        WHEN 'env_name' THEN CASE WHEN jsonb_typeof(p_value) = 'string'
                                       AND (p_value #>> '{}') ~ '^[A-Za-z_][A-Za-z0-9_]*$' THEN NULL
                                  ELSE 'must be the name of an environment variable (letters, digits, _)' END
        WHEN 'email_address' THEN CASE WHEN jsonb_typeof(p_value) = 'string'
                                            AND position('@' IN p_value #>> '{}') > 0 THEN NULL
                                       ELSE 'must be an e-mail address such as news@example.com' END
        WHEN 'http_url' THEN CASE WHEN jsonb_typeof(p_value) = 'string'
                                       AND (p_value #>> '{}') ~* '^https?://([^/?#@]*@)?[^/?#:@]+' THEN NULL
                                  ELSE 'must be an http:// or https:// URL' END
    END;
END
$$;

COMMENT ON FUNCTION kernel._setting_problem(text, jsonb) IS
'What is wrong with one provider setting value of a kind (text, tcp_port, positive_number, non_negative_number, boolean, env_name, email_address, http_url), or NULL.';

CREATE OR REPLACE FUNCTION kernel.provider_settings_problems(
    p_provider text, p_channel text, p_settings jsonb
)
RETURNS text[]
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _problems text[] := '{}'::text[];
    _rule record;
BEGIN
    IF p_settings IS NULL OR jsonb_typeof(p_settings) <> 'object' THEN
        RETURN ARRAY['settings must be a JSON object'];
    END IF;
    IF p_provider = 'smtp' AND p_channel IS DISTINCT FROM 'email'
       OR p_provider = 'twilio' AND p_channel IS DISTINCT FROM 'voice' THEN
        _problems := _problems || format('provider %s cannot serve channel %s', p_provider, p_channel);
    END IF;
    -- Each shipped adapter's settings_schema; a JSON null counts as absent, as in Python.
    FOR _rule IN
        SELECT s.key, s.kind, s.required, p_settings -> s.key AS value
        FROM (VALUES
            ('smtp', 'host', 'text', TRUE), ('smtp', 'port', 'tcp_port', TRUE),
            ('smtp', 'from', 'email_address', TRUE), ('smtp', 'starttls', 'boolean', FALSE),
            ('smtp', 'ssl', 'boolean', FALSE), ('smtp', 'username_env', 'env_name', FALSE),
            ('smtp', 'password_env', 'env_name', FALSE), ('smtp', 'timeout_s', 'positive_number', FALSE),
            ('smtp', 'ca_file', 'text', FALSE),
            ('twilio', 'base_url', 'http_url', FALSE), ('twilio', 'account_sid', 'text', TRUE),
            ('twilio', 'auth_token_env', 'env_name', TRUE), ('twilio', 'from', 'text', FALSE),
            ('twilio', 'timeout_s', 'positive_number', FALSE),
            ('webhook', 'url', 'http_url', TRUE), ('webhook', 'secret_env', 'env_name', FALSE),
            ('webhook', 'timeout_s', 'positive_number', FALSE),
            ('noop', 'latency_ms', 'non_negative_number', FALSE)
        ) AS s (provider, key, kind, required)
        WHERE s.provider = p_provider
    LOOP
        IF _rule.value IS NULL OR _rule.value = 'null'::jsonb THEN
            IF _rule.required THEN
                _problems := _problems || format('%s setting ''%s'' is required', p_provider, _rule.key);
            END IF;
        ELSIF kernel._setting_problem(_rule.kind, _rule.value) IS NOT NULL THEN
            _problems := _problems || format('%s setting ''%s'' %s', p_provider, _rule.key,
                                             kernel._setting_problem(_rule.kind, _rule.value));
        END IF;
    END LOOP;
    IF p_provider = 'smtp' THEN
        IF p_settings -> 'ssl' = 'true' AND p_settings -> 'starttls' = 'true' THEN
            _problems := _problems || 'smtp settings ''ssl'' and ''starttls'' cannot both be true'::text;
        END IF;
        IF (coalesce(p_settings ->> 'username_env', '') = '') <> (coalesce(p_settings ->> 'password_env', '') = '') THEN
            _problems := _problems
                || 'smtp settings ''username_env'' and ''password_env'' go together: set both or neither'::text;
        END IF;
    END IF;
    RETURN _problems;
END
$$;

COMMENT ON FUNCTION kernel.provider_settings_problems(text, text, jsonb) IS
'Readable problems with a provider''s settings for a channel (empty when valid): the same rules as the shipped adapters'' settings_schema (a parity test keeps them equal). Plug-in providers are validated by their adapter.';

-- Guards that run only where a check is needed ------------------------------
-- state_transitions allows an item every move out of pending (tests/sql/test_state_machines
-- keeps it so), and channel_outbox_status_check bounds the statuses: so an UPDATE of a
-- pending item to sent, failed or unknown that sets completed_at itself needs no check,
-- and the guard is not called for it (the WHEN clause is evaluated without PL/pgSQL).

CREATE OR REPLACE FUNCTION kernel._channel_outbox_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status NOT IN ('pending', 'skipped') THEN
            RAISE EXCEPTION 'an outbox item must start pending or skipped, not % (key %)',
                NEW.status, NEW.idempotency_key USING ERRCODE = 'KE004';
        END IF;
        NEW.completed_at := coalesce(NEW.completed_at, clock_timestamp());  -- skipped: terminal at once
        RETURN NEW;
    END IF;
    IF OLD.status <> 'pending' THEN
        RAISE EXCEPTION 'outbox item % is % (terminal) and cannot change', OLD.id, OLD.status
            USING ERRCODE = 'KE012';
    END IF;
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        PERFORM kernel._assert_transition('item', NEW.id, OLD.status, NEW.status);
        IF NEW.status = 'skipped' AND (
            OLD.dispatched_at IS NOT NULL
            OR NOT EXISTS (
                SELECT 1 FROM kernel.campaign_runs
                WHERE id = NEW.run_id AND status = 'cancelled'
            )
        ) THEN
            RAISE EXCEPTION 'outbox item % can be skipped only while never dispatched and its run cancelled', NEW.id
                USING ERRCODE = 'KE004';
        END IF;
        NEW.completed_at := coalesce(NEW.completed_at, clock_timestamp());
    END IF;
    RETURN NEW;
END
$$;

COMMENT ON FUNCTION kernel._channel_outbox_guard() IS
'Trigger: items start pending or skipped, move only along state_transitions, and never change once terminal (KE012); stamps completed_at when the statement did not.';

DROP TRIGGER channel_outbox_guard ON kernel.channel_outbox;

CREATE TRIGGER channel_outbox_guard_insert
BEFORE INSERT ON kernel.channel_outbox
FOR EACH ROW WHEN (new.status <> 'pending')
EXECUTE FUNCTION kernel._channel_outbox_guard();

CREATE TRIGGER channel_outbox_guard_update
BEFORE UPDATE ON kernel.channel_outbox
FOR EACH ROW WHEN (
    old.status <> 'pending' OR new.status = 'skipped'
    OR (new.status <> 'pending' AND new.completed_at IS NULL)
)
EXECUTE FUNCTION kernel._channel_outbox_guard();

-- Rows from 1.0 may lack completed_at (skipped items); every new terminal row has it.
ALTER TABLE kernel.channel_outbox
ADD CONSTRAINT channel_outbox_terminal_has_completed_at CHECK (
    status = 'pending' OR completed_at IS NOT NULL
) NOT VALID;

DROP TRIGGER job_queue_guard ON kernel.job_queue;

CREATE TRIGGER job_queue_guard_insert
BEFORE INSERT ON kernel.job_queue
FOR EACH ROW WHEN (new.status <> 'queued')
EXECUTE FUNCTION kernel._job_queue_guard();

-- Jobs and runs: the moves of a whole statement checked and recorded at once, from its
-- transition tables. 1.0 did it in a row trigger: for one one-contact job, four PL/pgSQL
-- trigger calls, four _assert_transition calls and four one-row INSERTs into job_events,
-- a quarter of the job's database time (pg_stat_statements, docs/benchmarks.md).

CREATE FUNCTION kernel._job_queue_moves() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _bad record;
BEGIN
    -- A move is a new status, holder or (while processing) attempt; a lease renewal or a
    -- reservation is none. One statement records every move and finds the first refused one
    -- (in id order); raising then undoes the whole UPDATE, its events included.
    WITH moves AS (
        SELECT n.*, o.status AS from_status, o.locked_by AS old_locked_by,
               o.lease_expires_at AS old_lease_expires_at
        FROM new_rows AS n INNER JOIN old_rows AS o ON n.id = o.id
        WHERE NOT (n.status = o.status AND n.locked_by IS NOT DISTINCT FROM o.locked_by
                   AND (n.status <> 'processing' OR n.attempts = o.attempts))
    ), recorded AS (
        INSERT INTO kernel.job_events (
            tenant_id, workspace_id, run_id, job_id, entity, from_status, to_status, worker, detail
        )
        SELECT m.tenant_id, m.workspace_id, m.run_id, m.id, 'job', m.from_status, m.status,
               coalesce(m.locked_by, m.old_locked_by),
               CASE WHEN m.status = 'processing' THEN 'attempt ' || m.attempts ELSE m.last_error END
        FROM moves AS m ORDER BY m.id
    )
    SELECT m.id, m.from_status, m.status AS to_status, m.old_locked_by AS locked_by,
           m.old_lease_expires_at AS lease_expires_at, t.entity IS NULL AS illegal
    INTO _bad
    FROM moves AS m
    LEFT JOIN kernel.state_transitions AS t
        ON t.entity = 'job' AND m.from_status = t.from_status AND m.status = t.to_status
    WHERE t.entity IS NULL
       OR (m.from_status = 'processing' AND m.status = 'processing' AND m.old_lease_expires_at > now())
    ORDER BY m.id
    LIMIT 1;
    IF FOUND AND _bad.illegal THEN
        PERFORM kernel._assert_transition('job', _bad.id, _bad.from_status, _bad.to_status);  -- raises KE004
    ELSIF FOUND THEN
        RAISE EXCEPTION 'job % is leased to % until %; it can be re-claimed only after the lease expires',
            _bad.id, _bad.locked_by, _bad.lease_expires_at USING ERRCODE = 'KE004';
    END IF;
    RETURN NULL;
END
$$;

COMMENT ON FUNCTION kernel._job_queue_moves() IS
'Statement trigger: refuses illegal job transitions and re-claims of a live lease (KE004), and records every move of the statement in job_events.';

CREATE TRIGGER job_queue_moves
AFTER UPDATE ON kernel.job_queue
REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION kernel._job_queue_moves();

CREATE FUNCTION kernel._campaign_runs_moves() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _bad record;
BEGIN
    IF TG_OP = 'INSERT' THEN  -- a run starts queued (the row trigger refuses anything else)
        INSERT INTO kernel.job_events (tenant_id, workspace_id, run_id, entity, from_status, to_status, detail)
        SELECT n.tenant_id, n.workspace_id, n.id, 'run', NULL, n.status, n.error_message
        FROM new_rows AS n ORDER BY n.id;
        RETURN NULL;
    END IF;
    -- Every move recorded, the first illegal one (in id order) found, in one statement.
    WITH moves AS (
        SELECT n.*, o.status AS from_status
        FROM new_rows AS n INNER JOIN old_rows AS o ON n.id = o.id
        WHERE n.status IS DISTINCT FROM o.status
    ), recorded AS (
        INSERT INTO kernel.job_events (tenant_id, workspace_id, run_id, entity, from_status, to_status, detail)
        SELECT m.tenant_id, m.workspace_id, m.id, 'run', m.from_status, m.status, m.error_message
        FROM moves AS m ORDER BY m.id
    )
    SELECT m.id, m.from_status, m.status AS to_status INTO _bad
    FROM moves AS m
    LEFT JOIN kernel.state_transitions AS t
        ON t.entity = 'run' AND m.from_status = t.from_status AND m.status = t.to_status
    WHERE t.entity IS NULL
    ORDER BY m.id
    LIMIT 1;
    IF FOUND THEN
        PERFORM kernel._assert_transition('run', _bad.id, _bad.from_status, _bad.to_status);  -- raises KE004
    END IF;
    RETURN NULL;
END
$$;

COMMENT ON FUNCTION kernel._campaign_runs_moves() IS
'Statement triggers: refuse illegal run transitions (KE004) and record each new run and each move in job_events.';

DROP TRIGGER campaign_runs_guard ON kernel.campaign_runs;

-- _campaign_runs_guard (1.0) now only refuses a run inserted in another status than queued.
CREATE TRIGGER campaign_runs_guard_insert
BEFORE INSERT ON kernel.campaign_runs
FOR EACH ROW WHEN (new.status <> 'queued')
EXECUTE FUNCTION kernel._campaign_runs_guard();

CREATE TRIGGER campaign_runs_created
AFTER INSERT ON kernel.campaign_runs
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION kernel._campaign_runs_moves();

CREATE TRIGGER campaign_runs_moves
AFTER UPDATE ON kernel.campaign_runs
REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION kernel._campaign_runs_moves();

-- Indexes the hot path does not touch, and room on each page, so that recording an outcome
-- (status, provider id, timestamps) and renewing a lease are HOT updates.
DROP INDEX kernel.channel_outbox_by_job_status_idx;
DROP INDEX kernel.channel_outbox_by_run_status_idx;
CREATE INDEX channel_outbox_by_job_idx ON kernel.channel_outbox (job_id);
CREATE INDEX channel_outbox_by_run_idx ON kernel.channel_outbox (run_id);
ALTER TABLE kernel.channel_outbox SET (fillfactor = 60);

-- One key check per new item instead of two: its job, and that the job is of its run (the
-- run's existence follows from the job's own key). 1.0 checked job_id and run_id apart.
ALTER TABLE kernel.job_queue ADD CONSTRAINT job_queue_id_run_id_key UNIQUE (id, run_id);
ALTER TABLE kernel.channel_outbox
ADD CONSTRAINT channel_outbox_job_of_run_fkey FOREIGN KEY (job_id, run_id)
REFERENCES kernel.job_queue (id, run_id);
ALTER TABLE kernel.channel_outbox DROP CONSTRAINT channel_outbox_job_id_fkey;
ALTER TABLE kernel.channel_outbox DROP CONSTRAINT channel_outbox_run_id_fkey;

DROP INDEX kernel.job_queue_expired_lease_idx;
-- Serves the claim's expired-lease pass: the few processing jobs, whatever their lease.
CREATE INDEX job_queue_processing_idx ON kernel.job_queue (id) WHERE status = 'processing';
ALTER TABLE kernel.job_queue SET (fillfactor = 70);

-- Claiming ----------------------------------------------------------------------

CREATE FUNCTION kernel._claim_jobs(
    p_worker text, p_max_jobs integer, p_lease interval, p_tenant_id uuid
)
RETURNS SETOF kernel.job_queue
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _taken kernel.job_queue[];
    _exhausted kernel.job_queue;
BEGIN
    -- Expired leases first (their holder died: the crash path), then queued jobs due now.
    WITH expired AS (
        SELECT j.id FROM kernel.job_queue AS j
        WHERE j.status = 'processing' AND j.lease_expires_at < now()
          AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id))
          AND (p_tenant_id IS NULL OR j.tenant_id = p_tenant_id)
        ORDER BY j.lease_expires_at, j.id
        LIMIT p_max_jobs
        FOR UPDATE SKIP LOCKED
    ), due AS (
        SELECT j.id FROM kernel.job_queue AS j
        WHERE j.status = 'queued' AND j.run_after <= now()
          AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id))
          AND (p_tenant_id IS NULL OR j.tenant_id = p_tenant_id)
        ORDER BY j.priority DESC, j.run_after, j.id
        LIMIT p_max_jobs
        FOR UPDATE SKIP LOCKED
    ), candidates AS (
        -- Rows are locked as the limit pulls them, so no more than p_max_jobs are locked.
        SELECT id FROM expired UNION ALL SELECT id FROM due LIMIT p_max_jobs
    ), taken AS (
        UPDATE kernel.job_queue AS j
        SET status = CASE WHEN j.attempts >= j.max_attempts THEN 'failed' ELSE 'processing' END,
            attempts = least(j.attempts + 1, j.max_attempts),
            locked_by = CASE WHEN j.attempts >= j.max_attempts THEN NULL ELSE p_worker END,
            locked_at = now(),
            lease_expires_at = CASE WHEN j.attempts >= j.max_attempts THEN NULL ELSE now() + p_lease END,
            completed_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
            last_error = CASE WHEN j.attempts >= j.max_attempts
                THEN format('gave up after %s attempts (last: %s)', j.attempts, coalesce(j.last_error, 'lease expired'))
                ELSE j.last_error END
        FROM candidates AS c
        WHERE j.id = c.id
        RETURNING j AS job
    )
    SELECT coalesce(array_agg(t.job ORDER BY (t.job).priority DESC, (t.job).run_after, (t.job).id), '{}')
    INTO _taken FROM taken AS t;

    FOREACH _exhausted IN ARRAY _taken LOOP
        IF _exhausted.status = 'failed' THEN
            PERFORM kernel._end_unfinished_items(_exhausted.id, _exhausted.last_error);
            PERFORM kernel._finish_run_if_done(_exhausted.run_id);
        END IF;
    END LOOP;

    UPDATE kernel.campaign_runs SET status = 'running', started_at = now()
    WHERE status = 'queued'
      AND id IN (SELECT t.run_id FROM unnest(_taken) AS t WHERE t.status = 'processing');

    RETURN QUERY SELECT * FROM unnest(_taken) AS t WHERE t.status = 'processing';
END
$$;

COMMENT ON FUNCTION kernel._claim_jobs(text, integer, interval, uuid) IS
'The one claim (FOR UPDATE SKIP LOCKED): expired leases, then queued jobs due now, in the scope and the optional tenant; jobs at max_attempts are failed instead; their runs move to running.';

CREATE OR REPLACE FUNCTION kernel.claim_queued_jobs(p_worker text, p_max_jobs integer)
RETURNS SETOF kernel.job_queue
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM kernel._require(p_worker, 'worker');
    IF p_max_jobs IS NULL OR p_max_jobs NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'max_jobs must be between 1 and 1000, got %', p_max_jobs USING ERRCODE = 'KE008';
    END IF;
    PERFORM kernel._require_scope();
    RETURN QUERY SELECT * FROM kernel._claim_jobs(p_worker, p_max_jobs, kernel._lease_interval(), NULL);
END
$$;

CREATE FUNCTION kernel._finish_runs_if_done(p_run_ids uuid[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- Lock first, then look, in a statement of its own: it then sees what a concurrent
    -- completer of the same run committed while this one waited for the lock.
    PERFORM 1 FROM kernel.campaign_runs WHERE id = ANY (p_run_ids) ORDER BY id FOR UPDATE;
    WITH finished AS (
        SELECT r.id,
               count(*) FILTER (WHERE j.status = 'completed') AS jobs_completed,
               count(*) FILTER (WHERE j.status = 'failed') AS jobs_failed
        FROM kernel.campaign_runs AS r INNER JOIN kernel.job_queue AS j ON r.id = j.run_id
        WHERE r.id = ANY (p_run_ids) AND r.status IN ('queued', 'running')
        GROUP BY r.id
        HAVING count(*) FILTER (WHERE j.status IN ('queued', 'processing')) = 0
    ), decided AS (
        SELECT f.id, f.jobs_completed, f.jobs_failed, i.sent, i.bad,
               CASE WHEN f.jobs_failed = 0 AND i.bad = 0 THEN 'completed'
                    WHEN f.jobs_completed = 0 OR (i.sent = 0 AND i.bad > 0) THEN 'failed'
                    ELSE 'partial' END AS status
        FROM finished AS f
        CROSS JOIN LATERAL (
            SELECT count(*) FILTER (WHERE o.status = 'sent') AS sent,
                   count(*) FILTER (WHERE o.status IN ('failed', 'unknown')) AS bad
            FROM kernel.channel_outbox AS o WHERE o.run_id = f.id
        ) AS i
    )
    UPDATE kernel.campaign_runs AS r
    SET status = d.status,
        started_at = coalesce(r.started_at, now()),
        completed_at = now(),
        error_message = CASE WHEN d.status = 'completed' THEN NULL ELSE
            format('%s of %s jobs failed; %s items failed or unknown, %s sent',
                   d.jobs_failed, d.jobs_failed + d.jobs_completed, d.bad, d.sent) END
    FROM decided AS d
    WHERE r.id = d.id;
END
$$;

COMMENT ON FUNCTION kernel._finish_runs_if_done(uuid[]) IS
'Invariant 4 for several runs at once (as _finish_run_if_done): each run whose jobs are all terminal gets its status from the job and item outcomes.';

-- Rate limits ------------------------------------------------------------------

CREATE FUNCTION kernel._take_rate_tokens(
    p_workspace_id uuid, p_provider text, p_wanted integer,
    OUT granted integer, OUT wait_seconds double precision
)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _rate numeric;
    _bucket kernel.rate_buckets;
    _tokens double precision;
BEGIN
    SELECT min(max_per_second) INTO _rate FROM kernel.provider_configs
    WHERE workspace_id = p_workspace_id AND provider = p_provider;
    wait_seconds := 0;
    IF _rate IS NULL THEN
        granted := p_wanted;  -- no limit configured
        RETURN;
    END IF;
    INSERT INTO kernel.rate_buckets (workspace_id, provider, tokens, refreshed_at)
    VALUES (p_workspace_id, p_provider, greatest(_rate, 1), clock_timestamp())
    ON CONFLICT (workspace_id, provider) DO NOTHING;
    SELECT * INTO _bucket FROM kernel.rate_buckets
    WHERE workspace_id = p_workspace_id AND provider = p_provider FOR UPDATE;
    -- Refill at the configured rate; the burst is one second's worth.
    _tokens := least(greatest(_rate, 1),
                     _bucket.tokens + _rate * extract(EPOCH FROM clock_timestamp() - _bucket.refreshed_at));
    granted := least(p_wanted, floor(_tokens))::integer;
    UPDATE kernel.rate_buckets SET tokens = _tokens - granted, refreshed_at = clock_timestamp()
    WHERE workspace_id = p_workspace_id AND provider = p_provider;
    IF granted = 0 AND p_wanted > 0 THEN
        wait_seconds := (1 - _tokens) / _rate;
    END IF;
END
$$;

COMMENT ON FUNCTION kernel._take_rate_tokens(uuid, text, integer) IS
'Shared token bucket (provider_configs.max_per_second, burst of one second): how many of p_wanted sends may start now, and when none may, how long until one can.';

CREATE OR REPLACE FUNCTION kernel.take_rate_tokens(
    p_workspace_id uuid, p_provider text, p_wanted integer
)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM kernel._require(p_workspace_id, 'workspace_id');
    PERFORM kernel._require(p_provider, 'provider');
    IF p_wanted IS NULL OR p_wanted < 0 THEN
        RAISE EXCEPTION 'wanted must be >= 0, got %', p_wanted USING ERRCODE = 'KE008';
    END IF;
    RETURN (kernel._take_rate_tokens(p_workspace_id, p_provider, p_wanted)).granted;
END
$$;

-- The daemon's hot path: one call per batch of finished and started calls ----------

CREATE FUNCTION kernel.worker_step(
    p_worker text,
    p_lease_seconds numeric,
    p_held uuid[],
    p_result_ids uuid[],
    p_result_outcomes text[],
    p_result_provider_ids text[],
    p_result_responses text[],
    p_result_errors text[],
    p_complete uuid[],
    p_fail uuid[],
    p_fail_errors text[],
    p_redispatch uuid[],
    p_want integer,
    p_claim integer,
    p_deduplicating text[],
    p_tenant_id uuid
)
RETURNS TABLE (
    kind text, job_id uuid, run_id uuid, item_id uuid,
    idempotency_key text, recipient text, contact_id uuid, detail jsonb
)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- Every statement below reaches its rows by key (the held jobs, the results, the next
-- contacts). The planner, which sees a fast-growing outbox through stale statistics (a fresh
-- table, autovacuum not yet there), would otherwise scan it whole: index paths only.
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    _lease interval;
    _results integer := coalesce(cardinality(p_result_ids), 0);
    _held uuid[];
    _recorded uuid[];
    _waiting uuid[];
    _ended uuid[] := '{}'::uuid[];
    _claimed kernel.job_queue[] := '{}'::kernel.job_queue[];
    _cancelled uuid[];
    _dispatchable uuid[];
    _job record;
    _ended_runs uuid[];
    _grant record;
    _cap_jobs uuid[] := '{}'::uuid[];
    _caps integer[] := '{}'::integer[];
    _want integer := p_want;
    _left integer;
    _n integer;
    _wait double precision;
BEGIN
    PERFORM kernel._require(p_worker, 'worker');
    IF p_lease_seconds IS NULL OR p_lease_seconds NOT BETWEEN 1 AND 3600 THEN
        RAISE EXCEPTION 'lease_seconds must be between 1 and 3600, got %', p_lease_seconds USING ERRCODE = 'KE008';
    END IF;
    IF p_want IS NULL OR p_want NOT BETWEEN 0 AND 10000 OR p_claim IS NULL OR p_claim NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'want must be between 0 and 10000 and claim between 0 and 1000, got % and %', p_want, p_claim
            USING ERRCODE = 'KE008';
    END IF;
    IF _results <> coalesce(cardinality(p_result_outcomes), 0)
       OR _results <> coalesce(cardinality(p_result_provider_ids), 0)
       OR _results <> coalesce(cardinality(p_result_responses), 0)
       OR _results <> coalesce(cardinality(p_result_errors), 0) THEN
        RAISE EXCEPTION 'the five result arrays must have one entry per result (% ids)', _results USING ERRCODE = 'KE008';
    END IF;
    IF coalesce(cardinality(p_fail), 0) <> coalesce(cardinality(p_fail_errors), 0) THEN
        RAISE EXCEPTION 'fail and fail_errors must have one entry per job' USING ERRCODE = 'KE008';
    END IF;
    IF coalesce(cardinality(p_redispatch), 0) > p_want THEN
        RAISE EXCEPTION 'redispatching % items exceeds want %', cardinality(p_redispatch), p_want USING ERRCODE = 'KE008';
    END IF;
    IF EXISTS (
        SELECT 1 FROM unnest(p_result_outcomes, p_result_provider_ids) AS r (outcome, provider_message_id)
        WHERE r.outcome IS NULL OR r.outcome NOT IN ('sent', 'failed', 'unknown', 'retry')
           OR (r.outcome = 'sent' AND coalesce(r.provider_message_id, '') = '')
    ) THEN
        RAISE EXCEPTION 'malformed results: each outcome is sent, failed, unknown or retry, and sent needs a provider_message_id'
            USING ERRCODE = 'KE008';
    END IF;
    PERFORM kernel._require_scope();
    _lease := p_lease_seconds * interval '1 second';

    -- 1. Fencing, once for the batch: lock the jobs this worker still holds. A job whose
    --    lease expired or was taken is lost: nothing is written for it from here on.
    SELECT coalesce(array_agg(q.id), '{}') INTO _held
    FROM (
        SELECT j.id FROM kernel.job_queue AS j
        WHERE j.id = ANY (p_held) AND j.status = 'processing'
          AND j.locked_by = p_worker AND j.lease_expires_at > now()
        ORDER BY j.id
        FOR NO KEY UPDATE
    ) AS q;
    RETURN QUERY
    SELECT 'lost', h.id, NULL::uuid, NULL::uuid, NULL::text, NULL::text, NULL::uuid, NULL::jsonb
    FROM unnest(p_held) AS h (id) WHERE h.id <> ALL (_held);

    -- 2. Record what the provider calls came to. A retry goes back undispatched with the
    --    same key (failed after 5 dispatches); the daemon gets it back as 'waiting'.
    IF _results > 0 THEN
        WITH r AS (
            SELECT * FROM unnest(p_result_ids, p_result_outcomes, p_result_provider_ids, p_result_responses, p_result_errors)
                AS x (id, outcome, provider_message_id, response, error)
        ), recorded AS (
            UPDATE kernel.channel_outbox AS o
            SET status = CASE WHEN r.outcome <> 'retry' THEN r.outcome
                              WHEN o.dispatch_count >= 5 THEN 'failed' ELSE 'pending' END,
                dispatched_at = CASE WHEN r.outcome = 'retry' AND o.dispatch_count < 5 THEN NULL ELSE o.dispatched_at END,
                provider_message_id = coalesce(r.provider_message_id, o.provider_message_id),
                provider_response = coalesce(r.response::jsonb, o.provider_response),
                error = CASE WHEN r.outcome = 'retry' AND o.dispatch_count >= 5
                             THEN format('gave up after %s dispatches: %s', o.dispatch_count, r.error) ELSE r.error END,
                sent_at = CASE WHEN r.outcome = 'sent' THEN clock_timestamp() END,
                completed_at = CASE WHEN r.outcome <> 'retry' OR o.dispatch_count >= 5 THEN clock_timestamp() END
            FROM r
            WHERE o.id = r.id AND o.job_id = ANY (_held) AND o.status = 'pending' AND o.dispatched_at IS NOT NULL
            RETURNING o.id, o.status
        )
        SELECT coalesce(array_agg(d.id), '{}'), coalesce(array_agg(d.id) FILTER (WHERE d.status = 'pending'), '{}')
        INTO _recorded, _waiting FROM recorded AS d;
        IF cardinality(_waiting) > 0 THEN
            RETURN QUERY
            SELECT 'waiting', o.job_id, o.run_id, o.id, o.idempotency_key, o.recipient, o.contact_id,
                   jsonb_build_object('dispatch_count', o.dispatch_count)
            FROM kernel.channel_outbox AS o WHERE o.id = ANY (_waiting);
        END IF;
        IF cardinality(_recorded) < _results THEN
            -- Results for held jobs that match no dispatched pending item: a daemon bug.
            RETURN QUERY
            SELECT 'stale', o.job_id, o.run_id, o.id, o.idempotency_key, o.recipient, o.contact_id,
                   jsonb_build_object('status', o.status, 'dispatched', o.dispatched_at IS NOT NULL)
            FROM kernel.channel_outbox AS o
            WHERE o.id = ANY (p_result_ids) AND o.job_id = ANY (_held) AND o.id <> ALL (_recorded);
        END IF;
    END IF;

    -- 3. Renew the leases that are a third gone: one statement for every job held, and none
    --    when no lease is due (job_queue's statement trigger would run for nothing).
    IF EXISTS (
        SELECT 1 FROM kernel.job_queue AS j
        WHERE j.id = ANY (_held) AND j.lease_expires_at < now() + _lease * 2 / 3
    ) THEN
        UPDATE kernel.job_queue AS j SET lease_expires_at = now() + _lease
        WHERE j.id = ANY (_held) AND j.lease_expires_at < now() + _lease * 2 / 3;
    END IF;

    -- 4. End the jobs the daemon has finished, checked here as complete_job checks them:
    --    no pending item, and an item for every contact unless the run was cancelled.
    IF cardinality(p_complete) > 0 THEN
        UPDATE kernel.channel_outbox AS o
        SET status = 'skipped', skipped = TRUE, skip_reason = 'run_cancelled', completed_at = clock_timestamp()
        FROM kernel.job_queue AS j INNER JOIN kernel.campaign_runs AS r ON j.run_id = r.id
        WHERE o.job_id = j.id AND j.id = ANY (p_complete) AND j.id = ANY (_held)
          AND r.status = 'cancelled' AND o.status = 'pending' AND o.dispatched_at IS NULL;
        WITH finished AS (
            SELECT j.id, r.status AS run_status
            FROM kernel.job_queue AS j
            INNER JOIN kernel.campaign_runs AS r ON j.run_id = r.id
            CROSS JOIN LATERAL (
                SELECT count(*) FILTER (WHERE o.status = 'pending') AS pending, count(*) AS items
                FROM kernel.channel_outbox AS o WHERE o.job_id = j.id
            ) AS c
            WHERE j.id = ANY (p_complete) AND j.id = ANY (_held) AND c.pending = 0
              AND (r.status = 'cancelled' OR c.items >= cardinality(j.contact_ids))
        ), ended AS (
            UPDATE kernel.job_queue AS j
            SET status = CASE WHEN f.run_status = 'cancelled' THEN 'cancelled' ELSE 'completed' END,
                completed_at = now(), last_error = NULL, locked_by = NULL, lease_expires_at = NULL
            FROM finished AS f WHERE j.id = f.id
            RETURNING j.id, j.run_id
        )
        SELECT coalesce(array_agg(e.id), '{}'), coalesce(array_agg(DISTINCT e.run_id), '{}')
        INTO _ended, _ended_runs FROM ended AS e;
        PERFORM kernel._finish_runs_if_done(_ended_runs);
    END IF;

    -- 4b. End the jobs the daemon cannot execute (their provider is unusable): what was never
    --     dispatched fails with the reason, contacts never reached get failed items.
    IF cardinality(p_fail) > 0 THEN
        FOR _job IN
            SELECT j AS job, f.error
            FROM kernel.job_queue AS j INNER JOIN unnest(p_fail, p_fail_errors) AS f (id, error) ON j.id = f.id
            WHERE j.id = ANY (_held) AND j.id <> ALL (_ended)
            ORDER BY j.id
        LOOP
            UPDATE kernel.channel_outbox AS o SET status = 'failed', error = _job.error
            WHERE o.job_id = (_job.job).id AND o.status = 'pending' AND o.dispatched_at IS NULL;
            PERFORM kernel._end_job(_job.job, FALSE, _job.error);
            _ended := _ended || (_job.job).id;
        END LOOP;
    END IF;
    IF cardinality(_ended) > 0 THEN
        RETURN QUERY
        SELECT 'done', j.id, j.run_id, NULL::uuid, NULL::text, NULL::text, NULL::uuid,
               jsonb_build_object('job_status', j.status, 'run_status', r.status)
        FROM kernel.job_queue AS j INNER JOIN kernel.campaign_runs AS r ON j.run_id = r.id
        WHERE j.id = ANY (_ended);
        _held := ARRAY(SELECT h FROM unnest(_held) AS h WHERE h <> ALL (_ended));
    END IF;

    -- 5. Claim new jobs. Items a lost holder left dispatched end unknown, or go back to
    --    be re-sent with the same key when the provider deduplicates.
    IF p_claim > 0 THEN
        SELECT coalesce(array_agg(c), '{}') INTO _claimed
        FROM kernel._claim_jobs(p_worker, p_claim, _lease, p_tenant_id) AS c;
        UPDATE kernel.channel_outbox AS o
        SET status = CASE WHEN d.dedup THEN 'pending' ELSE 'unknown' END,
            dispatched_at = CASE WHEN d.dedup THEN NULL ELSE o.dispatched_at END,
            completed_at = CASE WHEN d.dedup THEN NULL ELSE clock_timestamp() END,
            error = CASE WHEN d.dedup THEN o.error
                         ELSE 'worker lost after dispatch; the provider cannot deduplicate, so it is not re-sent' END
        FROM (
            SELECT c.id, (r.run_config ->> 'provider') = ANY (coalesce(p_deduplicating, '{}')) AS dedup
            FROM unnest(_claimed) AS c INNER JOIN kernel.campaign_runs AS r ON c.run_id = r.id
            WHERE c.attempts > 1
        ) AS d
        WHERE o.job_id = d.id AND o.status = 'pending' AND o.dispatched_at IS NOT NULL;
        RETURN QUERY
        SELECT 'job', c.id, c.run_id, NULL::uuid, NULL::text, NULL::text, NULL::uuid,
               jsonb_build_object(
                   'run_status', r.status, 'campaign_id', r.campaign_id, 'tenant_id', r.tenant_id,
                   'workspace_id', r.workspace_id, 'channel', r.channel, 'generation', r.generation,
                   'contact_count', cardinality(c.contact_ids),
                   'remaining', cardinality(c.contact_ids) - c.reserved_count, 'attempts', c.attempts
               ) || r.run_config
        FROM unnest(_claimed) AS c INNER JOIN kernel.campaign_runs AS r ON c.run_id = r.id;
        -- What a re-claimed job has reserved but not dispatched: the daemon sends it first.
        RETURN QUERY
        SELECT 'waiting', o.job_id, o.run_id, o.id, o.idempotency_key, o.recipient, o.contact_id,
               jsonb_build_object('dispatch_count', o.dispatch_count)
        FROM kernel.channel_outbox AS o
        WHERE o.job_id IN (SELECT c.id FROM unnest(_claimed) AS c WHERE c.attempts > 1)
          AND o.status = 'pending' AND o.dispatched_at IS NULL;
        _held := _held || ARRAY(SELECT c.id FROM unnest(_claimed) AS c);
    END IF;

    -- 6. Dispatch at most p_want items: the waiting ones the daemon names, then new items
    --    for the next contacts of each job's snapshot, inserted already dispatched (the
    --    commit of this transaction comes before any provider call).
    SELECT coalesce(array_agg(j.id) FILTER (WHERE r.status = 'cancelled'), '{}'),
           coalesce(array_agg(j.id ORDER BY j.locked_at, j.id)
                    FILTER (WHERE r.status <> 'cancelled' AND j.reserved_count < cardinality(j.contact_ids)), '{}')
    INTO _cancelled, _dispatchable
    FROM kernel.job_queue AS j INNER JOIN kernel.campaign_runs AS r ON j.run_id = r.id
    WHERE j.id = ANY (_held);
    RETURN QUERY
    SELECT 'cancelled', c, NULL::uuid, NULL::uuid, NULL::text, NULL::text, NULL::uuid, NULL::jsonb
    FROM unnest(_cancelled) AS c;

    IF cardinality(p_redispatch) > 0 THEN
        RETURN QUERY
        WITH again AS (
            UPDATE kernel.channel_outbox AS o
            SET dispatched_at = clock_timestamp(), dispatch_count = o.dispatch_count + 1
            WHERE o.id = ANY (p_redispatch) AND o.job_id = ANY (_held) AND o.job_id <> ALL (_cancelled)
              AND o.status = 'pending' AND o.dispatched_at IS NULL
            RETURNING o.job_id, o.run_id, o.id, o.idempotency_key, o.recipient, o.contact_id
        )
        SELECT 'item', a.job_id, a.run_id, a.id, a.idempotency_key, a.recipient, a.contact_id, NULL::jsonb
        FROM again AS a;
        GET DIAGNOSTICS _n = ROW_COUNT;
        _want := _want - _n;
    END IF;

    -- Shared rate limits: each limited job may start only what its bucket grants now.
    _left := _want;
    FOR _job IN
        SELECT j.id, j.workspace_id, r.run_config ->> 'provider' AS provider,
               cardinality(j.contact_ids) - j.reserved_count AS remaining
        FROM kernel.job_queue AS j INNER JOIN kernel.campaign_runs AS r ON j.run_id = r.id
        WHERE j.id = ANY (_dispatchable) AND _want > 0
          AND EXISTS (
              SELECT 1 FROM kernel.provider_configs AS p
              WHERE p.workspace_id = j.workspace_id AND p.provider = r.run_config ->> 'provider'
                AND p.max_per_second IS NOT NULL
          )
        ORDER BY j.locked_at, j.id
    LOOP
        _grant := kernel._take_rate_tokens(_job.workspace_id, _job.provider, least(_left, _job.remaining));
        _cap_jobs := _cap_jobs || _job.id;
        _caps := _caps || _grant.granted;
        _left := greatest(_left - _grant.granted, 0);
        IF _grant.granted = 0 THEN
            _wait := least(coalesce(_wait, _grant.wait_seconds), _grant.wait_seconds);
        END IF;
    END LOOP;
    IF _wait IS NOT NULL THEN
        RETURN QUERY
        SELECT 'wait', NULL::uuid, NULL::uuid, NULL::uuid, NULL::text, NULL::text, NULL::uuid,
               jsonb_build_object('seconds', _wait);
    END IF;

    IF _want > 0 AND cardinality(_dispatchable) > 0 THEN
        RETURN QUERY
        WITH held AS (
            SELECT j.id, j.run_id, j.tenant_id, j.workspace_id, j.contact_ids, j.reserved_count, j.locked_at,
                   cardinality(j.contact_ids) - j.reserved_count AS remaining,
                   r.channel, r.run_config ->> 'provider' AS provider, r.root_run_id, r.generation, k.cap
            FROM kernel.job_queue AS j
            INNER JOIN kernel.campaign_runs AS r ON j.run_id = r.id
            LEFT JOIN unnest(_cap_jobs, _caps) AS k (job_id, cap) ON j.id = k.job_id
            WHERE j.id = ANY (_dispatchable)
        ), ordered AS (
            -- Older jobs first; a job is looked at only while those before it may leave room.
            SELECT h.*, row_number() OVER w AS rank,
                   coalesce(sum(least(h.remaining, coalesce(h.cap, h.remaining)))
                       OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
            FROM held AS h
            WINDOW w AS (ORDER BY h.locked_at, h.id)
        ), candidates AS (
            -- The next contacts of each snapshot; unreachable ones become skipped items and
            -- take no slot, so a little more than the window is looked at.
            SELECT h.id AS job_id, h.rank, u.ord, u.contact_id, h.run_id, h.tenant_id, h.workspace_id,
                   h.channel, h.provider, h.root_run_id, h.generation, h.cap, s.recipient, s.reason
            FROM ordered AS h
            CROSS JOIN LATERAL unnest(
                h.contact_ids[h.reserved_count + 1:h.reserved_count + least(h.remaining, _want + 16)]
            ) WITH ORDINALITY AS u (contact_id, ord)
            LEFT JOIN kernel.contacts AS p ON u.contact_id = p.id
            CROSS JOIN LATERAL (
                SELECT nullif(btrim(CASE h.channel WHEN 'email' THEN p.email ELSE p.phone END), '') AS recipient
            ) AS a
            CROSS JOIN LATERAL (
                SELECT a.recipient,
                       CASE WHEN p.id IS NULL THEN 'contact_deleted'
                            WHEN p.unsubscribed THEN 'unsubscribed'
                            WHEN a.recipient IS NULL THEN 'no_address' END AS reason
            ) AS s
            WHERE h.before < _want AND coalesce(h.cap, 1) > 0
        ), counted AS (
            SELECT c.*,
                   count(*) FILTER (WHERE c.reason IS NULL)
                       OVER (ORDER BY c.rank, c.ord ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS sendable_before,
                   count(*) FILTER (WHERE c.reason IS NULL)
                       OVER (PARTITION BY c.job_id ORDER BY c.ord ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
                       AS job_sendable_before
            FROM candidates AS c
        ), taken AS (
            SELECT * FROM counted AS c
            WHERE c.sendable_before < _want AND (c.cap IS NULL OR c.job_sendable_before < c.cap)
        ), inserted AS (
            INSERT INTO kernel.channel_outbox AS o (
                run_id, job_id, tenant_id, workspace_id, channel, provider, status, idempotency_key,
                skipped, skip_reason, contact_id, recipient, root_run_id, generation,
                dispatched_at, dispatch_count, completed_at
            )
            SELECT t.run_id, t.job_id, t.tenant_id, t.workspace_id, t.channel, t.provider,
                   CASE WHEN t.reason IS NULL THEN 'pending' ELSE 'skipped' END,
                   format('%s:%s:%s:%s', t.root_run_id, t.channel, t.contact_id, t.generation),
                   t.reason IS NOT NULL, t.reason, t.contact_id, t.recipient, t.root_run_id, t.generation,
                   CASE WHEN t.reason IS NULL THEN clock_timestamp() END,
                   CASE WHEN t.reason IS NULL THEN 1 ELSE 0 END,
                   CASE WHEN t.reason IS NOT NULL THEN clock_timestamp() END
            FROM taken AS t
            ORDER BY t.rank, t.ord
            ON CONFLICT (idempotency_key) DO NOTHING
            RETURNING o.job_id, o.run_id, o.id, o.idempotency_key, o.recipient, o.contact_id, o.status
        ), advanced AS (
            UPDATE kernel.job_queue AS j SET reserved_count = j.reserved_count + n.taken
            FROM (SELECT t.job_id, count(*) AS taken FROM taken AS t GROUP BY t.job_id) AS n
            WHERE j.id = n.job_id
            RETURNING j.id, j.run_id, cardinality(j.contact_ids) - j.reserved_count AS remaining
        )
        SELECT 'item', i.job_id, i.run_id, i.id, i.idempotency_key, i.recipient, i.contact_id, NULL::jsonb
        FROM inserted AS i WHERE i.status = 'pending'
        UNION ALL
        SELECT 'held', a.id, a.run_id, NULL::uuid, NULL::text, NULL::text, NULL::uuid,
               jsonb_build_object('remaining', a.remaining)
        FROM advanced AS a;
    END IF;

    -- 7. Nothing held and nothing to claim: say what is left in scope (for --until-idle).
    IF cardinality(_held) = 0 AND p_claim > 0 THEN
        RETURN QUERY
        SELECT 'idle', NULL::uuid, NULL::uuid, NULL::uuid, NULL::text, NULL::text, NULL::uuid,
               jsonb_build_object(
                   'queued', EXISTS (
                       SELECT 1 FROM kernel.job_queue AS j
                       WHERE j.status = 'queued' AND (p_tenant_id IS NULL OR j.tenant_id = p_tenant_id)
                         AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id))),
                   'processing', EXISTS (
                       SELECT 1 FROM kernel.job_queue AS j
                       WHERE j.status = 'processing' AND (p_tenant_id IS NULL OR j.tenant_id = p_tenant_id)
                         AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id)))
               );
    END IF;
END
$$;

COMMENT ON FUNCTION kernel.worker_step(text, numeric, uuid[], uuid[], text[], text[], text[], text[], uuid[], uuid[], text[], uuid[], integer, integer, text[], uuid) IS
'The daemon''s hot path, one transaction: fences the jobs it holds (lost rows), records results (waiting rows for retries), renews leases, ends finished jobs and fails the ones it cannot execute (done rows), claims up to p_claim jobs (job rows with their context), and dispatches up to p_want items (item rows), inserting new items already dispatched. No session state: lease and tenant travel with the call.';

CREATE FUNCTION kernel.release_jobs(p_worker text, p_jobs uuid[], p_reason text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _n integer;
BEGIN
    PERFORM kernel._require(p_worker, 'worker');
    PERFORM kernel._require_scope();
    WITH held AS (
        SELECT j.id FROM kernel.job_queue AS j
        WHERE j.id = ANY (p_jobs) AND j.status = 'processing'
          AND j.locked_by = p_worker AND j.lease_expires_at > now()
        ORDER BY j.id
        FOR NO KEY UPDATE
    ), released AS (
        UPDATE kernel.job_queue AS j
        SET status = 'queued', locked_by = NULL, locked_at = NULL, lease_expires_at = NULL,
            last_error = p_reason, run_after = now()
        FROM held AS h WHERE j.id = h.id
        RETURNING j.id
    )
    SELECT count(*) INTO _n FROM released;
    IF _n > 0 THEN
        PERFORM pg_notify('kernel_jobs', 'released');
    END IF;
    RETURN _n;
END
$$;

COMMENT ON FUNCTION kernel.release_jobs(text, uuid[], text) IS
'Gives the jobs a worker still holds back to the queue (processing -> queued), e.g. on shutdown; fenced like every worker write. Returns how many it released.';

-- complete_job: the worker form is always fenced; completion without one is an operator's ---

CREATE FUNCTION kernel._end_job(
    p_job kernel.job_queue, p_success boolean, p_error text
) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _run_status text;
    _pending bigint;
    _items bigint;
BEGIN
    SELECT count(*) FILTER (WHERE status = 'pending'), count(*) INTO _pending, _items
    FROM kernel.channel_outbox WHERE job_id = p_job.id;
    IF _pending > 0 THEN
        RAISE EXCEPTION 'job % still has % pending outbox items; record their results first', p_job.id, _pending
            USING ERRCODE = 'KE006';
    END IF;
    SELECT status INTO _run_status FROM kernel.campaign_runs WHERE id = p_job.run_id;
    IF p_success AND _run_status <> 'cancelled' AND _items < cardinality(p_job.contact_ids) THEN
        RAISE EXCEPTION 'job % has % of % contacts without an outbox item; reserve them first',
            p_job.id, cardinality(p_job.contact_ids) - _items, cardinality(p_job.contact_ids)
            USING ERRCODE = 'KE007';
    END IF;
    IF NOT p_success THEN
        PERFORM kernel._end_unfinished_items(p_job.id, coalesce(p_error, 'job failed'));
    END IF;
    UPDATE kernel.job_queue
    SET status = CASE WHEN _run_status = 'cancelled' THEN 'cancelled'
                      WHEN p_success THEN 'completed' ELSE 'failed' END,
        completed_at = now(), last_error = p_error,
        locked_by = NULL, lease_expires_at = NULL
    WHERE id = p_job.id;
    PERFORM kernel._finish_run_if_done(p_job.run_id);
    RETURN (SELECT status FROM kernel.campaign_runs WHERE id = p_job.run_id);
END
$$;

COMMENT ON FUNCTION kernel._end_job(kernel.job_queue, boolean, text) IS
'Ends a locked processing job: refused while an item is pending (KE006) and, for success, while a contact has no item (KE007); derives the run status and returns it.';

CREATE OR REPLACE FUNCTION kernel.complete_job(
    p_job_id uuid, p_success boolean, p_error text, p_worker text
)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM kernel._require(p_success, 'success');
    -- 1.0 took a NULL worker as an operator's completion, which let any worker end a job
    -- another worker held. The worker form is now always fenced.
    PERFORM kernel._require(p_worker, 'worker');
    RETURN kernel._end_job(kernel._lock_leased_job(p_job_id, p_worker), p_success, p_error);
END
$$;

COMMENT ON FUNCTION kernel.complete_job(uuid, boolean, text, text) IS
'Ends a job the worker holds (fenced; a NULL worker is refused, KE008): refused while any item is pending (KE006) and, for success, while a contact has no item (KE007). Derives the run status when it was the last job and returns the run''s status.';

CREATE OR REPLACE FUNCTION kernel.complete_job(
    p_job_id uuid, p_success boolean, p_error text
) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _worker text := nullif(current_setting('execution_kernel.worker_id', TRUE), '');
    _job kernel.job_queue;
BEGIN
    IF _worker IS NOT NULL THEN
        PERFORM kernel.complete_job(p_job_id, p_success, p_error, _worker);
        RETURN;
    END IF;
    PERFORM kernel._require_operator('completing a job without a worker id');
    PERFORM kernel._require(p_job_id, 'job_id');
    PERFORM kernel._require(p_success, 'success');
    SELECT * INTO _job FROM kernel.job_queue WHERE id = p_job_id FOR NO KEY UPDATE;
    PERFORM kernel._assert_scope(_job.tenant_id, _job.workspace_id, 'job', p_job_id);
    IF _job.status <> 'processing' THEN
        RAISE EXCEPTION 'job % is % and cannot complete (only processing jobs can)', p_job_id, _job.status
            USING ERRCODE = 'KE004';
    END IF;
    PERFORM kernel._end_job(_job, p_success, p_error);
END
$$;

COMMENT ON FUNCTION kernel.complete_job(uuid, boolean, text) IS
'Seed signature: fenced on the setting execution_kernel.worker_id when the session sets it; otherwise an operator''s completion of a processing job, which needs kernel_operator (KE013).';

-- Deploying at queue speed --------------------------------------------------------
-- A LANGUAGE sql function that cannot be inlined (it has a SET clause or is SECURITY
-- DEFINER) is planned again on every call, while PL/pgSQL keeps its plans: of a 0.7 ms
-- one-contact deploy, _provider_snapshot alone took 0.1 ms (auto_explain, docs/benchmarks.md).

CREATE OR REPLACE FUNCTION kernel._provider_snapshot(p_campaign kernel.campaigns) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN (
        SELECT jsonb_build_object('provider', p.provider, 'provider_settings', p.settings)
        FROM kernel.provider_configs AS p
        WHERE p.workspace_id = p_campaign.workspace_id AND p.channel = p_campaign.channel
          AND (p.tenant_id IS NULL OR p.tenant_id = p_campaign.tenant_id)
    );
END
$$;

CREATE OR REPLACE FUNCTION kernel.deploy_campaign(p_campaign_id uuid) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN kernel.deploy_campaign(p_campaign_id, 1000);
END
$$;

-- The version ---------------------------------------------------------------------

CREATE OR REPLACE FUNCTION kernel.kernel_version() RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT '1.1.0'::text
$$;

-- Privileges and row-level security --------------------------------------------
-- kernel_operator: the platform operator. Reads every tenant's rows, calls the
-- application's and the operator's functions unscoped; writes no table directly.

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA kernel FROM PUBLIC;

GRANT USAGE ON SCHEMA kernel TO kernel_operator;

GRANT EXECUTE ON FUNCTION
kernel.worker_step(
    text, numeric, uuid[], uuid[], text[], text[], text[], text[], uuid[], uuid[], text[], uuid[],
    integer, integer, text[], uuid
),
kernel.release_jobs(text, uuid[], text)
TO kernel_worker;

GRANT EXECUTE ON FUNCTION
kernel.scope(uuid, uuid)
TO kernel_worker, kernel_app, kernel_reader, kernel_operator;

GRANT EXECUTE ON FUNCTION
kernel.deploy_campaign(uuid),
kernel.deploy_campaign(uuid, integer),
kernel.retry_campaign_run(uuid),
kernel.retry_campaign_run(uuid, boolean),
kernel.cancel_campaign_run(uuid),
kernel.complete_job(uuid, boolean, text),
kernel.check_campaign_launch_prerequisites(uuid, uuid),
kernel.provider_settings_problems(text, text, jsonb),
kernel.run_details(uuid),
kernel.run_details(uuid, integer),
kernel.queue_stats(),
kernel.kernel_version(),
kernel.current_tenant(),
kernel.current_workspace(),
kernel.in_scope(uuid, uuid)
TO kernel_operator;

GRANT SELECT ON kernel.workspaces TO kernel_app, kernel_reader;

GRANT SELECT
ON kernel.workspaces, kernel.campaigns, kernel.contacts, kernel.campaign_audience,
kernel.provider_configs,
kernel.campaign_runs, kernel.job_queue, kernel.channel_outbox, kernel.job_events,
kernel.rate_buckets,
kernel.state_transitions, kernel.schema_migrations
TO kernel_operator;

ALTER TABLE kernel.workspaces ENABLE ROW LEVEL SECURITY;

CREATE POLICY workspaces_tenant_isolation ON kernel.workspaces FOR SELECT
TO kernel_app, kernel_reader
USING (kernel.in_scope(tenant_id, id));

ALTER POLICY state_transitions_readable ON kernel.state_transitions
TO kernel_worker, kernel_app, kernel_reader, kernel_operator;

ALTER POLICY schema_migrations_readable ON kernel.schema_migrations
TO kernel_worker, kernel_app, kernel_reader, kernel_operator;

CREATE POLICY workspaces_operator_reads ON kernel.workspaces
FOR SELECT TO kernel_operator USING (TRUE);
CREATE POLICY campaigns_operator_reads ON kernel.campaigns
FOR SELECT TO kernel_operator USING (TRUE);
CREATE POLICY contacts_operator_reads ON kernel.contacts
FOR SELECT TO kernel_operator USING (TRUE);
CREATE POLICY campaign_audience_operator_reads ON kernel.campaign_audience FOR SELECT
TO kernel_operator USING (TRUE);
CREATE POLICY provider_configs_operator_reads ON kernel.provider_configs FOR SELECT
TO kernel_operator USING (TRUE);
CREATE POLICY campaign_runs_operator_reads ON kernel.campaign_runs
FOR SELECT TO kernel_operator USING (TRUE);
CREATE POLICY job_queue_operator_reads ON kernel.job_queue
FOR SELECT TO kernel_operator USING (TRUE);
CREATE POLICY channel_outbox_operator_reads ON kernel.channel_outbox
FOR SELECT TO kernel_operator USING (TRUE);
CREATE POLICY job_events_operator_reads ON kernel.job_events
FOR SELECT TO kernel_operator USING (TRUE);
CREATE POLICY rate_buckets_operator_reads ON kernel.rate_buckets
FOR SELECT TO kernel_operator USING (TRUE);

INSERT INTO kernel.schema_migrations (version, name) VALUES (2, '0002_kernel_1_1')
ON CONFLICT (version) DO NOTHING;
