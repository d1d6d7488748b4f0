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

async function waitFor(predicate, timeoutS) {
  const start = process.hrtime.bigint();
  while (!predicate()) {
    if (seconds(start) > timeoutS) throw new Error(`not done within ${timeoutS} s`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

function report(result) {
  process.stdout.write(JSON.stringify(result) + "\n");
}

module.exports = { args, seconds, waitFor, report };
