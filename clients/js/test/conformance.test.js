// Runs every conformance fixture of clients/conformance/ against the sans-I/O core, with the
// semantics of tests/sdk/test_conformance.py (the Python runner).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { ClientProtocol, SubscriptionState } from "../dist/protocol.js";

const here = dirname(fileURLToPath(import.meta.url));
const dir = join(here, "..", "..", "conformance");
const FIXTURES = readdirSync(dir).filter((f) => f.endsWith(".json")).sort();

function errorJson(error) {
  if (error === null || error === undefined) return null;
  return {
    class: error.name,
    code: error.code,
    message: error.message,
    retryable: error.retryable,
    retry_after_ms: error.retryAfterMs,
    request_id: error.requestId,
    room: error.room,
    channels: [...error.channels],
    event_index: error.eventIndex,
    event_id: error.eventId,
  };
}

function itemJson(item) {
  if (item && item.type === "event") {
    const { room, channel, id, seq, payload } = item;
    return { type: "event", room, channel, id, seq, payload };
  }
  if (item && item.type === "gap") {
    return {
      type: "gap",
      room: item.room,
      channel: item.channel,
      after_seq: item.afterSeq,
      first_available_seq: item.firstAvailableSeq,
    };
  }
  return null;
}

function eventJson(e) {
  switch (e.event) {
    case "acked":
      return { event: "acked", request_id: e.request_id, seq: e.seq, duplicate: e.duplicate };
    case "publish_failed":
      return { event: "publish_failed", request_id: e.request_id, error: errorJson(e.error) };
    case "command_result":
      return { event: "command_result", request_id: e.request_id, result: e.result, error: errorJson(e.error) };
    case "delivered":
      return { event: "delivered", item: itemJson(e.item) };
    case "gap":
      return { event: "gap", item: itemJson(e.item) };
    case "joined":
      return { event: "joined", room: e.room, channel: e.channel, last_seq: e.last_seq };
    case "join_retry":
      return { event: "join_retry", room: e.room, channel: e.channel, attempt: e.attempt, error: errorJson(e.error) };
    case "subscription_failed":
      return { event: "subscription_failed", room: e.room, channel: e.channel, error: errorJson(e.error) };
    case "paused":
      return { event: "paused", room: e.room, channel: e.channel };
    case "service_request":
      return { event: "service_request", delivery_id: e.delivery_id, command: e.command, parameters: e.parameters };
    case "removed_from_room":
      return { event: "removed_from_room", room: e.room, channels: [...e.channels], error: errorJson(e.error) };
    case "batch_acked":
      return { event: "batch_acked", request_id: e.request_id, seqs: [...e.seqs], duplicates: [...e.duplicates].sort((a, b) => a - b) };
    case "error_received":
      return { event: "error_received", request_id: e.request_id, error: errorJson(e.error) };
    default:
      throw new Error(`no JSON form for ${JSON.stringify(e.event)}`);
  }
}

function jsonType(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return "array";
  return typeof value;
}

/** Objects match when every expected key matches (extra actual keys are allowed); lists
 * match item by item and must have the same length; anything else must be equal and of the
 * same JSON type. */
export function matches(expected, actual) {
  if (jsonType(expected) === "object") {
    return (
      jsonType(actual) === "object" &&
      Object.entries(expected).every(([k, v]) => Object.hasOwn(actual, k) && matches(v, actual[k]))
    );
  }
  if (Array.isArray(expected)) {
    return Array.isArray(actual) && expected.length === actual.length && expected.every((e, i) => matches(e, actual[i]));
  }
  return jsonType(expected) === jsonType(actual) && expected === actual;
}

class Runner {
  constructor() {
    let counter = 0;
    this.core = new ClientProtocol((prefix) => `${prefix || "id"}_${++counter}`);
    this.subs = new Map();
  }

  run(step) {
    if ("receive" in step) return [this.core.receive(step.receive), null];
    const core = this.core;
    const key = (s) => `${s.room}/${s.channel}`;
    switch (step.action) {
      case "connection_made":
        core.connectionMade(step.welcome.payload ?? {});
        break;
      case "connection_lost":
        core.connectionLost();
        break;
      case "publish":
        return [[], core.publish(step.room, step.channel, step.payload, step.id ?? null)];
      case "publish_many": {
        const [batchId, , frame] = core.encodeEvents(step.room, step.channel, step.payloads, step.ids ?? null);
        core.sendEvent(batchId, frame);
        return [[], batchId];
      }
      case "command": {
        const extra = "timeout_ms" in step ? { timeout_ms: step.timeout_ms } : null;
        return [[], core.command(step.room, step.channel, step.command, step.parameters ?? {}, extra)];
      }
      case "subscribe": {
        const state = new SubscriptionState(step.room, step.channel, {
          sinceSeq: step.since_seq ?? null,
          roomKey: step.room_key ?? null,
          queueSize: step.queue_size ?? 10000,
        });
        this.subs.set(key(step), state);
        core.subscribe(state);
        break;
      }
      case "take":
        return [[], itemJson(core.take(this.subs.get(key(step))))];
      case "rejoin":
        core.rejoin(this.subs.get(key(step)));
        break;
      default:
        throw new Error(`unknown action ${JSON.stringify(step.action)}`);
    }
    return [[], null];
  }
}

test("there are fixtures for every rule", () => {
  assert.ok(FIXTURES.length >= 8, `only ${FIXTURES.length} fixtures in ${dir}`);
});

test("the matcher is strict about types and lengths", () => {
  assert.equal(matches(1, true), false);
  assert.equal(matches([], [1]), false);
  assert.equal(matches({ a: 1 }, { a: 1, b: 2 }), true);
  assert.equal(matches({ a: 1 }, { b: 1 }), false);
  assert.equal(matches(null, {}), false);
});

for (const name of FIXTURES) {
  test(`conformance: ${name}`, () => {
    const fixture = JSON.parse(readFileSync(join(dir, name), "utf8"));
    const runner = new Runner();
    fixture.steps.forEach((step, index) => {
      const [events, returned] = runner.run(step);
      const frames = runner.core.dataToSend().map((f) => JSON.parse(f));
      const where = `${name} step ${index + 1} (${step.note ?? step.action ?? "receive"})`;
      const gotEvents = events.map(eventJson);
      assert.ok(matches(step.expect_frames ?? [], frames), `${where}: frames ${JSON.stringify(frames)}`);
      assert.ok(matches(step.expect_events ?? [], gotEvents), `${where}: events ${JSON.stringify(gotEvents)}`);
      if ("expect_return" in step) {
        assert.ok(matches(step.expect_return, returned), `${where}: returned ${JSON.stringify(returned)}`);
      }
    });
  });
}
