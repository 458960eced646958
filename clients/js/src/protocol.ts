/**
 * The sans-I/O core of the ArqonBus client: frames in, frames and events out.
 *
 * {@link ClientProtocol} holds every piece of client-side state and makes every decision of
 * the protocol, without I/O: no sockets, no timers, no clock. The {@link Client} is a shell
 * around it that moves frames and awaits. The same rules, written as JSON fixtures in
 * `clients/conformance/`, hold for every SDK.
 *
 * The rules it keeps (docs/protocol.md, "Never losing your place"):
 *
 * - An event stays unacknowledged until its `ack` or `error` arrives; each new connection
 *   resends it with the same `id` (the gateway deduplicates by id).
 * - Each subscription has a cursor, `lastSeq`: the seq of the last event handed to the
 *   application. A new connection rejoins with `since_seq` = the cursor; events that were
 *   queued but not handed are dropped and come again.
 * - An event is accepted only after the reply to the subscription's current join and only
 *   when its seq is greater than the last one accepted: a replayed event is never delivered
 *   twice.
 * - Retention gaps (a join result with `gap`, a `gap` frame) become gap items.
 * - A full queue pauses the subscription (it leaves the channel); once the application has
 *   taken half of the queue it rejoins from the last accepted seq.
 * - Presence frames of a subscription joined with `presence_events` are queued (bounded: on
 *   overflow the queue is replaced by one `overflow` event). A subscription that keeps its
 *   member list asks for a fresh snapshot (`members_stale`) after every join and after an
 *   overflow frame. The connection's presence state and metadata are set again first on each
 *   new connection.
 * - A `kicked` or `room_deleted` error pushed without a request ends the room's
 *   subscriptions the way a ban does: they fail with the error and are not rejoined.
 */

import {
  ArqonBusError,
  InvalidEnvelope,
  Kicked,
  MessageTooLarge,
  RoomDeleted,
  errorFromWire,
} from "./errors.js";
import {
  eventFromWire,
  isObject,
  requestFromWire,
  type CommandRequest,
  type Event,
  type Gap,
  type Item,
  type JsonObject,
} from "./models.js";
import { MemberView, presenceFromWire, type PresenceEvent } from "./presence.js";

export const PROTOCOL_VERSION = "1.0";
export const DEFAULT_LIMITS: Readonly<Record<string, number>> = Object.freeze({
  max_envelope_bytes: 65536,
  max_in_flight: 1000,
  history_max_limit: 1000,
});
const ID_MAX = 128;
/** Presence frames a subscription holds for the application. */
export const PRESENCE_QUEUE_MAX = 1000;
/** Events in one `events` frame (docs/protocol.md#batches-of-events). */
export const BATCH_EVENTS_MAX = 500;
const ERROR_MESSAGE_MAX = 1024;

/** Makes a fresh id with a prefix (`"join"`, `"leave"`, a command's name; `""`: none). */
export type IdFactory = (prefix: string) => string;

function hex(bytes: number): string {
  const c = (globalThis as { crypto?: { getRandomValues?<T extends Uint8Array>(a: T): T } }).crypto;
  const a = new Uint8Array(bytes);
  if (c?.getRandomValues) c.getRandomValues(a);
  else for (let i = 0; i < bytes; i++) a[i] = Math.floor(Math.random() * 256);
  let out = "";
  for (const b of a) out += b.toString(16).padStart(2, "0");
  return out;
}

/** `<prefix>_<32 random hex digits>`, or the bare hex for an empty prefix. */
export function randomId(prefix: string): string {
  return prefix ? `${prefix}_${hex(16)}` : hex(16);
}

const encoder = new TextEncoder();

/** The UTF-8 size of a string, in bytes. */
export function byteLength(text: string): number {
  return encoder.encode(text).length;
}

/** Throws InvalidEnvelope unless `value` is a valid envelope `id`. */
export function checkId(value: unknown): asserts value is string {
  const ok =
    typeof value === "string" &&
    [...value].length >= 1 &&
    [...value].length <= ID_MAX &&
    !/[\p{C}\p{Z}]/u.test(value.replace(/ /g, ""));
  if (!ok) {
    throw new InvalidEnvelope(
      `id ${JSON.stringify(value)} is not valid: it must be a string of 1-${ID_MAX} printable characters`,
    );
  }
}

/** One client envelope as the JSON text of a frame (`trace`: W3C trace context). */
export function encodeEnvelope(
  kind: string,
  requestId: string,
  room: string,
  channel: string,
  payload: JsonObject,
  trace?: Record<string, string> | null,
): string {
  const envelope: JsonObject = { version: PROTOCOL_VERSION, id: requestId, type: kind, room, channel, payload };
  if (trace) envelope.trace = trace;
  return JSON.stringify(envelope);
}

/** The payload of a handler's error answer (`message` cut to 1024 characters). */
export function answerError(request: CommandRequest, code: string, message: string, retryable: boolean): JsonObject {
  return {
    request_id: request.deliveryId,
    status: "error",
    error: { code, message: message.slice(0, ERROR_MESSAGE_MAX), retryable },
  };
}

/** The payload of a handler's successful answer. */
export function answerResult(request: CommandRequest, result: JsonObject): JsonObject {
  return { request_id: request.deliveryId, status: "success", result };
}

// -- events ----------------------------------------------------------------------------------

/** What the core decided, in the shapes of the conformance fixtures. */
export type ProtocolEvent =
  | { event: "acked"; request_id: string; seq: number; duplicate: boolean }
  | { event: "batch_acked"; request_id: string; seqs: number[]; duplicates: number[] }
  | { event: "publish_failed"; request_id: string; error: ArqonBusError }
  | { event: "command_result"; request_id: string; result: JsonObject | null; error: ArqonBusError | null }
  | { event: "delivered"; item: Event }
  | { event: "gap"; item: Gap }
  | { event: "joined"; room: string; channel: string; last_seq: number }
  | { event: "join_retry"; room: string; channel: string; attempt: number; error: ArqonBusError }
  | { event: "subscription_failed"; room: string; channel: string; error: ArqonBusError }
  | { event: "paused"; room: string; channel: string; queued: number }
  | {
      event: "service_request";
      delivery_id: string;
      command: string;
      parameters: JsonObject;
      request: CommandRequest;
    }
  | { event: "error_received"; request_id: string | null; error: ArqonBusError }
  | { event: "removed_from_room"; room: string; channels: string[]; error: ArqonBusError }
  | { event: "presence"; presence: PresenceEvent }
  | { event: "members_stale"; room: string; channel: string; generation: number };

// -- a bounded FIFO ----------------------------------------------------------------------------

/** A FIFO with O(1) push and shift. */
export class Queue<T> {
  private items: T[] = [];
  private head = 0;
  get length(): number {
    return this.items.length - this.head;
  }
  push(item: T): void {
    this.items.push(item);
  }
  shift(): T | undefined {
    if (this.head >= this.items.length) return undefined;
    const item = this.items[this.head];
    this.items[this.head++] = undefined as T;
    if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return item;
  }
  clear(): void {
    this.items = [];
    this.head = 0;
  }
}

// -- subscriptions -----------------------------------------------------------------------------

/** Options of a subscription's state. */
export interface SubscriptionStateOptions {
  sinceSeq?: number | null;
  roomKey?: string | null;
  queueSize?: number;
  presence?: boolean | null;
  presenceEvents?: boolean | null;
  trackMembers?: boolean;
}

/**
 * One subscription's cursor, queue and join state. `lastSeq` is the seq of the last event
 * handed to the application; `acceptedSeq` the last one accepted into the queue; null: not
 * joined yet and no `sinceSeq` given.
 */
export class SubscriptionState {
  readonly room: string;
  readonly channel: string;
  lastSeq: number | null;
  roomKey: string | null;
  maxsize: number;
  acceptedSeq: number | null;
  readonly items = new Queue<Item>();
  queuedEvents = 0;
  accepting = false;
  paused = false;
  pauseCount = 0;
  joinId: string | null = null;
  joinFailures = 0;
  closed = false;
  error: ArqonBusError | null = null;
  /** Multi-region tenants: the epoch of `lastSeq` and of `acceptedSeq` (null: none seen). */
  lastEpoch: number | null = null;
  acceptedEpoch: number | null = null;
  presence: boolean | null;
  presenceEvents: boolean | null;
  members: MemberView | null;
  readonly presenceItems = new Queue<PresenceEvent>();
  inPresence = false;
  watchingPresence = false;

  constructor(room: string, channel: string, options: SubscriptionStateOptions = {}) {
    this.room = room;
    this.channel = channel;
    this.lastSeq = options.sinceSeq ?? null;
    this.acceptedSeq = this.lastSeq;
    this.roomKey = options.roomKey ?? null;
    this.maxsize = options.queueSize ?? 10_000;
    this.presence = options.presence ?? null;
    this.presenceEvents = options.presenceEvents ?? null;
    this.members = options.trackMembers ? new MemberView() : null;
    if (options.trackMembers && this.presenceEvents === null) this.presenceEvents = true;
  }

  get key(): string {
    return subKey(this.room, this.channel);
  }

  get active(): boolean {
    return !this.closed && this.error === null;
  }

  /** Closed by the application: nothing more is accepted, queued items are dropped. */
  end(): void {
    this.closed = true;
    this.accepting = false;
    this.items.clear();
    this.queuedEvents = 0;
    this.presenceItems.clear();
  }

  fail(error: ArqonBusError): void {
    this.error = error;
    this.accepting = false;
    this.members?.clear();
  }
}

export function subKey(room: string, channel: string): string {
  return `${room}\u0000${channel}`;
}

// -- the protocol ------------------------------------------------------------------------------

/**
 * All client-side state of one ArqonBus client, across its connections.
 *
 * Frames to send accumulate until {@link dataToSend} takes them; they are meant for the
 * current connection only (a lost connection drops them: what must survive, unacked events
 * and subscriptions, is sent again by {@link connectionMade}).
 */
export class ClientProtocol {
  connected = false;
  limits: Record<string, number> = { ...DEFAULT_LIMITS };
  private readonly _newId: IdFactory;
  private _outbox: string[] = [];
  private readonly _unacked = new Map<string, string>(); // id -> the exact frame to resend
  private readonly _pending = new Set<string>(); // commands awaiting their reply
  private readonly _joins = new Map<string, [SubscriptionState, number | null]>();
  private readonly _quiet = new Set<string>(); // requests whose reply nobody awaits
  private readonly _subs = new Map<string, SubscriptionState>();
  private readonly _presenceParams: JsonObject = {};

  constructor(newId: IdFactory = randomId) {
    this._newId = newId;
  }

  /** The frames to send now, in order (each one JSON text); empties the outbox. */
  dataToSend(): string[] {
    const frames = this._outbox;
    this._outbox = [];
    return frames;
  }

  // -- connection ----------------------------------------------------------------------------

  /** A connection is up (`welcome`: the welcome payload): rejoin every subscription from its
   * cursor, resend unacked events. */
  connectionMade(welcome: { limits?: Record<string, unknown> } = {}): void {
    const limits: Record<string, number> = { ...DEFAULT_LIMITS };
    for (const [k, v] of Object.entries(welcome.limits ?? {})) if (Number.isInteger(v)) limits[k] = v as number;
    this.limits = limits;
    this.connected = true;
    if (Object.keys(this._presenceParams).length) {
      const requestId = this._newId("set_presence");
      this._quiet.add(requestId);
      const payload = { command: "set_presence", parameters: { ...this._presenceParams } };
      this._outbox.push(encodeEnvelope("command", requestId, "presence", "presence", payload));
    }
    for (const state of [...this._subs.values()]) if (state.active) this._sendJoin(state, true);
    this._outbox.push(...this._unacked.values());
  }

  /** The connection is gone: pending commands are forgotten (never resent). */
  connectionLost(): void {
    this.connected = false;
    this._outbox = [];
    this._pending.clear();
    this._joins.clear();
    this._quiet.clear();
    for (const state of this._subs.values()) {
      state.accepting = false;
      state.joinId = null;
    }
  }

  /** The client stops for good: unacked events are forgotten too. */
  abandon(): void {
    this.connectionLost();
    this._unacked.clear();
  }

  // -- publishing ----------------------------------------------------------------------------

  /**
   * Check and encode an event: `[id, frame]`. Throws before anything is sent: TypeError for
   * a payload that is not a JSON object, InvalidEnvelope for a bad id, MessageTooLarge over
   * `limits.max_envelope_bytes`.
   */
  encodeEvent(
    room: string,
    channel: string,
    payload: JsonObject,
    id?: string | null,
    trace?: Record<string, string> | null,
  ): [string, string] {
    if (!isObject(payload)) {
      throw new TypeError(`payload must be a plain object (a JSON object), not ${describe(payload)}`);
    }
    const msgId = id ?? this._newId("");
    checkId(msgId);
    let frame: string;
    try {
      frame = encodeEnvelope("event", msgId, room, channel, payload, trace);
    } catch (exc) {
      throw new TypeError(`payload is not JSON-serializable: ${(exc as Error).message}`);
    }
    const limit = this.limits.max_envelope_bytes ?? DEFAULT_LIMITS.max_envelope_bytes!;
    const size = byteLength(frame);
    if (size > limit) {
      throw new MessageTooLarge(`envelope is ${size} bytes, limit is ${limit}: send a smaller payload`, {
        requestId: msgId,
      });
    }
    return [msgId, frame];
  }

  /**
   * Check and encode an `events` frame: `[frame id, event ids, frame]`. Throws before
   * anything is sent: RangeError for an empty list, more than BATCH_EVENTS_MAX events, or
   * `ids` of another length or with a repeat; TypeError, InvalidEnvelope and MessageTooLarge
   * as encodeEvent (the whole frame within `limits.max_envelope_bytes`).
   */
  encodeEvents(
    room: string,
    channel: string,
    payloads: readonly JsonObject[],
    ids?: readonly string[] | null,
    trace?: Record<string, string> | null,
  ): [string, string[], string] {
    if (payloads.length < 1 || payloads.length > BATCH_EVENTS_MAX) {
      throw new RangeError(
        `a batch holds 1-${BATCH_EVENTS_MAX} events, not ${payloads.length}: send more in several batches`,
      );
    }
    if (ids && ids.length !== payloads.length) {
      throw new RangeError(`${ids.length} ids for ${payloads.length} payloads`);
    }
    const eventIds = ids ? [...ids] : payloads.map(() => this._newId(""));
    const events = payloads.map((payload, i) => {
      if (!isObject(payload)) {
        throw new TypeError(`payload must be a plain object (a JSON object), not ${describe(payload)}`);
      }
      checkId(eventIds[i]!);
      const event: JsonObject = { id: eventIds[i]!, payload };
      if (trace) event.trace = trace;
      return event;
    });
    if (new Set(eventIds).size !== eventIds.length) throw new RangeError("each event of a batch needs its own id");
    const batchId = this._newId("batch");
    let frame: string;
    try {
      frame = encodeEnvelope("events", batchId, room, channel, { events });
    } catch (exc) {
      throw new TypeError(`payload is not JSON-serializable: ${(exc as Error).message}`);
    }
    const limit = this.limits.max_envelope_bytes ?? DEFAULT_LIMITS.max_envelope_bytes!;
    const size = byteLength(frame);
    if (size > limit) {
      throw new MessageTooLarge(
        `the batch is ${size} bytes, limit is ${limit}: send fewer or smaller events per batch`,
        { requestId: batchId },
      );
    }
    return [batchId, eventIds, frame];
  }

  /** Keep `frame` unacked until its answer, and send it now if connected. */
  sendEvent(requestId: string, frame: string): void {
    if (this._unacked.has(requestId)) {
      throw new Error(`a publish with id ${JSON.stringify(requestId)} is already waiting for its ack`);
    }
    this._unacked.set(requestId, frame);
    if (this.connected) this._outbox.push(frame);
  }

  /** `encodeEvent` then `sendEvent`; returns the event's id. */
  publish(room: string, channel: string, payload: JsonObject, id?: string | null): string {
    const [msgId, frame] = this.encodeEvent(room, channel, payload, id);
    this.sendEvent(msgId, frame);
    return msgId;
  }

  /** Stop resending an event (its caller gave up waiting). */
  forgetEvent(requestId: string): void {
    this._unacked.delete(requestId);
  }

  isUnacked(requestId: string): boolean {
    return this._unacked.has(requestId);
  }

  /** Events sent (or to send) and not yet answered. */
  get inFlight(): number {
    return this._unacked.size;
  }

  // -- commands ------------------------------------------------------------------------------

  /**
   * Send a command now (call it while connected); returns its request id. Its reply becomes a
   * `command_result`. A lost connection forgets it: commands are not resent.
   */
  command(
    room: string,
    channel: string,
    command: string,
    parameters: JsonObject,
    extra?: JsonObject | null,
    requestId?: string | null,
    trace?: Record<string, string> | null,
  ): string {
    const id = requestId ?? this.newRequestId(command);
    const payload: JsonObject = { command, parameters, ...(extra ?? {}) };
    this._pending.add(id);
    this._outbox.push(encodeEnvelope("command", id, room, channel, payload, trace));
    return id;
  }

  /** A `set_presence` succeeded: set the same state and metadata on each new connection. */
  rememberPresence(parameters: JsonObject): void {
    for (const k of ["state", "metadata"]) if (k in parameters) this._presenceParams[k] = parameters[k];
  }

  /** A fresh id for a command: `<command, cut to 20>_<unique>`. */
  newRequestId(command: string): string {
    return this._newId(command.slice(0, 20));
  }

  /** The caller stopped waiting: a late answer is ignored. */
  forgetCommand(requestId: string): void {
    this._pending.delete(requestId);
  }

  /** A handler's `command_response` frame; an answer over the size limit becomes a
   * `message_too_large` error answer. */
  encodeAnswer(request: CommandRequest, payload: JsonObject): string {
    let frame = this._answerFrame(request, payload);
    const limit = this.limits.max_envelope_bytes ?? DEFAULT_LIMITS.max_envelope_bytes!;
    const size = byteLength(frame);
    if (size > limit) {
      const message = `the handler's answer is ${size} bytes, more than the limit ${limit}`;
      frame = this._answerFrame(request, answerError(request, "message_too_large", message, false));
    }
    return frame;
  }

  private _answerFrame(request: CommandRequest, payload: JsonObject): string {
    return encodeEnvelope("command_response", this._newId("arq_resp"), request.room, request.channel, payload);
  }

  // -- subscriptions -------------------------------------------------------------------------

  subscription(room: string, channel: string): SubscriptionState | undefined {
    return this._subs.get(subKey(room, channel));
  }

  /** Add a subscription; it joins now if connected, else on `connectionMade`. */
  subscribe(state: SubscriptionState): void {
    const existing = this._subs.get(state.key);
    if (existing !== undefined && existing !== state) {
      throw new Error(
        `this client already has a subscription to ${state.room}/${state.channel}: close it first, or use another Client`,
      );
    }
    this._subs.set(state.key, state);
    if (this.connected) this._sendJoin(state, true);
  }

  /** Forget a subscription (the caller leaves the channel with a command). */
  unsubscribe(state: SubscriptionState): void {
    if (this._subs.get(state.key) === state) this._subs.delete(state.key);
  }

  /** Hand the next queued item to the application; moves the cursor past an event. */
  take(state: SubscriptionState): Item | null {
    const item = state.items.shift();
    if (item === undefined) return null;
    if (item.type === "event") {
      state.queuedEvents -= 1;
      state.lastSeq = item.seq;
      state.lastEpoch = item.epoch || state.lastEpoch;
      this._resumeIfDrained(state);
    } else if (item.reason === "epoch") {
      // the cursor moves back to the fork, in the new epoch
      state.lastSeq = item.afterSeq;
      state.lastEpoch = item.epoch;
    }
    return item;
  }

  /** Hand the next queued presence event to the application. */
  takePresence(state: SubscriptionState): PresenceEvent | null {
    return state.presenceItems.shift() ?? null;
  }

  /** Retry a join after `join_retry`, unless things moved on meanwhile. */
  rejoin(state: SubscriptionState): void {
    if (
      this.connected &&
      state.joinId === null &&
      !state.accepting &&
      state.active &&
      this._subs.get(state.key) === state
    ) {
      this._sendJoin(state, false);
    }
  }

  private _resumeIfDrained(state: SubscriptionState): void {
    if (
      state.paused &&
      state.joinId === null &&
      !state.closed &&
      state.queuedEvents <= Math.floor(state.maxsize / 2) &&
      this.connected
    ) {
      this._sendJoin(state, false);
    }
  }

  /**
   * Make `state` wait for a new join and queue the join frame. With `reset` (a new
   * connection) the queued items are dropped and the join resumes from the cursor; without
   * it (resuming a paused subscription) the queue is kept and the join resumes from the last
   * accepted seq.
   */
  private _sendJoin(state: SubscriptionState, reset: boolean): void {
    if (reset) {
      state.items.clear();
      state.queuedEvents = 0;
      state.paused = false;
      state.acceptedSeq = state.lastSeq;
      state.acceptedEpoch = state.lastEpoch;
    }
    const since = state.acceptedSeq;
    const requestId = this._newId("join");
    state.joinId = requestId;
    state.accepting = false;
    this._joins.set(requestId, [state, since]);
    // `batch`: events that are ready together may come in one `events` message.
    const parameters: JsonObject = { batch: true };
    if (since !== null) parameters.since_seq = since;
    if (since !== null && state.acceptedEpoch !== null) parameters.since_epoch = state.acceptedEpoch;
    if (state.roomKey !== null) parameters.room_key = state.roomKey;
    if (state.presence !== null) parameters.presence = state.presence;
    if (state.presenceEvents !== null) parameters.presence_events = state.presenceEvents;
    const payload = { command: "join_channel", parameters };
    this._outbox.push(encodeEnvelope("command", requestId, state.room, state.channel, payload));
  }

  /** The application does not keep up: stop accepting and leave the channel. */
  private _pause(state: SubscriptionState): ProtocolEvent[] {
    state.accepting = false;
    state.paused = true;
    state.pauseCount += 1;
    if (this.connected) {
      const requestId = this._newId("leave");
      this._quiet.add(requestId);
      const payload = { command: "leave_channel", parameters: {} };
      this._outbox.push(encodeEnvelope("command", requestId, state.room, state.channel, payload));
    }
    return [{ event: "paused", room: state.room, channel: state.channel, queued: state.maxsize }];
  }

  // -- receiving -----------------------------------------------------------------------------

  /**
   * Process one incoming frame (a parsed JSON object); the events it caused, in order.
   * Frames of unknown types, for unknown subscriptions or requests, or malformed, are
   * ignored (no event).
   */
  receive(message: unknown): ProtocolEvent[] {
    if (!isObject(message)) return [];
    switch (message.type) {
      case "event":
        return this._onEvent(message);
      case "events":
        return this._onEvents(message);
      case "ack":
        return this._onAck(payloadOf(message));
      case "command_response":
        return this._onResponse(payloadOf(message));
      case "error":
        return this._onError(payloadOf(message));
      case "gap":
        return this._onGap(message);
      case "command":
        return this._onServiceRequest(message);
      case "presence":
        return this._onPresence(message);
      default:
        return [];
    }
  }

  private _subFor(message: JsonObject): SubscriptionState | undefined {
    const { room, channel } = message;
    return typeof room === "string" && typeof channel === "string" ? this._subs.get(subKey(room, channel)) : undefined;
  }

  private _onEvent(message: JsonObject): ProtocolEvent[] {
    const state = this._subFor(message);
    const seq = message.seq;
    if (state === undefined || !state.accepting || !Number.isInteger(seq)) return [];
    const seqN = seq as number;
    const epoch = Number.isInteger(message.epoch) ? (message.epoch as number) : null;
    if (epoch !== null && state.acceptedEpoch !== null && epoch < state.acceptedEpoch) return [];
    if (state.acceptedSeq !== null && seqN <= state.acceptedSeq) return [];
    if (state.queuedEvents >= state.maxsize) return this._pause(state);
    const event = eventFromWire(message);
    state.items.push(event);
    state.queuedEvents += 1;
    state.acceptedSeq = seqN;
    if (epoch !== null) state.acceptedEpoch = epoch;
    return [{ event: "delivered", item: event }];
  }

  /** Several events of one channel in one message, each taken as an `event` message of it. */
  private _onEvents(message: JsonObject): ProtocolEvent[] {
    const events = payloadOf(message)?.events;
    if (!Array.isArray(events)) return [];
    const out: ProtocolEvent[] = [];
    for (const item of events) {
      if (isObject(item) && item.room === message.room && item.channel === message.channel) {
        out.push(...this._onEvent(item));
      }
    }
    return out;
  }

  private _onAck(payload: JsonObject | null): ProtocolEvent[] {
    const requestId = payload?.request_id;
    if (payload === null || typeof requestId !== "string") return [];
    if (!this._unacked.delete(requestId)) return [];
    if (Array.isArray(payload.seqs)) {
      // An events frame's: seqs[i] is event i's; duplicates, the indexes stored before.
      const seqs = payload.seqs.map((s) => (Number.isInteger(s) ? (s as number) : 0));
      const duplicates = Array.isArray(payload.duplicates)
        ? payload.duplicates.filter((i): i is number => Number.isInteger(i))
        : [];
      return [{ event: "batch_acked", request_id: requestId, seqs, duplicates }];
    }
    const seq = Number.isInteger(payload.seq) ? (payload.seq as number) : 0;
    return [{ event: "acked", request_id: requestId, seq, duplicate: payload.duplicate === true }];
  }

  private _onResponse(payload: JsonObject | null): ProtocolEvent[] {
    const requestId = payload?.request_id;
    if (payload === null || typeof requestId !== "string") return [];
    const join = this._joins.get(requestId);
    if (join !== undefined) {
      this._joins.delete(requestId);
      return this._onJoinReply(join[0], requestId, join[1], payload);
    }
    if (this._pending.has(requestId)) {
      this._pending.delete(requestId);
      return [commandResult(requestId, payload)];
    }
    this._quiet.delete(requestId);
    return [];
  }

  private _onError(payload: JsonObject | null): ProtocolEvent[] {
    if (payload === null) return [];
    const rawId = payload.request_id;
    const requestId = typeof rawId === "string" ? rawId : null;
    const error = errorFromWire(payload, requestId);
    if (requestId !== null) {
      if (this._unacked.delete(requestId)) return [{ event: "publish_failed", request_id: requestId, error }];
      const join = this._joins.get(requestId);
      if (join !== undefined) {
        this._joins.delete(requestId);
        return this._onJoinReply(join[0], requestId, join[1], { status: "error", error: payload });
      }
      if (this._pending.has(requestId)) {
        this._pending.delete(requestId);
        return [{ event: "command_result", request_id: requestId, result: null, error }];
      }
      this._quiet.delete(requestId);
    }
    const room = payload.room;
    let channels = payload.channels;
    if ((rawId === undefined || rawId === null) && typeof room === "string") {
      if ((error instanceof Kicked || error instanceof RoomDeleted) && !Array.isArray(channels)) {
        channels = [...this._subs.values()].filter((s) => s.room === room).map((s) => s.channel).sort();
      }
      if (Array.isArray(channels)) return this._onRemoved(room, channels, error);
    }
    return [{ event: "error_received", request_id: requestId, error }];
  }

  /** Pushed: a ban, kick or room deletion removed this connection from those channels;
   * their subscriptions end with the error. */
  private _onRemoved(room: string, channels: unknown[], error: ArqonBusError): ProtocolEvent[] {
    const events: ProtocolEvent[] = [];
    for (const channel of channels) {
      if (typeof channel !== "string") continue;
      const key = subKey(room, channel);
      const state = this._subs.get(key);
      if (state !== undefined) {
        this._subs.delete(key);
        state.fail(error);
        events.push({ event: "subscription_failed", room, channel: state.channel, error });
      }
    }
    events.push({ event: "removed_from_room", room, channels: channels.map((c) => String(c)), error });
    return events;
  }

  private _onGap(message: JsonObject): ProtocolEvent[] {
    const state = this._subFor(message);
    const payload = payloadOf(message);
    if (state === undefined || payload === null || !state.accepting) return [];
    const after = payload.after_seq;
    const first = payload.first_available_seq;
    if (!Number.isInteger(after) || !Number.isInteger(first)) return [];
    const gap = makeGap(state, after as number, first as number, payload);
    state.items.push(gap);
    return [{ event: "gap", item: gap }];
  }

  private _onPresence(message: JsonObject): ProtocolEvent[] {
    const state = this._subFor(message);
    if (state === undefined || !state.accepting || !state.watchingPresence) return [];
    const event = presenceFromWire(message);
    if (state.presenceItems.length >= PRESENCE_QUEUE_MAX) {
      // The application does not keep up: what it missed is summed up as an overflow.
      state.presenceItems.clear();
      state.presenceItems.push({
        room: state.room,
        channel: state.channel,
        position: event.position,
        changes: [],
        overflow: true,
        occupancy: null,
      });
    }
    state.presenceItems.push(event);
    const events: ProtocolEvent[] = [{ event: "presence", presence: event }];
    if (state.members !== null && state.members.apply(event)) events.push(membersStale(state, state.members));
    return events;
  }

  private _onServiceRequest(message: JsonObject): ProtocolEvent[] {
    const request = requestFromWire(message);
    if (!request.deliveryId) return [];
    return [
      {
        event: "service_request",
        delivery_id: request.deliveryId,
        command: request.command,
        parameters: request.parameters,
        request,
      },
    ];
  }

  private _onJoinReply(
    state: SubscriptionState,
    requestId: string,
    since: number | null,
    payload: JsonObject,
  ): ProtocolEvent[] {
    if (state.joinId !== requestId || !state.active) return [];
    state.joinId = null;
    if (payload.status === "success") {
      return this._joined(state, since, isObject(payload.result) ? payload.result : {});
    }
    const error = errorFromWire(payload.error, requestId);
    if (error.retryable) {
      state.joinFailures += 1;
      return [
        { event: "join_retry", room: state.room, channel: state.channel, attempt: state.joinFailures - 1, error },
      ];
    }
    state.fail(error);
    this.unsubscribe(state);
    return [{ event: "subscription_failed", room: state.room, channel: state.channel, error }];
  }

  private _joined(state: SubscriptionState, since: number | null, result: JsonObject): ProtocolEvent[] {
    const lastSeq = Number.isInteger(result.last_seq) ? (result.last_seq as number) : 0;
    const epoch = Number.isInteger(result.epoch) ? (result.epoch as number) : null;
    if (since === null) {
      state.acceptedSeq = lastSeq;
      if (state.lastSeq === null) {
        state.lastSeq = lastSeq;
        state.lastEpoch = epoch;
      }
    }
    if (epoch !== null && result.reason !== "epoch") {
      // Never back: a gateway answers only in the client's epoch or a newer one.
      state.acceptedEpoch = Math.max(epoch, state.acceptedEpoch ?? epoch);
    }
    state.paused = false;
    state.accepting = true;
    state.joinFailures = 0;
    state.inPresence = result.presence === true;
    state.watchingPresence = result.presence_events === true;
    const events: ProtocolEvent[] = [{ event: "joined", room: state.room, channel: state.channel, last_seq: lastSeq }];
    if (state.members !== null && state.watchingPresence) {
      // Changes before this join were not seen: only a fresh snapshot is complete.
      events.push(membersStale(state, state.members));
    }
    if (result.gap === true) {
      const first = result.first_available_seq;
      const after = Number.isInteger(result.after_seq) ? (result.after_seq as number) : since || 0;
      const gap = makeGap(state, after, Number.isInteger(first) ? (first as number) : 0, result);
      state.items.push(gap);
      events.push({ event: "gap", item: gap });
    }
    return events;
  }
}

function membersStale(state: SubscriptionState, view: MemberView): ProtocolEvent {
  return { event: "members_stale", room: state.room, channel: state.channel, generation: view.begin() };
}

/**
 * A gap item; one of `reason: "epoch"` also resets the duplicate filter: the new epoch's
 * seqs restart after `after` (the fork) and may repeat numbers seen before.
 */
function makeGap(state: SubscriptionState, after: number, first: number, fields: JsonObject): Gap {
  const lost = fields.lost;
  const epoch = fields.epoch;
  const gap: Gap = {
    type: "gap",
    room: state.room,
    channel: state.channel,
    afterSeq: after,
    firstAvailableSeq: first,
    reason: "retention",
    epoch: null,
    lostEpoch: null,
    lostFromSeq: 0,
    lostToSeq: 0,
  };
  if (fields.reason !== "epoch" || !isObject(lost) || !Number.isInteger(epoch)) return gap;
  state.acceptedSeq = after;
  state.acceptedEpoch = epoch as number;
  const n = (key: string): number => (Number.isInteger(lost[key]) ? (lost[key] as number) : 0);
  return {
    ...gap,
    reason: "epoch",
    epoch: epoch as number,
    lostEpoch: n("epoch") || null,
    lostFromSeq: n("from_seq"),
    lostToSeq: n("to_seq"),
  };
}

function payloadOf(message: JsonObject): JsonObject | null {
  return isObject(message.payload) ? message.payload : null;
}

function commandResult(requestId: string, reply: JsonObject): ProtocolEvent {
  if (reply.status === "success") {
    return { event: "command_result", request_id: requestId, result: isObject(reply.result) ? reply.result : {}, error: null };
  }
  return { event: "command_result", request_id: requestId, result: null, error: errorFromWire(reply.error, requestId) };
}

function describe(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  return typeof value;
}
