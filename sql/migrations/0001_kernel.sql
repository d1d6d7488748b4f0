-- 0001_kernel.sql: the execution kernel v1.0.0.
--
-- Everything that changes kernel state lives here: tables, constraints,
-- state-machine triggers, the functions the driver and applications call,
-- roles, grants and row-level security. Apply with `kernel-driver migrate`
-- or `psql -1 -v ON_ERROR_STOP=1 -f` (one transaction). Append-only: a change
-- to the kernel is a new migration file.
--
-- House style: parameters p_, locals _, every function pins search_path,
-- every refusal raises a KE* SQLSTATE naming the offending values.

-- Roles are cluster-wide, so create them only when missing.
DO $roles$
DECLARE
    _role text;
BEGIN
    FOREACH _role IN ARRAY ARRAY[
        'kernel_owner', 'kernel_worker', 'kernel_app', 'kernel_reader'
    ] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = _role) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', _role);
        END IF;
    END LOOP;
END
$roles$;

-- The migrating user must be able to act as the owner role.
GRANT kernel_owner TO CURRENT_USER;

CREATE SCHEMA kernel AUTHORIZATION kernel_owner;

COMMENT ON SCHEMA kernel IS
'Execution kernel: campaign runs, job queue and channel outbox with exactly-once bookkeeping.';

-- Objects below are owned by kernel_owner, so SECURITY DEFINER functions run
-- with that (non-superuser) role.
SET LOCAL ROLE kernel_owner;

CREATE TABLE kernel.schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    sha256 text,
    applied_at timestamptz NOT NULL DEFAULT now(),
    applied_by text NOT NULL DEFAULT session_user
);

COMMENT ON TABLE kernel.schema_migrations IS
'Ledger of applied kernel migrations; sha256 is filled in by kernel-driver migrate (NULL when applied with psql).';

-- Session scope -------------------------------------------------------------

CREATE FUNCTION kernel.current_tenant() RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE
-- No SET clause: it must stay inlinable inside RLS policies; it only calls pg_catalog.
AS $$
    SELECT nullif(pg_catalog.current_setting('execution_kernel.tenant_id', true), '')::uuid
$$;

COMMENT ON FUNCTION kernel.current_tenant() IS
'The tenant this session is scoped to (setting execution_kernel.tenant_id), or NULL.';

CREATE FUNCTION kernel.current_workspace() RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT nullif(pg_catalog.current_setting('execution_kernel.workspace_id', true), '')::uuid
$$;

COMMENT ON FUNCTION kernel.current_workspace() IS
'The workspace this session is scoped to (setting execution_kernel.workspace_id), or NULL for all of the tenant.';

CREATE FUNCTION kernel.in_scope(p_tenant_id uuid, p_workspace_id uuid) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT p_tenant_id = kernel.current_tenant()
        AND (kernel.current_workspace() IS NULL OR p_workspace_id = kernel.current_workspace())
$$;

COMMENT ON FUNCTION kernel.in_scope(uuid, uuid) IS
'RLS predicate: true when the row belongs to the session''s tenant (and workspace, when set).';

CREATE FUNCTION kernel._require_scope() RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- Unscoped sessions are for the daemon and the owner (and superusers).
    IF kernel.current_tenant() IS NULL
       AND NOT (pg_has_role(session_user, 'kernel_worker', 'MEMBER')
                OR pg_has_role(session_user, 'kernel_owner', 'MEMBER')) THEN
        RAISE EXCEPTION 'tenant scope required: role % must set execution_kernel.tenant_id', session_user
            USING ERRCODE = 'KE009',
                  HINT = 'SET execution_kernel.tenant_id = ''<tenant uuid>'' before calling kernel functions.';
    END IF;
END
$$;

COMMENT ON FUNCTION kernel._require_scope() IS
'Raises KE009 when a session that is neither the worker nor the owner has no tenant scope.';

CREATE FUNCTION kernel._assert_scope(p_tenant_id uuid, p_workspace_id uuid, p_what text, p_id uuid)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM kernel._require_scope();
    -- A NULL tenant is a row that does not exist. Another tenant's row gets the same words:
    -- ids must not leak across tenants.
    IF p_tenant_id IS NULL
       OR (kernel.current_tenant() IS NOT NULL AND NOT kernel.in_scope(p_tenant_id, p_workspace_id)) THEN
        RAISE EXCEPTION '% % not found', p_what, p_id USING ERRCODE = 'KE002';
    END IF;
END
$$;

COMMENT ON FUNCTION kernel._assert_scope(uuid, uuid, text, uuid) IS
'Raises KE009 without a scope (see _require_scope), KE002 when the row is missing (NULL tenant) or another tenant''s.';

CREATE FUNCTION kernel._require(p_value anyelement, p_name text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_value IS NULL THEN
        RAISE EXCEPTION '% must not be NULL', p_name USING ERRCODE = 'KE008';
    END IF;
END
$$;

COMMENT ON FUNCTION kernel._require(anyelement, text) IS 'Raises KE008 when a required argument is NULL.';

-- Host tables: the application fills these -----------------------------------

CREATE TABLE kernel.campaigns (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL,
    workspace_id uuid NOT NULL,
    name text NOT NULL,
    channel text NOT NULL,
    content jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX campaigns_by_tenant_workspace_idx ON kernel.campaigns (tenant_id, workspace_id);

COMMENT ON TABLE kernel.campaigns IS
'Host table: a campaign to execute. content: e-mail {"subject","text","html"?}, voice {"from","script"}.';

CREATE TABLE kernel.contacts (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL,
    workspace_id uuid NOT NULL,
    email text,
    phone text,
    unsubscribed boolean NOT NULL DEFAULT FALSE,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX contacts_by_tenant_workspace_idx ON kernel.contacts (tenant_id, workspace_id);

COMMENT ON TABLE kernel.contacts IS
'Host table: a recipient. Unsubscribed contacts and contacts without an address become skipped items.';

CREATE TABLE kernel.campaign_audience (
    campaign_id uuid NOT NULL REFERENCES kernel.campaigns (id) ON DELETE CASCADE,
    contact_id uuid NOT NULL REFERENCES kernel.contacts (id) ON DELETE CASCADE,
    PRIMARY KEY (campaign_id, contact_id)
);

CREATE INDEX campaign_audience_by_contact_idx ON kernel.campaign_audience (contact_id);

COMMENT ON TABLE kernel.campaign_audience IS
'Host table: which contacts a campaign targets. Both must belong to the same tenant and workspace.';

CREATE TABLE kernel.provider_configs (
    workspace_id uuid NOT NULL,
    channel text NOT NULL,
    provider text NOT NULL,
    settings jsonb NOT NULL DEFAULT '{}',
    tenant_id uuid DEFAULT kernel.current_tenant(),
    max_per_second numeric CONSTRAINT provider_configs_rate_positive_check CHECK (
        max_per_second > 0
    ),
    PRIMARY KEY (workspace_id, channel)
);

COMMENT ON TABLE kernel.provider_configs IS
'Host table: the provider a workspace uses per channel. settings never hold secrets, only the names of environment variables. max_per_second is shared by all daemons.';

-- Kernel tables --------------------------------------------------------------

CREATE TABLE kernel.state_transitions (
    entity text NOT NULL,
    from_status text NOT NULL,
    to_status text NOT NULL,
    PRIMARY KEY (entity, from_status, to_status)
);

COMMENT ON TABLE kernel.state_transitions IS
'The only legal status moves of runs, jobs and outbox items; the guard triggers refuse every other (KE004).';

INSERT INTO kernel.state_transitions (entity, from_status, to_status) VALUES
('run', 'queued', 'running'),
('run', 'running', 'completed'),
('run', 'running', 'partial'),
('run', 'running', 'failed'),
('run', 'queued', 'completed'),
('run', 'queued', 'partial'),
('run', 'queued', 'failed'),
('run', 'queued', 'cancelled'),
('run', 'running', 'cancelled'),
('job', 'queued', 'processing'),
('job', 'processing', 'processing'),
('job', 'processing', 'completed'),
('job', 'processing', 'failed'),
('job', 'processing', 'queued'),
('job', 'queued', 'failed'),
('job', 'queued', 'cancelled'),
('job', 'processing', 'cancelled'),
('item', 'pending', 'sent'),
('item', 'pending', 'failed'),
('item', 'pending', 'unknown'),
('item', 'pending', 'skipped');

CREATE TABLE kernel.campaign_runs (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    campaign_id uuid NOT NULL REFERENCES kernel.campaigns (id),
    tenant_id uuid NOT NULL,
    workspace_id uuid NOT NULL,
    status text NOT NULL DEFAULT 'queued',
    channel text NOT NULL,
    run_config jsonb NOT NULL DEFAULT '{}',
    started_at timestamptz,
    completed_at timestamptz,
    error_message text,
    created_at timestamptz NOT NULL DEFAULT now(),
    retry_of_run_id uuid REFERENCES kernel.campaign_runs (id),
    root_run_id uuid NOT NULL REFERENCES kernel.campaign_runs (id),
    generation integer NOT NULL DEFAULT 1,
    CONSTRAINT campaign_runs_status_check CHECK (
        status IN ('queued', 'running', 'completed', 'partial', 'failed', 'cancelled')
    ),
    CONSTRAINT campaign_runs_lineage_check CHECK (
        (retry_of_run_id IS NULL AND root_run_id = id AND generation = 1)
        OR (retry_of_run_id IS NOT NULL AND root_run_id <> id AND generation > 1)
    )
);

-- At most one queued or running run per campaign: the backstop behind
-- deploy_campaign's row lock.
CREATE UNIQUE INDEX campaign_runs_one_active_per_campaign
ON kernel.campaign_runs (campaign_id) WHERE status IN ('queued', 'running');

CREATE INDEX campaign_runs_lineage_idx ON kernel.campaign_runs (root_run_id, generation);

COMMENT ON TABLE kernel.campaign_runs IS
'One execution of a campaign. status is derived from its jobs (never set by hand); retries form a lineage through retry_of_run_id and root_run_id.';

CREATE TABLE kernel.job_queue (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    run_id uuid NOT NULL REFERENCES kernel.campaign_runs (id),
    tenant_id uuid NOT NULL,
    workspace_id uuid NOT NULL,
    job_type text NOT NULL DEFAULT 'send_batch',
    status text NOT NULL DEFAULT 'queued',
    attempts integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL DEFAULT 10,
    locked_at timestamptz,
    locked_by text,
    lease_expires_at timestamptz,
    last_error text,
    payload jsonb NOT NULL DEFAULT '{}',
    contact_ids uuid[] NOT NULL DEFAULT '{}',
    reserved_count integer NOT NULL DEFAULT 0,
    priority integer NOT NULL DEFAULT 0,
    run_after timestamptz NOT NULL DEFAULT now(),
    created_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    CONSTRAINT job_queue_status_check CHECK (
        status IN ('queued', 'processing', 'completed', 'failed', 'cancelled')
    ),
    CONSTRAINT job_queue_job_type_check CHECK (job_type IN ('send_batch')),
    CONSTRAINT job_queue_attempts_in_range CHECK (attempts >= 0 AND max_attempts >= 1),
    CONSTRAINT job_queue_lease_held_while_processing CHECK (
        (status = 'processing') = (locked_by IS NOT NULL AND lease_expires_at IS NOT NULL)
    ),
    CONSTRAINT job_queue_reserved_count_in_range CHECK (
        reserved_count BETWEEN 0 AND cardinality(contact_ids)
    )
);

-- Serves claim_queued_jobs: queued jobs in claim order, and expired leases.
CREATE INDEX job_queue_claim_order_idx
ON kernel.job_queue (priority DESC, run_after, id) WHERE status = 'queued';

CREATE INDEX job_queue_expired_lease_idx
ON kernel.job_queue (lease_expires_at) WHERE status = 'processing';

CREATE INDEX job_queue_by_run_status_idx ON kernel.job_queue (run_id, status);

COMMENT ON TABLE kernel.job_queue IS
'Work units: each send_batch job owns a snapshot of up to batch_size contacts (contact_ids) of its run; reserved_count is how many of them have outbox items.';

CREATE TABLE kernel.channel_outbox (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    run_id uuid NOT NULL REFERENCES kernel.campaign_runs (id),
    job_id uuid NOT NULL REFERENCES kernel.job_queue (id),
    tenant_id uuid NOT NULL,
    workspace_id uuid NOT NULL,
    channel text NOT NULL,
    provider text NOT NULL,
    status text NOT NULL DEFAULT 'pending',
    idempotency_key text NOT NULL,
    provider_message_id text,
    provider_response jsonb,
    skipped boolean NOT NULL DEFAULT FALSE,
    skip_reason text,
    error text,
    contact_id uuid NOT NULL,
    recipient text,
    root_run_id uuid NOT NULL,
    generation integer NOT NULL,
    dispatch_count integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    dispatched_at timestamptz,
    sent_at timestamptz,
    completed_at timestamptz,
    CONSTRAINT channel_outbox_idempotency_key UNIQUE (idempotency_key),
    CONSTRAINT channel_outbox_status_check CHECK (
        status IN ('pending', 'sent', 'failed', 'unknown', 'skipped')
    ),
    CONSTRAINT channel_outbox_skipped_status_check CHECK (
        skipped = (status = 'skipped') AND (skipped = (skip_reason IS NOT NULL))
    ),
    CONSTRAINT channel_outbox_sent_has_provider_id CHECK (
        status <> 'sent' OR provider_message_id IS NOT NULL
    ),
    CONSTRAINT channel_outbox_sent_was_dispatched CHECK (
        status NOT IN ('sent', 'unknown') OR dispatched_at IS NOT NULL
    )
);

CREATE INDEX channel_outbox_by_job_status_idx ON kernel.channel_outbox (job_id, status);

CREATE INDEX channel_outbox_by_run_status_idx ON kernel.channel_outbox (run_id, status);

-- Serves retry targeting: the latest item of each contact in a lineage.
CREATE INDEX channel_outbox_lineage_contact_idx
ON kernel.channel_outbox (root_run_id, contact_id, generation);

COMMENT ON TABLE kernel.channel_outbox IS
'One row per provider action (run lineage, contact, channel, generation). Inserted before the provider call; terminal rows never change.';

CREATE TABLE kernel.job_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    tenant_id uuid NOT NULL,
    workspace_id uuid NOT NULL,
    run_id uuid NOT NULL,
    job_id uuid,
    entity text NOT NULL,
    from_status text,
    to_status text NOT NULL,
    worker text,
    detail text,
    CONSTRAINT job_events_entity_check CHECK (entity IN ('run', 'job'))
);

CREATE INDEX job_events_by_run_idx ON kernel.job_events (run_id, occurred_at);

COMMENT ON TABLE kernel.job_events IS
'Audit trail: every run and job status change (who, what, when), written by the guard triggers.';

CREATE TABLE kernel.rate_buckets (
    workspace_id uuid NOT NULL,
    provider text NOT NULL,
    tokens double precision NOT NULL,
    refreshed_at timestamptz NOT NULL,
    PRIMARY KEY (workspace_id, provider)
);

COMMENT ON TABLE kernel.rate_buckets IS
'Token buckets behind take_rate_tokens: one per workspace and provider, shared by every daemon.';

-- Guards: state machines and the audit trail ---------------------------------

CREATE FUNCTION kernel._assert_transition(p_entity text, p_id uuid, p_from text, p_to text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM kernel.state_transitions
        WHERE entity = p_entity AND from_status = p_from AND to_status = p_to
    ) THEN
        RAISE EXCEPTION 'illegal % transition for %: % -> %', p_entity, p_id, p_from, p_to
            USING ERRCODE = 'KE004',
                  HINT = 'See kernel.state_transitions for the legal moves.';
    END IF;
END
$$;

COMMENT ON FUNCTION kernel._assert_transition(text, uuid, text, text) IS
'Raises KE004 unless (from, to) is listed in kernel.state_transitions for the entity.';

CREATE FUNCTION kernel._campaign_runs_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status <> 'queued' THEN
            RAISE EXCEPTION 'a run must start queued, not % (run %)', NEW.status, NEW.id
                USING ERRCODE = 'KE004';
        END IF;
    ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
        PERFORM kernel._assert_transition('run', NEW.id, OLD.status, NEW.status);
    ELSE
        RETURN NEW;
    END IF;
    INSERT INTO kernel.job_events (tenant_id, workspace_id, run_id, entity, from_status, to_status, detail)
    VALUES (NEW.tenant_id, NEW.workspace_id, NEW.id, 'run',
            CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END, NEW.status, NEW.error_message);
    RETURN NEW;
END
$$;

COMMENT ON FUNCTION kernel._campaign_runs_guard() IS
'Trigger: refuses illegal run transitions and records each change in job_events.';

CREATE TRIGGER campaign_runs_guard
BEFORE INSERT OR UPDATE ON kernel.campaign_runs
FOR EACH ROW EXECUTE FUNCTION kernel._campaign_runs_guard();

CREATE FUNCTION kernel._job_queue_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status <> 'queued' THEN
            RAISE EXCEPTION 'a job must start queued, not % (job %)', NEW.status, NEW.id
                USING ERRCODE = 'KE004';
        END IF;
        RETURN NEW;  -- creation is recorded once per run, not per job
    END IF;
    -- Same status, holder and attempt: a heartbeat or a reservation, not a state change.
    -- processing -> processing with a new attempt is a re-claim (the crash path).
    IF NEW.status = OLD.status
       AND NEW.locked_by IS NOT DISTINCT FROM OLD.locked_by
       AND (NEW.status <> 'processing' OR NEW.attempts = OLD.attempts) THEN
        RETURN NEW;
    END IF;
    PERFORM kernel._assert_transition('job', NEW.id, OLD.status, NEW.status);
    IF OLD.status = 'processing' AND NEW.status = 'processing' AND OLD.lease_expires_at > now() THEN
        RAISE EXCEPTION 'job % is leased to % until %; it can be re-claimed only after the lease expires',
            NEW.id, OLD.locked_by, OLD.lease_expires_at USING ERRCODE = 'KE004';
    END IF;
    INSERT INTO kernel.job_events (
        tenant_id, workspace_id, run_id, job_id, entity, from_status, to_status, worker, detail
    ) VALUES (
        NEW.tenant_id, NEW.workspace_id, NEW.run_id, NEW.id, 'job', OLD.status, NEW.status,
        coalesce(NEW.locked_by, OLD.locked_by),
        CASE WHEN NEW.status = 'processing' THEN 'attempt ' || NEW.attempts ELSE NEW.last_error END
    );
    RETURN NEW;
END
$$;

COMMENT ON FUNCTION kernel._job_queue_guard() IS
'Trigger: refuses illegal job transitions and records each change (and each re-claim) in job_events.';

CREATE TRIGGER job_queue_guard
BEFORE INSERT OR UPDATE ON kernel.job_queue
FOR EACH ROW EXECUTE FUNCTION kernel._job_queue_guard();

CREATE FUNCTION kernel._channel_outbox_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status NOT IN ('pending', 'skipped') THEN
            RAISE EXCEPTION 'an outbox item must start pending or skipped, not % (key %)',
                NEW.status, NEW.idempotency_key USING ERRCODE = 'KE004';
        END IF;
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
        NEW.completed_at := clock_timestamp();
    END IF;
    RETURN NEW;
END
$$;

COMMENT ON FUNCTION kernel._channel_outbox_guard() IS
'Trigger: items start pending or skipped, move only along state_transitions, and never change once terminal (KE012).';

CREATE TRIGGER channel_outbox_guard
BEFORE INSERT OR UPDATE ON kernel.channel_outbox
FOR EACH ROW EXECUTE FUNCTION kernel._channel_outbox_guard();

CREATE FUNCTION kernel._campaign_audience_same_tenant() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _bad record;
BEGIN
    SELECT n.campaign_id, n.contact_id INTO _bad
    FROM new_rows AS n
    INNER JOIN kernel.campaigns AS c ON n.campaign_id = c.id
    INNER JOIN kernel.contacts AS p ON n.contact_id = p.id
    WHERE c.tenant_id <> p.tenant_id OR c.workspace_id <> p.workspace_id
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'contact % is not in the tenant and workspace of campaign %',
            _bad.contact_id, _bad.campaign_id USING ERRCODE = 'KE008';
    END IF;
    RETURN NULL;
END
$$;

COMMENT ON FUNCTION kernel._campaign_audience_same_tenant() IS
'Statement trigger: an audience row must pair a campaign and a contact of the same tenant and workspace.';

CREATE TRIGGER campaign_audience_same_tenant_on_insert
AFTER INSERT ON kernel.campaign_audience
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION kernel._campaign_audience_same_tenant();

CREATE TRIGGER campaign_audience_same_tenant_on_update
AFTER UPDATE ON kernel.campaign_audience
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION kernel._campaign_audience_same_tenant();

CREATE FUNCTION kernel._owner_immutable() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NEW.tenant_id IS DISTINCT FROM OLD.tenant_id OR NEW.workspace_id IS DISTINCT FROM OLD.workspace_id THEN
        RAISE EXCEPTION 'the tenant and workspace of % % cannot change; create a new row instead',
            TG_TABLE_NAME, OLD.id USING ERRCODE = 'KE008';
    END IF;
    RETURN NEW;
END
$$;

COMMENT ON FUNCTION kernel._owner_immutable() IS
'Trigger: a campaign or contact stays in its tenant and workspace, so audiences, runs and items never pair two workspaces.';

CREATE TRIGGER campaigns_owner_immutable
BEFORE UPDATE OF tenant_id, workspace_id ON kernel.campaigns
FOR EACH ROW EXECUTE FUNCTION kernel._owner_immutable();

CREATE TRIGGER contacts_owner_immutable
BEFORE UPDATE OF tenant_id, workspace_id ON kernel.contacts
FOR EACH ROW EXECUTE FUNCTION kernel._owner_immutable();

-- Launch prerequisites -------------------------------------------------------

CREATE FUNCTION kernel.provider_settings_problems(p_provider text, p_channel text, p_settings jsonb)
RETURNS text[]
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _problems text[] := '{}'::text[];
    _key text;
    _required text[];
BEGIN
    IF p_settings IS NULL OR jsonb_typeof(p_settings) <> 'object' THEN
        RETURN ARRAY['settings must be a JSON object'];
    END IF;
    IF p_provider = 'smtp' AND p_channel <> 'email'
       OR p_provider = 'twilio' AND p_channel <> 'voice' THEN
        _problems := _problems || format('provider %s cannot serve channel %s', p_provider, p_channel);
    END IF;
    _required := CASE p_provider
        WHEN 'smtp' THEN ARRAY['host', 'from']
        WHEN 'twilio' THEN ARRAY['base_url', 'account_sid', 'auth_token_env', 'from']
        WHEN 'webhook' THEN ARRAY['url']
        ELSE '{}'::text[]
    END;
    FOREACH _key IN ARRAY _required LOOP
        IF jsonb_typeof(p_settings -> _key) IS DISTINCT FROM 'string'
           OR btrim(p_settings ->> _key) = '' THEN
            _problems := _problems || format('%s needs a non-empty string "%s"', p_provider, _key);
        END IF;
    END LOOP;
    FOREACH _key IN ARRAY ARRAY['username_env', 'password_env', 'secret_env'] LOOP
        IF p_settings ? _key AND jsonb_typeof(p_settings -> _key) <> 'string' THEN
            _problems := _problems || format('"%s" must name an environment variable (a string)', _key);
        END IF;
    END LOOP;
    FOREACH _key IN ARRAY ARRAY['starttls', 'ssl'] LOOP
        IF p_settings ? _key AND jsonb_typeof(p_settings -> _key) <> 'boolean' THEN
            _problems := _problems || format('"%s" must be true or false', _key);
        END IF;
    END LOOP;
    IF p_settings -> 'starttls' = 'true' AND p_settings -> 'ssl' = 'true' THEN
        _problems := _problems || 'choose one of "starttls" and "ssl", not both'::text;
    END IF;
    -- Nested IFs: a cast must never run on a value that is not a JSON number.
    IF p_provider = 'smtp' THEN
        IF jsonb_typeof(p_settings -> 'port') IS DISTINCT FROM 'number' THEN
            _problems := _problems || 'smtp needs "port", a whole number from 1 to 65535'::text;
        ELSIF (p_settings ->> 'port')::numeric NOT BETWEEN 1 AND 65535
              OR (p_settings ->> 'port')::numeric % 1 <> 0 THEN
            _problems := _problems || 'smtp needs "port", a whole number from 1 to 65535'::text;
        END IF;
    END IF;
    IF p_provider = 'smtp' AND position('@' IN coalesce(p_settings ->> 'from', '')) = 0 THEN
        _problems := _problems || 'smtp "from" must be an e-mail address'::text;
    END IF;
    FOREACH _key IN ARRAY ARRAY['base_url', 'url'] LOOP
        IF p_settings ? _key AND coalesce(p_settings ->> _key, '') !~ '^https?://' THEN
            _problems := _problems || format('"%s" must start with http:// or https://', _key);
        END IF;
    END LOOP;
    FOREACH _key IN ARRAY ARRAY['timeout_s', 'latency_ms'] LOOP
        IF NOT p_settings ? _key THEN
            CONTINUE;
        ELSIF jsonb_typeof(p_settings -> _key) <> 'number' THEN
            _problems := _problems || format('"%s" must be a number', _key);
        ELSIF (p_settings ->> _key)::numeric < 0 OR (_key = 'timeout_s' AND (p_settings ->> _key)::numeric = 0) THEN
            _problems := _problems || format('"%s" must be %s', _key,
                CASE _key WHEN 'timeout_s' THEN 'a positive number of seconds' ELSE 'a number >= 0' END);
        END IF;
    END LOOP;
    RETURN _problems;
END
$$;

COMMENT ON FUNCTION kernel.provider_settings_problems(text, text, jsonb) IS
'Readable problems with a provider''s settings for a channel (empty when valid). Unknown (plug-in) providers are validated by their adapter.';

CREATE FUNCTION kernel.check_campaign_launch_prerequisites(p_campaign_id uuid, p_workspace_id uuid)
RETURNS TABLE (check_name text, passed boolean, detail text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _c kernel.campaigns;
    _cfg kernel.provider_configs;
    _audience bigint;
    _reachable bigint;
    _missing text[];
    _problems text[];
    _active uuid;
BEGIN
    PERFORM kernel._require(p_campaign_id, 'campaign_id');
    PERFORM kernel._require(p_workspace_id, 'workspace_id');
    PERFORM kernel._require_scope();
    SELECT * INTO _c FROM kernel.campaigns WHERE id = p_campaign_id AND workspace_id = p_workspace_id;
    -- Another tenant's campaign is reported exactly like a missing one.
    passed := FOUND AND (kernel.current_tenant() IS NULL OR kernel.in_scope(_c.tenant_id, _c.workspace_id));
    check_name := 'campaign_exists';
    detail := CASE WHEN passed THEN format('campaign %s (%s)', _c.id, _c.name)
                   ELSE format('campaign %s not found in workspace %s', p_campaign_id, p_workspace_id) END;
    RETURN NEXT;
    IF NOT passed THEN
        RETURN;  -- nothing else can be checked
    END IF;

    check_name := 'channel_supported';
    passed := _c.channel IN ('email', 'voice');
    detail := format('channel %s', coalesce(_c.channel, 'NULL'))
        || CASE WHEN passed THEN '' ELSE ' is not supported (email, voice)' END;
    RETURN NEXT;

    check_name := 'content_complete';
    SELECT array_agg(k) INTO _missing
    FROM unnest(CASE _c.channel WHEN 'email' THEN ARRAY['subject', 'text']
                                WHEN 'voice' THEN ARRAY['from', 'script'] END) AS k
    WHERE jsonb_typeof(_c.content -> k) IS DISTINCT FROM 'string' OR btrim(_c.content ->> k) = '';
    passed := _c.channel IN ('email', 'voice') AND _missing IS NULL;
    detail := CASE WHEN passed THEN 'content has every field the channel needs'
                   WHEN _missing IS NULL THEN 'no content rules for this channel'
                   ELSE 'content lacks ' || array_to_string(_missing, ', ') END;
    RETURN NEXT;

    SELECT count(*),
           count(*) FILTER (
               WHERE NOT p.unsubscribed
                 AND btrim(CASE _c.channel WHEN 'email' THEN p.email ELSE p.phone END) <> ''
           )
    INTO _audience, _reachable
    FROM kernel.campaign_audience AS a
    INNER JOIN kernel.contacts AS p ON a.contact_id = p.id
    WHERE a.campaign_id = _c.id;

    check_name := 'audience_not_empty';
    passed := _audience > 0;
    detail := format('%s contacts in the audience', _audience);
    RETURN NEXT;

    check_name := 'reachable_contacts';
    passed := _reachable > 0;
    detail := format('%s of %s contacts are subscribed and have an address for %s',
                     _reachable, _audience, _c.channel);
    RETURN NEXT;

    SELECT * INTO _cfg FROM kernel.provider_configs
    WHERE workspace_id = _c.workspace_id AND channel = _c.channel
      AND (tenant_id IS NULL OR tenant_id = _c.tenant_id);
    check_name := 'provider_configured';
    passed := FOUND;
    detail := CASE WHEN passed THEN format('provider %s', _cfg.provider)
                   ELSE format('no provider_configs row for workspace %s, channel %s', _c.workspace_id, _c.channel) END;
    RETURN NEXT;

    check_name := 'provider_settings_valid';
    _problems := CASE WHEN passed THEN kernel.provider_settings_problems(_cfg.provider, _c.channel, _cfg.settings) END;
    passed := passed AND cardinality(_problems) = 0;
    detail := CASE WHEN _problems IS NULL THEN 'no provider configured'
                   WHEN passed THEN 'settings valid'
                   ELSE array_to_string(_problems, '; ') END;
    RETURN NEXT;

    SELECT id INTO _active FROM kernel.campaign_runs
    WHERE campaign_id = _c.id AND status IN ('queued', 'running');
    check_name := 'no_active_run';
    passed := _active IS NULL;
    detail := CASE WHEN passed THEN 'no queued or running run'
                   ELSE format('run %s is still active', _active) END;
    RETURN NEXT;
END
$$;

COMMENT ON FUNCTION kernel.check_campaign_launch_prerequisites(uuid, uuid) IS
'One row per launch check (campaign_exists, channel_supported, content_complete, audience_not_empty, reachable_contacts, provider_configured, provider_settings_valid, no_active_run).';

-- Deploy, retry, cancel -------------------------------------------------------

CREATE FUNCTION kernel._enqueue_batches(
    p_run kernel.campaign_runs, p_contacts uuid[], p_batch_size integer
)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _jobs integer;
BEGIN
    INSERT INTO kernel.job_queue (run_id, tenant_id, workspace_id, contact_ids, payload)
    SELECT p_run.id, p_run.tenant_id, p_run.workspace_id, b.contact_ids,
           jsonb_build_object('batch_no', b.batch_no + 1,
                              'batch_count', ceil(cardinality(p_contacts)::numeric / p_batch_size)::integer)
    FROM (
        SELECT (u.ord - 1) / p_batch_size AS batch_no, array_agg(u.contact_id ORDER BY u.ord) AS contact_ids
        FROM unnest(p_contacts) WITH ORDINALITY AS u (contact_id, ord)
        GROUP BY 1
    ) AS b
    ORDER BY b.batch_no;
    GET DIAGNOSTICS _jobs = ROW_COUNT;
    PERFORM pg_notify('kernel_jobs', p_run.id::text);
    RETURN _jobs;
END
$$;

COMMENT ON FUNCTION kernel._enqueue_batches(kernel.campaign_runs, uuid[], integer) IS
'Splits a run''s contacts into send_batch jobs of p_batch_size and wakes the workers (NOTIFY kernel_jobs).';

CREATE FUNCTION kernel._provider_snapshot(p_campaign kernel.campaigns) RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT jsonb_build_object('provider', p.provider, 'provider_settings', p.settings)
    FROM kernel.provider_configs AS p
    WHERE p.workspace_id = p_campaign.workspace_id AND p.channel = p_campaign.channel
      AND (p.tenant_id IS NULL OR p.tenant_id = p_campaign.tenant_id)
$$;

COMMENT ON FUNCTION kernel._provider_snapshot(kernel.campaigns) IS
'The provider part of run_config: the workspace''s provider and settings for the campaign''s channel.';

CREATE FUNCTION kernel._lock_campaign_without_active_run(
    p_campaign_id uuid
) RETURNS kernel.campaigns
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _c kernel.campaigns;
    _active uuid;
BEGIN
    -- The row lock serialises concurrent deploys and retries of one campaign.
    SELECT * INTO _c FROM kernel.campaigns WHERE id = p_campaign_id FOR UPDATE;
    PERFORM kernel._assert_scope(_c.tenant_id, _c.workspace_id, 'campaign', p_campaign_id);
    SELECT id INTO _active FROM kernel.campaign_runs
    WHERE campaign_id = p_campaign_id AND status IN ('queued', 'running');
    IF FOUND THEN
        RAISE EXCEPTION 'campaign % already has an active run %', p_campaign_id, _active
            USING ERRCODE = 'KE003', HINT = 'Wait for it to finish or cancel it first.';
    END IF;
    RETURN _c;
END
$$;

COMMENT ON FUNCTION kernel._lock_campaign_without_active_run(uuid) IS
'Locks a campaign in scope; KE002 when missing, KE003 when it already has a queued or running run.';

CREATE FUNCTION kernel.deploy_campaign(p_campaign_id uuid, p_batch_size integer) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _c kernel.campaigns;
    _failed text;
    _run kernel.campaign_runs;
    _contacts uuid[];
BEGIN
    PERFORM kernel._require(p_campaign_id, 'campaign_id');
    IF p_batch_size IS NULL OR p_batch_size NOT BETWEEN 1 AND 100000 THEN
        RAISE EXCEPTION 'batch_size must be between 1 and 100000, got %', p_batch_size USING ERRCODE = 'KE008';
    END IF;
    _c := kernel._lock_campaign_without_active_run(p_campaign_id);
    SELECT string_agg(p.check_name || ' (' || p.detail || ')', '; ') INTO _failed
    FROM kernel.check_campaign_launch_prerequisites(_c.id, _c.workspace_id) AS p
    WHERE NOT p.passed;
    IF _failed IS NOT NULL THEN
        RAISE EXCEPTION 'campaign % cannot launch: %', p_campaign_id, _failed
            USING ERRCODE = 'KE001',
                  HINT = 'SELECT * FROM kernel.check_campaign_launch_prerequisites(campaign_id, workspace_id) lists every check.';
    END IF;

    _run.id := gen_random_uuid();
    INSERT INTO kernel.campaign_runs (
        id, campaign_id, tenant_id, workspace_id, status, channel, run_config, root_run_id
    ) VALUES (
        _run.id, _c.id, _c.tenant_id, _c.workspace_id, 'queued', _c.channel,
        jsonb_build_object('campaign_name', _c.name, 'content', _c.content, 'batch_size', p_batch_size)
        || kernel._provider_snapshot(_c),
        _run.id
    ) RETURNING * INTO _run;

    SELECT array_agg(contact_id ORDER BY contact_id) INTO _contacts
    FROM kernel.campaign_audience WHERE campaign_id = _c.id;
    PERFORM kernel._enqueue_batches(_run, _contacts, p_batch_size);
    RETURN _run.id;
END
$$;

COMMENT ON FUNCTION kernel.deploy_campaign(uuid, integer) IS
'Validates the launch prerequisites (KE001), refuses a second active run (KE003), snapshots content and provider into run_config, creates the run and its batch jobs queued, and NOTIFYs kernel_jobs.';

CREATE FUNCTION kernel.deploy_campaign(p_campaign_id uuid) RETURNS uuid
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT kernel.deploy_campaign(p_campaign_id, 1000)
$$;

COMMENT ON FUNCTION kernel.deploy_campaign(uuid) IS
'Seed signature: deploy_campaign with batch jobs of 1,000 contacts.';

CREATE FUNCTION kernel.retry_campaign_run(p_run_id uuid, p_include_unknown boolean) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _old kernel.campaign_runs;
    _c kernel.campaigns;
    _run kernel.campaign_runs;
    _provider jsonb;
    _failed text;
    _targets uuid[];
BEGIN
    PERFORM kernel._require(p_run_id, 'run_id');
    PERFORM kernel._require(p_include_unknown, 'include_unknown');
    SELECT * INTO _old FROM kernel.campaign_runs WHERE id = p_run_id;
    PERFORM kernel._assert_scope(_old.tenant_id, _old.workspace_id, 'run', p_run_id);
    IF _old.status IN ('queued', 'running') THEN
        RAISE EXCEPTION 'run % is % and cannot be retried until it finishes', p_run_id, _old.status
            USING ERRCODE = 'KE011';
    END IF;
    _c := kernel._lock_campaign_without_active_run(_old.campaign_id);

    -- A contact's latest item in the lineage decides; a sent item anywhere excludes it.
    SELECT array_agg(l.contact_id ORDER BY l.contact_id) INTO _targets
    FROM (
        SELECT DISTINCT ON (o.contact_id) o.contact_id, o.status
        FROM kernel.channel_outbox AS o
        WHERE o.root_run_id = _old.root_run_id
        ORDER BY o.contact_id, o.generation DESC
    ) AS l
    WHERE (l.status = 'failed' OR (p_include_unknown AND l.status = 'unknown'))
      AND NOT EXISTS (
          SELECT 1 FROM kernel.channel_outbox AS s
          WHERE s.root_run_id = _old.root_run_id AND s.contact_id = l.contact_id AND s.status = 'sent'
      );
    IF _targets IS NULL THEN
        RAISE EXCEPTION 'run % has no failed% items to retry', p_run_id,
            CASE WHEN p_include_unknown THEN ' or unknown' ELSE '' END
            USING ERRCODE = 'KE010';
    END IF;

    -- The provider as configured now (it may have been fixed), checked like a launch.
    SELECT string_agg(p.check_name || ' (' || p.detail || ')', '; ') INTO _failed
    FROM kernel.check_campaign_launch_prerequisites(_c.id, _c.workspace_id) AS p
    WHERE p.check_name IN ('provider_configured', 'provider_settings_valid') AND NOT p.passed;
    IF _failed IS NOT NULL THEN
        RAISE EXCEPTION 'run % cannot be retried: %', p_run_id, _failed USING ERRCODE = 'KE001';
    END IF;
    _provider := kernel._provider_snapshot(_c);

    _run.id := gen_random_uuid();
    INSERT INTO kernel.campaign_runs (
        id, campaign_id, tenant_id, workspace_id, status, channel, run_config,
        retry_of_run_id, root_run_id, generation
    ) VALUES (
        _run.id, _old.campaign_id, _old.tenant_id, _old.workspace_id, 'queued', _old.channel,
        -- Same content as the run retried; the provider as configured now (it may have been fixed).
        _old.run_config || _provider || jsonb_build_object('include_unknown', p_include_unknown),
        p_run_id, _old.root_run_id,
        (SELECT max(generation) + 1 FROM kernel.campaign_runs WHERE root_run_id = _old.root_run_id)
    ) RETURNING * INTO _run;
    PERFORM kernel._enqueue_batches(_run, _targets, coalesce((_old.run_config ->> 'batch_size')::integer, 1000));
    RETURN _run.id;
END
$$;

COMMENT ON FUNCTION kernel.retry_campaign_run(uuid, boolean) IS
'UX2: a new run linked by retry_of_run_id/root_run_id targeting only contacts whose latest lineage item failed (and unknown ones when asked); never a contact with a sent item.';

CREATE FUNCTION kernel.retry_campaign_run(p_run_id uuid) RETURNS uuid
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT kernel.retry_campaign_run(p_run_id, false)
$$;

COMMENT ON FUNCTION kernel.retry_campaign_run(uuid) IS
'retry_campaign_run without unknown items: those are re-sent only when the operator asks explicitly.';

CREATE FUNCTION kernel.cancel_campaign_run(p_run_id uuid) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _run kernel.campaign_runs;
BEGIN
    PERFORM kernel._require(p_run_id, 'run_id');
    -- Jobs before their run, the order claim_queued_jobs and complete_job lock in: no deadlock.
    PERFORM 1 FROM kernel.job_queue WHERE run_id = p_run_id AND status IN ('queued', 'processing')
    ORDER BY id FOR UPDATE;
    SELECT * INTO _run FROM kernel.campaign_runs WHERE id = p_run_id FOR UPDATE;
    PERFORM kernel._assert_scope(_run.tenant_id, _run.workspace_id, 'run', p_run_id);
    IF _run.status NOT IN ('queued', 'running') THEN
        RAISE EXCEPTION 'run % is % and cannot be cancelled (only queued or running runs can)',
            p_run_id, _run.status USING ERRCODE = 'KE004';
    END IF;
    UPDATE kernel.campaign_runs
    SET status = 'cancelled', completed_at = now(), error_message = 'cancelled by ' || session_user
    WHERE id = p_run_id;
    UPDATE kernel.job_queue SET status = 'cancelled', completed_at = now()
    WHERE run_id = p_run_id AND status = 'queued';
    -- Processing jobs finish their in-flight calls and end cancelled in complete_job.
    UPDATE kernel.channel_outbox SET status = 'skipped', skipped = true, skip_reason = 'run_cancelled'
    WHERE run_id = p_run_id AND status = 'pending' AND dispatched_at IS NULL;
END
$$;

COMMENT ON FUNCTION kernel.cancel_campaign_run(uuid) IS
'Cancels a queued or running run: queued jobs cancelled, undispatched items skipped; in-flight calls still get recorded.';

-- The worker's side: claim, lease, reserve, dispatch, record, complete -------

CREATE FUNCTION kernel._lease_interval() RETURNS interval
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(nullif(current_setting('execution_kernel.lease_seconds', true), '')::numeric, 30)
        * interval '1 second'
$$;

COMMENT ON FUNCTION kernel._lease_interval() IS
'Lease length: setting execution_kernel.lease_seconds, 30 seconds by default.';

CREATE FUNCTION kernel._lock_leased_job(p_job_id uuid, p_worker text) RETURNS kernel.job_queue
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _job kernel.job_queue;
BEGIN
    PERFORM kernel._require(p_job_id, 'job_id');
    PERFORM kernel._require(p_worker, 'worker');
    SELECT * INTO _job FROM kernel.job_queue WHERE id = p_job_id FOR NO KEY UPDATE;
    PERFORM kernel._assert_scope(_job.tenant_id, _job.workspace_id, 'job', p_job_id);
    IF _job.status <> 'processing' OR _job.locked_by <> p_worker OR _job.lease_expires_at <= now() THEN
        RAISE EXCEPTION 'worker % does not hold the lease on job % (status %, locked by %, lease until %)',
            p_worker, p_job_id, _job.status, coalesce(_job.locked_by, 'nobody'),
            coalesce(_job.lease_expires_at::text, '-')
            USING ERRCODE = 'KE005', HINT = 'Stop working on this job; another worker owns it now.';
    END IF;
    RETURN _job;
END
$$;

COMMENT ON FUNCTION kernel._lock_leased_job(uuid, text) IS
'Fencing: locks the job and raises KE005 unless p_worker holds an unexpired lease on it.';

CREATE FUNCTION kernel._finish_run_if_done(p_run_id uuid) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _run kernel.campaign_runs;
    _jobs_completed bigint;
    _jobs_failed bigint;
    _sent bigint;
    _bad bigint;
    _status text;
BEGIN
    SELECT * INTO _run FROM kernel.campaign_runs WHERE id = p_run_id FOR UPDATE;
    IF _run.status IN ('completed', 'partial', 'failed') OR EXISTS (
        SELECT 1 FROM kernel.job_queue WHERE run_id = p_run_id AND status IN ('queued', 'processing')
    ) THEN
        RETURN;
    END IF;
    IF _run.status = 'cancelled' THEN
        RETURN;
    END IF;
    SELECT count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'failed')
    INTO _jobs_completed, _jobs_failed
    FROM kernel.job_queue WHERE run_id = p_run_id;
    SELECT count(*) FILTER (WHERE status = 'sent'), count(*) FILTER (WHERE status IN ('failed', 'unknown'))
    INTO _sent, _bad
    FROM kernel.channel_outbox WHERE run_id = p_run_id;
    _status := CASE
        WHEN _jobs_failed = 0 AND _bad = 0 THEN 'completed'
        WHEN _jobs_completed = 0 OR (_sent = 0 AND _bad > 0) THEN 'failed'
        ELSE 'partial'
    END;
    UPDATE kernel.campaign_runs
    SET status = _status,
        started_at = coalesce(started_at, now()),
        completed_at = now(),
        error_message = CASE WHEN _status = 'completed' THEN NULL ELSE
            format('%s of %s jobs failed; %s items failed or unknown, %s sent',
                   _jobs_failed, _jobs_failed + _jobs_completed, _bad, _sent) END
    WHERE id = p_run_id;
END
$$;

COMMENT ON FUNCTION kernel._finish_run_if_done(uuid) IS
'Invariant 4: once every job of a run is terminal, derives the run status from the job and item outcomes.';

CREATE FUNCTION kernel._insert_items(
    p_job kernel.job_queue, p_run kernel.campaign_runs, p_count integer
)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _pending integer;
BEGIN
    -- The next p_count contacts of the job's snapshot; the key makes a second insert a no-op.
    WITH inserted AS (
        INSERT INTO kernel.channel_outbox (
            run_id, job_id, tenant_id, workspace_id, channel, provider, status, idempotency_key,
            skipped, skip_reason, contact_id, recipient, root_run_id, generation
        )
        SELECT p_run.id, p_job.id, p_job.tenant_id, p_job.workspace_id, p_run.channel,
               p_run.run_config ->> 'provider',
               CASE WHEN s.reason IS NULL THEN 'pending' ELSE 'skipped' END,
               format('%s:%s:%s:%s', p_run.root_run_id, p_run.channel, u.contact_id, p_run.generation),
               s.reason IS NOT NULL, s.reason, u.contact_id, s.recipient, p_run.root_run_id, p_run.generation
        FROM unnest(p_job.contact_ids[p_job.reserved_count + 1:p_job.reserved_count + p_count])
            WITH ORDINALITY AS u (contact_id, ord)
        LEFT JOIN kernel.contacts AS p ON u.contact_id = p.id
        CROSS JOIN LATERAL (
            SELECT nullif(btrim(CASE p_run.channel WHEN 'email' THEN p.email ELSE p.phone END), '') AS recipient
        ) AS a
        CROSS JOIN LATERAL (
            SELECT a.recipient,
                   CASE WHEN p.id IS NULL THEN 'contact_deleted'
                        WHEN p.unsubscribed THEN 'unsubscribed'
                        WHEN a.recipient IS NULL THEN 'no_address' END AS reason
        ) AS s
        ORDER BY u.ord
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING status
    )
    SELECT count(*) FILTER (WHERE status = 'pending') INTO _pending FROM inserted;
    UPDATE kernel.job_queue SET reserved_count = reserved_count + p_count WHERE id = p_job.id;
    RETURN _pending;
END
$$;

COMMENT ON FUNCTION kernel._insert_items(kernel.job_queue, kernel.campaign_runs, integer) IS
'Inserts items for the next p_count contacts of a job''s snapshot (unreachable ones skipped) and advances reserved_count; returns how many are pending.';

CREATE FUNCTION kernel._end_unfinished_items(p_job_id uuid, p_reason text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _job kernel.job_queue;
    _run kernel.campaign_runs;
BEGIN
    SELECT * INTO _job FROM kernel.job_queue WHERE id = p_job_id;
    SELECT * INTO _run FROM kernel.campaign_runs WHERE id = _job.run_id;
    IF _run.status <> 'cancelled' THEN
        -- Contacts never reached get a failed item too, so that a retry targets them.
        PERFORM kernel._insert_items(_job, _run, cardinality(_job.contact_ids) - _job.reserved_count);
    END IF;
    -- Never dispatched: certainly not sent. Dispatched without an outcome: unknowable.
    UPDATE kernel.channel_outbox
    SET status = CASE WHEN dispatched_at IS NOT NULL THEN 'unknown'
                      WHEN _run.status = 'cancelled' THEN 'skipped' ELSE 'failed' END,
        skipped = dispatched_at IS NULL AND _run.status = 'cancelled',
        skip_reason = CASE WHEN dispatched_at IS NULL AND _run.status = 'cancelled' THEN 'run_cancelled' END,
        error = p_reason
    WHERE job_id = p_job_id AND status = 'pending';
END
$$;

COMMENT ON FUNCTION kernel._end_unfinished_items(uuid, text) IS
'Ends a failed job''s items honestly: contacts never reached and items never dispatched fail (skipped when the run was cancelled), dispatched ones end unknown.';

CREATE FUNCTION kernel.claim_queued_jobs(p_worker text, p_max_jobs integer)
RETURNS SETOF kernel.job_queue
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _taken kernel.job_queue[];
    _exhausted kernel.job_queue;
BEGIN
    PERFORM kernel._require(p_worker, 'worker');
    IF p_max_jobs IS NULL OR p_max_jobs NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'max_jobs must be between 1 and 1000, got %', p_max_jobs USING ERRCODE = 'KE008';
    END IF;
    PERFORM kernel._require_scope();

    WITH candidates AS (
        SELECT j.id
        FROM kernel.job_queue AS j
        WHERE ((j.status = 'queued' AND j.run_after <= now())
               OR (j.status = 'processing' AND j.lease_expires_at < now()))
          AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id))
        ORDER BY j.priority DESC, j.run_after, j.id
        LIMIT p_max_jobs
        FOR UPDATE SKIP LOCKED
    ), taken AS (
        UPDATE kernel.job_queue AS j
        SET status = CASE WHEN j.attempts >= j.max_attempts THEN 'failed' ELSE 'processing' END,
            attempts = least(j.attempts + 1, j.max_attempts),
            locked_by = CASE WHEN j.attempts >= j.max_attempts THEN NULL ELSE p_worker END,
            locked_at = now(),
            lease_expires_at = CASE WHEN j.attempts >= j.max_attempts THEN NULL ELSE now() + kernel._lease_interval() END,
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

COMMENT ON FUNCTION kernel.claim_queued_jobs(text, integer) IS
'Claims up to max_jobs jobs in one statement (FOR UPDATE SKIP LOCKED): queued jobs due now and processing jobs whose lease expired. Jobs at max_attempts are failed instead. Moves their runs to running.';

CREATE FUNCTION kernel.heartbeat_job(p_job_id uuid, p_worker text) RETURNS timestamptz
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _until timestamptz;
BEGIN
    PERFORM kernel._lock_leased_job(p_job_id, p_worker);
    UPDATE kernel.job_queue SET lease_expires_at = now() + kernel._lease_interval()
    WHERE id = p_job_id RETURNING lease_expires_at INTO _until;
    RETURN _until;
END
$$;

COMMENT ON FUNCTION kernel.heartbeat_job(uuid, text) IS
'Extends the worker''s lease on a job (KE005 when it no longer holds it); returns the new expiry.';

CREATE FUNCTION kernel.release_job(p_job_id uuid, p_worker text, p_reason text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _job kernel.job_queue;
BEGIN
    _job := kernel._lock_leased_job(p_job_id, p_worker);
    UPDATE kernel.job_queue
    SET status = 'queued', locked_by = NULL, locked_at = NULL, lease_expires_at = NULL,
        last_error = p_reason, run_after = now()
    WHERE id = p_job_id;
    PERFORM pg_notify('kernel_jobs', _job.run_id::text);
END
$$;

COMMENT ON FUNCTION kernel.release_job(uuid, text, text) IS
'Gives a job back to the queue (processing -> queued), e.g. on shutdown, so another worker takes it at once.';

CREATE FUNCTION kernel.job_context(p_job_id uuid, p_worker text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _job kernel.job_queue;
BEGIN
    _job := kernel._lock_leased_job(p_job_id, p_worker);
    RETURN (
        SELECT jsonb_build_object(
            'run_id', r.id, 'run_status', r.status, 'campaign_id', r.campaign_id,
            'tenant_id', r.tenant_id, 'workspace_id', r.workspace_id, 'channel', r.channel,
            'generation', r.generation, 'contact_count', cardinality(_job.contact_ids),
            'max_per_second', (
                SELECT min(p.max_per_second) FROM kernel.provider_configs AS p
                WHERE p.workspace_id = r.workspace_id AND p.provider = r.run_config ->> 'provider'
            )
        ) || r.run_config
        FROM kernel.campaign_runs AS r WHERE r.id = _job.run_id
    );
END
$$;

COMMENT ON FUNCTION kernel.job_context(uuid, text) IS
'What a worker needs to execute a job it holds: the run''s channel, content, provider, settings and shared rate limit.';

CREATE FUNCTION kernel.recover_dispatched_items(
    p_job_id uuid, p_worker text, p_provider_deduplicates boolean
)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _n integer;
BEGIN
    PERFORM kernel._require(p_provider_deduplicates, 'provider_deduplicates');
    PERFORM kernel._lock_leased_job(p_job_id, p_worker);
    IF p_provider_deduplicates THEN
        -- The provider drops a second request with the same key: safe to send again.
        UPDATE kernel.channel_outbox SET dispatched_at = NULL
        WHERE job_id = p_job_id AND status = 'pending' AND dispatched_at IS NOT NULL;
    ELSE
        UPDATE kernel.channel_outbox
        SET status = 'unknown',
            error = 'worker lost after dispatch; the provider cannot deduplicate, so it is not re-sent'
        WHERE job_id = p_job_id AND status = 'pending' AND dispatched_at IS NOT NULL;
    END IF;
    GET DIAGNOSTICS _n = ROW_COUNT;
    RETURN _n;
END
$$;

COMMENT ON FUNCTION kernel.recover_dispatched_items(uuid, text, boolean) IS
'Crash path: items dispatched without an outcome become unknown, or are re-queued with the same key when the provider deduplicates.';

CREATE FUNCTION kernel.reserve_outbox_items(p_job_id uuid, p_worker text, p_max_items integer)
RETURNS SETOF kernel.channel_outbox
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _job kernel.job_queue;
    _run kernel.campaign_runs;
    _have integer;
    _take integer;
BEGIN
    IF p_max_items IS NULL OR p_max_items NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION 'max_items must be between 1 and 10000, got %', p_max_items USING ERRCODE = 'KE008';
    END IF;
    _job := kernel._lock_leased_job(p_job_id, p_worker);
    SELECT * INTO _run FROM kernel.campaign_runs WHERE id = _job.run_id;
    IF _run.status = 'cancelled' THEN
        -- Items put back for another try (retry outcome, dedup recovery) will not go out now.
        UPDATE kernel.channel_outbox SET status = 'skipped', skipped = TRUE, skip_reason = 'run_cancelled'
        WHERE job_id = p_job_id AND status = 'pending' AND dispatched_at IS NULL;
        RETURN;
    END IF;
    SELECT count(*) INTO _have FROM kernel.channel_outbox
    WHERE job_id = p_job_id AND status = 'pending' AND dispatched_at IS NULL;
    -- Walk the job's contact snapshot; skipped contacts do not fill the batch.
    WHILE _have < p_max_items AND _job.reserved_count < cardinality(_job.contact_ids) LOOP
        _take := least(p_max_items - _have, cardinality(_job.contact_ids) - _job.reserved_count);
        _have := _have + kernel._insert_items(_job, _run, _take);
        _job.reserved_count := _job.reserved_count + _take;
    END LOOP;

    RETURN QUERY
    SELECT * FROM kernel.channel_outbox
    WHERE job_id = p_job_id AND status = 'pending' AND dispatched_at IS NULL
    ORDER BY contact_id
    LIMIT p_max_items;
END
$$;

COMMENT ON FUNCTION kernel.reserve_outbox_items(uuid, text, integer) IS
'Returns up to max_items pending, undispatched items of a job, inserting items for the next contacts of its snapshot first (ON CONFLICT (idempotency_key) DO NOTHING). Unreachable contacts become skipped items. Nothing once the run is cancelled.';

CREATE FUNCTION kernel.mark_outbox_dispatched(p_job_id uuid, p_worker text, p_item_ids uuid[])
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _n integer;
BEGIN
    PERFORM kernel._require(p_item_ids, 'item_ids');
    PERFORM kernel._lock_leased_job(p_job_id, p_worker);
    UPDATE kernel.channel_outbox
    SET dispatched_at = clock_timestamp(), dispatch_count = dispatch_count + 1
    WHERE id = ANY (p_item_ids) AND job_id = p_job_id AND status = 'pending' AND dispatched_at IS NULL;
    GET DIAGNOSTICS _n = ROW_COUNT;
    IF _n <> cardinality(p_item_ids) THEN
        RAISE EXCEPTION 'only % of % items are pending, undispatched items of job %',
            _n, cardinality(p_item_ids), p_job_id USING ERRCODE = 'KE008';
    END IF;
    RETURN _n;
END
$$;

COMMENT ON FUNCTION kernel.mark_outbox_dispatched(uuid, text, uuid[]) IS
'Marks reserved items as handed to the provider (dispatched_at). Commit this before calling the provider.';

CREATE FUNCTION kernel.record_outbox_results(p_job_id uuid, p_worker text, p_results jsonb)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _bad text;
    _n integer;
    _expected integer;
BEGIN
    IF p_results IS NULL OR jsonb_typeof(p_results) <> 'array' THEN
        RAISE EXCEPTION 'results must be a JSON array of {"id", "outcome", ...}' USING ERRCODE = 'KE008';
    END IF;
    PERFORM kernel._lock_leased_job(p_job_id, p_worker);
    SELECT string_agg(r::text, ', ') INTO _bad
    FROM jsonb_array_elements(p_results) AS r
    WHERE jsonb_typeof(r) <> 'object'
       OR (r ->> 'id') !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
       OR r ->> 'outcome' IS NULL OR r ->> 'outcome' NOT IN ('sent', 'failed', 'unknown', 'retry')
       OR (r ->> 'outcome' = 'sent' AND coalesce(r ->> 'provider_message_id', '') = '');
    IF _bad IS NOT NULL THEN
        RAISE EXCEPTION 'malformed results: % (each needs a uuid "id", an "outcome" of sent, failed, unknown or retry, and sent needs "provider_message_id")',
            _bad USING ERRCODE = 'KE008';
    END IF;
    _expected := jsonb_array_length(p_results);

    WITH r AS (
        SELECT * FROM jsonb_to_recordset(p_results)
            AS x (id uuid, outcome text, provider_message_id text, provider_response jsonb, error text)
    )
    UPDATE kernel.channel_outbox AS o
    SET status = CASE
            WHEN r.outcome <> 'retry' THEN r.outcome
            WHEN o.dispatch_count >= 5 THEN 'failed'
            ELSE 'pending' END,
        -- A retry is certainly not delivered: undispatched again, same key.
        dispatched_at = CASE WHEN r.outcome = 'retry' AND o.dispatch_count < 5 THEN NULL ELSE o.dispatched_at END,
        provider_message_id = coalesce(r.provider_message_id, o.provider_message_id),
        provider_response = coalesce(r.provider_response, o.provider_response),
        error = CASE WHEN r.outcome = 'retry' AND o.dispatch_count >= 5
            THEN format('gave up after %s dispatches: %s', o.dispatch_count, r.error) ELSE r.error END,
        sent_at = CASE WHEN r.outcome = 'sent' THEN clock_timestamp() END
    FROM r
    WHERE o.id = r.id AND o.job_id = p_job_id AND o.status = 'pending'
      AND (o.dispatched_at IS NOT NULL OR r.outcome = 'failed');
    GET DIAGNOSTICS _n = ROW_COUNT;
    IF _n <> _expected THEN
        RAISE EXCEPTION 'only % of % results match pending items of job % (sent, unknown and retry need a dispatched item)',
            _n, _expected, p_job_id USING ERRCODE = 'KE008';
    END IF;
    RETURN _n;
END
$$;

COMMENT ON FUNCTION kernel.record_outbox_results(uuid, text, jsonb) IS
'Records provider outcomes for a job''s items in one call: sent, failed, unknown, or retry (back to undispatched, same key; failed after 5 dispatches).';

CREATE FUNCTION kernel.complete_job(p_job_id uuid, p_success boolean, p_error text, p_worker text)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _job kernel.job_queue;
    _run_status text;
    _pending bigint;
    _items bigint;
BEGIN
    PERFORM kernel._require(p_success, 'success');
    IF p_worker IS NOT NULL THEN
        _job := kernel._lock_leased_job(p_job_id, p_worker);
    ELSE
        PERFORM kernel._require(p_job_id, 'job_id');
        SELECT * INTO _job FROM kernel.job_queue WHERE id = p_job_id FOR NO KEY UPDATE;
        PERFORM kernel._assert_scope(_job.tenant_id, _job.workspace_id, 'job', p_job_id);
        IF _job.status <> 'processing' THEN
            RAISE EXCEPTION 'job % is % and cannot complete (only processing jobs can)', p_job_id, _job.status
                USING ERRCODE = 'KE004';
        END IF;
    END IF;

    SELECT count(*) FILTER (WHERE status = 'pending'), count(*) INTO _pending, _items
    FROM kernel.channel_outbox WHERE job_id = p_job_id;
    IF _pending > 0 THEN
        RAISE EXCEPTION 'job % still has % pending outbox items; record their results first', p_job_id, _pending
            USING ERRCODE = 'KE006';
    END IF;
    SELECT status INTO _run_status FROM kernel.campaign_runs WHERE id = _job.run_id;
    IF p_success AND _run_status <> 'cancelled' AND _items < cardinality(_job.contact_ids) THEN
        RAISE EXCEPTION 'job % has % of % contacts without an outbox item; reserve them first',
            p_job_id, cardinality(_job.contact_ids) - _items, cardinality(_job.contact_ids)
            USING ERRCODE = 'KE007';
    END IF;

    IF NOT p_success THEN
        PERFORM kernel._end_unfinished_items(p_job_id, coalesce(p_error, 'job failed'));
    END IF;
    UPDATE kernel.job_queue
    SET status = CASE WHEN _run_status = 'cancelled' THEN 'cancelled'
                      WHEN p_success THEN 'completed' ELSE 'failed' END,
        completed_at = now(), last_error = p_error,
        locked_by = NULL, lease_expires_at = NULL
    WHERE id = p_job_id;
    PERFORM kernel._finish_run_if_done(_job.run_id);
    RETURN (SELECT status FROM kernel.campaign_runs WHERE id = _job.run_id);
END
$$;

COMMENT ON FUNCTION kernel.complete_job(uuid, boolean, text, text) IS
'Ends a job the worker holds (fenced): refused while any item is pending (KE006) and, for success, while a contact has no item (KE007). Derives the run status when it was the last job and returns the run''s status.';

CREATE FUNCTION kernel.complete_job(p_job_id uuid, p_success boolean, p_error text) RETURNS void
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT FROM kernel.complete_job(
        p_job_id, p_success, p_error, nullif(current_setting('execution_kernel.worker_id', true), '')
    )
$$;

COMMENT ON FUNCTION kernel.complete_job(uuid, boolean, text) IS
'Seed signature: fenced on the setting execution_kernel.worker_id when the session sets it, else an operator''s completion.';

-- Shared rate limits and observability --------------------------------------

CREATE FUNCTION kernel.take_rate_tokens(p_workspace_id uuid, p_provider text, p_wanted integer)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _rate numeric;
    _bucket kernel.rate_buckets;
    _tokens double precision;
    _granted integer;
BEGIN
    PERFORM kernel._require(p_workspace_id, 'workspace_id');
    PERFORM kernel._require(p_provider, 'provider');
    IF p_wanted IS NULL OR p_wanted < 0 THEN
        RAISE EXCEPTION 'wanted must be >= 0, got %', p_wanted USING ERRCODE = 'KE008';
    END IF;
    SELECT min(max_per_second) INTO _rate FROM kernel.provider_configs
    WHERE workspace_id = p_workspace_id AND provider = p_provider;
    IF _rate IS NULL THEN
        RETURN p_wanted;  -- no limit configured
    END IF;
    INSERT INTO kernel.rate_buckets (workspace_id, provider, tokens, refreshed_at)
    VALUES (p_workspace_id, p_provider, greatest(_rate, 1), clock_timestamp())
    ON CONFLICT (workspace_id, provider) DO NOTHING;
    SELECT * INTO _bucket FROM kernel.rate_buckets
    WHERE workspace_id = p_workspace_id AND provider = p_provider FOR UPDATE;
    -- Refill at the configured rate; the burst is one second's worth.
    _tokens := least(greatest(_rate, 1),
                     _bucket.tokens + _rate * extract(EPOCH FROM clock_timestamp() - _bucket.refreshed_at));
    _granted := least(p_wanted, floor(_tokens))::integer;
    UPDATE kernel.rate_buckets SET tokens = _tokens - _granted, refreshed_at = clock_timestamp()
    WHERE workspace_id = p_workspace_id AND provider = p_provider;
    RETURN _granted;
END
$$;

COMMENT ON FUNCTION kernel.take_rate_tokens(uuid, text, integer) IS
'Shared token bucket (provider_configs.max_per_second, burst of one second): how many of p_wanted sends may start now, across every daemon.';

CREATE FUNCTION kernel.queue_stats()
RETURNS TABLE (status text, jobs bigint, oldest_age_seconds double precision)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM kernel._require_scope();
    RETURN QUERY
    SELECT j.status, count(*), extract(EPOCH FROM now() - min(j.created_at))::double precision
    FROM kernel.job_queue AS j
    WHERE j.status IN ('queued', 'processing')
      AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id))
    GROUP BY j.status;
END
$$;

COMMENT ON FUNCTION kernel.queue_stats() IS
'Queue depth and age of the oldest job per non-terminal status, for metrics and dashboards.';

CREATE FUNCTION kernel.run_details(p_run_id uuid, p_item_limit integer) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _run kernel.campaign_runs;
BEGIN
    PERFORM kernel._require(p_run_id, 'run_id');
    IF p_item_limit IS NULL OR p_item_limit < 0 THEN
        RAISE EXCEPTION 'item_limit must be >= 0, got %', p_item_limit USING ERRCODE = 'KE008';
    END IF;
    SELECT * INTO _run FROM kernel.campaign_runs WHERE id = p_run_id;
    PERFORM kernel._assert_scope(_run.tenant_id, _run.workspace_id, 'run', p_run_id);
    RETURN jsonb_build_object(
        'run', to_jsonb(_run),
        'jobs', coalesce((
            SELECT jsonb_agg((to_jsonb(j) - 'contact_ids') || jsonb_build_object('contact_count', cardinality(j.contact_ids))
                             ORDER BY j.created_at, j.id)
            FROM kernel.job_queue AS j WHERE j.run_id = p_run_id), '[]'),
        'job_counts', coalesce((
            SELECT jsonb_object_agg(s.status, s.n)
            FROM (SELECT status, count(*) AS n FROM kernel.job_queue WHERE run_id = p_run_id GROUP BY status) AS s
        ), '{}'),
        'item_counts', coalesce((
            SELECT jsonb_object_agg(s.status, s.n)
            FROM (SELECT status, count(*) AS n FROM kernel.channel_outbox WHERE run_id = p_run_id GROUP BY status) AS s
        ), '{}'),
        'items', coalesce((
            SELECT jsonb_agg(to_jsonb(o) ORDER BY o.created_at, o.id)
            FROM (SELECT * FROM kernel.channel_outbox WHERE run_id = p_run_id
                  ORDER BY created_at, id LIMIT p_item_limit) AS o), '[]'),
        'item_limit', p_item_limit,
        'lineage', (
            SELECT jsonb_agg(jsonb_build_object('id', l.id, 'generation', l.generation, 'status', l.status,
                                                'retry_of_run_id', l.retry_of_run_id, 'created_at', l.created_at)
                             ORDER BY l.generation)
            FROM kernel.campaign_runs AS l WHERE l.root_run_id = _run.root_run_id),
        'events', coalesce((
            SELECT jsonb_agg(to_jsonb(e) ORDER BY e.occurred_at, e.id)
            FROM (
                SELECT * FROM kernel.job_events WHERE run_id = p_run_id
                ORDER BY occurred_at DESC, id DESC LIMIT 200
            ) AS e
        ), '[]')
    );
END
$$;

COMMENT ON FUNCTION kernel.run_details(uuid, integer) IS
'UX1: the run, its jobs, counts per status, its first item_limit outbox items, its lineage and its latest 200 audit events.';

CREATE FUNCTION kernel.run_details(p_run_id uuid) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT kernel.run_details(p_run_id, 1000)
$$;

COMMENT ON FUNCTION kernel.run_details(uuid) IS 'run_details with the first 1,000 outbox items.';

CREATE FUNCTION kernel.kernel_version() RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT '1.0.0'::text
$$;

COMMENT ON FUNCTION kernel.kernel_version() IS 'The installed kernel version; every version bump replaces it.';

-- Privileges ----------------------------------------------------------------
-- kernel_worker: only the daemon's functions, no table access.
-- kernel_app: host tables and the application's functions, under RLS.
-- kernel_reader: read-only, under RLS.

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA kernel FROM PUBLIC;
ALTER DEFAULT PRIVILEGES FOR ROLE kernel_owner REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

GRANT USAGE ON SCHEMA kernel TO kernel_worker, kernel_app, kernel_reader;

GRANT EXECUTE ON FUNCTION
kernel.claim_queued_jobs(text, integer),
kernel.heartbeat_job(uuid, text),
kernel.release_job(uuid, text, text),
kernel.job_context(uuid, text),
kernel.recover_dispatched_items(uuid, text, boolean),
kernel.reserve_outbox_items(uuid, text, integer),
kernel.mark_outbox_dispatched(uuid, text, uuid[]),
kernel.record_outbox_results(uuid, text, jsonb),
kernel.complete_job(uuid, boolean, text, text),
kernel.complete_job(uuid, boolean, text),
kernel.take_rate_tokens(uuid, text, integer)
TO kernel_worker;

GRANT EXECUTE ON FUNCTION
kernel.deploy_campaign(uuid),
kernel.deploy_campaign(uuid, integer),
kernel.retry_campaign_run(uuid),
kernel.retry_campaign_run(uuid, boolean),
kernel.cancel_campaign_run(uuid)
TO kernel_app;

GRANT EXECUTE ON FUNCTION
kernel.check_campaign_launch_prerequisites(uuid, uuid),
kernel.provider_settings_problems(text, text, jsonb),
kernel.run_details(uuid),
kernel.run_details(uuid, integer),
kernel.queue_stats(),
kernel.kernel_version(),
kernel.current_tenant(),
kernel.current_workspace(),
kernel.in_scope(uuid, uuid)
TO kernel_worker, kernel_app, kernel_reader;

GRANT SELECT, INSERT, UPDATE, DELETE
ON kernel.campaigns, kernel.contacts, kernel.campaign_audience, kernel.provider_configs
TO kernel_app;

GRANT SELECT
ON kernel.campaigns, kernel.contacts, kernel.campaign_audience, kernel.provider_configs,
kernel.campaign_runs, kernel.job_queue, kernel.channel_outbox, kernel.job_events
TO kernel_app, kernel_reader;

GRANT SELECT ON kernel.state_transitions, kernel.schema_migrations
TO kernel_worker, kernel_app, kernel_reader;

-- Row-level security: the application and reader roles see only their tenant.
-- The owner bypasses it (tables are not FORCEd); its SECURITY DEFINER
-- functions check the scope themselves (kernel._assert_scope).

ALTER TABLE kernel.campaigns ENABLE ROW LEVEL SECURITY;
ALTER TABLE kernel.contacts ENABLE ROW LEVEL SECURITY;
ALTER TABLE kernel.campaign_audience ENABLE ROW LEVEL SECURITY;
ALTER TABLE kernel.provider_configs ENABLE ROW LEVEL SECURITY;
ALTER TABLE kernel.campaign_runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE kernel.job_queue ENABLE ROW LEVEL SECURITY;
ALTER TABLE kernel.channel_outbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE kernel.job_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE kernel.rate_buckets ENABLE ROW LEVEL SECURITY;
ALTER TABLE kernel.state_transitions ENABLE ROW LEVEL SECURITY;
ALTER TABLE kernel.schema_migrations ENABLE ROW LEVEL SECURITY;

-- No tenant rows in these two: everyone granted SELECT reads all of them.
CREATE POLICY state_transitions_readable ON kernel.state_transitions FOR SELECT
TO kernel_worker, kernel_app, kernel_reader
USING (TRUE);

CREATE POLICY schema_migrations_readable ON kernel.schema_migrations FOR SELECT
TO kernel_worker, kernel_app, kernel_reader
USING (TRUE);

CREATE POLICY campaigns_tenant_isolation ON kernel.campaigns
TO kernel_app, kernel_reader
USING (kernel.in_scope(tenant_id, workspace_id));

CREATE POLICY contacts_tenant_isolation ON kernel.contacts
TO kernel_app, kernel_reader
USING (kernel.in_scope(tenant_id, workspace_id));

CREATE POLICY provider_configs_tenant_isolation ON kernel.provider_configs
TO kernel_app, kernel_reader
USING (kernel.in_scope(tenant_id, workspace_id));

-- Audience rows are visible when both ends are (RLS applies inside the subqueries).
CREATE POLICY campaign_audience_tenant_isolation ON kernel.campaign_audience
TO kernel_app, kernel_reader
USING (
    EXISTS (
        SELECT 1 FROM kernel.campaigns AS c
        WHERE c.id = campaign_id
    )
    AND EXISTS (
        SELECT 1 FROM kernel.contacts AS p
        WHERE p.id = contact_id
    )
);

CREATE POLICY campaign_runs_tenant_isolation ON kernel.campaign_runs FOR SELECT
TO kernel_app, kernel_reader
USING (kernel.in_scope(tenant_id, workspace_id));

CREATE POLICY job_queue_tenant_isolation ON kernel.job_queue FOR SELECT
TO kernel_app, kernel_reader
USING (kernel.in_scope(tenant_id, workspace_id));

CREATE POLICY channel_outbox_tenant_isolation ON kernel.channel_outbox FOR SELECT
TO kernel_app, kernel_reader
USING (kernel.in_scope(tenant_id, workspace_id));

CREATE POLICY job_events_tenant_isolation ON kernel.job_events FOR SELECT
TO kernel_app, kernel_reader
USING (kernel.in_scope(tenant_id, workspace_id));

INSERT INTO kernel.schema_migrations (version, name) VALUES (1, '0001_kernel')
ON CONFLICT (version) DO NOTHING;
