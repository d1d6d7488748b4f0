// The latency-bound provider of bench/scenarios/latency.py and pickup.py: answers each POST
// after a log-normal delay (median and p99 given, seeded), keep-alive, on 127.0.0.1 only.
// In Node rather than Python so that serving thousands of requests a second costs the daemon's
// two cores little (a real provider runs elsewhere). Prints its port on the first line;
// GET /stats returns what it saw: requests, distinct keys, keys seen twice, the mean delay it
// applied, the first arrival per run_id (epoch seconds).
"use strict";

const http = require("http");

const Z99 = 2.3263478740408408; // the standard normal's 99th percentile

function option(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at > 0 ? Number(process.argv[at + 1]) : fallback;
}

const medianS = option("median-ms", 50) / 1000;
const p99S = option("p99-ms", 400) / 1000;
const sigma = p99S > medianS && medianS > 0 ? Math.log(p99S / medianS) / Z99 : 0;

// mulberry32: a small seeded generator, so that a run's delays can be repeated.
let state = option("seed", 1) >>> 0;
function uniform() {
  state = (state + 0x6d2b79f5) >>> 0;
  let t = state;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return (((t ^ (t >>> 14)) >>> 0) + 1) / 4294967297; // in (0, 1)
}
function gauss() {
  return Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform());
}

const seen = new Set();
const firstByRun = {};
let requests = 0;
let duplicates = 0;
let delayTotal = 0;

function reply(res, payload) {
  const data = JSON.stringify(payload);
  res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(data) });
  res.end(data);
}

const server = http.createServer({ keepAlive: true, noDelay: true }, (req, res) => {
  if (req.method !== "POST") {
    reply(res, {
      requests, distinct_keys: seen.size, duplicates,
      mean_delay_s: requests ? delayTotal / requests : null, first_by_run: firstByRun,
    });
    return;
  }
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    const now = (performance.timeOrigin + performance.now()) / 1000;
    const body = chunks.length ? JSON.parse(Buffer.concat(chunks)) : {};
    const delay = medianS ? medianS * Math.exp(sigma * gauss()) : 0;
    requests += 1;
    delayTotal += delay;
    const key = String(body.idempotency_key);
    if (seen.has(key)) duplicates += 1;
    seen.add(key);
    const run = String(body.run_id);
    if (!(run in firstByRun)) firstByRun[run] = now;
    const answer = () => reply(res, { id: body.idempotency_key });
    if (delay) setTimeout(answer, delay * 1000);
    else answer();
  });
});
server.keepAliveTimeout = 120000;
server.headersTimeout = 121000;
server.listen({ host: "127.0.0.1", port: 0, backlog: 1024 }, () => {
  process.stdout.write(`${server.address().port}\n`);
});
process.on("SIGTERM", () => process.exit(0));
