// Shared by the peer scripts: arguments, a deadline, and one JSON line on stdout.
"use strict";

function args(argv) {
  const out = {};
  for (let i = 2; i < argv.length; i += 2) out[argv[i].replace(/^--/, "")] = argv[i + 1];
  if (!out.dsn || !out.n) throw new Error("usage: --dsn DSN --n N [--mode M] [--enqueue bulk|single]");
  out.n = Number(out.n);
  out.timeout = Number(out.timeout || 600);
  return out;
}

function seconds(start) {
  return Number(process.hrtime.bigint() - start) / 1e9;
}

// CPU seconds every process of the machine has spent (bench/cpu.py reads /proc/stat the same
// way: user nice system irq softirq steal), or null off Linux.
function machineBusySeconds() {
  const fs = require("fs");
  let first;
  try {
    first = fs.readFileSync("/proc/stat", "utf8").split("\n", 1)[0].trim().split(/\s+/);
  } catch (err) {
    return null;
  }
  const ticks = [0, 1, 2, 5, 6, 7].reduce((sum, i) => sum + Number(first[1 + i]), 0);
  return ticks / 100; // USER_HZ: 100 on every Linux the benchmark runs on (bench/cpu.py asks sysconf)
}

function busySince(before) {
  const now = machineBusySeconds();
  return now === null || before === null ? null : now - before;
}

async function waitFor(predicate, timeoutS) {
  const start = process.hrtime.bigint();
  while (!predicate()) {
    if (seconds(start) > timeoutS) throw new Error(`not done within ${timeoutS} s`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

async function count(dsn, query) {
  const { Client } = require("pg");
  const client = new Client({ connectionString: dsn });
  await client.connect();
  try {
    return (await client.query(query)).rows[0].n;
  } finally {
    await client.end();
  }
}

// The one JSON line the benchmark reads: the peer, its version, the run's shape and timings.
function report(peer, a, fields) {
  const version = require(`${peer}/package.json`).version;
  const result = { peer, version, mode: a.mode || "default", enqueue: a.enqueue || "bulk", n: a.n, ...fields };
  process.stdout.write(JSON.stringify(result) + "\n");
}

module.exports = { args, seconds, machineBusySeconds, busySince, waitFor, count, report };
