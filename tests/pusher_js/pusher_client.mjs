// pusher-js from npm, unmodified, against a real node's /app/<key> for
// tests/test_pusher_js.py. Connects at once; prints {state, socket_id} as the connection
// goes, and {channel, event, data} for every event on a subscribed channel (pusher:
// events included: subscription_succeeded with the member list on presence channels,
// subscription_error, member_added, member_removed, cache_miss). See agent.mjs for the
// configuration and the life of the script.
//
// Commands, one JSON object per stdin line:
//   {"op": "subscribe", "channel": C}
//   {"op": "unsubscribe", "channel": C}
//   {"op": "trigger", "channel": C, "event": "client-x", "data": D}  -> {op, sent: bool}
//   {"op": "members", "channel": C}                                  -> {op, members}
//   {"op": "signin"}  -> {signin: user_data} (null when refused) once pusher-js is done
//   {"op": "disconnect"}
//   {"op": "encrypt", "channel": C, "data": D}  -> {op, nonce, ciphertext}: D's JSON
//       text sealed with the key of C (a private-encrypted- channel, subscribed: the
//       shared_secret its authorization gave) as a Pusher back-end seals an event there
//       (NaCl secretbox, the library pusher-js itself decrypts with)
//
//   node pusher_client.mjs '{"key": ..., "port": ..., "token": ...}'

import Pusher from "pusher-js";
import nacl from "tweetnacl";

import { config, describe, keepLog, print, pusherOptions, serve, traceFrames, watchConnection } from "./agent.mjs";

keepLog(Pusher);

const pusher = new Pusher(config.key, pusherOptions());
traceFrames(pusher);
watchConnection(pusher);
pusher.user.bind("pusher:signin_error", (error) => print({ signin_error: describe(error) }));

const operations = {
  subscribe({ channel }) {
    const subscription = pusher.subscribe(channel);
    subscription.bind_global((event, data) => print({ channel, event, data: describe(data) }));
  },
  unsubscribe({ channel }) {
    pusher.unsubscribe(channel);
  },
  trigger({ channel, event, data }) {
    const sent = pusher.channel(channel).trigger(event, data);
    print({ op: "trigger", channel, event, sent: Boolean(sent) });
  },
  members({ channel }) {
    print({ op: "members", channel, members: describe(pusher.channel(channel).members) });
  },
  async signin() {
    pusher.signin();
    await pusher.user.signinDonePromise;
    print({ signin: describe(pusher.user.user_data) });
  },
  disconnect() {
    pusher.disconnect();
  },
  encrypt({ channel, data }) {
    const key = pusher.channel(channel).key;
    if (!key) throw new Error(`no shared secret for ${channel}`);
    const nonce = nacl.randomBytes(nacl.secretbox.nonceLength);
    const sealed = nacl.secretbox(Buffer.from(JSON.stringify(data)), nonce, key);
    print({
      op: "encrypt",
      nonce: Buffer.from(nonce).toString("base64"),
      ciphertext: Buffer.from(sealed).toString("base64"),
    });
  },
};

serve(operations, () => pusher.disconnect());
