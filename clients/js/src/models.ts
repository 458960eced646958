/** Plain data the SDK hands to applications: events, gaps, acks, history pages, requests. */

export type JsonObject = Record<string, unknown>;

/** One stored event, as delivered to a member or returned by history. */
export interface Event {
  type: "event";
  room: string;
  channel: string;
  /** The publisher's idempotency key. */
  id: string;
  /** The tenant stream's sequence number; strictly increasing within a channel. */
  seq: number;
  payload: JsonObject;
  /** The sender's principal. */
  from: string;
  timestamp: string;
  /** The tenant's epoch (multi-region tenants only), else null. */
  epoch: number | null;
  /** W3C `traceparent`/`tracestate` of the event's creation, when it carries one. */
  trace: Record<string, string> | null;
}

/**
 * Events of the channel were lost to this reader after `afterSeq`: deleted by the stream's
 * retention limits (`reason: "retention"`), or not carried over by a failover
 * (`reason: "epoch"`; delivery goes on in `epoch` after `afterSeq`).
 */
export interface Gap {
  type: "gap";
  room: string;
  channel: string;
  afterSeq: number;
  firstAvailableSeq: number;
  reason: "retention" | "epoch";
  epoch: number | null;
  lostEpoch: number | null;
  lostFromSeq: number;
  lostToSeq: number;
}

/** What a subscription yields. */
export type Item = Event | Gap;

/** The store's acknowledgement of a publish (`duplicate`: stored before; original seq). */
export interface Ack {
  id: string;
  seq: number;
  duplicate: boolean;
}

/** One page of `history`. */
export interface HistoryPage {
  events: Event[];
  more: boolean;
  next_since_seq: number;
  /** The same as `next_since_seq`. */
  nextSinceSeq: number;
}

/** A service command delivered to a handler registered with this client. */
export interface CommandRequest {
  room: string;
  channel: string;
  command: string;
  parameters: JsonObject;
  /** The caller's principal. */
  from: string;
  /** The caller's own request id (for logs and tracing). */
  callerRequestId: string;
  /** The `dlv_...` id the answer goes to. */
  deliveryId: string;
  /** How long the caller's gateway waits for the answer. */
  timeoutMs: number;
  timestamp: string;
}

/** The payload of the `welcome` frame (`session_id`, `node`, `limits`, ...). */
export interface Welcome {
  limits: Record<string, number>;
  [key: string]: unknown;
}

export function isObject(value: unknown): value is JsonObject {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

export function str(value: unknown): string {
  return typeof value === "string" ? value : "";
}

export function int(value: unknown, fallback = 0): number {
  return Number.isInteger(value) ? (value as number) : fallback;
}

export function obj(value: unknown): JsonObject {
  return isObject(value) ? value : {};
}

function traceOf(message: JsonObject): Record<string, string> | null {
  const trace = message.trace;
  if (!isObject(trace) || typeof trace.traceparent !== "string") return null;
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(trace)) if (typeof v === "string") out[k] = v;
  return out;
}

/** An event from a delivered envelope (stored envelope plus `seq`). */
export function eventFromWire(message: JsonObject): Event {
  const epoch = message.epoch;
  return {
    type: "event",
    room: str(message.room),
    channel: str(message.channel),
    id: str(message.id),
    seq: int(message.seq),
    payload: obj(message.payload),
    from: str(message.from),
    timestamp: str(message.timestamp),
    epoch: Number.isInteger(epoch) && (epoch as number) > 0 ? (epoch as number) : null,
    trace: traceOf(message),
  };
}

/** A service request from a gateway `command` frame. */
export function requestFromWire(message: JsonObject): CommandRequest {
  const payload = obj(message.payload);
  return {
    room: str(message.room),
    channel: str(message.channel),
    command: str(payload.command),
    parameters: obj(payload.parameters),
    from: str(message.from),
    callerRequestId: str(payload.request_id),
    deliveryId: str(message.id),
    timeoutMs: int(payload.timeout_ms),
    timestamp: str(message.timestamp),
  };
}

/** The welcome payload of a `welcome` frame, its limits kept to integers. */
export function welcomeFromWire(message: JsonObject): Welcome {
  const payload = obj(message.payload);
  const limits: Record<string, number> = {};
  for (const [k, v] of Object.entries(obj(payload.limits))) if (Number.isInteger(v)) limits[k] = v as number;
  return { ...payload, limits };
}
