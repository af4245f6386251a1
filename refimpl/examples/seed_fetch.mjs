// The fetch() reader of the article this project grew from ("Client-Side SSE
// Consumption"), rewritten to be callable from a test and otherwise left as
// it was, flaws included.  BROKEN on purpose: lesson 07 (and lesson 04) show
// it beside the reader of refimpl/static/sse.js.
//
// What it does: read the body, split the text at "\n" keeping the unfinished
// last line, take the lines that start with "data: " (with the space), stop
// at "data: [DONE]", parse everything else as a chunk and hand
// chunk.choices[0]?.delta?.content to onToken.  Every other line is dropped.
//
// What that costs, measured in tests/js/midstream_seed_fetch.test.mjs:
// - our mid-stream failure: the "event: error" line is dropped, its data line
//   is parsed as a chunk, and `chunk.choices[0]` throws a TypeError about
//   reading "0" of undefined.  The caller does get an exception, by
//   accident; the server's message and code are lost.
// - a stream cut short (no [DONE], no error): the loop ends and the function
//   returns as if the answer were complete.
// - CRLF line endings: "[DONE]\r" is not "[DONE]", so JSON.parse throws.
// - "data:x" (no space, valid per WHATWG HTML §9.2.6): silently dropped.
// - multi-line data (one event, two data: lines): JSON.parse of half a chunk.
// An event split across reads is fine: the kept last line and TextDecoder's
// {stream: true} handle it.  `fetchImpl` lets a test feed it any bytes.

// region: seed-fetch-reader
export async function seedFetchReader(url, body, onToken, fetchImpl = fetch) {
  const response = await fetchImpl(`${url}/v1/chat/completions`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, stream: true }),
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let rest = ""; // the last line, until its "\n" arrives
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return; // the body ended without [DONE]: "finished", says the caller
    rest += decoder.decode(value, { stream: true });
    const lines = rest.split("\n");
    rest = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data: ")) continue; // "event: error" goes here
      const data = line.slice("data: ".length);
      if (data === "[DONE]") return;
      const content = JSON.parse(data).choices[0]?.delta?.content;
      if (content) onToken(content);
    }
  }
}
// endregion: seed-fetch-reader
