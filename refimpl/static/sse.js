// region: js-sse-parser
// A small WHATWG-style SSE parser for fetch() bodies (HTML §9.2.5-9.2.6),
// the browser twin of refimpl/sse/parser.py: feed it text as it arrives,
// in any chunking, and it returns the events that completed.  Unlike a naive
// split("\n") reader it handles CRLF and lone CR line endings, a CR at the end
// of one read and its LF at the start of the next, comments, multi-line data,
// id and event fields.  TextDecoder({stream: true}) upstream keeps multi-byte
// characters split across reads intact.  Comments dispatch nothing (§9.2.6),
// but a page may want to see the server's `: ping` heartbeats: pass
// `onComment` and it is called with each comment's text ("ping").
export class SSEParser {
  constructor({ onComment } = {}) {
    this.onComment = onComment; // optional: called with each comment's text
    this.buffer = ""; // the unfinished last line
    this.data = [];
    this.type = "";
    this.idBuffer = ""; // the id field's value, published at dispatch
    this.lastEventId = "";
    this.pendingCR = false; // the last chunk ended in CR: skip a leading LF
    this.first = true;
  }

  feed(text) {
    if (!text) return []; // an empty read changes nothing
    if (this.first) {
      this.first = false;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    if (this.pendingCR && text.startsWith("\n")) text = text.slice(1);
    if (!text) return [];
    // A CR at the end of a read already ends its line; if the next read
    // starts with LF, that LF is the second half of the same CRLF.
    this.pendingCR = text.endsWith("\r");
    const lines = (this.buffer + text).split(/\r\n|\r|\n/);
    this.buffer = lines.pop();
    const events = [];
    for (const line of lines) {
      if (line === "") {
        this.lastEventId = this.idBuffer; // set even when nothing is dispatched
        if (this.data.length) {
          events.push({ type: this.type || "message", data: this.data.join("\n"), lastEventId: this.lastEventId });
        }
        this.data = [];
        this.type = "";
        continue;
      }
      if (line.startsWith(":")) {
        // A comment: ignored by the spec, it is how servers send heartbeats.
        this.onComment?.(line.slice(1).replace(/^ /, ""));
        continue;
      }
      const colon = line.indexOf(":");
      const field = colon === -1 ? line : line.slice(0, colon);
      let value = colon === -1 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") this.data.push(value);
      else if (field === "event") this.type = value;
      else if (field === "id" && !value.includes("\0")) this.idBuffer = value;
      else if (field === "retry" && /^[0-9]+$/.test(value)) this.retry = Number(value);
    }
    return events;
  }
}
// endregion: js-sse-parser
