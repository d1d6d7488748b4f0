-- 0006_kernel_1_5.sql: the execution kernel v1.5.0.
--
-- The kernel's own tables keyed for distribution by tenant (issue 10 item 6;
-- docs/scale-out.md):
--   * every primary, unique and foreign key of campaign_runs, job_queue, channel_outbox,
--     job_events and rate_buckets includes tenant_id, id first ((id, tenant_id)), so every
--     lookup by id keeps its index and its plan;
--   * their foreign keys pair tenant_id with tenant_id: a job, an item or a retry can no longer
--     name another tenant's run or job, nor a run another tenant's campaign;
--   * rate_buckets gains tenant_id (its workspace's);
--   * kernel.distribution_violations(): what in this database breaks Citus' rules for
--     distributing by tenant_id, read from the catalog (an application's keys count too).
-- The host tables (workspaces, campaigns, contacts, campaign_audience, provider_configs) keep
-- their keys: an application chooses their ids, and most kernel statements still find a
-- contact or a campaign by id alone, which only a key on (id) keeps unambiguous across
-- tenants. They follow once every statement is pinned to one tenant (docs/scale-out.md,
-- "What is left"); distribution_violations() lists them until then. ON CONFLICT on the outbox
-- now names (idempotency_key, tenant_id).
-- Append-only once it has landed on main: the next change is the next file.

SET LOCAL search_path = pg_catalog, pg_temp;
SET LOCAL ROLE kernel_owner;

-- The foreign keys that hold the keys about to change ------------------------------------

ALTER TABLE kernel.campaign_runs
DROP CONSTRAINT campaign_runs_campaign_id_fkey,
DROP CONSTRAINT campaign_runs_retry_of_run_id_fkey,
DROP CONSTRAINT campaign_runs_root_run_id_fkey;
ALTER TABLE kernel.job_queue DROP CONSTRAINT job_queue_run_id_fkey;
ALTER TABLE kernel.channel_outbox DROP CONSTRAINT channel_outbox_job_of_run_fkey;

-- Host tables keep their keys (see above); a run names its campaign with its tenant.
ALTER TABLE kernel.campaigns ADD CONSTRAINT campaigns_id_tenant_id_key UNIQUE (id, tenant_id);

-- Rate buckets: tenant_id from their workspace ----------------------------------------------

ALTER TABLE kernel.rate_buckets ADD COLUMN tenant_id uuid;
UPDATE kernel.rate_buckets AS b SET tenant_id = w.tenant_id
FROM kernel.workspaces AS w
WHERE w.id = b.workspace_id;
-- A bucket whose workspace is gone limits nothing; one is made again on first use.
DELETE FROM kernel.rate_buckets
WHERE tenant_id IS NULL;
ALTER TABLE kernel.rate_buckets
ALTER COLUMN tenant_id SET NOT NULL,
DROP CONSTRAINT rate_buckets_pkey,
ADD CONSTRAINT rate_buckets_pkey PRIMARY KEY (workspace_id, provider, tenant_id);

-- Runs, jobs, items, events -----------------------------------------------------------------

ALTER TABLE kernel.campaign_runs
DROP CONSTRAINT campaign_runs_pkey,
ADD CONSTRAINT campaign_runs_pkey PRIMARY KEY (id, tenant_id),
ADD CONSTRAINT campaign_runs_campaign_id_fkey
FOREIGN KEY (campaign_id, tenant_id) REFERENCES kernel.campaigns (id, tenant_id),
ADD CONSTRAINT campaign_runs_retry_of_run_id_fkey
FOREIGN KEY (retry_of_run_id, tenant_id) REFERENCES kernel.campaign_runs (id, tenant_id),
ADD CONSTRAINT campaign_runs_root_run_id_fkey
FOREIGN KEY (root_run_id, tenant_id) REFERENCES kernel.campaign_runs (id, tenant_id);
DROP INDEX kernel.campaign_runs_one_active_per_campaign;
CREATE UNIQUE INDEX campaign_runs_one_active_per_campaign
ON kernel.campaign_runs (campaign_id, tenant_id)
WHERE status IN ('queued', 'running');

ALTER TABLE kernel.job_queue
DROP CONSTRAINT job_queue_pkey,
ADD CONSTRAINT job_queue_pkey PRIMARY KEY (id, tenant_id),
DROP CONSTRAINT job_queue_id_run_id_key,
ADD CONSTRAINT job_queue_id_run_id_key UNIQUE (id, run_id, tenant_id),
ADD CONSTRAINT job_queue_run_id_fkey
FOREIGN KEY (run_id, tenant_id) REFERENCES kernel.campaign_runs (id, tenant_id);

ALTER TABLE kernel.channel_outbox
DROP CONSTRAINT channel_outbox_pkey,
ADD CONSTRAINT channel_outbox_pkey PRIMARY KEY (id, tenant_id),
DROP CONSTRAINT channel_outbox_idempotency_key,
ADD CONSTRAINT channel_outbox_idempotency_key UNIQUE (idempotency_key, tenant_id),
ADD CONSTRAINT channel_outbox_job_of_run_fkey
FOREIGN KEY (job_id, run_id, tenant_id) REFERENCES kernel.job_queue (id, run_id, tenant_id);

ALTER TABLE kernel.job_events
DROP CONSTRAINT job_events_pkey,
ADD CONSTRAINT job_events_pkey PRIMARY KEY (id, tenant_id);

-- What breaks distribution by tenant ------------------------------------------------------

-- Citus' rules for tables distributed by tenant_id, next to the kernel's two reference tables:
-- every unique key of a distributed table includes the distribution column; a foreign key
-- between distributed tables pairs their distribution columns; a reference table refers to no
-- distributed table. Read from the catalog, so an application's foreign keys count too.
CREATE FUNCTION kernel.distribution_violations()
RETURNS TABLE (table_name regclass, object_name name, problem text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
    WITH kernel_table AS (
        SELECT c.oid, a.attnum AS tenant_attnum, coalesce(a.attnotnull, false) AS tenant_not_null,
               c.oid IN ('kernel.state_transitions'::regclass, 'kernel.schema_migrations'::regclass)
                   AS is_reference
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
    WHERE t.tenant_attnum IS NOT NULL AND NOT t.tenant_attnum = ANY (i.indkey::int2[])
    UNION ALL
    SELECT f.conrelid::regclass, f.conname,
           CASE WHEN src.is_reference
                THEN 'a reference table may not refer to a distributed one'
                WHEN src.oid IS NULL
                THEN format('refers to %s by a key without tenant_id: a foreign key to a '
                            'distributed table must include it', f.confrelid::regclass)
                ELSE format('does not pair tenant_id with tenant_id of %s', f.confrelid::regclass) END
    FROM pg_constraint AS f
    JOIN kernel_table AS dst ON dst.oid = f.confrelid AND dst.tenant_attnum IS NOT NULL
    LEFT JOIN kernel_table AS src ON src.oid = f.conrelid
    WHERE f.contype = 'f'
      AND (src.is_reference
           OR NOT EXISTS (
               SELECT 1 FROM unnest(f.conkey, f.confkey) AS k (mine, theirs)
               WHERE k.theirs = dst.tenant_attnum
                 AND (src.oid IS NULL OR k.mine = src.tenant_attnum)));
END
$$;

COMMENT ON FUNCTION kernel.distribution_violations() IS
'What in this database breaks the rules for distributing the kernel''s tables by tenant_id (Citus): a unique key without tenant_id, a foreign key that does not pair it, a table without it. Empty when the schema is ready (docs/scale-out.md).';
GRANT EXECUTE ON FUNCTION kernel.distribution_violations() TO kernel_operator, kernel_reader;

-- The functions whose ON CONFLICT names a key that changed ---------------------------------

-- As 1.4 (1.1 for _take_rate_tokens, 1.0 for _insert_items) but for the arbiters and the rate
-- bucket's tenant (from the provider config the rate is read from). A job's contacts are still
-- joined by id alone: with contacts keyed by id, a tenant condition there made the planner walk
-- the tenant's contacts index instead of the primary key (one-contact campaigns 25 % slower,
-- docs/benchmarks.md); it comes with the (id, tenant_id) key.
CREATE OR REPLACE FUNCTION kernel._take_rate_tokens(
    p_workspace_id uuid, p_provider text, p_wanted integer,
    OUT granted integer, OUT wait_seconds double precision
)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _rate numeric;
    _tenant uuid;
    _bucket kernel.rate_buckets;
    _tokens double precision;
BEGIN
    -- One group: a workspace belongs to one tenant (provider_configs_workspace_owner_fkey).
    SELECT c.tenant_id, min(c.max_per_second) INTO _tenant, _rate
    FROM kernel.provider_configs AS c
    WHERE c.workspace_id = p_workspace_id AND c.provider = p_provider
    GROUP BY c.tenant_id;
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
$$;

COMMENT ON FUNCTION kernel._take_rate_tokens(uuid, text, integer) IS
'Shared token bucket (provider_configs.max_per_second, burst of one second): how many of p_wanted sends may start now, and when none may, how long until one can.';

CREATE OR REPLACE FUNCTION kernel._insert_items(
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
        ON CONFLICT (idempotency_key, tenant_id) DO NOTHING
        RETURNING status
    )
    SELECT count(*) FILTER (WHERE status = 'pending') INTO _pending FROM inserted;
    UPDATE kernel.job_queue SET reserved_count = reserved_count + p_count WHERE id = p_job.id;
    RETURN _pending;
END
$$;

COMMENT ON FUNCTION kernel._insert_items(kernel.job_queue, kernel.campaign_runs, integer) IS
'Inserts items for the next p_count contacts of a job''s snapshot (unreachable ones skipped) and advances reserved_count; returns how many are pending.';

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
    SELECT * INTO _run FROM kernel.campaign_runs WHERE id = _job.run_id;
    IF _run.status = 'cancelled' THEN
        -- Items put back for another try (retry outcome, dedup recovery) will not go out now.
        UPDATE kernel.channel_outbox SET status = 'skipped', skipped = TRUE, skip_reason = 'run_cancelled'
        WHERE job_id = p_job_id AND status = 'pending' AND dispatched_at IS NULL;
        RETURN;
    END IF;
    IF kernel.clock() >= _run.deadline
       OR kernel.send_window_opens(_run.run_config -> 'send_window', _job.time_zone, kernel.clock()) > kernel.clock() THEN
        RETURN;  -- outside the send window or past the deadline: nothing may go out now
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
$function$;
COMMENT ON FUNCTION kernel.reserve_outbox_items(p_job_id uuid, p_worker text, p_max_items integer) IS 'Returns up to max_items pending, undispatched items of a job, inserting items for the next contacts of its snapshot first (ON CONFLICT (idempotency_key, tenant_id) DO NOTHING). Unreachable contacts become skipped items. Nothing once the run is cancelled, past its deadline, or outside the job''s send window.';

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
            WHERE o.id = ANY (p_result_ids) AND o.id = r.id AND (o.job_id = ANY (_held)) IS TRUE
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
        FROM kernel._claim_jobs(p_worker, p_claim, _lease, p_tenant_ids) AS c;
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
        -- What a re-claimed (or resumed) job has reserved but not dispatched: the daemon sends
        -- it first.
        RETURN QUERY
        SELECT 'waiting', o.job_id, o.run_id, o.id, o.idempotency_key, o.recipient, o.contact_id,
               jsonb_build_object('dispatch_count', o.dispatch_count)
        FROM kernel.channel_outbox AS o
        WHERE o.job_id IN (SELECT c.id FROM unnest(_claimed) AS c WHERE c.attempts > 1 OR c.reserved_count > 0)
          AND o.status = 'pending' AND o.dispatched_at IS NULL;
        _held := _held || ARRAY(SELECT c.id FROM unnest(_claimed) AS c);
    END IF;

    -- 5b. Send windows and deadlines, by kernel.clock(): a held job outside its window or past
    --     its run's deadline dispatches nothing. Once none of its calls is in flight it is
    --     paused until its window opens (processing -> scheduled, the attempt given back: a
    --     pause is no failure), or, when that is too late for the deadline, it fails with why.
    FOR _job IN
        SELECT j AS job, j.id, j.time_zone, r.deadline, w.opens, r.run_config -> 'send_window' AS send_window,
               EXISTS (SELECT 1 FROM kernel.channel_outbox AS o
                       WHERE o.job_id = j.id AND o.status = 'pending' AND o.dispatched_at IS NOT NULL) AS in_flight
        FROM kernel.job_queue AS j
        INNER JOIN kernel.campaign_runs AS r ON j.run_id = r.id
        CROSS JOIN LATERAL (
            SELECT kernel.send_window_opens(r.run_config -> 'send_window', j.time_zone, _now) AS opens
        ) AS w
        WHERE j.id = ANY (_held) AND r.status <> 'cancelled'
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
            WHERE o.job_id = _job.id AND o.status = 'pending' AND o.dispatched_at IS NULL;
            PERFORM kernel._end_job(_job.job, FALSE, _reason);
            _timed_out := _timed_out || _job.id;
        ELSE
            UPDATE kernel.job_queue AS j
            SET status = 'scheduled', run_after = _job.opens, attempts = j.attempts - 1,
                locked_by = NULL, locked_at = NULL, lease_expires_at = NULL,
                last_error = format('outside the send window (%s-%s, %s) until %s',
                                    _job.send_window ->> 'start', _job.send_window ->> 'end', _job.time_zone, _job.opens)
            WHERE j.id = _job.id;
            _paused := _paused || _job.id;
        END IF;
    END LOOP;
    IF cardinality(_paused) + cardinality(_timed_out) > 0 THEN
        RETURN QUERY
        SELECT CASE WHEN j.status = 'scheduled' THEN 'paused' ELSE 'done' END,
               j.id, j.run_id, NULL::uuid, NULL::text, NULL::text, NULL::uuid,
               jsonb_build_object('job_status', j.status, 'run_status', r.status, 'run_after', j.run_after,
                                  'reason', j.last_error)
        FROM kernel.job_queue AS j INNER JOIN kernel.campaign_runs AS r ON j.run_id = r.id
        WHERE j.id = ANY (_paused || _timed_out);
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
            ON CONFLICT (idempotency_key, tenant_id) DO NOTHING
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
                       WHERE j.status = 'queued' AND (p_tenant_ids IS NULL OR j.tenant_id = ANY (p_tenant_ids))
                         AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id))),
                   'processing', EXISTS (
                       SELECT 1 FROM kernel.job_queue AS j
                       WHERE j.status = 'processing' AND (p_tenant_ids IS NULL OR j.tenant_id = ANY (p_tenant_ids))
                         AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id)))
               );
    END IF;
END
$$;

COMMENT ON FUNCTION kernel.worker_step(text, numeric, uuid[], uuid[], text[], text[], text[], text[], uuid[], uuid[], text[], uuid[], integer, integer, text[], uuid[]) IS
'The daemon''s hot path, one transaction: fences the jobs it holds (lost rows), records results (waiting rows for retries), renews leases, ends finished jobs and fails the ones it cannot execute (done rows), claims up to p_claim jobs (job rows with their context), pauses the jobs outside their send window (paused rows) and ends those past their run''s deadline (done rows), and dispatches up to p_want items (item rows), inserting new items already dispatched. No session state: lease and tenants travel with the call (p_tenant_ids NULL: every tenant in scope).';

-- The version ---------------------------------------------------------------------

CREATE OR REPLACE FUNCTION kernel.kernel_version() RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT '1.5.0'::text
$$;

INSERT INTO kernel.schema_migrations (version, name) VALUES (6, '0006_kernel_1_5')
ON CONFLICT (version) DO NOTHING;
