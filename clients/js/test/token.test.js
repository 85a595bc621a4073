// Signed subscription tokens in the JavaScript client (`subscribe(channel, handler,
// { token })`), against a fake socket playing the server: the token on every subscribe,
// a provider asked again after a reconnect and before the token's `exp` (which extends
// the subscription without a replay), a subscription the server ends (`ended` when it is
// gone for good), and providers that fail. `tests/test_token_js_e2e.py` runs the client against a real node.

import { afterEach, beforeEach, test } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";

import { MIN_TOKEN_REFRESH_MS, PushClient, tokenClaims, tokenRefreshDelayMs } from "../index.js";
import { createDelta } from "../../../push/static/push/fossil-delta.js";
import { FakeEventSource, FakeSocket, fakeFetch, messageEnvelope, reset, until } from "./fakes.js";

const clients = [];
const lastSocket = () => FakeSocket.opened.at(-1);

beforeEach(reset);
afterEach(() => {
  for (const pushClient of clients.splice(0)) pushClient.close();
});

function client(options = {}) {
  const pushClient = new PushClient("ws://push.test/ws/", { WebSocket: FakeSocket, transports: ["websocket"], baseDelayMs: 1, maxDelayMs: 4, ...options });
  clients.push(pushClient);
  return pushClient;
}

const b64url = (text) => Buffer.from(text).toString("base64url");

// A token of the server's shape; the signature is the server's business, not ours.
function token(claims, signature = "sig") {
  return `${b64url(JSON.stringify(claims))}.${signature}`;
}

// A token for `private-x` that lives `lifetimeSecs` from now, numbered `n`.
function fresh(lifetimeSecs, n = 0) {
  const now = Math.floor(Date.now() / 1000);
  return token({ ch: "private-x", iat: now, exp: now + lifetimeSecs, n });
}

const subscribes = (socket, channel = "private-x") => socket.sent.filter((frame) => frame.type === "subscribe" && frame.channel === channel);

// The client connected, and the channel subscribed with `token` (answered at seq `seq`).
async function subscribedWith(tokenOption, { seq = 0, options = {}, subscribeOptions = {}, reply = {} } = {}) {
  const c = client(options);
  // `told`: the application's error and ended events, in the order it heard them.
  const seen = { seqs: [], errors: [], ended: [], told: [] };
  c.on("error", (error) => {
    seen.errors.push(error);
    seen.told.push(["error", error.code]);
  });
  c.on("ended", (detail) => {
    seen.ended.push(detail);
    seen.told.push(["ended", detail.code]);
  });
  c.connect().catch(() => {});
  await until("a socket", () => FakeSocket.opened.length === 1);
  lastSocket().establish();
  const subscribed = c.subscribe("private-x", (message) => seen.seqs.push(message.seq), { token: tokenOption, ...subscribeOptions });
  await until("the subscribe", () => subscribes(lastSocket()).length === 1);
  const [request] = subscribes(lastSocket());
  lastSocket().receive({ type: "subscribed", id: request.id, channel: "private-x", seq, ...reply });
  const subscription = await subscribed;
  return { client: c, seen, subscription };
}

// ----- what the token says --------------------------------------------------------------

test("tokenClaims reads the payload without verifying it, and nothing from a malformed token", () => {
  assert.deepEqual(tokenClaims(token({ ch: "private-x", exp: 5, info: { name: "Zoë" } })), { ch: "private-x", exp: 5, info: { name: "Zoë" } });
  for (const bad of ["", "no-dot-but-not-base64!", `${b64url("[1,")}.x`, `${b64url("7")}.x`, null, 42]) {
    assert.equal(tokenClaims(bad), null, String(bad));
  }
});

test("a token is refreshed at 90% of its lifetime, at least 5 s before exp, never within 1 s", () => {
  const at = (lifetimeSecs) => tokenRefreshDelayMs(token({ iat: 1000, exp: 1000 + lifetimeSecs }));
  assert.equal(at(3600), 3240_000); // 90%
  assert.equal(at(60), 54_000);
  assert.equal(at(20), 15_000); // 5 s before exp
  assert.equal(at(4), 2_000); // half-way through a short one
  assert.equal(at(1), MIN_TOKEN_REFRESH_MS);
  // The lifetime is exp - iat, whatever the client's clock says (here far ahead of it).
  assert.equal(tokenRefreshDelayMs(token({ iat: 1000, exp: 1060 }), 5_000_000_000), 54_000);
  // Without iat: exp minus now; already expired by our clock: once a second, no loop.
  assert.equal(tokenRefreshDelayMs(token({ exp: 100 }), 40_000), 54_000);
  assert.equal(tokenRefreshDelayMs(token({ exp: 100 }), 200_000), MIN_TOKEN_REFRESH_MS);
  assert.equal(tokenRefreshDelayMs(token({ ch: "private-x" })), null);
  assert.equal(tokenRefreshDelayMs("garbage"), null);
});

// ----- on every subscribe ---------------------------------------------------------------

test("a token string rides on the first subscribe and on the resubscribe after a reconnect", async () => {
  const secret = fresh(600);
  const { client: c, seen } = await subscribedWith(secret, { seq: 4 });
  assert.deepEqual(subscribes(FakeSocket.opened[0]).map(({ token: t, since }) => [t, since]), [[secret, undefined]]);
  lastSocket().message("private-x", 5);
  lastSocket().fail(1012);
  await until("the reconnect", () => FakeSocket.opened.length === 2);
  lastSocket().establish();
  assert.deepEqual(subscribes(lastSocket()).map(({ token: t, since }) => [t, since]), [[secret, 5]]);
  assert.deepEqual(seen.seqs, [5]);
  assert.equal(c.subscriptions.get("private-x").refreshTimer, null); // a string cannot be refreshed
});

test("a provider is asked for every subscribe: the first, and the resume after a reconnect", async () => {
  const asked = [];
  const provider = async (channel) => {
    asked.push(channel);
    return fresh(600, asked.length);
  };
  const { seen } = await subscribedWith(provider, { seq: 2 });
  assert.equal(tokenClaims(subscribes(FakeSocket.opened[0])[0].token).n, 1);
  lastSocket().message("private-x", 3);
  lastSocket().fail(1006);
  await until("the reconnect", () => FakeSocket.opened.length === 2);
  lastSocket().establish();
  await until("the resubscribe", () => subscribes(lastSocket()).length === 1);
  const [resume] = subscribes(lastSocket());
  assert.equal(resume.since, 3);
  assert.equal(tokenClaims(resume.token).n, 2, "a fresh token, not the first one again");
  assert.deepEqual(asked, ["private-x", "private-x"]);
  // The resume replays 3 (delivered already) and 4; the handler sees each seq once.
  lastSocket().answerSubscribes({ "private-x": 4 });
  lastSocket().message("private-x", 3);
  lastSocket().message("private-x", 4);
  assert.deepEqual(seen.seqs, [3, 4]);
  assert.deepEqual(seen.errors, []);
});

// ----- refresh before exp ---------------------------------------------------------------

test("before the token's exp a fresh one extends the subscription: same stream, delta base kept", async () => {
  let n = 0;
  // A 2 s token is refreshed half-way: after 1 s.
  const { seen } = await subscribedWith(() => fresh(2, ++n), { subscribeOptions: { delta: true }, reply: { delta: "fossil" } });
  const socket = lastSocket();
  const encoder = new TextEncoder();
  const base = '{"v":1,"rows":["a","b","c","d","e","f","g","h"]}';
  const next = '{"v":2,"rows":["a","b","c","d","e","f","g","h"]}';
  socket.onmessage({ data: `{"type":"message","channel":"private-x","seq":1,"message_id":"m-1","data":${base},"timestamp":1.5}` });
  const started = Date.now();
  await until("the refresh", () => subscribes(socket).length === 2, 3_000);
  assert.ok(Date.now() - started >= 900, `refreshed after ${Date.now() - started} ms`);
  const refresh = subscribes(socket)[1];
  assert.equal(tokenClaims(refresh.token).n, 2);
  assert.equal(refresh.since, 1); // should the server have ended it meanwhile: no gap
  socket.receive({ type: "subscribed", id: refresh.id, channel: "private-x", seq: 1, recovered: true, delta: "fossil" });
  // The server's stream went on through the extension: its next delta applies.
  const dataDelta = Buffer.from(createDelta(encoder.encode(base), encoder.encode(next))).toString("base64");
  socket.receive({ type: "message", channel: "private-x", seq: 2, message_id: "m-2", delta: true, data_delta: dataDelta, timestamp: 1.5 });
  assert.deepEqual(seen.seqs, [1, 2]);
  assert.deepEqual(seen.errors, []);
  // And the next refresh is on its way for the new token.
  await until("the second refresh", () => subscribes(socket).length === 3, 3_000);
});

test("a refused fresh token drops the subscription, stops the server's stream and tells the application", async () => {
  const secrets = [fresh(2, 1), "refused-token-value"];
  const { client: c, seen } = await subscribedWith(() => secrets.shift());
  const socket = lastSocket();
  await until("the refresh", () => subscribes(socket).length === 2, 3_000);
  const refresh = subscribes(socket)[1];
  socket.receive({ type: "error", id: refresh.id, code: "FORBIDDEN", message: "subscription token refused: bad signature" });
  assert.deepEqual(seen.told, [["error", "FORBIDDEN"], ["ended", "FORBIDDEN"]]);
  assert.deepEqual(seen.ended, [{ channel: "private-x", code: "FORBIDDEN", message: "subscription token refused: bad signature" }]);
  assert.equal(c.lastSeq("private-x"), null);
  assert.deepEqual(socket.sent.filter((frame) => frame.type === "unsubscribe").map((frame) => frame.channel), ["private-x"]);
  socket.message("private-x", 1); // the server's stream until it read the unsubscribe
  assert.deepEqual(seen.seqs, []);
});

// ----- the server ends the subscription -------------------------------------------------

test("without a provider, a subscription the server ended is dropped, and the error then ended told", async () => {
  const { client: c, seen } = await subscribedWith(fresh(600), { seq: 3 });
  const socket = lastSocket();
  socket.receive({ type: "error", code: "FORBIDDEN", message: "subscription token expired", channel: "private-x" });
  assert.deepEqual(seen.errors.map((error) => [error.code, error.envelope.channel]), [["FORBIDDEN", "private-x"]]);
  assert.deepEqual(seen.told, [["error", "FORBIDDEN"], ["ended", "FORBIDDEN"]]);
  assert.deepEqual(seen.ended, [{ channel: "private-x", code: "FORBIDDEN", message: "subscription token expired" }]);
  assert.equal(c.lastSeq("private-x"), null);
  // Subscribing again (a new token) asks the server again and receives again.
  const again = c.subscribe("private-x", (message) => seen.seqs.push(message.seq), { token: fresh(600) });
  assert.equal(subscribes(socket).length, 2);
  socket.answerSubscribes({ "private-x": 3 });
  await again;
  socket.message("private-x", 4);
  assert.deepEqual(seen.seqs, [4]);
  // Nor is it asked for after a reconnect with the old token.
  c.unsubscribe("private-x").catch(() => {}); // no reply: the socket drops
  socket.fail(1006);
  await until("the reconnect", () => FakeSocket.opened.length === 2);
  lastSocket().establish();
  assert.deepEqual(subscribes(lastSocket()), []);
  assert.equal(seen.ended.length, 1, "ended once");
});

test("with a provider, a subscription the server ended resumes with a fresh token from the last seq", async () => {
  let n = 0;
  const { seen } = await subscribedWith(() => fresh(600, ++n), { seq: 2 });
  const socket = lastSocket();
  socket.message("private-x", 3);
  socket.receive({ type: "error", code: "FORBIDDEN", message: "subscription token expired", channel: "private-x" });
  await until("the resubscribe", () => subscribes(socket).length === 2);
  const resume = subscribes(socket)[1];
  assert.equal(resume.since, 3);
  assert.equal(tokenClaims(resume.token).n, 2);
  socket.answerSubscribes({ "private-x": 5 });
  for (const seq of [4, 5, 6]) socket.message("private-x", seq);
  assert.deepEqual(seen.seqs, [3, 4, 5, 6]);
  assert.deepEqual(seen.errors, [], "recovered: nothing for the application to hear");
  assert.deepEqual(seen.ended, []);
});

test("a resubscribe refused after the server ended the subscription is told, ended and dropped", async () => {
  const { client: c, seen } = await subscribedWith(() => fresh(600), { seq: 2 });
  const socket = lastSocket();
  socket.receive({ type: "error", code: "FORBIDDEN", message: "the grant was removed", channel: "private-x" });
  await until("the resubscribe", () => subscribes(socket).length === 2);
  const resume = subscribes(socket)[1];
  socket.receive({ type: "error", id: resume.id, code: "FORBIDDEN", message: "subscription token refused: expired" });
  assert.deepEqual(seen.told, [["error", "FORBIDDEN"], ["ended", "FORBIDDEN"]]);
  assert.deepEqual(seen.ended, [{ channel: "private-x", code: "FORBIDDEN", message: "subscription token refused: expired" }]);
  assert.equal(c.lastSeq("private-x"), null);
  assert.deepEqual(socket.sent.filter((frame) => frame.type === "unsubscribe"), []); // it held nothing
});

test("endings one after another back off, so tokens that end at once make no loop", async () => {
  const { seen } = await subscribedWith(() => fresh(600), { options: { baseDelayMs: 40, maxDelayMs: 1_000, random: () => 1 } });
  const socket = lastSocket();
  const waits = [];
  for (let ending = 1; ending <= 3; ending++) {
    const ended = Date.now();
    socket.receive({ type: "error", code: "FORBIDDEN", message: "subscription token expired", channel: "private-x" });
    await until(`resubscribe ${ending}`, () => subscribes(socket).length === ending + 1);
    waits.push(Date.now() - ended);
    socket.answerSubscribes({ "private-x": 0 });
  }
  // backoff(0), (1), (2) with random() = 1: 40, 80, 160 ms.
  for (const [i, least] of [40, 80, 160].entries()) assert.ok(waits[i] >= least - 5, `waits ${waits}`);
  assert.deepEqual(seen.errors, []);
  assert.deepEqual(seen.ended, []);
});

// ----- providers that fail ---------------------------------------------------------------

for (const [name, provider, hint] of [
  ["throws", () => {
    throw new Error("the back-end said 401");
  }, /the back-end said 401/],
  ["rejects", () => Promise.reject(new Error("network down")), /network down/],
  ["gives no string", () => ({ token: "x" }), /gave object, not a token/],
  ["gives an empty string", () => "", /gave an empty string/],
  ["never answers", () => new Promise(() => {}), /no token within 50 ms/],
]) {
  test(`a provider that ${name} fails the first subscribe with TOKEN_PROVIDER_FAILED, and nothing is sent`, async () => {
    const c = client({ requestTimeoutMs: 50 });
    c.connect().catch(() => {});
    await until("a socket", () => FakeSocket.opened.length === 1);
    lastSocket().establish();
    await assert.rejects(c.subscribe("private-x", () => {}, { token: provider }), (error) => {
      assert.equal(error.code, "TOKEN_PROVIDER_FAILED");
      assert.match(error.message, /"private-x"/);
      assert.match(error.message, hint);
      return true;
    });
    assert.deepEqual(subscribes(lastSocket()), []);
    assert.equal(c.lastSeq("private-x"), null);
    // Not held: a reconnect does not ask for it.
    lastSocket().fail(1006);
    await until("the reconnect", () => FakeSocket.opened.length === 2);
    lastSocket().establish();
    assert.deepEqual(subscribes(lastSocket()), []);
  });
}

test("a provider failing after a reconnect is asked again after growing backoff delays", async () => {
  let failures = 0;
  const calls = [];
  const provider = () => {
    calls.push(Date.now());
    if (calls.length > 1 && failures < 3) {
      failures += 1;
      throw new Error("the back-end is restarting");
    }
    return fresh(600, calls.length);
  };
  const { seen } = await subscribedWith(provider, { seq: 7, options: { baseDelayMs: 40, maxDelayMs: 1_000, random: () => 1 } });
  lastSocket().fail(1006);
  await until("the reconnect", () => FakeSocket.opened.length === 2, 3_000);
  lastSocket().establish();
  await until("the resubscribe", () => subscribes(lastSocket()).length === 1, 3_000);
  assert.equal(calls.length, 5);
  // After each failure: backoff(0), (1), (2) with random() = 1, never at once.
  const waits = calls.slice(2).map((at, i) => at - calls[i + 1]);
  for (const [i, least] of [40, 80, 160].entries()) assert.ok(waits[i] >= least - 5, `waits ${waits}`);
  assert.deepEqual(seen.errors.map((error) => error.code), Array(3).fill("TOKEN_PROVIDER_FAILED"));
  assert.equal(subscribes(lastSocket())[0].since, 7);
});

test("no token reaches the console or an error message, whatever fails", async () => {
  const secret = fresh(2, 1);
  const printed = [];
  const original = { error: console.error, warn: console.warn, log: console.log };
  for (const name of Object.keys(original)) console[name] = (...args) => printed.push(args.map(String).join(" "));
  try {
    const tokens = [secret, secret];
    const { seen } = await subscribedWith(() => tokens.shift() ?? Promise.reject(new Error("no more")));
    const socket = lastSocket();
    await until("the refresh", () => subscribes(socket).length === 2, 3_000);
    socket.receive({ type: "error", id: subscribes(socket)[1].id, code: "FORBIDDEN", message: "refused" });
    const text = [...printed, ...seen.errors.map((error) => `${error.message} ${JSON.stringify(error.envelope)}`)].join("\n");
    assert.ok(!text.includes(secret.split(".")[0]), text);
  } finally {
    Object.assign(console, original);
  }
});

// ----- the SSE fallback --------------------------------------------------------------------

// A client on the stream alone, told what the application hears.
function sseClient(options = {}) {
  const c = new PushClient("ws://push.test/ws/", { EventSource: FakeEventSource, transports: ["sse"], baseDelayMs: 1, maxDelayMs: 3, ...options });
  clients.push(c);
  const seen = { seqs: [], told: [] };
  c.on("error", (error) => seen.told.push(["error", error.code]));
  c.on("ended", (detail) => seen.told.push(["ended", detail.code]));
  c.connect().catch(() => {});
  return { client: c, seen };
}

const lastStream = () => FakeEventSource.opened.at(-1);
const expired = { code: "FORBIDDEN", message: "the subscription token for 'private-x' expired", channel: "private-x" };

test("on SSE a token string rides on the stream, beside the channels without one", async () => {
  const { client: c } = sseClient({ token: "key123" });
  const secret = fresh(600);
  const news = c.subscribe("news", () => {});
  const held = c.subscribe("private-x", () => {}, { token: secret });
  await until("a stream", () => FakeEventSource.opened.length === 1);
  const stream = lastStream();
  assert.deepEqual(stream.channels, ["news", "private-x"]);
  assert.deepEqual(stream.tokens, { "private-x": secret });
  assert.equal(stream.url.searchParams.get("token"), "key123"); // the client's own credential
  stream.establish();
  await Promise.all([news, held]);
});

test("on SSE a provider is asked before each stream opens, and the stream waits for it", async () => {
  const { client: c } = sseClient();
  let answer;
  const asked = [];
  const provider = (channel) => {
    asked.push(channel);
    return new Promise((resolve) => {
      answer = resolve;
    });
  };
  const seqs = [];
  const held = c.subscribe("private-x", (message) => seqs.push(message.seq), { token: provider });
  await until("the provider asked", () => asked.length === 1);
  await sleep(5);
  assert.equal(FakeEventSource.opened.length, 0, "no stream before its token");
  answer(fresh(600, 1));
  await until("a stream", () => FakeEventSource.opened.length === 1);
  assert.equal(tokenClaims(lastStream().tokens["private-x"]).n, 1);
  lastStream().establish();
  await held;
  lastStream().message("private-x", 3);
  lastStream().fail();
  await until("the provider asked again", () => asked.length === 2);
  answer(fresh(600, 2));
  await until("a second stream", () => FakeEventSource.opened.length === 2);
  assert.equal(tokenClaims(lastStream().tokens["private-x"]).n, 2, "a fresh token, not the first one again");
  assert.equal(lastStream().since, "private-x:3");
  assert.deepEqual(asked, ["private-x", "private-x"]);
  assert.deepEqual(seqs, [3]);
});

test("on SSE a channel the server ends at its token's exp comes back on a new stream with a fresh token, losing and repeating nothing", async () => {
  const { client: c, seen } = sseClient();
  let n = 0;
  // Tokens of 1.2 s: the server ends the channel at their exp.
  const provider = () => {
    n += 1;
    const now = Date.now() / 1000;
    return token({ ch: "private-x", iat: Math.floor(now), exp: Math.floor(now) + 1.2, n });
  };
  const news = [];
  await Promise.all([
    c.subscribe("private-x", (message) => seen.seqs.push(message.seq), { token: provider }),
    c.subscribe("news", (message) => news.push(message.seq)),
  ].map(async (subscribed) => {
    await until("a stream", () => FakeEventSource.opened.length === 1);
    lastStream().establish();
    return subscribed;
  }));
  const first = lastStream();
  first.message("private-x", 1, { cursor: "private-x:1,news:0" });
  await sleep(1_200);
  first.serverError(expired);
  // The other channel goes on meanwhile.
  first.message("news", 1, { cursor: "private-x:1,news:1" });
  await until("a new stream", () => FakeEventSource.opened.length === 2);
  assert.ok(first.closed);
  const second = lastStream();
  assert.deepEqual(second.channels, ["private-x", "news"]);
  assert.equal(tokenClaims(second.tokens["private-x"]).n, 2);
  assert.equal(second.since, "private-x:1,news:1");
  second.establish();
  // The server replays from the cursor; a seq delivered already is dropped.
  for (const seq of [1, 2, 3]) second.message("private-x", seq, { cursor: `private-x:${seq},news:1` });
  assert.deepEqual(seen.seqs, [1, 2, 3]);
  assert.deepEqual(news, [1]);
  assert.deepEqual(seen.told, [], "the application hears nothing of it");
  assert.ok(c.subscriptions.has("private-x"));
});

test("on SSE a stream whose only channel ends at its token's exp is replaced, not lost", async () => {
  const { client: c, seen } = sseClient();
  const states = [];
  c.on("state", ({ state }) => states.push(state));
  c.on("close", () => seen.told.push(["close"]));
  let n = 0;
  const provider = () => {
    n += 1;
    const now = Math.floor(Date.now() / 1000);
    return token({ ch: "private-x", iat: now, exp: now + 1, n });
  };
  const held = c.subscribe("private-x", (message) => seen.seqs.push(message.seq), { token: provider });
  await until("a stream", () => FakeEventSource.opened.length === 1);
  lastStream().establish();
  await held;
  await sleep(1_000);
  const first = lastStream();
  first.serverError(expired);
  first.fail(); // the server ends a stream with no channel left
  await until("a new stream", () => FakeEventSource.opened.length === 2);
  assert.equal(tokenClaims(lastStream().tokens["private-x"]).n, 2);
  lastStream().establish();
  assert.deepEqual(seen.told, []);
  assert.ok(!states.includes("reconnecting"), states.join(","));
});

test("on SSE a token string's exp ends the channel: error, then ended, and the others go on", async () => {
  const { client: c, seen } = sseClient();
  const now = Math.floor(Date.now() / 1000);
  const held = c.subscribe("private-x", (message) => seen.seqs.push(message.seq), { token: token({ ch: "private-x", iat: now, exp: now + 1 }) });
  const news = c.subscribe("news", () => {});
  await until("a stream", () => FakeEventSource.opened.length === 1);
  lastStream().establish();
  await Promise.all([held, news]);
  await sleep(1_000);
  lastStream().serverError(expired);
  assert.deepEqual(seen.told, [["error", "FORBIDDEN"], ["ended", "FORBIDDEN"]]);
  assert.ok(!c.subscriptions.has("private-x") && c.subscriptions.has("news"));
  await sleep(10);
  assert.equal(FakeEventSource.opened.length, 1, "the stream goes on");
});

test("on SSE a provider's token refused is told and ended, not asked again: on the first stream and after an ending", async () => {
  const { client: c, seen } = sseClient();
  const refused = c.subscribe("private-x", () => {}, { token: () => fresh(600) });
  await until("a stream", () => FakeEventSource.opened.length === 1);
  lastStream().establish();
  await refused; // resolved by the stream's opening, as every channel on SSE
  lastStream().serverError({ code: "FORBIDDEN", message: "subscription token refused: bad signature", channel: "private-x" });
  assert.deepEqual(seen.told.splice(0), [["error", "FORBIDDEN"], ["ended", "FORBIDDEN"]]);
  assert.ok(!c.subscriptions.has("private-x"));

  // Ended at exp, then the fresh token is refused: told once, ended, not asked again.
  let n = 0;
  const provider = () => {
    n += 1;
    const now = Math.floor(Date.now() / 1000);
    return token({ ch: "private-x", iat: now, exp: now + (n === 1 ? 1 : 600), n });
  };
  const held = c.subscribe("private-x", () => {}, { token: provider });
  await until("a second stream", () => FakeEventSource.opened.length === 2);
  lastStream().establish();
  await held;
  await sleep(1_000);
  lastStream().serverError(expired);
  await until("a third stream", () => FakeEventSource.opened.length === 3);
  lastStream().establish();
  lastStream().serverError({ code: "FORBIDDEN", message: "subscription token refused: bad signature", channel: "private-x" });
  assert.deepEqual(seen.told, [["error", "FORBIDDEN"], ["ended", "FORBIDDEN"]]);
  assert.ok(!c.subscriptions.has("private-x"));
  assert.equal(n, 2);
});

test("on SSE a provider that fails fails its subscribe, and the stream opens with the other channels", async () => {
  const { client: c } = sseClient();
  const failed = c.subscribe("private-x", () => {}, { token: () => Promise.reject(new Error("back-end down")) });
  const news = c.subscribe("news", () => {});
  await assert.rejects(failed, { code: "TOKEN_PROVIDER_FAILED" });
  await until("a stream", () => FakeEventSource.opened.length >= 1);
  assert.deepEqual(lastStream().channels, ["news"]);
  assert.deepEqual(lastStream().tokens, {});
  lastStream().establish();
  await news;
  await assert.rejects(c.subscribe("private-x", () => {}, { token: 42 }), TypeError);
});

// ----- gap repair ----------------------------------------------------------------------

// The REST history of `private-x` up to seq 9, for the client that holds it by token.
function tokenHistory() {
  return fakeFetch((url) => {
    const since = Number(new URL(url).searchParams.get("since"));
    return { status: 200, body: { results: [since + 1].map((seq) => messageEnvelope("private-x", seq)), next: null } };
  });
}

test("a gap is read back from the history with the subscription's token, a provider's fresh one each time", async () => {
  const asked = [];
  const provider = async () => {
    asked.push(asked.length + 1);
    return fresh(600, asked.length);
  };
  const { fetch, calls } = tokenHistory();
  const { seen } = await subscribedWith(provider, { seq: 2, options: { fetch } });
  lastSocket().message("private-x", 3);
  lastSocket().message("private-x", 5); // 4 lost on the way
  await until("the repair", () => seen.seqs.length === 3);
  assert.deepEqual(seen.seqs, [3, 4, 5]);
  assert.deepEqual(seen.errors, []);
  const [read] = calls;
  assert.equal(tokenClaims(read.headers["X-Subscription-Token"]).n, 2, "a fresh token, not the subscribe's");
  assert.ok(!read.url.includes(read.headers["X-Subscription-Token"]), "never in the URL");
});

test("a token string rides on the history read; a provider that fails fails the read", async () => {
  const secret = fresh(600);
  const { fetch, calls } = tokenHistory();
  const { seen } = await subscribedWith(secret, { seq: 2, options: { fetch } });
  lastSocket().message("private-x", 4);
  await until("the repair", () => seen.seqs.length === 2);
  assert.equal(calls[0].headers["X-Subscription-Token"], secret);

  reset();
  let providerCalls = 0;
  const failsAfterTheSubscribe = async () => {
    providerCalls += 1;
    if (providerCalls > 1) throw new Error("the back-end did not answer");
    return fresh(600);
  };
  const failing = await subscribedWith(failsAfterTheSubscribe, { seq: 2, options: { fetch } });
  lastSocket().message("private-x", 4);
  await until("the repair given up", () => failing.seen.seqs.length === 1);
  assert.deepEqual(failing.seen.seqs, [4]);
  assert.deepEqual(failing.seen.errors.map((error) => error.code), ["GAP_REPAIR_FAILED"]);
  assert.match(failing.seen.errors[0].message, /did not answer/);
});
