-- 0007_kernel_1_6.sql: the execution kernel v1.6.0.
--
-- Item counts per job, kept by the database (issue 11: the console must stay fast on a run of
-- 1,000,000 items). Counting a run's items per status read every one of them: 430 ms for
-- 1,000,000 items (run_details, so `runs show`), 900 ms under a tenant's row-level security, on
-- every redraw. An index on status would make the recording of every outcome a non-HOT update
-- (1.1 took those indexes away for that reason). kernel.job_item_counts holds, per job and status,
-- how many items the job has; statement triggers on channel_outbox keep it exact through every
-- insert, status change and delete, whichever function or login makes them. A run's counts are
-- then a few rows per job, read by index. Rows per job, not per run: daemons recording for
-- different jobs of one run never wait for each other's counters.

-- As kernel_owner: it owns what this file creates, and its default privileges keep PUBLIC from
-- executing the new function.
SET LOCAL search_path = pg_catalog, pg_temp;
SET LOCAL ROLE kernel_owner;

CREATE TABLE kernel.job_item_counts (
    job_id uuid NOT NULL,
    run_id uuid NOT NULL,
    tenant_id uuid NOT NULL,
    workspace_id uuid NOT NULL,
    status text NOT NULL,
    items bigint NOT NULL,
    CONSTRAINT job_item_counts_pkey PRIMARY KEY (job_id, status, tenant_id)
);

-- A run's counts, and its jobs that have items of one status, in job order.
CREATE INDEX job_item_counts_by_run_idx ON kernel.job_item_counts (run_id, status, job_id);

COMMENT ON TABLE kernel.job_item_counts IS
'How many outbox items each job has per status, kept exact by the channel_outbox_counts triggers; a run''s counts are the sums over its jobs.';

ALTER TABLE kernel.job_item_counts ENABLE ROW LEVEL SECURITY;
CREATE POLICY job_item_counts_tenant_isolation ON kernel.job_item_counts FOR SELECT
TO kernel_app, kernel_reader
USING (kernel.in_scope(tenant_id, workspace_id));
CREATE POLICY job_item_counts_operator_reads ON kernel.job_item_counts
FOR SELECT TO kernel_operator USING (TRUE);
GRANT SELECT ON kernel.job_item_counts TO kernel_app, kernel_reader, kernel_operator;

CREATE FUNCTION kernel._channel_outbox_counts() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- A statement's transition tables exist only for its own event, hence one statement per
    -- event. Rows go in key order, so two statements counting for the same jobs lock their
    -- counters in the same order. (No CHECK (items >= 0): INSERT checks the row it proposes,
    -- a negative change, before ON CONFLICT adds it; the tests compare counts with the items.)
    -- Leave at once when nothing can have moved: most statements of a daemon's step touch no
    -- item (7 of 12 µs), and one that leaves every item pending (marking them dispatched)
    -- changed no status, since no move leads into pending.
    IF tg_op = 'INSERT' THEN
        PERFORM FROM new_rows LIMIT 1;
    ELSIF tg_op = 'UPDATE' THEN
        PERFORM FROM new_rows WHERE status <> 'pending' LIMIT 1;
    ELSE
        PERFORM FROM old_rows LIMIT 1;
    END IF;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF tg_op = 'INSERT' THEN
        INSERT INTO kernel.job_item_counts AS c (job_id, run_id, tenant_id, workspace_id, status, items)
        SELECT n.job_id, n.run_id, n.tenant_id, n.workspace_id, n.status, count(*)
        FROM new_rows AS n
        GROUP BY n.job_id, n.status, n.tenant_id, n.run_id, n.workspace_id
        ORDER BY n.job_id, n.status, n.tenant_id
        ON CONFLICT (job_id, status, tenant_id) DO UPDATE SET items = c.items + excluded.items;
    ELSIF tg_op = 'UPDATE' THEN
        -- +1 for each new row, -1 for each old one; what did not move nets to zero.
        WITH moves AS (
            SELECT n.job_id, n.run_id, n.tenant_id, n.workspace_id, n.status, 1 AS n FROM new_rows AS n
            UNION ALL
            SELECT o.job_id, o.run_id, o.tenant_id, o.workspace_id, o.status, -1 AS n FROM old_rows AS o
        )
        INSERT INTO kernel.job_item_counts AS c (job_id, run_id, tenant_id, workspace_id, status, items)
        SELECT m.job_id, m.run_id, m.tenant_id, m.workspace_id, m.status, sum(m.n)
        FROM moves AS m
        GROUP BY m.job_id, m.status, m.tenant_id, m.run_id, m.workspace_id
        HAVING sum(m.n) <> 0
        ORDER BY m.job_id, m.status, m.tenant_id
        ON CONFLICT (job_id, status, tenant_id) DO UPDATE SET items = c.items + excluded.items;
    ELSE
        UPDATE kernel.job_item_counts AS c SET items = c.items - d.n
        FROM (
            SELECT o.job_id, o.status, o.tenant_id, count(*) AS n FROM old_rows AS o
            GROUP BY o.job_id, o.status, o.tenant_id
        ) AS d
        WHERE c.job_id = d.job_id AND c.status = d.status AND c.tenant_id = d.tenant_id;
        -- No foreign key to the job (its check cost a look-up per new counter on the hot
        -- path): a job's items go before the job can, and their counters go with them.
        DELETE FROM kernel.job_item_counts AS c
        USING (SELECT DISTINCT o.job_id, o.tenant_id FROM old_rows AS o) AS d
        WHERE c.job_id = d.job_id AND c.tenant_id = d.tenant_id AND c.items = 0;
    END IF;
    RETURN NULL;
END
$$;

COMMENT ON FUNCTION kernel._channel_outbox_counts() IS
'Keeps job_item_counts equal to the items of each job per status (statement triggers on channel_outbox).';

CREATE TRIGGER channel_outbox_counts_insert AFTER INSERT ON kernel.channel_outbox
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION kernel._channel_outbox_counts();
CREATE TRIGGER channel_outbox_counts_update AFTER UPDATE ON kernel.channel_outbox
REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION kernel._channel_outbox_counts();
CREATE TRIGGER channel_outbox_counts_delete AFTER DELETE ON kernel.channel_outbox
REFERENCING OLD TABLE AS old_rows
FOR EACH STATEMENT EXECUTE FUNCTION kernel._channel_outbox_counts();

-- The items already there. CREATE TRIGGER holds a lock that keeps every writer of items out
-- until this migration commits, so nothing is counted twice or missed.
INSERT INTO kernel.job_item_counts (job_id, run_id, tenant_id, workspace_id, status, items)
SELECT
    job_id,
    run_id,
    tenant_id,
    workspace_id,
    status,
    count(*) AS items
FROM kernel.channel_outbox
GROUP BY job_id, status, tenant_id, run_id, workspace_id;

-- send_window_opens refuses a window it cannot read with KE008 (it answered {"start": false}
-- with 22007 from the cast, and a window that is not an object with NULL, as if it had no
-- opening: tests/sql/test_properties.py found both). Copied from 0005; the checks are new.
CREATE OR REPLACE FUNCTION kernel.send_window_opens(p_window jsonb, p_zone text, p_at timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _start time;
    _end time;
    _local timestamp;
    _opens timestamptz;
BEGIN
    IF p_window IS NULL OR p_zone IS NULL THEN
        RETURN p_at;
    END IF;
    IF p_at IS NULL THEN  -- not kernel._require: this function runs as its caller
        RAISE EXCEPTION 'at must not be NULL' USING ERRCODE = 'KE008';
    END IF;
    IF jsonb_typeof(p_window) IS DISTINCT FROM 'object'
       OR NOT coalesce(p_window ->> 'start' ~ '^(([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]+)?)?|24:00(:00)?)$', FALSE)
       OR NOT coalesce(p_window ->> 'end' ~ '^(([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]+)?)?|24:00(:00)?)$', FALSE)
    THEN
        RAISE EXCEPTION 'send window must be {"start": "HH:MM", "end": "HH:MM"}, got %', p_window
            USING ERRCODE = 'KE008';
    END IF;
    _start := (p_window ->> 'start')::time;
    _end := (p_window ->> 'end')::time;
    _local := p_at AT TIME ZONE p_zone;
    IF (_start < _end AND _local::time >= _start AND _local::time < _end)
       OR (_start > _end AND (_local::time >= _start OR _local::time < _end)) THEN
        RETURN p_at;
    END IF;
    -- Outside: the next start in local time (today's if still ahead), read back through the
    -- zone, so that a DST change between now and then is applied. A start that falls in a
    -- spring-forward gap comes out an hour later, as local clocks show it.
    _opens := (_local::date + _start) AT TIME ZONE p_zone;
    IF _opens <= p_at THEN
        _opens := (_local::date + 1 + _start) AT TIME ZONE p_zone;
    END IF;
    RETURN _opens;
END
$$;

-- provider_settings_problems runs as its caller and calls _setting_problem for each setting
-- of a known kind, which only the owner could execute: an application asking about a setting
-- of the wrong type got 42501 (tests/sql/test_properties.py found it). Both are pure.
GRANT EXECUTE ON FUNCTION kernel._setting_problem(text, jsonb)
TO kernel_app, kernel_operator, kernel_reader, kernel_worker;

-- A database blip costs no certainty (issue 12): when the connection drops while a step is in
-- flight, the step may have committed (items marked dispatched, even jobs claimed) without its
-- answer reaching the daemon, which then never hands those items to a provider. Re-claimed
-- after the lease, they ended `unknown` though nobody had called anyone. Once connected again,
-- the daemon names the jobs it knows it holds and every item it did hand out: the other items
-- of those jobs go back to undispatched, for it to send now; a job it holds without knowing
-- (claimed by the lost step) has all its dispatched items put back and is released. Fenced
-- like every worker write: only jobs whose lease p_worker holds.
CREATE FUNCTION kernel.undispatch_items(p_worker text, p_job_ids uuid[], p_known_item_ids uuid[])
RETURNS TABLE (
    job_id uuid, run_id uuid, id uuid, idempotency_key text, recipient text, contact_id uuid
)
LANGUAGE plpgsql SECURITY DEFINER
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
    WHERE j.status = 'processing' AND j.locked_by = p_worker AND j.lease_expires_at > now()
      AND j.id <> ALL (p_job_ids);
    RETURN QUERY
    WITH held AS (
        SELECT j.id, j.tenant_id FROM kernel.job_queue AS j
        WHERE j.id = ANY (p_job_ids || _strays) AND j.status = 'processing'
          AND j.locked_by = p_worker AND j.lease_expires_at > now()
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
        PERFORM kernel.release_jobs(p_worker, _strays, 'claimed by a step whose answer was lost with the connection');
    END IF;
END
$$;

COMMENT ON FUNCTION kernel.undispatch_items(text, uuid[], uuid[]) IS
'After a lost connection: items of the jobs p_job_ids that p_worker holds, marked dispatched but not among p_known_item_ids (the ones it handed to a provider), go back to undispatched and are returned for it to send; a job it holds that is not in p_job_ids has its dispatched items put back and is released. Fenced: only jobs whose lease p_worker holds.';

GRANT EXECUTE ON FUNCTION kernel.undispatch_items(text, uuid[], uuid[]) TO kernel_worker;

-- run_details (so `runs show`) takes its item counts from them, on the run's tenant: copied
-- from 0001, only item_counts changed.
CREATE OR REPLACE FUNCTION kernel.run_details(p_run_id uuid, p_item_limit integer) RETURNS jsonb
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
            FROM (SELECT status, sum(items) AS n FROM kernel.job_item_counts
                  WHERE run_id = p_run_id AND tenant_id = _run.tenant_id
                  GROUP BY status HAVING sum(items) > 0) AS s
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

-- The version ---------------------------------------------------------------------

CREATE OR REPLACE FUNCTION kernel.kernel_version() RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT '1.6.0'::text
$$;

INSERT INTO kernel.schema_migrations (version, name) VALUES (7, '0007_kernel_1_6')
ON CONFLICT (version) DO NOTHING;
