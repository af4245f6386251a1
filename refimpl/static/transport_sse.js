// One chat turn over SSE: POST /v1/chat/completions with "stream": true, read
// the body with fetch's reader, parse it with our SSEParser (sse.js).
//
// Why fetch and not EventSource: EventSource can only send a GET with no
// body, and a chat request is a POST with a JSON body (lesson 04).
//
// The shape is the same as transport_ws.js, so the two read side by side:
//   streamOverSSE(request, on, signal, { resumable }) -> Promise<outcome>
// `on.token(text)` for each piece of content, `on.ping()` for each heartbeat
// the page can see, `on.resumed(lastEventId)` when a cut stream goes on;
// `signal` is the Stop button (an AbortSignal).  It never throws: every way
// the turn can end is an outcome, one of
//   { ended: "done", id, usage, finishReason }
//   { ended: "error", id, error: { code, message, type, status? } }
//   { ended: "stopped", id }                   (you pressed Stop)
// `id` is the generation id (X-Request-Id), for GET /v1/debug/generations/{id}.
//
// Resumable (lesson 11): with `resumable` the request asks for
// "resumable": true, and the server numbers every event (`id: 1`, `id: 2`,
// ...) and keeps them.  When the body breaks before [DONE] or an error event,
// the turn is not over: the page asks GET /v1/chat/completions/{id}/events
// for what came after the last event it has (a Last-Event-ID header, as
// EventSource would send) and reads on, into the same text.
import { keyHeaders } from "./api_key.js";
import { SSEParser } from "./sse.js";

// Resumes of one turn before the page gives up, and the wait between two
// failed tries when the server sent no `retry:` (EventSource's default is a
// few seconds; the server's resume stream asks for 1 s).
const MAX_RESUMES = 5;
const DEFAULT_RETRY_MS = 1000;

export async function streamOverSSE(request, on, signal, { resumable = false } = {}) {
  let id = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...keyHeaders() },
      body: JSON.stringify({
        ...request,
        stream: true,
        stream_options: { include_usage: true },
        ...(resumable && { resumable: true }),
      }),
      signal,
    });
    id = response.headers.get("X-Request-Id");
    if (!response.ok) return refused(response, id);
    const turn = { id, usage: null, finishReason: null, lastEventId: "", retryMs: DEFAULT_RETRY_MS };
    const outcome = await readStream(response, turn, on);
    if (outcome.ended !== "cut") return outcome;
    if (!resumable) return incomplete(outcome);
    return await resume(turn, outcome, on, signal);
  } catch (err) {
    if (err.name !== "AbortError") {
      return { ended: "error", id, error: { code: "network_error", message: err.message } };
    }
    // Stop aborts the fetch: the connection closes, the server notices and
    // cancels the generation: cancelled(client_disconnect) in its trace.
    // Not a resumable one: hanging up is what a cut looks like, and the
    // server keeps generating for --resume-grace seconds, waiting for us to
    // come back.  So say it: POST .../cancel, cancelled(client_cancel).
    if (resumable && id) await fetch(`/v1/chat/completions/${id}/cancel`, { method: "POST", headers: keyHeaders() }).catch(() => {});
    return { ended: "stopped", id };
  }
}

// Before the stream starts, errors come as an HTTP status and a JSON body in
// the OpenAI error shape (lesson 07).
async function refused(response, id) {
  const body = await response.json().catch(() => ({}));
  return { ended: "error", id, error: { ...body.error, status: response.status } };
}

// Read one response body.  Its outcome, or { ended: "cut" } when it broke or
// ended with neither [DONE] nor an error event.  `turn` carries what the
// turn has seen across the bodies of a resumed stream.
async function readStream(response, turn, on) {
  // The server's only comment is its heartbeat, `: ping`, sent after
  // --heartbeat seconds of silence (lesson 08).  A parser that drops comments
  // (as the spec says) hides it; ours can report them.
  const parser = new SSEParser({ onComment: () => on.ping() });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const { id } = turn;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      for (const event of parser.feed(value)) {
        // Set only by a whole event: an `id:` in an event the cut broke in
        // half is never seen, so that event is asked for again (§9.2.6).
        turn.lastEventId = event.lastEventId;
        // [DONE] is the only proof that the stream is complete.
        if (event.data === "[DONE]") return { ended: "done", id, usage: turn.usage, finishReason: turn.finishReason };
        const chunk = JSON.parse(event.data);
        // A failure after the 200: `event: error` carrying the error object,
        // and no [DONE] after it (lesson 07).
        if (event.type === "error") return { ended: "error", id, error: chunk.error };
        const choice = chunk.choices[0];
        if (choice?.delta?.content) on.token(choice.delta.content);
        if (choice?.finish_reason) turn.finishReason = choice.finish_reason;
        if (chunk.usage) turn.usage = chunk.usage;
      }
    }
  } catch (err) {
    if (err.name === "AbortError") throw err; // Stop, not a cut
    return { ended: "cut", id, why: `the connection broke (${err.message})` };
  } finally {
    turn.retryMs = parser.retry ?? turn.retryMs;
  }
  return { ended: "cut", id, why: "the body ended without [DONE]" };
}

// A cut that cannot be resumed: the text is incomplete, and the page must
// say so rather than show it as an answer (a proxy's idle timeout, a crash).
function incomplete(cut) {
  const message = `The stream was cut: ${cut.why}; the answer is incomplete.`;
  return { ended: "error", id: cut.id, error: { code: "incomplete_stream", message } };
}

// Reconnect after a cut, with the id of the last whole event, and read on
// until the stream really ends.  The first try goes at once; after a try that
// fails, wait `retry:` ms, as EventSource does.
async function resume(turn, cut, on, signal) {
  for (let attempt = 1; attempt <= MAX_RESUMES; attempt++) {
    let response;
    try {
      response = await fetch(`/v1/chat/completions/${turn.id}/events`, {
        headers: { ...keyHeaders(), ...(turn.lastEventId && { "Last-Event-ID": turn.lastEventId }) },
        signal,
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      cut = { ended: "cut", id: turn.id, why: `the resume failed (${err.message})` };
      await new Promise((resolve) => setTimeout(resolve, turn.retryMs));
      continue;
    }
    // 404: the server forgot the stream (--resume-window) or never knew it.
    // (A 204 says we have its last event: not so, we never saw it end.)
    if (response.status !== 200) return refused(response, turn.id);
    on.resumed?.(turn.lastEventId || "0");
    const outcome = await readStream(response, turn, on);
    if (outcome.ended !== "cut") return outcome;
    cut = outcome;
  }
  return incomplete(cut);
}
