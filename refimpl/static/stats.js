// The live numbers under the Send button, measured where the user is: in
// the browser, with performance.now() (milliseconds, monotonic).  The
// glossary (lessons/) defines each one; in short:
//   TTFT      time to first token: from Send to the first piece of content.
//             It includes the network and the server's queue, not only the
//             model, which is why the server's trace (first_token) differs.
//   tokens    pieces of content received so far.  On the WebSocket one
//             message can carry several tokens (when the model is ahead of
//             the socket), so there it counts messages; usage is exact.
//   tokens/s  decode speed: tokens after the first, divided by the time from
//             the first token to the latest.  TTFT is left out on purpose:
//             it is a different cost and has its own number.
//   last ITL  inter-token latency of the latest token: the gap between the
//             last two arrivals.  Gaps of ~0 ms mean tokens arrived together
//             (one network read carried several).
//   pings     heartbeats the page could see (SSE `: ping` comments).

export class StreamStats {
  constructor(startedAt) {
    this.startedAt = startedAt; // when Send was pressed
    this.firstAt = null; // when the first token arrived
    this.lastAt = null; // when the latest token arrived
    this.lastGap = null; // ms between the last two tokens
    this.tokens = 0;
    this.pings = 0;
    this.lastPingAt = null;
  }

  token(now) {
    if (this.lastAt !== null) this.lastGap = now - this.lastAt;
    this.firstAt ??= now;
    this.lastAt = now;
    this.tokens += 1;
  }

  ping(now) {
    this.pings += 1;
    this.lastPingAt = now;
  }

  // Each number as text for the page: "—" until it can be known.
  view() {
    const ms = (x) => (x === null ? "—" : `${x.toFixed(0)} ms`);
    const decodeMs = this.lastAt - this.firstAt;
    const rate = this.tokens >= 2 && decodeMs > 0 ? `${((this.tokens - 1) / (decodeMs / 1000)).toFixed(1)}` : "—";
    return {
      ttft: ms(this.firstAt === null ? null : this.firstAt - this.startedAt),
      tokens: String(this.tokens),
      rate,
      itl: ms(this.lastGap),
      pings: this.pings === 0 ? "none yet" : `${this.pings} (last at ${ms(this.lastPingAt - this.startedAt)})`,
    };
  }
}
