// Rate limits waited out, on a real mesh whose gateways run with tiny limits: HTTP 429 on the
// upgrade (Retry-After honoured), and `rate_limited` error frames (retry_after_ms honoured,
// resent with the same id, stored once).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Client } from "../../dist/index.js";
import { closeAll, frameTail, spyWebSocket, unique, within } from "./helpers.js";
import { startMesh } from "./mesh.js";

// Each gateway has its own buckets: gw0 serves the upgrade-rate test, gw1 the message-rate one.
const CONN_RATE = 0.5; // one upgrade per 2 s per address...
const MSG_RATE = 20; // ...and 20 frames per second per connection, 20 at once
let mesh;
const tenant = unique("rates");
const opened = [];

before(async () => {
  mesh = await startMesh({
    env: {
      ARQONBUS_CONN_RATE_PER_IP: String(CONN_RATE),
      ARQONBUS_CONN_BURST_PER_IP: "1",
      ARQONBUS_MSG_RATE_PER_CONN: String(MSG_RATE),
      ARQONBUS_MSG_BURST_PER_CONN: String(MSG_RATE),
    },
  });
});
after(async () => {
  await closeAll(...opened);
  await mesh?.stop();
});

function client(principal, url, spy = spyWebSocket()) {
  const c = new Client({
    urls: [url],
    token: `dev:${tenant}:${principal}`,
    WebSocket: spy.WebSocket,
    connectTimeoutMs: 30_000,
    requestTimeoutMs: 30_000,
  });
  c.spy = spy;
  opened.push(c);
  return c;
}

const UPGRADES_REFUSED = 'arqonbus_rate_limited_total{scope="upgrade"}';
const FRAMES_REFUSED = 'arqonbus_rate_limited_total{scope="message"}';

test("handshakes refused with 429 are retried after Retry-After and all connect", { timeout: 90_000 }, async () => {
  const gw0 = mesh.urls[0];
  const first = client("first", gw0);
  await within(30_000, "the first connect", first.connect()); // takes the address's only token

  // The next upgrade is refused (429, Retry-After 2 s); the SDK waits that long, then connects.
  const refusedBefore = await mesh.metric(0, UPGRADES_REFUSED);
  const second = client("second", gw0);
  const started = Date.now();
  await within(30_000, "the second connect", second.connect());
  const waited = Date.now() - started;
  const refusedOnce = (await mesh.metric(0, UPGRADES_REFUSED)) - refusedBefore;
  assert.equal(second.state, "connected");
  assert.ok(refusedOnce >= 1, "the second upgrade was not refused: the rate limit is not on");
  assert.ok(
    refusedOnce <= 2,
    `${refusedOnce} refusals for one client in ${waited} ms: it did not wait the 429's Retry-After ` +
      `(attempts at +${second.spy.log.sockets.map((s) => s.openedAt - started).join(", +")} ms)`,
  );
  assert.ok(waited >= 1000, `connected ${waited} ms after a 429 that asked for ~2000 ms`);

  // Several at once: some are refused, every one connects in the end.
  const many = ["c1", "c2", "c3"].map((p) => client(p, gw0));
  const manyBefore = await mesh.metric(0, UPGRADES_REFUSED);
  await within(60_000, "three concurrent connects", Promise.all(many.map((c) => c.connect())));
  const refusedMany = (await mesh.metric(0, UPGRADES_REFUSED)) - manyBefore;
  assert.ok(refusedMany >= 2, `only ${refusedMany} of three concurrent upgrades were refused`);
  for (const c of many) assert.equal(c.state, "connected");
  const attempts = many.map((c) => c.spy.log.sockets.length);
  console.log(
    `429: one client refused ${refusedOnce}x, connected after ${waited} ms; three at once refused ${refusedMany}x ` +
      `(attempts per client ${attempts.join(", ")})`,
  );
  // Published through all of them: they are usable.
  const channel = unique("conn");
  const acks = await Promise.all(
    [first, second, ...many].map((c, i) => c.publish("rates", channel, { i }, { id: `conn-${i}` })),
  );
  assert.equal(new Set(acks.map((a) => a.seq)).size, 5);
});

test("publishes over the message rate are waited out (retry_after_ms), resent with the same id, stored once", { timeout: 90_000 }, async () => {
  const gw1 = mesh.urls[1];
  const c = client("burst", gw1);
  await within(30_000, "connect", c.connect());
  assert.equal(c.welcome?.limits?.msg_rate_per_conn, MSG_RATE, `welcome.limits: ${JSON.stringify(c.welcome?.limits)}`);
  const refusedBefore = await mesh.metric(1, FRAMES_REFUSED);
  const channel = unique("msg");
  const N = 100;
  const ids = Array.from({ length: N }, (_, i) => `m-${i}`);
  const started = Date.now();
  const outcomes = await within(
    60_000,
    `${N} publishes`,
    Promise.allSettled(ids.map((id, i) => c.publish("rates", channel, { i }, { id, timeoutMs: 45_000 }))),
  );
  const took = Date.now() - started;
  const failed = outcomes.map((o, i) => [ids[i], o]).filter(([, o]) => o.status === "rejected");
  assert.deepEqual(
    failed.map(([id, o]) => `${id}: ${o.reason?.constructor?.name} ${o.reason?.code} ${o.reason?.message}`),
    [],
    `publishes failed:\n${frameTail(c.spy.log)}`,
  );
  const acks = outcomes.map((o) => o.value);
  acks.forEach((ack, i) => assert.equal(ack.id, ids[i]));
  assert.equal(new Set(acks.map((a) => a.seq)).size, N, "two events share a seq");
  assert.deepEqual(acks.filter((a) => a.duplicate).map((a) => a.id), [], "acked as duplicates after rate_limited");

  // The gateway refused frames for rate, and the SDK resent each one only after retry_after_ms.
  const refused = (await mesh.metric(1, FRAMES_REFUSED)) - refusedBefore;
  const limited = c.spy.log.frames.filter((f) => f.dir === "in" && f.json?.type === "error" && f.json.payload?.code === "rate_limited");
  assert.ok(limited.length > 0 && refused > 0, `no rate_limited frame (metric ${refused}): the limit is not on`);
  const outs = c.spy.log.frames.filter((f) => f.dir === "out" && f.json?.type === "event");
  assert.ok(outs.every((f) => ids.includes(f.json.id)), "an event frame with an id the caller never gave");
  for (const error of limited) {
    const { request_id: id, retry_after_ms: wait } = error.json.payload;
    assert.ok(ids.includes(id), `rate_limited for an unknown request ${id}`);
    assert.ok(wait > 0, `rate_limited without retry_after_ms: ${error.text}`);
    // The first event frame of this id sent after the error frame was read (log order).
    const after = c.spy.log.frames.indexOf(error);
    const resend = c.spy.log.frames.find((f, i) => i > after && f.dir === "out" && f.json?.type === "event" && f.json.id === id);
    assert.ok(resend, `${id} was never resent after its rate_limited`);
    const history = () =>
      c.spy.log.frames
        .filter((f) => f.json?.id === id || f.json?.payload?.request_id === id)
        .map((f) => `+${f.at - started} ms ${f.dir} #${f.socket} ${f.text.slice(0, 160)}`)
        .join("\n");
    assert.ok(
      resend.at - error.at >= wait - 5,
      `${id} resent ${resend.at - error.at} ms after rate_limited with retry_after_ms ${wait}:\n${history()}`,
    );
  }
  // Resends are paced at the bucket's rate, not all at once: without that, every refused
  // publish came back at the same moment and nearly all were refused again (thousands of
  // rate_limited frames for 100 publishes). Paced, a publish is refused about twice on a
  // busy machine (216 for 100 once in CI, where the timers ran late); 4 per publish is
  // far from thousands.
  assert.ok(limited.length <= 4 * N, `${limited.length} rate_limited frames for ${N} publishes: resends are not paced`);
  const minimum = ((N - MSG_RATE) / MSG_RATE) * 1000;
  assert.ok(took >= minimum * 0.8, `${N} publishes at ${MSG_RATE}/s took only ${took} ms`);

  const stored = [];
  for await (const event of c.historyAll("rates", channel, { sinceSeq: 0 })) {
    stored.push(event);
    if (stored.length > 10 * N) assert.fail("historyAll does not end");
  }
  assert.deepEqual(stored.map((e) => e.id).sort(), [...ids].sort(), "stored events differ from the acked ones");
  assert.equal(new Set(stored.map((e) => e.id)).size, N, "an id stored twice");
  console.log(
    `rate_limited: ${N} publishes acked in ${took} ms, ${limited.length} rate_limited frames ` +
      `(${outs.length} event frames sent for ${N} ids)`,
  );
});
