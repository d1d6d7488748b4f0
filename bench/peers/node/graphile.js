// N no-op jobs through graphile-worker: enqueue (in bulk or one call per job), then drain.
// --mode batched: localQueue of 500 and batched completions; --mode default: the library defaults.
"use strict";
const { run, runMigrations, makeWorkerUtils } = require("graphile-worker");
const { Client } = require("pg");
const { args, seconds, machineBusySeconds, busySince, waitFor, count, report } = require("./common");

async function main() {
  const a = args(process.argv);
  const mode = a.mode || "default";
  const { Logger } = require("graphile-worker");
  const logger = new Logger(() => () => {});
  await runMigrations({ connectionString: a.dsn, logger });

  const start = process.hrtime.bigint();
  if (a.enqueue === "single") {
    const utils = await makeWorkerUtils({ connectionString: a.dsn, logger });
    for (let i = 0; i < a.n; i++) await utils.addJob("noop", { i });
    await utils.release();
  } else {
    const client = new Client({ connectionString: a.dsn });
    await client.connect();
    await client.query(
      `SELECT graphile_worker.add_jobs(array(
         SELECT ROW('noop', json_build_object('i', g), NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec
         FROM generate_series(1, $1) AS g))`,
      [a.n],
    );
    await client.end();
  }
  const enqueueS = seconds(start);

  let done = 0;
  const options = { connectionString: a.dsn, logger, taskList: { noop: async () => { done++; } } };
  if (mode === "batched") {
    options.preset = {
      worker: {
        concurrentJobs: 16,
        maxPoolSize: 18,
        localQueue: { size: 500 },
        completeJobBatchDelay: 0,
        failJobBatchDelay: 0,
      },
    };
  }
  const drainStart = process.hrtime.bigint();
  const busyBefore = machineBusySeconds();
  const runner = await run(options);
  await waitFor(() => done >= a.n, a.timeout);
  const drainS = seconds(drainStart);
  const drainCpuS = busySince(busyBefore);
  await runner.stop();

  const jobsLeft = await count(a.dsn, "SELECT count(*)::int AS n FROM graphile_worker.jobs");
  report("graphile-worker", a, { done, jobs_left: jobsLeft, enqueue_s: enqueueS, drain_s: drainS, machine_cpu_s: drainCpuS });
}

main().catch((err) => { console.error(err); process.exit(1); });
