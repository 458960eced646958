/**
 * Errors raised by the ArqonBus SDK.
 *
 * Every error the SDK raises for the bus is an {@link ArqonBusError}; misuse of the API
 * throws `TypeError` or `RangeError` before anything is sent. Server errors (`error` frames,
 * `command_response` errors) map one-to-one onto subclasses by their wire `code`; a code the
 * SDK does not know (for example one a service handler made up) becomes
 * {@link CommandFailed}. The class names and codes are the same in every ArqonBus SDK.
 */

/** The fields every {@link ArqonBusError} carries (all optional when constructing one). */
export interface ErrorFields {
  code?: string;
  requestId?: string | null;
  retryable?: boolean;
  retryAfterMs?: number;
  room?: string | null;
  channels?: readonly string[];
  eventIndex?: number | null;
  eventId?: string | null;
  cause?: unknown;
}

/** Base class of every SDK error. */
export class ArqonBusError extends Error {
  /** The wire code of this class (`"error"` for the base class). */
  static readonly defaultCode: string = "error";
  static readonly defaultRetryable: boolean = false;
  /** The class name, kept through minification (the same in every SDK). */
  static readonly className: string = "ArqonBusError";

  /** The stable error code (the wire code for server errors). */
  readonly code: string;
  /** Whether sending the same request again can succeed. */
  readonly retryable: boolean;
  /** How long the gateway asked to wait before sending again; 0 when it did not say. */
  readonly retryAfterMs: number;
  /** The `id` of the request this error answers, when there is one. */
  readonly requestId: string | null;
  /** The room the gateway named, or null. */
  readonly room: string | null;
  /** The channels the gateway named (a ban, kick or deletion), or []. */
  readonly channels: readonly string[];
  /** A refused batch (publishMany): the place and id of the event that refused it, or null. */
  readonly eventIndex: number | null;
  readonly eventId: string | null;

  constructor(message = "", fields: ErrorFields = {}) {
    super(message, fields.cause === undefined ? undefined : { cause: fields.cause });
    const cls = new.target as typeof ArqonBusError;
    this.name = cls.className;
    this.code = fields.code || cls.defaultCode;
    this.retryable = fields.retryable ?? cls.defaultRetryable;
    this.retryAfterMs = fields.retryAfterMs ?? 0;
    this.requestId = fields.requestId ?? null;
    this.room = fields.room ?? null;
    this.channels = Object.freeze([...(fields.channels ?? [])]);
    this.eventIndex = fields.eventIndex ?? null;
    this.eventId = fields.eventId ?? null;
  }

  override toString(): string {
    return `${this.name}: ${this.message ? `${this.code}: ${this.message}` : this.code}`;
  }
}

// -- errors the gateway sends --------------------------------------------------------------

/** The gateway could not parse a frame as UTF-8 JSON. */
export class InvalidJson extends ArqonBusError {
  static override readonly defaultCode = "invalid_json";
  static override readonly className = "InvalidJson";
}
/** A field of the envelope is malformed (also thrown before sending a bad `id`). */
export class InvalidEnvelope extends ArqonBusError {
  static override readonly defaultCode = "invalid_envelope";
  static override readonly className = "InvalidEnvelope";
}
/** A room or channel name breaks the rules: 1-64 characters of `A-Za-z0-9_-`. */
export class InvalidName extends ArqonBusError {
  static override readonly defaultCode = "invalid_name";
  static override readonly className = "InvalidName";
}
/** The command name is neither built-in nor a valid service command name. */
export class UnknownCommand extends ArqonBusError {
  static override readonly defaultCode = "unknown_command";
  static override readonly className = "UnknownCommand";
}
/** A command parameter is invalid (`since_seq`, `limit`, `timeout_ms`, ...). */
export class InvalidParameters extends ArqonBusError {
  static override readonly defaultCode = "invalid_parameters";
  static override readonly className = "InvalidParameters";
}
/** The envelope exceeds `welcome.limits.max_envelope_bytes` (also thrown before sending). */
export class MessageTooLarge extends ArqonBusError {
  static override readonly defaultCode = "message_too_large";
  static override readonly className = "MessageTooLarge";
}
/** `leave_channel` for a channel this connection is not a member of. */
export class NotJoined extends ArqonBusError {
  static override readonly defaultCode = "not_joined";
  static override readonly className = "NotJoined";
}
/** `unregister_handler` for a command this connection has not registered. */
export class NotRegistered extends ArqonBusError {
  static override readonly defaultCode = "not_registered";
  static override readonly className = "NotRegistered";
}
/** A per-connection limit from `welcome.limits` was reached. */
export class LimitExceeded extends ArqonBusError {
  static override readonly defaultCode = "limit_exceeded";
  static override readonly className = "LimitExceeded";
}
/** The store or the handler's connection was not available. Retryable (same `id`). */
export class Unavailable extends ArqonBusError {
  static override readonly defaultCode = "unavailable";
  static override readonly defaultRetryable = true;
  static override readonly className = "Unavailable";
}
/** An unexpected failure in the gateway or in a service handler. Retryable. */
export class Internal extends ArqonBusError {
  static override readonly defaultCode = "internal";
  static override readonly defaultRetryable = true;
  static override readonly className = "Internal";
}
/** No connection has registered a handler for this service command. Retryable. */
export class NoResponders extends ArqonBusError {
  static override readonly defaultCode = "no_responders";
  static override readonly defaultRetryable = true;
  static override readonly className = "NoResponders";
}
/**
 * No answer in time. The outcome is unknown: for a publish, publish again with the same
 * `id` (a stored event is acked with `duplicate: true` and its original seq).
 */
export class Timeout extends ArqonBusError {
  static override readonly defaultCode = "timeout";
  static override readonly defaultRetryable = true;
  static override readonly className = "Timeout";
}
/** A handler answered a delivery that no longer awaits an answer. */
export class UnknownRequest extends ArqonBusError {
  static override readonly defaultCode = "unknown_request";
  static override readonly className = "UnknownRequest";
}
/** The token's role and grants lack the permission for this action on this channel. */
export class Forbidden extends ArqonBusError {
  static override readonly defaultCode = "forbidden";
  static override readonly className = "Forbidden";
}
/** The tenant's content policy refused the payload; nothing was stored. */
export class PolicyViolation extends ArqonBusError {
  static override readonly defaultCode = "policy_violation";
  static override readonly className = "PolicyViolation";
}
/** The payload fails the JSON Schema the content policy sets for this channel or type. */
export class InvalidPayload extends ArqonBusError {
  static override readonly defaultCode = "invalid_payload";
  static override readonly className = "InvalidPayload";
}
/** A rate limit was exceeded; `retryAfterMs` says when to send again (same `id`). */
export class RateLimited extends ArqonBusError {
  static override readonly defaultCode = "rate_limited";
  static override readonly defaultRetryable = true;
  static override readonly className = "RateLimited";
}
/** The tenant's stored-bytes quota is full: the event was not stored. */
export class QuotaExceeded extends ArqonBusError {
  static override readonly defaultCode = "quota_exceeded";
  static override readonly className = "QuotaExceeded";
}
/** The room is private: join with `roomKey`, or get invited. */
export class RoomKeyRequired extends ArqonBusError {
  static override readonly defaultCode = "room_key_required";
  static override readonly className = "RoomKeyRequired";
}
/** Banned from the room; also pushed without a request (`room`, `channels`). */
export class Banned extends ArqonBusError {
  static override readonly defaultCode = "banned";
  static override readonly className = "Banned";
}
/** Muted in the room: reading works, publishing does not. */
export class Muted extends ArqonBusError {
  static override readonly defaultCode = "muted";
  static override readonly className = "Muted";
}
/** `create_room` of a room that is configured already. */
export class RoomExists extends ArqonBusError {
  static override readonly defaultCode = "room_exists";
  static override readonly className = "RoomExists";
}
/** `delete_room` of a room with no stored events and no settings. */
export class RoomNotFound extends ArqonBusError {
  static override readonly defaultCode = "room_not_found";
  static override readonly className = "RoomNotFound";
}
/** Kicked from the room (pushed): the room's subscriptions end. `reason` is the admin's. */
export class Kicked extends ArqonBusError {
  static override readonly defaultCode = "kicked";
  static override readonly className = "Kicked";
  readonly reason: string;
  constructor(message = "", fields: ErrorFields & { reason?: string } = {}) {
    super(message, fields);
    this.reason = fields.reason ?? "";
  }
}
/** The room was deleted (pushed): the room's subscriptions end. */
export class RoomDeleted extends ArqonBusError {
  static override readonly defaultCode = "room_deleted";
  static override readonly className = "RoomDeleted";
}
/**
 * A service handler answered with an error of its own `code`. Throw it from a handler to
 * answer with that error: `throw new CommandFailed("pool_exhausted", "busy", { retryable: true })`.
 */
export class CommandFailed extends ArqonBusError {
  static override readonly defaultCode = "command_failed";
  static override readonly className = "CommandFailed";
  constructor(code: string, message = "", fields: Omit<ErrorFields, "code"> = {}) {
    super(message, { ...fields, code, retryable: fields.retryable ?? false });
  }
}

// -- errors of the connection --------------------------------------------------------------

/** The connection dropped while a (non-idempotent) command was pending. Retryable. */
export class ConnectionLost extends ArqonBusError {
  static override readonly defaultCode = "connection_lost";
  static override readonly defaultRetryable = true;
  static override readonly className = "ConnectionLost";
}

/** A gateway's HTTP answer instead of the WebSocket upgrade (e.g. 503 while it starts). */
export interface HandshakeRefusal {
  status: number;
  code: string;
  message: string;
}

/**
 * `connect()` could not reach any gateway within `connectTimeoutMs`. The message gives each
 * URL's last reason; `refusals` maps URLs whose last attempt got an HTTP refusal to it.
 */
export class ConnectionFailed extends ArqonBusError {
  static override readonly defaultCode = "connection_failed";
  static override readonly defaultRetryable = true;
  static override readonly className = "ConnectionFailed";
  readonly refusals: Readonly<Record<string, HandshakeRefusal>>;
  constructor(
    message = "",
    fields: ErrorFields & { refusals?: Record<string, HandshakeRefusal> } = {},
  ) {
    super(message, fields);
    this.refusals = { ...(fields.refusals ?? {}) };
  }
}

/**
 * The gateway refused the credential (HTTP 401, close 4501/4502 after first-message auth)
 * or the connection (HTTP 403). Do not retry with the same token.
 */
export class AuthenticationError extends ArqonBusError {
  static override readonly defaultCode = "unauthorized";
  static override readonly className = "AuthenticationError";
}
/** Another name of {@link AuthenticationError}. */
export const AuthenticationFailed = AuthenticationError;
/** Another name of {@link AuthenticationError}. */
export type AuthenticationFailed = AuthenticationError;

/** The gateway closed the connection with a code in 4500-4999: do not reconnect. */
export class ConnectionRejected extends ArqonBusError {
  static override readonly defaultCode = "connection_rejected";
  static override readonly className = "ConnectionRejected";
  readonly closeCode: number | null;
  constructor(message = "", fields: ErrorFields & { closeCode?: number | null } = {}) {
    super(message, fields);
    this.closeCode = fields.closeCode ?? null;
  }
}

/** The client was closed (or never connected) when the call was made or while it waited. */
export class ClientClosed extends ArqonBusError {
  static override readonly defaultCode = "client_closed";
  static override readonly className = "ClientClosed";
}

/** The server error codes of protocol v1 and their classes. */
export const ERROR_CLASSES: Readonly<Record<string, typeof ArqonBusError>> = Object.freeze(
  Object.fromEntries(
    [
      InvalidJson,
      InvalidEnvelope,
      InvalidName,
      UnknownCommand,
      InvalidParameters,
      MessageTooLarge,
      NotJoined,
      NotRegistered,
      LimitExceeded,
      Unavailable,
      Internal,
      NoResponders,
      Timeout,
      UnknownRequest,
      Forbidden,
      PolicyViolation,
      InvalidPayload,
      RoomKeyRequired,
      Banned,
      Muted,
      RateLimited,
      QuotaExceeded,
      RoomExists,
      RoomNotFound,
      Kicked,
      RoomDeleted,
    ].map((cls) => [cls.defaultCode, cls as typeof ArqonBusError]),
  ),
);

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** The error for an `error` payload or a `command_response` `error` object. */
export function errorFromWire(error: unknown, requestId: string | null = null): ArqonBusError {
  if (!isObject(error)) {
    let shown: string;
    try {
      shown = JSON.stringify(error) ?? String(error);
    } catch {
      shown = String(error);
    }
    return new Internal(`malformed error from the gateway: ${shown}`, { requestId });
  }
  const rawCode = error.code;
  const code = typeof rawCode === "string" && rawCode ? rawCode : "internal";
  const message = typeof error.message === "string" ? error.message : "";
  const retryable = typeof error.retryable === "boolean" ? error.retryable : undefined;
  const wait = error.retry_after_ms;
  const fields: ErrorFields = {
    requestId,
    retryAfterMs: Number.isInteger(wait) ? (wait as number) : 0,
    room: typeof error.room === "string" ? error.room : null,
    channels: Array.isArray(error.channels)
      ? error.channels.filter((c): c is string => typeof c === "string")
      : [],
  };
  if (retryable !== undefined) fields.retryable = retryable;
  const cls = Object.prototype.hasOwnProperty.call(ERROR_CLASSES, code)
    ? ERROR_CLASSES[code]
    : undefined;
  if (cls === undefined) return new CommandFailed(code, message, { ...fields, retryable: !!retryable });
  if (Number.isInteger(error.index)) {
    // One event refused a batch: which one.
    fields.eventIndex = error.index as number;
    fields.eventId = typeof error.event_id === "string" ? error.event_id : null;
  }
  if (cls === Kicked) {
    const reason = typeof error.reason === "string" ? error.reason : "";
    return new Kicked(message, { ...fields, reason });
  }
  return new cls(message, fields);
}
