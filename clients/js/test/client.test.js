// The JavaScript client over its WebSocket, against fake transports: the backoff it
// documents, duplicates and gap repair from the REST history, and the heartbeat
// watchdog. Run with `node --test clients/js/test/`.

import { afterEach, beforeEach, test } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";

import { DEFAULT_BASE_DELAY_MS, DEFAULT_MAX_DELAY_MS, PushClient, State, backoffDelay } from "../index.js";
import { FakeSocket, fakeFetch, messageEnvelope, reset, until } from "./fakes.js";

const URL_WS = "ws://push.test/ws/";

// Every client is closed after its test, passed or failed, so no timer keeps Node alive.
const clients = [];

function client(options = {}) {
  // WebSocket only: these tests are about the socket, not the SSE fallback.
  const pushClient = new PushClient(URL_WS, { WebSocket: FakeSocket, transports: ["websocket"], baseDelayMs: 1, maxDelayMs: 4, ...options });
  clients.push(pushClient);
  return pushClient;
}

const lastSocket = () => FakeSocket.opened.at(-1);

beforeEach(reset);
afterEach(() => {
  for (const pushClient of clients.splice(0)) pushClient.close();
});

// ----- backoff -------------------------------------------------------------------------

test("backoffDelay stays within the capped exponential and spreads over the whole window", () => {
  for (let attempt = 0; attempt < 40; attempt++) {
    const ceiling = Math.min(DEFAULT_MAX_DELAY_MS, DEFAULT_BASE_DELAY_MS * 2 ** attempt);
    assert.equal(backoffDelay(attempt, { random: () => 0 }), 0);
    assert.equal(backoffDelay(attempt, { random: () => 1 }), ceiling);
    for (let i = 0; i < 50; i++) {
      const delay = backoffDelay(attempt);
      assert.ok(delay >= 0 && delay <= ceiling, `${delay} ms for attempt ${attempt}`);
    }
  }
  const custom = [0, 1, 2, 3, 4].map((n) => backoffDelay(n, { baseMs: 100, maxMs: 500, random: () => 1 }));
  assert.deepEqual(custom, [100, 200, 400, 500, 500]);
  assert.equal(backoffDelay(10_000, { random: () => 1 }), DEFAULT_MAX_DELAY_MS); // no overflow
  // Full jitter: draws cover the window instead of bunching near the ceiling.
  const draws = Array.from({ length: 2000 }, () => backoffDelay(8));
  const mean = draws.reduce((sum, draw) => sum + draw, 0) / draws.length;
  assert.ok(Math.min(...draws) < 3_000 && Math.max(...draws) > 27_000);
  assert.ok(mean > 12_000 && mean < 18_000, `mean ${mean}`);
});

test("reconnects after random() * min(max, base * 2^n), and starts over at base after a connect", async () => {
  const draws = [1, 0.5];
  let drawn = 0;
  // Any connection counts as one that stayed up (the default asks for 5 s).
  const c = client({ baseDelayMs: 2, maxDelayMs: 8, stableAfterMs: 0, random: () => draws[drawn++ % draws.length] });
  const delays = [];
  c.on("close", ({ willReconnect, delayMs }) => willReconnect && delays.push(delayMs));
  c.connect().catch(() => {}); // closed at the end of the test
  for (let opened = 1; opened <= 6; opened++) {
    await until(`attempt ${opened}`, () => FakeSocket.opened.length === opened);
    lastSocket().fail();
  }
  assert.deepEqual(delays, [1 * 2, 0.5 * 4, 1 * 8, 0.5 * 8, 1 * 8, 0.5 * 8]);
  await until("attempt 7", () => FakeSocket.opened.length === 7);
  lastSocket().establish();
  assert.equal(c.state, State.CONNECTED);
  assert.equal(c.protocol, "v1.json");
  lastSocket().fail(1012);
  assert.equal(delays.at(-1), 1 * 2);
});

test("connections closed right after the greeting back off as failures do", async () => {
  // A node that greets and closes at once: reconnecting at the base delay every time
  // would have every client of that node knock again and again within half a second.
  const c = client({ baseDelayMs: 2, maxDelayMs: 8, random: () => 1 });
  const delays = [];
  c.on("close", ({ willReconnect, delayMs }) => willReconnect && delays.push(delayMs));
  c.connect().catch(() => {});
  for (let opened = 1; opened <= 5; opened++) {
    await until(`attempt ${opened}`, () => FakeSocket.opened.length === opened);
    lastSocket().establish();
    lastSocket().fail(1011);
  }
  assert.deepEqual(delays, [2, 4, 8, 8, 8]);
});

// ----- duplicates and gaps -------------------------------------------------------------

// The REST history of `news`: the stored seqs, and how many reads fail (503) first.
function history(stored, { failures = 0 } = {}) {
  return fakeFetch((url) => {
    if (failures > 0) {
      failures -= 1;
      return { status: 503, body: { type: "error", code: "UNAVAILABLE", message: "restarting" } };
    }
    const query = new URL(url).searchParams;
    const [since, limit] = [Number(query.get("since")), Number(query.get("limit"))];
    const results = stored.filter((seq) => seq > since).slice(0, limit).map((seq) => messageEnvelope("news", seq));
    return { status: 200, body: { results, next: null } };
  });
}

const range = (first, last) => Array.from({ length: last - first + 1 }, (_, i) => first + i);

// The history of `history(stored)` that answers only once the test calls `open()`: a
// slow read, while which the channel goes on.
function gatedHistory(stored) {
  let open;
  const gate = new Promise((resolve) => {
    open = resolve;
  });
  const { fetch: read, calls } = history(stored);
  const fetch = async (url, init) => {
    await gate;
    return read(url, init);
  };
  return { fetch, calls, open };
}

// A client subscribed to `news` at seq 3, and what its handler and listeners see.
async function subscribedAtThree(options) {
  const c = client({ token: "key", ...options });
  const seen = { messages: [], gap: [], unrecovered: [], error: [], ended: [] };
  for (const event of ["gap", "unrecovered", "error", "ended"]) c.on(event, (detail) => seen[event].push(detail));
  c.connect().catch(() => {}); // closed at the end of the test
  const subscribed = c.subscribe("news", (message, { replayed }) => seen.messages.push([message.seq, replayed]));
  await until("a socket", () => FakeSocket.opened.length === 1);
  lastSocket().establish();
  lastSocket().answerSubscribes({ news: 3 });
  await subscribed;
  return { client: c, seen };
}

test("duplicates are dropped, and a gap is filled from the history before anything after it", async () => {
  const { fetch, calls, open: openGate } = gatedHistory(range(1, 9));
  const { seen } = await subscribedAtThree({ fetch });
  for (const seq of [4, 4, 7, 6, 9, 6]) lastSocket().message("news", seq);
  // While the history is read, what came after the gap waits.
  assert.deepEqual(seen.messages, [[4, false]]);
  openGate();
  await until("the repair", () => seen.messages.length === 6);
  // Read from the history: marked replayed, like a resume's messages.
  assert.deepEqual(seen.messages, [[4, false], [5, true], [6, true], [7, false], [8, true], [9, false]]);
  assert.deepEqual(seen.gap, [
    { channel: "news", from: 5, to: 6, expected: 5, received: 7 },
    { channel: "news", from: 8, to: 8, expected: 8, received: 9 },
  ]);
  assert.deepEqual([seen.unrecovered, seen.error], [[], []]);
  const urls = calls.map((call) => new URL(call.url));
  assert.deepEqual(urls.map((url) => url.pathname), ["/api/v1/channels/news/messages", "/api/v1/channels/news/messages"]);
  assert.deepEqual(urls.map((url) => url.search), ["?since=4&limit=2", "?since=7&limit=1"]);
  assert.ok(calls.every((call) => call.headers.Authorization === "Token key"));
  // Live delivery goes on as before.
  lastSocket().message("news", 10);
  assert.deepEqual(seen.messages.at(-1), [10, false]);
});

for (const { name, stored, failures, delivered, unrecovered, errors } of [
  { name: "trimmed: the rest is delivered, the loss reported", stored: range(7, 20), failures: 0, delivered: [4, 7, 8, 9], unrecovered: [{ channel: "news", since: 4, seq: 6 }], errors: [] },
  { name: "two failed reads are retried", stored: range(1, 20), failures: 2, delivered: [4, 5, 6, 7, 8, 9], unrecovered: [], errors: [] },
  { name: "unreadable: reported, and delivery goes on", stored: range(1, 20), failures: 99, delivered: [4, 8, 9], unrecovered: [{ channel: "news", since: 4, seq: 7 }], errors: ["GAP_REPAIR_FAILED"] },
]) {
  test(`a gap the history cannot fill at once: ${name}`, async () => {
    const { fetch } = history(stored, { failures });
    const { seen } = await subscribedAtThree({ fetch });
    for (const seq of [4, 8, 9]) lastSocket().message("news", seq);
    await until("the repair", () => seen.messages.at(-1)?.[0] === 9);
    assert.deepEqual(seen.messages.map(([seq]) => seq), delivered);
    assert.deepEqual(seen.unrecovered, unrecovered);
    assert.deepEqual(seen.error.map((error) => error.code), errors);
  });
}

test("a cursor past the channel goes on from the seq the server names", async () => {
  // A stored cursor the channel never reached (its history was reset, or restored from
  // a backup): the server answers its real latest seq with recovered false, and what
  // follows that seq is new.
  const c = client();
  const seen = { messages: [], unrecovered: [] };
  c.on("unrecovered", (detail) => seen.unrecovered.push(detail));
  c.connect().catch(() => {});
  const subscribed = c.subscribe("news", (message) => seen.messages.push(message.seq), { since: 10 });
  await until("a socket", () => FakeSocket.opened.length === 1);
  lastSocket().establish();
  const request = lastSocket().sent.find((frame) => frame.type === "subscribe");
  assert.equal(request.since, 10);
  lastSocket().receive({ type: "subscribed", id: request.id, channel: "news", seq: 3, recovered: false });
  await subscribed;
  for (const seq of [4, 5]) lastSocket().message("news", seq);
  assert.deepEqual(seen.messages, [4, 5]);
  assert.equal(c.lastSeq("news"), 5);
  assert.deepEqual(seen.unrecovered, [{ channel: "news", since: 10, seq: 3 }]);
});

test("a refused history read is tried again after its Retry-After", async () => {
  // The address's history budget is spent: 429 with Retry-After: 1 for a second.
  const { fetch: read } = history(range(1, 9));
  let refusedAt = null;
  const { fetch, calls } = fakeFetch((url, init) => {
    refusedAt ??= Date.now();
    if (Date.now() - refusedAt < 1000) {
      return { status: 429, headers: { "Retry-After": "1" }, body: { type: "error", code: "RATE_LIMITED", message: "slow down" } };
    }
    return read(url, init).then(async (response) => ({ status: response.status, body: await response.json() }));
  });
  const { seen } = await subscribedAtThree({ fetch, maxDelayMs: 5000 });
  for (const seq of [4, 8, 9]) lastSocket().message("news", seq);
  await until("the repair", () => seen.messages.at(-1)?.[0] === 9, 5000);
  assert.deepEqual(seen.messages.map(([seq]) => seq), [4, 5, 6, 7, 8, 9]);
  assert.deepEqual([seen.unrecovered, seen.error], [[], []]);
  assert.equal(calls.length, 2);
});

test("a history page that does not move on ends the read", async () => {
  // A proxy that caches the history page whatever its query asks, or a buggy server:
  // the same page again must not be read (and kept) for ever.
  const { fetch, calls } = fakeFetch(() => {
    const results = calls.length > 50 ? [] : [messageEnvelope("news", 5)]; // stops a loop
    return { status: 200, body: { results, next: null } };
  });
  const { seen } = await subscribedAtThree({ fetch });
  for (const seq of [4, 8]) lastSocket().message("news", seq);
  await until("the repair", () => seen.messages.at(-1)?.[0] === 8);
  assert.deepEqual(seen.messages.map(([seq]) => seq), [4, 5, 8]);
  assert.deepEqual(seen.unrecovered, [{ channel: "news", since: 5, seq: 7 }]);
  assert.equal(calls.length, 2);
});

test("a resubscribe refused for now is asked again, and the application hears of it", async () => {
  // After a restart the node's database, Redis or broker may still be down (UNAVAILABLE),
  // or the address's subscribe budget spent (RATE_LIMITED): the subscription is held.
  const { client: c, seen } = await subscribedAtThree();
  lastSocket().fail(1012);
  await until("a reconnect", () => FakeSocket.opened.length === 2);
  lastSocket().establish();
  const refused = lastSocket().sent.find((frame) => frame.type === "subscribe");
  assert.equal(refused.since, 3);
  lastSocket().receive({ type: "error", id: refused.id, code: "UNAVAILABLE", message: "database unavailable: down" });
  assert.deepEqual(seen.error.map((error) => error.code), ["UNAVAILABLE"]);
  const again = await until("a second subscribe", () => lastSocket().sent.filter((frame) => frame.type === "subscribe")[1]);
  assert.equal(again.since, 3);
  lastSocket().receive({ type: "subscribed", id: again.id, channel: "news", seq: 4, recovered: true });
  lastSocket().message("news", 4);
  assert.deepEqual(seen.messages, [[4, true]]);
  assert.equal(c.lastSeq("news"), 4);
});

test("a resubscribe with no reply in time is asked again", async () => {
  const { client: c, seen } = await subscribedAtThree({ requestTimeoutMs: 50 });
  lastSocket().fail(1012);
  await until("a reconnect", () => FakeSocket.opened.length === 2);
  lastSocket().establish();
  const subscribes = () => lastSocket().sent.filter((frame) => frame.type === "subscribe");
  const again = await until("a second subscribe", () => subscribes()[1]);
  assert.equal(again.since, 3);
  assert.deepEqual(seen.error.map((error) => error.code), ["TIMEOUT"]);
  lastSocket().receive({ type: "subscribed", id: again.id, channel: "news", seq: 4, recovered: true });
  lastSocket().message("news", 4);
  assert.deepEqual(seen.messages, [[4, true]]);
  assert.equal(c.lastSeq("news"), 4);
});

test("an unsubscribe stops a repair in flight", async () => {
  const { fetch, calls, open: openGate } = gatedHistory(range(1, 9));
  const { client: c, seen } = await subscribedAtThree({ fetch });
  lastSocket().message("news", 6);
  c.unsubscribe("news").catch(() => {}); // no reply from the fake server
  openGate();
  await sleep(20);
  assert.equal(calls.length, 1);
  assert.deepEqual(seen.messages, []);
});

test("a frame that is not an envelope is skipped, and delivery goes on", async () => {
  // A throw in a socket's listener ends a Node process: a broken server or proxy must
  // not be able to do that.
  const { seen } = await subscribedAtThree();
  for (const frame of [null, 7, "text", [1]]) lastSocket().receive(frame);
  lastSocket().message("news", 4);
  assert.deepEqual(seen.messages, [[4, false]]);
});

// ----- heartbeat -----------------------------------------------------------------------

test("a greeting with a nonsense heartbeat_interval sends no flood of heartbeats", async () => {
  // A server or proxy that sends 0, a negative, a tiny or no number: the default, or
  // at least 100 ms, never heartbeats as fast as timers fire, nor a watchdog that
  // drops the socket at once (4001) and reconnects.
  for (const interval of [0, -1, 1e-9, "5", null, Number.NaN]) {
    const c = client();
    c.connect().catch(() => {}); // closed below
    await until("a socket", () => FakeSocket.opened.length > 0 && lastSocket().readyState === 0);
    const socket = lastSocket();
    socket.readyState = 1;
    socket.protocol = socket.protocols[0];
    socket.receive({ type: "connection_established", connection_id: "c", server_id: "n", heartbeat_interval: interval, timestamp: 0 });
    await sleep(150); // (the watchdog of a 100 ms interval drops a silent socket at 200)
    const sent = socket.sent.filter((frame) => frame.type === "heartbeat").length;
    const [state, closeCode] = [c.state, socket.closeCode];
    c.close();
    assert.ok(sent <= 2, `${interval}: ${sent} heartbeats in 150 ms`);
    assert.equal(state, State.CONNECTED, `${interval}: closed ${closeCode}`);
  }
});

test("heartbeats every interval; any frame keeps the socket, two silent intervals drop it with 4001", async () => {
  const intervalMs = 100;
  const c = client({ heartbeatIntervalMs: intervalMs });
  const closes = [];
  c.on("close", ({ code, willReconnect }) => closes.push([code, willReconnect]));
  c.connect().catch(() => {}); // closed at the end of the test
  await until("a socket", () => FakeSocket.opened.length === 1);
  const socket = lastSocket();
  socket.establish();
  // Five intervals with a frame every 20 ms: still the same socket.
  let lastFrameAt = Date.now();
  for (let i = 0; i < 25; i++) {
    await sleep(20);
    socket.receive({ type: "heartbeat_ack", timestamp: 0 });
    lastFrameAt = Date.now();
  }
  assert.equal(FakeSocket.opened.length, 1);
  assert.equal(c.state, State.CONNECTED);
  assert.ok(socket.sent.filter((frame) => frame.type === "heartbeat").length >= 3);
  // Then silence.
  await until("a new socket", () => FakeSocket.opened.length === 2, 5_000);
  // Node may fire a timer up to a millisecond early.
  assert.ok(Date.now() - lastFrameAt >= 2 * intervalMs - 2, `${Date.now() - lastFrameAt} ms`);
  assert.equal(socket.closeCode, 4001);
  assert.deepEqual(closes, [[4001, true]]);
  lastSocket().establish();
  assert.equal(c.state, State.CONNECTED);
});

// ----- replies that come late ------------------------------------------------------------

for (const late of ["error", "subscribed"]) {
  test(`a late ${late} to an old subscribe leaves the new subscription alone`, async () => {
    // The resubscribe after a reconnect is still unanswered when the application
    // unsubscribes and subscribes again: the old request's late answer (a refusal, or a
    // resume that could not recover) is not the new subscription's business.
    const { client: c, seen } = await subscribedAtThree();
    lastSocket().fail(1012);
    await until("a reconnect", () => FakeSocket.opened.length === 2);
    lastSocket().establish();
    const old = lastSocket().sent.find((frame) => frame.type === "subscribe");
    const unsubscribed = c.unsubscribe("news");
    const unsubscribe = lastSocket().sent.find((frame) => frame.type === "unsubscribe");
    lastSocket().receive({ type: "unsubscribed", id: unsubscribe.id, channel: "news" });
    await unsubscribed;
    const received = [];
    const subscribed = c.subscribe("news", (message) => received.push(message.seq));
    const fresh = lastSocket().sent.filter((frame) => frame.type === "subscribe")[1];
    if (late === "error") lastSocket().receive({ type: "error", id: old.id, code: "FORBIDDEN", message: "no" });
    else lastSocket().receive({ type: "subscribed", id: old.id, channel: "news", seq: 0, recovered: false });
    lastSocket().receive({ type: "subscribed", id: fresh.id, channel: "news", seq: 7 });
    assert.equal((await subscribed).seq, 7);
    for (const seq of [8, 9]) lastSocket().message("news", seq);
    assert.deepEqual(received, [8, 9]);
    assert.deepEqual([seen.gap, seen.unrecovered], [[], []]);
  });
}

test("a first subscribe with no reply in time is not held: its late reply delivers nothing, and subscribing again asks again", async () => {
  const c = client({ requestTimeoutMs: 30 });
  c.connect().catch(() => {});
  await until("a socket", () => FakeSocket.opened.length === 1);
  lastSocket().establish();
  const first = [];
  await assert.rejects(c.subscribe("news", (message) => first.push(message.seq)), { code: "TIMEOUT" });
  const subscribes = () => lastSocket().sent.filter((frame) => frame.type === "subscribe");
  // The server got to it after all: the caller was told it failed, so nothing reaches it.
  lastSocket().receive({ type: "subscribed", id: subscribes()[0].id, channel: "news", seq: 3 });
  lastSocket().message("news", 4);
  assert.deepEqual(first, []);
  assert.equal(c.lastSeq("news"), null);
  const second = [];
  const subscribed = c.subscribe("news", (message) => second.push(message.seq));
  assert.equal(subscribes().length, 2);
  lastSocket().receive({ type: "subscribed", id: subscribes()[1].id, channel: "news", seq: 4 });
  await subscribed;
  lastSocket().message("news", 5);
  assert.deepEqual([first, second], [[], [5]]);
});

test("a slow gap repair holds a bounded number of messages, and reads what it left out from the history", async () => {
  const { fetch, open: openGate } = gatedHistory(range(1, 40));
  const { client: c, seen } = await subscribedAtThree({ fetch, maxHeldMessages: 5 });
  let heldMost = 0;
  for (const seq of [4, ...range(6, 40)]) {
    lastSocket().message("news", seq);
    heldMost = Math.max(heldMost, c.subscriptions.get("news").held?.size ?? 0);
  }
  assert.deepEqual(seen.messages, [[4, false]]);
  openGate();
  await until("the repair", () => seen.messages.at(-1)?.[0] === 40);
  assert.ok(heldMost <= 5, `${heldMost} held`);
  assert.deepEqual(seen.messages.map(([seq]) => seq), range(4, 40));
  assert.deepEqual([seen.unrecovered, seen.error], [[], []]);
});

test("after recovered: false nothing up to the reply's seq reaches the handler: the application's refetch covers it", async () => {
  // Resumed from 3, the server kept only 6 to 8: it answers recovered false with seq 8
  // and replays 6 to 8, which handed over as well would be applied twice.
  const { client: c, seen } = await subscribedAtThree({ fetch: history(range(6, 9)).fetch });
  lastSocket().fail(1012);
  await until("a reconnect", () => FakeSocket.opened.length === 2);
  lastSocket().establish();
  const resume = lastSocket().sent.find((frame) => frame.type === "subscribe");
  assert.equal(resume.since, 3);
  lastSocket().receive({ type: "subscribed", id: resume.id, channel: "news", seq: 8, recovered: false });
  for (const seq of [6, 7, 8, 9]) lastSocket().message("news", seq);
  await until("the live message", () => seen.messages.at(-1)?.[0] === 9);
  assert.deepEqual(seen.messages.map(([seq]) => seq), [9]);
  assert.deepEqual(seen.unrecovered, [{ channel: "news", since: 3, seq: 8 }]);
  assert.equal(c.lastSeq("news"), 9);
});

test("a first subscribe cut short by close() is not held: a later connect() does not bring it back", async () => {
  const c = client();
  c.connect().catch(() => {});
  await until("a socket", () => FakeSocket.opened.length === 1);
  lastSocket().establish();
  const received = [];
  const subscribed = c.subscribe("news", (message) => received.push(message.seq));
  c.close();
  await assert.rejects(subscribed, { code: "CONNECTION_CLOSED" });
  c.connect().catch(() => {});
  await until("a second socket", () => FakeSocket.opened.length === 2);
  lastSocket().establish();
  assert.deepEqual(lastSocket().sent.filter((frame) => frame.type === "subscribe"), []);
  lastSocket().message("news", 1);
  assert.deepEqual(received, []);
});

test("a long gap is read and delivered a page at a time", async () => {
  // Each history page reaches the handler before the next one is read: the client holds
  // one page, not the whole range.
  const reads = []; // [the read's since, the last seq delivered then]
  let seen = null;
  const { fetch: read } = history(range(1, 2600));
  const fetch = (url, init) => {
    reads.push([Number(new URL(url).searchParams.get("since")), seen.messages.at(-1)[0]]);
    return read(url, init);
  };
  const subscribed = await subscribedAtThree({ fetch });
  seen = subscribed.seen;
  for (const seq of [4, 2500]) lastSocket().message("news", seq);
  await until("the repair", () => seen.messages.at(-1)?.[0] === 2500);
  assert.deepEqual(seen.messages.map(([seq]) => seq), range(4, 2500));
  assert.deepEqual(reads, [[4, 4], [1004, 1004], [2004, 2004]]);
});

test("an unsubscribe while the resubscribe waits for its retry succeeds", async () => {
  // The resubscribe after a reconnect was refused for now and waits to be asked again:
  // the server holds no such subscription and answers NOT_SUBSCRIBED, which is what
  // the application asked for.
  let draws = 0; // the reconnect at once, the resubscribe's retry after 5 s
  const { client: c, seen } = await subscribedAtThree({ random: () => (draws++ ? 1 : 0), baseDelayMs: 5_000, maxDelayMs: 5_000 });
  lastSocket().fail(1012);
  await until("a reconnect", () => FakeSocket.opened.length === 2);
  lastSocket().establish();
  const refused = lastSocket().sent.find((frame) => frame.type === "subscribe");
  lastSocket().receive({ type: "error", id: refused.id, code: "UNAVAILABLE", message: "down" });
  const unsubscribed = c.unsubscribe("news");
  const request = lastSocket().sent.find((frame) => frame.type === "unsubscribe");
  lastSocket().receive({ type: "error", id: request.id, code: "NOT_SUBSCRIBED", message: "not subscribed" });
  assert.equal(await unsubscribed, null);
  assert.deepEqual(seen.error.map((error) => error.code), ["UNAVAILABLE"]);
});

test("a second subscribe of a channel whose first is not answered yet settles with the first", async () => {
  const c = client();
  c.connect().catch(() => {});
  await until("a socket", () => FakeSocket.opened.length === 1);
  lastSocket().establish();
  const first = c.subscribe("private-news", () => {});
  const second = c.subscribe("private-news", () => {});
  let settled = false;
  second.then(
    () => (settled = true),
    () => (settled = true),
  );
  await sleep(5);
  assert.equal(settled, false, "the server has not answered yet");
  const request = lastSocket().sent.find((frame) => frame.type === "subscribe");
  lastSocket().receive({ type: "error", id: request.id, code: "FORBIDDEN", message: "no" });
  await assert.rejects(first, { code: "FORBIDDEN" });
  await assert.rejects(second, { code: "FORBIDDEN" });
});

test("after a 1008 close a new token and connect() resume every channel", async () => {
  const { client: c, seen } = await subscribedAtThree();
  lastSocket().fail(1008);
  assert.equal(c.state, State.DISCONNECTED);
  c.token = "fresh";
  c.connect().catch(() => {});
  await until("a new socket", () => FakeSocket.opened.length === 2);
  assert.equal(new URL(lastSocket().url).searchParams.get("token"), "fresh");
  lastSocket().establish();
  const resume = lastSocket().sent.find((frame) => frame.type === "subscribe");
  assert.equal(resume.since, 3);
  lastSocket().receive({ type: "subscribed", id: resume.id, channel: "news", seq: 3, recovered: true });
  lastSocket().message("news", 4);
  assert.deepEqual(seen.messages.map(([seq]) => seq), [4]);
});

test("a handler that unsubscribes during a gap repair gets nothing more", async () => {
  const { fetch } = history(range(1, 9));
  const c = client({ fetch });
  const seen = [];
  c.connect().catch(() => {});
  const subscribed = c.subscribe("news", (message) => {
    seen.push(message.seq);
    if (message.seq === 5) c.unsubscribe("news").catch(() => {});
  });
  await until("a socket", () => FakeSocket.opened.length === 1);
  lastSocket().establish();
  lastSocket().answerSubscribes({ news: 3 });
  await subscribed;
  for (const seq of [4, 8, 9]) lastSocket().message("news", seq);
  await until("the unsubscribe", () => lastSocket().sent.some((frame) => frame.type === "unsubscribe"));
  await sleep(20);
  assert.deepEqual(seen, [4, 5]);
});

test("a repair in flight stops when its channel's resubscribe is refused", async () => {
  // FORBIDDEN after a reconnect (the grant was revoked) while the gap is being read: the
  // repair ends there instead of reading the history again and again.
  const { fetch, calls, open: openGate } = gatedHistory(range(1, 9));
  const { seen } = await subscribedAtThree({ fetch });
  for (const seq of [4, 8]) lastSocket().message("news", seq);
  lastSocket().fail(1012);
  await until("a reconnect", () => FakeSocket.opened.length === 2);
  lastSocket().establish();
  const resubscribe = lastSocket().sent.find((frame) => frame.type === "subscribe");
  lastSocket().receive({ type: "error", id: resubscribe.id, code: "FORBIDDEN", message: "revoked" });
  openGate();
  await sleep(50);
  assert.ok(calls.length <= 1, `${calls.length} history reads`);
  assert.deepEqual(seen.messages.map(([seq]) => seq), [4]);
  assert.deepEqual(seen.ended, [{ channel: "news", code: "FORBIDDEN", message: "revoked" }]);
});

test("a channel the server ends by itself (its grant removed) is ended once, and not asked for again", async () => {
  const { client: c, seen } = await subscribedAtThree();
  lastSocket().receive({ type: "error", code: "FORBIDDEN", message: "the grant was removed", channel: "news" });
  assert.deepEqual(seen.error.map((error) => error.code), ["FORBIDDEN"]);
  assert.deepEqual(seen.ended, [{ channel: "news", code: "FORBIDDEN", message: "the grant was removed" }]);
  assert.equal(c.lastSeq("news"), null);
  lastSocket().fail(1012);
  await until("a reconnect", () => FakeSocket.opened.length === 2);
  lastSocket().establish();
  assert.deepEqual(lastSocket().sent.filter((frame) => frame.type === "subscribe"), []);
  // An error the server sends again for it (no longer held) is an error, not an end.
  lastSocket().receive({ type: "error", code: "FORBIDDEN", message: "the grant was removed", channel: "news" });
  assert.equal(seen.ended.length, 1);
});
