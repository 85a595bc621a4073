// Stand-ins for the browser's WebSocket, EventSource and fetch, driven by the tests:
// each records what the client asked for, and the test plays the server's part.

const now = () => Date.now() / 1000;

function established(connectionId) {
  return { type: "connection_established", connection_id: connectionId, server_id: "node-a", heartbeat_interval: 25, timestamp: now() };
}

export function messageEnvelope(channel, seq, { data = { seq }, timestamp = now() } = {}) {
  return { type: "message", channel, seq, message_id: `m-${channel}-${seq}`, data, timestamp };
}

export class FakeSocket {
  static opened = [];

  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.sent = [];
    this.closed = false;
    this.closeCode = null; // what the client closed with
    this.protocol = ""; // the browser's: empty until the server picks one
    this.readyState = 0; // CONNECTING
    FakeSocket.opened.push(this);
  }

  send(frame) {
    this.sent.push(JSON.parse(frame));
  }

  close(code = 1005) {
    this.closed = true;
    this.closeCode = code;
    this.readyState = 3; // CLOSED
  }

  receive(envelope) {
    this.onmessage?.({ data: JSON.stringify(envelope) });
  }

  // The server accepts the first subprotocol offered, as ours does.
  establish() {
    this.readyState = 1; // OPEN
    this.protocol = this.protocols[0];
    this.receive(established(`ws-${FakeSocket.opened.length}`));
  }

  message(channel, seq) {
    this.receive(messageEnvelope(channel, seq));
  }

  // The handshake was refused or the network dropped: no close frame.
  fail(code = 1006) {
    this.closed = true;
    this.readyState = 3;
    this.onclose?.({ code, reason: "" });
  }

  // Answer every subscribe sent so far that has no reply yet.
  answerSubscribes(seqs) {
    for (const request of this.sent.filter((frame) => frame.type === "subscribe" && !frame.answered)) {
      request.answered = true;
      const reply = { type: "subscribed", id: request.id, channel: request.channel, seq: seqs[request.channel] ?? 0 };
      if (request.since !== undefined) reply.recovered = true;
      this.receive(reply);
    }
  }
}

export class FakeEventSource {
  static opened = [];

  constructor(url) {
    this.url = new URL(url);
    this.listeners = new Map();
    this.closed = false;
    FakeEventSource.opened.push(this);
  }

  get channels() {
    return this.url.searchParams.getAll("channel");
  }

  get since() {
    return this.url.searchParams.get("since");
  }

  // The signed subscription tokens it carries: channel -> token.
  get tokens() {
    const entries = this.url.searchParams.getAll("subscription_token");
    return Object.fromEntries(entries.map((entry) => [entry.slice(0, entry.lastIndexOf(":")), entry.slice(entry.lastIndexOf(":") + 1)]));
  }

  addEventListener(type, listener) {
    if (!this.listeners.has(type)) this.listeners.set(type, []);
    this.listeners.get(type).push(listener);
  }

  close() {
    this.closed = true;
  }

  dispatch(type, event) {
    for (const listener of this.listeners.get(type) ?? []) listener(event);
  }

  establish({ timestamp = now() } = {}) {
    this.dispatch("connection_established", { data: JSON.stringify({ ...established("sse-1"), timestamp }) });
  }

  message(channel, seq, { cursor = `${channel}:${seq}`, timestamp = now(), data = { seq } } = {}) {
    const envelope = messageEnvelope(channel, seq, { data, timestamp });
    this.dispatch("message", { data: JSON.stringify(envelope), lastEventId: cursor });
  }

  serverError(envelope) {
    this.dispatch("error", { data: JSON.stringify({ type: "error", ...envelope }) });
  }

  // The browser's own report: the stream failed or was lost (an Event without data).
  fail() {
    this.dispatch("error", {});
  }
}

export function fakeFetch(respond) {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url, ...init, body: init.body === undefined ? undefined : JSON.parse(init.body) });
    const { status, body, headers = {} } = await respond(url, init);
    return {
      ok: status >= 200 && status < 300,
      status,
      headers: new Headers(headers),
      json: async () => (typeof body === "string" ? JSON.parse(body) : body),
    };
  };
  return { fetch, calls };
}

export function reset() {
  FakeSocket.opened = [];
  FakeEventSource.opened = [];
}

export async function until(what, check, timeoutMs = 2_000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const value = check();
    if (value) return value;
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
  throw new Error(`timed out waiting for ${what}`);
}
