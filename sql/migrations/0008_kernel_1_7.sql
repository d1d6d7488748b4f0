-- 0008_kernel_1_7.sql: the execution kernel v1.7.0.
--
-- Every statement on one tenant's rows (issue 10 item 6, docs/scale-out.md). 1.5 keyed the
-- kernel's own tables by tenant; the host tables kept their keys by id, and 28 (function,
-- table) pairs still read a table by id alone: right on one PostgreSQL, a query across every
-- shard under Citus, and a claim with SKIP LOCKED there would be refused. Here:
--
-- * campaigns, contacts and provider_configs are keyed with tenant_id ((id, tenant_id);
--   (workspace_id, channel, tenant_id)); campaign_audience gains tenant_id (filled from its
--   campaign when an insert leaves it out, so 1.6 applications keep working) and foreign keys
--   that pair it. Ids are then unique per tenant: two tenants may hold the same contact id,
--   and naming another tenant's id reveals nothing (1.6 answered 23505 for a taken one).
-- * workspaces stays keyed by id: it is the directory of which tenant owns a workspace (a
--   workspace belongs to exactly one tenant, the isolation contract of 1.1), a Citus reference
--   table beside state_transitions. kernel.reference_tables() says which tables are.
-- * Every kernel statement names its tenant: the daemon's with the jobs it holds, the operator
--   functions (by run or campaign id) after one look-up, kernel._tenant_of(), the only
--   statement that reads by id alone; a scoped session skips even that.
--
-- Before changing anything, the migration refuses (and names) an application's foreign keys
-- to contacts (id) or campaigns (id): they must be re-pointed to (id, tenant_id), which only
-- the application can do.

SET LOCAL search_path = pg_catalog, pg_temp;
SET LOCAL ROLE kernel_owner;

DO $$
DECLARE
    _found text;
BEGIN
    SELECT string_agg(format('%s on %s', f.conname, f.conrelid::regclass), ', ' ORDER BY f.conname)
    INTO _found
    FROM pg_constraint AS f
    WHERE f.contype = 'f'
      AND f.conindid IN ('kernel.contacts_pkey'::regclass, 'kernel.campaigns_pkey'::regclass,
                         'kernel.provider_configs_pkey'::regclass)
      AND f.conrelid <> 'kernel.campaign_audience'::regclass;
    IF _found IS NOT NULL THEN
        RAISE EXCEPTION 'kernel 1.7 keys contacts, campaigns and provider_configs with tenant_id, and these foreign keys refer to them without it: %; add tenant_id to each referring table, point the key at (id, tenant_id), then migrate again (docs/runbook.md, "Upgrade 1.6 → 1.7")', _found
            USING ERRCODE = 'KE008';
    END IF;
END
$$;

-- The audience learns its tenant from its campaigns.
ALTER TABLE kernel.campaign_audience
DROP CONSTRAINT campaign_audience_campaign_id_fkey,
DROP CONSTRAINT campaign_audience_contact_id_fkey,
DROP CONSTRAINT campaign_audience_pkey,
ADD COLUMN tenant_id uuid;
UPDATE kernel.campaign_audience AS a SET tenant_id = c.tenant_id
FROM kernel.campaigns AS c
WHERE c.id = a.campaign_id;
ALTER TABLE kernel.campaign_audience ALTER COLUMN tenant_id SET NOT NULL;

-- Host keys with tenant_id: id first, so a look-up by id and tenant is one probe.
ALTER TABLE kernel.campaign_runs DROP CONSTRAINT campaign_runs_campaign_id_fkey;
ALTER TABLE kernel.campaigns
DROP CONSTRAINT campaigns_id_tenant_id_key,
DROP CONSTRAINT campaigns_pkey,
ADD CONSTRAINT campaigns_pkey PRIMARY KEY (id, tenant_id);
ALTER TABLE kernel.campaign_runs ADD CONSTRAINT campaign_runs_campaign_id_fkey
FOREIGN KEY (campaign_id, tenant_id) REFERENCES kernel.campaigns (id, tenant_id);
ALTER TABLE kernel.contacts
DROP CONSTRAINT contacts_pkey,
ADD CONSTRAINT contacts_pkey PRIMARY KEY (id, tenant_id);
ALTER TABLE kernel.provider_configs
DROP CONSTRAINT provider_configs_pkey,
ADD CONSTRAINT provider_configs_pkey PRIMARY KEY (workspace_id, channel, tenant_id);

-- A campaign's audience is read by campaign and tenant (deploy, the launch checks), in contact order.
ALTER TABLE kernel.campaign_audience
ADD CONSTRAINT campaign_audience_pkey PRIMARY KEY (campaign_id, tenant_id, contact_id),
ADD CONSTRAINT campaign_audience_campaign_id_fkey FOREIGN KEY (campaign_id, tenant_id)
REFERENCES kernel.campaigns (id, tenant_id) ON DELETE CASCADE,
ADD CONSTRAINT campaign_audience_contact_id_fkey FOREIGN KEY (contact_id, tenant_id)
REFERENCES kernel.contacts (id, tenant_id) ON DELETE CASCADE;
DROP INDEX kernel.campaign_audience_by_contact_idx;
CREATE INDEX campaign_audience_by_contact_idx ON kernel.campaign_audience (contact_id, tenant_id);
COMMENT ON COLUMN kernel.campaign_audience.tenant_id IS
'The tenant of the campaign and the contact; filled from the campaign when an insert leaves it out.';

-- Rows of 1.6 applications, (campaign_id, contact_id): the tenant from the scope or the
-- campaign, and the pair checked so that a wrong one is named (KE008), not a foreign key.
-- After the scope guard (triggers fire in name order): a scoped session's missing campaign
-- or contact is KE002 first. A row that brings its tenant_id pays nothing on insert.
CREATE FUNCTION kernel._campaign_audience_tenant() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NEW.tenant_id IS NULL THEN
        NEW.tenant_id := kernel._tenant_of('campaign', NEW.campaign_id);
    END IF;
    IF NEW.tenant_id IS NULL THEN
        RAISE EXCEPTION 'campaign % not found', NEW.campaign_id USING ERRCODE = 'KE002';
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM kernel.campaigns AS c
        INNER JOIN kernel.contacts AS p
            ON p.id = NEW.contact_id AND p.tenant_id = c.tenant_id AND p.workspace_id = c.workspace_id
        WHERE c.id = NEW.campaign_id AND c.tenant_id = NEW.tenant_id
    ) THEN
        RAISE EXCEPTION 'contact % is not in the tenant and workspace of campaign %', NEW.contact_id, NEW.campaign_id
            USING ERRCODE = 'KE008';
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION kernel._campaign_audience_tenant() IS
'Trigger: an audience row without tenant_id gets its campaign''s (or the scope''s); a row inserted so, or updated, must pair a campaign and a contact of one tenant and workspace (KE008).';
CREATE TRIGGER campaign_audience_tenant BEFORE INSERT ON kernel.campaign_audience
FOR EACH ROW WHEN (new.tenant_id IS NULL) EXECUTE FUNCTION kernel._campaign_audience_tenant();
CREATE TRIGGER campaign_audience_tenant_on_update BEFORE UPDATE ON kernel.campaign_audience
FOR EACH ROW EXECUTE FUNCTION kernel._campaign_audience_tenant();

ALTER POLICY campaign_audience_tenant_isolation ON kernel.campaign_audience USING (
    EXISTS (
        SELECT 1 FROM kernel.campaigns AS c
        WHERE c.id = campaign_audience.campaign_id AND c.tenant_id = campaign_audience.tenant_id
    )
    AND EXISTS (
        SELECT 1 FROM kernel.contacts AS p
        WHERE p.id = campaign_audience.contact_id AND p.tenant_id = campaign_audience.tenant_id
    )
);

-- The tables every node holds whole under Citus: small, read by key from every tenant's statements.
CREATE FUNCTION kernel.reference_tables() RETURNS SETOF regclass
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t::regclass FROM unnest(ARRAY['kernel.state_transitions', 'kernel.schema_migrations',
                                         'kernel.workspaces']) AS t
$$;
COMMENT ON FUNCTION kernel.reference_tables() IS
'The kernel''s tables that are not distributed by tenant: the state machine, the migration ledger, and the directory of which tenant owns each workspace (Citus reference tables; docs/scale-out.md).';
GRANT EXECUTE ON FUNCTION kernel.reference_tables() TO kernel_operator, kernel_reader;

-- The tenant of an id that came without one: the operator functions are called with a run or
-- campaign id alone. A scoped session names its tenant, and nothing is read; else this is the
-- kernel's one statement that reads a tenant table by id alone (under Citus, one index probe
-- on each shard; the caller's statements then run on the tenant's shard).
CREATE FUNCTION kernel._tenant_of(p_what text, p_id uuid) RETURNS uuid
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _tenants uuid[];
BEGIN
    IF kernel.current_tenant() IS NOT NULL THEN
        RETURN kernel.current_tenant();
    ELSIF p_what = 'run' THEN
        _tenants := ARRAY(SELECT r.tenant_id FROM kernel.campaign_runs AS r WHERE r.id = p_id LIMIT 2);
    ELSIF p_what = 'job' THEN
        _tenants := ARRAY(SELECT j.tenant_id FROM kernel.job_queue AS j WHERE j.id = p_id LIMIT 2);
    ELSIF p_what = 'campaign' THEN
        _tenants := ARRAY(SELECT c.tenant_id FROM kernel.campaigns AS c WHERE c.id = p_id LIMIT 2);
    ELSIF p_what = 'workspace' THEN
        RETURN (SELECT w.tenant_id FROM kernel.workspaces AS w WHERE w.id = p_id);  -- a reference table
    ELSE
        RAISE EXCEPTION 'no tenant look-up for %', p_what USING ERRCODE = 'KE008';
    END IF;
    IF cardinality(_tenants) > 1 THEN
        -- Application-chosen campaign ids are unique per tenant only (campaigns_pkey).
        RAISE EXCEPTION '% % is an id of more than one tenant', p_what, p_id
            USING ERRCODE = 'KE008', HINT = 'Scope the transaction to the tenant (kernel.scope) and call again.';
    END IF;
    RETURN _tenants[1];  -- NULL when there is no such row: the caller says not found
END
$$;
COMMENT ON FUNCTION kernel._tenant_of(p_what text, p_id uuid) IS
'The tenant of a run, job, campaign or workspace id: the scope''s when the session is scoped, else the one row''s (KE008 when a campaign id is two tenants''); NULL when there is none.';

-- Every function below names its tenant in each statement (tests/sql/test_colocation.py).

CREATE OR REPLACE FUNCTION kernel._finish_runs_if_done(p_run_ids uuid[], p_tenant_ids uuid[])
RETURNS void
LANGUAGE plpgsql
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    -- Lock first, then look, in a statement of its own: it then sees what a concurrent
    -- completer of the same run committed while this one waited for the lock.
    -- Run ids are the kernel's own (gen_random_uuid): no run of one tenant shares another's id.
    PERFORM 1 FROM kernel.campaign_runs
    WHERE id = ANY (p_run_ids) AND tenant_id = ANY (p_tenant_ids) ORDER BY id FOR UPDATE;
    WITH finished AS (
        SELECT r.id, r.tenant_id,
               count(*) FILTER (WHERE j.status = 'completed') AS jobs_completed,
               count(*) FILTER (WHERE j.status = 'failed') AS jobs_failed
        FROM kernel.campaign_runs AS r
        INNER JOIN kernel.job_queue AS j ON r.id = j.run_id AND r.tenant_id = j.tenant_id
        WHERE r.id = ANY (p_run_ids) AND r.tenant_id = ANY (p_tenant_ids) AND r.status IN ('queued', 'running')
        GROUP BY r.id, r.tenant_id
        HAVING count(*) FILTER (WHERE j.status IN ('scheduled', 'queued', 'processing')) = 0
    ), decided AS (
        SELECT f.id, f.tenant_id, f.jobs_completed, f.jobs_failed, i.sent, i.bad,
               CASE WHEN f.jobs_failed = 0 AND i.bad = 0 THEN 'completed'
                    WHEN f.jobs_completed = 0 OR (i.sent = 0 AND i.bad > 0) THEN 'failed'
                    ELSE 'partial' END AS status
        FROM finished AS f
        CROSS JOIN LATERAL (
            SELECT count(*) FILTER (WHERE o.status = 'sent') AS sent,
                   count(*) FILTER (WHERE o.status IN ('failed', 'unknown')) AS bad
            FROM kernel.channel_outbox AS o WHERE o.run_id = f.id AND o.tenant_id = f.tenant_id
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
    WHERE r.id = d.id AND r.tenant_id = d.tenant_id;
END
$function$;
COMMENT ON FUNCTION kernel._finish_runs_if_done(p_run_ids uuid[], p_tenant_ids uuid[]) IS 'Invariant 4: each of the runs (of the tenants given) whose jobs are all terminal gets its status from the job and item outcomes: completed, partial or failed; a cancelled run stays cancelled.';

CREATE OR REPLACE FUNCTION kernel._lock_campaign_without_active_run(
    p_campaign_id uuid, p_tenant_id uuid
)
RETURNS kernel.campaigns
LANGUAGE plpgsql
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    _c kernel.campaigns;
    _active uuid;
BEGIN
    -- The row lock serialises concurrent deploys and retries of one campaign.
    SELECT * INTO _c FROM kernel.campaigns WHERE id = p_campaign_id AND tenant_id = p_tenant_id FOR UPDATE;
    PERFORM kernel._assert_scope(_c.tenant_id, _c.workspace_id, 'campaign', p_campaign_id);
    SELECT id INTO _active FROM kernel.campaign_runs
    WHERE campaign_id = p_campaign_id AND tenant_id = p_tenant_id AND status IN ('queued', 'running');
    IF FOUND THEN
        RAISE EXCEPTION 'campaign % already has an active run %', p_campaign_id, _active
            USING ERRCODE = 'KE003', HINT = 'Wait for it to finish or cancel it first.';
    END IF;
    RETURN _c;
END
$function$;
COMMENT ON FUNCTION kernel._lock_campaign_without_active_run(p_campaign_id uuid, p_tenant_id uuid) IS 'Locks a campaign in scope; KE002 when missing, KE003 when it already has a queued or running run.';

CREATE OR REPLACE FUNCTION kernel._take_rate_tokens(
    p_workspace_id uuid,
    p_tenant_id uuid,
    p_provider text,
    p_wanted integer,
    OUT granted integer,
    OUT wait_seconds double precision
)
RETURNS record
LANGUAGE plpgsql
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    _rate numeric;
    _tenant uuid := p_tenant_id;
    _bucket kernel.rate_buckets;
    _tokens double precision;
BEGIN
    SELECT min(c.max_per_second) INTO _rate
    FROM kernel.provider_configs AS c
    WHERE c.workspace_id = p_workspace_id AND c.tenant_id = _tenant AND c.provider = p_provider;
    wait_seconds := 0;
    IF _rate IS NULL THEN
        granted := p_wanted;  -- no limit configured
        RETURN;
    END IF;
    INSERT INTO kernel.rate_buckets (workspace_id, provider, tenant_id, tokens, refreshed_at)
    VALUES (p_workspace_id, p_provider, _tenant, greatest(_rate, 1), clock_timestamp())
    ON CONFLICT (workspace_id, provider, tenant_id) DO NOTHING;
    SELECT * INTO _bucket FROM kernel.rate_buckets
    WHERE workspace_id = p_workspace_id AND provider = p_provider AND tenant_id = _tenant FOR UPDATE;
    -- Refill at the configured rate; the burst is one second's worth.
    _tokens := least(greatest(_rate, 1),
                     _bucket.tokens + _rate * extract(EPOCH FROM clock_timestamp() - _bucket.refreshed_at));
    granted := least(p_wanted, floor(_tokens))::integer;
    UPDATE kernel.rate_buckets SET tokens = _tokens - granted, refreshed_at = clock_timestamp()
    WHERE workspace_id = p_workspace_id AND provider = p_provider AND tenant_id = _tenant;
    IF granted = 0 AND p_wanted > 0 THEN
        wait_seconds := (1 - _tokens) / _rate;
    END IF;
END
$function$;
COMMENT ON FUNCTION kernel._take_rate_tokens(p_workspace_id uuid, p_tenant_id uuid, p_provider text, p_wanted integer, OUT granted integer, OUT wait_seconds double precision) IS 'Shared token bucket (provider_configs.max_per_second, burst of one second): how many of p_wanted sends may start now, and when none may, how long until one can.';

CREATE OR REPLACE FUNCTION kernel._end_unfinished_items(
    p_job_id uuid, p_tenant_id uuid, p_reason text
)
RETURNS void
LANGUAGE plpgsql
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    _job kernel.job_queue;
    _run kernel.campaign_runs;
BEGIN
    SELECT * INTO _job FROM kernel.job_queue WHERE id = p_job_id AND tenant_id = p_tenant_id;
    SELECT * INTO _run FROM kernel.campaign_runs WHERE id = _job.run_id AND tenant_id = p_tenant_id;
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
    WHERE job_id = p_job_id AND tenant_id = p_tenant_id AND status = 'pending';
END
$function$;
COMMENT ON FUNCTION kernel._end_unfinished_items(p_job_id uuid, p_tenant_id uuid, p_reason text) IS 'Ends a failed job''s items honestly: contacts never reached and items never dispatched fail (skipped when the run was cancelled), dispatched ones end unknown.';

CREATE OR REPLACE FUNCTION kernel._end_job(p_job kernel.job_queue, p_success boolean, p_error text)
RETURNS text
LANGUAGE plpgsql
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    _run_status text;
    _pending bigint;
    _items bigint;
BEGIN
    SELECT count(*) FILTER (WHERE status = 'pending'), count(*) INTO _pending, _items
    FROM kernel.channel_outbox WHERE job_id = p_job.id AND tenant_id = p_job.tenant_id;
    IF _pending > 0 THEN
        RAISE EXCEPTION 'job % still has % pending outbox items; record their results first', p_job.id, _pending
            USING ERRCODE = 'KE006';
    END IF;
    SELECT status INTO _run_status FROM kernel.campaign_runs WHERE id = p_job.run_id AND tenant_id = p_job.tenant_id;
    IF p_success AND _run_status <> 'cancelled' AND _items < cardinality(p_job.contact_ids) THEN
        RAISE EXCEPTION 'job % has % of % contacts without an outbox item; reserve them first',
            p_job.id, cardinality(p_job.contact_ids) - _items, cardinality(p_job.contact_ids)
            USING ERRCODE = 'KE007';
    END IF;
    IF NOT p_success THEN
        PERFORM kernel._end_unfinished_items(p_job.id, p_job.tenant_id, coalesce(p_error, 'job failed'));
    END IF;
    UPDATE kernel.job_queue
    SET status = CASE WHEN _run_status = 'cancelled' THEN 'cancelled'
                      WHEN p_success THEN 'completed' ELSE 'failed' END,
        completed_at = now(), last_error = p_error,
        locked_by = NULL, lease_expires_at = NULL
    WHERE id = p_job.id AND tenant_id = p_job.tenant_id;
    PERFORM kernel._finish_runs_if_done(ARRAY[p_job.run_id], ARRAY[p_job.tenant_id]);
    RETURN (SELECT status FROM kernel.campaign_runs WHERE id = p_job.run_id AND tenant_id = p_job.tenant_id);
END
$function$;
COMMENT ON FUNCTION kernel._end_job(p_job kernel.job_queue, p_success boolean, p_error text) IS 'Ends a locked processing job: refused while an item is pending (KE006) and, for success, while a contact has no item (KE007); derives the run status and returns it.';

CREATE OR REPLACE FUNCTION kernel._insert_items(
    p_job kernel.job_queue, p_run kernel.campaign_runs, p_count integer
)
RETURNS integer
LANGUAGE plpgsql
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
        LEFT JOIN kernel.contacts AS p ON u.contact_id = p.id AND p.tenant_id = p_job.tenant_id
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
        ON CONFLICT (idempotency_key, tenant_id) DO NOTHING
        RETURNING status
    )
    SELECT count(*) FILTER (WHERE status = 'pending') INTO _pending FROM inserted;
    UPDATE kernel.job_queue SET reserved_count = reserved_count + p_count
    WHERE id = p_job.id AND tenant_id = p_job.tenant_id;
    RETURN _pending;
END
$function$;
COMMENT ON FUNCTION kernel._insert_items(p_job kernel.job_queue, p_run kernel.campaign_runs, p_count integer) IS 'Inserts items for the next p_count contacts of a job''s snapshot (unreachable ones skipped) and advances reserved_count; returns how many are pending.';

CREATE OR REPLACE FUNCTION kernel._provider_snapshot(p_campaign kernel.campaigns)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    RETURN (
        SELECT jsonb_build_object('provider', p.provider, 'provider_settings', p.settings)
        FROM kernel.provider_configs AS p
        WHERE p.workspace_id = p_campaign.workspace_id AND p.channel = p_campaign.channel
          AND p.tenant_id = p_campaign.tenant_id
    );
END
$function$;
COMMENT ON FUNCTION kernel._provider_snapshot(p_campaign kernel.campaigns) IS 'The provider part of run_config: the workspace''s provider and settings for the campaign''s channel.';

CREATE OR REPLACE FUNCTION kernel._enqueue_batches(
    p_run kernel.campaign_runs, p_contacts uuid[], p_batch_size integer
)
RETURNS integer
LANGUAGE plpgsql
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    _jobs integer;
    _window jsonb := p_run.run_config -> 'send_window';
    _now timestamptz := kernel.clock();
    _start timestamptz := greatest(p_run.start_at, _now);
    _zones text[];
    _zone_ords bigint[];
    _batches integer;
BEGIN
    IF _window IS NOT NULL THEN
        -- Each contact's zone (its own, else its workspace's) and its place among the contacts
        -- of that zone: batches are cut per zone, so a job's contacts share one window. Only a
        -- windowed run pays for this (a plain 1,000,000-contact deploy sorts nothing here).
        SELECT array_agg(z.zone ORDER BY z.ord), array_agg(z.zone_ord ORDER BY z.ord)
        INTO _zones, _zone_ords
        FROM (
            SELECT u.ord, coalesce(p.time_zone, w.time_zone) AS zone,
                   row_number() OVER (PARTITION BY coalesce(p.time_zone, w.time_zone) ORDER BY u.ord) AS zone_ord
            FROM unnest(p_contacts) WITH ORDINALITY AS u (contact_id, ord)
            LEFT JOIN kernel.contacts AS p ON u.contact_id = p.id AND p.tenant_id = p_run.tenant_id
            CROSS JOIN kernel.workspaces AS w
            WHERE w.id = p_run.workspace_id
        ) AS z;
        SELECT sum(ceil(z.n::numeric / p_batch_size)) INTO _batches
        FROM (SELECT count(*) AS n FROM unnest(_zones) AS u (zone) GROUP BY u.zone) AS z;
    ELSE
        _batches := ceil(cardinality(p_contacts)::numeric / p_batch_size);
    END IF;
    -- A job is queued when it may go now; else scheduled until its start or its window.
    INSERT INTO kernel.job_queue (
        run_id, tenant_id, workspace_id, contact_ids, payload, priority, time_zone, status, run_after
    )
    SELECT p_run.id, p_run.tenant_id, p_run.workspace_id, b.contact_ids,
           jsonb_build_object('batch_no', row_number() OVER (ORDER BY b.zone, b.batch_no),
                              'batch_count', _batches),
           p_run.priority, b.zone,
           CASE WHEN d.due > _now THEN 'scheduled' ELSE 'queued' END, d.due
    FROM (
        SELECT u.zone, (coalesce(u.zone_ord, u.ord) - 1) / p_batch_size AS batch_no,
               array_agg(u.contact_id ORDER BY u.ord) AS contact_ids
        FROM unnest(p_contacts, _zones, _zone_ords) WITH ORDINALITY AS u (contact_id, zone, zone_ord, ord)
        GROUP BY u.zone, 2
    ) AS b
    CROSS JOIN LATERAL (
        SELECT least(
            CASE WHEN _window IS NULL THEN _start ELSE kernel.send_window_opens(_window, b.zone, _start) END,
            p_run.deadline
        ) AS due
    ) AS d
    ORDER BY b.zone, b.batch_no;
    GET DIAGNOSTICS _jobs = ROW_COUNT;
    PERFORM pg_notify('kernel_jobs', p_run.id::text);
    RETURN _jobs;
END
$function$;
COMMENT ON FUNCTION kernel._enqueue_batches(p_run kernel.campaign_runs, p_contacts uuid[], p_batch_size integer) IS 'Splits a run''s contacts into send_batch jobs of p_batch_size (per time zone when the run has a send window), queued when they may go now, else scheduled until the run''s start or their window, and wakes the workers (NOTIFY kernel_jobs).';

CREATE OR REPLACE FUNCTION kernel._claim_jobs(
    p_worker text, p_max_jobs integer, p_lease interval, p_tenant_ids uuid[]
)
RETURNS SETOF kernel.job_queue
LANGUAGE plpgsql
SET search_path TO 'pg_catalog', 'pg_temp'
SET enable_bitmapscan TO 'off'
SET enable_seqscan TO 'off'
SET jit TO 'off'
AS $function$
DECLARE
    _taken kernel.job_queue[];
    _exhausted kernel.job_queue;
    -- A daemon given --tenant sees those tenants, a scoped session its own; else every tenant
    -- with queued jobs, from a random one on (wrapping round), at most 32 per claim.
    _only uuid[] := CASE WHEN p_tenant_ids IS NOT NULL THEN p_tenant_ids
                         WHEN kernel.current_tenant() IS NOT NULL THEN ARRAY[kernel.current_tenant()] END;
    _start uuid := gen_random_uuid();
    _now timestamptz := kernel.clock();
BEGIN
    -- Scheduled jobs that came due (a start, a window opening) become queued: at most 1,000
    -- per claim, oldest first; concurrent claimers promote different ones (SKIP LOCKED).
    IF EXISTS (SELECT 1 FROM kernel.job_queue AS d
               WHERE d.status = 'scheduled' AND d.run_after <= _now
                 AND (_only IS NULL OR d.tenant_id = ANY (_only))) THEN
        UPDATE kernel.job_queue AS j SET status = 'queued'
        FROM (
            SELECT d.id, d.tenant_id FROM kernel.job_queue AS d
            WHERE d.status = 'scheduled' AND d.run_after <= _now
              AND (_only IS NULL OR d.tenant_id = ANY (_only))
            ORDER BY d.run_after LIMIT 1000
            FOR UPDATE SKIP LOCKED
        ) AS d
        WHERE j.id = d.id AND j.tenant_id = d.tenant_id;
    END IF;

    -- Expired leases first (their holder died: the crash path), then queued jobs.
    WITH RECURSIVE expired AS (
        SELECT j.id, j.tenant_id FROM kernel.job_queue AS j
        WHERE j.status = 'processing' AND j.lease_expires_at < now()
          AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id))
          AND (_only IS NULL OR j.tenant_id = ANY (_only))
        ORDER BY j.lease_expires_at, j.id
        LIMIT p_max_jobs
        FOR UPDATE SKIP LOCKED
    ), tenants (tenant_id, first, n) AS (
        -- The tenants with queued jobs: one probe of job_queue_run_claim_order_idx each.
        SELECT t.tenant_id, t.tenant_id, 1
        FROM (SELECT coalesce(
            (SELECT j.tenant_id FROM kernel.job_queue AS j
             WHERE j.status = 'queued' AND j.tenant_id >= _start ORDER BY j.tenant_id LIMIT 1),
            (SELECT j.tenant_id FROM kernel.job_queue AS j
             WHERE j.status = 'queued' ORDER BY j.tenant_id LIMIT 1)
        ) AS tenant_id) AS t
        WHERE _only IS NULL AND t.tenant_id IS NOT NULL
        UNION ALL
        SELECT o.tenant_id, o.tenant_id, 1
        FROM unnest(_only) AS o (tenant_id)
        WHERE EXISTS (SELECT 1 FROM kernel.job_queue AS j WHERE j.status = 'queued' AND j.tenant_id = o.tenant_id)
        UNION ALL
        SELECT x.tenant_id, t.first, t.n + 1
        FROM tenants AS t
        CROSS JOIN LATERAL (SELECT coalesce(
            (SELECT j.tenant_id FROM kernel.job_queue AS j
             WHERE j.status = 'queued' AND j.tenant_id > t.tenant_id ORDER BY j.tenant_id LIMIT 1),
            (SELECT j.tenant_id FROM kernel.job_queue AS j
             WHERE j.status = 'queued' ORDER BY j.tenant_id LIMIT 1)
        ) AS tenant_id) AS x
        WHERE _only IS NULL AND t.n < 32 AND x.tenant_id <> t.first
    ), runs (tenant_id, priority, run_id, level_first, n) AS (
        -- Each tenant's runs with queued jobs, in priority order: at the top priority from a
        -- random run on (wrapping round), then each lower priority from its first run; as
        -- many as its share of the claim (so one-contact runs fill it), at least 8 (turns).
        -- One probe of job_queue_run_claim_order_idx per run.
        SELECT t.tenant_id, r.priority, r.run_id, r.run_id, 1
        FROM tenants AS t
        CROSS JOIN LATERAL (
            SELECT j.priority FROM kernel.job_queue AS j
            WHERE j.status = 'queued' AND j.tenant_id = t.tenant_id
            ORDER BY j.priority DESC LIMIT 1
        ) AS top
        CROSS JOIN LATERAL (
            SELECT top.priority, coalesce(
                (SELECT j.run_id FROM kernel.job_queue AS j
                 WHERE j.status = 'queued' AND j.tenant_id = t.tenant_id AND j.priority = top.priority
                   AND j.run_id >= _start
                 ORDER BY j.run_id LIMIT 1),
                (SELECT j.run_id FROM kernel.job_queue AS j
                 WHERE j.status = 'queued' AND j.tenant_id = t.tenant_id AND j.priority = top.priority
                 ORDER BY j.run_id LIMIT 1)
            ) AS run_id
        ) AS r
        UNION ALL
        SELECT r.tenant_id, x.priority, x.run_id, x.level_first, r.n + 1
        FROM runs AS r
        CROSS JOIN LATERAL (
            (SELECT j.priority, j.run_id, r.level_first FROM kernel.job_queue AS j
             WHERE j.status = 'queued' AND j.tenant_id = r.tenant_id AND j.priority = r.priority
               AND j.run_id > r.run_id AND (r.run_id >= r.level_first OR j.run_id < r.level_first)
             ORDER BY j.run_id LIMIT 1)  -- the next run of this priority
            UNION ALL
            (SELECT j.priority, j.run_id, r.level_first FROM kernel.job_queue AS j
             WHERE j.status = 'queued' AND j.tenant_id = r.tenant_id AND j.priority = r.priority
               AND r.run_id >= r.level_first AND j.run_id < r.level_first
             ORDER BY j.run_id LIMIT 1)  -- wrapping round to its first
            UNION ALL
            (SELECT j.priority, j.run_id, j.run_id FROM kernel.job_queue AS j
             WHERE j.status = 'queued' AND j.tenant_id = r.tenant_id AND j.priority < r.priority
             ORDER BY j.priority DESC, j.run_id LIMIT 1)  -- the next lower priority
            LIMIT 1
        ) AS x
        WHERE r.n < greatest(8, ceil(p_max_jobs::numeric / (SELECT count(*) FROM tenants AS c)))
    ), shares AS (
        -- Each tenant's share of the claim, and how many of its jobs are in flight now.
        SELECT t.tenant_id, t.n, ceil(p_max_jobs::numeric / count(*) OVER ())::integer AS share,
               (SELECT count(*) FROM kernel.job_queue AS p
                WHERE p.tenant_id = t.tenant_id AND p.status = 'processing') AS busy
        FROM tenants AS t
    ), offered AS (
        -- Up to its tenant's share of each run's first jobs, locked as the limit pulls them
        -- (SKIP LOCKED: what another claimer holds is passed over, never waited for).
        SELECT c.id, s.tenant_id, s.share, s.busy, s.n AS tenant_n, r.run_id, r.n AS run_n, r.priority,
               c.run_after, row_number() OVER (PARTITION BY r.n, r.tenant_id ORDER BY c.run_after, c.id) AS run_turn,
               count(*) OVER (PARTITION BY r.n, r.tenant_id) = s.share AS run_filled,
               -- A run whose first job has been due 5 minutes ranks as the top priority.
               CASE WHEN min(c.run_after) OVER (PARTITION BY r.n, r.tenant_id) < _now - interval '5 minutes'
                    THEN 2147483647 ELSE r.priority END AS rank_priority
        FROM shares AS s
        INNER JOIN runs AS r ON s.tenant_id = r.tenant_id
        CROSS JOIN LATERAL (
            SELECT j.id, j.priority, j.run_after FROM kernel.job_queue AS j
            WHERE j.tenant_id = s.tenant_id AND j.priority = r.priority AND j.run_id = r.run_id
              AND j.status = 'queued'
              AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id))
              AND (p_tenant_ids IS NULL OR j.tenant_id = ANY (p_tenant_ids))
            ORDER BY j.run_after, j.id
            LIMIT s.share
            FOR UPDATE OF j SKIP LOCKED
        ) AS c
    ), ranked AS (
        -- Within a tenant: the highest priority first, its runs in turns.
        SELECT o.*, row_number() OVER (
                   PARTITION BY o.tenant_id ORDER BY o.rank_priority DESC, o.run_turn, o.run_n) AS turn
        FROM offered AS o
    ), topped AS (
        -- Room no tenant could fill is topped up from the run that filled its share in the
        -- least busy tenant, walking its jobs past what is offered already.
        SELECT c.id, t.tenant_id
        FROM (
            SELECT o.tenant_id, o.priority, o.run_id FROM offered AS o WHERE o.run_filled
            ORDER BY o.busy, o.tenant_n, o.rank_priority DESC, o.run_n LIMIT 1
        ) AS t
        CROSS JOIN LATERAL (
            SELECT j.id FROM kernel.job_queue AS j
            WHERE j.tenant_id = t.tenant_id AND j.priority = t.priority AND j.run_id = t.run_id
              AND j.status = 'queued'
              AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id))
              AND j.id NOT IN (SELECT o.id FROM offered AS o)
            ORDER BY j.run_after, j.id
            LIMIT greatest(p_max_jobs - (SELECT count(*) FROM offered), 0)
            FOR UPDATE OF j SKIP LOCKED
        ) AS c
    ), due AS (
        -- In turns: every tenant's first job before any tenant's second, the least busy first;
        -- past its share, a tenant's further offered jobs, then the top-up.
        (SELECT r.id, r.tenant_id FROM ranked AS r ORDER BY r.turn > r.share, r.turn, r.busy, r.tenant_n LIMIT p_max_jobs)
        UNION ALL
        SELECT t.id, t.tenant_id FROM topped AS t
    ), candidates AS (
        SELECT id, tenant_id FROM expired UNION ALL SELECT id, tenant_id FROM due LIMIT p_max_jobs
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
        WHERE j.id = c.id AND j.tenant_id = c.tenant_id
        RETURNING j AS job
    )
    SELECT coalesce(array_agg(t.job ORDER BY (t.job).priority DESC, (t.job).run_after, (t.job).id), '{}')
    INTO _taken FROM taken AS t;

    FOREACH _exhausted IN ARRAY _taken LOOP
        IF _exhausted.status = 'failed' THEN
            PERFORM kernel._end_unfinished_items(_exhausted.id, _exhausted.tenant_id, _exhausted.last_error);
            PERFORM kernel._finish_runs_if_done(ARRAY[_exhausted.run_id], ARRAY[_exhausted.tenant_id]);
        END IF;
    END LOOP;

    UPDATE kernel.campaign_runs AS r SET status = 'running', started_at = now()
    FROM (SELECT DISTINCT t.run_id, t.tenant_id FROM unnest(_taken) AS t WHERE t.status = 'processing') AS t
    WHERE r.status = 'queued' AND r.id = t.run_id AND r.tenant_id = t.tenant_id;

    RETURN QUERY SELECT * FROM unnest(_taken) AS t WHERE t.status = 'processing';
END
$function$;
COMMENT ON FUNCTION kernel._claim_jobs(p_worker text, p_max_jobs integer, p_lease interval, p_tenant_ids uuid[]) IS 'The one claim (FOR UPDATE SKIP LOCKED): promotes scheduled jobs that came due, then takes expired leases, then queued jobs in turns between tenants (the given ones, the scope''s, or all) and between each tenant''s runs, by priority; jobs at max_attempts are failed instead; their runs move to running.';

CREATE OR REPLACE FUNCTION kernel.worker_step(
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
    p_tenant_ids uuid[]
)
RETURNS TABLE (
    kind text,
    job_id uuid,
    run_id uuid,
    item_id uuid,
    idempotency_key text,
    recipient text,
    contact_id uuid,
    detail jsonb
)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
SET enable_seqscan TO 'off'
AS $function$
#variable_conflict use_column
DECLARE
    _lease interval;
    _results integer := coalesce(cardinality(p_result_ids), 0);
    _held uuid[];
    _tenants uuid[];  -- of the jobs held: every statement below names them
    _recorded uuid[];
    _waiting uuid[];
    _ended uuid[] := '{}'::uuid[];
    _claimed kernel.job_queue[] := '{}'::kernel.job_queue[];
    _cancelled uuid[];
    _dispatchable uuid[];
    _job record;
    _ended_runs uuid[];
    _ended_run_tenants uuid[];
    _grant record;
    _cap_jobs uuid[] := '{}'::uuid[];
    _caps integer[] := '{}'::integer[];
    _want integer := p_want;
    _left integer;
    _n integer;
    _wait double precision;
    _now timestamptz := kernel.clock();
    _closed uuid[] := '{}'::uuid[];
    _paused uuid[] := '{}'::uuid[];
    _timed_out uuid[] := '{}'::uuid[];
    _reason text;
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
    SELECT coalesce(array_agg(q.id), '{}'), coalesce(array_agg(DISTINCT q.tenant_id), '{}') INTO _held, _tenants
    FROM (
        SELECT j.id, j.tenant_id FROM kernel.job_queue AS j
        WHERE j.id = ANY (p_held) AND j.status = 'processing'
          AND (p_tenant_ids IS NULL OR j.tenant_id = ANY (p_tenant_ids))
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
        -- A hash join of the results with their rows, found by id. The planner, seeing a fresh
        -- outbox as a few rows, otherwise nests a loop over both and compares every result with
        -- every row: 31 ms instead of 1.7 ms for 250 results (auto_explain, docs/benchmarks.md).
        PERFORM set_config('enable_nestloop', 'off', true);
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
            -- Reached by id: the fence is written so that no index serves it (a fresh outbox
            -- without statistics would otherwise be read by job, every item of it).
            WHERE o.id = ANY (p_result_ids) AND o.tenant_id = ANY (_tenants) AND o.id = r.id
              AND (o.job_id = ANY (_held)) IS TRUE
              AND o.status = 'pending' AND o.dispatched_at IS NOT NULL
            RETURNING o.id, o.status
        )
        SELECT coalesce(array_agg(d.id), '{}'), coalesce(array_agg(d.id) FILTER (WHERE d.status = 'pending'), '{}')
        INTO _recorded, _waiting FROM recorded AS d;
        PERFORM set_config('enable_nestloop', 'on', true);
        IF cardinality(_waiting) > 0 THEN
            RETURN QUERY
            SELECT 'waiting', o.job_id, o.run_id, o.id, o.idempotency_key, o.recipient, o.contact_id,
                   jsonb_build_object('dispatch_count', o.dispatch_count)
            FROM kernel.channel_outbox AS o WHERE o.id = ANY (_waiting) AND o.tenant_id = ANY (_tenants);
        END IF;
        IF cardinality(_recorded) < _results THEN
            -- Results for held jobs that match no dispatched pending item: a daemon bug.
            RETURN QUERY
            SELECT 'stale', o.job_id, o.run_id, o.id, o.idempotency_key, o.recipient, o.contact_id,
                   jsonb_build_object('status', o.status, 'dispatched', o.dispatched_at IS NOT NULL)
            FROM kernel.channel_outbox AS o
            WHERE o.id = ANY (p_result_ids) AND o.tenant_id = ANY (_tenants) AND o.job_id = ANY (_held)
              AND o.id <> ALL (_recorded);
        END IF;
    END IF;

    -- 3. Renew the leases that are a third gone: one statement for every job held, and none
    --    when no lease is due (job_queue's statement trigger would run for nothing).
    IF EXISTS (
        SELECT 1 FROM kernel.job_queue AS j
        WHERE j.id = ANY (_held) AND j.tenant_id = ANY (_tenants) AND j.lease_expires_at < now() + _lease * 2 / 3
    ) THEN
        UPDATE kernel.job_queue AS j SET lease_expires_at = now() + _lease
        WHERE j.id = ANY (_held) AND j.tenant_id = ANY (_tenants) AND j.lease_expires_at < now() + _lease * 2 / 3;
    END IF;

    -- 4. End the jobs the daemon has finished, checked here as complete_job checks them:
    --    no pending item, and an item for every contact unless the run was cancelled.
    IF cardinality(p_complete) > 0 THEN
        UPDATE kernel.channel_outbox AS o
        SET status = 'skipped', skipped = TRUE, skip_reason = 'run_cancelled', completed_at = clock_timestamp()
        FROM kernel.job_queue AS j
        INNER JOIN kernel.campaign_runs AS r ON j.run_id = r.id AND j.tenant_id = r.tenant_id
        WHERE o.job_id = j.id AND o.tenant_id = j.tenant_id
          AND j.id = ANY (p_complete) AND j.id = ANY (_held) AND j.tenant_id = ANY (_tenants)
          AND r.status = 'cancelled' AND o.status = 'pending' AND o.dispatched_at IS NULL;
        WITH finished AS (
            SELECT j.id, j.tenant_id, r.status AS run_status
            FROM kernel.job_queue AS j
            INNER JOIN kernel.campaign_runs AS r ON j.run_id = r.id AND j.tenant_id = r.tenant_id
            CROSS JOIN LATERAL (
                SELECT count(*) FILTER (WHERE o.status = 'pending') AS pending, count(*) AS items
                FROM kernel.channel_outbox AS o WHERE o.job_id = j.id AND o.tenant_id = j.tenant_id
            ) AS c
            WHERE j.id = ANY (p_complete) AND j.id = ANY (_held) AND j.tenant_id = ANY (_tenants) AND c.pending = 0
              AND (r.status = 'cancelled' OR c.items >= cardinality(j.contact_ids))
        ), ended AS (
            UPDATE kernel.job_queue AS j
            SET status = CASE WHEN f.run_status = 'cancelled' THEN 'cancelled' ELSE 'completed' END,
                completed_at = now(), last_error = NULL, locked_by = NULL, lease_expires_at = NULL
            FROM finished AS f WHERE j.id = f.id AND j.tenant_id = f.tenant_id
            RETURNING j.id, j.run_id, j.tenant_id
        )
        SELECT coalesce(array_agg(e.id), '{}'), coalesce(array_agg(e.run_id), '{}'), coalesce(array_agg(e.tenant_id), '{}')
        INTO _ended, _ended_runs, _ended_run_tenants FROM ended AS e;
        PERFORM kernel._finish_runs_if_done(_ended_runs, _ended_run_tenants);
    END IF;

    -- 4b. End the jobs the daemon cannot execute (their provider is unusable): what was never
    --     dispatched fails with the reason, contacts never reached get failed items.
    IF cardinality(p_fail) > 0 THEN
        FOR _job IN
            SELECT j AS job, f.error
            FROM kernel.job_queue AS j INNER JOIN unnest(p_fail, p_fail_errors) AS f (id, error) ON j.id = f.id
            WHERE j.id = ANY (_held) AND j.tenant_id = ANY (_tenants) AND j.id <> ALL (_ended)
            ORDER BY j.id
        LOOP
            UPDATE kernel.channel_outbox AS o SET status = 'failed', error = _job.error
            WHERE o.job_id = (_job.job).id AND o.tenant_id = (_job.job).tenant_id
              AND o.status = 'pending' AND o.dispatched_at IS NULL;
            PERFORM kernel._end_job(_job.job, FALSE, _job.error);
            _ended := _ended || (_job.job).id;
        END LOOP;
    END IF;
    IF cardinality(_ended) > 0 THEN
        RETURN QUERY
        SELECT 'done', j.id, j.run_id, NULL::uuid, NULL::text, NULL::text, NULL::uuid,
               jsonb_build_object('job_status', j.status, 'run_status', r.status)
        FROM kernel.job_queue AS j INNER JOIN kernel.campaign_runs AS r ON j.run_id = r.id AND j.tenant_id = r.tenant_id
        WHERE j.id = ANY (_ended) AND j.tenant_id = ANY (_tenants);
        _held := ARRAY(SELECT h FROM unnest(_held) AS h WHERE h <> ALL (_ended));
    END IF;

    -- 5. Claim new jobs. Items a lost holder left dispatched end unknown, or go back to
    --    be re-sent with the same key when the provider deduplicates.
    IF p_claim > 0 THEN
        SELECT coalesce(array_agg(c), '{}') INTO _claimed
        FROM kernel._claim_jobs(p_worker, p_claim, _lease, p_tenant_ids) AS c;
        _tenants := ARRAY(SELECT DISTINCT t FROM unnest(_tenants || ARRAY(SELECT c.tenant_id FROM unnest(_claimed) AS c)) AS t);
        UPDATE kernel.channel_outbox AS o
        SET status = CASE WHEN d.dedup THEN 'pending' ELSE 'unknown' END,
            dispatched_at = CASE WHEN d.dedup THEN NULL ELSE o.dispatched_at END,
            completed_at = CASE WHEN d.dedup THEN NULL ELSE clock_timestamp() END,
            error = CASE WHEN d.dedup THEN o.error
                         ELSE 'worker lost after dispatch; the provider cannot deduplicate, so it is not re-sent' END
        FROM (
            SELECT c.id, c.tenant_id, (r.run_config ->> 'provider') = ANY (coalesce(p_deduplicating, '{}')) AS dedup
            FROM unnest(_claimed) AS c INNER JOIN kernel.campaign_runs AS r ON c.run_id = r.id AND c.tenant_id = r.tenant_id
            WHERE c.attempts > 1
        ) AS d
        WHERE o.job_id = d.id AND o.tenant_id = d.tenant_id AND o.status = 'pending' AND o.dispatched_at IS NOT NULL;
        RETURN QUERY
        SELECT 'job', c.id, c.run_id, NULL::uuid, NULL::text, NULL::text, NULL::uuid,
               jsonb_build_object(
                   'run_status', r.status, 'campaign_id', r.campaign_id, 'tenant_id', r.tenant_id,
                   'workspace_id', r.workspace_id, 'channel', r.channel, 'generation', r.generation,
                   'contact_count', cardinality(c.contact_ids),
                   'remaining', cardinality(c.contact_ids) - c.reserved_count, 'attempts', c.attempts
               ) || r.run_config
        FROM unnest(_claimed) AS c INNER JOIN kernel.campaign_runs AS r ON c.run_id = r.id AND c.tenant_id = r.tenant_id;
        -- What a re-claimed (or resumed) job has reserved but not dispatched: the daemon sends
        -- it first.
        RETURN QUERY
        SELECT 'waiting', o.job_id, o.run_id, o.id, o.idempotency_key, o.recipient, o.contact_id,
               jsonb_build_object('dispatch_count', o.dispatch_count)
        FROM kernel.channel_outbox AS o
        WHERE o.job_id IN (SELECT c.id FROM unnest(_claimed) AS c WHERE c.attempts > 1 OR c.reserved_count > 0)
          AND o.tenant_id = ANY (_tenants) AND o.status = 'pending' AND o.dispatched_at IS NULL;
        _held := _held || ARRAY(SELECT c.id FROM unnest(_claimed) AS c);
    END IF;

    -- 5b. Send windows and deadlines, by kernel.clock(): a held job outside its window or past
    --     its run's deadline dispatches nothing. Once none of its calls is in flight it is
    --     paused until its window opens (processing -> scheduled, the attempt given back: a
    --     pause is no failure), or, when that is too late for the deadline, it fails with why.
    FOR _job IN
        SELECT j AS job, j.id, j.time_zone, r.deadline, w.opens, r.run_config -> 'send_window' AS send_window,
               EXISTS (SELECT 1 FROM kernel.channel_outbox AS o
                       WHERE o.job_id = j.id AND o.tenant_id = j.tenant_id
                         AND o.status = 'pending' AND o.dispatched_at IS NOT NULL) AS in_flight
        FROM kernel.job_queue AS j
        INNER JOIN kernel.campaign_runs AS r ON j.run_id = r.id AND j.tenant_id = r.tenant_id
        CROSS JOIN LATERAL (
            SELECT kernel.send_window_opens(r.run_config -> 'send_window', j.time_zone, _now) AS opens
        ) AS w
        WHERE j.id = ANY (_held) AND j.tenant_id = ANY (_tenants) AND r.status <> 'cancelled'
          AND (j.time_zone IS NOT NULL OR r.deadline IS NOT NULL)
          AND (w.opens > _now OR _now >= r.deadline)
        ORDER BY j.id
    LOOP
        _closed := _closed || _job.id;
        CONTINUE WHEN _job.in_flight;
        IF _job.opens >= _job.deadline OR _now >= _job.deadline THEN
            _reason := CASE WHEN _now >= _job.deadline
                THEN format('the run''s deadline (%s) passed before this contact was sent to', _job.deadline)
                ELSE format('the send window (%s-%s, %s) does not open before the run''s deadline (%s)',
                            _job.send_window ->> 'start', _job.send_window ->> 'end', _job.time_zone, _job.deadline) END;
            UPDATE kernel.channel_outbox AS o SET status = 'failed', error = _reason
            WHERE o.job_id = _job.id AND o.tenant_id = (_job.job).tenant_id
              AND o.status = 'pending' AND o.dispatched_at IS NULL;
            PERFORM kernel._end_job(_job.job, FALSE, _reason);
            _timed_out := _timed_out || _job.id;
        ELSE
            UPDATE kernel.job_queue AS j
            SET status = 'scheduled', run_after = _job.opens, attempts = j.attempts - 1,
                locked_by = NULL, locked_at = NULL, lease_expires_at = NULL,
                last_error = format('outside the send window (%s-%s, %s) until %s',
                                    _job.send_window ->> 'start', _job.send_window ->> 'end', _job.time_zone, _job.opens)
            WHERE j.id = _job.id AND j.tenant_id = (_job.job).tenant_id;
            _paused := _paused || _job.id;
        END IF;
    END LOOP;
    IF cardinality(_paused) + cardinality(_timed_out) > 0 THEN
        RETURN QUERY
        SELECT CASE WHEN j.status = 'scheduled' THEN 'paused' ELSE 'done' END,
               j.id, j.run_id, NULL::uuid, NULL::text, NULL::text, NULL::uuid,
               jsonb_build_object('job_status', j.status, 'run_status', r.status, 'run_after', j.run_after,
                                  'reason', j.last_error)
        FROM kernel.job_queue AS j INNER JOIN kernel.campaign_runs AS r ON j.run_id = r.id AND j.tenant_id = r.tenant_id
        WHERE j.id = ANY (_paused || _timed_out) AND j.tenant_id = ANY (_tenants);
        _held := ARRAY(SELECT h FROM unnest(_held) AS h WHERE h <> ALL (_paused || _timed_out));
    END IF;

    -- 6. Dispatch at most p_want items: the waiting ones the daemon names, then new items
    --    for the next contacts of each job's snapshot, inserted already dispatched (the
    --    commit of this transaction comes before any provider call).
    SELECT coalesce(array_agg(j.id) FILTER (WHERE r.status = 'cancelled'), '{}'),
           coalesce(array_agg(j.id ORDER BY j.locked_at, j.id)
                    FILTER (WHERE r.status <> 'cancelled' AND j.reserved_count < cardinality(j.contact_ids)
                                  AND j.id <> ALL (_closed)), '{}')
    INTO _cancelled, _dispatchable
    FROM kernel.job_queue AS j INNER JOIN kernel.campaign_runs AS r ON j.run_id = r.id AND j.tenant_id = r.tenant_id
    WHERE j.id = ANY (_held) AND j.tenant_id = ANY (_tenants);
    RETURN QUERY
    SELECT 'cancelled', c, NULL::uuid, NULL::uuid, NULL::text, NULL::text, NULL::uuid, NULL::jsonb
    FROM unnest(_cancelled) AS c;

    IF cardinality(p_redispatch) > 0 THEN
        RETURN QUERY
        WITH again AS (
            UPDATE kernel.channel_outbox AS o
            SET dispatched_at = clock_timestamp(), dispatch_count = o.dispatch_count + 1
            WHERE o.id = ANY (p_redispatch) AND o.tenant_id = ANY (_tenants)
              AND o.job_id = ANY (_held) AND o.job_id <> ALL (_cancelled)
              AND o.job_id <> ALL (_closed)
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
        SELECT j.id, j.workspace_id, j.tenant_id, r.run_config ->> 'provider' AS provider,
               cardinality(j.contact_ids) - j.reserved_count AS remaining
        FROM kernel.job_queue AS j INNER JOIN kernel.campaign_runs AS r ON j.run_id = r.id AND j.tenant_id = r.tenant_id
        WHERE j.id = ANY (_dispatchable) AND j.tenant_id = ANY (_tenants) AND _want > 0
          AND EXISTS (
              SELECT 1 FROM kernel.provider_configs AS p
              WHERE p.workspace_id = j.workspace_id AND p.tenant_id = j.tenant_id
                AND p.provider = r.run_config ->> 'provider'
                AND p.max_per_second IS NOT NULL
          )
        ORDER BY j.locked_at, j.id
    LOOP
        _grant := kernel._take_rate_tokens(_job.workspace_id, _job.tenant_id, _job.provider, least(_left, _job.remaining));
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
            INNER JOIN kernel.campaign_runs AS r ON j.run_id = r.id AND j.tenant_id = r.tenant_id
            LEFT JOIN unnest(_cap_jobs, _caps) AS k (job_id, cap) ON j.id = k.job_id
            WHERE j.id = ANY (_dispatchable) AND j.tenant_id = ANY (_tenants)
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
            LEFT JOIN kernel.contacts AS p ON u.contact_id = p.id AND p.tenant_id = h.tenant_id
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
            ON CONFLICT (idempotency_key, tenant_id) DO NOTHING
            RETURNING o.job_id, o.run_id, o.id, o.idempotency_key, o.recipient, o.contact_id, o.status
        ), advanced AS (
            UPDATE kernel.job_queue AS j SET reserved_count = j.reserved_count + n.taken
            FROM (SELECT t.job_id, t.tenant_id, count(*) AS taken FROM taken AS t GROUP BY t.job_id, t.tenant_id) AS n
            WHERE j.id = n.job_id AND j.tenant_id = n.tenant_id
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
                       WHERE j.status = 'queued' AND (p_tenant_ids IS NULL OR j.tenant_id = ANY (p_tenant_ids))
                         AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id))),
                   'processing', EXISTS (
                       SELECT 1 FROM kernel.job_queue AS j
                       WHERE j.status = 'processing' AND (p_tenant_ids IS NULL OR j.tenant_id = ANY (p_tenant_ids))
                         AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id)))
               );
    END IF;
END
$function$;
COMMENT ON FUNCTION kernel.worker_step(p_worker text, p_lease_seconds numeric, p_held uuid[], p_result_ids uuid[], p_result_outcomes text[], p_result_provider_ids text[], p_result_responses text[], p_result_errors text[], p_complete uuid[], p_fail uuid[], p_fail_errors text[], p_redispatch uuid[], p_want integer, p_claim integer, p_deduplicating text[], p_tenant_ids uuid[]) IS 'The daemon''s hot path, one transaction: fences the jobs it holds (lost rows), records results (waiting rows for retries), renews leases, ends finished jobs and fails the ones it cannot execute (done rows), claims up to p_claim jobs (job rows with their context), pauses the jobs outside their send window (paused rows) and ends those past their run''s deadline (done rows), and dispatches up to p_want items (item rows), inserting new items already dispatched. No session state: lease and tenants travel with the call (p_tenant_ids NULL: every tenant in scope).';

CREATE OR REPLACE FUNCTION kernel.cancel_campaign_run(p_run_id uuid)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    _run kernel.campaign_runs;
    _tenant uuid;
BEGIN
    PERFORM kernel._require(p_run_id, 'run_id');
    _tenant := kernel._tenant_of('run', p_run_id);
    -- Jobs before their run, the order claim_queued_jobs and complete_job lock in: no deadlock.
    PERFORM 1 FROM kernel.job_queue
    WHERE run_id = p_run_id AND tenant_id = _tenant AND status IN ('scheduled', 'queued', 'processing')
    ORDER BY id FOR UPDATE;
    SELECT * INTO _run FROM kernel.campaign_runs WHERE id = p_run_id AND tenant_id = _tenant FOR UPDATE;
    PERFORM kernel._assert_scope(_run.tenant_id, _run.workspace_id, 'run', p_run_id);
    IF _run.status NOT IN ('queued', 'running') THEN
        RAISE EXCEPTION 'run % is % and cannot be cancelled (only queued or running runs can)',
            p_run_id, _run.status USING ERRCODE = 'KE004';
    END IF;
    UPDATE kernel.campaign_runs
    SET status = 'cancelled', completed_at = now(), error_message = 'cancelled by ' || session_user
    WHERE id = p_run_id AND tenant_id = _tenant;
    UPDATE kernel.job_queue SET status = 'cancelled', completed_at = now()
    WHERE run_id = p_run_id AND tenant_id = _tenant AND status IN ('scheduled', 'queued');
    -- Processing jobs finish their in-flight calls and end cancelled in complete_job.
    UPDATE kernel.channel_outbox SET status = 'skipped', skipped = true, skip_reason = 'run_cancelled'
    WHERE run_id = p_run_id AND tenant_id = _tenant AND status = 'pending' AND dispatched_at IS NULL;
END
$function$;
COMMENT ON FUNCTION kernel.cancel_campaign_run(p_run_id uuid) IS 'Cancels a queued (or scheduled) or running run: scheduled and queued jobs cancelled, undispatched items skipped; in-flight calls still get recorded.';

-- The launch checks of a campaign of a known tenant: deploy and retry know it already.
CREATE FUNCTION kernel._launch_checks(
    p_campaign_id uuid, p_workspace_id uuid, p_tenant_id uuid
)
RETURNS TABLE (check_name text, passed boolean, detail text)
LANGUAGE plpgsql
STABLE
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    _c kernel.campaigns;
    _cfg kernel.provider_configs;
    _audience bigint;
    _reachable bigint;
    _missing text[];
    _problems text[];
    _active uuid;
    _tenant uuid := p_tenant_id;
BEGIN
    PERFORM kernel._require(p_campaign_id, 'campaign_id');
    PERFORM kernel._require(p_workspace_id, 'workspace_id');
    PERFORM kernel._require_scope();
    SELECT * INTO _c FROM kernel.campaigns
    WHERE id = p_campaign_id AND tenant_id = _tenant AND workspace_id = p_workspace_id;
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
    INNER JOIN kernel.contacts AS p ON a.contact_id = p.id AND a.tenant_id = p.tenant_id
    WHERE a.campaign_id = _c.id AND a.tenant_id = _c.tenant_id;

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
      AND tenant_id = _c.tenant_id;
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
    WHERE campaign_id = _c.id AND tenant_id = _c.tenant_id AND status IN ('queued', 'running');
    check_name := 'no_active_run';
    passed := _active IS NULL;
    detail := CASE WHEN passed THEN 'no queued or running run'
                   ELSE format('run %s is still active', _active) END;
    RETURN NEXT;
END
$function$;
COMMENT ON FUNCTION kernel._launch_checks(p_campaign_id uuid, p_workspace_id uuid, p_tenant_id uuid) IS 'check_campaign_launch_prerequisites for a campaign of the given tenant.';

CREATE OR REPLACE FUNCTION kernel.check_campaign_launch_prerequisites(
    p_campaign_id uuid, p_workspace_id uuid
)
RETURNS TABLE (check_name text, passed boolean, detail text)
LANGUAGE plpgsql
STABLE SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    RETURN QUERY
    SELECT * FROM kernel._launch_checks(p_campaign_id, p_workspace_id, kernel._tenant_of('campaign', p_campaign_id));
END
$function$;


CREATE OR REPLACE FUNCTION kernel.deploy_campaign(
    p_campaign_id uuid,
    p_start_at timestamp with time zone,
    p_priority integer DEFAULT NULL::integer,
    p_deadline timestamp with time zone DEFAULT NULL::timestamp with time zone,
    p_batch_size integer DEFAULT 1000
)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
    IF p_priority NOT BETWEEN -1000 AND 1000 THEN
        RAISE EXCEPTION 'priority must be between -1000 and 1000, got %', p_priority USING ERRCODE = 'KE008';
    END IF;
    IF p_deadline <= greatest(p_start_at, kernel.clock()) THEN
        RAISE EXCEPTION 'deadline % is not after the start (%)', p_deadline, greatest(p_start_at, kernel.clock())
            USING ERRCODE = 'KE008', HINT = 'Give a deadline later than start_at and than now, or NULL for none.';
    END IF;
    _c := kernel._lock_campaign_without_active_run(p_campaign_id, kernel._tenant_of('campaign', p_campaign_id));
    SELECT string_agg(p.check_name || ' (' || p.detail || ')', '; ') INTO _failed
    FROM kernel._launch_checks(_c.id, _c.workspace_id, _c.tenant_id) AS p
    WHERE NOT p.passed;
    IF _failed IS NOT NULL THEN
        RAISE EXCEPTION 'campaign % cannot launch: %', p_campaign_id, _failed
            USING ERRCODE = 'KE001',
                  HINT = 'SELECT * FROM kernel.check_campaign_launch_prerequisites(campaign_id, workspace_id) lists every check.';
    END IF;

    _run.id := gen_random_uuid();
    INSERT INTO kernel.campaign_runs (
        id, campaign_id, tenant_id, workspace_id, status, channel, run_config, root_run_id,
        priority, start_at, deadline
    ) VALUES (
        _run.id, _c.id, _c.tenant_id, _c.workspace_id, 'queued', _c.channel,
        jsonb_build_object('campaign_name', _c.name, 'content', _c.content, 'batch_size', p_batch_size)
        || kernel._provider_snapshot(_c)
        || CASE WHEN _c.send_window_start IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('send_window',
               jsonb_build_object('start', _c.send_window_start, 'end', _c.send_window_end)) END,
        _run.id, coalesce(p_priority, _c.priority),
        CASE WHEN p_start_at > kernel.clock() THEN p_start_at END, p_deadline
    ) RETURNING * INTO _run;

    SELECT array_agg(contact_id ORDER BY contact_id) INTO _contacts
    FROM kernel.campaign_audience WHERE campaign_id = _c.id AND tenant_id = _c.tenant_id;
    PERFORM kernel._enqueue_batches(_run, _contacts, p_batch_size);
    RETURN _run.id;
END
$function$;
COMMENT ON FUNCTION kernel.deploy_campaign(p_campaign_id uuid, p_start_at timestamp with time zone, p_priority integer, p_deadline timestamp with time zone, p_batch_size integer) IS 'deploy_campaign with a schedule: the run is queued and its jobs scheduled until p_start_at (NULL or past: at once), at p_priority (NULL: the campaign''s), ending by p_deadline (NULL: none), in batches of p_batch_size. Validates like the seed form (KE001, KE003, KE008). Cast a literal start: deploy_campaign(id, ''2027-01-04 09:00+01''::timestamptz).';

CREATE OR REPLACE FUNCTION kernel.retry_campaign_run(p_run_id uuid, p_include_unknown boolean)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
    SELECT * INTO _old FROM kernel.campaign_runs
    WHERE id = p_run_id AND tenant_id = kernel._tenant_of('run', p_run_id);
    PERFORM kernel._assert_scope(_old.tenant_id, _old.workspace_id, 'run', p_run_id);
    IF _old.status IN ('queued', 'running') THEN
        RAISE EXCEPTION 'run % is % and cannot be retried until it finishes', p_run_id, _old.status
            USING ERRCODE = 'KE011';
    END IF;
    _c := kernel._lock_campaign_without_active_run(_old.campaign_id, _old.tenant_id);

    -- A contact's latest item in the lineage decides; a sent item anywhere excludes it.
    SELECT array_agg(l.contact_id ORDER BY l.contact_id) INTO _targets
    FROM (
        SELECT DISTINCT ON (o.contact_id) o.contact_id, o.status
        FROM kernel.channel_outbox AS o
        WHERE o.root_run_id = _old.root_run_id AND o.tenant_id = _old.tenant_id
        ORDER BY o.contact_id, o.generation DESC
    ) AS l
    WHERE (l.status = 'failed' OR (p_include_unknown AND l.status = 'unknown'))
      AND NOT EXISTS (
          SELECT 1 FROM kernel.channel_outbox AS s
          WHERE s.root_run_id = _old.root_run_id AND s.tenant_id = _old.tenant_id
            AND s.contact_id = l.contact_id AND s.status = 'sent'
      );
    IF _targets IS NULL THEN
        RAISE EXCEPTION 'run % has no failed% items to retry', p_run_id,
            CASE WHEN p_include_unknown THEN ' or unknown' ELSE '' END
            USING ERRCODE = 'KE010';
    END IF;

    -- The provider as configured now (it may have been fixed), checked like a launch.
    SELECT string_agg(p.check_name || ' (' || p.detail || ')', '; ') INTO _failed
    FROM kernel._launch_checks(_c.id, _c.workspace_id, _c.tenant_id) AS p
    WHERE p.check_name IN ('provider_configured', 'provider_settings_valid') AND NOT p.passed;
    IF _failed IS NOT NULL THEN
        RAISE EXCEPTION 'run % cannot be retried: %', p_run_id, _failed USING ERRCODE = 'KE001';
    END IF;
    _provider := kernel._provider_snapshot(_c);

    _run.id := gen_random_uuid();
    INSERT INTO kernel.campaign_runs (
        id, campaign_id, tenant_id, workspace_id, status, channel, run_config,
        retry_of_run_id, root_run_id, generation, priority
    ) VALUES (
        _run.id, _old.campaign_id, _old.tenant_id, _old.workspace_id, 'queued', _old.channel,
        -- Same content as the run retried; the provider as configured now (it may have been fixed).
        _old.run_config || _provider || jsonb_build_object('include_unknown', p_include_unknown),
        p_run_id, _old.root_run_id,
        (SELECT max(generation) + 1 FROM kernel.campaign_runs
         WHERE root_run_id = _old.root_run_id AND tenant_id = _old.tenant_id),
        -- At once, at the priority of the run retried, within the same send window.
        _old.priority
    ) RETURNING * INTO _run;
    PERFORM kernel._enqueue_batches(_run, _targets, coalesce((_old.run_config ->> 'batch_size')::integer, 1000));
    RETURN _run.id;
END
$function$;
COMMENT ON FUNCTION kernel.retry_campaign_run(p_run_id uuid, p_include_unknown boolean) IS 'UX2: a new run linked by retry_of_run_id/root_run_id targeting only contacts whose latest lineage item failed (and unknown ones when asked); never a contact with a sent item.';

CREATE OR REPLACE FUNCTION kernel.run_details(p_run_id uuid, p_item_limit integer)
RETURNS jsonb
LANGUAGE plpgsql
STABLE SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    _run kernel.campaign_runs;
BEGIN
    PERFORM kernel._require(p_run_id, 'run_id');
    IF p_item_limit IS NULL OR p_item_limit < 0 THEN
        RAISE EXCEPTION 'item_limit must be >= 0, got %', p_item_limit USING ERRCODE = 'KE008';
    END IF;
    SELECT * INTO _run FROM kernel.campaign_runs
    WHERE id = p_run_id AND tenant_id = kernel._tenant_of('run', p_run_id);
    PERFORM kernel._assert_scope(_run.tenant_id, _run.workspace_id, 'run', p_run_id);
    RETURN jsonb_build_object(
        'run', to_jsonb(_run),
        'jobs', coalesce((
            SELECT jsonb_agg((to_jsonb(j) - 'contact_ids') || jsonb_build_object('contact_count', cardinality(j.contact_ids))
                             ORDER BY j.created_at, j.id)
            FROM kernel.job_queue AS j WHERE j.run_id = p_run_id AND j.tenant_id = _run.tenant_id), '[]'),
        'job_counts', coalesce((
            SELECT jsonb_object_agg(s.status, s.n)
            FROM (SELECT status, count(*) AS n FROM kernel.job_queue
                  WHERE run_id = p_run_id AND tenant_id = _run.tenant_id GROUP BY status) AS s
        ), '{}'),
        'item_counts', coalesce((
            SELECT jsonb_object_agg(s.status, s.n)
            FROM (SELECT status, sum(items) AS n FROM kernel.job_item_counts
                  WHERE run_id = p_run_id AND tenant_id = _run.tenant_id
                  GROUP BY status HAVING sum(items) > 0) AS s
        ), '{}'),
        'items', coalesce((
            SELECT jsonb_agg(to_jsonb(o) ORDER BY o.created_at, o.id)
            FROM (SELECT * FROM kernel.channel_outbox WHERE run_id = p_run_id AND tenant_id = _run.tenant_id
                  ORDER BY created_at, id LIMIT p_item_limit) AS o), '[]'),
        'item_limit', p_item_limit,
        'lineage', (
            SELECT jsonb_agg(jsonb_build_object('id', l.id, 'generation', l.generation, 'status', l.status,
                                                'retry_of_run_id', l.retry_of_run_id, 'created_at', l.created_at)
                             ORDER BY l.generation)
            FROM kernel.campaign_runs AS l WHERE l.root_run_id = _run.root_run_id AND l.tenant_id = _run.tenant_id),
        'events', coalesce((
            SELECT jsonb_agg(to_jsonb(e) ORDER BY e.occurred_at, e.id)
            FROM (
                SELECT * FROM kernel.job_events WHERE run_id = p_run_id AND tenant_id = _run.tenant_id
                ORDER BY occurred_at DESC, id DESC LIMIT 200
            ) AS e
        ), '[]')
    );
END
$function$;
COMMENT ON FUNCTION kernel.run_details(p_run_id uuid, p_item_limit integer) IS 'UX1: the run, its jobs, counts per status, its first item_limit outbox items, its lineage and its latest 200 audit events.';

CREATE OR REPLACE FUNCTION kernel.run_items(
    p_run_id uuid,
    p_status text DEFAULT NULL::text,
    p_after uuid DEFAULT NULL::uuid,
    p_limit integer DEFAULT 100
)
RETURNS SETOF kernel.channel_outbox
LANGUAGE plpgsql
STABLE SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    _run kernel.campaign_runs;
BEGIN
    PERFORM kernel._require(p_run_id, 'run_id');
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION 'limit must be between 1 and 10000, got %', p_limit USING ERRCODE = 'KE008';
    END IF;
    IF p_status NOT IN ('pending', 'sent', 'failed', 'unknown', 'skipped') THEN
        RAISE EXCEPTION 'status % is not an item status (pending, sent, failed, unknown, skipped)',
            p_status USING ERRCODE = 'KE008';
    END IF;
    SELECT * INTO _run FROM kernel.campaign_runs
    WHERE id = p_run_id AND tenant_id = kernel._tenant_of('run', p_run_id);
    PERFORM kernel._assert_scope(_run.tenant_id, _run.workspace_id, 'run', p_run_id);
    -- Keyset pages in id order: the next page starts after the last id of this one.
    RETURN QUERY
    SELECT * FROM kernel.channel_outbox AS o
    WHERE o.run_id = p_run_id AND o.tenant_id = _run.tenant_id AND (p_status IS NULL OR o.status = p_status)
      AND (p_after IS NULL OR o.id > p_after)
    ORDER BY o.id
    LIMIT p_limit;
END
$function$;
COMMENT ON FUNCTION kernel.run_items(p_run_id uuid, p_status text, p_after uuid, p_limit integer) IS 'A page of a run''s outbox items in id order, of one status when given, after the id p_after (keyset: pass the last id of the previous page). KE002 for another tenant''s run, KE008 for a bad status or limit.';

CREATE OR REPLACE FUNCTION kernel.take_rate_tokens(
    p_workspace_id uuid, p_provider text, p_wanted integer
)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    PERFORM kernel._require(p_workspace_id, 'workspace_id');
    PERFORM kernel._require(p_provider, 'provider');
    IF p_wanted IS NULL OR p_wanted < 0 THEN
        RAISE EXCEPTION 'wanted must be >= 0, got %', p_wanted USING ERRCODE = 'KE008';
    END IF;
    RETURN (kernel._take_rate_tokens(p_workspace_id, kernel._tenant_of('workspace', p_workspace_id), p_provider, p_wanted)).granted;
END
$function$;
COMMENT ON FUNCTION kernel.take_rate_tokens(p_workspace_id uuid, p_provider text, p_wanted integer) IS 'Shared token bucket (provider_configs.max_per_second, burst of one second): how many of p_wanted sends may start now, across every daemon.';

CREATE OR REPLACE FUNCTION kernel._campaign_audience_same_tenant()
RETURNS trigger
LANGUAGE plpgsql
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    _bad record;
BEGIN
    SELECT n.campaign_id, n.contact_id INTO _bad
    FROM new_rows AS n
    INNER JOIN kernel.campaigns AS c ON n.campaign_id = c.id AND n.tenant_id = c.tenant_id
    INNER JOIN kernel.contacts AS p ON n.contact_id = p.id AND n.tenant_id = p.tenant_id
    WHERE c.workspace_id <> p.workspace_id
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'contact % is not in the tenant and workspace of campaign %',
            _bad.contact_id, _bad.campaign_id USING ERRCODE = 'KE008';
    END IF;
    RETURN NULL;
END
$function$;
COMMENT ON FUNCTION kernel._campaign_audience_same_tenant() IS 'Statement trigger: an audience row must pair a campaign and a contact of the same tenant and workspace.';

CREATE OR REPLACE FUNCTION kernel._campaign_audience_scope_guard()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    -- Before the foreign keys and the primary key look at the row: for a scoped session,
    -- another tenant's campaign or contact is missing, whether or not it exists.
    IF NOT EXISTS (
        SELECT 1 FROM kernel.campaigns AS c
        WHERE c.id = NEW.campaign_id AND c.tenant_id = kernel.current_tenant()
          AND kernel.in_scope(c.tenant_id, c.workspace_id)
    ) THEN
        RAISE EXCEPTION 'campaign % not found', NEW.campaign_id USING ERRCODE = 'KE002';
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM kernel.contacts AS p
        WHERE p.id = NEW.contact_id AND p.tenant_id = kernel.current_tenant()
          AND kernel.in_scope(p.tenant_id, p.workspace_id)
    ) THEN
        RAISE EXCEPTION 'contact % not found', NEW.contact_id USING ERRCODE = 'KE002';
    END IF;
    RETURN NEW;
END
$function$;
COMMENT ON FUNCTION kernel._campaign_audience_scope_guard() IS 'Trigger for scoped sessions: an audience row naming a campaign or contact outside the scope is refused as not found (KE002), before any key check can reveal it.';

CREATE OR REPLACE FUNCTION kernel.distribution_violations()
RETURNS TABLE (table_name regclass, object_name name, problem text)
LANGUAGE plpgsql
STABLE
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    RETURN QUERY
    WITH kernel_table AS (
        SELECT c.oid, a.attnum AS tenant_attnum, coalesce(a.attnotnull, false) AS tenant_not_null,
               c.oid IN (SELECT kernel.reference_tables()) AS is_reference
        FROM pg_class AS c
        LEFT JOIN pg_attribute AS a
            ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
        WHERE c.relkind IN ('r', 'p')
          AND c.relnamespace = (SELECT r.relnamespace FROM pg_class AS r
                                WHERE r.oid = 'kernel.schema_migrations'::regclass)
    )
    SELECT t.oid::regclass, NULL::name,
           'has no tenant_id column: it can be neither distributed by tenant nor a reference table'
    FROM kernel_table AS t WHERE t.tenant_attnum IS NULL AND NOT t.is_reference
    UNION ALL
    SELECT t.oid::regclass, NULL::name, 'tenant_id may be NULL: a distribution column may not'
    FROM kernel_table AS t WHERE t.tenant_attnum IS NOT NULL AND NOT t.tenant_not_null
    UNION ALL
    SELECT t.oid::regclass, x.relname,
           'unique without tenant_id: a distributed table''s unique keys must include it'
    FROM kernel_table AS t
    JOIN pg_index AS i ON i.indrelid = t.oid AND i.indisunique
    JOIN pg_class AS x ON x.oid = i.indexrelid
    WHERE t.tenant_attnum IS NOT NULL AND NOT t.is_reference AND NOT t.tenant_attnum = ANY (i.indkey::int2[])
    UNION ALL
    SELECT f.conrelid::regclass, f.conname,
           CASE WHEN src.is_reference
                THEN 'a reference table may not refer to a distributed one'
                WHEN src.oid IS NULL
                THEN format('refers to %s by a key without tenant_id: a foreign key to a '
                            'distributed table must include it', f.confrelid::regclass)
                ELSE format('does not pair tenant_id with tenant_id of %s', f.confrelid::regclass) END
    FROM pg_constraint AS f
    JOIN kernel_table AS dst ON dst.oid = f.confrelid AND dst.tenant_attnum IS NOT NULL AND NOT dst.is_reference
    LEFT JOIN kernel_table AS src ON src.oid = f.conrelid
    WHERE f.contype = 'f'
      AND (src.is_reference
           OR NOT EXISTS (
               SELECT 1 FROM unnest(f.conkey, f.confkey) AS k (mine, theirs)
               WHERE k.theirs = dst.tenant_attnum
                 AND (src.oid IS NULL OR k.mine = src.tenant_attnum)));
END
$function$;
COMMENT ON FUNCTION kernel.distribution_violations() IS 'What in this database breaks the rules for distributing the kernel''s tables by tenant_id (Citus): a unique key without tenant_id, a foreign key that does not pair it, a table without it. Empty when the schema is ready (docs/scale-out.md).';

-- The 1.0 per-job functions: the job's tenant found once, by _lock_leased_job.

CREATE OR REPLACE FUNCTION kernel._lock_leased_job(p_job_id uuid, p_worker text)
RETURNS kernel.job_queue
LANGUAGE plpgsql
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    _job kernel.job_queue;
BEGIN
    PERFORM kernel._require(p_job_id, 'job_id');
    PERFORM kernel._require(p_worker, 'worker');
    SELECT * INTO _job FROM kernel.job_queue
    WHERE id = p_job_id AND tenant_id = kernel._tenant_of('job', p_job_id) FOR NO KEY UPDATE;
    PERFORM kernel._assert_scope(_job.tenant_id, _job.workspace_id, 'job', p_job_id);
    IF _job.status <> 'processing' OR _job.locked_by <> p_worker OR _job.lease_expires_at <= now() THEN
        RAISE EXCEPTION 'worker % does not hold the lease on job % (status %, locked by %, lease until %)',
            p_worker, p_job_id, _job.status, coalesce(_job.locked_by, 'nobody'),
            coalesce(_job.lease_expires_at::text, '-')
            USING ERRCODE = 'KE005', HINT = 'Stop working on this job; another worker owns it now.';
    END IF;
    RETURN _job;
END
$function$;
COMMENT ON FUNCTION kernel._lock_leased_job(p_job_id uuid, p_worker text) IS 'Fencing: locks the job and raises KE005 unless p_worker holds an unexpired lease on it.';

CREATE OR REPLACE FUNCTION kernel.complete_job(p_job_id uuid, p_success boolean, p_error text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
    SELECT * INTO _job FROM kernel.job_queue
    WHERE id = p_job_id AND tenant_id = kernel._tenant_of('job', p_job_id) FOR NO KEY UPDATE;
    PERFORM kernel._assert_scope(_job.tenant_id, _job.workspace_id, 'job', p_job_id);
    IF _job.status <> 'processing' THEN
        RAISE EXCEPTION 'job % is % and cannot complete (only processing jobs can)', p_job_id, _job.status
            USING ERRCODE = 'KE004';
    END IF;
    PERFORM kernel._end_job(_job, p_success, p_error);
END
$function$;
COMMENT ON FUNCTION kernel.complete_job(p_job_id uuid, p_success boolean, p_error text) IS 'Seed signature: fenced on the setting execution_kernel.worker_id when the session sets it; otherwise an operator''s completion of a processing job, which needs kernel_operator (KE013).';

CREATE OR REPLACE FUNCTION kernel.heartbeat_job(p_job_id uuid, p_worker text)
RETURNS timestamp with time zone
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    _until timestamptz;
    _job kernel.job_queue;
BEGIN
    _job := kernel._lock_leased_job(p_job_id, p_worker);
    UPDATE kernel.job_queue SET lease_expires_at = now() + kernel._lease_interval()
    WHERE id = p_job_id AND tenant_id = _job.tenant_id RETURNING lease_expires_at INTO _until;
    RETURN _until;
END
$function$;
COMMENT ON FUNCTION kernel.heartbeat_job(p_job_id uuid, p_worker text) IS 'Extends the worker''s lease on a job (KE005 when it no longer holds it); returns the new expiry.';

CREATE OR REPLACE FUNCTION kernel.job_context(p_job_id uuid, p_worker text)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
                WHERE p.workspace_id = r.workspace_id AND p.tenant_id = r.tenant_id
                  AND p.provider = r.run_config ->> 'provider'
            )
        ) || r.run_config
        FROM kernel.campaign_runs AS r WHERE r.id = _job.run_id AND r.tenant_id = _job.tenant_id
    );
END
$function$;
COMMENT ON FUNCTION kernel.job_context(p_job_id uuid, p_worker text) IS 'What a worker needs to execute a job it holds: the run''s channel, content, provider, settings and shared rate limit.';

CREATE OR REPLACE FUNCTION kernel.mark_outbox_dispatched(
    p_job_id uuid, p_worker text, p_item_ids uuid[]
)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    _n integer;
    _job kernel.job_queue;
BEGIN
    PERFORM kernel._require(p_item_ids, 'item_ids');
    _job := kernel._lock_leased_job(p_job_id, p_worker);
    UPDATE kernel.channel_outbox
    SET dispatched_at = clock_timestamp(), dispatch_count = dispatch_count + 1
    WHERE id = ANY (p_item_ids) AND tenant_id = _job.tenant_id AND job_id = p_job_id AND status = 'pending' AND dispatched_at IS NULL;
    GET DIAGNOSTICS _n = ROW_COUNT;
    IF _n <> cardinality(p_item_ids) THEN
        RAISE EXCEPTION 'only % of % items are pending, undispatched items of job %',
            _n, cardinality(p_item_ids), p_job_id USING ERRCODE = 'KE008';
    END IF;
    RETURN _n;
END
$function$;
COMMENT ON FUNCTION kernel.mark_outbox_dispatched(p_job_id uuid, p_worker text, p_item_ids uuid[]) IS 'Marks reserved items as handed to the provider (dispatched_at). Commit this before calling the provider.';

CREATE OR REPLACE FUNCTION kernel.record_outbox_results(
    p_job_id uuid, p_worker text, p_results jsonb
)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    _bad text;
    _n integer;
    _expected integer;
    _job kernel.job_queue;
BEGIN
    IF p_results IS NULL OR jsonb_typeof(p_results) <> 'array' THEN
        RAISE EXCEPTION 'results must be a JSON array of {"id", "outcome", ...}' USING ERRCODE = 'KE008';
    END IF;
    _job := kernel._lock_leased_job(p_job_id, p_worker);
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
    WHERE o.id = r.id AND o.tenant_id = _job.tenant_id AND o.job_id = p_job_id AND o.status = 'pending'
      AND (o.dispatched_at IS NOT NULL OR r.outcome = 'failed');
    GET DIAGNOSTICS _n = ROW_COUNT;
    IF _n <> _expected THEN
        RAISE EXCEPTION 'only % of % results match pending items of job % (sent, unknown and retry need a dispatched item)',
            _n, _expected, p_job_id USING ERRCODE = 'KE008';
    END IF;
    RETURN _n;
END
$function$;
COMMENT ON FUNCTION kernel.record_outbox_results(p_job_id uuid, p_worker text, p_results jsonb) IS 'Records provider outcomes for a job''s items in one call: sent, failed, unknown, or retry (back to undispatched, same key; failed after 5 dispatches).';

CREATE OR REPLACE FUNCTION kernel.recover_dispatched_items(
    p_job_id uuid, p_worker text, p_provider_deduplicates boolean
)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    _n integer;
    _job kernel.job_queue;
BEGIN
    PERFORM kernel._require(p_provider_deduplicates, 'provider_deduplicates');
    _job := kernel._lock_leased_job(p_job_id, p_worker);
    IF p_provider_deduplicates THEN
        -- The provider drops a second request with the same key: safe to send again.
        UPDATE kernel.channel_outbox SET dispatched_at = NULL
        WHERE job_id = p_job_id AND tenant_id = _job.tenant_id AND status = 'pending' AND dispatched_at IS NOT NULL;
    ELSE
        UPDATE kernel.channel_outbox
        SET status = 'unknown',
            error = 'worker lost after dispatch; the provider cannot deduplicate, so it is not re-sent'
        WHERE job_id = p_job_id AND tenant_id = _job.tenant_id AND status = 'pending' AND dispatched_at IS NOT NULL;
    END IF;
    GET DIAGNOSTICS _n = ROW_COUNT;
    RETURN _n;
END
$function$;
COMMENT ON FUNCTION kernel.recover_dispatched_items(p_job_id uuid, p_worker text, p_provider_deduplicates boolean) IS 'Crash path: items dispatched without an outcome become unknown, or are re-queued with the same key when the provider deduplicates.';

CREATE OR REPLACE FUNCTION kernel.release_job(p_job_id uuid, p_worker text, p_reason text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    _job kernel.job_queue;
BEGIN
    _job := kernel._lock_leased_job(p_job_id, p_worker);
    UPDATE kernel.job_queue
    SET status = 'queued', locked_by = NULL, locked_at = NULL, lease_expires_at = NULL,
        last_error = p_reason, run_after = now()
    WHERE id = p_job_id AND tenant_id = _job.tenant_id;
    PERFORM pg_notify('kernel_jobs', _job.run_id::text);
END
$function$;
COMMENT ON FUNCTION kernel.release_job(p_job_id uuid, p_worker text, p_reason text) IS 'Gives a job back to the queue (processing -> queued), e.g. on shutdown, so another worker takes it at once.';

CREATE OR REPLACE FUNCTION kernel.reserve_outbox_items(
    p_job_id uuid, p_worker text, p_max_items integer
)
RETURNS SETOF kernel.channel_outbox
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
    SELECT * INTO _run FROM kernel.campaign_runs WHERE id = _job.run_id AND tenant_id = _job.tenant_id;
    IF _run.status = 'cancelled' THEN
        -- Items put back for another try (retry outcome, dedup recovery) will not go out now.
        UPDATE kernel.channel_outbox SET status = 'skipped', skipped = TRUE, skip_reason = 'run_cancelled'
        WHERE job_id = p_job_id AND tenant_id = _job.tenant_id AND status = 'pending' AND dispatched_at IS NULL;
        RETURN;
    END IF;
    IF kernel.clock() >= _run.deadline
       OR kernel.send_window_opens(_run.run_config -> 'send_window', _job.time_zone, kernel.clock()) > kernel.clock() THEN
        RETURN;  -- outside the send window or past the deadline: nothing may go out now
    END IF;
    SELECT count(*) INTO _have FROM kernel.channel_outbox
    WHERE job_id = p_job_id AND tenant_id = _job.tenant_id AND status = 'pending' AND dispatched_at IS NULL;
    -- Walk the job's contact snapshot; skipped contacts do not fill the batch.
    WHILE _have < p_max_items AND _job.reserved_count < cardinality(_job.contact_ids) LOOP
        _take := least(p_max_items - _have, cardinality(_job.contact_ids) - _job.reserved_count);
        _have := _have + kernel._insert_items(_job, _run, _take);
        _job.reserved_count := _job.reserved_count + _take;
    END LOOP;

    RETURN QUERY
    SELECT * FROM kernel.channel_outbox
    WHERE job_id = p_job_id AND tenant_id = _job.tenant_id AND status = 'pending' AND dispatched_at IS NULL
    ORDER BY contact_id
    LIMIT p_max_items;
END
$function$;
COMMENT ON FUNCTION kernel.reserve_outbox_items(p_job_id uuid, p_worker text, p_max_items integer) IS 'Returns up to max_items pending, undispatched items of a job, inserting items for the next contacts of its snapshot first (ON CONFLICT (idempotency_key, tenant_id) DO NOTHING). Unreachable contacts become skipped items. Nothing once the run is cancelled, past its deadline, or outside the job''s send window.';

-- The daemon's hand-backs (shutdown, a job the kernel would not end, a lost connection) name
-- the tenants it serves, as its steps do; called as in 1.6, without them, every tenant in scope.
DROP FUNCTION kernel.release_jobs(text, uuid[], text);
DROP FUNCTION kernel.undispatch_items(text, uuid[], uuid[]);
CREATE FUNCTION kernel.release_jobs(
    p_worker text, p_jobs uuid[], p_reason text, p_tenant_ids uuid[] DEFAULT NULL
)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _n integer;
BEGIN
    PERFORM kernel._require(p_worker, 'worker');
    PERFORM kernel._require_scope();
    WITH held AS (
        SELECT j.id, j.tenant_id FROM kernel.job_queue AS j
        WHERE j.id = ANY (p_jobs) AND (p_tenant_ids IS NULL OR j.tenant_id = ANY (p_tenant_ids))
          AND j.status = 'processing' AND j.locked_by = p_worker AND j.lease_expires_at > now()
        ORDER BY j.id
        FOR NO KEY UPDATE
    ), released AS (
        UPDATE kernel.job_queue AS j
        SET status = 'queued', locked_by = NULL, locked_at = NULL, lease_expires_at = NULL,
            last_error = p_reason, run_after = now()
        FROM held AS h WHERE j.id = h.id AND j.tenant_id = h.tenant_id
        RETURNING j.id
    )
    SELECT count(*) INTO _n FROM released;
    IF _n > 0 THEN
        PERFORM pg_notify('kernel_jobs', 'released');
    END IF;
    RETURN _n;
END
$$;
COMMENT ON FUNCTION kernel.release_jobs(p_worker text, p_jobs uuid[], p_reason text, p_tenant_ids uuid[]) IS
'Gives the jobs back to the queue that this worker still holds, of the tenants given (NULL: every tenant in scope); returns how many.';
GRANT EXECUTE ON FUNCTION kernel.release_jobs(
    p_worker text, p_jobs uuid[], p_reason text, p_tenant_ids uuid[]
)
TO kernel_worker;

CREATE FUNCTION kernel.undispatch_items(
    p_worker text, p_job_ids uuid[], p_known_item_ids uuid[], p_tenant_ids uuid[] DEFAULT NULL
)
RETURNS TABLE (
    job_id uuid, run_id uuid, id uuid, idempotency_key text, recipient text, contact_id uuid
)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _strays uuid[];
BEGIN
    PERFORM kernel._require(p_worker, 'worker');
    PERFORM kernel._require(p_job_ids, 'job_ids');
    PERFORM kernel._require(p_known_item_ids, 'known_item_ids');
    SELECT coalesce(array_agg(j.id), '{}') INTO _strays
    FROM kernel.job_queue AS j
    WHERE j.status = 'processing' AND (p_tenant_ids IS NULL OR j.tenant_id = ANY (p_tenant_ids))
      AND j.locked_by = p_worker AND j.lease_expires_at > now()
      AND j.id <> ALL (p_job_ids);
    RETURN QUERY
    WITH held AS (
        SELECT j.id, j.tenant_id FROM kernel.job_queue AS j
        WHERE j.id = ANY (p_job_ids || _strays) AND (p_tenant_ids IS NULL OR j.tenant_id = ANY (p_tenant_ids))
          AND j.status = 'processing' AND j.locked_by = p_worker AND j.lease_expires_at > now()
        ORDER BY j.id
        FOR NO KEY UPDATE
    ), back AS (
        UPDATE kernel.channel_outbox AS o
        SET dispatched_at = NULL, dispatch_count = o.dispatch_count - 1
        FROM held AS h
        WHERE o.job_id = h.id AND o.tenant_id = h.tenant_id AND o.status = 'pending'
          AND o.dispatched_at IS NOT NULL AND (o.job_id = ANY (_strays) OR o.id <> ALL (p_known_item_ids))
        RETURNING o.job_id, o.run_id, o.id, o.idempotency_key, o.recipient, o.contact_id
    )
    SELECT b.job_id, b.run_id, b.id, b.idempotency_key, b.recipient, b.contact_id
    FROM back AS b WHERE b.job_id <> ALL (_strays);
    IF cardinality(_strays) > 0 THEN
        PERFORM kernel.release_jobs(
            p_worker, _strays, 'claimed by a step whose answer was lost with the connection', p_tenant_ids
        );
    END IF;
END
$$;
COMMENT ON FUNCTION kernel.undispatch_items(p_worker text, p_job_ids uuid[], p_known_item_ids uuid[], p_tenant_ids uuid[]) IS
'After a lost connection: items of the named held jobs (of the tenants given; NULL: every tenant in scope) marked dispatched but not among the known ones go back to undispatched and are returned; jobs this worker holds but did not name (claimed by a step whose answer was lost) are released.';
GRANT EXECUTE ON FUNCTION kernel.undispatch_items(
    p_worker text, p_job_ids uuid[], p_known_item_ids uuid[], p_tenant_ids uuid[]
) TO kernel_worker;

-- Replaced by the forms above that take the tenant.
DROP FUNCTION kernel._finish_run_if_done(uuid);
DROP FUNCTION kernel._finish_runs_if_done(uuid[]);
DROP FUNCTION kernel._lock_campaign_without_active_run(uuid);
DROP FUNCTION kernel._take_rate_tokens(uuid, text, integer);
DROP FUNCTION kernel._end_unfinished_items(uuid, text);

-- The version ---------------------------------------------------------------------

CREATE OR REPLACE FUNCTION kernel.kernel_version() RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT '1.7.0'::text
$$;

INSERT INTO kernel.schema_migrations (version, name) VALUES (8, '0008_kernel_1_7')
ON CONFLICT (version) DO NOTHING;
