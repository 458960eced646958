// Idempotent publishes, typed errors, first-message auth and presence, on a real mesh.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import * as sdk from "../../dist/index.js";
import { collect, closeAll, frameTail, nextEvent, rawCommand, rejection, spyWebSocket, unique, within } from "./helpers.js";
import { startMesh } from "./mesh.js";

const { Client } = sdk;
const AuthClass = sdk.AuthenticationFailed ?? sdk.AuthenticationError;

let mesh;
const tenant = unique("basics");
const opened = [];

before(async () => {
  mesh = await startMesh();
});
after(async () => {
  await closeAll(...opened);
  await mesh?.stop();
});

/** A client of this file's tenant (closed in `after`); `spy` records its frames. */
function client(principal, { urls, spy = spyWebSocket(), ...options } = {}) {
  const c = new Client({
    urls: urls ?? mesh.urls,
    token: `dev:${tenant}:${principal}`,
    WebSocket: spy.WebSocket,
    maxBackoffMs: 500,
    ...options,
  });
  c.spy = spy;
  opened.push(c);
  return c;
}

/** Every stored event of the channel (history from seq 0, all pages). */
async function stored(c, room, channel) {
  const events = [];
  for await (const event of c.historyAll(room, channel, { sinceSeq: 0 })) {
    events.push(event);
    if (events.length > 10_000) assert.fail("historyAll does not end");
  }
  return events;
}

function assertErrorClass(error, cls, code, what) {
  assert.ok(cls, `${what}: the SDK exports no class for ${code}`);
  assert.ok(
    error instanceof cls,
    `${what}: expected ${cls.name}, got ${error?.constructor?.name}: ${error?.message} (code ${error?.code})`,
  );
  assert.ok(error instanceof sdk.ArqonBusError, `${what}: not an ArqonBusError`);
  assert.equal(error.code, code, `${what}: code`);
  assert.equal(typeof error.message, "string");
  assert.ok(error.message.length > 0, `${what}: empty message`);
}

describe("publish idempotency", () => {
  test("a retry with the same id is stored once and acked as a duplicate with the same seq", async () => {
    const c = client("alice");
    await within(20_000, "connect", c.connect());
    const room = "idem";
    const channel = unique("seq");
    const first = await c.publish(room, channel, { n: 1 }, { id: "evt-1" });
    assert.equal(first.id, "evt-1");
    assert.equal(first.duplicate, false);
    assert.ok(Number.isInteger(first.seq) && first.seq > 0, `seq ${first.seq}`);
    const again = await c.publish(room, channel, { n: "other payload" }, { id: "evt-1" });
    assert.deepEqual([again.id, again.seq, again.duplicate], ["evt-1", first.seq, true], JSON.stringify(again));

    const events = await stored(c, room, channel);
    assert.deepEqual(
      events.map((e) => [e.id, e.seq, e.payload]),
      [["evt-1", first.seq, { n: 1 }]],
    );
  });

  test("publishMany: one events frame, every event acked in the list's order; the same ids again are duplicates", async () => {
    const c = client("batcher");
    await within(20_000, "connect", c.connect());
    const room = "idem";
    const channel = unique("many");
    const before = await c.publish(room, channel, { n: -1 }, { id: "many-1" });
    const ids = Array.from({ length: 120 }, (_, i) => `many-${i}`);
    const payloads = ids.map((_, i) => ({ n: i }));
    const acks = await c.publishMany(room, channel, payloads, { ids });
    assert.deepEqual(acks.map((a) => a.id), ids);
    assert.deepEqual([acks[1].seq, acks[1].duplicate], [before.seq, true], "many-1 was stored before");
    const fresh = acks.filter((_, i) => i !== 1).map((a) => a.seq);
    assert.ok(fresh.every((seq, i) => i === 0 || seq > fresh[i - 1]) && fresh[0] > before.seq, `seqs ${fresh}`);
    const frames = c.spy.log.frames.filter((f) => f.dir === "out" && f.json?.type === "events");
    assert.equal(frames.length, 1, "one events frame");
    const again = await c.publishMany(room, channel, payloads, { ids });
    assert.deepEqual(again.map((a) => [a.id, a.seq, a.duplicate]), acks.map((a) => [a.id, a.seq, true]));
    const events = await stored(c, room, channel);
    assert.deepEqual(events.map((e) => e.id), ["many-1", ...ids.filter((id) => id !== "many-1")]);
    await assert.rejects(c.publishMany(room, channel, []), RangeError);
    await assert.rejects(c.publishMany(room, channel, [{}, {}], { ids: ["x", "x"] }), RangeError);
  });

  test("the same id published concurrently (one client, and two clients of one principal) is stored once", async () => {
    const c1 = client("bob", { urls: [mesh.urls[0]] });
    const c2 = client("bob", { urls: [mesh.urls[1]] });
    await within(20_000, "connect", Promise.all([c1.connect(), c2.connect()]));
    const room = "idem";
    const channel = unique("conc");

    // One client, twice at once: both calls end with the one seq, or the second is refused
    // at once as already pending (the Python SDK's choice); never a second stored event.
    const outcomes = await within(
      20_000,
      "two concurrent publishes",
      Promise.allSettled([
        c1.publish(room, channel, { k: "a" }, { id: "same-1" }),
        c1.publish(room, channel, { k: "b" }, { id: "same-1" }),
      ]),
    );
    const acked = outcomes.filter((o) => o.status === "fulfilled").map((o) => o.value);
    assert.ok(acked.length >= 1, `no ack: ${outcomes.map((o) => o.reason)}`);
    assert.equal(new Set(acked.map((a) => a.seq)).size, 1, `two seqs for one id: ${JSON.stringify(acked)}`);
    assert.ok(acked.every((a) => a.id === "same-1"));
    if (acked.length === 2) {
      assert.equal(acked.filter((a) => !a.duplicate).length <= 1, true, `both acks claim the first store: ${JSON.stringify(acked)}`);
    }
    console.log(`same id twice at once on one client: ${outcomes.map((o) => (o.status === "fulfilled" ? JSON.stringify(o.value) : `rejected ${o.reason}`)).join("; ")}`);

    // Two clients of the same principal, on two gateways, at once: the store dedupes.
    const [x, y] = await within(
      20_000,
      "concurrent publishes from two gateways",
      Promise.all([
        c1.publish(room, channel, { from: "gw0" }, { id: "same-2" }),
        c2.publish(room, channel, { from: "gw1" }, { id: "same-2" }),
      ]),
    );
    assert.equal(x.seq, y.seq, `one id, two seqs: ${JSON.stringify([x, y])}`);
    assert.deepEqual([x.duplicate, y.duplicate].sort(), [false, true], `exactly one is the duplicate: ${JSON.stringify([x, y])}`);

    const events = await stored(c1, room, channel);
    assert.deepEqual(events.map((e) => e.id).sort(), ["same-1", "same-2"]);
    assert.equal(events.find((e) => e.id === "same-1").seq, acked[0].seq);
    assert.equal(events.find((e) => e.id === "same-2").seq, x.seq);
  });
});

describe("typed errors", () => {
  test("a publish to an invalid room name is refused before anything is sent", async () => {
    const c = client("carol");
    await within(20_000, "connect", c.connect());
    const error = await rejection(
      Promise.resolve().then(() => c.publish("bad.room", "general", { x: 1 }, { id: "bad-1" })),
      10_000,
      "publish to bad.room",
    );
    const isInvalidName = error instanceof sdk.InvalidName;
    const isMisuse = error instanceof TypeError || error instanceof RangeError;
    assert.ok(isInvalidName || isMisuse, `expected InvalidName (or TypeError/RangeError), got ${error?.constructor?.name}: ${error?.message}`);
    if (isInvalidName) assert.equal(error.code, "invalid_name");
    assert.match(error.message, /bad\.room/, "the message names the bad room");
    const sent = c.spy.log.frames.filter((f) => f.dir === "out" && f.text.includes("bad.room"));
    assert.deepEqual(sent.map((f) => f.text), [], "the invalid publish went to the gateway");
  });

  test("a publish the role forbids gets Forbidden with code, message, retryable and requestId", async () => {
    const owner = client("dan");
    const reader = new Client({
      urls: mesh.urls,
      token: `dev:${tenant}:erin:read-only`,
      WebSocket: spyWebSocket().WebSocket,
    });
    opened.push(reader);
    await within(20_000, "connect", Promise.all([owner.connect(), reader.connect()]));
    const channel = unique("ro");
    const sub = await reader.subscribe("roles", channel); // subscribe is allowed to read-only
    const error = await rejection(reader.publish("roles", channel, { x: 1 }, { id: "ro-1" }), 15_000, "read-only publish");
    assertErrorClass(error, sdk.Forbidden, "forbidden", "read-only publish");
    assert.equal(error.retryable, false);
    assert.equal(error.requestId, "ro-1");
    await sub.close();
  });

  test("a service command nobody handles gets NoResponders (retryable, with requestId)", async () => {
    const c = client("frank");
    await within(20_000, "connect", c.connect());
    const channel = unique("svc");
    const error = await rejection(c.command("svc", channel, "resize", { w: 10 }, { timeoutMs: 10_000 }), 15_000, "command resize");
    assertErrorClass(error, sdk.NoResponders, "no_responders", "unhandled command");
    assert.equal(error.retryable, true);
    const sent = c.spy.log.frames.find(
      (f) => f.dir === "out" && f.json?.type === "command" && f.json.payload?.command === "resize",
    );
    assert.ok(sent, `no command frame sent:\n${frameTail(c.spy.log)}`);
    assert.equal(error.requestId, sent.json.id, "requestId is the command's id");
    const answer = c.spy.log.frames.find((f) => f.dir === "in" && f.json?.payload?.request_id === sent.json.id);
    assert.equal(answer?.json.payload.error.code, "no_responders", "the gateway's answer");
  });

  test("Timeout: a publish with a tiny timeoutMs (then the same id stores once), a command whose handler never answers", async () => {
    const caller = client("gina");
    const worker = client("hank");
    await within(20_000, "connect", Promise.all([caller.connect(), worker.connect()]));
    const channel = unique("slow");

    // A store ack takes a round trip through a 3-node quorum: 1 ms is too short for it. Up to
    // five tries, so one early ack cannot fail the test; a wrong error class does.
    let timedOut = null;
    for (let i = 0; i < 5 && !timedOut; i++) {
      const id = `tiny-${i}`;
      const outcome = await within(
        10_000,
        "publish with timeoutMs 1",
        caller.publish("svc", channel, { i }, { id, timeoutMs: 1 }).then(
          (ack) => ({ ack }),
          (error) => ({ error }),
        ),
      );
      if (outcome.error) {
        assertErrorClass(outcome.error, sdk.Timeout, "timeout", "publish with timeoutMs 1");
        assert.equal(outcome.error.retryable, true);
        assert.equal(outcome.error.requestId, id);
        timedOut = id;
      }
    }
    assert.ok(timedOut, "five publishes with timeoutMs 1 were all acked in time");
    // Publishing again with the same id settles it: stored once.
    const ack = await caller.publish("svc", channel, { again: true }, { id: timedOut });
    assert.equal(ack.id, timedOut);
    const events = await stored(caller, "svc", channel);
    assert.equal(events.filter((e) => e.id === timedOut).length, 1, `history: ${JSON.stringify(events.map((e) => e.id))}`);
    assert.equal(events.find((e) => e.id === timedOut).seq, ack.seq);

    let called = 0;
    const stop = await worker.handle("svc", channel, "hang", () => {
      called += 1;
      return new Promise(() => {}); // never answers
    });
    const hung = await rejection(caller.command("svc", channel, "hang", {}, { timeoutMs: 500 }), 15_000, "hung handler");
    assertErrorClass(hung, sdk.Timeout, "timeout", "hung handler");
    assert.equal(hung.retryable, true);
    assert.equal(typeof hung.requestId, "string");
    assert.equal(called, 1, "the handler was called once");
    if (typeof stop === "function") await stop();
  });

  test("a private room: Forbidden without a key (keyless room), RoomKeyRequired without its key, joined with it", async () => {
    const admin = `dev:${tenant}:root`; // no role: an owner of the tenant
    const keyless = unique("vault");
    const keyed = unique("club");
    const configured = await rawCommand(mesh.urls[0], admin, keyless, "general", "room_configure", { private: true });
    assert.equal(configured.status, "success", JSON.stringify(configured));
    const withKey = await rawCommand(mesh.urls[0], admin, keyed, "general", "room_configure", { private: true, key: "s3cret-key-42" });
    assert.equal(withKey.status, "success", JSON.stringify(withKey));

    const member = new Client({ urls: mesh.urls, token: `dev:${tenant}:ivan:member`, WebSocket: spyWebSocket().WebSocket });
    opened.push(member);
    await within(20_000, "connect", member.connect());
    const forbidden = await rejection(member.subscribe(keyless, "general"), 15_000, "join a keyless private room");
    assertErrorClass(forbidden, sdk.Forbidden, "forbidden", "keyless private room");
    assert.equal(forbidden.retryable, false);
    assert.equal(typeof forbidden.requestId, "string");

    const keyRequired = await rejection(member.subscribe(keyed, "general"), 15_000, "join a keyed private room without key");
    assertErrorClass(keyRequired, sdk.RoomKeyRequired, "room_key_required", "private room without key");
    const sub = await within(15_000, "join with the key", member.subscribe(keyed, "general", { roomKey: "s3cret-key-42" }));
    await sub.close();
  });
});

describe("first-message auth", () => {
  test("a client with auth: first-message connects and publishes; the token is not in the handshake", async () => {
    const c = client("judy", { auth: "first-message", urls: [mesh.urls[1]] });
    await within(20_000, "connect", c.connect());
    assert.equal(c.state, "connected");
    assert.match(String(c.welcome?.session_id), /^[0-9a-f]{32}$/, `welcome: ${JSON.stringify(c.welcome)}`);
    const [socket] = c.spy.log.sockets;
    assert.ok(!socket.url.includes("token="), `token in the URL: ${socket.url}`);
    assert.ok(!JSON.stringify(socket.protocols ?? null).includes("dev:"), `token in the subprotocols: ${JSON.stringify(socket.protocols)}`);
    const ins = c.spy.log.frames.filter((f) => f.dir === "in");
    const outs = c.spy.log.frames.filter((f) => f.dir === "out");
    assert.equal(ins[0]?.json?.type, "auth_required");
    assert.equal(outs[0]?.json?.type, "auth", "the first frame sent is the auth frame");
    assert.equal(outs[0]?.json?.payload?.token, `dev:${tenant}:judy`);
    const channel = unique("ch");
    const ack = await c.publish("fm", channel, { hello: true }, { id: "fm-1" });
    assert.ok(ack.seq > 0 && ack.duplicate === false, JSON.stringify(ack));
    // The gateway took the principal from the auth frame's token.
    const [event] = await stored(c, "fm", channel);
    assert.deepEqual([event.id, event.seq, event.from], ["fm-1", ack.seq, "judy"]);
  });

  test("a refused token is a typed auth error, at once, without reconnecting (first-message, auto, header, subprotocol)", async () => {
    const unknownRole = `dev:${tenant}:kim:emperor`; // an unknown role: refused
    // A subprotocol cannot hold a dev token's ':': an API key, of a method this mesh refuses.
    const apiKey = `arqk_abcdefghijkl_${"A".repeat(43)}`;
    const cases = [
      ["first-message", unknownRole, /role/],
      ["auto", unknownRole, /role/],
      ["header", unknownRole, /role/],
      ["subprotocol", apiKey, /malformed token/],
    ];
    for (const [auth, token, reason] of cases) {
      const spy = spyWebSocket();
      const c = new Client({
        urls: [mesh.urls[0]],
        token,
        auth,
        WebSocket: spy.WebSocket,
        maxBackoffMs: 200,
        connectTimeoutMs: 30_000,
      });
      opened.push(c);
      const started = Date.now();
      const error = await rejection(c.connect(), 20_000, `connect with a refused token (${auth})`);
      assert.ok(AuthClass, "the SDK exports neither AuthenticationFailed nor AuthenticationError");
      assert.ok(
        error instanceof AuthClass,
        `${auth}: expected ${AuthClass.name}, got ${error?.constructor?.name}: ${error?.message}\n${frameTail(spy.log)}`,
      );
      assert.equal(error.retryable, false, `${auth}: retryable`);
      assert.match(error.message, reason, `${auth}: the message gives the gateway's reason`);
      assert.ok(Date.now() - started < 15_000, `${auth}: took ${Date.now() - started} ms (retried until the connect timeout?)`);
      assert.equal(spy.log.sockets.length, 1, `${auth}: ${spy.log.sockets.length} connection attempts for a refused token`);
      assert.ok(!["connecting", "resuming", "connected"].includes(c.state), `${auth}: state ${c.state} after a fatal refusal`);
      if (auth === "first-message" || auth === "auto") assert.equal(spy.log.sockets[0].closed?.code, 4501);
      // A later call fails at once with the fatal error, without a new connection.
      await rejection(c.publish("fm", "x", {}, { id: "after" }), 5_000, `publish after the refusal (${auth})`);
      assert.equal(spy.log.sockets.length, 1, `${auth}: a call after the refusal opened a connection`);
    }
  });
});

describe("presence", () => {
  test("two clients subscribed with presence see each other in members, and in presence()/occupancy()", async () => {
    const room = "hall";
    const channel = unique("p");
    const a = client("lena", { urls: [mesh.urls[0]] });
    const b = client("mona", { urls: [mesh.urls[1]] });
    await within(20_000, "connect", Promise.all([a.connect(), b.connect()]));
    const subA = await a.subscribe(room, channel, { presence: true, trackMembers: true });
    const subB = await b.subscribe(room, channel, { presence: true, trackMembers: true });
    const both = (sub) => sub.members instanceof Map && sub.members.has("lena") && sub.members.has("mona");
    await Promise.all(
      [subA, subB].map((sub, i) =>
        both(sub) ? null : nextEvent(sub, "members", () => both(sub), 20_000, `members of ${i ? "mona" : "lena"} to hold both`),
      ),
    );
    for (const sub of [subA, subB]) {
      assert.deepEqual([...sub.members.keys()].sort(), ["lena", "mona"]);
      assert.equal(sub.members.get("lena").principal, "lena");
    }
    const members = await a.presence(room, channel);
    const list = Array.isArray(members) ? members : members?.members; // Member[] (a page's members)
    assert.ok(Array.isArray(list), `presence(): ${JSON.stringify(members)}`);
    assert.deepEqual(list.map((m) => m.principal).sort(), ["lena", "mona"]);
    const counts = await b.occupancy(room, channel);
    assert.equal(counts.members, 2, JSON.stringify(counts));

    // mona leaves: lena's member list drops her.
    const gone = subA.members.has("mona")
      ? nextEvent(subA, "members", () => !subA.members.has("mona"), 20_000, "mona to leave lena's members")
      : null;
    await subB.close();
    await gone;
    assert.deepEqual([...subA.members.keys()], ["lena"]);
    await subA.close();
  });
});
