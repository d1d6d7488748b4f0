-- 0004_kernel_1_3.sql: the execution kernel v1.3.0.
--
-- Plans that do not depend on statistics the kernel's own tables cannot have yet (issue 8;
-- docs/benchmarks.md). job_queue and channel_outbox grow by thousands of rows a second during
-- a run, faster than autovacuum analyses them, and the planner took them for a few rows:
--   * worker_step's recording joined 250 results with their rows in a nested loop that compared
--     each result with each row (124,750 comparisons, 31 ms; 1.7 ms as the hash join it now is);
--   * a claim read every queued job through a bitmap scan and sorted them to take the first few
--     (1,392 queued jobs read for 16 taken, 0.9 ms; at 1,000,000 queued jobs, all of them).
--     It now walks job_queue_claim_order_idx in claim order and stops at the limit.
-- Fair claims (issue 10, docs/scheduling.md): queued jobs are claimed in turns between tenants,
-- the least busy first, so one tenant's backlog no longer holds up another tenant's first job.
-- The daemon of this version logs jobs at DEBUG and claims only the batches its window can use.
-- Every function keeps its signature and result, so 1.2 daemons keep working during a rolling
-- upgrade (they claim fairly too). Append-only once it has landed on main: the next change is
-- the next file.

SET LOCAL search_path = pg_catalog, pg_temp;
SET LOCAL ROLE kernel_owner;

-- Fair claims (issue 10): queued jobs are taken in turns between the tenants that have some,
-- the tenant with the fewest jobs in flight first, so one tenant's backlog delays another's
-- first job by at most a claim. Within a tenant: priority, then age, as before.
CREATE INDEX job_queue_tenant_claim_order_idx
ON kernel.job_queue (tenant_id, priority DESC, run_after, id) WHERE status = 'queued';
-- Claims no longer walk the queue in one global order: its index would only be written.
DROP INDEX kernel.job_queue_claim_order_idx;
CREATE INDEX job_queue_tenant_processing_idx
ON kernel.job_queue (tenant_id) WHERE status = 'processing';

CREATE OR REPLACE FUNCTION kernel._claim_jobs(
    p_worker text, p_max_jobs integer, p_lease interval, p_tenant_id uuid
)
RETURNS SETOF kernel.job_queue
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- Every statement walks an index in the order it needs and stops: never a bitmap of the whole
-- backlog, never a sort of it, whatever the statistics of a fast-growing job_queue say.
SET enable_bitmapscan = off
SET enable_seqscan = off
AS $$
DECLARE
    _taken kernel.job_queue[];
    _exhausted kernel.job_queue;
    -- A scoped session or a daemon given --tenant sees one tenant; else every tenant with
    -- queued jobs, from a random one on (wrapping round), at most 32 per claim.
    _only uuid := coalesce(p_tenant_id, kernel.current_tenant());
    _start uuid := gen_random_uuid();
BEGIN
    -- Expired leases first (their holder died: the crash path), then queued jobs due now.
    WITH RECURSIVE expired AS (
        SELECT j.id FROM kernel.job_queue AS j
        WHERE j.status = 'processing' AND j.lease_expires_at < now()
          AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id))
          AND (p_tenant_id IS NULL OR j.tenant_id = p_tenant_id)
        ORDER BY j.lease_expires_at, j.id
        LIMIT p_max_jobs
        FOR UPDATE SKIP LOCKED
    ), tenants (tenant_id, first, n) AS (
        -- The tenants with queued jobs: one probe of job_queue_tenant_claim_order_idx each.
        SELECT t.tenant_id, t.tenant_id, 1
        FROM (SELECT coalesce(
            (SELECT j.tenant_id FROM kernel.job_queue AS j
             WHERE j.status = 'queued' AND j.tenant_id >= _start ORDER BY j.tenant_id LIMIT 1),
            (SELECT j.tenant_id FROM kernel.job_queue AS j
             WHERE j.status = 'queued' ORDER BY j.tenant_id LIMIT 1)
        ) AS tenant_id) AS t
        WHERE _only IS NULL AND t.tenant_id IS NOT NULL
        UNION ALL
        SELECT _only, _only, 1 WHERE _only IS NOT NULL
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
    ), shares AS (
        -- Each tenant's share of the claim, and how many of its jobs are in flight now.
        SELECT t.tenant_id, t.n, ceil(p_max_jobs::numeric / count(*) OVER ())::integer AS share,
               (SELECT count(*) FROM kernel.job_queue AS p
                WHERE p.tenant_id = t.tenant_id AND p.status = 'processing') AS busy
        FROM tenants AS t
    ), offered AS (
        -- Up to its share of each tenant's first due jobs, locked as the limit pulls them
        -- (SKIP LOCKED: what another claimer holds is passed over, never waited for).
        SELECT c.id, s.tenant_id, s.busy, s.n,
               row_number() OVER (PARTITION BY s.tenant_id ORDER BY c.priority DESC, c.run_after, c.id) AS turn
        FROM shares AS s
        CROSS JOIN LATERAL (
            SELECT j.id, j.priority, j.run_after FROM kernel.job_queue AS j
            WHERE j.tenant_id = s.tenant_id AND j.status = 'queued' AND j.run_after <= now()
              AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id))
              AND (p_tenant_id IS NULL OR j.tenant_id = p_tenant_id)
            ORDER BY j.priority DESC, j.run_after, j.id
            LIMIT s.share
            FOR UPDATE OF j SKIP LOCKED
        ) AS c
    ), topped AS (
        -- Shares a tenant could not fill are topped up from the least busy tenant that filled
        -- its own (it may have more), walking its jobs past what is locked.
        SELECT c.id
        FROM (
            SELECT s.tenant_id FROM shares AS s
            WHERE (SELECT count(*) FROM offered AS o WHERE o.tenant_id = s.tenant_id) = s.share
            ORDER BY s.busy, s.n LIMIT 1
        ) AS t
        CROSS JOIN LATERAL (
            SELECT j.id FROM kernel.job_queue AS j
            WHERE j.tenant_id = t.tenant_id AND j.status = 'queued' AND j.run_after <= now()
              AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id))
              AND (p_tenant_id IS NULL OR j.tenant_id = p_tenant_id)
              AND j.id NOT IN (SELECT o.id FROM offered AS o)
            ORDER BY j.priority DESC, j.run_after, j.id
            LIMIT greatest(p_max_jobs - (SELECT count(*) FROM offered), 0)
            FOR UPDATE OF j SKIP LOCKED
        ) AS c
    ), due AS (
        -- In turns: every tenant's first job before any tenant's second, the least busy first.
        (SELECT o.id FROM offered AS o ORDER BY o.turn, o.busy, o.n LIMIT p_max_jobs)
        UNION ALL
        SELECT t.id FROM topped AS t
    ), candidates AS (
        -- Rows are locked as the limits pull them: at most a job per tenant more than taken.
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

-- The version ---------------------------------------------------------------------

CREATE OR REPLACE FUNCTION kernel.kernel_version() RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT '1.3.0'::text
$$;

INSERT INTO kernel.schema_migrations (version, name) VALUES (4, '0004_kernel_1_3')
ON CONFLICT (version) DO NOTHING;
