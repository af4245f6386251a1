// The server side of the midstream_*.test.mjs files: its URL, the failing
// request, and what the server really sent before it failed, so every
// client's partial text is compared with the server's tokens, not with a
// guess.  tests/test_midstream_clients.py starts the server and sets
// REFIMPL_URL; to run by hand: `refimpl serve` and
// `REFIMPL_URL=http://127.0.0.1:8000 node --test tests/js/midstream_*.test.mjs`.
import assert from "node:assert/strict";
import { SSEParser } from "../../refimpl/static/sse.js";

export const URL = process.env.REFIMPL_URL;
if (!URL) throw new Error("set REFIMPL_URL to a running refimpl server");

export const MODEL = "refimpl-sim";
export const PROMPT = "Why should tokens stream?";
// Three tokens, then the model fails; `seed` fixes which tokens.
export const FAIL = { fail_after_tokens: 3, fail_with: "overloaded", seed: 7 };

export function chatBody(simulate) {
  return { model: MODEL, messages: [{ role: "user", content: PROMPT }], stream: true, simulate };
}

// POST a streamed request and parse the body with our browser parser
// (refimpl/static/sse.js): the request id and every event, in order.
export async function readEvents(simulate) {
  const response = await fetch(`${URL}/v1/chat/completions`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(chatBody(simulate)),
  });
  assert.equal(response.status, 200);
  const parser = new SSEParser();
  const events = [];
  for await (const text of response.body.pipeThrough(new TextDecoderStream())) {
    events.push(...parser.feed(text));
  }
  return { id: response.headers.get("x-request-id"), events };
}

const contentOf = (event) => JSON.parse(event.data).choices[0]?.delta?.content ?? "";

// The text the server sent before it failed: the first N tokens of the same
// prompt and seed without the failure, N from the failed generation's trace.
export async function sentBeforeFailure(simulate = FAIL) {
  const { fail_after_tokens, fail_with, ...rest } = simulate;
  const whole = (await readEvents(rest)).events.filter((e) => e.data !== "[DONE]").map(contentOf);
  const failed = await readEvents(simulate);
  const trace = await (await fetch(`${URL}/v1/debug/generations/${failed.id}`)).json();
  assert.equal(trace.finish_reason, "error");
  const tokens = whole.filter(Boolean);
  const n = trace.completion_tokens;
  assert.ok(n > 0 && n < tokens.length, `the failure came mid-stream (${n} of ${tokens.length})`);
  return tokens.slice(0, n).join("");
}

export const ERROR = {
  message: "The model failed while generating (overloaded).",
  type: "server_error",
  param: null,
  code: "overloaded",
};
