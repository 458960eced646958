// An in-process fake ArqonBus gateway for the shell's tests (127.0.0.1, port 0): a small
// in-memory bus (events with seqs, dedupe by id, joins with since_seq replay, history) whose
// behaviour each test can change with hooks. Not a test file itself.
import http from "node:http";
import { WebSocketServer } from "ws";

/** A shared store: several gateways over one store act like a cluster. */
export function makeStore() {
  return { seq: 0, events: [], ids: new Map() };
}

/** Rejects with a clear message unless `promise` settles within `ms`. */
export function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** A queue of values with `next(ms)`: waits for the next one (bounded). */
export function channel() {
  const items = [];
  const waiters = [];
  return {
    items,
    push(value) {
      const w = waiters.shift();
      if (w) w(value);
      else items.push(value);
    },
    next(ms = 5000, what = "a value") {
      if (items.length) return Promise.resolve(items.shift());
      return within(ms, what, new Promise((resolve) => waiters.push(resolve)));
    },
  };
}

/**
 * Start a fake gateway. Options:
 * - store: a shared store (makeStore()).
 * - refuse(req, attempt): return { status, body, headers } to refuse the upgrade.
 * - firstMessageAuth: true to send auth_required when no credential was offered.
 * - onFrame(conn, frame): return true when the test handled the frame itself.
 * - limits: extra welcome limits.
 */
export async function startGateway(options = {}) {
  const store = options.store ?? makeStore();
  const server = http.createServer((_, res) => res.writeHead(404).end());
  const wss = new WebSocketServer({
    noServer: true,
    handleProtocols: (protocols) => (protocols.has("arqonbus.bearer") ? "arqonbus.bearer" : false),
  });
  const gw = {
    store,
    attempts: [], // every upgrade request: { protocols, authorization, at }
    conns: [], // accepted connections
    frames: channel(), // every frame received: { conn, frame }
    connections: channel(), // every accepted connection
    url: "",
    async close() {
      for (const c of gw.conns) c.ws.terminate();
      wss.close();
      await new Promise((resolve) => server.close(resolve));
    },
  };
  server.on("upgrade", (req, socket, head) => {
    socket.on("error", () => {}); // a client that gives up resets the connection
    const offered = (req.headers["sec-websocket-protocol"] ?? "")
      .split(",")
      .map((s) => s.trim())
      .filter(Boolean);
    const attempt = { protocols: offered, authorization: req.headers.authorization ?? null, at: performance.now() };
    gw.attempts.push(attempt);
    const refusal = options.refuse?.(req, gw.attempts.length);
    if (refusal) {
      const body = typeof refusal.body === "string" ? refusal.body : JSON.stringify(refusal.body ?? {});
      const headers = { "Content-Type": "application/json", Connection: "close", "Content-Length": Buffer.byteLength(body), ...(refusal.headers ?? {}) };
      const head = Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`).join("");
      socket.end(`HTTP/1.1 ${refusal.status} Refused\r\n${head}\r\n${body}`);
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => accept(ws, attempt));
  });

  function send(conn, frame) {
    if (conn.ws.readyState === 1) conn.ws.send(JSON.stringify({ version: "1.0", ...frame }));
  }
  function welcome(conn) {
    conn.authed = true;
    send(conn, {
      type: "welcome",
      payload: {
        session_id: `s${gw.conns.length}`,
        node: "fake",
        protocol: "1.0",
        limits: { max_envelope_bytes: 65536, max_in_flight: 1000, history_max_limit: 1000, ...(options.limits ?? {}) },
      },
    });
  }
  function respond(conn, frame, result) {
    send(conn, {
      type: "command_response",
      id: `resp_${frame.id}`,
      room: frame.room,
      channel: frame.channel,
      from: "arqonbus",
      payload: { request_id: frame.id, status: "success", result },
    });
  }
  function fail(conn, frame, code, message, extra = {}) {
    send(conn, { type: "error", payload: { request_id: frame.id, code, message, retryable: false, ...extra } });
  }
  function deliver(conn, event) {
    send(conn, { type: "event", ...event });
  }

  function accept(ws, attempt) {
    const conn = { ws, attempt, members: new Set(), authed: false, gw };
    conn.send = (frame) => send(conn, frame);
    conn.respond = (frame, result) => respond(conn, frame, result);
    conn.fail = (frame, code, message, extra) => fail(conn, frame, code, message, extra);
    gw.conns.push(conn);
    gw.connections.push(conn);
    const hasCredential = attempt.protocols.some((p) => p.startsWith("arqonbus.bearer.")) || attempt.authorization;
    if (options.firstMessageAuth && !hasCredential) {
      send(conn, { type: "auth_required", payload: { nonce: null, methods: ["dev"], timeout_ms: 10000 } });
    } else {
      welcome(conn);
    }
    ws.on("message", (data) => {
      let frame;
      try {
        frame = JSON.parse(data.toString());
      } catch {
        return;
      }
      gw.frames.push({ conn, frame });
      if (!conn.authed) {
        if (frame.type === "auth" && typeof frame.payload?.token === "string") {
          conn.authToken = frame.payload.token;
          if (options.checkToken && !options.checkToken(frame.payload.token)) ws.close(4501, "unauthorized: bad token");
          else welcome(conn);
        } else {
          ws.close(4501, "invalid_envelope: the first frame must have type 'auth'");
        }
        return;
      }
      if (options.onFrame?.(conn, frame)) return;
      handle(conn, frame);
    });
  }

  function handle(conn, frame) {
    if (frame.type === "event") {
      const key = `${frame.room}/${frame.channel}/${frame.id}`;
      const seen = store.ids.get(key);
      if (seen !== undefined) {
        send(conn, { type: "ack", room: frame.room, channel: frame.channel, payload: { request_id: frame.id, seq: seen, duplicate: true } });
        return;
      }
      const seq = ++store.seq;
      const event = {
        id: frame.id,
        room: frame.room,
        channel: frame.channel,
        from: "tester",
        timestamp: new Date().toISOString(),
        payload: frame.payload,
        seq,
      };
      store.events.push(event);
      store.ids.set(key, seq);
      send(conn, { type: "ack", room: frame.room, channel: frame.channel, payload: { request_id: frame.id, seq, duplicate: false } });
      for (const gwConn of gw.conns) if (gwConn.members.has(`${frame.room}/${frame.channel}`)) deliver(gwConn, event);
      return;
    }
    if (frame.type !== "command") return;
    const { command, parameters = {} } = frame.payload ?? {};
    const key = `${frame.room}/${frame.channel}`;
    if (command === "join_channel") {
      conn.members.add(key);
      respond(conn, frame, { last_seq: store.seq });
      if (Number.isInteger(parameters.since_seq)) {
        for (const e of store.events) if (`${e.room}/${e.channel}` === key && e.seq > parameters.since_seq) deliver(conn, e);
      }
    } else if (command === "leave_channel") {
      conn.members.delete(key);
      respond(conn, frame, {});
    } else if (command === "history") {
      const since = parameters.since_seq ?? 0;
      const all = store.events.filter((e) => `${e.room}/${e.channel}` === key && e.seq > since);
      const events = all.slice(0, parameters.limit ?? 100);
      const last = events.length ? events[events.length - 1].seq : since;
      respond(conn, frame, { events, more: all.length > events.length, next_since_seq: last });
    } else if (command === "register_handler" || command === "unregister_handler") {
      conn.handlers ??= new Set();
      if (command === "register_handler") conn.handlers.add(`${key}/${parameters.command}`);
      else conn.handlers.delete(`${key}/${parameters.command}`);
      respond(conn, frame, {});
    } else {
      respond(conn, frame, { echo: parameters, command });
    }
  }

  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  gw.url = `ws://127.0.0.1:${server.address().port}/ws`;
  return gw;
}

/** The next frame a gateway received that satisfies `pred` (bounded wait). */
export async function nextFrame(gw, pred, ms = 5000, what = "a frame") {
  const deadline = performance.now() + ms;
  for (let i = 0; i < 10_000; i++) {
    const left = deadline - performance.now();
    if (left <= 0) break;
    const got = await gw.frames.next(left, what);
    if (pred(got.frame, got.conn)) return got;
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** Resolves on the next `name` event of `target` whose detail satisfies `pred` (bounded). */
export function nextEvent(target, name, pred = () => true, ms = 5000) {
  let listener;
  const promise = new Promise((resolve) => {
    listener = (event) => {
      if (pred(event.detail)) resolve(event.detail);
    };
    target.addEventListener(name, listener);
  });
  return within(ms, `a ${name} event`, promise).finally(() => target.removeEventListener(name, listener));
}
