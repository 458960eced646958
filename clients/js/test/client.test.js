// Tests of the client shell against an in-process fake gateway (test/fake-gateway.js).
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import {
  ArqonBusError,
  AuthenticationError,
  Client,
  ClientClosed,
  CommandFailed,
  ConnectionFailed,
  ConnectionRejected,
  Forbidden,
  InvalidName,
  MessageTooLarge,
  Timeout,
} from "../dist/index.js";
import { makeStore, nextEvent, nextFrame, startGateway, within } from "./fake-gateway.js";

const fast = { WebSocket, maxBackoffMs: 100, connectTimeoutMs: 5000, requestTimeoutMs: 3000 };

/** Runs `fn(t, use)`; everything passed to `use` is closed afterwards. */
function withCleanup(fn) {
  return async (t) => {
    const owned = [];
    const use = (x) => (owned.push(x), x);
    try {
      await fn(t, use);
    } finally {
      for (const x of owned.reverse()) await within(5000, "cleanup", Promise.resolve(x.close())).catch(() => {});
    }
  };
}

async function take(sub, count, ms = 5000) {
  const items = [];
  const it = sub[Symbol.asyncIterator]();
  for (let i = 0; i < count; i++) {
    const r = await within(ms, `item ${i + 1} of ${count}`, it.next());
    if (r.done) break;
    items.push(r.value);
  }
  await it.return();
  return items;
}

test("publish, subscribe and history round trip", withCleanup(async (_, use) => {
  const gw = use(await startGateway());
  const client = use(new Client({ ...fast, urls: gw.url, token: "tok" }));
  const states = [];
  client.addEventListener("state", (e) => states.push(e.detail.state));
  await client.connect();
  assert.equal(client.state, "connected");
  assert.equal(client.welcome.node, "fake");
  const sub = await client.subscribe("science", "general");
  const ack = await client.publish("science", "general", { text: "hi" }, { id: "m-1" });
  assert.deepEqual(ack, { id: "m-1", seq: 1, duplicate: false });
  const [item] = await take(sub, 1);
  assert.equal(item.type, "event");
  assert.deepEqual(item.payload, { text: "hi" });
  assert.equal(item.seq, 1);
  assert.equal(sub.lastSeq, 1);
  const page = await client.history("science", "general", { sinceSeq: 0 });
  assert.equal(page.events.length, 1);
  assert.equal(page.next_since_seq, 1);
  const all = [];
  for await (const e of client.historyAll("science", "general")) all.push(e.id);
  assert.deepEqual(all, ["m-1"]);
  assert.deepEqual(states, ["connecting", "connected"]);
}));

test("the listener form gets the same items in order", withCleanup(async (_, use) => {
  const gw = use(await startGateway());
  const client = use(new Client({ ...fast, urls: gw.url, token: "tok" }));
  await client.connect();
  const sub = await client.subscribe("science", "general");
  const seen = [];
  let done;
  const three = new Promise((resolve) => (done = resolve));
  sub.addEventListener("item", (e) => {
    seen.push(e.detail.seq);
    if (seen.length === 3) done();
  });
  for (let i = 1; i <= 3; i++) await client.publish("science", "general", { i });
  await within(5000, "three items", three);
  assert.deepEqual(seen, [1, 2, 3]);
}));

test("subprotocol auth offers both entries; the server echoes arqonbus.bearer", withCleanup(async (_, use) => {
  const gw = use(await startGateway());
  const client = use(new Client({ ...fast, urls: gw.url, token: "abc.def-ghi" }));
  await client.connect();
  assert.deepEqual(gw.attempts[0].protocols, ["arqonbus.bearer", "arqonbus.bearer.abc.def-ghi"]);
  assert.equal(gw.conns[0].ws.protocol, "arqonbus.bearer");
}));

test("first-message auth answers auth_required with the token", withCleanup(async (_, use) => {
  const gw = use(await startGateway({ firstMessageAuth: true }));
  const client = use(new Client({ ...fast, urls: gw.url, token: "secret-token", auth: "first-message" }));
  await client.connect();
  assert.deepEqual(gw.attempts[0].protocols, []);
  assert.equal(gw.conns[0].authToken, "secret-token");
  assert.equal(client.state, "connected");
}));

test("a token that cannot be a subprotocol (dev:...) goes in the first frame", withCleanup(async (_, use) => {
  const gw = use(await startGateway({ firstMessageAuth: true }));
  const client = use(new Client({ ...fast, urls: gw.url, token: "dev:demo:alice" }));
  await client.connect();
  assert.deepEqual(gw.attempts[0].protocols, []);
  assert.equal(gw.conns[0].authToken, "dev:demo:alice");
}));

test("auth subprotocol refuses a token a subprotocol cannot hold, with what to use instead", withCleanup(async (_, use) => {
  assert.throws(
    () => new Client({ ...fast, urls: "ws://127.0.0.1:9/ws", token: "dev:demo:alice", auth: "subprotocol" }),
    (e) => e instanceof TypeError && /"auto" or "first-message"/.test(e.message),
  );
  const gw = use(await startGateway({ firstMessageAuth: true }));
  const client = use(new Client({ ...fast, urls: gw.url, token: () => "dev:demo:alice", auth: "subprotocol" }));
  await assert.rejects(client.connect(), (e) => e instanceof AuthenticationError && /first-message/.test(e.message));
  assert.equal(gw.attempts.length, 0);
}));

test("header auth sends Authorization: Bearer (Node + ws)", withCleanup(async (_, use) => {
  const gw = use(await startGateway());
  const client = use(new Client({ ...fast, urls: gw.url, token: "dev:demo:bob", auth: "header" }));
  await client.connect();
  assert.equal(gw.attempts[0].authorization, "Bearer dev:demo:bob");
}));

test("first-message auth refused (close 4501) is an AuthenticationError", withCleanup(async (_, use) => {
  const gw = use(await startGateway({ firstMessageAuth: true, checkToken: () => false }));
  const client = use(new Client({ ...fast, urls: gw.url, token: "bad", auth: "first-message" }));
  await assert.rejects(client.connect(), (e) => e instanceof AuthenticationError && /4501/.test(e.message));
}));

test("the token function is called before every connection attempt", withCleanup(async (_, use) => {
  const gw = use(await startGateway());
  let calls = 0;
  const client = use(new Client({ ...fast, urls: gw.url, token: async () => `t${++calls}` }));
  await client.connect();
  assert.deepEqual(gw.attempts[0].protocols, ["arqonbus.bearer", "arqonbus.bearer.t1"]);
  const back = nextEvent(client, "state", (d) => d.state === "connected");
  gw.conns[0].ws.close(1012, "server draining");
  await back;
  assert.equal(calls, 2);
  assert.deepEqual(gw.attempts[1].protocols, ["arqonbus.bearer", "arqonbus.bearer.t2"]);
}));

test("reconnects to the next URL and resumes there", withCleanup(async (_, use) => {
  const store = makeStore();
  const a = use(await startGateway({ store }));
  const b = use(await startGateway({ store }));
  const client = use(new Client({ ...fast, urls: [a.url, b.url], token: "tok" }));
  await client.connect();
  assert.equal(client.url, a.url);
  const sub = await client.subscribe("science", "general");
  await client.publish("science", "general", { n: 1 });
  assert.equal((await take(sub, 1))[0].seq, 1);
  const states = [];
  client.addEventListener("state", (e) => states.push(e.detail.state));
  const back = nextEvent(client, "state", (d) => d.state === "connected");
  const rejoin = nextFrame(b, (f) => f.payload?.command === "join_channel", 5000, "the rejoin on b");
  await a.close();
  await back;
  assert.equal(client.url, b.url);
  assert.deepEqual(states, ["resuming", "connected"]);
  const { frame } = await rejoin;
  assert.equal(frame.payload.parameters.since_seq, 1);
}));

test("an unacked publish is resent with the same id after a drop", withCleanup(async (_, use) => {
  let dropped = false;
  const gw = use(
    await startGateway({
      onFrame(conn, frame) {
        if (frame.type === "event" && !dropped) {
          dropped = true;
          conn.ws.close(4001, "slow consumer: reconnect and resume"); // no ack
          return true;
        }
        return false;
      },
    }),
  );
  const client = use(new Client({ ...fast, urls: gw.url, token: "tok" }));
  await client.connect();
  const ack = await client.publish("science", "general", { x: 1 }, { id: "order-7" });
  const events = gw.frames.items.filter((f) => f.frame.type === "event"); // frames not yet taken
  assert.equal(ack.id, "order-7");
  assert.equal(ack.seq, 1);
  assert.equal(gw.conns.length, 2);
  assert.ok(events.every((f) => f.frame.id === "order-7"));
  assert.equal(events.length, 2);
}));

test("resume with since_seq after a drop delivers each event exactly once", withCleanup(async (_, use) => {
  const gw = use(
    await startGateway({
      onFrame(conn, frame) {
        // Replay with an overlap: one event before since_seq comes again (dedupe by seq).
        if (frame.payload?.command === "join_channel" && Number.isInteger(frame.payload.parameters.since_seq)) {
          conn.members.add(`${frame.room}/${frame.channel}`);
          conn.respond(frame, { last_seq: gw.store.seq });
          const since = frame.payload.parameters.since_seq;
          for (const e of gw.store.events) if (e.seq >= since) conn.send({ type: "event", ...e });
          return true;
        }
        return false;
      },
    }),
  );
  const client = use(new Client({ ...fast, urls: gw.url, token: "tok" }));
  await client.connect();
  const sub = await client.subscribe("science", "general");
  for (let i = 1; i <= 3; i++) await client.publish("science", "general", { i });
  assert.deepEqual((await take(sub, 3)).map((x) => x.seq), [1, 2, 3]);
  const rejoined = nextFrame(gw, (f) => f.payload?.command === "join_channel" && f.payload.parameters.since_seq === 3);
  const back = nextEvent(client, "state", (d) => d.state === "connected");
  gw.conns[0].ws.close(1012, "draining");
  await back;
  await rejoined;
  await client.publish("science", "general", { i: 4 });
  const items = await take(sub, 1);
  assert.deepEqual(items.map((x) => x.seq), [4]);
  assert.equal(sub.lastSeq, 4);
}));

test("error frames become typed errors with their fields", withCleanup(async (_, use) => {
  const gw = use(
    await startGateway({
      onFrame(conn, frame) {
        if (frame.type === "event") {
          conn.fail(frame, "forbidden", "missing publish on science/general", { room: "science" });
          return true;
        }
        if (frame.payload?.command === "boom") {
          conn.send({
            type: "command_response",
            id: "r",
            room: frame.room,
            channel: frame.channel,
            payload: { request_id: frame.id, status: "error", error: { code: "pool_exhausted", message: "busy", retryable: true } },
          });
          return true;
        }
        return false;
      },
    }),
  );
  const client = use(new Client({ ...fast, urls: gw.url, token: "tok" }));
  await client.connect();
  await assert.rejects(client.publish("science", "general", { x: 1 }, { id: "p1" }), (e) => {
    assert.ok(e instanceof Forbidden && e instanceof ArqonBusError);
    assert.equal(e.name, "Forbidden");
    assert.equal(e.code, "forbidden");
    assert.equal(e.requestId, "p1");
    assert.equal(e.room, "science");
    assert.equal(e.retryable, false);
    return true;
  });
  await assert.rejects(client.command("svc", "db", "boom", {}), (e) => {
    assert.ok(e instanceof CommandFailed);
    assert.equal(e.code, "pool_exhausted");
    assert.equal(e.retryable, true);
    return true;
  });
}));

test("retryable errors are retried with the same id, after retry_after_ms", withCleanup(async (_, use) => {
  let refused = 0;
  const gw = use(
    await startGateway({
      onFrame(conn, frame) {
        if (frame.type === "event" && refused < 2) {
          refused += 1;
          conn.fail(frame, "rate_limited", "slow down", { retryable: true, retry_after_ms: 50 });
          return true;
        }
        return false;
      },
    }),
  );
  const client = use(new Client({ ...fast, urls: gw.url, token: "tok" }));
  await client.connect();
  const ack = await client.publish("science", "general", { x: 1 }, { id: "same" });
  assert.equal(ack.seq, 1);
  const ids = gw.frames.items.filter((f) => f.frame.type === "event").map((f) => f.frame.id);
  assert.deepEqual(ids, ["same", "same", "same"]);
}));

test("timeouts reject with Timeout; the abort signal rejects with its reason", withCleanup(async (_, use) => {
  const gw = use(await startGateway({ onFrame: (_, frame) => frame.type === "event" || frame.payload?.command === "slow" }));
  const client = use(new Client({ ...fast, urls: gw.url, token: "tok" }));
  await client.connect();
  await assert.rejects(client.publish("science", "general", { x: 1 }, { id: "never", timeoutMs: 150 }), (e) => {
    assert.ok(e instanceof Timeout);
    assert.equal(e.requestId, "never");
    return true;
  });
  await assert.rejects(client.command("svc", "db", "slow", {}, { timeoutMs: 100 }), Timeout);
  const controller = new AbortController();
  const reason = new Error("user gave up");
  const pending = client.publish("science", "general", { x: 2 }, { id: "aborted", signal: controller.signal });
  await nextFrame(gw, (f) => f.id === "aborted");
  controller.abort(reason);
  await assert.rejects(pending, (e) => e === reason);
  const already = AbortSignal.abort(new Error("before"));
  await assert.rejects(client.command("svc", "db", "x", {}, { signal: already }), /before/);
}));

test("an HTTP 429 refusal is waited out (Retry-After)", withCleanup(async (_, use) => {
  const gw = use(
    await startGateway({
      refuse: (_, attempt) =>
        attempt === 1
          ? { status: 429, body: { error: "rate_limited", message: "too many", retry_after_ms: 400 }, headers: { "Retry-After": "1" } }
          : null,
    }),
  );
  const client = use(new Client({ ...fast, urls: gw.url, token: "tok" }));
  await client.connect();
  assert.equal(gw.attempts.length, 2);
  const waited = gw.attempts[1].at - gw.attempts[0].at;
  assert.ok(waited >= 390, `waited only ${waited} ms`);
}));

test("HTTP 401 is an AuthenticationError; refusals until the deadline are ConnectionFailed", withCleanup(async (_, use) => {
  const g401 = use(await startGateway({ refuse: () => ({ status: 401, body: { error: "unauthorized", message: "bad token" } }) }));
  const c1 = use(new Client({ ...fast, urls: g401.url, token: "tok" }));
  await assert.rejects(c1.connect(), (e) => e instanceof AuthenticationError && /bad token/.test(e.message));
  const g503 = use(await startGateway({ refuse: () => ({ status: 503, body: { error: "unavailable", message: "starting" } }) }));
  const c2 = use(new Client({ ...fast, urls: g503.url, token: "tok", connectTimeoutMs: 600 }));
  await assert.rejects(c2.connect(), (e) => {
    assert.ok(e instanceof ConnectionFailed);
    assert.equal(e.refusals[g503.url].status, 503);
    assert.equal(e.refusals[g503.url].code, "unavailable");
    return true;
  });
}));

test("a close in 4500-4999 is fatal: ConnectionRejected, pending calls fail", withCleanup(async (_, use) => {
  const gw = use(await startGateway({ onFrame: (_, frame) => frame.payload?.command === "hang" }));
  const client = use(new Client({ ...fast, urls: gw.url, token: "tok" }));
  await client.connect();
  const sub = await client.subscribe("science", "general");
  const pending = client.publish("science", "general", { x: 1 }, { id: "unsent" }).catch((e) => e);
  const closed = nextEvent(client, "state", (d) => d.state === "closed");
  gw.conns[0].ws.close(4500, "credential revoked");
  const detail = await closed;
  assert.ok(detail.error instanceof ConnectionRejected);
  assert.equal(detail.error.closeCode, 4500);
  assert.equal(gw.attempts.length, 1);
  assert.ok(sub.closed);
  const err = await pending;
  assert.ok(err instanceof ArqonBusError);
  await assert.rejects(client.publish("science", "general", {}), ConnectionRejected);
}));

test("service handlers answer requests and are unregistered by stop()", withCleanup(async (_, use) => {
  const gw = use(await startGateway());
  const client = use(new Client({ ...fast, urls: gw.url, token: "tok" }));
  await client.connect();
  const stop = await client.handle("svc", "db", "echo", async (params, request) => ({ got: params, from: request.from }));
  assert.ok(gw.conns[0].handlers.has("svc/db/echo"));
  gw.conns[0].send({ type: "command", id: "dlv_1", room: "svc", channel: "db", from: "carol", payload: { command: "echo", parameters: { x: 1 }, request_id: "c1", timeout_ms: 1000 } });
  const { frame } = await nextFrame(gw, (f) => f.type === "command_response");
  assert.deepEqual(frame.payload, { request_id: "dlv_1", status: "success", result: { got: { x: 1 }, from: "carol" } });
  await client.handle("svc", "db", "fail", () => {
    throw new CommandFailed("pool_exhausted", "busy", { retryable: true });
  });
  gw.conns[0].send({ type: "command", id: "dlv_2", room: "svc", channel: "db", payload: { command: "fail", parameters: {} } });
  const answer = await nextFrame(gw, (f) => f.type === "command_response");
  assert.deepEqual(answer.frame.payload.error, { code: "pool_exhausted", message: "busy", retryable: true });
  await stop();
  assert.ok(!gw.conns[0].handlers.has("svc/db/echo"));
}));

test("bad arguments are refused with clear errors before anything is sent", withCleanup(async (_, use) => {
  assert.throws(() => new Client({ urls: "http://x", WebSocket }), /not a WebSocket URL/);
  assert.throws(() => new Client({ urls: [], WebSocket }), /no gateway URL/);
  assert.throws(() => new Client({ urls: "ws://127.0.0.1:1/ws", WebSocket, queueSize: 0 }), /queueSize/);
  const gw = use(await startGateway());
  const client = use(new Client({ ...fast, urls: gw.url, token: "tok" }));
  await assert.rejects(client.publish("science", "general", {}), ClientClosed); // not connected yet
  await client.connect();
  await assert.rejects(client.publish("bad room", "general", {}), InvalidName);
  await assert.rejects(client.publish("science", "general", [1]), TypeError);
  await assert.rejects(client.publish("science", "general", { big: "x".repeat(70_000) }), MessageTooLarge);
  await assert.rejects(client.subscribe("science", "general", { sinceSeq: -1 }), /sinceSeq must be an integer >= 0/);
  await assert.rejects(client.subscribe("science", "general", { sinceSeq: 1.5 }), RangeError);
  await assert.rejects(client.subscribe("science", "general", { queueSize: 0 }), /queueSize/);
  await assert.rejects(client.history("science", "general", { limit: 0 }), RangeError);
  await assert.rejects(client.command("science", "general", "join_channel", {}), /built-in/);
  assert.equal(gw.frames.items.filter((f) => f.frame.type !== "command" || f.frame.payload.command !== "register_handler").length, 0);
}));

test("close() rejects pending calls with ClientClosed and ends iterators", withCleanup(async (_, use) => {
  const gw = use(await startGateway({ onFrame: (_, frame) => frame.type === "event" }));
  const client = new Client({ ...fast, urls: gw.url, token: "tok" });
  await client.connect();
  const sub = await client.subscribe("science", "general");
  const it = sub[Symbol.asyncIterator]();
  const next = it.next();
  const pending = client.publish("science", "general", { x: 1 });
  await nextFrame(gw, (f) => f.type === "event");
  await client.close();
  await assert.rejects(pending, ClientClosed);
  assert.deepEqual(await within(2000, "the iterator's end", next), { value: undefined, done: true });
  assert.equal(client.state, "closed");
}));

test("items are taken only while a listener receives them: once, signal and duplicate listeners lose nothing", withCleanup(async (_, use) => {
  const gw = use(await startGateway());
  const client = use(new Client({ ...fast, urls: gw.url, token: "tok" }));
  await client.connect();
  const sub = await client.subscribe("science", "general");
  const first = nextEvent(sub, "item");
  sub.addEventListener("item", () => {}, { once: true }); // fires once, then gone
  const onAbort = new AbortController();
  const counted = () => {};
  sub.addEventListener("item", counted, { signal: onAbort.signal });
  sub.addEventListener("item", counted); // the platform keeps one: one removal removes it
  await client.publish("science", "general", { n: 1 });
  assert.equal((await first).seq, 1);
  onAbort.abort();
  sub.removeEventListener("item", counted);
  for (let n = 2; n <= 4; n++) await client.publish("science", "general", { n });
  // Nobody listened to 2-4: they wait in the queue for the iterator, in order.
  assert.deepEqual((await take(sub, 3)).map((item) => item.seq), [2, 3, 4]);
}));

test("a rate-limit slot is taken only by a call that waits for it: a later call waits, it does not fail", withCleanup(async (_, use) => {
  let refuseAll = true;
  const refused = new Set();
  const gw = use(
    await startGateway({
      onFrame: (conn, frame) => {
        if (frame.type !== "event" || (!refuseAll && refused.has(frame.id))) return false;
        refused.add(frame.id);
        conn.send({ type: "error", payload: { request_id: frame.id, code: "rate_limited", message: "slow down", retryable: true, retry_after_ms: 100 } });
        return true;
      },
    }),
  );
  const client = use(new Client({ ...fast, urls: gw.url, token: "tok" }));
  await client.connect();
  // 50 calls with 300 ms each: a few fit the queue of 100 ms slots, the others give up at once.
  const burst = await Promise.allSettled(
    Array.from({ length: 50 }, (_, i) => client.publish("a", "b", { i }, { id: `burst-${i}`, timeoutMs: 300 })),
  );
  assert.ok(burst.some((r) => r.status === "rejected"), "no call gave up: the test needs a full queue");
  refuseAll = false;
  const started = performance.now();
  const ack = await client.publish("a", "b", { late: true }, { id: "late", timeoutMs: 5000 });
  assert.equal(ack.id, "late");
  assert.ok(performance.now() - started >= 100, "resent before retry_after_ms");
  assert.ok(performance.now() - started < 2000, `waited ${performance.now() - started} ms behind slots nobody used`);
}));

test("a silent connection is pinged, then taken for dead: the client reconnects and resumes", withCleanup(async (_, use) => {
  const gw = use(await startGateway());
  const client = use(new Client({ ...fast, urls: gw.url, token: "tok", keepaliveMs: 200 }));
  await client.connect();
  const sub = await client.subscribe("a", "b");
  await client.publish("a", "b", { n: 1 });
  assert.equal((await take(sub, 1))[0].seq, 1);
  // The gateway goes silent (a half-open connection): it reads nothing and sends nothing.
  const silent = gw.conns[0];
  silent.ws.send = () => {};
  silent.ws._socket.pause();
  const ping = await nextFrame(gw, (f, conn) => conn === silent && f.payload?.command === "ping", 5000, "a ping").catch(() => null);
  assert.equal(await gw.connections.next(1000, "the first connection"), silent);
  const resumed = await gw.connections.next(5000, "a second connection");
  assert.notEqual(resumed, silent);
  await within(5000, "connected again", client.state === "connected" ? Promise.resolve() : nextEvent(client, "state", (d) => d.state === "connected"));
  const other = use(new Client({ ...fast, urls: gw.url, token: "tok2" }));
  await other.connect();
  await other.publish("a", "b", { n: 2 });
  assert.equal((await take(sub, 1))[0].seq, 2);
  // The ping went out on the silent socket (paused: the gateway may not have read it).
  assert.ok(ping === null || ping.frame.room === "_system");
}));

test("a token function that never answers: connect() fails within connectTimeoutMs, close() ends it at once", withCleanup(async (_, use) => {
  const gw = use(await startGateway());
  const hanging = () => new Promise(() => {});
  const timedOut = use(new Client({ ...fast, urls: gw.url, token: hanging, connectTimeoutMs: 600 }));
  await assert.rejects(within(3000, "connect", timedOut.connect()), (e) => e instanceof ConnectionFailed && /did not answer/.test(e.message));
  const closed = new Client({ ...fast, urls: gw.url, token: hanging, connectTimeoutMs: 60_000 });
  const connecting = closed.connect();
  await closed.close();
  await assert.rejects(within(1000, "connect after close", connecting), (e) => e instanceof ClientClosed);
  assert.equal(gw.attempts.length, 0);
}));

test("auth auto: first-message where the WebSocket hides handshake refusals (browsers), a subprotocol with ws", withCleanup(async (_, use) => {
  const gw = use(await startGateway({ firstMessageAuth: true }));
  // Only the platform's WebSocket API (browsers, Node 22+): no ws events, no refusal details.
  class PlatformLike {
    constructor(url, protocols) {
      this.ws = new WebSocket(url, protocols);
    }
    get readyState() {
      return this.ws.readyState;
    }
    get binaryType() {
      return this.ws.binaryType;
    }
    set binaryType(value) {
      this.ws.binaryType = value;
    }
    send(data) {
      this.ws.send(data);
    }
    close(code, reason) {
      this.ws.close(code, reason);
    }
    addEventListener(type, listener, options) {
      this.ws.addEventListener(type, listener, options);
    }
    removeEventListener(type, listener) {
      this.ws.removeEventListener(type, listener);
    }
  }
  const browser = use(new Client({ ...fast, urls: gw.url, token: "abc.def", WebSocket: PlatformLike }));
  await browser.connect();
  assert.deepEqual(gw.attempts[0].protocols, []);
  assert.equal(gw.conns[0].authToken, "abc.def");
  const node = use(new Client({ ...fast, urls: gw.url, token: "abc.def" }));
  await node.connect();
  assert.deepEqual(gw.attempts[1].protocols, ["arqonbus.bearer", "arqonbus.bearer.abc.def"]);
}));
