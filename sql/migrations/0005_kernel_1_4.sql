-- 0005_kernel_1_4.sql: the execution kernel v1.4.0.
--
-- Many tenants on one kernel (issue 10; docs/scheduling.md):
--   * Scheduled starts: deploy_campaign(campaign_id, start_at, ...) creates the run queued and
--     its jobs 'scheduled' (a new job status) until start_at; claims promote jobs that have come
--     due, so 'queued' now means "due": a claim never walks jobs it may not take yet.
--   * Priority: a run carries one (the deploy's, else the campaign's); within a tenant higher
--     priority is claimed first, and a job due for more than 5 minutes is claimed in turns with
--     the top priority (the bound against starvation).
--   * Turns between the runs of a tenant: a tenant's share of a claim goes round its runs, so
--     its one-contact campaign no longer waits behind its own 1,000,000-contact one.
--   * Send windows: a campaign may carry a daily window (send_window_start/end, contact's local
--     time); contacts carry an IANA time zone (else their workspace's). Jobs are cut per time
--     zone and wait, scheduled, for their window; a job whose window closes is paused
--     (processing -> scheduled) once its calls in flight are recorded. A run's deadline ends
--     what cannot be sent before it, failed with the reason.
--   * kernel.clock(): the time scheduling decisions see; a session may set
--     execution_kernel.clock to move it (tests: windows across DST changes).
-- worker_step keeps its signature; its rows gain kind 'paused'. A 1.3 daemon ignores that kind
-- and later loses the paused job's lease (logged), so upgrade daemons with the kernel.
-- Append-only once it has landed on main: the next change is the next file.

SET LOCAL search_path = pg_catalog, pg_temp;
SET LOCAL ROLE kernel_owner;

-- The clock and time zones ---------------------------------------------------------------

-- A SQL-standard body, as current_tenant(): bound at creation (a caller's search_path shadows
-- nothing) and inlined where it is used. With SET search_path, each call cost 17 µs of GUC
-- save and restore, five of them per deploy (pg_stat_user_functions).
CREATE FUNCTION kernel.clock() RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
RETURN coalesce(nullif(current_setting('execution_kernel.clock', TRUE), '')::timestamptz, now());
COMMENT ON FUNCTION kernel.clock() IS
'The time scheduled starts, send windows and deadlines are judged by: now(), unless the session sets execution_kernel.clock (a timestamptz) to move it, as tests do. Leases always use the real time.';
GRANT EXECUTE ON FUNCTION kernel.clock()
TO kernel_app, kernel_operator, kernel_reader, kernel_worker;

-- AT TIME ZONE refuses an unknown zone with its own clear error (22023, time zone "x" not
-- recognized): a constraint that calls this names the bad value, and nothing is written.
-- A SQL-standard body (bound at creation): the contacts constraint calls it per row.
CREATE FUNCTION kernel.is_time_zone(p_zone text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN (timestamptz '2000-01-01 00:00+00' AT TIME ZONE p_zone) IS NOT NULL;
COMMENT ON FUNCTION kernel.is_time_zone(text) IS
'True for a time zone PostgreSQL knows (an IANA name such as Europe/Paris); raises 22023 for any other.';
GRANT EXECUTE ON FUNCTION kernel.is_time_zone(text)
TO kernel_app, kernel_operator, kernel_reader, kernel_worker;

CREATE FUNCTION kernel.send_window_opens(p_window jsonb, p_zone text, p_at timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    _start time := (p_window ->> 'start')::time;
    _end time := (p_window ->> 'end')::time;
    _local timestamp := p_at AT TIME ZONE p_zone;
    _opens timestamptz;
BEGIN
    IF p_window IS NULL OR p_zone IS NULL THEN
        RETURN p_at;
    END IF;
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
COMMENT ON FUNCTION kernel.send_window_opens(jsonb, text, timestamptz) IS
'When a contact in p_zone may next be sent to under a daily window {"start": "08:00", "end": "21:00"} (local time; start > end wraps midnight): p_at itself inside the window (or without one), else the next opening.';
GRANT EXECUTE ON FUNCTION kernel.send_window_opens(jsonb, text, timestamptz)
TO kernel_app, kernel_operator, kernel_reader, kernel_worker;

-- Host tables: time zones, windows, a campaign's default priority -------------------------

ALTER TABLE kernel.workspaces ADD COLUMN time_zone text NOT NULL DEFAULT 'UTC'
CONSTRAINT workspaces_time_zone_valid CHECK (kernel.is_time_zone(time_zone));
COMMENT ON COLUMN kernel.workspaces.time_zone IS 'Time zone of contacts that name none (send windows).';
ALTER TABLE kernel.contacts ADD COLUMN time_zone text
CONSTRAINT contacts_time_zone_valid CHECK (time_zone IS NULL OR kernel.is_time_zone(time_zone));
COMMENT ON COLUMN kernel.contacts.time_zone IS 'IANA time zone send windows are read in; NULL: the workspace''s.';
ALTER TABLE kernel.campaigns
ADD COLUMN priority integer NOT NULL DEFAULT 0
CONSTRAINT campaigns_priority_in_range CHECK (priority BETWEEN -1000 AND 1000),
ADD COLUMN send_window_start time,
ADD COLUMN send_window_end time,
ADD CONSTRAINT campaigns_send_window_check CHECK (
    (send_window_start IS NULL AND send_window_end IS NULL)
    OR (
        send_window_start IS NOT NULL AND send_window_end IS NOT NULL
        AND send_window_start <> send_window_end
    )
);
COMMENT ON COLUMN kernel.campaigns.priority IS 'Default priority of its runs (-1000..1000, higher first within a tenant).';
COMMENT ON COLUMN kernel.campaigns.send_window_start IS 'Daily send window in each contact''s local time, with send_window_end (start > end wraps midnight); NULL: any time.';

-- Runs: priority, scheduled start, deadline ------------------------------------------------

ALTER TABLE kernel.campaign_runs
ADD COLUMN priority integer NOT NULL DEFAULT 0
CONSTRAINT campaign_runs_priority_in_range CHECK (priority BETWEEN -1000 AND 1000),
ADD COLUMN start_at timestamptz,
ADD COLUMN deadline timestamptz,
ADD CONSTRAINT campaign_runs_deadline_after_start CHECK (deadline > start_at);
COMMENT ON COLUMN kernel.campaign_runs.start_at IS 'Scheduled start: its jobs are scheduled until then. NULL: at once.';
COMMENT ON COLUMN kernel.campaign_runs.deadline IS 'Nothing of the run is dispatched after it; what is left then fails with the reason. NULL: none.';

-- Jobs: the scheduled status, a time zone per job ------------------------------------------

ALTER TABLE kernel.job_queue DROP CONSTRAINT job_queue_status_check;
ALTER TABLE kernel.job_queue ADD CONSTRAINT job_queue_status_check
CHECK (status IN ('scheduled', 'queued', 'processing', 'completed', 'failed', 'cancelled'));
ALTER TABLE kernel.job_queue ADD COLUMN time_zone text;
COMMENT ON COLUMN kernel.job_queue.time_zone IS 'The time zone of all its contacts when the run has a send window (jobs are cut per zone); NULL otherwise.';
INSERT INTO kernel.state_transitions (entity, from_status, to_status) VALUES
('job', 'scheduled', 'queued'),
('job', 'scheduled', 'cancelled'),
('job', 'processing', 'scheduled');

-- Scheduled jobs come due in run_after order; claims promote them from this index.
CREATE INDEX job_queue_scheduled_idx ON kernel.job_queue (run_after) WHERE status = 'scheduled';
-- Queued jobs (all due) by tenant, priority and run: the claim walks tenants, then each
-- tenant's runs in priority order.
CREATE INDEX job_queue_run_claim_order_idx
ON kernel.job_queue (tenant_id, priority DESC, run_id, run_after, id) WHERE status = 'queued';
DROP INDEX kernel.job_queue_tenant_claim_order_idx;

DROP TRIGGER job_queue_guard_insert ON kernel.job_queue;
CREATE TRIGGER job_queue_guard_insert BEFORE INSERT ON kernel.job_queue
FOR EACH ROW WHEN (new.status NOT IN ('queued', 'scheduled'))
EXECUTE FUNCTION kernel._job_queue_guard();

-- Functions that learn the scheduled status -------------------------------------------------

-- kernel._job_queue_guard()

CREATE OR REPLACE FUNCTION kernel._job_queue_guard()
RETURNS trigger
LANGUAGE plpgsql
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status NOT IN ('queued', 'scheduled') THEN
            RAISE EXCEPTION 'a job must start queued or scheduled, not % (job %)', NEW.status, NEW.id
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
$function$;
COMMENT ON FUNCTION kernel._job_queue_guard() IS 'Trigger: refuses illegal job transitions and records each change (and each re-claim) in job_events.';

-- kernel._finish_run_if_done(p_run_id uuid)

CREATE OR REPLACE FUNCTION kernel._finish_run_if_done(p_run_id uuid)
RETURNS void
LANGUAGE plpgsql
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
        SELECT 1 FROM kernel.job_queue WHERE run_id = p_run_id AND status IN ('scheduled', 'queued', 'processing')
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
$function$;
COMMENT ON FUNCTION kernel._finish_run_if_done(p_run_id uuid) IS 'Invariant 4: once every job of a run is terminal, derives the run status from the job and item outcomes.';

-- kernel._finish_runs_if_done(p_run_ids uuid[])

CREATE OR REPLACE FUNCTION kernel._finish_runs_if_done(p_run_ids uuid[])
RETURNS void
LANGUAGE plpgsql
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
        HAVING count(*) FILTER (WHERE j.status IN ('scheduled', 'queued', 'processing')) = 0
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
$function$;
COMMENT ON FUNCTION kernel._finish_runs_if_done(p_run_ids uuid[]) IS 'Invariant 4 for several runs at once (as _finish_run_if_done): each run whose jobs are all terminal gets its status from the job and item outcomes.';

-- kernel.cancel_campaign_run(p_run_id uuid)

CREATE OR REPLACE FUNCTION kernel.cancel_campaign_run(p_run_id uuid)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    _run kernel.campaign_runs;
BEGIN
    PERFORM kernel._require(p_run_id, 'run_id');
    -- Jobs before their run, the order claim_queued_jobs and complete_job lock in: no deadlock.
    PERFORM 1 FROM kernel.job_queue WHERE run_id = p_run_id AND status IN ('scheduled', 'queued', 'processing')
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
    WHERE run_id = p_run_id AND status IN ('scheduled', 'queued');
    -- Processing jobs finish their in-flight calls and end cancelled in complete_job.
    UPDATE kernel.channel_outbox SET status = 'skipped', skipped = true, skip_reason = 'run_cancelled'
    WHERE run_id = p_run_id AND status = 'pending' AND dispatched_at IS NULL;
END
$function$;
COMMENT ON FUNCTION kernel.cancel_campaign_run(p_run_id uuid) IS 'Cancels a queued (or scheduled) or running run: scheduled and queued jobs cancelled, undispatched items skipped; in-flight calls still get recorded.';

-- kernel.queue_stats()

CREATE OR REPLACE FUNCTION kernel.queue_stats()
RETURNS TABLE (status text, jobs bigint, oldest_age_seconds double precision)
LANGUAGE plpgsql
STABLE SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    PERFORM kernel._require_scope();
    RETURN QUERY
    SELECT j.status, count(*), extract(EPOCH FROM now() - min(j.created_at))::double precision
    FROM kernel.job_queue AS j
    WHERE j.status IN ('scheduled', 'queued', 'processing')
      AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id))
    GROUP BY j.status;
END
$function$;
COMMENT ON FUNCTION kernel.queue_stats() IS 'Queue depth and age of the oldest job per non-terminal status, for metrics and dashboards.';

-- kernel._enqueue_batches(p_run kernel.campaign_runs, p_contacts uuid[], p_batch_size integer)

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
            LEFT JOIN kernel.contacts AS p ON u.contact_id = p.id
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

-- kernel.reserve_outbox_items(p_job_id uuid, p_worker text, p_max_items integer)

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
COMMENT ON FUNCTION kernel.reserve_outbox_items(p_job_id uuid, p_worker text, p_max_items integer) IS 'Returns up to max_items pending, undispatched items of a job, inserting items for the next contacts of its snapshot first (ON CONFLICT (idempotency_key) DO NOTHING). Unreachable contacts become skipped items. Nothing once the run is cancelled, past its deadline, or outside the job''s send window.';

-- kernel.retry_campaign_run(p_run_id uuid, p_include_unknown boolean)

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
        retry_of_run_id, root_run_id, generation, priority
    ) VALUES (
        _run.id, _old.campaign_id, _old.tenant_id, _old.workspace_id, 'queued', _old.channel,
        -- Same content as the run retried; the provider as configured now (it may have been fixed).
        _old.run_config || _provider || jsonb_build_object('include_unknown', p_include_unknown),
        p_run_id, _old.root_run_id,
        (SELECT max(generation) + 1 FROM kernel.campaign_runs WHERE root_run_id = _old.root_run_id),
        -- At once, at the priority of the run retried, within the same send window.
        _old.priority
    ) RETURNING * INTO _run;
    PERFORM kernel._enqueue_batches(_run, _targets, coalesce((_old.run_config ->> 'batch_size')::integer, 1000));
    RETURN _run.id;
END
$function$;
COMMENT ON FUNCTION kernel.retry_campaign_run(p_run_id uuid, p_include_unknown boolean) IS 'UX2: a new run linked by retry_of_run_id/root_run_id targeting only contacts whose latest lineage item failed (and unknown ones when asked); never a contact with a sent item.';

-- Deploys: a start time, a priority, a deadline ----------------------------------------------

CREATE FUNCTION kernel.deploy_campaign(
    p_campaign_id uuid, p_start_at timestamptz, p_priority integer DEFAULT NULL,
    p_deadline timestamptz DEFAULT NULL, p_batch_size integer DEFAULT 1000
) RETURNS uuid
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
    IF p_priority NOT BETWEEN -1000 AND 1000 THEN
        RAISE EXCEPTION 'priority must be between -1000 and 1000, got %', p_priority USING ERRCODE = 'KE008';
    END IF;
    IF p_deadline <= greatest(p_start_at, kernel.clock()) THEN
        RAISE EXCEPTION 'deadline % is not after the start (%)', p_deadline, greatest(p_start_at, kernel.clock())
            USING ERRCODE = 'KE008', HINT = 'Give a deadline later than start_at and than now, or NULL for none.';
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
    FROM kernel.campaign_audience WHERE campaign_id = _c.id;
    PERFORM kernel._enqueue_batches(_run, _contacts, p_batch_size);
    RETURN _run.id;
END
$$;
COMMENT ON FUNCTION kernel.deploy_campaign(uuid, timestamptz, integer, timestamptz, integer) IS
'deploy_campaign with a schedule: the run is queued and its jobs scheduled until p_start_at (NULL or past: at once), at p_priority (NULL: the campaign''s), ending by p_deadline (NULL: none), in batches of p_batch_size. Validates like the seed form (KE001, KE003, KE008). Cast a literal start: deploy_campaign(id, ''2027-01-04 09:00+01''::timestamptz).';
GRANT EXECUTE ON FUNCTION kernel.deploy_campaign(uuid, timestamptz, integer, timestamptz, integer)
TO kernel_app, kernel_operator;

CREATE OR REPLACE FUNCTION kernel.deploy_campaign(p_campaign_id uuid, p_batch_size integer)
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN kernel.deploy_campaign(p_campaign_id, NULL::timestamptz, NULL::integer, NULL::timestamptz, p_batch_size);
END
$$;
CREATE OR REPLACE FUNCTION kernel.deploy_campaign(p_campaign_id uuid)
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN kernel.deploy_campaign(p_campaign_id, NULL::timestamptz, NULL::integer, NULL::timestamptz, 1000);
END
$$;

COMMENT ON FUNCTION kernel.deploy_campaign(uuid, integer) IS
'Validates the launch prerequisites (KE001), refuses a second active run (KE003), snapshots content, provider and send window into run_config, creates the run at the campaign''s priority and its batch jobs queued, and NOTIFYs kernel_jobs.';

-- Claims: promote what came due, then tenants in turns, each tenant's runs in turns ---------

-- A daemon may now serve several tenants (--tenant A --tenant B): the claim takes an array.
DROP FUNCTION kernel._claim_jobs(text, integer, interval, uuid);
CREATE FUNCTION kernel._claim_jobs(
    p_worker text, p_max_jobs integer, p_lease interval, p_tenant_ids uuid[]
)
RETURNS SETOF kernel.job_queue
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- Every statement walks an index in the order it needs and stops: never a bitmap of the whole
-- backlog, never a sort of it, whatever the statistics of a fast-growing job_queue say.
SET enable_bitmapscan = off
SET enable_seqscan = off
-- The planner prices the two recursive walks at far more than they read (it cannot know they
-- stop at 32 tenants and 8 runs), above jit_above_cost: JIT then compiled the claim on every
-- call, 50 ms of a 1 ms claim (auto_explain, docs/benchmarks.md).
SET jit = off
AS $$
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
    IF EXISTS (SELECT 1 FROM kernel.job_queue WHERE status = 'scheduled' AND run_after <= _now) THEN
        UPDATE kernel.job_queue AS j SET status = 'queued'
        FROM (
            SELECT d.id FROM kernel.job_queue AS d
            WHERE d.status = 'scheduled' AND d.run_after <= _now
            ORDER BY d.run_after LIMIT 1000
            FOR UPDATE SKIP LOCKED
        ) AS d
        WHERE j.id = d.id;
    END IF;

    -- Expired leases first (their holder died: the crash path), then queued jobs.
    WITH RECURSIVE expired AS (
        SELECT j.id FROM kernel.job_queue AS j
        WHERE j.status = 'processing' AND j.lease_expires_at < now()
          AND (kernel.current_tenant() IS NULL OR kernel.in_scope(j.tenant_id, j.workspace_id))
          AND (p_tenant_ids IS NULL OR j.tenant_id = ANY (p_tenant_ids))
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
        SELECT c.id
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
        (SELECT r.id FROM ranked AS r ORDER BY r.turn > r.share, r.turn, r.busy, r.tenant_n LIMIT p_max_jobs)
        UNION ALL
        SELECT t.id FROM topped AS t
    ), candidates AS (
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
COMMENT ON FUNCTION kernel._claim_jobs(text, integer, interval, uuid[]) IS
'The one claim (FOR UPDATE SKIP LOCKED): promotes scheduled jobs that came due, then takes expired leases, then queued jobs in turns between tenants (the given ones, the scope''s, or all) and between each tenant''s runs, by priority; jobs at max_attempts are failed instead; their runs move to running.';

-- The hot path: windows and deadlines -----------------------------------------------------

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
GRANT EXECUTE ON FUNCTION kernel.worker_step(
    text, numeric, uuid[], uuid[], text[], text[], text[], text[], uuid[], uuid[], text[], uuid[],
    integer, integer, text[], uuid[]
) TO kernel_worker;

-- The 1.3 form (one tenant), for daemons of 1.3 during a rolling upgrade.
CREATE OR REPLACE FUNCTION kernel.worker_step(
    p_worker text, p_lease_seconds numeric, p_held uuid[], p_result_ids uuid[],
    p_result_outcomes text[], p_result_provider_ids text[], p_result_responses text[],
    p_result_errors text[], p_complete uuid[], p_fail uuid[], p_fail_errors text[],
    p_redispatch uuid[], p_want integer, p_claim integer, p_deduplicating text[], p_tenant_id uuid
)
RETURNS TABLE (
    kind text, job_id uuid, run_id uuid, item_id uuid,
    idempotency_key text, recipient text, contact_id uuid, detail jsonb
)
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM kernel.worker_step(
        p_worker, p_lease_seconds, p_held, p_result_ids, p_result_outcomes, p_result_provider_ids,
        p_result_responses, p_result_errors, p_complete, p_fail, p_fail_errors, p_redispatch, p_want,
        p_claim, p_deduplicating, CASE WHEN p_tenant_id IS NOT NULL THEN ARRAY[p_tenant_id] END
    )
$$;
COMMENT ON FUNCTION kernel.worker_step(text, numeric, uuid[], uuid[], text[], text[], text[], text[], uuid[], uuid[], text[], uuid[], integer, integer, text[], uuid) IS
'The 1.3 form of worker_step: one tenant (or NULL: every tenant in scope).';


-- Items of a run, a page at a time (issue 11: runs show --item-status) ----------------------

CREATE FUNCTION kernel.run_items(
    p_run_id uuid,
    p_status text DEFAULT NULL,
    p_after uuid DEFAULT NULL,
    p_limit integer DEFAULT 100
)
RETURNS SETOF kernel.channel_outbox
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
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
    SELECT * INTO _run FROM kernel.campaign_runs WHERE id = p_run_id;
    PERFORM kernel._assert_scope(_run.tenant_id, _run.workspace_id, 'run', p_run_id);
    -- Keyset pages in id order: the next page starts after the last id of this one.
    RETURN QUERY
    SELECT * FROM kernel.channel_outbox AS o
    WHERE o.run_id = p_run_id AND (p_status IS NULL OR o.status = p_status)
      AND (p_after IS NULL OR o.id > p_after)
    ORDER BY o.id
    LIMIT p_limit;
END
$$;
COMMENT ON FUNCTION kernel.run_items(uuid, text, uuid, integer) IS
'A page of a run''s outbox items in id order, of one status when given, after the id p_after (keyset: pass the last id of the previous page). KE002 for another tenant''s run, KE008 for a bad status or limit.';
GRANT EXECUTE ON FUNCTION kernel.run_items(uuid, text, uuid, integer)
TO kernel_app, kernel_operator, kernel_reader, kernel_worker;

-- The version ---------------------------------------------------------------------

CREATE OR REPLACE FUNCTION kernel.kernel_version() RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT '1.4.0'::text
$$;

INSERT INTO kernel.schema_migrations (version, name) VALUES (5, '0005_kernel_1_4')
ON CONFLICT (version) DO NOTHING;
