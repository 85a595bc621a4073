// A minimal EventSource for the live scripts over Node's fetch (Node 20 has none): the
// parts of the browser's that the client uses. Named events with `data` and the last
// `id` as `lastEventId`; `:` comments skipped; an `error` event without data when the
// response fails or ends, as the browser reports a lost stream (the client closes it
// then and reconnects by itself, so this one never retries).

export class NodeEventSource {
  constructor(url) {
    this.url = String(url);
    this.listeners = new Map();
    this.closed = false;
    this.controller = new AbortController();
    this.lastEventId = "";
    this.read();
  }

  addEventListener(type, listener) {
    if (!this.listeners.has(type)) this.listeners.set(type, []);
    this.listeners.get(type).push(listener);
  }

  close() {
    this.closed = true;
    this.controller.abort();
  }

  dispatch(type, event) {
    if (this.closed) return;
    for (const listener of this.listeners.get(type) ?? []) listener(event);
  }

  async read() {
    try {
      const response = await fetch(this.url, { headers: { accept: "text/event-stream" }, signal: this.controller.signal });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const decoder = new TextDecoder();
      let buffer = "";
      let type = "message";
      let data = [];
      for await (const chunk of response.body) {
        buffer += decoder.decode(chunk, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, end).replace(/\r$/, "");
          buffer = buffer.slice(end + 1);
          if (line === "") {
            if (data.length) this.dispatch(type, { data: data.join("\n"), lastEventId: this.lastEventId });
            type = "message";
            data = [];
          } else if (!line.startsWith(":")) {
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (field === "event") type = value;
            else if (field === "data") data.push(value);
            else if (field === "id") this.lastEventId = value;
          }
        }
      }
    } catch {
      // Failed or aborted: told below, unless closed by the client.
    }
    this.dispatch("error", {});
  }
}
