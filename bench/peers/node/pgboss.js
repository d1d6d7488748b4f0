// N no-op jobs through pg-boss: enqueue (in bulk or one send per job), then drain.
// --mode batched: batchSize 500; --mode default: the library defaults (one job per fetch).
"use strict";
const PgBoss = require("pg-boss");
const { args, seconds, machineBusySeconds, busySince, waitFor, count, report } = require("./common");

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
  const busyBefore = machineBusySeconds();
  if (mode === "batched") {
    await boss.work("noop", { batchSize: 500, pollingIntervalSeconds: 0.5 }, async (jobs) => { done += jobs.length; });
  } else {
    await boss.work("noop", async (jobs) => { done += jobs.length; });
  }
  await waitFor(() => done >= a.n, a.timeout);
  const drainS = seconds(drainStart);
  const drainCpuS = busySince(busyBefore);
  await boss.stop({ graceful: true, wait: true, timeout: 5000 });

  const completed = await count(a.dsn, "SELECT count(*)::int AS n FROM pgboss.job WHERE name = 'noop' AND state = 'completed'");
  report("pg-boss", a, { done, completed, enqueue_s: enqueueS, drain_s: drainS, machine_cpu_s: drainCpuS });
}

main().catch((err) => { console.error(err); process.exit(1); });
