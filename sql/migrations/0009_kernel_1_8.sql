-- 0009_kernel_1_8.sql: the execution kernel v1.8.0.
--
-- No SQL changes: 1.8.0 is a release of the frozen Python side (issue 8). The daemon starts the
-- provider calls of adapters that can (ProviderAdapter.send_later: the HTTP adapters, on an event
-- loop of their own) without a thread per call; its provider threads now serve only adapters
-- whose calls block (smtp, noop). Measured (docs/benchmarks.md, "Kernel 1.8.0"): one daemon
-- against the latency-bound receiver at --concurrency 256 spends 267 µs of CPU per message
-- instead of 402, and reaches 0.72 of concurrency / latency instead of 0.62. Append-only once
-- it has landed on main: the next change is the next file.

-- The version ---------------------------------------------------------------------

CREATE OR REPLACE FUNCTION kernel.kernel_version() RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT '1.8.0'::text
$$;

INSERT INTO kernel.schema_migrations (version, name) VALUES (9, '0009_kernel_1_8')
ON CONFLICT (version) DO NOTHING;
