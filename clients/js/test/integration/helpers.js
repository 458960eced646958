// Helpers of the SDK's integration tests: a WebSocket that records every frame, collectors
// that wait on items and states (never on time alone), unique names, raw protocol set-up.

import { randomBytes } from "node:crypto";
import WebSocket from "ws";

/** A name (room, channel, tenant) unique to this run: `<prefix>-<hex>`, within 1-64 chars. */
export function unique(prefix) {
  return `${prefix}-${randomBytes(4).toString("hex")}`;
}

/**
 * Resolves with `promise`'s value, or rejects with a message naming `what` after `ms`.
 * The timer is cleared either way.
 */
export async function within(ms, what, promise) {
  let timer;
  const expired = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, expired]);
  } finally {
    clearTimeout(timer);
  }
}

/** The rejection of `promise` (fails if it resolves), within `ms`. */
export async function rejection(promise, ms, what) {
  const outcome = await within(
    ms,
    what,
    promise.then(
      (value) => ({ ok: true, value }),
      (error) => ({ ok: false, error }),
    ),
  );
  if (outcome.ok) {
    throw new Error(`${what}: expected a rejection, got ${JSON.stringify(outcome.value)}`);
  }
  return outcome.error;
}

/**
 * A `ws` WebSocket subclass that records every socket it opens and every frame, with times.
 * `log.sockets[i]`: `{ url, protocols, openedAt, closed: {code, reason} | null, errors }`;
 * `log.frames`: `{ dir: "in" | "out", socket: i, at, text, json }`; `log.watchers`: functions
 * called after each frame is recorded (see `untilFrames`).
 */
export function spyWebSocket() {
  const log = { sockets: [], frames: [], watchers: new Set() };
  const recorded = (frame) => {
    log.frames.push(frame);
    for (const watch of [...log.watchers]) watch();
  };
  class SpyWebSocket extends WebSocket {
    constructor(...args) {
      super(...args);
      const index = log.sockets.length;
      const record = { url: String(args[0]), protocols: args[1], openedAt: Date.now(), closed: null, errors: [] };
      log.sockets.push(record);
      this._spyIndex = index;
      this.on("message", (data) => {
        const text = data.toString();
        let json = null;
        try {
          json = JSON.parse(text);
        } catch {
          // not JSON
        }
        recorded({ dir: "in", socket: index, at: Date.now(), text, json });
      });
      this.on("close", (code, reason) => {
        record.closed = { code, reason: reason.toString() };
      });
      this.on("error", (error) => {
        record.errors.push(error.message);
      });
    }

    send(data, ...rest) {
      const text = typeof data === "string" ? data : Buffer.from(data).toString();
      let json = null;
      try {
        json = JSON.parse(text);
      } catch {
        // not JSON
      }
      recorded({ dir: "out", socket: this._spyIndex, at: Date.now(), text, json });
      return super.send(data, ...rest);
    }
  }
  return { WebSocket: SpyWebSocket, log };
}

/** Resolves once `pred()` holds, checked now and after each frame a spy `log` records; within `ms`. */
export async function untilFrames(log, pred, ms, what) {
  let check;
  const held = new Promise((resolve) => {
    check = () => {
      if (pred()) resolve();
    };
  });
  log.watchers.add(check);
  try {
    check();
    await within(ms, what, held);
  } finally {
    log.watchers.delete(check);
  }
}

/** The last `count` frames of a spy log, one line each (for failure messages). */
export function frameTail(log, count = 20) {
  return log.frames
    .slice(-count)
    .map((f) => `${f.dir} #${f.socket} ${f.text.slice(0, 300)}`)
    .join("\n");
}

/**
 * Consumes a subscription with its async iterator and keeps every item.
 * `waitFor(pred, ms)` resolves once `pred(items)` holds (checked on every item).
 */
export function collect(sub) {
  const items = [];
  const waiters = new Set();
  const state = { items, error: null, ended: false };
  const check = () => {
    for (const waiter of waiters) {
      if (waiter.pred(items)) {
        waiters.delete(waiter);
        waiter.resolve(items);
      } else if (state.error || state.ended) {
        waiters.delete(waiter);
        waiter.reject(state.error ?? new Error(`the subscription ended after ${items.length} items`));
      }
    }
  };
  state.done = (async () => {
    try {
      for await (const item of sub) {
        items.push(item);
        check();
      }
      state.ended = true;
    } catch (error) {
      state.error = error;
    }
    check();
  })();
  state.waitFor = (pred, ms, what = "items") => {
    if (pred(items)) return Promise.resolve(items);
    if (state.error || state.ended) {
      return Promise.reject(state.error ?? new Error(`the subscription ended after ${items.length} items`));
    }
    const promise = new Promise((resolve, reject) => waiters.add({ pred, resolve, reject }));
    return within(ms, `${what} (have ${items.length})`, promise);
  };
  return state;
}

/** Records a client's `state` events: `[{ state, url, error, at }]`. */
export function recordStates(client) {
  const states = [];
  const waiters = new Set();
  client.addEventListener("state", (event) => {
    states.push({ ...event.detail, at: Date.now() });
    for (const waiter of waiters) {
      if (waiter.pred(states)) {
        waiters.delete(waiter);
        waiter.resolve(states);
      }
    }
  });
  states.waitFor = (pred, ms, what = "a state") => {
    if (pred(states)) return Promise.resolve(states);
    const promise = new Promise((resolve, reject) => waiters.add({ pred, resolve, reject }));
    return within(ms, `${what} (states so far: ${states.map((s) => s.state).join(" → ")})`, promise);
  };
  return states;
}

/** Resolves on the next `name` event of `target` for which `pred(event)` holds. */
export function nextEvent(target, name, pred, ms, what) {
  let listener;
  const promise = new Promise((resolve) => {
    listener = (event) => {
      if (pred(event)) resolve(event);
    };
    target.addEventListener(name, listener);
  });
  return within(ms, what ?? `a ${name} event`, promise).finally(() =>
    target.removeEventListener(name, listener),
  );
}

/**
 * One command over a raw WebSocket (set-up the SDK has no call for, e.g. `room_configure`):
 * connects with the token in an Authorization header, waits for `welcome`, sends the command and
 * resolves with its `command_response` payload.
 */
export async function rawCommand(url, token, room, channel, command, parameters, ms = 15_000) {
  const ws = new WebSocket(url, { headers: { Authorization: `Bearer ${token}` } });
  try {
    return await within(
      ms,
      `${command} over a raw socket`,
      new Promise((resolve, reject) => {
        const id = unique("raw");
        ws.on("error", reject);
        ws.on("close", (code, reason) => reject(new Error(`closed ${code} ${reason}`)));
        ws.on("message", (data) => {
          const frame = JSON.parse(data.toString());
          if (frame.type === "welcome") {
            ws.send(
              JSON.stringify({ id, type: "command", room, channel, payload: { command, parameters } }),
            );
          } else if (frame.type === "command_response" && frame.payload?.request_id === id) {
            resolve(frame.payload);
          } else if (frame.type === "error") {
            reject(new Error(`error frame: ${data}`));
          }
        });
      }),
    );
  } finally {
    ws.terminate();
  }
}

/** Closes every client given, ignoring errors (test clean-up). */
export async function closeAll(...clients) {
  await Promise.all(
    clients.filter(Boolean).map((client) =>
      within(10_000, "client.close()", Promise.resolve().then(() => client.close())).catch(() => {}),
    ),
  );
}
