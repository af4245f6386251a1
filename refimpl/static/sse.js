// region: js-sse-parser
// A small WHATWG-style SSE parser for fetch() bodies (HTML §9.2.5-9.2.6),
// the browser twin of refimpl/sse/parser.py: feed it text as it arrives,
// in any chunking, and it returns the events that completed.  Unlike a naive
// split("\n") reader it handles CRLF and lone CR line endings, a CR at the end
// of one read and its LF at the start of the next, comments, multi-line data,
// id and event fields.  TextDecoder({stream: true}) upstream keeps multi-byte
// characters split across reads intact.
export class SSEParser {
  constructor() {
    this.buffer = "";
    this.data = [];
    this.type = "";
    this.lastEventId = "";
    this.pendingCR = false;
    this.first = true;
  }

  feed(text) {
    if (this.first && text.length) {
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
      this.first = false;
    }
    if (this.pendingCR && text.startsWith("\n")) text = text.slice(1);
    this.pendingCR = false;
    const events = [];
    const lines = (this.buffer + text).split(/\r\n|\r|\n/);
    this.buffer = lines.pop();
    // A CR that ended this chunk may be the first half of a CRLF.
    if (this.buffer === "" && (this.buffer + text).endsWith("\r")) this.pendingCR = true;
    for (const line of lines) {
      if (line === "") {
        if (this.data.length) {
          events.push({ type: this.type || "message", data: this.data.join("\n"), lastEventId: this.lastEventId });
        }
        this.data = [];
        this.type = "";
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon === -1 ? line : line.slice(0, colon);
      let value = colon === -1 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") this.data.push(value);
      else if (field === "event") this.type = value;
      else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    }
    return events;
  }
}
// endregion: js-sse-parser
