// The Server-Sent Events fallback of the JavaScript client, against fake transports:
// when it falls back, what each stream asks for, the switch back to the WebSocket, and
// publishing over REST. Run with `node --test clients/js/test/`.

import { afterEach, beforeEach, test } from "node:test";
import assert from "node:assert/strict";

import { PushClient, State, parseCursor, formatCursor } from "../index.js";
import { FakeEventSource, FakeSocket, fakeFetch, reset, until } from "./fakes.js";

const URL_WS = "ws://push.test/ws/";
// Delays of a few milliseconds keep the tests fast; the policy is the same.
const FAST = { baseDelayMs: 1, maxDelayMs: 3 };

// Every client is closed after its test, passed or failed, so no timer keeps Node alive.
const clients = [];

function client(options = {}) {
  const pushClient = new PushClient(URL_WS, { WebSocket: FakeSocket, EventSource: FakeEventSource, ...FAST, ...options });
  clients.push(pushClient);
  const states = [];
  pushClient.on("state", ({ state }) => states.push(state));
  return { client: pushClient, states };
}

const lastSocket = () => FakeSocket.opened.at(-1);
const lastStream = () => FakeEventSource.opened.at(-1);

// Delivered (channel, seq) pairs, with the `replayed` flag.
function collect(pushClient, channel) {
  const seen = [];
  const subscribed = pushClient.subscribe(channel, (message, { replayed }) => seen.push([message.seq, replayed]));
  subscribed.catch(() => {}); // rejected when the test closes the client first
  return { seen, subscribed };
}

async function onSse(options = {}) {
  const created = client(options);
  created.client.connect().catch(() => {});
  const news = collect(created.client, "news");
  await until("a socket", () => FakeSocket.opened.length === 1);
  lastSocket().fail();
  await until("a second socket", () => FakeSocket.opened.length === 2);
  lastSocket().fail();
  await until("a stream", () => FakeEventSource.opened.length === 1);
  lastStream().establish();
  return { ...created, news };
}

beforeEach(reset);
afterEach(() => {
  for (const pushClient of clients.splice(0)) pushClient.close();
});

test("a channel a stream refuses for now is kept and asked for again by a new stream", async () => {
  // After a reconnect the address's subscription budget is spent (or the database is
  // down): the stream refuses the channel with RATE_LIMITED (UNAVAILABLE).
  const { client: c } = client({ transports: ["sse"] });
  const errors = [];
  c.on("error", (error) => errors.push(error.code));
  c.connect().catch(() => {});
  const news = collect(c, "news");
  await until("a stream", () => FakeEventSource.opened.length === 1);
  lastStream().establish();
  await news.subscribed;
  lastStream().message("news", 4);
  lastStream().fail();
  await until("a second stream", () => FakeEventSource.opened.length === 2);
  lastStream().establish();
  lastStream().serverError({ code: "RATE_LIMITED", message: "too many subscriptions from this address; slow down", channel: "news" });
  assert.deepEqual(errors, ["RATE_LIMITED"]);
  await until("a third stream", () => FakeEventSource.opened.length === 3);
  assert.deepEqual([lastStream().channels, lastStream().since], [["news"], "news:4"]);
  lastStream().establish();
  lastStream().message("news", 5);
  assert.deepEqual(news.seen, [[4, false], [5, false]]);
});

test("falls back to SSE after two failed WebSocket opens, and says so", async () => {
  const { client: c, states, news } = await onSse({ transports: ["websocket", "sse"] });
  assert.deepEqual(states, [State.CONNECTING, State.RECONNECTING, State.SSE]);
  assert.equal(c.transport, "sse");
  assert.deepEqual(lastStream().channels, ["news"]);
  assert.equal(lastStream().since, null);
  assert.equal(lastStream().url.origin + lastStream().url.pathname, "http://push.test/sse/");
  const subscription = await news.subscribed;
  assert.equal(subscription.channel, "news");
  lastStream().message("news", 1);
  lastStream().message("news", 2);
  assert.deepEqual(news.seen, [[1, false], [2, false]]);
  c.close();
});

test("goes straight to SSE without a WebSocket, or when told to", async () => {
  for (const options of [{ WebSocket: undefined }, { transports: ["sse"] }]) {
    reset();
    const { client: c, states } = client(options);
    const connected = c.connect();
    collect(c, "news");
    await until("a stream", () => FakeEventSource.opened.length === 1);
    lastStream().establish();
    await connected;
    assert.deepEqual(states, [State.CONNECTING, State.SSE]);
    // Nothing to probe: the WebSocket is not there or not allowed.
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(FakeSocket.opened.length, 0);
    c.close();
  }
});

test("one failed open is not enough, and a socket that worked does not count", async () => {
  const { client: c, states } = client();
  c.connect().catch(() => {}); // closed at the end of the test
  await until("a socket", () => FakeSocket.opened.length === 1);
  lastSocket().fail();
  await until("a retry", () => FakeSocket.opened.length === 2);
  lastSocket().establish();
  lastSocket().fail(1012); // a restart of a working connection
  await until("a retry", () => FakeSocket.opened.length === 3);
  lastSocket().fail();
  await until("one more retry", () => FakeSocket.opened.length === 4);
  assert.equal(FakeEventSource.opened.length, 0);
  assert.equal(c.state, State.RECONNECTING);
  assert.deepEqual(states, [State.CONNECTING, State.RECONNECTING, State.CONNECTED, State.RECONNECTING]);
  c.close();
});

test("keeps the cursors of the WebSocket: the stream resumes after the last seq delivered", async () => {
  const { client: c } = client();
  c.connect().catch(() => {}); // closed at the end of the test
  const news = collect(c, "news");
  const chat = collect(c, "user:42");
  await until("a socket", () => FakeSocket.opened.length === 1);
  lastSocket().establish();
  lastSocket().answerSubscribes({ news: 5, "user:42": 0 });
  await news.subscribed;
  lastSocket().receive({ type: "message", channel: "news", seq: 6, message_id: "m6", data: 6, timestamp: 1 });
  lastSocket().fail();
  // The drop of a working socket does not count; two failed opens after it do.
  for (let i = 2; i <= 3; i++) {
    await until("a retry", () => FakeSocket.opened.length === i);
    lastSocket().fail();
  }
  await until("a stream", () => FakeEventSource.opened.length === 1);
  assert.deepEqual(lastStream().channels, ["news", "user:42"]);
  assert.equal(lastStream().since, "news:6,user:42:0");
  lastStream().establish({ timestamp: 100 });
  // A replay that overlaps what was delivered is dropped; the rest is marked replayed.
  lastStream().message("news", 6, { cursor: "news:6,user:42:0", timestamp: 99 });
  lastStream().message("news", 7, { cursor: "news:7,user:42:0", timestamp: 99 });
  lastStream().message("user:42", 1, { cursor: "news:7,user:42:1", timestamp: 101 });
  assert.deepEqual(news.seen, [[6, false], [7, true]]);
  assert.deepEqual(chat.seen, [[1, false]]);
  c.close();
});

test("subscribe and unsubscribe on SSE reopen the stream from the client's cursors", async () => {
  const { client: c, news } = await onSse();
  const first = lastStream();
  // No message on news yet, but the cursor of a message elsewhere says where it is.
  const sport = collect(c, "sport");
  const weather = collect(c, "weather");
  await until("one reopened stream", () => FakeEventSource.opened.length === 2);
  assert.ok(first.closed);
  assert.deepEqual(lastStream().channels, ["news", "sport", "weather"]);
  assert.equal(lastStream().since, null);
  lastStream().establish();
  await Promise.all([sport.subscribed, weather.subscribed]);
  lastStream().message("sport", 3, { cursor: "news:9,sport:3,weather:0" });
  assert.equal(c.lastSeq("news"), 9);
  assert.equal(c.lastSeq("weather"), 0);

  assert.deepEqual(await c.unsubscribe("weather"), { type: "unsubscribed", channel: "weather" });
  await until("a stream without weather", () => FakeEventSource.opened.length === 3);
  assert.deepEqual(lastStream().channels, ["news", "sport"]);
  assert.equal(lastStream().since, "news:9,sport:3");
  assert.equal(c.state, State.SSE);
  // A message of the old stream that arrives late is ignored; the new one resumes.
  FakeEventSource.opened[1].message("news", 10, { cursor: "news:10,sport:3,weather:0" });
  lastStream().establish();
  lastStream().message("news", 10, { cursor: "news:10,sport:3" });
  assert.deepEqual(news.seen, [[10, false]]);
  c.close();
});

test("a lost stream reconnects as a stream, resuming from the cursors", async () => {
  const { client: c, states, news } = await onSse();
  lastStream().message("news", 4);
  lastStream().fail();
  await until("a new stream", () => FakeEventSource.opened.length === 2);
  assert.equal(lastStream().since, "news:4");
  lastStream().establish();
  assert.deepEqual(states.slice(-3), [State.SSE, State.RECONNECTING, State.SSE]);
  assert.deepEqual(news.seen, [[4, false]]);
  c.close();
});

test("a stream that does not open hands the next turn to the WebSocket", async () => {
  const { client: c } = client();
  c.connect().catch(() => {}); // closed at the end of the test
  collect(c, "news");
  for (let i = 1; i <= 2; i++) {
    await until("a socket", () => FakeSocket.opened.length === i);
    lastSocket().fail();
  }
  await until("a stream", () => FakeEventSource.opened.length === 1);
  lastStream().fail();
  await until("a third socket", () => FakeSocket.opened.length === 3);
  lastSocket().fail();
  await until("a second stream", () => FakeEventSource.opened.length === 2);
  assert.equal(c.state, State.RECONNECTING);
  c.close();
});

test("on SSE the WebSocket is probed and takes over when it opens, resuming every channel", async () => {
  const { client: c, states, news } = await onSse();
  lastStream().message("news", 3);
  await until("a probe", () => FakeSocket.opened.length === 3);
  lastSocket().fail();
  await until("another probe", () => FakeSocket.opened.length === 4);
  assert.equal(c.state, State.SSE);
  const stream = lastStream();
  lastSocket().establish();
  assert.ok(stream.closed);
  assert.equal(c.transport, "websocket");
  assert.deepEqual(states.slice(-2), [State.SSE, State.CONNECTED]);
  const subscribe = lastSocket().sent.find((frame) => frame.type === "subscribe");
  assert.deepEqual({ channel: subscribe.channel, since: subscribe.since }, { channel: "news", since: 3 });
  lastSocket().answerSubscribes({ news: 4 });
  lastSocket().receive({ type: "message", channel: "news", seq: 4, message_id: "m4", data: 4, timestamp: 1 });
  assert.deepEqual(news.seen, [[3, false], [4, true]]);
  c.close();
});

test("publish on SSE goes through REST and settles like a WebSocket publish", async () => {
  const { fetch, calls } = fakeFetch((url, init) => {
    const data = JSON.parse(init.body).data;
    if (data === "forbidden") return { status: 403, body: { type: "error", code: "FORBIDDEN", message: "no grant" } };
    if (data === "broken") return { status: 502, body: "not json" };
    return { status: 201, body: { channel: "user:42", seq: 8, message_id: "m8", timestamp: 1.5 } };
  });
  const { client: c } = await onSse({ fetch, token: "key123" });
  const reply = await c.publish("user:42", { text: "hi" });
  assert.deepEqual(reply, { type: "published", channel: "user:42", seq: 8, message_id: "m8", timestamp: 1.5 });
  assert.equal(calls[0].url, "http://push.test/api/v1/channels/user%3A42/messages");
  assert.equal(calls[0].method, "POST");
  assert.equal(calls[0].headers.Authorization, "Token key123");
  assert.deepEqual(calls[0].body, { data: { text: "hi" } });
  assert.equal(lastStream().url.searchParams.get("token"), "key123");

  await assert.rejects(c.publish("news", "forbidden"), { name: "PushError", code: "FORBIDDEN" });
  await assert.rejects(c.publish("news", "broken"), { code: "HTTP_502" });
  c.close();
  await assert.rejects(c.publish("news", 1), { code: "NOT_CONNECTED" });
});

test("a channel the stream refuses is dropped, reported and ended", async () => {
  const { client: c } = await onSse();
  const errors = [];
  const ended = [];
  c.on("error", (error) => errors.push(error));
  c.on("ended", (detail) => ended.push(detail));
  const secret = collect(c, "private-x");
  await until("a reopened stream", () => FakeEventSource.opened.length === 2);
  lastStream().establish();
  await secret.subscribed;
  lastStream().serverError({ code: "FORBIDDEN", message: "no grant", channel: "private-x" });
  assert.deepEqual(errors.map((error) => error.code), ["FORBIDDEN"]);
  assert.deepEqual(ended, [{ channel: "private-x", code: "FORBIDDEN", message: "no grant" }]);
  assert.equal(c.subscriptions.has("private-x"), false);
  c.close();
});

test("with no subscription there is no stream, and the first subscribe opens one", async () => {
  const { client: c, states } = client({ transports: ["sse"] });
  await c.connect();
  assert.deepEqual(states, [State.CONNECTING, State.SSE]);
  assert.equal(FakeEventSource.opened.length, 0);
  const news = collect(c, "news");
  await until("a stream", () => FakeEventSource.opened.length === 1);
  lastStream().establish();
  await news.subscribed;
  c.close();
  assert.ok(lastStream().closed);
});

test("cursors read and write channel names that hold colons", () => {
  const cursor = parseCursor("news:43,user:42:7,bad,also:bad:x,");
  assert.deepEqual([...cursor], [["news", 43], ["user:42", 7]]);
  assert.equal(formatCursor(cursor), "news:43,user:42:7");
});
