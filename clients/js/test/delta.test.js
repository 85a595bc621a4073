// Delta compression in the JavaScript client (`subscribe(..., { delta: true })`), against
// a fake socket playing the server: deltas applied for the handler, the base read from
// the JSON frame as sent, and a wrong base or a missing one detected and recovered by
// subscribing again from the last seq delivered. Run with `node --test clients/js/test/`.

import { afterEach, beforeEach, test } from "node:test";
import assert from "node:assert/strict";

import { DELTA_FAILURES_MAX, PushClient, applyDataDelta, dataText, msgpack } from "../index.js";
import { createDelta } from "../../../push/static/push/fossil-delta.js";
import { FakeSocket, reset, until } from "./fakes.js";

const clients = [];
const encoder = new TextEncoder();

beforeEach(reset);
afterEach(() => {
  for (const pushClient of clients.splice(0)) pushClient.close();
});

function deltaOf(baseText, text) {
  return Buffer.from(createDelta(encoder.encode(baseText), encoder.encode(text))).toString("base64");
}

// A message frame as the server's JSON codec writes it, data as given text.
function fullFrame(channel, seq, dataJson) {
  return `{"type":"message","channel":"${channel}","seq":${seq},"message_id":"m-${seq}","data":${dataJson},"timestamp":1764150000.5}`;
}

function deltaFrame(channel, seq, dataDelta) {
  return JSON.stringify({ type: "message", channel, seq, message_id: `m-${seq}`, delta: true, data_delta: dataDelta, timestamp: 1764150000.5 });
}

const state = (version) => JSON.stringify({ version, price: 100.0 + version, rows: Array.from({ length: 40 }, (_, i) => ({ id: i, name: `row ${i}` })) });

async function subscribedWithDelta(options = {}) {
  const c = new PushClient("ws://push.test/ws/", { WebSocket: FakeSocket, transports: ["websocket"], baseDelayMs: 1, maxDelayMs: 4, ...options });
  clients.push(c);
  const seen = { messages: [], errors: [] };
  c.on("error", (error) => seen.errors.push(error));
  c.connect().catch(() => {});
  const subscribed = c.subscribe("board", (message) => seen.messages.push(message), { delta: true });
  await until("a socket", () => FakeSocket.opened.length === 1);
  const socket = FakeSocket.opened[0];
  socket.establish();
  const request = socket.sent.find((frame) => frame.type === "subscribe");
  assert.equal(request.delta, "fossil");
  socket.receive({ type: "subscribed", id: request.id, channel: "board", seq: 0, delta: "fossil" });
  const subscription = await subscribed;
  assert.equal(subscription.deltaAgreed, true);
  const frame = (text) => socket.onmessage({ data: text });
  return { client: c, socket, seen, frame, subscription };
}

test("deltas are applied for the handler, against the data's text as the server sent it", async () => {
  const { seen, frame } = await subscribedWithDelta();
  // 101.0 stays 101.0 in the base, as sent: JSON.stringify would have made it 101.
  const texts = [1, 2, 3].map((v) => state(v).replace(`"price":${100 + v}`, `"price":${100 + v}.0`));
  frame(fullFrame("board", 1, texts[0]));
  frame(deltaFrame("board", 2, deltaOf(texts[0], texts[1])));
  frame(deltaFrame("board", 3, deltaOf(texts[1], texts[2])));
  assert.deepEqual(
    seen.messages.map((m) => [m.seq, m.data.version, "delta" in m, "data_delta" in m]),
    [
      [1, 1, false, false],
      [2, 2, false, false],
      [3, 3, false, false],
    ],
  );
  assert.deepEqual(seen.errors, []);
});

test("a delta against the wrong base is refused, and the channel is resubscribed from the last seq", async () => {
  const { seen, frame, socket } = await subscribedWithDelta();
  frame(fullFrame("board", 1, state(1)));
  frame(fullFrame("board", 2, state(2)));
  // A delta made against another base of the same length, from which it copies "row X":
  // applied to ours it gives text of the right length, and only the checksum can tell.
  const swap = (text) => text.replace("row 5", "row X");
  frame(deltaFrame("board", 3, deltaOf(swap(state(2)), swap(state(3)))));
  frame(deltaFrame("board", 4, deltaOf(state(3), state(4)))); // dropped while resyncing
  assert.deepEqual(seen.messages.map((m) => m.seq), [1, 2]);
  assert.deepEqual(seen.errors.map((e) => e.code), ["DELTA_MISMATCH"]);
  const unsubscribe = socket.sent.find((f) => f.type === "unsubscribe");
  assert.equal(unsubscribe.channel, "board");
  socket.receive({ type: "unsubscribed", id: unsubscribe.id, channel: "board" });
  await until("a new subscribe", () => socket.sent.filter((f) => f.type === "subscribe").length === 2);
  const again = socket.sent.filter((f) => f.type === "subscribe")[1];
  assert.equal(again.since, 2);
  assert.equal(again.delta, "fossil");
  socket.receive({ type: "subscribed", id: again.id, channel: "board", seq: 4, recovered: true, delta: "fossil" });
  // The server replays 3 and 4 in full, then deltas again.
  frame(fullFrame("board", 3, state(3)));
  frame(fullFrame("board", 4, state(4)));
  frame(deltaFrame("board", 5, deltaOf(state(4), state(5))));
  assert.deepEqual(
    seen.messages.map((m) => [m.seq, m.data.version]),
    [1, 2, 3, 4, 5].map((v) => [v, v]),
  );
});

test("a delta without the message before it is refused; repeated failures stop asking for delta", async () => {
  const { seen, frame, socket, subscription } = await subscribedWithDelta();
  frame(deltaFrame("board", 1, deltaOf(state(0), state(1))));
  assert.deepEqual(seen.messages, []);
  for (let failure = 1; failure < DELTA_FAILURES_MAX; failure++) {
    const unsubscribe = socket.sent.filter((f) => f.type === "unsubscribe").at(-1);
    socket.receive({ type: "unsubscribed", id: unsubscribe.id, channel: "board" });
    await until("a new subscribe", () => socket.sent.filter((f) => f.type === "subscribe").length === failure + 1);
    const request = socket.sent.filter((f) => f.type === "subscribe").at(-1);
    socket.receive({ type: "subscribed", id: request.id, channel: "board", seq: 0, delta: "fossil" });
    frame(deltaFrame("board", 1, deltaOf(state(0), state(1))));
  }
  assert.equal(seen.errors.length, DELTA_FAILURES_MAX);
  assert.equal(subscription.delta, false);
  const unsubscribe = socket.sent.filter((f) => f.type === "unsubscribe").at(-1);
  socket.receive({ type: "unsubscribed", id: unsubscribe.id, channel: "board" });
  await until("a subscribe without delta", () => socket.sent.filter((f) => f.type === "subscribe").length === DELTA_FAILURES_MAX + 1);
  assert.equal(socket.sent.filter((f) => f.type === "subscribe").at(-1).delta, undefined);
});

test("applyDataDelta checks length and checksum; dataText reads the frame's own text", () => {
  const base = state(1);
  const delta = deltaOf(base, state(2));
  assert.equal(applyDataDelta(base, delta), state(2));
  assert.throws(() => applyDataDelta(base.replace("row 7", "row Y"), delta), /checksum/);
  assert.throws(() => applyDataDelta(base.slice(1), delta));
  const text = '{"a":1.0,"2":[1e+20]}';
  assert.equal(dataText(JSON.parse(fullFrame("c", 1, text)), fullFrame("c", 1, text)), text);
  assert.equal(dataText({ data: { a: 1 } }, null), '{"a":1}');
});

test("over MessagePack the base is rebuilt from the frame's bytes as the server writes it", () => {
  // Made by Python: msgpack.packb({..., "data": d}) and json.dumps(d, ensure_ascii=False, separators=(",", ":")).
  const frame = Buffer.from(
    "hqR0eXBlp21lc3NhZ2WnY2hhbm5lbKFjo3NlcQGqbWVzc2FnZV9pZKFtpGRhdGGFoWIBoTKWyz/wAAAAAAAAz///////////04AAAAAAAAAApMOpAArAw6Fhy4AAAAAAAAAAo2JpZ8tDQcN5N+CAAKVzbWFsbMs+hCH19A2Ddql0aW1lc3RhbXDLP/gAAAAAAAA=",
    "base64",
  );
  const text = '{"b":1,"2":[1.0,18446744073709551615,-9223372036854775808,"\u00e9\\u0000\\n",null,true],"a":-0.0,"big":1e+16,"small":1.5e-07}';
  assert.equal(msgpack.dataText(frame), text);
  const format = { dataText: (bytes) => msgpack.dataText(new Uint8Array(bytes)) };
  assert.equal(dataText(msgpack.decode(frame), frame, format), text);
  // Python's float repr, which JSON.stringify does not follow.
  const cases = [
    [100, "100.0"], [0.0001, "0.0001"], [0.00001, "1e-05"], [1e16, "1e+16"], [1e15, "1000000000000000.0"],
    [-2.5e-300, "-2.5e-300"], [0.1, "0.1"], [123456789.123, "123456789.123"], [-0, "-0.0"], [1e100, "1e+100"],
  ];
  for (const [value, repr] of cases) assert.equal(msgpack.pythonFloat(value), repr);
});

test("a resync whose unsubscribe is refused still subscribes again", async () => {
  // NOT_SUBSCRIBED (or a reply that comes too late) to the resync's unsubscribe must not
  // leave the channel without a subscription, silent for the rest of the connection.
  const { seen, frame, socket } = await subscribedWithDelta();
  frame(fullFrame("board", 1, state(1)));
  frame(deltaFrame("board", 2, "bm90IGEgZGVsdGE="));
  const unsubscribe = socket.sent.find((f) => f.type === "unsubscribe");
  socket.receive({ type: "error", id: unsubscribe.id, code: "NOT_SUBSCRIBED", message: "not subscribed" });
  const again = await until("a second subscribe", () => socket.sent.filter((f) => f.type === "subscribe")[1]);
  assert.equal(again.since, 1);
  socket.receive({ type: "subscribed", id: again.id, channel: "board", seq: 2, recovered: true, delta: "fossil" });
  frame(fullFrame("board", 2, state(2)));
  assert.deepEqual(seen.messages.map((m) => m.seq), [1, 2]);
});

test("a delta that would make data larger than maxDeltaBytes is refused before it is applied", async () => {
  // A broken or hostile server: a few bytes of copy commands can declare and build
  // gigabytes out of a small base.
  const { seen, frame } = await subscribedWithDelta({ maxDeltaBytes: 2_000 });
  frame(fullFrame("board", 1, state(1)));
  const large = JSON.stringify({ version: 2, pad: "y".repeat(4_000) });
  frame(deltaFrame("board", 2, deltaOf(state(1), large)));
  assert.deepEqual(seen.messages.map((m) => m.seq), [1]);
  assert.deepEqual(seen.errors.map((e) => e.code), ["DELTA_MISMATCH"]);
  assert.match(seen.errors[0].message, /2000/);
});
