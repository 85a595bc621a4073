// `rewind`, the `latest` helper and `occupancy` in the JavaScript client, against a fake
// WebSocket. Run with `node --test clients/js/test/`.

import { afterEach, beforeEach, test } from "node:test";
import assert from "node:assert/strict";

import { PushClient } from "../index.js";
import { FakeSocket, reset, until } from "./fakes.js";

const clients = [];
const lastSocket = () => FakeSocket.opened.at(-1);

beforeEach(reset);
afterEach(() => {
  for (const pushClient of clients.splice(0)) pushClient.close();
});

async function connected() {
  const c = new PushClient("ws://push.test/ws/", { WebSocket: FakeSocket, transports: ["websocket"], baseDelayMs: 1, maxDelayMs: 4 });
  clients.push(c);
  c.connect().catch(() => {});
  await until("a socket", () => FakeSocket.opened.length === 1);
  lastSocket().establish();
  return c;
}

const subscribes = () => lastSocket().sent.filter((frame) => frame.type === "subscribe");

test("rewind asks for the last N, hands them over as replayed, then live; a reconnect resumes with since", async () => {
  const c = await connected();
  const seen = [];
  const subscribed = c.subscribe("news", (message, { replayed }) => seen.push([message.seq, replayed]), { rewind: 3 });
  assert.equal(subscribes()[0].rewind, 3);
  assert.equal(subscribes()[0].since, undefined);
  lastSocket().answerSubscribes({ news: 10 });
  await subscribed;
  for (const seq of [8, 9, 10, 11]) lastSocket().message("news", seq);
  assert.deepEqual(seen, [[8, true], [9, true], [10, true], [11, false]]);
  lastSocket().fail(1012);
  await until("the reconnect", () => FakeSocket.opened.length === 2);
  lastSocket().establish();
  assert.deepEqual(subscribes().map(({ since, rewind }) => [since, rewind]), [[11, undefined]]);
});

test("a rewind the server holds fewer messages for starts at the first one, with no gap reported", async () => {
  const c = await connected();
  const seen = [];
  const gaps = [];
  c.on("gap", (gap) => gaps.push(gap));
  const subscribed = c.subscribe("news", (message) => seen.push(message.seq), { rewind: 20 });
  lastSocket().answerSubscribes({ news: 10 });
  await subscribed;
  for (const seq of [9, 10, 11]) lastSocket().message("news", seq);
  assert.deepEqual([seen, gaps], [[9, 10, 11], []]);
});

test("latest() hands the latest value, then every change; an empty channel just waits", async () => {
  const c = await connected();
  const values = [];
  const ready = c.latest("price", (value) => values.push(value));
  const empty = c.latest("quiet", (value) => values.push(value));
  assert.deepEqual(subscribes().map((frame) => frame.rewind), [1, 1]);
  lastSocket().answerSubscribes({ price: 7, quiet: 0 });
  await Promise.all([ready, empty]);
  lastSocket().message("price", 7);
  lastSocket().message("price", 8);
  lastSocket().message("quiet", 1);
  assert.deepEqual(values, [{ seq: 7 }, { seq: 8 }, { seq: 1 }]);
});

test("occupancy: asked on subscribe, counted on the subscription and emitted", async () => {
  const c = await connected();
  const events = [];
  c.on("occupancy", (event) => events.push(event.subscribers));
  const subscribed = c.subscribe("room", () => {}, { occupancy: true });
  assert.equal(subscribes()[0].occupancy, true);
  lastSocket().answerSubscribes({ room: 0 });
  const subscription = await subscribed;
  lastSocket().receive({ type: "occupancy", channel: "room", subscribers: 3 });
  assert.deepEqual([events, subscription.subscribers], [[3], 3]);
});

test("on SSE the stream asks ?rewind= for the channels its cursor does not name", async () => {
  const { FakeEventSource } = await import("./fakes.js");
  const c = new PushClient("ws://push.test/ws/", { EventSource: FakeEventSource, transports: ["sse"], baseDelayMs: 1, maxDelayMs: 3 });
  clients.push(c);
  c.connect().catch(() => {});
  c.subscribe("news", () => {}, { since: 4 }).catch(() => {});
  c.subscribe("prices", () => {}, { rewind: 5 }).catch(() => {});
  c.subscribe("chat", () => {}, { rewind: 2 }).catch(() => {});
  await until("a stream with every channel", () => FakeEventSource.opened.at(-1)?.channels.length === 3);
  const url = FakeEventSource.opened.at(-1).url;
  assert.equal(url.searchParams.get("rewind"), "5");
  assert.equal(url.searchParams.get("since"), "news:4");
});
