// The real JavaScript client against a real node, for tests/test_delta_e2e.py: subscribes
// to a channel with delta, prints one JSON line per message its handler gets (and one
// per error), and exits after `count` messages. With `corrupt-after N`, the base the
// client holds is altered after the Nth message, as a bug or a proxy might: the client
// must refuse the next delta and recover without handing wrong data to the handler.
//
//   node [--experimental-websocket] delta_subscriber.mjs <ws url> <channel> <count> [json|msgpack] [corrupt-after N]

import { PushClient, msgpack } from "../../index.js";

const [url, channel, countText, format = "json", corruptFlag, corruptAfterText] = process.argv.slice(2);
const count = Number(countText);
const corruptAfter = corruptFlag === "corrupt-after" ? Number(corruptAfterText) : null;

const client = new PushClient(url, { transports: ["websocket"], baseDelayMs: 50, maxDelayMs: 500, ...(format === "msgpack" ? { msgpack } : {}) });
const print = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);
client.on("error", (error) => print({ error: error.code }));

// Whether each frame came as a delta, seen before the client applies it.
const undelta = client.undelta.bind(client);
client.undelta = (message, frame) => {
  print({ frame: message.seq, delta: Boolean(message.delta) });
  return undelta(message, frame);
};

let received = 0;
await client.connect();
const subscription = await client.subscribe(
  channel,
  (message) => {
    received += 1;
    print({ seq: message.seq, data: message.data });
    if (received === corruptAfter) subscription.base = { ...subscription.base, text: subscription.base.text.replace('"bid":', '"bad":') };
    if (received === count) {
      client.close();
      process.exit(0);
    }
  },
  { delta: true },
);
print({ subscribed: subscription.seq, agreed: subscription.deltaAgreed });
setTimeout(() => {
  print({ timeout: received });
  process.exit(1);
}, 30_000);
