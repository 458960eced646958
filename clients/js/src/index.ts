/** ArqonBus for JavaScript and TypeScript: the public API. */
export { Client, Subscription } from "./client.js";
export type {
  AuthMode,
  CallOptions,
  ClientOptions,
  ClientState,
  CommandHandler,
  HistoryAllOptions,
  HistoryOptions,
  PresenceOptions,
  PublishManyOptions,
  PublishOptions,
  StateDetail,
  SubscribeOptions,
  TokenSource,
  WebSocketConstructor,
  WebSocketLike,
} from "./client.js";
export * from "./errors.js";
export type { Ack, CommandRequest, Event, Gap, HistoryPage, Item, JsonObject, Welcome } from "./models.js";
export { MemberView } from "./presence.js";
export type {
  Member,
  MemberConnection,
  Occupancy,
  PresenceChange,
  PresenceEvent,
  PresencePage,
  PresenceState,
} from "./presence.js";
export { ClientProtocol, PROTOCOL_VERSION, SubscriptionState } from "./protocol.js";
export type { IdFactory, ProtocolEvent, SubscriptionStateOptions } from "./protocol.js";
