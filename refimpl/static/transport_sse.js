// One chat turn over SSE: POST /v1/chat/completions with "stream": true, read
// the body with fetch's reader, parse it with our SSEParser (sse.js).
//
// Why fetch and not EventSource: EventSource can only send a GET with no
// body, and a chat request is a POST with a JSON body (lesson 04).
//
// The shape is the same as transport_ws.js, so the two read side by side:
//   streamOverSSE(request, on, signal) -> Promise<outcome>
// `on.token(text)` for each piece of content, `on.ping()` for each heartbeat
// the page can see; `signal` is the Stop button (an AbortSignal).  It never
// throws: every way the turn can end is an outcome, one of
//   { ended: "done", id, usage, finishReason }
//   { ended: "error", id, error: { code, message, type, status? } }
//   { ended: "stopped", id }                   (you pressed Stop)
// `id` is the generation id (X-Request-Id), for GET /v1/debug/generations/{id}.
import { SSEParser } from "./sse.js";

export async function streamOverSSE(request, on, signal) {
  let id = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...request, stream: true, stream_options: { include_usage: true } }),
      signal,
    });
    id = response.headers.get("X-Request-Id");
    if (!response.ok) {
      // Before the stream starts, errors come as an HTTP status and a JSON
      // body in the OpenAI error shape (lesson 07).
      const body = await response.json().catch(() => ({}));
      return { ended: "error", id, error: { ...body.error, status: response.status } };
    }
    return await readStream(response, id, on);
  } catch (err) {
    // Stop aborts the fetch: the connection closes, the server notices and
    // cancels the generation: cancelled(client_disconnect) in its trace.
    if (err.name === "AbortError") return { ended: "stopped", id };
    return { ended: "error", id, error: { code: "network_error", message: err.message } };
  }
}

async function readStream(response, id, on) {
  // The server's only comment is its heartbeat, `: ping`, sent after
  // --heartbeat seconds of silence (lesson 08).  A parser that drops comments
  // (as the spec says) hides it; ours can report them.
  const parser = new SSEParser({ onComment: () => on.ping() });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let usage = null;
  let finishReason = null;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    for (const event of parser.feed(value)) {
      // [DONE] is the only proof that the stream is complete.
      if (event.data === "[DONE]") return { ended: "done", id, usage, finishReason };
      const chunk = JSON.parse(event.data);
      // A failure after the 200: `event: error` carrying the error object,
      // and no [DONE] after it (lesson 07).
      if (event.type === "error") return { ended: "error", id, error: chunk.error };
      const choice = chunk.choices[0];
      if (choice?.delta?.content) on.token(choice.delta.content);
      if (choice?.finish_reason) finishReason = choice.finish_reason;
      if (chunk.usage) usage = chunk.usage;
    }
  }
  // The body ended with neither [DONE] nor an error event: the connection
  // was cut (a proxy's idle timeout, a crash).  The text is incomplete, and
  // the page must say so rather than show it as an answer.
  const message = "The stream ended without [DONE]: the answer is incomplete.";
  return { ended: "error", id, error: { code: "incomplete_stream", message } };
}
