/**
 * The ArqonBus client: one WebSocket connection, reconnect and resume, exactly-once delivery.
 *
 * Every protocol decision and the state it needs live in the sans-I/O core
 * {@link ClientProtocol}. This module is the shell around it: it connects (trying the gateway
 * URLs in turn, with jittered exponential backoff), feeds incoming frames to the core in
 * order, sends the frames the core produces, and turns the core's events into settled
 * promises, woken iterators and dispatched events.
 *
 * On every (re)connect the client rejoins every subscription with `since_seq` = the last seq
 * handed to the application, registers every service handler again, and resends every
 * unacknowledged publish with the same `id` (the gateway deduplicates by id).
 */

import {
  ArqonBusError,
  AuthenticationError,
  ClientClosed,
  CommandFailed,
  ConnectionFailed,
  ConnectionLost,
  ConnectionRejected,
  Internal,
  InvalidName,
  RateLimited,
  Timeout,
  Unavailable,
  type HandshakeRefusal,
} from "./errors.js";
import {
  eventFromWire,
  isObject,
  welcomeFromWire,
  type Ack,
  type CommandRequest,
  type Event,
  type HistoryPage,
  type Item,
  type JsonObject,
  type Welcome,
} from "./models.js";
import {
  occupancyFromWire,
  pageFromWire,
  type Member,
  type Occupancy,
  type PresenceEvent,
  type PresencePage,
  type PresenceState,
} from "./presence.js";
import {
  ClientProtocol,
  PROTOCOL_VERSION,
  SubscriptionState,
  answerError,
  answerResult,
  randomId,
  subKey,
  type ProtocolEvent,
} from "./protocol.js";

// -- public types ------------------------------------------------------------------------------

/** A token, or a function returning one (or a promise of one): called before every attempt. */
export type TokenSource = string | (() => string | Promise<string>);

/** How the token travels. `"auto"` (the default): a subprotocol where the WebSocket
 * implementation reports why a handshake was refused (the `ws` package) and the token may be
 * one (RFC 7230 token characters: JWTs and API keys), else the first frame (browsers, whose
 * WebSocket hides a 401 behind a plain 1006 close, and dev and agent tokens, which hold ':').
 * `"subprotocol"`, `"first-message"`: always that way. `"header"`: an `Authorization` header
 * (Node with the `ws` package only; browsers cannot set headers). */
export type AuthMode = "auto" | "subprotocol" | "first-message" | "header";

/** The subset of the WebSocket API the client uses (browsers, Node 22+, the `ws` package). */
export interface WebSocketLike {
  readonly readyState: number;
  binaryType: string;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: string, listener: (event: any) => void): void;
  removeEventListener(type: string, listener: (event: any) => void): void;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[], options?: any) => WebSocketLike;

export interface ClientOptions {
  /** One URL, several, or a comma-separated string. */
  urls: string | readonly string[];
  token?: TokenSource;
  auth?: AuthMode;
  /** Defaults to `globalThis.WebSocket` (browsers, Node 22+); on Node 20 pass the `ws` class. */
  WebSocket?: WebSocketConstructor;
  connectTimeoutMs?: number;
  requestTimeoutMs?: number;
  maxBackoffMs?: number;
  /** Default bound of each subscription's queue. */
  queueSize?: number;
  /** How many service requests the client's handlers run at once. */
  handlerConcurrency?: number;
  /** A connection silent this long gets a `ping` command; silent twice this long, it is
   * taken for dead (a half-open TCP connection: a sleeping laptop, a NAT that forgot it) and
   * the client reconnects and resumes. Default 20 000; 0 turns it off. */
  keepaliveMs?: number;
}

export type ClientState = "idle" | "connecting" | "connected" | "resuming" | "closed";

export interface StateDetail {
  state: ClientState;
  url: string | null;
  error: ArqonBusError | null;
}

export interface CallOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface PublishOptions extends CallOptions {
  /** The idempotency key (default: a fresh random id). */
  id?: string;
}

export interface PublishManyOptions extends CallOptions {
  /** The events' idempotency keys, one per payload (default: fresh random ids). */
  ids?: readonly string[];
}

/** How the store answered a publish: an event's ack or a batch's. */
type Settled = Extract<ProtocolEvent, { event: "acked" | "batch_acked" }>;

export interface SubscribeOptions extends CallOptions {
  /** Every stored event with seq > sinceSeq first; omitted: from now. */
  sinceSeq?: number;
  queueSize?: number;
  roomKey?: string;
  /** Enter this connection in the channel's presence (omitted: the room's default). */
  presence?: boolean;
  /** Deliver `presence` events (omitted: the room's default; true with trackMembers). */
  presenceEvents?: boolean;
  /** Keep `sub.members`, the channel's member list, by snapshot + diff. */
  trackMembers?: boolean;
}

export interface HistoryOptions extends CallOptions {
  sinceSeq?: number;
  /** Events of this page (capped by `welcome.limits.history_max_limit`). */
  limit?: number;
  roomKey?: string;
}

export interface HistoryAllOptions extends CallOptions {
  sinceSeq?: number;
  /** The most events in total (default: every one). */
  limit?: number;
  pageSize?: number;
  roomKey?: string;
}

export interface PresenceOptions extends CallOptions {
  state?: PresenceState;
  pageSize?: number;
}

/** A service handler: returns the result object (or nothing: `{}`). Throw CommandFailed to
 * answer with an error of your own code. */
export type CommandHandler = (
  params: JsonObject,
  request: CommandRequest,
) => JsonObject | void | Promise<JsonObject | void>;

// -- helpers -----------------------------------------------------------------------------------

const NAME = /^[A-Za-z0-9_-]{1,64}$/;
/** RFC 7230 token characters: what a subprotocol may hold. */
const SUBPROTOCOL_TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
const BEARER = "arqonbus.bearer";
const INITIAL_BACKOFF_MS = 50;
const MAX_RETRY_AFTER_MS = 60_000;
/** How long command() lets a service handler take by default (as the Python SDK). */
const COMMAND_TIMEOUT_MS = 5_000;
const PRESENCE_PAGE_MAX = 1000;
const OPEN = 1;
const ADMIN_COMMANDS = new Set(
  "ping status list_rooms list_channels channel_info create_room configure_room delete_room kick room_configure room_invite room_uninvite room_ban room_unban room_mute room_unmute room_info register_agent".split(
    " ",
  ),
);
/** Built-in commands that services cannot use (ping and status can, outside `_system`). */
const NOT_FOR_SERVICES = new Set(
  [...ADMIN_COMMANDS, ..."join_channel leave_channel history register_handler unregister_handler limits refresh_token presence occupancy set_presence".split(" ")].filter(
    (c) => c !== "ping" && c !== "status",
  ),
);
const NOT_A_SUBPROTOCOL =
  'auth "subprotocol": this token cannot be a WebSocket subprotocol (it holds characters outside RFC 7230\'s token set, such as the ":" of dev and agent tokens): use auth "auto" or "first-message"';

const now = (): number => globalThis.performance?.now() ?? Date.now();

function checkName(what: string, value: unknown): asserts value is string {
  if (typeof value !== "string" || !NAME.test(value)) {
    throw new InvalidName(`${what} ${JSON.stringify(value)} is not a valid name: 1-64 characters of A-Z a-z 0-9 _ -`);
  }
}

function checkInt(what: string, value: unknown, min: number): void {
  if (!Number.isSafeInteger(value) || (value as number) < min) {
    throw new RangeError(`${what} must be an integer >= ${min}, not ${String(value)}`);
  }
}

function checkTimeout(value: unknown): void {
  if (value !== undefined && (typeof value !== "number" || !(value >= 0) || value === Infinity)) {
    throw new RangeError(`timeoutMs must be a finite number of milliseconds >= 0, not ${String(value)}`);
  }
}

function checkSignal(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw abortReason(signal);
}

/** Why `signal` aborted: its reason, or an AbortError when it gave none (older browsers). */
function abortReason(signal: AbortSignal): unknown {
  return signal.reason ?? new DOMException("the operation was aborted", "AbortError");
}

function jitter(lo: number, hi: number): number {
  return lo + Math.random() * (hi - lo);
}

/** Jittered exponential backoff: about 50 ms, 100 ms, 200 ms, ... up to `cap`. */
function backoff(attempt: number, cap: number): number {
  return jitter(0.5, 1) * Math.min(cap, INITIAL_BACKOFF_MS * 2 ** Math.min(attempt, 30));
}


/** The pause after a round of failed attempts: backoff, or what a gateway asked (plus up to
 * 50% jitter, so clients told the same wait do not come back together), capped at 60 s. */
function roundDelay(rounds: number, cap: number, asked: number): number {
  return asked > 0 ? Math.min(MAX_RETRY_AFTER_MS, asked * jitter(1, 1.5)) : backoff(rounds, cap);
}

function isRetryable(error: unknown): error is ArqonBusError {
  return error instanceof Unavailable || error instanceof Internal || error instanceof RateLimited;
}

/** Server text made safe for one line: no control characters, at most 300 characters. */
function oneLine(text: string): string {
  const t = text.replace(/[\p{C}\s]+/gu, " ").trim();
  return t.length <= 300 ? t : `${t.slice(0, 297)}...`;
}

/** A waitable condition: `wait()` resolves on the next `notify()`. */
class Notifier {
  private waiters: Array<() => void> = [];
  wait(): Promise<void> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }
  notify(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w();
  }
}

interface Deferred<T> {
  promise: Promise<T>;
  resolve(value: T): void;
  reject(error: unknown): void;
}

function deferred<T>(): Deferred<T> {
  let resolve!: (value: T) => void;
  let reject!: (error: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => {}); // rejections are read by whoever awaits; none stay unhandled
  return { promise, resolve, reject };
}

/** A publish's deadline passed (turned into a Timeout with a message by publish). */
class Expired extends Timeout {}

/** One attempt failed: try the next URL (`retryAfterMs`: what the gateway asked to wait). */
class AttemptFailed extends Error {
  constructor(
    message: string,
    readonly retryAfterMs = 0,
    readonly refusal: HandshakeRefusal | null = null,
  ) {
    super(message);
  }
}

interface Conn {
  ws: WebSocketLike;
  url: string;
  onFrame: (message: JsonObject) => void;
  onClose: (code: number, reason: string) => void;
  /** Frames that arrived after the welcome, before the connection was attached. */
  early: JsonObject[];
  /** When the last frame arrived, and the keepalive check (see `_keepalive`). */
  lastFrameAt?: number;
  keepalive?: ReturnType<typeof setInterval>;
}

function describeRefusal(r: HandshakeRefusal): string {
  const text = `HTTP ${r.status}${r.code ? ` (${r.code})` : ""}`;
  if (r.message) return `${text}: ${r.message}`;
  if (!r.code && r.status === 503) return `${text}: the gateway cannot take connections now (it gave no reason)`;
  return text;
}

/** What the gateway said when it refused the upgrade, from its JSON body. */
function parseRefusal(status: number, body: string): HandshakeRefusal {
  let data: unknown;
  try {
    data = JSON.parse(body);
  } catch {
    return { status, code: "", message: oneLine(body.slice(0, 1000)) };
  }
  if (!isObject(data)) return { status, code: "", message: "" };
  let error = typeof data.error === "string" ? data.error.trim() : "";
  let message = typeof data.message === "string" ? data.message.trim() : "";
  const prefixed = /^([A-Za-z0-9_-]{1,64}): ([\s\S]+)$/.exec(error);
  if (!message && prefixed) [error, message] = [prefixed[1]!, prefixed[2]!];
  if (NAME.test(error)) return { status, code: error, message: oneLine(message) };
  return { status, code: "", message: oneLine([error, message].filter(Boolean).join(": ")) };
}

/** Milliseconds a 429 asks to wait: the body's `retry_after_ms`, else `Retry-After`. */
function retryAfterOf(body: string, header: string | undefined): number {
  try {
    const data: unknown = JSON.parse(body);
    const ms = isObject(data) ? data.retry_after_ms : undefined;
    if (typeof ms === "number" && ms >= 0 && ms <= 3_600_000) return ms;
  } catch {
    // not JSON: the header decides
  }
  return header && /^\d+$/.test(header) && Number(header) <= 3600 ? Number(header) * 1000 : 0;
}

// -- the client --------------------------------------------------------------------------------

/**
 * An ArqonBus connection that reconnects and resumes by itself.
 *
 * Events: `state` (a CustomEvent whose detail is `{ state, url, error }`), `error`
 * (an error frame that answers nothing, or a handler failure: detail is the error) and
 * `removed` (a ban, kick or room deletion removed the connection from channels: detail is
 * `{ room, channels, error }`).
 */
export class Client extends EventTarget {
  readonly urls: readonly string[];
  readonly connectTimeoutMs: number;
  readonly requestTimeoutMs: number;
  readonly maxBackoffMs: number;
  readonly keepaliveMs: number;
  readonly queueSize: number;
  private _token: TokenSource | undefined;
  private readonly _authMode: AuthMode;
  private readonly _WS: WebSocketConstructor;
  private readonly _readsRefusals: boolean;
  private _state: ClientState = "idle";
  private _url: string | null = null;
  private _welcome: Welcome | null = null;
  private _fatal: ArqonBusError | null = null;
  /** When the next frame refused for a rate limit may go out again (see `_retryDelay`). */
  private _rateSlotAt = 0;
  private _closing = false;
  private _started = false;
  private _urlIndex = 0;
  private _conn: Conn | null = null;
  /** Set when the client closes or fails; `_aborters` end every wait and attempt then. */
  private _stopped: ArqonBusError | null = null;
  private readonly _aborters = new Set<() => void>();
  private readonly _core = new ClientProtocol();
  private readonly _ready = new Notifier();
  private readonly _slotFreed = new Notifier();
  private readonly _acks = new Map<string, Deferred<Settled>>();
  private readonly _pending = new Map<string, Deferred<JsonObject>>();
  private readonly _subs = new Map<string, Subscription>();
  private readonly _handlers = new Map<string, { room: string; channel: string; command: string; fn: CommandHandler }>();
  private readonly _timers = new Set<ReturnType<typeof setTimeout>>();
  private readonly _handlerSlots: number;
  private _handlersRunning = 0;
  private readonly _handlerQueue: Array<() => void> = [];

  constructor(options: ClientOptions) {
    super();
    if (!isObject(options)) throw new TypeError("new Client(options): options must be an object with urls");
    const raw = options.urls;
    const list = (typeof raw === "string" ? raw.split(",") : Array.isArray(raw) ? [...raw] : []).map((u) =>
      typeof u === "string" ? u.trim() : "",
    );
    const urls = list.filter(Boolean);
    if (!urls.length) throw new TypeError("no gateway URL given: pass urls, e.g. \"ws://127.0.0.1:8765/ws\"");
    for (const url of urls) {
      let ok = false;
      try {
        ok = /^wss?:$/.test(new URL(url).protocol);
      } catch {
        // not a URL
      }
      if (!ok) throw new TypeError(`${JSON.stringify(url)} is not a WebSocket URL (ws://host:port/ws or wss://...)`);
    }
    const token = options.token;
    if (token !== undefined && typeof token !== "function" && (typeof token !== "string" || !token)) {
      throw new TypeError("token must be a non-empty string or a function returning one");
    }
    const auth = options.auth ?? "auto";
    if (auth !== "auto" && auth !== "subprotocol" && auth !== "first-message" && auth !== "header") {
      throw new TypeError(`auth must be "auto", "subprotocol", "first-message" or "header", not ${JSON.stringify(auth)}`);
    }
    if (auth === "subprotocol" && typeof token === "string" && !SUBPROTOCOL_TOKEN.test(token)) {
      throw new TypeError(NOT_A_SUBPROTOCOL);
    }
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (typeof WS !== "function") {
      throw new TypeError("no WebSocket: this runtime has no global WebSocket; pass one, e.g. { WebSocket } from \"ws\"");
    }
    const ms = (name: string, value: number | undefined, fallback: number, min = 1): number => {
      if (value === undefined) return fallback;
      checkInt(name, value, min);
      return value;
    };
    this.urls = Object.freeze(urls);
    this._token = token;
    this._authMode = auth;
    this._WS = WS;
    // The ws package reports a refused upgrade's status and body ("unexpected-response").
    this._readsRefusals = typeof (WS as { prototype?: { on?: unknown } }).prototype?.on === "function";
    this.connectTimeoutMs = ms("connectTimeoutMs", options.connectTimeoutMs, 10_000);
    this.requestTimeoutMs = ms("requestTimeoutMs", options.requestTimeoutMs, 10_000);
    this.maxBackoffMs = ms("maxBackoffMs", options.maxBackoffMs, 5_000, 0);
    this.queueSize = ms("queueSize", options.queueSize, 10_000);
    this._handlerSlots = ms("handlerConcurrency", options.handlerConcurrency, 64);
    this.keepaliveMs = ms("keepaliveMs", options.keepaliveMs, 20_000, 0);
  }

  /** `"idle" | "connecting" | "connected" | "resuming" | "closed"`. */
  get state(): ClientState {
    return this._state;
  }
  /** The last welcome's payload (`session_id`, `node`, `limits`, ...). */
  get welcome(): Welcome | null {
    return this._welcome;
  }
  /** The URL of the current (or last) connection. */
  get url(): string | null {
    return this._url;
  }
  /** True while a connection is up and resumed. */
  get connected(): boolean {
    return this._core.connected;
  }
  /** The fatal error that stopped the client (refused credential, close 4500-4999), if any. */
  get error(): ArqonBusError | null {
    return this._fatal;
  }

  private _setState(state: ClientState, error: ArqonBusError | null = null): void {
    if (this._state === state) return;
    this._state = state;
    this.dispatchEvent(new CustomEvent<StateDetail>("state", { detail: { state, url: this._url, error } }));
  }

  // -- lifecycle -------------------------------------------------------------------------------

  /**
   * Connect to one of the gateways, then keep the connection up in the background. Resolves
   * on the first welcome; rejects with ConnectionFailed when no gateway answered within
   * `connectTimeoutMs`, AuthenticationError when a gateway refused the credential, or the
   * signal's reason.
   */
  async connect(options: { signal?: AbortSignal } = {}): Promise<void> {
    if (this._closing) throw this._fatal ?? new ClientClosed("the client is closed; create a new one");
    if (this._started) throw new Error("connect() was already called");
    checkSignal(options.signal);
    this._started = true;
    this._setState("connecting");
    const deadline = now() + this.connectTimeoutMs;
    let conn: Conn;
    let welcome: Welcome;
    try {
      [conn, welcome] = await this._openAny(deadline, options.signal);
    } catch (error) {
      this._started = false;
      if (this._closing) throw this._fatal ?? new ClientClosed("the client was closed while connecting");
      this._setState("idle", error instanceof ArqonBusError ? error : null);
      throw error;
    }
    if (this._closing) {
      // close() (or a fatal error) came while the welcome was on its way
      conn.ws.close(1000, "client closed");
      throw this._fatal ?? new ClientClosed("the client was closed while connecting");
    }
    const resumed = this._attach(conn, welcome);
    await this._until(resumed, Math.max(deadline, now() + 100), undefined, null).catch(() => {});
  }

  /** Close the connection and stop reconnecting. Pending calls reject with ClientClosed;
   * subscriptions end. Nothing is drained. */
  async close(): Promise<void> {
    if (this._closing) return;
    this._closing = true;
    const closed = new ClientClosed("the client was closed");
    this._shutdown(closed);
    this._setState("closed");
  }

  private _shutdown(error: ArqonBusError): void {
    this._core.connectionLost();
    this._stopped = error;
    for (const abort of [...this._aborters]) abort();
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    const conn = this._conn;
    this._conn = null;
    if (conn) {
      clearInterval(conn.keepalive);
      conn.onFrame = conn.onClose = () => {};
      try {
        conn.ws.close(1000, "client closed");
      } catch {
        // closed already
      }
    }
    this._failPending(error, true);
    for (const sub of [...this._subs.values()]) {
      if (error instanceof ClientClosed) sub.end();
      else sub.fail(error);
    }
    this._subs.clear();
    this._ready.notify();
    this._slotFreed.notify();
  }

  private _setFatal(error: ArqonBusError): void {
    if (this._closing) return;
    this._fatal = error;
    this._closing = true;
    this._shutdown(error);
    this._setState("closed", error);
  }

  // -- publishing ------------------------------------------------------------------------------

  /**
   * Publish one event and wait until the store acknowledged it: `{ id, seq, duplicate }`.
   *
   * Until the ack arrives the event is resent with the same `id` after every reconnect. At
   * most `welcome.limits.max_in_flight` publishes are in flight; more wait. Retryable errors
   * are retried with the same id within `timeoutMs`; Timeout means the outcome is unknown:
   * publish again with the same id (a stored event is acked with `duplicate: true`).
   */
  async publish(room: string, channel: string, payload: JsonObject, options: PublishOptions = {}): Promise<Ack> {
    checkName("room", room);
    checkName("channel", channel);
    checkTimeout(options.timeoutMs);
    const [id, frame] = this._core.encodeEvent(room, channel, payload, options.id);
    const settled = await this._publishFrame(id, frame, options);
    if (settled.event !== "acked") throw new Error(`an event was answered by a batch ack: ${settled.request_id}`);
    return { id, seq: settled.seq, duplicate: settled.duplicate };
  }

  /**
   * Publish up to 500 events to one channel in one `events` frame and wait until the store
   * acknowledged all of them: their acks, in order. The events are stored in the list's
   * order, each exactly as `publish` would store it (`options.ids`: their idempotency keys,
   * default fresh ones). The frame counts as one publish in flight; what `publish` says of
   * resends holds for the frame as a whole. Throws RangeError for an empty list, more than
   * 500 events or repeated ids, and the typed error when the gateway refuses the frame (one
   * event refused by a content policy or a size limit refuses all: nothing is stored).
   */
  async publishMany(
    room: string,
    channel: string,
    payloads: readonly JsonObject[],
    options: PublishManyOptions = {},
  ): Promise<Ack[]> {
    checkName("room", room);
    checkName("channel", channel);
    checkTimeout(options.timeoutMs);
    const [batchId, ids, frame] = this._core.encodeEvents(room, channel, payloads, options.ids);
    const settled = await this._publishFrame(batchId, frame, options);
    if (settled.event !== "batch_acked" || settled.seqs.length !== ids.length) {
      throw new Error(`the ack of batch ${batchId} does not answer its ${ids.length} events`);
    }
    const duplicates = new Set(settled.duplicates);
    return ids.map((id, i) => ({ id, seq: settled.seqs[i]!, duplicate: duplicates.has(i) }));
  }

  /** Send an event's (or a batch's) frame until its ack, retrying what may be retried. */
  private async _publishFrame(id: string, frame: string, options: CallOptions): Promise<Settled> {
    this._checkUsable();
    checkSignal(options.signal);
    if (this._acks.has(id)) throw new Error(`a publish with id ${JSON.stringify(id)} is already waiting for its ack`);
    const budget = options.timeoutMs ?? this.requestTimeoutMs;
    const deadline = now() + budget;
    let lastError: ArqonBusError | null = null;
    for (let attempt = 0; ; attempt++) {
      try {
        return await this._publishOnce(id, frame, deadline, options.signal);
      } catch (error) {
        if (error instanceof Expired) {
          if (lastError) throw lastError; // the budget ran out during a resend: the store said more
          throw new Timeout(
            `no ack for event ${JSON.stringify(id)} within ${budget} ms; it may or may not be stored: publish again with the same id to be sure`,
            { requestId: id },
          );
        }
        if (!isRetryable(error)) throw error;
        // Retryable, and safe: a resend with the same id is never stored twice.
        const delay = this._retryDelay(error, attempt, deadline);
        if (delay === null) throw error;
        lastError = error;
        await this._sleep(delay, options.signal);
      }
    }
  }

  private async _publishOnce(id: string, frame: string, deadline: number, signal?: AbortSignal): Promise<Settled> {
    const timeout = (): ArqonBusError => new Expired("", { requestId: id });
    const waiter = deferred<Settled>();
    try {
      while (this._core.inFlight >= (this._core.limits.max_in_flight ?? 1000)) {
        await this._until(this._slotFreed.wait(), deadline, signal, timeout);
        this._checkUsable();
      }
      if (this._acks.has(id)) throw new Error(`a publish with id ${JSON.stringify(id)} is already waiting for its ack`);
      this._core.sendEvent(id, frame);
      this._acks.set(id, waiter);
      this._flush();
      return await this._until(waiter.promise, deadline, signal, timeout);
    } finally {
      if (this._acks.get(id) === waiter) {
        this._acks.delete(id);
        this._core.forgetEvent(id);
        this._slotFreed.notify();
      }
    }
  }

  // -- subscribing -----------------------------------------------------------------------------

  /**
   * Subscribe to one channel; resolves once joined (or rejects with the typed error, e.g.
   * Forbidden, or Timeout). The subscription yields events and gaps in order, each exactly
   * once, across reconnects: iterate it, or listen to its `item` events.
   */
  async subscribe(room: string, channel: string, options: SubscribeOptions = {}): Promise<Subscription> {
    checkName("room", room);
    checkName("channel", channel);
    checkTimeout(options.timeoutMs);
    if (options.sinceSeq !== undefined && options.sinceSeq !== null) checkInt("sinceSeq", options.sinceSeq, 0);
    const queueSize = options.queueSize ?? this.queueSize;
    checkInt("queueSize", queueSize, 1);
    if (options.trackMembers && options.presenceEvents === false) {
      throw new TypeError("trackMembers needs presence events: drop presenceEvents: false");
    }
    if (options.roomKey !== undefined && typeof options.roomKey !== "string") throw new TypeError("roomKey must be a string");
    checkSignal(options.signal);
    this._checkUsable();
    if (this._subs.has(subKey(room, channel))) {
      throw new Error(`this client already has a subscription to ${room}/${channel}: close it first`);
    }
    const state = new SubscriptionState(room, channel, {
      sinceSeq: options.sinceSeq ?? null,
      roomKey: options.roomKey ?? null,
      queueSize,
      presence: options.presence ?? null,
      presenceEvents: options.presenceEvents ?? null,
      trackMembers: !!options.trackMembers,
    });
    const sub = new Subscription(this, state);
    this._subs.set(state.key, sub);
    this._core.subscribe(state);
    this._flush();
    const budget = options.timeoutMs ?? this.requestTimeoutMs;
    try {
      await this._until(sub._joinedOnce.promise, now() + budget, options.signal, () => {
        return new Timeout(`joining ${room}/${channel} did not succeed within ${budget} ms`);
      });
    } catch (error) {
      await sub.close();
      throw error;
    }
    return sub;
  }

  // -- history ---------------------------------------------------------------------------------

  /** One page of the channel's stored events with seq > sinceSeq (default 0), without
   * joining it. Retried across reconnects and retryable errors within the timeout. */
  async history(room: string, channel: string, options: HistoryOptions = {}): Promise<HistoryPage> {
    checkName("room", room);
    checkName("channel", channel);
    const since = options.sinceSeq ?? 0;
    checkInt("sinceSeq", since, 0);
    const limit = options.limit ?? 100;
    checkInt("limit", limit, 1);
    const max = this._core.limits.history_max_limit ?? 1000;
    const params: JsonObject = { since_seq: since, limit: Math.min(limit, max) };
    if (options.roomKey !== undefined) {
      if (typeof options.roomKey !== "string") throw new TypeError("roomKey must be a string");
      params.room_key = options.roomKey;
    }
    const result = await this._requestIdempotent(room, channel, "history", params, options);
    const events = (Array.isArray(result.events) ? result.events : []).filter(isObject).map(eventFromWire);
    const next = Number.isInteger(result.next_since_seq) ? (result.next_since_seq as number) : since;
    return { events, more: result.more === true, next_since_seq: next, nextSinceSeq: next };
  }

  /** Every stored event with seq > sinceSeq, page after page (following next_since_seq). */
  async *historyAll(room: string, channel: string, options: HistoryAllOptions = {}): AsyncGenerator<Event, void, undefined> {
    let since = options.sinceSeq ?? 0;
    checkInt("sinceSeq", since, 0);
    let remaining = options.limit ?? Infinity;
    if (options.limit !== undefined) checkInt("limit", options.limit, 1);
    if (options.pageSize !== undefined) checkInt("pageSize", options.pageSize, 1);
    while (remaining > 0) {
      const max = this._core.limits.history_max_limit ?? 1000;
      const want = Math.min(options.pageSize ?? max, max, remaining);
      const page = await this.history(room, channel, { ...options, sinceSeq: since, limit: want });
      for (const event of page.events) yield event;
      remaining -= page.events.length;
      if (!page.events.length || !page.more || page.next_since_seq <= since) return;
      since = page.next_since_seq;
    }
  }

  // -- commands --------------------------------------------------------------------------------

  /**
   * Call a service command and return its result. The gateway waits `timeoutMs` (default
   * 5000, as the Python SDK) for the handler's answer; the client waits one second more. Not
   * resent after a lost connection (ConnectionLost): commands are not idempotent.
   */
  async command(room: string, channel: string, command: string, params: JsonObject = {}, options: CallOptions = {}): Promise<JsonObject> {
    checkName("room", room);
    checkName("channel", channel);
    checkName("command", command);
    if (NOT_FOR_SERVICES.has(command)) {
      throw new TypeError(`${JSON.stringify(command)} is a built-in command: use the client's own method for it`);
    }
    if (!isObject(params)) throw new TypeError("params must be a plain object");
    checkTimeout(options.timeoutMs);
    const timeoutMs = options.timeoutMs ?? COMMAND_TIMEOUT_MS;
    return this.request(room, channel, command, params, timeoutMs + 1000, options.signal, {
      timeout_ms: Math.max(1, Math.round(timeoutMs)),
    });
  }

  /** Run a built-in admin command on `room` (needs the `admin` permission there). */
  async admin(room: string, command: string, params: JsonObject = {}, options: CallOptions & { channel?: string } = {}): Promise<JsonObject> {
    checkName("room", room);
    if (!ADMIN_COMMANDS.has(command)) throw new TypeError(`${JSON.stringify(command)} is not an admin command`);
    const channel = options.channel ?? "admin";
    checkName("channel", channel);
    if (!isObject(params)) throw new TypeError("params must be a plain object");
    return this.request(room, channel, command, params, options.timeoutMs ?? this.requestTimeoutMs, options.signal);
  }

  /** This connection's limits and current usage. */
  async limits(options: CallOptions = {}): Promise<JsonObject> {
    return this.request("limits", "limits", "limits", {}, options.timeoutMs ?? this.requestTimeoutMs, options.signal);
  }

  /**
   * Replace the credential in place (same principal) before the old one expires; later
   * reconnects use it too (a token function keeps being called instead).
   */
  async refreshToken(token: string, options: CallOptions = {}): Promise<JsonObject> {
    if (typeof token !== "string" || !token) throw new TypeError("token must be a non-empty string");
    const timeout = options.timeoutMs ?? this.requestTimeoutMs;
    const result = await this.request("auth", "auth", "refresh_token", { token }, timeout, options.signal);
    if (typeof this._token !== "function") this._token = token;
    return result;
  }

  /**
   * Answer service `command` on `room`/`channel` with `handler`; resolves once the gateway
   * confirmed (before connect(): once recorded; it is registered on connect). Registered
   * again after every reconnect. Returns a function that unregisters it.
   */
  async handle(room: string, channel: string, command: string, handler: CommandHandler, options: CallOptions = {}): Promise<() => Promise<void>> {
    checkName("room", room);
    checkName("channel", channel);
    checkName("command", command);
    if (NOT_FOR_SERVICES.has(command)) throw new TypeError(`${JSON.stringify(command)} is a built-in command and cannot be handled`);
    if (typeof handler !== "function") throw new TypeError("handler must be a function");
    const key = `${room}\u0000${channel}\u0000${command}`;
    const entry = { room, channel, command, fn: handler };
    this._handlers.set(key, entry);
    const stop = async (): Promise<void> => {
      if (this._handlers.get(key) !== entry) return;
      this._handlers.delete(key);
      if (!this._started || this._closing) return;
      try {
        await this.request(room, channel, "unregister_handler", { command }, this.requestTimeoutMs);
      } catch (error) {
        // A lost connection ended the registration anyway, and it is not sent again.
        if (!(error instanceof ConnectionLost)) throw error;
      }
    };
    if (!this._started) return stop;
    try {
      await this._requestIdempotent(room, channel, "register_handler", { command }, options);
    } catch (error) {
      if (error instanceof ArqonBusError && !error.retryable && this._handlers.get(key) === entry) this._handlers.delete(key);
      throw error;
    }
    return stop;
  }

  // -- presence --------------------------------------------------------------------------------

  /** The channel's counts (members, connections, online, idle). */
  async occupancy(room: string, channel: string, options: CallOptions = {}): Promise<Occupancy> {
    checkName("room", room);
    checkName("channel", channel);
    return occupancyFromWire(await this._requestIdempotent(room, channel, "occupancy", {}, options));
  }

  /** Every member present in the channel, sorted by principal (all pages read). */
  async presence(room: string, channel: string, options: PresenceOptions = {}): Promise<Member[]> {
    const members: Member[] = [];
    for await (const page of this.presencePages(room, channel, options)) members.push(...page.members);
    return members;
  }

  /** The channel's members one page at a time. */
  async *presencePages(room: string, channel: string, options: PresenceOptions = {}): AsyncGenerator<PresencePage, void, undefined> {
    checkName("room", room);
    checkName("channel", channel);
    const { state, pageSize = PRESENCE_PAGE_MAX } = options;
    if (state !== undefined && state !== "online" && state !== "idle") throw new TypeError(`state must be "online" or "idle"`);
    if (!Number.isSafeInteger(pageSize) || pageSize < 1 || pageSize > PRESENCE_PAGE_MAX) {
      throw new RangeError(`pageSize must be an integer 1-${PRESENCE_PAGE_MAX}`);
    }
    let cursor: string | null = null;
    const seen = new Set<string>();
    for (;;) {
      const params: JsonObject = { limit: pageSize };
      if (cursor !== null) params.cursor = cursor;
      if (state !== undefined) params.state = state;
      const page = pageFromWire(await this._requestIdempotent(room, channel, "presence", params, options));
      yield page;
      if (page.nextCursor === null || seen.has(page.nextCursor)) return;
      seen.add(page.nextCursor);
      cursor = page.nextCursor;
    }
  }

  /** Set this connection's presence state and/or metadata (kept across reconnects). */
  async setPresence(state?: PresenceState | null, metadata?: JsonObject | null, options: CallOptions = {}): Promise<JsonObject> {
    if (state == null && metadata == null) throw new TypeError("pass state, metadata, or both");
    if (state != null && state !== "online" && state !== "idle") throw new TypeError(`state must be "online" or "idle"`);
    if (metadata != null && !isObject(metadata)) throw new TypeError("metadata must be a plain object");
    const params: JsonObject = {};
    if (state != null) params.state = state;
    if (metadata != null) params.metadata = metadata;
    const timeout = options.timeoutMs ?? this.requestTimeoutMs;
    const result = await this.request("presence", "presence", "set_presence", params, timeout, options.signal);
    this._core.rememberPresence(params);
    return result;
  }

  // -- requests --------------------------------------------------------------------------------

  private _checkUsable(): void {
    if (this._fatal) throw this._fatal;
    if (this._closing) throw new ClientClosed("the client is closed");
    if (!this._started) throw new ClientClosed("not connected: call await client.connect() first");
  }

  /** `promise`, or a rejection at `deadline` (`timeout()`), on abort (the signal's reason)
   * or when the client closes. */
  private _until<T>(
    promise: Promise<T>,
    deadline: number,
    signal: AbortSignal | undefined,
    timeout: (() => ArqonBusError) | null,
  ): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const done = (): void => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        this._aborters.delete(onAbort);
      };
      const onAbort = (): void => {
        done();
        reject(signal?.aborted ? abortReason(signal) : this._stopped);
      };
      const timer = setTimeout(() => {
        done();
        if (timeout) reject(timeout());
        else resolve(undefined as T);
      }, Math.max(0, deadline - now()));
      if (signal?.aborted || this._stopped) return onAbort();
      signal?.addEventListener("abort", onAbort);
      this._aborters.add(onAbort);
      promise.then(
        (value) => {
          done();
          resolve(value);
        },
        (error) => {
          done();
          reject(error);
        },
      );
    });
  }

  /** The wait before resending after a retryable error, or null when it would end past
   * `deadline` (the caller gives up). Over a rate limit, the resends of all calls share one
   * queue of slots spaced by what the gateway asked (the time its bucket takes to refill one
   * frame, a little more): calls refused together go out again at the bucket's rate, not all
   * at once (which would have all but one refused again). A slot is taken only by a caller
   * that will wait for it, and the queue reaches at most MAX_RETRY_AFTER_MS ahead. Else
   * jittered backoff. */
  private _retryDelay(error: ArqonBusError, attempt: number, deadline: number): number | null {
    const start = now();
    if (!(error instanceof RateLimited) || error.retryAfterMs <= 0) {
      const delay = backoff(attempt, this.maxBackoffMs);
      return start + delay < deadline ? delay : null;
    }
    const spacing = Math.min(error.retryAfterMs * 1.05 + 1, MAX_RETRY_AFTER_MS);
    const at = Math.max(start + spacing, Math.min(this._rateSlotAt, start + MAX_RETRY_AFTER_MS));
    if (at >= deadline) return null;
    this._rateSlotAt = at + spacing;
    return at - start;
  }

  /** Wait `ms`; rejects on abort or when the client closes. */
  private _sleep(ms: number, signal?: AbortSignal): Promise<void> {
    return this._until(new Promise<void>(() => {}), now() + ms, signal, null);
  }

  private async _waitReady(deadline: number, signal: AbortSignal | undefined, timeout: () => ArqonBusError): Promise<void> {
    for (;;) {
      this._checkUsable();
      if (this._core.connected && this._conn) return;
      await this._until(this._ready.wait(), deadline, signal, timeout);
    }
  }

  /** Send one command and return its result; errors reject. Not retried, except over a rate
   * limit (the gateway did not act on it): sent again after `retry_after_ms`. */
  private async request(
    room: string,
    channel: string,
    command: string,
    parameters: JsonObject,
    timeoutMs: number,
    signal?: AbortSignal,
    extra?: JsonObject,
  ): Promise<JsonObject> {
    checkTimeout(timeoutMs);
    this._checkUsable();
    checkSignal(signal);
    const deadline = now() + timeoutMs;
    for (let attempt = 0; ; attempt++) {
      try {
        return await this._requestOnce(room, channel, command, parameters, deadline, timeoutMs, signal, extra);
      } catch (error) {
        if (!(error instanceof RateLimited)) throw error;
        const delay = this._retryDelay(error, attempt, deadline);
        if (delay === null) throw error;
        await this._sleep(delay, signal);
      }
    }
  }

  private async _requestOnce(
    room: string,
    channel: string,
    command: string,
    parameters: JsonObject,
    deadline: number,
    timeoutMs: number,
    signal?: AbortSignal,
    extra?: JsonObject,
  ): Promise<JsonObject> {
    const id = this._core.newRequestId(command);
    const timeout = (): ArqonBusError =>
      new Timeout(`no reply to ${command} on ${room}/${channel} within ${timeoutMs} ms`, { requestId: id });
    const waiter = deferred<JsonObject>();
    try {
      await this._waitReady(deadline, signal, timeout);
      this._core.command(room, channel, command, parameters, extra, id);
      this._pending.set(id, waiter);
      this._flush();
      return await this._until(waiter.promise, deadline, signal, timeout);
    } finally {
      this._pending.delete(id);
      this._core.forgetCommand(id);
    }
  }

  /** `request`, retried on a lost connection and on retryable server errors. */
  private async _requestIdempotent(room: string, channel: string, command: string, parameters: JsonObject, options: CallOptions): Promise<JsonObject> {
    checkTimeout(options.timeoutMs);
    const budget = options.timeoutMs ?? this.requestTimeoutMs;
    const deadline = now() + budget;
    let lastError: ArqonBusError | null = null;
    for (let attempt = 0; ; ) {
      const remaining = deadline - now();
      if (remaining <= 0) {
        if (lastError) throw lastError; // the server's own answer says more
        throw new Timeout(`${command} on ${room}/${channel} did not succeed within ${budget} ms`);
      }
      try {
        return await this.request(room, channel, command, parameters, remaining, options.signal);
      } catch (error) {
        if (error instanceof ConnectionLost) continue; // waits for the next connection
        if (error instanceof Timeout && lastError) throw lastError;
        if (!isRetryable(error)) throw error;
        const delay = this._retryDelay(error, attempt++, deadline);
        if (delay === null) throw error;
        lastError = error;
        await this._sleep(delay, options.signal);
      }
    }
  }

  /** Send what the core has to send, on the current connection, in order. */
  private _flush(): void {
    const frames = this._core.dataToSend();
    const conn = this._conn;
    if (conn) for (const frame of frames) this.send(conn, frame);
  }

  private send(conn: Conn, frame: string): void {
    if (conn.ws.readyState !== OPEN) return; // the reconnect logic takes over
    try {
      conn.ws.send(frame);
    } catch {
      // the connection is going away: the reconnect logic takes over
    }
  }

  private _failPending(error: ArqonBusError, publishes: boolean): void {
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const d of pending) d.reject(error);
    if (publishes) {
      this._core.abandon();
      const acks = [...this._acks.values()];
      this._acks.clear();
      for (const d of acks) d.reject(error);
      this._slotFreed.notify();
    }
  }

  private _later(ms: number, fn: () => void): void {
    const timer = setTimeout(() => {
      this._timers.delete(timer);
      fn();
    }, ms);
    this._timers.add(timer);
  }

  // -- connecting ------------------------------------------------------------------------------

  private async _currentToken(): Promise<string | undefined> {
    const source = this._token;
    if (typeof source !== "function") return source;
    const token = await source();
    if (typeof token !== "string" || !token) throw new AuthenticationError("the token function returned no token");
    return token;
  }

  /** One attempt: handshake and welcome. Rejects with AttemptFailed (try the next URL),
   * AuthenticationError or ConnectionRejected (fatal). */
  private async _open(url: string, timeoutMs: number, signal?: AbortSignal): Promise<[Conn, Welcome]> {
    let token: string | undefined;
    const started = now();
    try {
      // Bounded by the attempt's time, and ended by close() or the signal like any wait.
      token = await this._until(this._currentToken(), started + timeoutMs, signal, null);
    } catch (error) {
      if (error instanceof ArqonBusError || signal?.aborted) throw error;
      throw new AttemptFailed(`the token function failed: ${error instanceof Error ? error.message : String(error)}`);
    }
    if (token === undefined && this._token !== undefined) {
      throw new AttemptFailed(`the token function did not answer within ${timeoutMs} ms`);
    }
    timeoutMs = Math.max(1, timeoutMs - (now() - started));
    checkSignal(signal);
    if (this._stopped) throw this._stopped;
    let mode: AuthMode | "none" = token === undefined ? "none" : this._authMode;
    if (mode === "auto") mode = this._readsRefusals && SUBPROTOCOL_TOKEN.test(token!) ? "subprotocol" : "first-message";
    else if (mode === "subprotocol" && !SUBPROTOCOL_TOKEN.test(token!)) throw new AuthenticationError(NOT_A_SUBPROTOCOL);
    let ws: WebSocketLike;
    try {
      if (mode === "subprotocol") ws = new this._WS(url, [BEARER, `${BEARER}.${token}`]);
      else if (mode === "header") ws = new this._WS(url, [], { headers: { Authorization: `Bearer ${token}` } });
      else ws = new this._WS(url);
    } catch (error) {
      throw new AttemptFailed(`cannot open a WebSocket: ${(error as Error).message}`);
    }
    try {
      ws.binaryType = "arraybuffer";
    } catch {
      // not settable in this implementation
    }
    return new Promise<[Conn, Welcome]>((resolve, reject) => {
      let settled = false;
      let sentAuth = false;
      const conn: Conn = { ws, url, onFrame: () => {}, onClose: () => {}, early: [] };
      const finish = (error: Error | null, welcome?: Welcome): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this._aborters.delete(onAbort);
        signal?.removeEventListener("abort", onAbort);
        if (error !== null) {
          conn.onFrame = conn.onClose = () => {};
          try {
            ws.close();
          } catch {
            // closed already
          }
          reject(error);
        } else {
          resolve([conn, welcome!]);
        }
      };
      const onAbort = (): void => finish((signal?.aborted ? abortReason(signal) : this._stopped) as Error);
      const timer = setTimeout(() => finish(new AttemptFailed("timed out")), timeoutMs);
      this._aborters.add(onAbort);
      signal?.addEventListener("abort", onAbort);
      conn.onFrame = (message) => {
        if (message.type === "auth_required" && !sentAuth) {
          if (token === undefined) {
            finish(new AuthenticationError(`${url} asks for a credential (auth_required) and the client has no token`));
            return;
          }
          sentAuth = true;
          const frame = { version: PROTOCOL_VERSION, id: randomId(""), type: "auth", payload: { token } };
          this.send(conn, JSON.stringify(frame));
        } else if (message.type === "welcome") {
          finish(null, welcomeFromWire(message));
          conn.onFrame = (next) => conn.early.push(next); // until attach() takes over
        } else {
          finish(new AttemptFailed(`expected a welcome message, got ${JSON.stringify(message).slice(0, 100)}`));
        }
      };
      conn.onClose = (code, reason) => {
        const why = reason ? `: ${oneLine(reason)}` : "";
        if (code >= 4500 && code <= 4999) {
          finish(
            sentAuth
              ? new AuthenticationError(`${url} refused the credential (close ${code}${why})`)
              : new ConnectionRejected(`${url} closed the connection with ${code}${why}: it must not be retried as is`, { closeCode: code }),
          );
        } else {
          finish(new AttemptFailed(`the connection closed before the welcome message (${code}${why})`));
        }
      };
      this._listen(conn);
      const node = ws as unknown as { on?: (event: string, fn: (...args: any[]) => void) => void };
      if (typeof node.on === "function") {
        // The ws package: read the gateway's HTTP answer when it refuses the upgrade.
        node.on("unexpected-response", (request: any, response: any) => {
          const status: number = response.statusCode;
          let body = "";
          const done = (): void => {
            const refusal = parseRefusal(status, body);
            const detail = refusal.message || refusal.code;
            if (status === 401) finish(new AuthenticationError(`${url} refused the token: ${detail || "unauthorized"}`));
            else if (status === 403) finish(new AuthenticationError(`${url} refused the connection: ${detail || "forbidden"}`));
            else {
              const wait = status === 429 ? retryAfterOf(body, response.headers?.["retry-after"]) : 0;
              finish(new AttemptFailed(describeRefusal(refusal), wait, refusal));
            }
            try {
              request.destroy();
            } catch {
              // gone already
            }
          };
          response.setEncoding?.("utf8");
          response.on("data", (chunk: string) => {
            if (body.length < 4096) body += chunk;
          });
          response.on("end", done);
          response.on("error", done);
          response.on("close", done);
        });
      }
    });
  }

  /** Route a socket's events to the connection's current handlers. */
  private _listen(conn: Conn): void {
    const ws = conn.ws;
    const decoder = new TextDecoder();
    ws.addEventListener("message", (event: { data: unknown }) => {
      const data = event.data;
      let text: string;
      if (typeof data === "string") text = data;
      else if (data instanceof ArrayBuffer || ArrayBuffer.isView(data)) text = decoder.decode(data as ArrayBuffer);
      else return;
      let message: unknown;
      try {
        message = JSON.parse(text);
      } catch {
        return; // not JSON: ignored
      }
      if (isObject(message)) conn.onFrame(message);
    });
    ws.addEventListener("close", (event: { code?: number; reason?: string }) => {
      conn.onClose(event.code || 1006, event.reason || "");
    });
    ws.addEventListener("error", () => {
      // A close event follows; ws may emit an error without one while connecting.
      if (ws.readyState !== OPEN) conn.onClose(1006, "");
    });
  }

  private _attemptTimeout(): number {
    return Math.max(500, Math.min(this.connectTimeoutMs, 10_000));
  }

  /** Try the URLs in turn, with a pause after each round (backoff, or what a gateway asked),
   * until one opens; past `deadline`, ConnectionFailed with each URL's last reason. */
  private async _openAny(deadline: number, signal?: AbortSignal): Promise<[Conn, Welcome]> {
    const reasons = new Map<string, string>();
    const refusals: Record<string, HandshakeRefusal> = {};
    let tried = 0;
    let rounds = 0;
    let asked = 0;
    const failed = (): ConnectionFailed => {
      const summary = [...reasons].map(([u, r]) => `${u}: ${r}`).join("; ") || "timed out";
      return new ConnectionFailed(`cannot reach any gateway (${summary})`, { refusals });
    };
    for (;;) {
      const remaining = deadline - now();
      if (remaining <= 0) throw failed();
      checkSignal(signal);
      const url = this.urls[this._urlIndex % this.urls.length]!;
      try {
        const opened = await this._open(url, Math.min(remaining, this._attemptTimeout()), signal);
        this._url = url;
        return opened;
      } catch (error) {
        if (!(error instanceof AttemptFailed)) throw error;
        // An attempt cut short by the overall deadline keeps the URL's previous reason.
        if (reasons.has(url) && deadline - now() <= 1 && error.message === "timed out") throw failed();
        reasons.set(url, error.message);
        if (error.refusal) refusals[url] = error.refusal;
        else delete refusals[url];
        asked = Math.max(asked, error.retryAfterMs);
      }
      this._urlIndex += 1;
      tried += 1;
      if (tried % this.urls.length === 0) {
        const delay = roundDelay(rounds, this.maxBackoffMs, asked);
        rounds += 1;
        asked = 0;
        await this._sleep(Math.max(0, Math.min(delay, deadline - now())), signal);
      }
    }
  }

  /** Reconnect until it works or the client closes. */
  private async _reopen(): Promise<[Conn, Welcome]> {
    this._urlIndex += 1; // prefer another gateway than the one that just went away
    await this._sleep(Math.random() * INITIAL_BACKOFF_MS);
    return this._openAny(Number.POSITIVE_INFINITY);
  }

  /** Make `conn` the current connection and resume on it: rejoin, resend unacked publishes,
   * register handlers. Resolves once the handlers' registrations are answered. */
  private _attach(conn: Conn, welcome: Welcome): Promise<unknown> {
    this._conn = conn;
    this._welcome = welcome;
    conn.lastFrameAt = now();
    conn.onFrame = (message) => {
      conn.lastFrameAt = now();
      this._dispatch(message, conn);
    };
    conn.onClose = (code, reason) => this._onDisconnect(conn, code, reason);
    if (this.keepaliveMs > 0) conn.keepalive = setInterval(() => this._keepalive(conn), this.keepaliveMs / 2);
    this._core.connectionMade(welcome);
    this._flush();
    this._setState("connected");
    this._ready.notify();
    this._slotFreed.notify();
    for (const message of conn.early.splice(0)) this._dispatch(message, conn);
    if (conn.ws.readyState !== OPEN) {
      // closed between the welcome and now: its close event may already have passed
      queueMicrotask(() => this._conn === conn && this._onDisconnect(conn, 1006, ""));
    }
    return Promise.all([...this._handlers.values()].map((h) => this._registerLogged(h.room, h.channel, h.command)));
  }

  private async _registerLogged(room: string, channel: string, command: string): Promise<void> {
    try {
      await this.request(room, channel, "register_handler", { command }, this.requestTimeoutMs);
    } catch (error) {
      if (error instanceof ConnectionLost || error instanceof ClientClosed) return; // redone on reconnect
      this._report(error);
    }
  }

  private _report(error: unknown): void {
    this.dispatchEvent(new CustomEvent("error", { detail: error }));
  }

  /** A silent connection gets a `ping` (any frame back proves it alive); one silent for two
   * intervals is closed and treated as lost, so the client reconnects and resumes. */
  private _keepalive(conn: Conn): void {
    if (this._conn !== conn) {
      clearInterval(conn.keepalive);
      return;
    }
    const silent = now() - (conn.lastFrameAt ?? 0);
    if (silent >= 2 * this.keepaliveMs) {
      try {
        conn.ws.close(4000, "keepalive timeout");
      } catch {
        // closed already
      }
      this._onDisconnect(conn, 1006, `keepalive timeout: nothing from the gateway for ${Math.round(silent)} ms`);
    } else if (silent >= this.keepaliveMs) {
      this.request("_system", "admin", "ping", {}, this.keepaliveMs).catch(() => {});
    }
  }

  private _onDisconnect(conn: Conn, code: number, reason: string): void {
    if (this._conn !== conn) return;
    clearInterval(conn.keepalive);
    conn.onFrame = conn.onClose = () => {};
    this._conn = null;
    this._core.connectionLost();
    this._failPending(new ConnectionLost("the connection dropped before the reply"), false);
    if (this._closing) return;
    if (code >= 4500 && code <= 4999) {
      const why = reason ? oneLine(reason) : "no reason";
      this._setFatal(
        new ConnectionRejected(`the gateway closed the connection with ${code} (${why}): it must not be retried as is`, {
          closeCode: code,
        }),
      );
      return;
    }
    this._setState("resuming");
    this._reopen().then(
      ([next, welcome]) => {
        if (this._closing) {
          next.ws.close();
          return;
        }
        void this._attach(next, welcome);
      },
      (error) => {
        if (this._closing) return;
        this._setFatal(error instanceof ArqonBusError ? error : new Internal(`reconnecting failed: ${String(error)}`));
      },
    );
  }

  // -- dispatch (in frame order) ---------------------------------------------------------------

  private _dispatch(message: JsonObject, conn: Conn): void {
    let events: ProtocolEvent[];
    try {
      events = this._core.receive(message);
    } catch (error) {
      this._report(error);
      return;
    }
    for (const event of events) {
      try {
        this._handleEvent(event, conn);
      } catch (error) {
        this._report(error);
      }
    }
    this._flush();
  }

  private _handleEvent(event: ProtocolEvent, conn: Conn): void {
    switch (event.event) {
      case "delivered":
      case "gap":
        this._subs.get(subKey(event.item.room, event.item.channel))?._wake();
        break;
      case "acked":
      case "batch_acked":
      case "publish_failed": {
        this._slotFreed.notify();
        const waiter = this._acks.get(event.request_id);
        if (!waiter) break;
        this._acks.delete(event.request_id);
        if (event.event === "publish_failed") waiter.reject(event.error);
        else waiter.resolve(event);
        break;
      }
      case "command_result": {
        const waiter = this._pending.get(event.request_id);
        if (!waiter) break;
        if (event.error) waiter.reject(event.error);
        else waiter.resolve(event.result ?? {});
        break;
      }
      case "joined": {
        const sub = this._subs.get(subKey(event.room, event.channel));
        sub?._joinedOnce.resolve();
        sub?._wake();
        break;
      }
      case "join_retry": {
        const sub = this._subs.get(subKey(event.room, event.channel));
        if (!sub) break;
        this._later(this._retryDelay(event.error, event.attempt, Number.POSITIVE_INFINITY) ?? 0, () => {
          if (conn === this._conn && this._subs.get(sub.state.key) === sub) {
            this._core.rejoin(sub.state);
            this._flush();
          }
        });
        break;
      }
      case "subscription_failed": {
        const sub = this._subs.get(subKey(event.room, event.channel));
        if (sub && sub.state.error === event.error) {
          this._subs.delete(sub.state.key);
          sub.fail(event.error);
        }
        break;
      }
      case "paused":
        this._subs.get(subKey(event.room, event.channel))?.dispatchEvent(new CustomEvent("paused", { detail: event.queued }));
        break;
      case "service_request": {
        const r = event.request;
        const handler = this._handlers.get(`${r.room}\u0000${r.channel}\u0000${r.command}`);
        void this._answer(conn, r, handler?.fn);
        break;
      }
      case "removed_from_room":
        this.dispatchEvent(
          new CustomEvent("removed", { detail: { room: event.room, channels: event.channels, error: event.error } }),
        );
        break;
      case "presence":
        this._subs.get(subKey(event.presence.room, event.presence.channel))?._onPresence();
        break;
      case "members_stale": {
        const sub = this._subs.get(subKey(event.room, event.channel));
        if (sub) void this._readMembers(sub, event.generation);
        break;
      }
      case "error_received":
        this._report(event.error);
        break;
    }
  }

  // -- subscriptions (called by Subscription) --------------------------------------------------

  /** @internal */
  _takeItem(sub: Subscription): Item | null {
    const item = this._core.take(sub.state);
    this._flush(); // a paused subscription may rejoin now
    return item;
  }

  /** @internal */
  takePresence(sub: Subscription): PresenceEvent | null {
    return this._core.takePresence(sub.state);
  }

  /** @internal */
  async _removeSubscription(sub: Subscription): Promise<void> {
    if (this._subs.get(sub.state.key) !== sub) return;
    try {
      if (this._core.connected && !this._closing) {
        await this.request(sub.room, sub.channel, "leave_channel", {}, this.requestTimeoutMs).catch(() => {});
      }
    } finally {
      if (this._subs.get(sub.state.key) === sub) {
        this._subs.delete(sub.state.key);
        this._core.unsubscribe(sub.state);
      }
    }
  }

  private async _readMembers(sub: Subscription, generation: number): Promise<void> {
    const view = sub.state.members;
    if (!view) return;
    try {
      for await (const page of this.presencePages(sub.room, sub.channel)) {
        if (!view.addPage(generation, page)) return; // a newer snapshot replaced it
      }
      if (view.finish(generation)) sub._membersChanged(true);
    } catch (error) {
      if (!sub.closed) this._report(error);
    }
  }

  // -- service handlers ------------------------------------------------------------------------

  private async _answer(conn: Conn, request: CommandRequest, handler: CommandHandler | undefined): Promise<void> {
    if (this._handlersRunning >= this._handlerSlots) {
      await new Promise<void>((resolve) => this._handlerQueue.push(resolve));
    }
    this._handlersRunning += 1;
    let payload: JsonObject;
    try {
      payload = await this._runHandler(request, handler);
    } finally {
      this._handlersRunning -= 1;
      this._handlerQueue.shift()?.();
    }
    if (conn !== this._conn || !this._core.connected) return; // the connection that delivered it closed
    this.send(conn, this._core.encodeAnswer(request, payload));
  }

  private async _runHandler(request: CommandRequest, handler: CommandHandler | undefined): Promise<JsonObject> {
    if (!handler) {
      return answerError(
        request,
        "not_registered",
        `this client no longer handles ${JSON.stringify(request.command)} on ${request.room}/${request.channel}`,
        true,
      );
    }
    try {
      let result = await handler(request.parameters, request);
      if (result === undefined || result === null) result = {};
      if (!isObject(result)) throw new TypeError(`the handler returned ${Array.isArray(result) ? "an array" : typeof result}, not an object`);
      JSON.stringify(result); // fail here, with a clear error, if it is not JSON
      return answerResult(request, result);
    } catch (error) {
      if (error instanceof CommandFailed) {
        if (NAME.test(error.code)) return answerError(request, error.code, error.message, error.retryable);
        this._report(error);
        return answerError(request, "internal", "handler failed: CommandFailed with an invalid code", true);
      }
      this._report(error);
      const name = error instanceof Error ? error.name : typeof error;
      return answerError(request, "internal", `handler failed: ${name}`, false);
    }
  }
}

// -- subscriptions -----------------------------------------------------------------------------


type Listener = EventListenerOrEventListenerObject;

/** The listeners of one event type, kept as EventTarget keeps them (one per listener and
 * capture flag; a `once` one gone after it fired, a `signal` one gone on abort), so that a
 * subscription takes items from its queue only while someone receives them: an item taken
 * moves the resume cursor, so one handed to nobody would be lost. */
class ListenerSet {
  private readonly _entries = new Map<Listener, Map<boolean, boolean>>(); // capture -> once
  private _size = 0;

  get size(): number {
    return this._size;
  }

  /** True when added (not already there). */
  add(listener: Listener, options?: boolean | AddEventListenerOptions): boolean {
    const capture = typeof options === "boolean" ? options : Boolean(options?.capture);
    const once = typeof options === "object" && Boolean(options.once);
    const signal = typeof options === "object" ? options.signal : undefined;
    if (signal?.aborted) return false;
    let byCapture = this._entries.get(listener);
    if (!byCapture) this._entries.set(listener, (byCapture = new Map()));
    if (byCapture.has(capture)) return false;
    byCapture.set(capture, once);
    this._size += 1;
    signal?.addEventListener("abort", () => this.remove(listener, capture), { once: true });
    return true;
  }

  remove(listener: Listener, options?: boolean | EventListenerOptions): void {
    const capture = typeof options === "boolean" ? options : Boolean(options?.capture);
    const byCapture = this._entries.get(listener);
    if (!byCapture?.delete(capture)) return;
    this._size -= 1;
    if (byCapture.size === 0) this._entries.delete(listener);
  }

  /** After a dispatch: the `once` listeners fired and are gone. */
  fired(): void {
    for (const [listener, byCapture] of this._entries) {
      for (const [capture, once] of byCapture) if (once) this.remove(listener, capture);
    }
  }
}

/**
 * One channel's events and gaps, in seq order, each exactly once, across reconnects.
 *
 * Iterate it (`for await (const item of sub)`), or listen to `item` events (a CustomEvent
 * whose detail is the item): every item handed to the application is dispatched as an `item`
 * event. With `item` listeners and no iterator running, items are handed out as they arrive.
 * Breaking out of a loop does not leave the channel: call `close()`.
 *
 * Other events: `presence` (detail: a PresenceEvent; with presence events), `members`
 * (the member list changed; with trackMembers), `paused` (the queue was full), `end`
 * (closed or failed; detail: the error or null).
 */
export class Subscription extends EventTarget implements AsyncIterable<Item> {
  readonly room: string;
  readonly channel: string;
  /** @internal */
  readonly state: SubscriptionState;
  /** @internal */
  readonly _joinedOnce = deferred<void>();
  private readonly _client: Client;
  private readonly _wakeup = new Notifier();
  private readonly synced = new Notifier();
  private _iterators = 0;
  private readonly _itemListeners = new ListenerSet();
  private readonly _presenceListeners = new ListenerSet();
  private _draining = false;

  /** @internal */
  constructor(client: Client, state: SubscriptionState) {
    super();
    this._client = client;
    this.state = state;
    this.room = state.room;
    this.channel = state.channel;
  }

  /** The seq of the last event handed to the application (persist it to resume later with
   * `sinceSeq`); null before the join when no sinceSeq was given. */
  get lastSeq(): number | null {
    return this.state.lastSeq;
  }
  /** The channel's members by principal (trackMembers), kept current; a live Map. */
  get members(): Map<string, Member> {
    const view = this.state.members;
    if (!view) throw new TypeError("subscribe with trackMembers: true to keep the member list");
    return view.members;
  }
  /** How often the subscription paused because its queue was full. */
  get pauseCount(): number {
    return this.state.pauseCount;
  }
  /** True once closed, failed, or the client closed. */
  get closed(): boolean {
    return !this.state.active;
  }
  /** The error that ended the subscription (a ban, a refused rejoin, ...), or null. */
  get error(): ArqonBusError | null {
    return this.state.error;
  }
  /** Whether the last join entered this connection in the channel's presence. */
  get inPresence(): boolean {
    return this.state.inPresence;
  }

  override addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void {
    super.addEventListener(type, listener, options);
    if (!listener) return;
    if (type === "item") {
      if (this._itemListeners.add(listener, options)) queueMicrotask(() => this._wake());
    } else if (type === "presence") {
      if (this._presenceListeners.add(listener, options)) queueMicrotask(() => this._onPresence());
    }
  }

  override removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void {
    super.removeEventListener(type, listener, options);
    if (!listener) return;
    if (type === "item") this._itemListeners.remove(listener, options);
    else if (type === "presence") this._presenceListeners.remove(listener, options);
  }

  /** Wait until the member list has been read (trackMembers); resolves with it. */
  async waitMembers(options: { timeoutMs?: number } = {}): Promise<Map<string, Member>> {
    const members = this.members;
    if (this.state.members!.synced) return members;
    const ms = options.timeoutMs ?? this._client.requestTimeoutMs;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Timeout(`the members of ${this.room}/${this.channel} were not read within ${ms} ms`)), ms);
    });
    try {
      while (!this.state.members!.synced) {
        if (this.state.error) throw this.state.error;
        if (this.state.closed) throw new ClientClosed("the subscription is closed");
        await Promise.race([this.synced.wait(), timeout]);
      }
    } finally {
      clearTimeout(timer);
    }
    return members;
  }

  /** Leave the channel and end the iterator (items not yet taken are dropped). */
  async close(): Promise<void> {
    if (this.state.closed) return;
    this.end();
    await this._client._removeSubscription(this);
  }

  [Symbol.asyncIterator](): AsyncIterator<Item> {
    let active = true;
    this._iterators += 1;
    const stop = (): void => {
      if (active) {
        active = false;
        this._iterators -= 1;
      }
    };
    return {
      next: async (): Promise<IteratorResult<Item>> => {
        for (;;) {
          if (!active) return { value: undefined, done: true };
          const item = this._client._takeItem(this);
          if (item) {
            this._emit(item);
            return { value: item, done: false };
          }
          if (this.state.error) {
            stop();
            throw this.state.error;
          }
          if (this.state.closed) {
            stop();
            return { value: undefined, done: true };
          }
          await this._wakeup.wait();
        }
      },
      return: async (): Promise<IteratorResult<Item>> => {
        stop();
        this._wakeup.notify();
        return { value: undefined, done: true };
      },
    };
  }

  private _emit(item: Item): void {
    this.dispatchEvent(new CustomEvent<Item>("item", { detail: item }));
    this._itemListeners.fired();
  }

  /** @internal New items or a state change: wake iterators, or hand items to listeners. */
  _wake(): void {
    this._wakeup.notify();
    if (this._iterators > 0 || this._itemListeners.size === 0 || this._draining) return;
    this._draining = true;
    try {
      for (let item = this._client._takeItem(this); item; item = this._client._takeItem(this)) {
        this._emit(item);
        if (this._iterators > 0 || this._itemListeners.size === 0) break;
      }
    } finally {
      this._draining = false;
    }
  }

  /** @internal A presence frame arrived: hand queued presence events to listeners. */
  _onPresence(): void {
    while (this._presenceListeners.size > 0) {
      const p = this._client.takePresence(this);
      if (!p) break;
      this.dispatchEvent(new CustomEvent<PresenceEvent>("presence", { detail: p }));
      this._presenceListeners.fired();
    }
    if (this.state.members?.synced) this._membersChanged(false);
  }

  /** @internal */
  _membersChanged(synced: boolean): void {
    if (synced) this.synced.notify();
    this.dispatchEvent(new CustomEvent("members", { detail: this.state.members?.members }));
  }

  /** @internal Closed by the application or the client. */
  end(): void {
    const wasActive = this.state.active;
    this.state.end();
    this.state.members?.clear();
    this._joinedOnce.reject(new ClientClosed("the subscription was closed"));
    this._wakeup.notify();
    this.synced.notify();
    if (wasActive) this.dispatchEvent(new CustomEvent("end", { detail: null }));
  }

  /** @internal Ended with an error (refused, banned, the client failed). */
  fail(error: ArqonBusError): void {
    this.state.fail(error);
    this._joinedOnce.reject(error);
    this._wakeup.notify();
    this.synced.notify();
    this.dispatchEvent(new CustomEvent("end", { detail: error }));
  }
}
