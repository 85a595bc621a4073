// Laravel Echo from npm with its Pusher connector (pusher-js underneath), unmodified,
// against a real node's /app/<key> for tests/test_pusher_js.py. Configured the way a
// Laravel front-end configures it (`authEndpoint` and `auth.headers`, the API token as
// the header). Prints {state, socket_id} as the connection goes; see agent.mjs for the
// configuration and the life of the script.
//
// Commands, one JSON object per stdin line; `kind` is how Echo is asked for the channel
// (channel, private, encryptedPrivate, join) and `channel` the name without the prefix
// Echo adds (private-, private-encrypted-, presence-):
//   {"op": "listen", "kind": K, "channel": C, "event": E}   -> {channel, event: E, data}
//       per event: E as Echo takes it (".order-created" for no namespace, "OrderShipped"
//       for App\Events\OrderShipped); also {channel, subscribed: true} and
//       {channel, error} from Echo's subscribed() and error()
//   {"op": "join", "channel": C}   -> {channel, here: [users]}, {channel, joining: user},
//       {channel, leaving: user}
//   {"op": "whisper", "kind": K, "channel": C, "event": E, "data": D}
//   {"op": "listenForWhisper", "kind": K, "channel": C, "event": E} -> {channel, whisper: E, data}
//   {"op": "leave", "channel": C}
//
//   node echo_client.mjs '{"key": ..., "port": ..., "token": ...}'

import Echo from "laravel-echo";
import Pusher from "pusher-js";

import { config, describe, keepLog, print, pusherOptions, serve, traceFrames, watchConnection } from "./agent.mjs";

keepLog(Pusher);

const { channelAuthorization, userAuthentication, ...connection } = pusherOptions();
const echo = new Echo({
  broadcaster: "pusher",
  key: config.key,
  Pusher,
  ...connection,
  authEndpoint: channelAuthorization.endpoint,
  auth: { headers: channelAuthorization.headers, params: channelAuthorization.params },
});
const pusher = echo.connector.pusher;
traceFrames(pusher);
watchConnection(pusher);

const named = new Map();

// The Echo channel of `kind`, with its subscribed() and error() printed once.
function channelOf(kind, name) {
  const key = `${kind}:${name}`;
  if (!named.has(key)) {
    const channel = kind === "join" ? echo.join(name) : echo[kind](name);
    channel.subscribed(() => print({ channel: channel.name, subscribed: true }));
    channel.error((error) => print({ channel: channel.name, error: describe(error) }));
    named.set(key, channel);
  }
  return named.get(key);
}

const operations = {
  listen({ kind, channel, event }) {
    const echoChannel = channelOf(kind, channel);
    echoChannel.listen(event, (data) => print({ channel: echoChannel.name, event, data: describe(data) }));
  },
  join({ channel }) {
    const presence = channelOf("join", channel);
    presence
      .here((users) => print({ channel: presence.name, here: describe(users) }))
      .joining((user) => print({ channel: presence.name, joining: describe(user) }))
      .leaving((user) => print({ channel: presence.name, leaving: describe(user) }));
  },
  whisper({ kind, channel, event, data }) {
    channelOf(kind, channel).whisper(event, data);
  },
  listenForWhisper({ kind, channel, event }) {
    const echoChannel = channelOf(kind, channel);
    echoChannel.listenForWhisper(event, (data) =>
      print({ channel: echoChannel.name, whisper: event, data: describe(data) }),
    );
  },
  leave({ channel }) {
    echo.leave(channel);
    for (const key of named.keys()) if (key.endsWith(`:${channel}`)) named.delete(key);
  },
};

serve(operations, () => echo.disconnect());
