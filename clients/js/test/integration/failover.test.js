// kill -9 of a gateway under load, on a real mesh: subscribers resume on the other gateway and
// see every acked event exactly once, in seq order; a publisher on the killed gateway resends
// its unacked events with the same ids and each is stored once.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Client } from "../../dist/index.js";
import { collect, closeAll, frameTail, recordStates, spyWebSocket, unique, untilFrames, within } from "./helpers.js";
import { startMesh, waitGone } from "./mesh.js";

let mesh;
before(async () => {
  mesh = await startMesh();
});
after(async () => {
  await mesh?.stop();
});

/** Every event item is in strictly increasing seq order and none is a gap. */
function assertOrderedEvents(items, who) {
  for (const [i, item] of items.entries()) {
    assert.equal(item.type, "event", `${who}: item ${i} is not an event: ${JSON.stringify(item)}`);
    if (i > 0) {
      assert.ok(
        item.seq > items[i - 1].seq,
        `${who}: item ${i} has seq ${item.seq} after ${items[i - 1].seq} (out of order or duplicated)`,
      );
    }
  }
}

/** `items` hold exactly the acked events: each acked id once, with its acked seq. */
function assertExactlyAcked(items, acks, who) {
  const seen = new Map();
  for (const item of items) {
    assert.ok(!seen.has(item.id), `${who}: id ${item.id} delivered twice (seqs ${seen.get(item.id)}, ${item.seq})`);
    seen.set(item.id, item.seq);
  }
  const missing = [...acks.keys()].filter((id) => !seen.has(id));
  assert.deepEqual(missing, [], `${who}: ${missing.length} acked events never delivered`);
  const extra = [...seen.keys()].filter((id) => !acks.has(id));
  assert.deepEqual(extra, [], `${who}: delivered events nobody saw acked`);
  for (const [id, ack] of acks) {
    assert.equal(seen.get(id), ack.seq, `${who}: ${id} delivered with seq ${seen.get(id)}, acked with ${ack.seq}`);
  }
}

test("kill -9 of a gateway under load: resume elsewhere, every acked event exactly once, in order", { timeout: 150_000 }, async () => {
  const [gw0, gw1] = mesh.urls;
  const tenant = unique("failover");
  const room = "lobby";
  const channel = unique("load");
  const N = 400;
  const KILL_AFTER = 100;
  const spyA = spyWebSocket();
  const spyQ = spyWebSocket();
  const make = (urls, principal, WebSocket) =>
    new Client({ urls, token: `dev:${tenant}:${principal}`, WebSocket, maxBackoffMs: 500, requestTimeoutMs: 60_000 });
  const subA = make([gw0, gw1], "alice", spyA.WebSocket); // starts on gw0, which dies
  const subB = make([gw1], "bob", spyWebSocket().WebSocket);
  const pub = make([gw1], "sensor", spyWebSocket().WebSocket);
  const pubOnDoomed = make([gw0, gw1], "sensor0", spyQ.WebSocket); // starts on gw0 too
  const statesA = recordStates(subA);
  const statesQ = recordStates(pubOnDoomed);
  try {
    await within(30_000, "connects", Promise.all([subA, subB, pub, pubOnDoomed].map((c) => c.connect())));
    assert.equal(subA.url, gw0);
    assert.equal(pubOnDoomed.url, gw0);
    assert.equal(subA.state, "connected");
    const itemsA = collect(await subA.subscribe(room, channel));
    const itemsB = collect(await subB.subscribe(room, channel));

    // The publisher on the doomed gateway keeps WINDOW publishes in flight until told to stop.
    const WINDOW = 20;
    const acksQ = new Map();
    const startedQ = new Set();
    let stopQ = false;
    let firstAckQ;
    const firstQ = new Promise((resolve) => (firstAckQ = resolve));
    const workersQ = Array.from({ length: WINDOW }, async (_, w) => {
      for (let i = 0; !stopQ && i < 2000; i++) {
        const id = `q-${w}-${i}`;
        startedQ.add(id);
        const ack = await pubOnDoomed.publish(room, channel, { w, i }, { id, timeoutMs: 60_000 });
        acksQ.set(id, ack);
        firstAckQ();
      }
    });
    workersQ.forEach((w) => w.catch(() => {})); // awaited below; no unhandled rejection meanwhile

    // Publishes of the gw0 publisher sent on a socket to gw0 whose ack has not been read.
    const unackedOnGw0 = () => {
      const acked = new Set(
        spyQ.log.frames.filter((f) => f.dir === "in" && f.json?.type === "ack").map((f) => f.json.payload.request_id),
      );
      const onGw0 = spyQ.log.frames.filter(
        (f) => f.dir === "out" && f.json?.type === "event" && spyQ.log.sockets[f.socket].url === gw0,
      );
      return [...new Set(onGw0.map((f) => f.json.id))].filter((id) => !acked.has(id));
    };

    const acksP = new Map();
    const ackList = [];
    let unackedQAtKill = [];
    let killedPid = null;
    let killedAt = 0;
    try {
      for (let i = 0; i < N; i++) {
        const id = `p-${i}`;
        const ack = await pub.publish(room, channel, { i }, { id, timeoutMs: 60_000 });
        assert.equal(ack.id, id);
        assert.equal(ack.duplicate, false, `p-${i} acked as a duplicate: ${JSON.stringify(ack)}`);
        acksP.set(id, ack);
        ackList.push(ack);
        if (i === KILL_AFTER - 1) {
          // A has delivered from gw0 before the kill, so its resume starts past seq 0.
          await itemsA.waitFor((items) => items.some((it) => it.seq >= ackList[50].seq), 20_000, "A's items before the kill");
          // Its first publish may wait on the store longer than 100 of the other's: wait for it.
          await within(20_000, "the publisher on gw0's first ack", firstQ).catch(() => {});
          assert.ok(acksQ.size > 0, "the publisher on gw0 got no ack before the kill");
          killedPid = mesh.gatewayPids[0];
          // Stopped first, so the kill finds publishes in flight on gw0 for certain: a
          // stopped gateway acks nothing more, and each worker's next publish (after an ack
          // it had already written) goes to gw0 too. Killed once all WINDOW are stuck there.
          process.kill(killedPid, "SIGSTOP");
          await untilFrames(spyQ.log, () => unackedOnGw0().length === WINDOW, 20_000,
            `all ${WINDOW} publishes of the gw0 publisher in flight on the stopped gw0`);
          killedAt = Date.now();
          const statesBefore = statesQ.length;
          process.kill(killedPid, "SIGKILL");
          // Counted once the client has seen its gw0 socket end: acks gw0 wrote before it was
          // stopped may still be on their way until then, and those events need no resend.
          await statesQ.waitFor((states) => states.slice(statesBefore).some((s) => s.state !== "connected"), 20_000,
            "the gw0 publisher to see its connection end");
          unackedQAtKill = unackedOnGw0();
        }
      }
    } finally {
      stopQ = true;
    }
    await within(90_000, "the publisher on the killed gateway to finish", Promise.all(workersQ));
    await waitGone(killedPid, 10_000);

    // Every publish of pubOnDoomed ended acked; those in flight at the kill are among them.
    assert.ok(unackedQAtKill.length > 0, "no publish of the gw0 publisher was in flight at the kill");
    for (const id of unackedQAtKill) {
      assert.ok(acksQ.has(id), `in flight at the kill, never acked: ${id}`);
      assert.equal(acksQ.get(id).id, id);
    }
    assert.equal(pubOnDoomed.url, gw1);
    // Resent with the same id on the new connection: sent on a socket to gw0 and then on one to gw1.
    const socketsOf = (id) =>
      new Set(
        spyQ.log.frames
          .filter((f) => f.dir === "out" && f.json?.type === "event" && f.json.id === id)
          .map((f) => spyQ.log.sockets[f.socket].url),
      );
    const resent = unackedQAtKill.filter((id) => {
      const urls = socketsOf(id);
      return urls.has(gw0) && urls.has(gw1);
    });
    assert.ok(resent.length > 0, `no unacked publish was resent on gw1 with the same id:\n${frameTail(spyQ.log)}`);
    // Every event sent to gw0 whose ack did not come back from gw0 was resent to gw1 (an ack
    // already on its way when gw0 died is still read, and that event needs no resend).
    const ackedOn = new Map(
      spyQ.log.frames
        .filter((f) => f.dir === "in" && f.json?.type === "ack")
        .map((f) => [f.json.payload.request_id, spyQ.log.sockets[f.socket].url]),
    );
    for (const id of unackedQAtKill) {
      const urls = socketsOf(id);
      if (urls.has(gw0) && ackedOn.get(id) === gw0) continue;
      assert.ok(urls.has(gw1), `${id} (unacked at the kill, sent to ${[...urls]}) was never sent to gw1`);
      assert.equal(ackedOn.get(id), gw1, `${id}: ack read from ${ackedOn.get(id)}`);
    }
    const sentIds = spyQ.log.frames.filter((f) => f.dir === "out" && f.json?.type === "event").map((f) => f.json.id);
    assert.ok(sentIds.every((id) => startedQ.has(id)), "an event frame of the gw0 publisher has an id it was never given");

    // Both subscribers: every acked event exactly once, in seq order.
    const allAcks = new Map([...acksP, ...acksQ]);
    const maxSeq = Math.max(...[...allAcks.values()].map((a) => a.seq));
    await itemsA.waitFor((items) => items.some((it) => it.seq >= maxSeq), 60_000, `A up to seq ${maxSeq}`);
    await itemsB.waitFor((items) => items.some((it) => it.seq >= maxSeq), 60_000, `B up to seq ${maxSeq}`);
    assertOrderedEvents(itemsA.items, "A");
    assertOrderedEvents(itemsB.items, "B");
    assertExactlyAcked(itemsA.items, allAcks, "A");
    assertExactlyAcked(itemsB.items, allAcks, "B");

    // A went resuming → connected on gw1.
    const names = statesA.map((s) => s.state);
    const resuming = names.indexOf("resuming");
    assert.ok(resuming > 0, `A never went through "resuming": ${names.join(" → ")}`);
    const reconnected = statesA.findIndex((s, i) => i > resuming && s.state === "connected");
    assert.ok(reconnected > resuming, `A did not get "connected" after "resuming": ${names.join(" → ")}`);
    assert.equal(statesA[reconnected].url, gw1, "A's reconnect went elsewhere than gw1");
    const resumedIn = statesA[reconnected].at - killedAt;
    assert.ok(resumedIn < 10_000, `A reconnected ${resumedIn} ms after the kill (maxBackoffMs 500)`);
    assert.equal(subA.url, gw1);
    assert.equal(subA.state, "connected");
    assert.ok(statesQ.some((s) => s.state === "resuming"), `the gw0 publisher never resumed: ${statesQ.map((s) => s.state)}`);

    // The store holds each id once, with its acked seq (history through the survivor).
    const stored = new Map();
    let pages = 0;
    for await (const event of subB.historyAll(room, channel, { sinceSeq: 0 })) {
      assert.ok(!stored.has(event.id), `history holds ${event.id} twice (seqs ${stored.get(event.id)}, ${event.seq})`);
      stored.set(event.id, event.seq);
      if (++pages > 10 * allAcks.size) assert.fail("historyAll does not end");
    }
    assert.equal(stored.size, allAcks.size, "history and acks differ in size");
    for (const [id, ack] of allAcks) assert.equal(stored.get(id), ack.seq, `history seq of ${id}`);
    const duplicates = [...acksQ.values()].filter((a) => a.duplicate).length;
    console.log(
      `kill -9: ${acksP.size} + ${acksQ.size} acked, ${unackedQAtKill.length} in flight at the kill ` +
        `(${resent.length} resent, ${duplicates} acked as duplicates); A: ${names.join(" → ")}, on gw1 ${resumedIn} ms after the kill`,
    );
  } finally {
    await closeAll(subA, subB, pub, pubOnDoomed);
  }
});
