// The Vercel AI SDK's *default* OpenAI provider (`ai` + @ai-sdk/openai):
// `openai("model")` speaks the Responses API, POST /v1/responses, not Chat
// Completions.  Before refimpl had that route, the first call a new user
// tried failed with 404 "No route matches POST /v1/responses".  Here it
// streams, the text is the one /v1/chat/completions gives for the same
// prompt, and the token limit and a mid-stream failure come out as the SDK
// documents them.  tests/test_responses.py starts the server and sets
// REFIMPL_URL; by hand: `refimpl serve` and
// `REFIMPL_URL=http://127.0.0.1:8000 node --test tests/js/responses_ai_sdk.test.mjs`.
import assert from "node:assert/strict";
import { test } from "node:test";
import { createOpenAI } from "@ai-sdk/openai";
import { streamText } from "ai";

const URL = process.env.REFIMPL_URL;
if (!URL) throw new Error("set REFIMPL_URL to a running refimpl server");
const MODEL = "refimpl-sim";
const PROMPT = "Why should tokens stream?";

// The provider has no place for our `simulate` extension, so a custom fetch
// adds it to the JSON body it sends; it also notes which URLs were called.
function provider(simulate, urls = []) {
  const send = (url, init) => {
    urls.push(String(url));
    const body = simulate ? JSON.stringify({ ...JSON.parse(init.body), simulate }) : init.body;
    return fetch(url, { ...init, body });
  };
  return createOpenAI({ baseURL: `${URL}/v1`, apiKey: "unused", fetch: send });
}

// The same prompt through Chat Completions, not streamed.
async function chatCompletion(simulate) {
  const response = await fetch(`${URL}/v1/chat/completions`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model: MODEL, messages: [{ role: "user", content: PROMPT }], simulate }),
  });
  assert.equal(response.status, 200);
  return response.json();
}

test("streamText(openai(model)): the Responses API, the Chat Completions text", async () => {
  const urls = [];
  const openai = provider(undefined, urls);
  const result = streamText({ model: openai(MODEL), prompt: PROMPT, onError: ({ error }) => assert.fail(error) });
  let text = "";
  for await (const delta of result.textStream) text += delta;
  const chat = await chatCompletion();
  assert.equal(text, chat.choices[0].message.content);
  assert.equal(await result.finishReason, "stop");
  const usage = await result.usage;
  assert.equal(usage.inputTokens, chat.usage.prompt_tokens);
  assert.equal(usage.outputTokens, chat.usage.completion_tokens);
  const response = await result.response;
  assert.match(response.id, /^chatcmpl-/); // the generation's id: the trace's key
  const trace = await (await fetch(`${URL}/v1/debug/generations/${response.id}`)).json();
  assert.equal(trace.finish_reason, "stop");
  assert.deepEqual(urls, [`${URL}/v1/responses`]); // the default model: the Responses API
});

test("maxOutputTokens: the answer stops at the limit, finishReason 'length'", async () => {
  const result = streamText({ model: provider()(MODEL), prompt: PROMPT, maxOutputTokens: 16 });
  const text = await result.text;
  assert.equal(await result.finishReason, "length");
  assert.equal((await result.usage).outputTokens, 16);
  assert.ok(text.length > 0);
});

test("a mid-stream failure: the text so far, one error part, finishReason 'error'", async () => {
  const simulate = { fail_after_tokens: 3, fail_with: "overloaded", seed: 7 };
  const { fail_after_tokens, fail_with, ...whole } = simulate;
  const full = await chatCompletion(whole);
  const errors = [];
  const result = streamText({
    model: provider(simulate)(MODEL),
    prompt: PROMPT,
    onError: ({ error }) => errors.push(error),
  });
  const parts = [];
  for await (const part of result.fullStream) parts.push(part);
  const text = parts.filter((p) => p.type === "text-delta").map((p) => p.text).join("");
  // The start of the same prompt and seed's text: the three tokens made.
  assert.ok(full.choices[0].message.content.startsWith(text) && text.length > 0);
  assert.equal(parts.filter((p) => p.type === "error").length, 1); // `error`, then response.failed: one part
  assert.equal(errors.length, 1);
  assert.match(String(errors[0].message ?? errors[0]), /overloaded/);
  assert.equal(parts.at(-1).type, "finish");
  assert.equal(parts.at(-1).finishReason, "error");
  assert.equal((await result.usage).outputTokens, 3); // from response.failed
});
