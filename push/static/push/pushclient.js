// The browser client of the push server's wire contract, version 1 (docs/protocol.md).
//
// An ES module with no dependencies and no build step:
//
//   import { PushClient } from "/static/push/pushclient.js";
//   const client = new PushClient("ws://127.0.0.1:8000/ws/", { token });
//   client.on("state", ({ state }) => console.log(state));
//   await client.connect();
//   await client.subscribe("news", (message) => console.log(message.seq, message.data));
//   await client.publish("news", { headline: "hello" });
//
// It reconnects with capped exponential backoff and full jitter, resumes every channel
// with `since` (the last seq it delivered), fills gaps from the REST history, and keeps
// the connection honest with the contract's heartbeat. MessagePack is used when the caller passes an
// `{ encode, decode }` pair as `msgpack` (for example the vendored `./msgpack.js`).
//
// When the WebSocket cannot connect (a proxy that refuses the upgrade, a browser
// without WebSocket) it falls back to Server-Sent Events (docs/protocol.md, "Server-Sent
// Events") and publishes over REST, keeping its subscriptions and per-channel cursors,
// and tries the WebSocket again from time to time. The policy is `preferredTransport`.
//
// `subscribe(channel, handler, { token })` carries a signed subscription token (a string, or
// a provider asked for each subscribe the client sends for the channel), and with a
// provider extends the subscription with a fresh token before the token's `exp`. On the
// SSE fallback the stream carries it (`subscription_token=<channel>:<token>`), and a
// channel the server ends at the token's `exp` comes back on a new stream with a fresh
// token and its cursor.
//
// `subscribe(channel, handler, { delta: true })` asks for fossil deltas (docs/protocol.md):
// the client applies them, so the handler always sees `data`. They are applied with
// `./fossil-delta.js`, the npm package fossil-delta 2.0.0 (Dmitry Chestnykh, BSD; its
// LICENSE is `./fossil-delta.LICENSE`), vendored as it is published: an ES module the
// browser imports from next to this file, with no build step and no import map.

import { applyDelta } from "./fossil-delta.js";

export const State = Object.freeze({
  CONNECTING: "connecting",
  CONNECTED: "connected",
  RECONNECTING: "reconnecting",
  DISCONNECTED: "disconnected",
  // Connected through the Server-Sent Events fallback: messages arrive, publishing goes
  // through REST, subscribe and unsubscribe reopen the stream.
  SSE: "sse",
});

export const Transport = Object.freeze({
  WEBSOCKET: "websocket",
  SSE: "sse",
});

// Every allowed transition; anything else is a bug in this file and throws.
const TRANSITIONS = Object.freeze({
  [State.DISCONNECTED]: [State.CONNECTING],
  [State.CONNECTING]: [State.CONNECTED, State.RECONNECTING, State.DISCONNECTED, State.SSE],
  [State.CONNECTED]: [State.RECONNECTING, State.DISCONNECTED],
  [State.RECONNECTING]: [State.CONNECTED, State.DISCONNECTED, State.SSE],
  [State.SSE]: [State.CONNECTED, State.RECONNECTING, State.DISCONNECTED],
});

// Close codes after which retrying cannot help (docs/protocol.md, "Close codes"): a normal
// close, a policy close (bad token, rate limit: retry only with a new token), and a
// frame too large (the client must be fixed). Everything else, including 1006 (the
// network dropped or the handshake was refused), is retried with backoff.
const TERMINAL_CLOSE_CODES = new Set([1000, 1008, 1009]);

export const DEFAULT_BASE_DELAY_MS = 500;
export const DEFAULT_MAX_DELAY_MS = 30_000;
// One failed WebSocket open is often a node restarting; two in a row, while the page
// itself loaded over HTTP, more likely a proxy that refuses the upgrade.
export const DEFAULT_SSE_FALLBACK_AFTER = 2;
const DEFAULT_REQUEST_TIMEOUT_MS = 10_000;
// A proxy that accepts the upgrade and then forwards nothing hangs a handshake for
// minutes; without this bound such a WebSocket would never count as failed.
const DEFAULT_OPEN_TIMEOUT_MS = 10_000;
const DEFAULT_HEARTBEAT_INTERVAL_MS = 25_000;
// What the client takes of a greeting's heartbeat_interval: a server (or a proxy) that
// sent 0, a negative or a tiny interval made it send heartbeats in a tight loop.
const MIN_HEARTBEAT_INTERVAL_MS = 100;
// The greeting's heartbeat_interval in ms: the default when it is no positive finite
// number, and at least MIN_HEARTBEAT_INTERVAL_MS.
function serverHeartbeatMs(interval) {
  if (typeof interval !== "number" || !Number.isFinite(interval) || interval <= 0) {
    return DEFAULT_HEARTBEAT_INTERVAL_MS;
  }
  return Math.max(interval * 1000, MIN_HEARTBEAT_INTERVAL_MS);
}
// The backoff starts again at its base only after a connection that stayed up this long:
// a node that greets and closes at once (a server error, a slow consumer's replay that
// overflows again) would otherwise have all its clients knock again within the base
// delay, over and over, instead of backing off as they do while it refuses them.
export const DEFAULT_STABLE_AFTER_MS = 5_000;
// Browsers only let a page close with 1000 or 3000-4999; 4001 mirrors the server's own
// heartbeat-timeout code so logs read the same on both sides.
const HEARTBEAT_TIMEOUT_CLOSE = 4001;
// An event stream has no close code; a lost or refused one is reported like a WebSocket
// that dropped without a close frame, so `close` listeners see one shape.
const STREAM_LOST_CLOSE = 1006;
// Reads of a gap's messages before the client gives the range up as unrecovered: a node
// restarting answers again within a few backoff delays; a refusal never will.
export const GAP_FETCH_ATTEMPTS = 3;
// Messages of one channel held while its gap is read from the history. A channel that
// goes on at its pace while the history is slow (retries, a Retry-After of seconds) would
// otherwise make the client hold all of it; past the bound messages are not kept, and
// are read from the history too once the held ones are delivered.
export const DEFAULT_MAX_HELD_MESSAGES = 1000;
// Refusals of a subscribe that say "not now" (a dependency down, a budget spent): a
// subscription the client already holds is asked for again after a backoff delay.
const TRY_AGAIN_CODES = new Set(["RATE_LIMITED", "UNAVAILABLE"]);
// The server's largest history page (PUSH_HISTORY_PAGE_MAX's default); a smaller server
// limit only means more pages.
const HISTORY_PAGE_MAX = 1000;
// Where a history read carries the channel's signed subscription token.
const SUBSCRIPTION_TOKEN_HEADER = "X-Subscription-Token";
// The delta algorithm asked for, and how many deltas may fail in a row on a channel
// before the client stops asking for them there.
const FOSSIL = "fossil";
export const DELTA_FAILURES_MAX = 2;
// The largest data text a delta may make (it declares its output size first): a broken
// or hostile server could otherwise build gigabytes from a small base with a few bytes
// of copy commands. As the Python client's frame limit: 16 times the server's default.
export const DEFAULT_MAX_DELTA_BYTES = 16 * 1024 * 1024;
// Fossil writes its integers in this base-64 alphabet, most significant digit first.
const FOSSIL_DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~";
// A subscription whose signed token comes from a provider is extended with a fresh token
// at 90% of the token's lifetime, and at least this long before its `exp` (half-way
// through a token shorter than twice this): the server ends it within its revocation
// check interval after `exp`, and a provider may take a round trip to the back-end.
export const TOKEN_REFRESH_LEAD_MS = 5_000;
// Never sooner after a token was obtained: a provider whose tokens look expired already
// (a back-end's clock far behind) is asked once a second at most, never in a loop.
export const MIN_TOKEN_REFRESH_MS = 1_000;
// How much sooner than the client reckons a token's `exp` (from when it asked for the
// token, over the token's lifetime) the server may end its subscription on a stream:
// `iat` is whole seconds, so the token may have been minted up to a second before.
const TOKEN_EXPIRY_SLACK_MS = 1_000;
// Where an event stream carries a channel's signed subscription token, `<channel>:<token>`
// (docs/protocol.md, "Server-Sent Events"): a token never holds a colon.
const SUBSCRIPTION_TOKEN_PARAM = "subscription_token";

/** Capped exponential backoff with full jitter: uniform in [0, min(max, base * 2^attempt)]. */
export function backoffDelay(attempt, { baseMs = DEFAULT_BASE_DELAY_MS, maxMs = DEFAULT_MAX_DELAY_MS, random = Math.random } = {}) {
  // Full jitter spreads a crowd of clients that lost the same node over the whole
  // window, instead of all of them knocking again at the same instant.
  const ceiling = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30));
  return random() * ceiling;
}

export function isTerminalCloseCode(code) {
  return TERMINAL_CLOSE_CODES.has(code);
}

/** Raised (as a rejected promise) when the server answers a request with an `error` envelope. */
export class PushError extends Error {
  constructor(code, message, envelope = null) {
    super(`${code}: ${message}`);
    this.name = "PushError";
    this.code = code;
    this.envelope = envelope;
  }
}

const jsonFormat = Object.freeze({
  subprotocol: "v1.json",
  encode: (envelope) => JSON.stringify(envelope),
  decode: (frame) => JSON.parse(frame),
});

function msgpackFormat({ encode, decode, dataText: msgpackDataText }) {
  return Object.freeze({
    subprotocol: "v1.msgpack",
    encode: (envelope) => encode(envelope),
    decode: (frame) => decode(new Uint8Array(frame)),
    // The JSON text of a message's data read from the frame (msgpack.js has it).
    dataText: msgpackDataText ? (frame) => msgpackDataText(new Uint8Array(frame)) : null,
  });
}

function withToken(url, token) {
  if (!token) return url;
  const parsed = new URL(url, globalThis.location?.href);
  parsed.searchParams.set("token", token);
  return parsed.toString();
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function lowestKey(map) {
  let lowest = Infinity;
  for (const key of map.keys()) lowest = Math.min(lowest, key);
  return lowest;
}

function absoluteUrl(url) {
  return new URL(url, globalThis.location?.href).toString();
}

// The HTTP endpoints sit next to the WebSocket one: ws://host/ws/ -> http://host/sse/.
function siblingUrl(wsUrl, path) {
  const parsed = new URL(wsUrl, globalThis.location?.href);
  parsed.protocol = parsed.protocol === "wss:" ? "https:" : "http:";
  parsed.pathname = parsed.pathname.replace(/(^|\/)ws\/?$/, "$1").replace(/\/?$/, "/") + path;
  parsed.search = "";
  parsed.hash = "";
  return parsed.toString();
}

/** The SSE cursor `news:43,chat:7` (docs/protocol.md) as a Map; channel names may contain ":". */
export function parseCursor(text) {
  const cursor = new Map();
  for (const part of (text ?? "").split(",")) {
    const colon = part.lastIndexOf(":");
    const seq = part.slice(colon + 1);
    if (colon > 0 && /^\d+$/.test(seq)) cursor.set(part.slice(0, colon), Number(seq));
  }
  return cursor;
}

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder("utf-8", { fatal: true });

function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

// The JSON text of a message's data as the server holds it: the base of the next delta.
// In a JSON frame it is read as sent, between `"data":` and `,"timestamp":` (the server
// writes a message in that order; channel names and message ids hold no quote), so
// numbers like 1.0 and key order stay as they are; in a MessagePack frame `format`
// rebuilds it from the frame's bytes (msgpack.js's dataText). Otherwise (a codec without
// it, a frame of another layout) JSON.stringify, which differs from the server's text for
// floats without a fraction and integer-like keys: a delta on such data fails its
// checksum and the client recovers (see deltaFailed).
export function dataText(message, frame, format = null) {
  if (typeof frame === "string") {
    const start = frame.indexOf('"data":');
    const end = frame.lastIndexOf(',"timestamp":');
    if (start > 0 && end > start) return frame.slice(start + 7, end);
  } else if (frame && format?.dataText) {
    const text = format.dataText(frame);
    if (text !== null) return text;
  }
  return JSON.stringify(message.data);
}

/**
 * `base` (text) with the fossil delta `dataDelta` (base64) applied; throws unless the
 * result's length and checksum match, or when it declares more than `maxBytes`.
 */
export function applyDataDelta(base, dataDelta, maxBytes = DEFAULT_MAX_DELTA_BYTES) {
  const delta = base64Bytes(dataDelta);
  let size = 0;
  for (let i = 0, digit; i < delta.length && (digit = FOSSIL_DIGITS.indexOf(String.fromCharCode(delta[i]))) >= 0; i++) {
    size = size * 64 + digit;
  }
  if (size > maxBytes) throw new Error(`the delta makes ${size} bytes, over the ${maxBytes} allowed`);
  return textDecoder.decode(applyDelta(textEncoder.encode(base), delta));
}

/**
 * The claims of a signed subscription token (`<payload>.<signature>`, the payload
 * base64url JSON), or null when it has none that read. Not verified: only the server
 * can, and the client only needs `exp` to know when to ask for a fresh one.
 */
export function tokenClaims(token) {
  if (typeof token !== "string") return null;
  const payload = token.split(".", 1)[0].replace(/-/g, "+").replace(/_/g, "/");
  try {
    const claims = JSON.parse(textDecoder.decode(base64Bytes(payload + "=".repeat(-payload.length & 3))));
    return claims !== null && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/**
 * How long `token` lives from when it was obtained, in ms: `exp - iat`, so that a client
 * clock that is off does not matter (`exp` minus now without `iat`); null without `exp`.
 */
export function tokenLifetimeMs(token, nowMs = Date.now()) {
  const claims = tokenClaims(token);
  if (!Number.isFinite(claims?.exp)) return null;
  const fromIat = Number.isFinite(claims.iat) && claims.iat <= claims.exp;
  return fromIat ? (claims.exp - claims.iat) * 1000 : claims.exp * 1000 - nowMs;
}

/**
 * How long after obtaining `token` a subscription asks its provider for a fresh one, in
 * ms; null when the token names no `exp`. Over the token's lifetime, `exp - iat`, so
 * that a client clock that is off does not matter (`exp` minus now without `iat`): at
 * 90% of it, and at least TOKEN_REFRESH_LEAD_MS before `exp` (half-way for a short one).
 */
export function tokenRefreshDelayMs(token, nowMs = Date.now()) {
  const lifetimeMs = tokenLifetimeMs(token, nowMs);
  if (lifetimeMs === null) return null;
  const leadMs = Math.max(0.1 * lifetimeMs, Math.min(TOKEN_REFRESH_LEAD_MS, lifetimeMs / 2));
  return Math.max(MIN_TOKEN_REFRESH_MS, lifetimeMs - leadMs);
}

export function formatCursor(entries) {
  return [...entries].map(([channel, seq]) => `${channel}:${seq}`).join(",");
}

// Django's CSRF cookie: a session-authenticated REST publish must echo it in a header.
function csrfToken() {
  return globalThis.document?.cookie?.match(/(?:^|;\s*)csrftoken=([^;]+)/)?.[1] ?? null;
}

class Subscription {
  constructor(client, channel, handler, since, { rewind = null, occupancy = false, delta = false, token = null } = {}) {
    this.client = client;
    this.channel = channel;
    this.handler = handler;
    // A signed subscription token: a string, or a provider `(channel) => token` (or a
    // promise of one) asked for every subscribe the client sends for this channel.
    this.token = token;
    this.tokenRequest = null; // the provider call in flight, until it answers
    this.refreshTimer = null; // asks the provider again before the token's `exp`
    // Subscriptions the server ended by itself (a token expired) recovered in a row:
    // each waits a longer backoff, so tokens that end at once do not make a loop.
    this.endings = 0;
    // The socket on which the server holds this subscription (its `subscribed` came):
    // a subscribe sent there again extends it, with no replay and its delta base kept.
    this.heldOn = null;
    // Delta compression: asked for, and agreed by the server's `subscribed`. `base` is
    // { seq, text } of the channel's last message frame, what the next delta applies to.
    this.delta = delta;
    this.deltaAgreed = false;
    this.base = null;
    this.resyncing = false;
    this.deltaFailures = 0;
    // The last seq delivered to the handler (or the channel's seq when we joined): the
    // resume point for `since` after a reconnect.
    this.lastSeq = since ?? null;
    // Asked on the first subscribe only: a reconnect resumes with `since` instead.
    this.rewind = rewind;
    // True from the `subscribed` reply of a rewind until its first message: the server
    // may hold fewer than asked (history trimmed), so that message starts the run.
    this.rewinding = false;
    this.occupancy = occupancy;
    this.subscribers = null; // the last `occupancy` count, when asked for
    // After a resume, messages up to the `subscribed` reply's seq are replays of stored
    // history: handlers get `{ replayed: true }` so live statistics can leave them out.
    this.replayUntil = null;
    this.ready = null; // settled on the first `subscribed` (or error) reply
    this.pending = null; // the promise subscribe() returned, until it settles
    // While a gap is being repaired: seq -> { message, replayed } of what arrived
    // meanwhile (which also drops duplicates); null when delivery is not held back.
    this.held = null;
    // The highest seq not kept in `held` because it was full: read from the history.
    this.heldPast = 0;
    // A resubscribe refused for now (TRY_AGAIN_CODES): the timer that asks again, and
    // how many times in a row it was refused.
    this.retryTimer = null;
    this.refusals = 0;
  }

  unsubscribe() {
    return this.client.unsubscribe(this.channel);
  }
}

export class PushClient {
  constructor(url, options = {}) {
    this.url = url;
    this.token = options.token ?? null;
    this.format = options.msgpack ? msgpackFormat(options.msgpack) : jsonFormat;
    this.baseDelayMs = options.baseDelayMs ?? DEFAULT_BASE_DELAY_MS;
    this.maxDelayMs = options.maxDelayMs ?? DEFAULT_MAX_DELAY_MS;
    // The jitter source, uniform in [0, 1): a test passes a fixed one.
    this.random = options.random ?? Math.random;
    this.requestTimeoutMs = options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    // null: use what the server announces in connection_established.
    this.heartbeatIntervalMs = options.heartbeatIntervalMs ?? null;
    this.openTimeoutMs = options.openTimeoutMs ?? DEFAULT_OPEN_TIMEOUT_MS;
    this.maxHeldMessages = options.maxHeldMessages ?? DEFAULT_MAX_HELD_MESSAGES;
    this.stableAfterMs = options.stableAfterMs ?? DEFAULT_STABLE_AFTER_MS;
    this.maxDeltaBytes = options.maxDeltaBytes ?? DEFAULT_MAX_DELTA_BYTES;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.transports = options.transports ?? [Transport.WEBSOCKET, Transport.SSE];
    this.sseFallbackAfter = options.sseFallbackAfter ?? DEFAULT_SSE_FALLBACK_AFTER;
    this.sseUrl = absoluteUrl(options.sseUrl ?? siblingUrl(url, "sse/"));
    this.apiUrl = absoluteUrl(options.apiUrl ?? siblingUrl(url, "api/v1/"));
    this.EventSource = options.EventSource ?? globalThis.EventSource;
    this.fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);

    this.state = State.DISCONNECTED;
    this.transport = null; // of the current (or last) connection attempt
    this.protocol = null; // the subprotocol the server chose: "v1.json" or "v1.msgpack"
    this.serverId = null;
    this.connectionId = null;
    this.subscriptions = new Map();
    this.listeners = new Map();
    this.pending = new Map(); // request id -> { resolve, reject, timer, channel? }
    this.nextId = 1;
    this.attempt = 0;
    this.openedAt = null; // when the current connection (socket or stream) was established
    this.ws = null;
    this.openTimer = null;
    this.wsFailures = 0; // WebSocket opens that failed in a row
    // The Server-Sent Events stream (openStream): { source, channels, tokens, waiting,
    // gone, openedAt, openedAtMs, openTimer }
    this.stream = null;
    this.reopenTimer = null;
    this.probeTimer = null;
    this.closedByUser = false;
    this.reconnectTimer = null;
    this.heartbeatTimer = null;
    this.watchdogTimer = null;
    this.connectWaiters = [];
  }

  // ----- events ------------------------------------------------------------------------

  /**
   * Listen to "state", "open", "close", "message", "gap", "unrecovered", "error" or
   * "ended" ({channel, code, message}: a subscription gone for good, after its "error").
   * Returns an off function.
   */
  on(event, listener) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(listener);
    return () => this.off(event, listener);
  }

  off(event, listener) {
    this.listeners.get(event)?.delete(listener);
  }

  emit(event, detail) {
    for (const listener of this.listeners.get(event) ?? []) {
      try {
        listener(detail);
      } catch (error) {
        // One broken listener must not stop delivery to the others or kill the socket.
        console.error(`pushclient: a "${event}" listener failed`, error);
      }
    }
  }

  setState(next) {
    if (next === this.state) return;
    if (!TRANSITIONS[this.state].includes(next)) {
      throw new Error(`pushclient: cannot go from state "${this.state}" to "${next}"`);
    }
    const previous = this.state;
    this.state = next;
    this.emit("state", { state: next, previous });
  }

  // ----- connection --------------------------------------------------------------------

  /**
   * Open the connection; resolves on `connection_established` (over the WebSocket or the
   * SSE fallback), rejects if it closes for good first.
   */
  connect() {
    if (this.state === State.CONNECTED || this.state === State.SSE) return Promise.resolve(this);
    if (this.state === State.DISCONNECTED) {
      this.wsFailures = 0;
      const transport = this.preferredTransport();
      if (!transport) {
        return Promise.reject(new PushError("NO_TRANSPORT", `none of ${this.transports.join(", ")} is available here`));
      }
      this.closedByUser = false;
      this.attempt = 0;
      this.openedAt = null;
      this.setState(State.CONNECTING);
      // An event stream names its channels when it opens: wait one task so that
      // subscribe() calls made right after connect() ride on the first stream.
      if (transport === Transport.SSE) this.reconnectTimer = setTimeout(() => this.openTransport(transport), 0);
      else this.openTransport(transport);
    }
    return new Promise((resolve, reject) => this.connectWaiters.push({ resolve, reject }));
  }

  /** Close for good: no reconnect. Pending requests are rejected. */
  close() {
    this.closedByUser = true;
    clearTimeout(this.reconnectTimer);
    this.dropSocket(1000, "client closed");
    this.finish({ code: 1000, reason: "client closed" });
  }

  canUse(transport) {
    if (!this.transports.includes(transport)) return false;
    if (transport === Transport.WEBSOCKET) return typeof this.WebSocket === "function";
    return typeof this.EventSource === "function";
  }

  // The fallback policy: the WebSocket while it works; Server-Sent Events when the
  // WebSocket is not allowed (`transports`), not available, or failed to open
  // `sseFallbackAfter` times in a row. From SSE the WebSocket is retried by probes
  // (`scheduleProbe`), and a stream that fails to open hands back to the WebSocket.
  preferredTransport() {
    const webSocket = this.canUse(Transport.WEBSOCKET);
    if (!this.canUse(Transport.SSE)) return webSocket ? Transport.WEBSOCKET : null;
    return webSocket && this.wsFailures < this.sseFallbackAfter ? Transport.WEBSOCKET : Transport.SSE;
  }

  openTransport(transport) {
    this.transport = transport;
    if (transport === Transport.SSE) this.openStream();
    else this.openSocket();
  }

  openSocket() {
    const ws = new this.WebSocket(withToken(this.url, this.token), [this.format.subprotocol]);
    ws.binaryType = "arraybuffer";
    ws.onmessage = (event) => this.onFrame(ws, event.data);
    ws.onclose = (event) => this.onSocketClosed(ws, event.code, event.reason);
    // onerror is always followed by onclose, which decides what happens next.
    ws.onerror = () => {};
    this.ws = ws;
    this.openTimer = setTimeout(() => this.onOpenTimeout(ws), this.openTimeoutMs);
  }

  onOpenTimeout(ws) {
    if (ws !== this.ws) return;
    ws.onmessage = ws.onclose = ws.onerror = null;
    ws.close();
    this.onSocketClosed(ws, STREAM_LOST_CLOSE, `no connection_established within ${this.openTimeoutMs} ms`);
  }

  // Detach and close the current socket without letting its close event run our logic.
  dropSocket(code, reason) {
    const ws = this.ws;
    this.ws = null;
    clearTimeout(this.openTimer);
    this.stopHeartbeat();
    if (!ws) return;
    ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(code, reason);
    } catch {
      // Already closing: nothing to do.
    }
  }

  onSocketClosed(ws, code, reason) {
    if (ws !== this.ws) return;
    const opened = this.state === State.CONNECTED;
    this.ws = null;
    clearTimeout(this.openTimer);
    this.stopHeartbeat();
    if (this.transport === Transport.SSE) {
      // A probe from the SSE fallback that did not get through: the stream carries on.
      this.wsFailures += 1;
      this.scheduleProbe();
      return;
    }
    this.failPending(new PushError("CONNECTION_LOST", `connection closed (${code})`));
    if (this.closedByUser || isTerminalCloseCode(code)) {
      if (code === 1009) {
        this.emit("error", new PushError("MESSAGE_TOO_LARGE", "the server closed with 1009: a frame was too large"));
      }
      this.finish({ code, reason });
      return;
    }
    // A socket that worked and dropped says nothing against the WebSocket; one that
    // never reached connection_established counts towards the fallback.
    if (!opened) this.wsFailures += 1;
    this.scheduleReconnect({ code, reason }, this.preferredTransport());
  }

  backoff(attempt) {
    return backoffDelay(attempt, { baseMs: this.baseDelayMs, maxMs: this.maxDelayMs, random: this.random });
  }

  scheduleReconnect({ code, reason }, transport) {
    // The backoff starts again at its base after a connection that stayed up.
    if (this.openedAt !== null && Date.now() - this.openedAt >= this.stableAfterMs) this.attempt = 0;
    this.openedAt = null;
    const delayMs = this.backoff(this.attempt);
    this.attempt += 1;
    this.setState(State.RECONNECTING);
    this.emit("close", { code, reason, willReconnect: true, delayMs, transport: this.transport });
    this.reconnectTimer = setTimeout(() => {
      if (!this.closedByUser) this.openTransport(transport);
    }, delayMs);
  }

  finish({ code, reason }) {
    this.closeStream();
    this.cancelProbe();
    const wasOpen = this.state !== State.DISCONNECTED;
    if (wasOpen) this.setState(State.DISCONNECTED);
    this.failPending(new PushError("CONNECTION_CLOSED", `connection closed (${code})`));
    for (const subscription of [...this.subscriptions.values()]) {
      if (subscription.ready) {
        // A first subscribe cut short: its caller is told it failed, so it is not held
        // (a later connect() would subscribe it again for a caller that gave up).
        this.subscriptions.delete(subscription.channel);
        subscription.ready.reject(new PushError("CONNECTION_CLOSED", `connection closed (${code})`));
      }
      // A repair in flight stops; a later connect() resumes from the last seq delivered.
      subscription.held = null;
      this.stopTimers(subscription);
    }
    const error = new PushError("CONNECTION_CLOSED", `connection closed (${code}) ${reason ?? ""}`.trim());
    for (const waiter of this.connectWaiters.splice(0)) waiter.reject(error);
    if (wasOpen) this.emit("close", { code, reason, willReconnect: false, transport: this.transport });
  }

  // ----- inbound frames ----------------------------------------------------------------

  onFrame(ws, frame) {
    let envelope;
    try {
      envelope = this.format.decode(frame);
    } catch (error) {
      this.emit("error", error);
      return;
    }
    this.armWatchdog();
    // Every envelope is a map (a `null` would throw below, and a throw in a socket's
    // listener ends a Node process); anything else is skipped, as in the Python client.
    if (envelope === null || typeof envelope !== "object") return;
    switch (envelope.type) {
      case "connection_established":
        this.onEstablished(envelope);
        break;
      case "message": {
        const message = this.undelta(envelope, frame);
        if (message) this.onMessage(message);
        break;
      }
      case "subscribed":
        this.onSubscribed(envelope);
        break;
      case "occupancy":
        this.onOccupancy(envelope);
        break;
      case "error":
        this.onError(envelope);
        break;
      default:
        this.settle(envelope);
    }
  }

  onEstablished(envelope) {
    clearTimeout(this.openTimer);
    if (this.transport === Transport.SSE) {
      // A probe got through: leave the stream; the subscribes below resume every
      // channel from its cursor, so nothing is lost or repeated in the switch.
      this.closeStream();
      clearTimeout(this.probeTimer);
      this.probeTimer = null;
      this.transport = Transport.WEBSOCKET;
    }
    this.wsFailures = 0;
    this.serverId = envelope.server_id;
    this.connectionId = envelope.connection_id;
    this.protocol = this.ws?.protocol || null;
    this.openedAt = Date.now();
    this.startHeartbeat(this.heartbeatIntervalMs ?? serverHeartbeatMs(envelope.heartbeat_interval));
    this.setState(State.CONNECTED);
    this.emit("open", envelope);
    for (const subscription of this.subscriptions.values()) this.sendSubscribe(subscription);
    for (const waiter of this.connectWaiters.splice(0)) waiter.resolve(this);
  }

  onMessage(message, replayed = null) {
    const subscription = this.subscriptions.get(message.channel);
    if (!subscription) return;
    if (subscription.held) {
      // A gap is being repaired: the repair delivers this one in its turn.
      if (subscription.held.size < this.maxHeldMessages) subscription.held.set(message.seq, { message, replayed });
      else subscription.heldPast = Math.max(subscription.heldPast, message.seq);
      return;
    }
    if (subscription.rewinding) this.startRewound(subscription, message.seq);
    const last = subscription.lastSeq;
    // A resume may overlap what was already delivered; never hand the same seq twice.
    if (last !== null && message.seq <= last) return;
    if (last !== null && message.seq > last + 1) {
      subscription.held = new Map([[message.seq, { message, replayed }]]);
      subscription.heldPast = 0;
      this.repairGaps(subscription, subscription.held);
      return;
    }
    this.deliver(subscription, message, replayed);
  }

  // ----- delta compression -------------------------------------------------------------

  // The message with `data` (a delta applied to the base), remembering its text as the
  // next base; null when dropped: a resubscription is on its way, or this delta does
  // not apply, which starts one. A wrong base never yields data.
  undelta(message, frame) {
    const subscription = this.subscriptions.get(message.channel);
    if (!subscription || !(subscription.deltaAgreed || message.delta)) return message;
    if (subscription.resyncing) return null; // the old subscription's last frames
    if (!message.delta) {
      if ("data" in message) subscription.base = { seq: message.seq, text: dataText(message, frame, this.format) };
      return message;
    }
    let text;
    let data;
    try {
      const base = subscription.base;
      if (!base || base.seq !== message.seq - 1) throw new Error(`a delta for seq ${message.seq} without the message before it`);
      text = applyDataDelta(base.text, message.data_delta, this.maxDeltaBytes);
      data = JSON.parse(text);
    } catch (error) {
      this.deltaFailed(subscription, message.seq, error);
      return null;
    }
    subscription.base = { seq: message.seq, text };
    subscription.deltaFailures = 0;
    const { delta: _delta, data_delta: _dataDelta, ...rest } = message;
    return { ...rest, data };
  }

  // Resubscribe with `since` = the last seq delivered: the server replays the rest in
  // full and deltas follow from there. After DELTA_FAILURES_MAX failures in a row the
  // channel goes on without delta (something changes the data's text on the way, or
  // JSON.stringify cannot reproduce it).
  deltaFailed(subscription, seq, error) {
    subscription.base = null;
    subscription.deltaFailures += 1;
    if (subscription.deltaFailures >= DELTA_FAILURES_MAX) subscription.delta = false;
    this.emit("error", new PushError("DELTA_MISMATCH", `"${subscription.channel}" seq ${seq}: ${error.message}; resubscribing`));
    subscription.resyncing = true;
    // Unsubscribed below: the subscribe after it is a new subscription, not an extension.
    subscription.heldOn = null;
    clearTimeout(subscription.refreshTimer);
    const { ws } = this;
    const subscribeAgain = () => {
      subscription.resyncing = false;
      // Not after the connection dropped: the reconnect subscribes again from the last seq.
      if (this.subscriptions.get(subscription.channel) === subscription && this.state === State.CONNECTED && this.ws === ws) {
        this.sendSubscribe(subscription);
      }
    };
    // Refused (NOT_SUBSCRIBED) or not answered in time, the unsubscribe is still followed
    // by the subscribe: the server handles a connection's frames in order, and without it
    // the channel would be silent.
    this.request({ type: "unsubscribe", channel: subscription.channel }).then(subscribeAgain, subscribeAgain);
  }

  deliver(subscription, message, replayed = null) {
    // Unsubscribed meanwhile (by a handler, during a repair's run): nothing more.
    if (this.subscriptions.get(subscription.channel) !== subscription) return;
    subscription.lastSeq = message.seq;
    subscription.refusals = 0; // received: on SSE no `subscribed` says so
    const meta = { replayed: replayed ?? (subscription.replayUntil !== null && message.seq <= subscription.replayUntil) };
    this.emit("message", message);
    try {
      subscription.handler?.(message, meta);
    } catch (error) {
      console.error(`pushclient: the handler of "${message.channel}" failed`, error);
    }
  }

  // ----- gap repair --------------------------------------------------------------------

  // Hold the channel's delivery, read each missing range from the REST history, then
  // hand everything over in seq order. The server delivers in order without gaps, so a
  // gap means frames were lost on the way: a drop-oldest channel whose reader fell
  // behind, or a bug. REST rather than a second subscribe: on a drop-oldest channel the
  // server would push that replay through the same send queue that just overflowed.
  async repairGaps(subscription, held) {
    // An unsubscribe or close() sets `held` to null (or a later repair to its own map); a
    // refusal drops the subscription.
    const wanted = () => subscription.held === held && this.subscriptions.get(subscription.channel) === subscription;
    try {
      while (wanted()) {
        this.deliverHeldRun(subscription, held);
        const after = subscription.lastSeq;
        let to;
        if (held.size) {
          const received = lowestKey(held);
          to = received - 1;
          this.emit("gap", { channel: subscription.channel, from: after + 1, to, expected: after + 1, received });
        } else if (subscription.heldPast > after) {
          // Received while `held` was full, and not kept: read back as well.
          to = subscription.heldPast;
        } else break;
        await this.fillFromHistory(subscription, to, wanted);
      }
    } catch (error) {
      // A bug here must not hold the channel back for good.
      console.error(`pushclient: repairing a gap of "${subscription.channel}" failed`, error);
    }
    if (wanted()) subscription.held = null;
  }

  // Deliver the seqs after the last delivered up to `until` from the history, a page at
  // a time; what it does not have (trimmed) or will not give is given up.
  async fillFromHistory(subscription, until, wanted) {
    for (let after = subscription.lastSeq; after < until; after = subscription.lastSeq) {
      const page = await this.fetchMissing(subscription, after, until, wanted);
      if (!wanted()) return;
      if (!page.length) break;
      for (const message of page) {
        if (message.seq > subscription.lastSeq + 1) this.giveUp(subscription, message.seq - 1);
        if (message.seq > subscription.lastSeq) this.deliver(subscription, message, true);
      }
    }
    if (subscription.lastSeq < until) this.giveUp(subscription, until);
  }

  // Deliver the held messages that follow on from the last seq, then forget the ones at
  // or below it (duplicates from a resume or from the history read).
  deliverHeldRun(subscription, held) {
    for (let next = held.get(subscription.lastSeq + 1); next; next = held.get(subscription.lastSeq + 1)) {
      held.delete(next.message.seq);
      this.deliver(subscription, next.message, next.replayed);
    }
    for (const seq of held.keys()) if (seq <= subscription.lastSeq) held.delete(seq);
  }

  async fetchMissing(subscription, after, until, wanted) {
    let failure = null;
    for (let attempt = 0; attempt < GAP_FETCH_ATTEMPTS; attempt++) {
      // Not sooner than the server asked (429, 503): sooner is refused again.
      if (attempt) await sleep(Math.max(this.backoff(attempt - 1), Math.min(failure.retryAfterMs ?? 0, this.maxDelayMs)));
      if (!wanted()) return [];
      try {
        return await this.fetchPage(subscription.channel, after, until, await this.historyToken(subscription));
      } catch (error) {
        failure = error;
      }
    }
    this.emit("error", new PushError("GAP_REPAIR_FAILED", `reading seqs ${after + 1}-${until} of "${subscription.channel}": ${failure.message}`));
    return [];
  }

  // The first page of stored messages after `after`, oldest first, the ones up to
  // `until`: empty when nothing is stored in that range (trimmed), or when the page does
  // not move on (a cache that ignores the query, a buggy server). One page at a time,
  // each delivered before the next is read: a long gap costs the memory of one page.
  // Asked for with our own `since` rather than the reply's `next` URL, whose host a
  // proxy may have rewritten. `subscriptionToken`, the channel's signed subscription
  // token, opens its history as it opens the subscribe: in a header, so that it stays
  // out of URLs and access logs.
  async fetchPage(channel, after, until, subscriptionToken = null) {
    if (!this.fetch) throw new PushError("NOT_CONNECTED", "no fetch() to read the history");
    const url = new URL(this.channelUrl(channel));
    url.searchParams.set("since", after);
    url.searchParams.set("limit", Math.min(HISTORY_PAGE_MAX, until - after));
    const response = await this.fetch(url.toString(), {
      headers: this.restHeaders(subscriptionToken ? { [SUBSCRIPTION_TOKEN_HEADER]: subscriptionToken } : {}),
      credentials: "same-origin",
      signal: AbortSignal.timeout(this.requestTimeoutMs),
    });
    if (!response.ok) {
      const refusal = new PushError(`HTTP_${response.status}`, `history read answered ${response.status}`);
      refusal.retryAfterMs = Math.max(0, Number(response.headers?.get("Retry-After")) * 1000 || 0);
      throw refusal;
    }
    return (await response.json()).results.filter((message) => message.seq > after && message.seq <= until);
  }

  // The signed subscription token a history read carries: a channel the client holds
  // only by token is read only with it. A provider is asked for a fresh one for each
  // read, as for each subscribe: the one it gave last may have expired since.
  async historyToken(subscription) {
    if (typeof subscription.token === "function") return await this.tokenFrom(subscription);
    return subscription.token;
  }

  // Move past seqs the history no longer has (trimmed) or would not give: the
  // application hears `unrecovered`, as for a resume answered `recovered: false`.
  giveUp(subscription, until) {
    this.emit("unrecovered", { channel: subscription.channel, since: subscription.lastSeq, seq: until });
    subscription.lastSeq = until;
  }

  // The first message after a rewind's reply: a stored one (up to the reply's seq)
  // starts the run even when the server held fewer than asked; a live one follows the
  // reply's seq, and anything missing before it is a gap as usual.
  startRewound(subscription, seq) {
    subscription.rewinding = false;
    const from = Math.min(seq, subscription.replayUntil + 1) - 1;
    if (from > subscription.lastSeq) subscription.lastSeq = from;
  }

  onOccupancy(envelope) {
    const subscription = this.subscriptions.get(envelope.channel);
    if (subscription) subscription.subscribers = envelope.subscribers;
    this.emit("occupancy", envelope);
  }

  // The subscription a reply to a subscribe is for, while the application still holds
  // it: a late reply to a request of a subscription it unsubscribed since is not the
  // business of a newer one of the same channel.
  subscriptionReplied(reply) {
    const subscription = reply.id === undefined ? null : this.pending.get(reply.id)?.subscription;
    return subscription && this.subscriptions.get(subscription.channel) === subscription ? subscription : null;
  }

  onSubscribed(reply) {
    const subscription = this.subscriptionReplied(reply);
    if (subscription) {
      const { extending, refreshAt } = this.pending.get(reply.id);
      subscription.heldOn = this.ws;
      // Extended with a fresh token: the subscription lives on, as it should.
      if (extending) subscription.endings = 0;
      this.scheduleRefresh(subscription, refreshAt);
      if (subscription.lastSeq === null && subscription.rewind) {
        // The last `rewind` messages up to the reply's seq come first, as replays.
        subscription.lastSeq = Math.max(0, reply.seq - subscription.rewind);
        subscription.replayUntil = reply.seq;
        subscription.rewinding = reply.seq > subscription.lastSeq;
      } else if (subscription.lastSeq === null) {
        // Without `since` the reply's seq is the channel's latest: live messages follow it.
        subscription.lastSeq = reply.seq;
      } else subscription.replayUntil = reply.seq;
      subscription.deltaAgreed = reply.delta === FOSSIL;
      subscription.refusals = 0;
      if (reply.recovered === false) {
        // The server could not replay everything after `since` (history trimmed): the
        // application refetches its state up to the reply's seq over REST, and the
        // handler goes on after it. What the server still replays up to it would reach
        // the application twice, and what a repair held is covered by the refetch too.
        // A cursor past the reply's seq (the channel's history was reset) goes back to
        // it: the seqs after it are new messages, not ones delivered.
        this.emit("unrecovered", { channel: reply.channel, since: subscription.lastSeq, seq: reply.seq });
        subscription.held = null;
        subscription.lastSeq = reply.seq;
      }
    }
    this.settle(reply);
  }

  onError(envelope) {
    const error = new PushError(envelope.code, envelope.message, envelope);
    if (envelope.id === undefined || !this.pending.has(envelope.id)) {
      // Without `id` but naming a channel the server holds for us: it ended that
      // subscription by itself (a grant removed, a signed token expired).
      const ended = envelope.id === undefined ? this.subscriptions.get(envelope.channel) : null;
      if (ended && ended.heldOn === this.ws) this.onSubscriptionEnded(ended, error);
      else this.emit("error", error);
      return;
    }
    const { subscription, extending } = this.pending.get(envelope.id);
    if (subscription && !this.subscriptionReplied(envelope)) {
      // Refused after the application unsubscribed: nothing to drop or retry.
      this.settle(envelope, error);
      return;
    }
    if (subscription && !subscription.ready) {
      // A subscription the application holds, asked for again (a reconnect, a delta
      // resync, a fresh token): it must not end without a word.
      if (TRY_AGAIN_CODES.has(error.code)) {
        this.emit("error", error);
        this.subscribeAgain(subscription);
        this.settle(envelope, error);
        return;
      }
      // A refused fresh token: the server still holds the subscription until the old
      // one's `exp`, and is told to stop now rather than deliver to nobody until then.
      this.settle(envelope, error);
      this.endSubscription(subscription, error, { tellServer: extending });
      return;
    }
    // A refused subscribe must not be retried on every reconnect.
    if (subscription) this.dropSubscription(subscription);
    this.settle(envelope, error);
  }

  // The server ended a subscription by itself. With a token provider the client asks
  // it for a fresh token and subscribes again from the last seq delivered, after a
  // backoff that grows while such endings follow each other; the application hears of
  // it only if that fails. Without one the subscription ends for good.
  onSubscriptionEnded(subscription, error) {
    subscription.heldOn = null;
    clearTimeout(subscription.refreshTimer);
    if (typeof subscription.token !== "function") {
      this.endSubscription(subscription, error);
      return;
    }
    this.subscribeLater(subscription, this.backoff(subscription.endings));
    subscription.endings += 1;
  }

  // A subscription the application held is gone for good (the server ended or refused
  // it, and the client will not ask again): the `error`, then `ended`, which names the
  // channel, so that the application need not read it from the error's envelope. The
  // message is the server's, as in the Python client's event.
  endSubscription(subscription, error, { tellServer = false } = {}) {
    this.dropSubscription(subscription, { tellServer });
    this.emit("error", error);
    this.emit("ended", { channel: subscription.channel, code: error.code, message: error.envelope?.message ?? "" });
  }

  // Forget a subscription the server refused or ended: not asked for again after a
  // reconnect, and a new subscribe() of its channel sends a new request.
  dropSubscription(subscription, { tellServer = false } = {}) {
    if (this.subscriptions.get(subscription.channel) !== subscription) return;
    this.subscriptions.delete(subscription.channel);
    subscription.held = null;
    this.stopTimers(subscription);
    if (tellServer) this.request({ type: "unsubscribe", channel: subscription.channel }).catch(() => {});
  }

  stopTimers(subscription) {
    clearTimeout(subscription.retryTimer);
    clearTimeout(subscription.refreshTimer);
    subscription.retryTimer = subscription.refreshTimer = subscription.tokenRequest = null;
  }

  // Ask again, after a backoff delay, for a subscription refused for now: a subscribe on
  // the same WebSocket, or on SSE a new stream.
  subscribeAgain(subscription) {
    this.subscribeLater(subscription, this.backoff(subscription.refusals));
    subscription.refusals += 1;
  }

  subscribeLater(subscription, delayMs) {
    const { ws, stream } = this;
    clearTimeout(subscription.retryTimer);
    subscription.retryTimer = setTimeout(() => {
      subscription.retryTimer = null;
      if (this.subscriptions.get(subscription.channel) !== subscription) return;
      if (this.state === State.CONNECTED && this.ws === ws) this.sendSubscribe(subscription);
      else if (this.state === State.SSE && this.stream === stream) this.reopenStreamSoon();
    }, delayMs);
  }

  settle(reply, error = null) {
    if (reply.id === undefined) return;
    const request = this.pending.get(reply.id);
    if (!request) return;
    this.pending.delete(reply.id);
    clearTimeout(request.timer);
    if (error) request.reject(error);
    else request.resolve(reply);
  }

  failPending(error) {
    for (const [id, request] of this.pending) {
      clearTimeout(request.timer);
      this.pending.delete(id);
      // A subscribe in flight is sent again after the reconnect; its caller keeps waiting.
      if (!request.subscription) request.reject(error);
    }
  }

  // ----- requests ----------------------------------------------------------------------

  send(envelope) {
    this.ws.send(this.format.encode(envelope));
  }

  request(envelope, extra = {}) {
    if (this.state !== State.CONNECTED || !this.ws) {
      return Promise.reject(new PushError("NOT_CONNECTED", `cannot send "${envelope.type}" while ${this.state}`));
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new PushError("TIMEOUT", `no reply to "${envelope.type}" within ${this.requestTimeoutMs} ms`));
      }, this.requestTimeoutMs);
      this.pending.set(id, { resolve, reject, timer, ...extra });
      this.send({ ...envelope, id });
    });
  }

  // Send a subscribe for `subscription`: at once, or, with a token provider, once it
  // has given a token (a provider call superseded by a newer subscribe, or answering
  // after the connection changed, sends nothing: the newer one or the reconnect does).
  sendSubscribe(subscription) {
    if (typeof subscription.token !== "function") {
      this.sendSubscribeWith(subscription, subscription.token);
      return;
    }
    const { ws } = this;
    const call = {};
    subscription.tokenRequest = call;
    this.tokenFrom(subscription).then(
      (token) => {
        if (subscription.tokenRequest !== call) return;
        subscription.tokenRequest = null;
        const current = this.subscriptions.get(subscription.channel) === subscription;
        if (current && this.ws === ws && this.state === State.CONNECTED) {
          this.sendSubscribeWith(subscription, token, Date.now() + (tokenRefreshDelayMs(token) ?? NaN));
        }
      },
      (error) => {
        if (subscription.tokenRequest !== call) return;
        subscription.tokenRequest = null;
        if (this.subscriptions.get(subscription.channel) === subscription) this.tokenFailed(subscription, error);
      },
    );
  }

  // The provider's token, or a rejection when it threw, rejected, gave no string or
  // took longer than a request may: a back-end that hangs must not leave the channel
  // silent for good after a reconnect.
  async tokenFrom(subscription) {
    let timer;
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no token within ${this.requestTimeoutMs} ms`)), this.requestTimeoutMs);
    });
    try {
      const token = await Promise.race([Promise.resolve().then(() => subscription.token(subscription.channel)), late]);
      // Never the value itself in the message: it may be a token in the wrong shape.
      if (typeof token !== "string" || !token) throw new Error(`it gave ${token === "" ? "an empty string" : typeof token}, not a token`);
      return token;
    } finally {
      clearTimeout(timer);
    }
  }

  // A first subscribe fails for its caller; a subscription already held is asked for
  // again after a backoff delay that grows with each failure in a row.
  tokenFailed(subscription, cause) {
    const error = new PushError("TOKEN_PROVIDER_FAILED", `the token provider of "${subscription.channel}" failed: ${cause?.message ?? cause}`);
    error.cause = cause;
    if (subscription.ready) {
      this.subscriptions.delete(subscription.channel);
      subscription.ready.reject(error);
      return;
    }
    this.emit("error", error);
    this.subscribeAgain(subscription);
  }

  sendSubscribeWith(subscription, token, refreshAt = NaN) {
    const envelope = { type: "subscribe", channel: subscription.channel };
    if (subscription.lastSeq !== null) envelope.since = subscription.lastSeq;
    else if (subscription.rewind) envelope.rewind = subscription.rewind;
    if (subscription.occupancy) envelope.occupancy = true;
    if (subscription.delta) envelope.delta = FOSSIL;
    if (token) envelope.token = token;
    // Held by the server on this socket: the subscribe extends it (a fresh token), and
    // its deltas go on from the base. Otherwise a new subscription on the server: its
    // deltas start after a full message. (`since` is sent either way: should the server
    // have ended it meanwhile, the subscribe resumes it without a gap.)
    const extending = subscription.heldOn !== null && subscription.heldOn === this.ws;
    if (!extending) subscription.base = null;
    this.request(envelope, { subscription, extending, refreshAt: Number.isFinite(refreshAt) ? refreshAt : null }).then(
      (reply) => subscription.ready?.resolve(reply),
      (error) => {
        // Connection loss is retried by the reconnect; anything else is final for the
        // caller of subscribe(). A subscription already held that got no reply in time
        // (a node that sheds load answers a subscribe only when its turn comes) is
        // asked for again: a late refusal would find no request to settle, and the
        // channel would stay silent.
        if (error.code === "CONNECTION_LOST") return;
        if (subscription.ready) {
          // A first subscribe that failed is not held (a refusal was dropped already):
          // its caller was told so, and a late reply or message must not reach it.
          if (this.subscriptions.get(subscription.channel) === subscription) this.subscriptions.delete(subscription.channel);
          subscription.ready.reject(error);
        } else if (error.code === "TIMEOUT") {
          this.emit("error", error);
          this.subscribeAgain(subscription);
        }
      },
    );
  }

  // Extend the subscription with a fresh token from its provider shortly before the
  // token expires (tokenRefreshDelayMs), on the socket that holds it.
  scheduleRefresh(subscription, refreshAt) {
    clearTimeout(subscription.refreshTimer);
    subscription.refreshTimer = null;
    if (refreshAt === null || refreshAt === undefined) return;
    const { ws } = this;
    subscription.refreshTimer = setTimeout(() => {
      subscription.refreshTimer = null;
      const current = this.subscriptions.get(subscription.channel) === subscription;
      if (current && this.ws === ws && this.state === State.CONNECTED) this.sendSubscribe(subscription);
    }, Math.max(0, refreshAt - Date.now()));
  }

  /**
   * Subscribe to `channel`; `handler(message, { replayed })` gets every message once, in
   * seq order (`replayed` is true for stored messages sent by a resume).
   * Resolves with the subscription when the server answers `subscribed` (waiting for
   * the connection if it is not up yet), or on SSE when a stream carrying the channel
   * opens. `since` resumes from a seq the caller stored; `rewind: N` (1 to 100) starts
   * with the channel's last N messages instead (handed over as `replayed`).
   * `occupancy: true` also asks for the channel's subscriber count: `occupancy` events
   * ({channel, subscribers}) and `subscription.subscribers`. `delta: true` asks for
   * fossil deltas over the WebSocket (less traffic for a large state that changes a
   * little); the handler still gets `data`.
   * `token` is a signed subscription token for the channel (a `private-` or `presence-`
   * one your back-end lets the client into): a string, or a provider `(channel) =>
   * token` (or a promise of one) that the client calls for every subscribe it sends:
   * this one, each one after a reconnect, and one shortly before the token's `exp`,
   * which extends the subscription (a string holds until its `exp`, when the server
   * ends the subscription: `error`, then `ended`). A provider that throws, rejects or
   * does not answer within `requestTimeoutMs` fails this call with
   * `TOKEN_PROVIDER_FAILED`; later on it is asked again after a backoff delay. On the
   * SSE fallback the stream carries the token (a provider is asked before each stream
   * opens); a stream cannot extend it, so when the server ends the channel at the
   * token's `exp` a provider's channel comes back on a new stream with a fresh token
   * and its cursor (nothing lost or repeated), and a string's ends (`error`, then
   * `ended`). The REST history reads that repair a gap carry the token too (a provider
   * is asked for a fresh one for each), so a channel held only by token loses nothing
   * to a gap.
   */
  subscribe(channel, handler, { since = null, rewind = null, occupancy = false, delta = false, token = null } = {}) {
    if (token !== null && !(typeof token === "function" || (typeof token === "string" && token))) {
      return Promise.reject(new TypeError("token must be a non-empty string or a function that returns one"));
    }
    const existing = this.subscriptions.get(channel);
    if (existing) {
      existing.handler = handler;
      if (token !== null) this.replaceToken(existing, token);
      // Not answered yet: settles with the first call, refused or not.
      return existing.pending ?? Promise.resolve(existing);
    }
    const subscription = new Subscription(this, channel, handler, since, {
      rewind,
      occupancy,
      delta,
      token,
    });
    const ready = new Promise((resolve, reject) => {
      subscription.ready = { resolve, reject };
    });
    this.subscriptions.set(channel, subscription);
    if (this.state === State.CONNECTED) this.sendSubscribe(subscription);
    else if (this.state === State.SSE) this.reopenStreamSoon();
    subscription.pending = ready.then(
      (reply) => {
        subscription.ready = subscription.pending = null;
        subscription.seq = reply.seq;
        subscription.recovered = reply.recovered;
        return subscription;
      },
      (error) => {
        subscription.ready = subscription.pending = null;
        throw error;
      },
    );
    return subscription.pending;
  }

  // subscribe() again with a token: it is the one used from now on, and a subscription
  // the server holds is extended with it at once (a refusal is told as an `error`); on
  // SSE a new stream carries it, resuming from the cursors.
  replaceToken(subscription, token) {
    subscription.token = token;
    if (subscription.heldOn !== null && subscription.heldOn === this.ws && this.state === State.CONNECTED) {
      this.sendSubscribe(subscription);
    } else if (this.state === State.SSE) this.reopenStreamSoon();
  }

  /**
   * Stop receiving `channel`. Resolves at once when not connected (nothing to tell the
   * server), and on SSE (the stream is reopened without the channel); with null when the
   * server held no such subscription (its resubscribe was refused for now).
   */
  async unsubscribe(channel) {
    const subscription = this.subscriptions.get(channel);
    if (!subscription) return null;
    this.subscriptions.delete(channel);
    subscription.held = null; // a repair in flight stops
    this.stopTimers(subscription);
    if (this.state === State.SSE) {
      this.reopenStreamSoon();
      return { type: "unsubscribed", channel };
    }
    if (this.state !== State.CONNECTED) return null;
    try {
      return await this.request({ type: "unsubscribe", channel });
    } catch (error) {
      // Its resubscribe was refused (and waited to be asked again), or a delta resync
      // had unsubscribed it: not subscribed is what was asked for.
      if (error.code === "NOT_SUBSCRIBED") return null;
      throw error;
    }
  }

  /**
   * Publish `data` (any JSON value); resolves with the `published` reply ({seq, message_id}).
   * On SSE it is a REST POST that resolves the same way.
   */
  publish(channel, data) {
    if (this.state === State.SSE) return this.publishRest(channel, data);
    // Not queued while disconnected: a WebSocket publish has no idempotency key, so the
    // caller decides whether to retry (or uses REST with an Idempotency-Key).
    return this.request({ type: "publish", channel, data });
  }

  /**
   * For dashboards: `onValue(data, message)` gets the channel's latest value at once
   * (when it has one), then every new value, with no gap between the two (`rewind: 1`).
   * Resolves as `subscribe` does.
   */
  latest(channel, onValue, options = {}) {
    return this.subscribe(channel, (message) => onValue(message.data, message), { ...options, rewind: 1 });
  }

  lastSeq(channel) {
    return this.subscriptions.get(channel)?.lastSeq ?? null;
  }

  // ----- Server-Sent Events fallback -----------------------------------------------------

  streamUrl(channels, tokens = new Map()) {
    const url = new URL(withToken(this.sseUrl, this.token));
    for (const channel of channels) url.searchParams.append("channel", channel);
    // EventSource sets no header: a channel's signed token rides in the URL, one each.
    for (const [channel, { token }] of tokens) url.searchParams.append(SUBSCRIPTION_TOKEN_PARAM, `${channel}:${token}`);
    // Our own cursors, not the browser's Last-Event-ID: they also cover a stream opened
    // with a new channel list, and channels the WebSocket delivered before the fallback.
    const known = channels.map((channel) => [channel, this.lastSeq(channel)]).filter(([, seq]) => seq !== null);
    if (known.length) url.searchParams.set("since", formatCursor(known));
    // The stream has one `rewind`, for the channels the cursor does not name: the largest
    // asked (a channel that asked for fewer gets a few more, marked replayed).
    const fresh = channels.filter((channel) => this.lastSeq(channel) === null);
    const rewind = Math.max(0, ...fresh.map((channel) => this.subscriptions.get(channel).rewind ?? 0));
    if (rewind) url.searchParams.set("rewind", rewind);
    return url.toString();
  }

  // The channels an event stream carries: every subscription's.
  streamChannels() {
    return [...this.subscriptions.keys()];
  }

  openStream() {
    this.closeStream();
    const channels = this.streamChannels();
    if (!channels.length) {
      // The server streams named channels only. With none there is nothing to receive,
      // and publishing needs no stream: on SSE without one until a subscribe.
      this.enterSse(null);
      return;
    }
    // `tokens`: channel -> { token, expiresAtMs } of the channels it carries by token;
    // `waiting`: channels left off it because their provider failed (asked again after
    // a backoff delay, which opens a new stream); `gone`: channels the server refused or
    // ended on it. No `source` until every provider answered.
    const stream = { source: null, channels, tokens: new Map(), waiting: new Set(), gone: new Set(), openedAt: null, openedAtMs: null, openTimer: null };
    this.stream = stream;
    this.streamTokens(stream).then(() => {
      if (stream === this.stream) this.startStream(stream);
    });
  }

  // Ask every provider of the stream's channels for a fresh token, all at once: a
  // stream cannot be given one later, so each opens with tokens as new as can be.
  async streamTokens(stream) {
    const asked = stream.channels.map(async (channel) => {
      const subscription = this.subscriptions.get(channel);
      if (!subscription?.token) return;
      const askedAtMs = Date.now();
      let token = subscription.token;
      if (typeof token === "function") {
        try {
          token = await this.tokenFrom(subscription);
        } catch (error) {
          stream.waiting.add(channel);
          if (stream === this.stream && this.subscriptions.get(channel) === subscription) this.tokenFailed(subscription, error);
          return;
        }
      }
      const lifetimeMs = tokenLifetimeMs(token, askedAtMs);
      stream.tokens.set(channel, { token, expiresAtMs: lifetimeMs === null ? Infinity : askedAtMs + lifetimeMs });
    });
    await Promise.all(asked);
  }

  startStream(stream) {
    const carried = stream.channels.filter((channel) => !stream.waiting.has(channel));
    if (!carried.length) {
      this.stream = null;
      this.enterSse(null);
      return;
    }
    const source = new this.EventSource(this.streamUrl(carried, stream.tokens));
    stream.source = source;
    source.addEventListener("connection_established", (event) => {
      if (stream === this.stream) this.onStreamEstablished(stream, event);
    });
    source.addEventListener("message", (event) => {
      if (stream === this.stream) this.onStreamMessage(stream, event);
    });
    // The one name serves both the server's `event: error` (a MessageEvent with data)
    // and the browser's report of a failed or lost connection (a plain Event).
    source.addEventListener("error", (event) => {
      if (stream !== this.stream) return;
      if (typeof event.data === "string") this.onStreamError(stream, event);
      else this.onStreamLost(stream);
    });
    stream.openTimer = setTimeout(() => {
      if (stream === this.stream) this.onStreamLost(stream);
    }, this.openTimeoutMs);
  }

  closeStream() {
    const stream = this.stream;
    this.stream = null;
    clearTimeout(this.reopenTimer);
    this.reopenTimer = null;
    if (!stream) return;
    clearTimeout(stream.openTimer);
    stream.source?.close(); // none while its providers are asked
  }

  // Subscribe and unsubscribe on SSE reopen the stream with the new channel list; one
  // reopen serves several calls made in a row.
  reopenStreamSoon() {
    if (this.reopenTimer) return;
    this.reopenTimer = setTimeout(() => {
      this.reopenTimer = null;
      if (this.state === State.SSE) this.openStream();
    }, 0);
  }

  decodeStreamEvent(event) {
    try {
      return JSON.parse(event.data);
    } catch (error) {
      this.emit("error", error);
      return null;
    }
  }

  onStreamEstablished(stream, event) {
    const envelope = this.decodeStreamEvent(event);
    if (!envelope) return;
    clearTimeout(stream.openTimer);
    stream.openedAt = envelope.timestamp;
    stream.openedAtMs = Date.now();
    this.serverId = envelope.server_id;
    this.connectionId = envelope.connection_id;
    this.enterSse(envelope);
    for (const channel of stream.channels) {
      if (stream.waiting.has(channel)) continue;
      const subscription = this.subscriptions.get(channel);
      subscription?.ready?.resolve({ type: "subscribed", channel, seq: subscription.lastSeq });
    }
    // Channels subscribed while this stream was opening are not on it yet.
    const current = this.streamChannels();
    if (current.length !== stream.channels.length || current.some((c) => !stream.channels.includes(c))) {
      this.reopenStreamSoon();
    }
  }

  enterSse(envelope) {
    this.openedAt = Date.now();
    this.protocol = null; // the stream is always JSON, with no subprotocol
    this.setState(State.SSE);
    if (envelope) this.emit("open", envelope);
    for (const waiter of this.connectWaiters.splice(0)) waiter.resolve(this);
    if (!this.probeTimer && !this.ws) this.scheduleProbe();
  }

  onStreamMessage(stream, event) {
    const message = this.decodeStreamEvent(event);
    if (!message) return;
    // No `subscribed` reply tells where a replay ends: what was published before the
    // stream opened is the replay.
    this.onMessage(message, stream.openedAt !== null && message.timestamp < stream.openedAt);
    // The event id is the server's cursor for every channel of the stream: it gives a
    // resume point to channels that have not had a message yet. Read after delivery, or
    // the message itself would count as already seen.
    for (const [channel, seq] of parseCursor(event.lastEventId)) {
      const subscription = this.subscriptions.get(channel);
      if (subscription && subscription.lastSeq === null) subscription.lastSeq = seq;
    }
  }

  onStreamError(stream, event) {
    const envelope = this.decodeStreamEvent(event);
    if (!envelope) return;
    const error = new PushError(envelope.code, envelope.message, envelope);
    // A channel the server refused is dropped, as a refused WebSocket subscribe is, so
    // the next stream does not ask for it again.
    const subscription = envelope.channel ? this.subscriptions.get(envelope.channel) : null;
    if (envelope.channel) this.leftStream(stream, envelope.channel);
    if (subscription && typeof subscription.token === "function" && this.tokenEndedOn(stream, subscription.channel)) {
      // Its token's `exp`, which a stream cannot extend: a new stream with a fresh token
      // resumes it from its cursor, after the backoff of endings in a row (reset when
      // the token served a while), as on the WebSocket.
      if (stream.tokens.get(subscription.channel).expiresAtMs - stream.openedAtMs >= TOKEN_REFRESH_LEAD_MS) {
        subscription.endings = 0;
      }
      this.onSubscriptionEnded(subscription, error);
      return;
    }
    if (subscription && !subscription.ready && TRY_AGAIN_CODES.has(error.code)) {
      // Refused for now (a budget spent, a dependency down): kept, and asked for again
      // by a new stream after a backoff delay, which resumes it from its cursor.
      this.emit("error", error);
      this.subscribeAgain(subscription);
      return;
    }
    if (subscription?.ready) {
      this.subscriptions.delete(envelope.channel);
      subscription.ready.reject(error);
      return;
    }
    // Refused after its stream opened (which resolved its subscribe()): a channel the
    // application holds, gone for good.
    if (subscription) this.endSubscription(subscription, error);
    else this.emit("error", error);
  }

  // The server refused or ended `channel` on `stream`. With no channel left the server
  // ends the stream: closed first, so that its end is not taken for a lost connection
  // (`sse → reconnecting`, a `close` event); the channels' own timers open the next one.
  leftStream(stream, channel) {
    stream.gone.add(channel);
    if (stream.channels.every((c) => stream.waiting.has(c) || stream.gone.has(c))) this.closeStream();
  }

  // Whether the server's refusal of `channel` on `stream` is its token's `exp` (when the
  // server ends what a token granted), not a refusal of the token: the token the stream
  // carried had not expired when the stream opened, and has now, by the client's
  // reckoning (from when it asked for the token, over the token's lifetime).
  tokenEndedOn(stream, channel) {
    const carried = stream.tokens.get(channel);
    if (!carried || stream.openedAtMs === null || stream.openedAtMs >= carried.expiresAtMs) return false;
    return Date.now() >= carried.expiresAtMs - TOKEN_EXPIRY_SLACK_MS;
  }

  // The browser would reconnect by itself with Last-Event-ID after a fixed pause; the
  // client reconnects instead, with the same jittered backoff as the WebSocket and the
  // same cursor in `since`, and may try the WebSocket first.
  onStreamLost(stream) {
    const wasOn = this.state === State.SSE;
    const reason = stream.openedAt === null ? "event stream did not open" : "event stream lost";
    this.closeStream();
    this.cancelProbe();
    if (this.closedByUser) return;
    // A stream that worked comes back as a stream; one that never opened says nothing
    // for SSE over the WebSocket, so the WebSocket gets the next turn when allowed.
    const next = wasOn || !this.canUse(Transport.WEBSOCKET) ? Transport.SSE : Transport.WEBSOCKET;
    this.scheduleReconnect({ code: STREAM_LOST_CLOSE, reason }, next);
  }

  // While on SSE the WebSocket is tried again after the backoff of its failures so far
  // (a few seconds at first, then up to maxDelayMs), and replaces the stream when it opens.
  scheduleProbe() {
    if (this.closedByUser || !this.canUse(Transport.WEBSOCKET)) return;
    const delayMs = this.backoff(this.wsFailures);
    this.probeTimer = setTimeout(() => {
      this.probeTimer = null;
      if (this.state === State.SSE && !this.ws) this.openSocket();
    }, delayMs);
  }

  cancelProbe() {
    clearTimeout(this.probeTimer);
    this.probeTimer = null;
    if (this.transport === Transport.SSE) this.dropSocket(1000, "probe cancelled");
  }

  // The token when the client has one, else the browser session (with Django's CSRF
  // token, which a POST needs).
  restHeaders(extra = {}) {
    const headers = { Accept: "application/json", ...extra };
    if (this.token) headers.Authorization = `Token ${this.token}`;
    else if (csrfToken()) headers["X-CSRFToken"] = csrfToken();
    return headers;
  }

  channelUrl(channel) {
    return new URL(`channels/${encodeURIComponent(channel)}/messages`, this.apiUrl).toString();
  }

  async publishRest(channel, data) {
    if (!this.fetch) throw new PushError("NOT_CONNECTED", "no fetch() to publish over REST");
    const headers = this.restHeaders({ "Content-Type": "application/json" });
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), this.requestTimeoutMs);
    let response;
    let body;
    try {
      response = await this.fetch(this.channelUrl(channel), {
        method: "POST",
        headers,
        body: JSON.stringify({ data }),
        credentials: "same-origin",
        signal: abort.signal,
      });
      body = await response.json().catch(() => null);
    } catch (error) {
      if (abort.signal.aborted) throw new PushError("TIMEOUT", `no reply to "publish" within ${this.requestTimeoutMs} ms`);
      throw new PushError("CONNECTION_LOST", `publish over REST failed: ${error.message}`);
    } finally {
      clearTimeout(timer);
    }
    if (!response.ok) {
      throw new PushError(body?.code ?? `HTTP_${response.status}`, body?.message ?? `HTTP ${response.status}`, body);
    }
    return { type: "published", channel: body?.channel ?? channel, seq: body?.seq, message_id: body?.message_id, timestamp: body?.timestamp };
  }

  // ----- heartbeat ---------------------------------------------------------------------

  startHeartbeat(intervalMs) {
    this.stopHeartbeat();
    this.heartbeatMs = intervalMs;
    this.heartbeatTimer = setInterval(() => {
      if (this.ws && this.ws.readyState === 1) this.send({ type: "heartbeat" });
    }, intervalMs);
    this.armWatchdog();
  }

  // Any frame proves the server is alive; two silent intervals mean a dead connection
  // that TCP has not noticed yet (a laptop lid, a NAT that forgot us).
  armWatchdog() {
    if (!this.heartbeatMs) return;
    clearTimeout(this.watchdogTimer);
    this.watchdogTimer = setTimeout(() => this.onHeartbeatTimeout(), 2 * this.heartbeatMs);
  }

  onHeartbeatTimeout() {
    if (!this.ws) return;
    this.dropSocket(HEARTBEAT_TIMEOUT_CLOSE, "heartbeat timeout");
    this.failPending(new PushError("CONNECTION_LOST", "heartbeat timeout"));
    this.scheduleReconnect({ code: HEARTBEAT_TIMEOUT_CLOSE, reason: "heartbeat timeout" }, this.preferredTransport());
  }

  stopHeartbeat() {
    clearInterval(this.heartbeatTimer);
    clearTimeout(this.watchdogTimer);
    this.heartbeatTimer = null;
    this.watchdogTimer = null;
    this.heartbeatMs = null;
  }
}
