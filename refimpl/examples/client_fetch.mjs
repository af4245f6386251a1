// Our browser fetch() reader: the fixed version of seed_fetch.mjs (lesson 04).
//
// A browser cannot POST with EventSource, so a chat page reads the streamed
// response with fetch() and parses it itself.  This is that reader without
// a page around it, the way an application calls a client: text through
// onToken, an exception when the stream failed.  (The demo page's own
// transport, in refimpl/static/, reads the same way with the same parser and
// returns outcomes for the page to draw.)  It runs anywhere fetch and
// TextDecoderStream exist, browsers and Node 18+ alike, and needs no package.  (It reads with getReader(), not
// `for await` over the body: not every browser can iterate a stream.)
//
// Beside the seed's reader it fixes, one line each:
// - parsing: SSEParser (refimpl/static/sse.js, lesson 01), so CRLF and CR
//   line endings, "data:" without the space, multi-line data and an event
//   split across reads all come out right;
// - errors: a response that is not 200 throws with the server's error
//   object (or a stand-in, for a proxy's page), and so does an `event: error` (or any chunk with an "error"),
//   so a failed stream never looks finished (lesson 07);
// - the end: a body that ends without [DONE] throws too ("incomplete"):
//   the stream was cut short;
// - stopping: pass an AbortSignal; aborting it closes the connection, and
//   the server stops the model (lesson 09).
// tests/js/clients_fetch.test.mjs runs it beside the seed's reader on each of
// these inputs, and against a real refimpl server.
import { SSEParser } from "../static/sse.js";

export class StreamError extends Error {
  constructor(error) {
    super(error?.message ?? "stream failed");
    this.name = "StreamError";
    this.error = error; // the server's OpenAI error object
  }
}

// The OpenAI error object of a failed response, or a stand-in when the body
// is not one (a proxy's HTML 502 page, say), as refimpl/client.py does.
async function errorOf(response) {
  const text = await response.text();
  try {
    const { error } = JSON.parse(text);
    if (error && typeof error === "object") return error;
  } catch {
    // not JSON: fall through
  }
  return { message: `HTTP ${response.status}: ${text.slice(0, 200)}`, code: `http_${response.status}` };
}

// region: fetch-reader
export async function fetchReader(url, body, onToken, { signal, fetchImpl = fetch } = {}) {
  const response = await fetchImpl(`${url}/v1/chat/completions`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, stream: true }),
    signal, // abort() closes the connection: the server stops the model
  });
  if (!response.ok) throw new StreamError(await errorOf(response)); // lesson 02's statuses
  const id = response.headers.get("x-request-id");
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SSEParser(); // lesson 01: every line ending, every split
  let usage = null;
  for (;;) {
    const { done, value } = await reader.read(); // rejects with an AbortError on abort()
    if (done) break;
    for (const event of parser.feed(value)) {
      if (event.data === "[DONE]") return { id, usage };
      const chunk = JSON.parse(event.data);
      if (event.type === "error" || chunk.error) throw new StreamError(chunk.error);
      if (chunk.usage) usage = chunk.usage; // the last chunk, when include_usage was asked
      const content = chunk.choices[0]?.delta?.content;
      if (content) onToken(content);
    }
  }
  // No [DONE]: cut short, even if the body ended cleanly.
  throw new StreamError({ message: "the stream ended without [DONE]", code: "incomplete" });
}
// endregion: fetch-reader
