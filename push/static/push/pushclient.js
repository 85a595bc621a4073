// The browser client of the push server's wire contract, version 1 (PROTOCOL.md).
//
// An ES module with no dependencies and no build step:
//
//   import { PushClient } from "/client/pushclient.js";
//   const client = new PushClient("ws://127.0.0.1:8000/ws/", { token });
//   client.on("state", ({ state }) => console.log(state));
//   await client.connect();
//   await client.subscribe("news", (message) => console.log(message.seq, message.data));
//   await client.publish("news", { headline: "hello" });
//
// It reconnects with capped exponential backoff and full jitter, resumes every channel
// with `since` (the last seq it delivered), reports gaps, and keeps the connection
// honest with the contract's heartbeat. MessagePack is used when the caller passes an
// `{ encode, decode }` pair as `msgpack` (for example the vendored `./msgpack.js`).

export const State = Object.freeze({
  CONNECTING: "connecting",
  CONNECTED: "connected",
  RECONNECTING: "reconnecting",
  DISCONNECTED: "disconnected",
  // Reserved for the Server-Sent Events fallback: the transitions below already
  // allow it, so adding that transport does not reshape the state machine.
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

// Close codes after which retrying cannot help (PROTOCOL.md, "Close codes"): a normal
// close, a policy close (bad token, rate limit: retry only with a new token), and a
// frame too large (the client must be fixed). Everything else, including 1006 (the
// network dropped or the handshake was refused), is retried with backoff.
const TERMINAL_CLOSE_CODES = new Set([1000, 1008, 1009]);

export const DEFAULT_BASE_DELAY_MS = 500;
export const DEFAULT_MAX_DELAY_MS = 30_000;
const DEFAULT_REQUEST_TIMEOUT_MS = 10_000;
const DEFAULT_HEARTBEAT_INTERVAL_MS = 25_000;
// Browsers only let a page close with 1000 or 3000-4999; 4001 mirrors the server's own
// heartbeat-timeout code so logs read the same on both sides.
const HEARTBEAT_TIMEOUT_CLOSE = 4001;

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

function msgpackFormat({ encode, decode }) {
  return Object.freeze({
    subprotocol: "v1.msgpack",
    encode: (envelope) => encode(envelope),
    decode: (frame) => decode(new Uint8Array(frame)),
  });
}

function withToken(url, token) {
  if (!token) return url;
  const parsed = new URL(url, globalThis.location?.href);
  parsed.searchParams.set("token", token);
  return parsed.toString();
}

class Subscription {
  constructor(client, channel, handler, since) {
    this.client = client;
    this.channel = channel;
    this.handler = handler;
    // The last seq delivered to the handler (or the channel's seq when we joined): the
    // resume point for `since` after a reconnect.
    this.lastSeq = since ?? null;
    // After a resume, messages up to the `subscribed` reply's seq are replays of stored
    // history: handlers get `{ replayed: true }` so live statistics can leave them out.
    this.replayUntil = null;
    this.ready = null; // settled on the first `subscribed` (or error) reply
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
    this.requestTimeoutMs = options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    // null: use what the server announces in connection_established.
    this.heartbeatIntervalMs = options.heartbeatIntervalMs ?? null;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;

    this.state = State.DISCONNECTED;
    this.serverId = null;
    this.connectionId = null;
    this.subscriptions = new Map();
    this.listeners = new Map();
    this.pending = new Map(); // request id -> { resolve, reject, timer, channel? }
    this.nextId = 1;
    this.attempt = 0;
    this.ws = null;
    this.closedByUser = false;
    this.reconnectTimer = null;
    this.heartbeatTimer = null;
    this.watchdogTimer = null;
    this.connectWaiters = [];
  }

  // ----- events ------------------------------------------------------------------------

  /** Listen to "state", "open", "close", "message", "gap", "unrecovered" or "error". Returns an off function. */
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

  /** Open the connection; resolves on `connection_established`, rejects if it closes for good first. */
  connect() {
    if (this.state === State.CONNECTED) return Promise.resolve(this);
    const connected = new Promise((resolve, reject) => this.connectWaiters.push({ resolve, reject }));
    if (this.state === State.DISCONNECTED) {
      this.closedByUser = false;
      this.attempt = 0;
      this.setState(State.CONNECTING);
      this.openSocket();
    }
    return connected;
  }

  /** Close for good: no reconnect. Pending requests are rejected. */
  close() {
    this.closedByUser = true;
    clearTimeout(this.reconnectTimer);
    this.dropSocket(1000, "client closed");
    this.finish({ code: 1000, reason: "client closed" });
  }

  openSocket() {
    const ws = new this.WebSocket(withToken(this.url, this.token), [this.format.subprotocol]);
    ws.binaryType = "arraybuffer";
    ws.onmessage = (event) => this.onFrame(ws, event.data);
    ws.onclose = (event) => this.onSocketClosed(ws, event.code, event.reason);
    // onerror is always followed by onclose, which decides what happens next.
    ws.onerror = () => {};
    this.ws = ws;
  }

  // Detach and close the current socket without letting its close event run our logic.
  dropSocket(code, reason) {
    const ws = this.ws;
    this.ws = null;
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
    this.ws = null;
    this.stopHeartbeat();
    this.failPending(new PushError("CONNECTION_LOST", `connection closed (${code})`));
    if (this.closedByUser || isTerminalCloseCode(code)) {
      if (code === 1009) {
        this.emit("error", new PushError("MESSAGE_TOO_LARGE", "the server closed with 1009: a frame was too large"));
      }
      this.finish({ code, reason });
      return;
    }
    this.scheduleReconnect({ code, reason });
  }

  scheduleReconnect({ code, reason }) {
    const delayMs = backoffDelay(this.attempt, { baseMs: this.baseDelayMs, maxMs: this.maxDelayMs });
    this.attempt += 1;
    this.setState(State.RECONNECTING);
    this.emit("close", { code, reason, willReconnect: true, delayMs });
    this.reconnectTimer = setTimeout(() => {
      if (!this.closedByUser) this.openSocket();
    }, delayMs);
  }

  finish({ code, reason }) {
    const wasOpen = this.state !== State.DISCONNECTED;
    if (wasOpen) this.setState(State.DISCONNECTED);
    this.failPending(new PushError("CONNECTION_CLOSED", `connection closed (${code})`));
    for (const subscription of this.subscriptions.values()) {
      subscription.ready?.reject(new PushError("CONNECTION_CLOSED", `connection closed (${code})`));
    }
    const error = new PushError("CONNECTION_CLOSED", `connection closed (${code}) ${reason ?? ""}`.trim());
    for (const waiter of this.connectWaiters.splice(0)) waiter.reject(error);
    if (wasOpen) this.emit("close", { code, reason, willReconnect: false });
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
    switch (envelope.type) {
      case "connection_established":
        this.onEstablished(envelope);
        break;
      case "message":
        this.onMessage(envelope);
        break;
      case "subscribed":
        this.onSubscribed(envelope);
        break;
      case "error":
        this.onError(envelope);
        break;
      default:
        this.settle(envelope);
    }
  }

  onEstablished(envelope) {
    this.serverId = envelope.server_id;
    this.connectionId = envelope.connection_id;
    this.attempt = 0;
    this.startHeartbeat(this.heartbeatIntervalMs ?? (envelope.heartbeat_interval * 1000 || DEFAULT_HEARTBEAT_INTERVAL_MS));
    this.setState(State.CONNECTED);
    this.emit("open", envelope);
    for (const subscription of this.subscriptions.values()) this.sendSubscribe(subscription);
    for (const waiter of this.connectWaiters.splice(0)) waiter.resolve(this);
  }

  onMessage(message) {
    const subscription = this.subscriptions.get(message.channel);
    if (!subscription) return;
    const last = subscription.lastSeq;
    // A resume may overlap what was already delivered; never hand the same seq twice.
    if (last !== null && message.seq <= last) return;
    if (last !== null && message.seq > last + 1) {
      this.emit("gap", { channel: message.channel, expected: last + 1, received: message.seq });
    }
    subscription.lastSeq = message.seq;
    const meta = { replayed: subscription.replayUntil !== null && message.seq <= subscription.replayUntil };
    this.emit("message", message);
    try {
      subscription.handler?.(message, meta);
    } catch (error) {
      console.error(`pushclient: the handler of "${message.channel}" failed`, error);
    }
  }

  onSubscribed(reply) {
    const subscription = this.subscriptions.get(reply.channel);
    if (subscription) {
      // Without `since` the reply's seq is the channel's latest: live messages follow it.
      if (subscription.lastSeq === null) subscription.lastSeq = reply.seq;
      else subscription.replayUntil = reply.seq;
      if (reply.recovered === false) {
        // The server could not replay everything after `since` (history trimmed): the
        // application should refetch its state over REST.
        this.emit("unrecovered", { channel: reply.channel, since: subscription.lastSeq, seq: reply.seq });
      }
    }
    this.settle(reply);
  }

  onError(envelope) {
    const error = new PushError(envelope.code, envelope.message, envelope);
    if (envelope.id === undefined || !this.pending.has(envelope.id)) {
      this.emit("error", error);
      return;
    }
    const request = this.pending.get(envelope.id);
    // A refused subscribe must not be retried on every reconnect.
    if (request.subscription) this.subscriptions.delete(request.subscription.channel);
    this.settle(envelope, error);
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

  sendSubscribe(subscription) {
    const envelope = { type: "subscribe", channel: subscription.channel };
    if (subscription.lastSeq !== null) envelope.since = subscription.lastSeq;
    this.request(envelope, { subscription }).then(
      (reply) => subscription.ready?.resolve(reply),
      (error) => {
        // Connection loss is retried by the reconnect; anything else is final.
        if (error.code !== "CONNECTION_LOST") subscription.ready?.reject(error);
      },
    );
  }

  /**
   * Subscribe to `channel`; `handler(message, { replayed })` gets every message once, in
   * seq order (`replayed` is true for stored messages sent by a resume).
   * Resolves with the subscription when the server answers `subscribed` (waiting for
   * the connection if it is not up yet). `since` resumes from a seq the caller stored.
   */
  subscribe(channel, handler, { since = null } = {}) {
    const existing = this.subscriptions.get(channel);
    if (existing) {
      existing.handler = handler;
      return Promise.resolve(existing);
    }
    const subscription = new Subscription(this, channel, handler, since);
    const ready = new Promise((resolve, reject) => {
      subscription.ready = { resolve, reject };
    });
    this.subscriptions.set(channel, subscription);
    if (this.state === State.CONNECTED) this.sendSubscribe(subscription);
    return ready.then((reply) => {
      subscription.ready = null;
      subscription.seq = reply.seq;
      subscription.recovered = reply.recovered;
      return subscription;
    });
  }

  /** Stop receiving `channel`. Resolves at once when not connected (nothing to tell the server). */
  async unsubscribe(channel) {
    if (!this.subscriptions.delete(channel)) return null;
    if (this.state !== State.CONNECTED) return null;
    return this.request({ type: "unsubscribe", channel });
  }

  /** Publish `data` (any JSON value); resolves with the `published` reply ({seq, message_id}). */
  publish(channel, data) {
    // Not queued while disconnected: a WebSocket publish has no idempotency key, so the
    // caller decides whether to retry (or uses REST with an Idempotency-Key).
    return this.request({ type: "publish", channel, data });
  }

  lastSeq(channel) {
    return this.subscriptions.get(channel)?.lastSeq ?? null;
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
    this.scheduleReconnect({ code: HEARTBEAT_TIMEOUT_CLOSE, reason: "heartbeat timeout" });
  }

  stopHeartbeat() {
    clearInterval(this.heartbeatTimer);
    clearTimeout(this.watchdogTimer);
    this.heartbeatTimer = null;
    this.watchdogTimer = null;
    this.heartbeatMs = null;
  }
}
