/**
 * Presence as plain data, and the member list a subscription keeps (no I/O).
 *
 * A {@link MemberView} keeps a channel's member list by snapshot + diff: it reads `presence`
 * pages, buffers the frames that arrive meanwhile, and applies a change only when its
 * position is above the position it already has for that principal, so no member is
 * counted twice or missed.
 */

import { int, isObject, obj, str, type JsonObject } from "./models.js";

export type PresenceState = "online" | "idle";

/** Changes a MemberView holds while a snapshot is read; more restart the snapshot. */
const MAX_BUFFERED_CHANGES = 100_000;

/** A channel's counts: members (principals), connections (sessions), by state. */
export interface Occupancy {
  members: number;
  connections: number;
  online: number;
  idle: number;
  /** The view's position, when the gateway gave it. */
  position: number | null;
}

/** One session of a member. */
export interface MemberConnection {
  session: string;
  gateway: string;
  state: PresenceState;
  joinedAt: number;
}

/** A principal present in a channel (the union of its sessions there). */
export interface Member {
  principal: string;
  state: PresenceState;
  metadata: JsonObject;
  joinedAt: number;
  connections: MemberConnection[];
  connectionCount: number;
}

/** One page of the `presence` command: members sorted by principal. */
export interface PresencePage {
  members: Member[];
  /** null on the last page. */
  nextCursor: string | null;
  position: number;
  occupancy: Occupancy;
}

/** One member's change in a `presence` frame. */
export interface PresenceChange {
  action: "join" | "update" | "leave";
  principal: string;
  position: number;
  state: PresenceState | null;
  metadata: JsonObject;
  connections: number;
}

/** One `presence` frame of a subscription joined with presence events. */
export interface PresenceEvent {
  room: string;
  channel: string;
  position: number;
  changes: PresenceChange[];
  /** Too many changes to list: re-read the member list. */
  overflow: boolean;
  occupancy: Occupancy | null;
}

const num = (v: unknown): number => (typeof v === "number" && Number.isFinite(v) ? v : 0);
const stateOf = (v: unknown): PresenceState => (v === "idle" ? "idle" : "online");

export function occupancyFromWire(data: unknown): Occupancy {
  const d = obj(data);
  return {
    members: int(d.members),
    connections: int(d.connections),
    online: int(d.online),
    idle: int(d.idle),
    position: Number.isInteger(d.position) ? (d.position as number) : null,
  };
}

export function memberFromWire(data: unknown): Member {
  const d = obj(data);
  const connections = (Array.isArray(d.connections) ? d.connections : []).map((c) => {
    const x = obj(c);
    return { session: str(x.session), gateway: str(x.gateway), state: stateOf(x.state), joinedAt: num(x.joined_at) };
  });
  return {
    principal: str(d.principal),
    state: stateOf(d.state),
    metadata: obj(d.metadata),
    joinedAt: num(d.joined_at),
    connections,
    connectionCount: connections.length,
  };
}

export function pageFromWire(result: JsonObject): PresencePage {
  const members = (Array.isArray(result.members) ? result.members : []).map(memberFromWire);
  const cursor = result.next_cursor;
  return {
    members: members.filter((m) => m.principal),
    nextCursor: typeof cursor === "string" && cursor ? cursor : null,
    position: int(result.position),
    occupancy: occupancyFromWire(result.occupancy),
  };
}

function changeFromWire(data: unknown): PresenceChange | null {
  const d = obj(data);
  const { action, principal } = d;
  if ((action !== "join" && action !== "update" && action !== "leave") || typeof principal !== "string") {
    return null;
  }
  const position = int(d.position);
  if (action === "leave") return { action, principal, position, state: null, metadata: {}, connections: 0 };
  return { action, principal, position, state: stateOf(d.state), metadata: obj(d.metadata), connections: int(d.connections) };
}

/** From a `presence` frame (its fields at the top level, or under `payload`). */
export function presenceFromWire(message: JsonObject): PresenceEvent {
  let body = message;
  const payload = message.payload;
  if (isObject(payload) && ("changes" in payload || "overflow" in payload)) body = payload;
  const changes = (Array.isArray(body.changes) ? body.changes : [])
    .map(changeFromWire)
    .filter((c): c is PresenceChange => c !== null);
  return {
    room: str(message.room),
    channel: str(message.channel),
    position: int(body.position),
    changes,
    overflow: body.overflow === true,
    occupancy: isObject(body.occupancy) ? occupancyFromWire(body.occupancy) : null,
  };
}

/**
 * A channel's members, kept current by snapshot + diff.
 *
 * `begin` a snapshot (returns its number), feed each page to `addPage`, then `finish`; feed
 * every presence frame to `apply` meanwhile and after. `apply` returns true when the list
 * cannot be kept from the frame (an overflow, or too many buffered changes): begin anew.
 */
export class MemberView {
  /** The present members by principal (live: the same Map is updated in place). */
  readonly members = new Map<string, Member>();
  synced = false;
  position = 0;
  private _positions = new Map<string, number>();
  private _bounds: string[] = [];
  private _pagePositions: number[] = [];
  private generation = 0;
  private _loading: Map<string, Member> | null = null;
  private _loadingPositions = new Map<string, number>();
  private _buffer: PresenceChange[] = [];

  get isLoading(): boolean {
    return this._loading !== null;
  }

  begin(): number {
    this.generation += 1;
    this._loading = new Map();
    this._loadingPositions = new Map();
    this._bounds = [];
    this._pagePositions = [];
    this._buffer = [];
    return this.generation;
  }

  addPage(generation: number, page: PresencePage): boolean {
    if (generation !== this.generation || this._loading === null) return false;
    for (const m of page.members) {
      this._loading.set(m.principal, m);
      this._loadingPositions.set(m.principal, page.position);
    }
    if (page.nextCursor === null) this._bounds.push("");
    else if (page.members.length) this._bounds.push(page.members[page.members.length - 1]!.principal);
    else return true; // an empty page in the middle covers nobody
    this._pagePositions.push(page.position);
    return true;
  }

  finish(generation: number): boolean {
    if (generation !== this.generation || this._loading === null) return false;
    this.members.clear();
    for (const [k, v] of this._loading) this.members.set(k, v);
    this._positions = this._loadingPositions;
    this._loading = null;
    this._loadingPositions = new Map();
    this.position = this._pagePositions.length ? Math.max(...this._pagePositions) : 0;
    const buffered = this._buffer;
    this._buffer = [];
    for (const change of buffered) this._applyChange(change);
    this.synced = true;
    return true;
  }

  apply(event: PresenceEvent): boolean {
    if (event.overflow) return true;
    if (this._loading !== null) {
      this._buffer.push(...event.changes);
      return this._buffer.length > MAX_BUFFERED_CHANGES;
    }
    for (const change of event.changes) this._applyChange(change);
    return false;
  }

  clear(): void {
    this.generation += 1;
    this.members.clear();
    this._positions = new Map();
    this._loading = null;
    this._buffer = [];
    this.synced = false;
  }

  /** The position the list reflects for `principal`. */
  knownPosition(principal: string): number {
    const known = this._positions.get(principal);
    if (known !== undefined) return known;
    if (!this._bounds.length) return 0;
    const closed = this._bounds[this._bounds.length - 1] === "" ? this._bounds.slice(0, -1) : this._bounds;
    let lo = 0;
    let hi = closed.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (closed[mid]! < principal) lo = mid + 1;
      else hi = mid;
    }
    return this._pagePositions[Math.min(lo, this._pagePositions.length - 1)]!;
  }

  private _applyChange(change: PresenceChange): void {
    if (change.position <= this.knownPosition(change.principal)) return;
    this.position = Math.max(this.position, change.position);
    if (change.action === "leave") {
      this.members.delete(change.principal);
      this._positions.delete(change.principal);
      return;
    }
    const old = this.members.get(change.principal);
    this.members.set(change.principal, {
      principal: change.principal,
      state: change.state ?? "online",
      metadata: change.metadata,
      joinedAt: old ? old.joinedAt : 0,
      connections: old ? old.connections : [],
      connectionCount: change.connections,
    });
    this._positions.set(change.principal, change.position);
  }
}
