// N no-op jobs through pg-boss: enqueue (in bulk or one send per job), then drain.
// --mode batched: batchSize 500; --mode default: the library defaults (one job per fetch).
"use strict";
const PgBoss = require("pg-boss");
const { Client } = require("pg");
const { args, seconds, waitFor, report } = require("./common");

async function main() {
  const a = args(process.argv);
  const mode = a.mode || "default";
  const boss = new PgBoss({ connectionString: a.dsn, schedule: false, supervise: false });
  boss.on("error", (err) => console.error(err));
  await boss.start();
  await boss.createQueue("noop");

  const start = process.hrtime.bigint();
  if (a.enqueue === "single") {
    for (let i = 0; i < a.n; i++) await boss.send("noop", { i });
  } else {
    for (let i = 0; i < a.n; i += 5000) {
      const jobs = [];
      for (let j = i; j < Math.min(a.n, i + 5000); j++) jobs.push({ name: "noop", data: { i: j } });
      await boss.insert(jobs);
    }
  }
  const enqueueS = seconds(start);

  let done = 0;
  const drainStart = process.hrtime.bigint();
  if (mode === "batched") {
    await boss.work("noop", { batchSize: 500, pollingIntervalSeconds: 0.5 }, async (jobs) => { done += jobs.length; });
  } else {
    await boss.work("noop", async (jobs) => { done += jobs.length; });
  }
  await waitFor(() => done >= a.n, a.timeout);
  const drainS = seconds(drainStart);
  await boss.stop({ graceful: true, wait: true, timeout: 5000 });

  const client = new Client({ connectionString: a.dsn });
  await client.connect();
  const completed = await client.query("SELECT count(*)::int AS n FROM pgboss.job WHERE name = 'noop' AND state = 'completed'");
  await client.end();
  report({
    peer: "pg-boss",
    version: require("pg-boss/package.json").version,
    mode,
    enqueue: a.enqueue || "bulk",
    n: a.n,
    done,
    completed: completed.rows[0].n,
    enqueue_s: enqueueS,
    drain_s: drainS,
  });
}

main().catch((err) => { console.error(err); process.exit(1); });
