// The Node clients of lesson 04, each written the way its documentation says
// to stream, all with one shape (the Python ones are in
// refimpl/examples/client_streams.py):
//
//   const { text, usage } = await withOpenAI(url, ask, onToken, { signal });
//
// `ask` is { prompt, simulate, includeUsage }; onToken(piece) sees each piece
// of content as the client hands it over; aborting `signal` is how a Node or
// browser program stops a stream.  `usage` is in OpenAI's field names, or
// null when the client reports none.  They live here, not in
// refimpl/examples, because their packages are installed here (package.json;
// `make test` runs `npm ci --prefix tests/js`).
//
// Measured by clients_node.test.mjs.  Run as a script, this file streams one
// answer through every Node client and prints when each piece arrived (the
// notebook of lesson 04 draws it):
//   node tests/js/clients_node.mjs http://127.0.0.1:8000 '{"prompt": "hi"}'
import { pathToFileURL } from "node:url";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { streamText } from "ai";
import OpenAI from "openai";
import { fetchReader } from "../../refimpl/examples/client_fetch.mjs";
import { seedFetchReader } from "../../refimpl/examples/seed_fetch.mjs";

export const MODEL = "refimpl-sim";

// The body the fetch readers send (the SDKs build their own).
export function chatBody({ prompt, simulate, includeUsage }) {
  return {
    model: MODEL,
    messages: [{ role: "user", content: prompt }],
    ...(includeUsage ? { stream_options: { include_usage: true } } : {}),
    ...(simulate ? { simulate } : {}),
  };
}

// region: openai-node
export async function withOpenAI(url, { prompt, simulate, includeUsage }, onToken, { signal } = {}) {
  const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: "unused" });
  const stream = await client.chat.completions.create(
    {
      model: MODEL,
      messages: [{ role: "user", content: prompt }],
      stream: true,
      ...(includeUsage ? { stream_options: { include_usage: true } } : {}),
      simulate, // unknown params ride along in the body
    },
    { signal },
  );
  let text = "";
  let usage = null;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage; // the last chunk, whose choices are []
    const piece = chunk.choices[0]?.delta?.content;
    if (piece) {
      text += piece;
      onToken(piece);
    }
  }
  return { text, usage };
}
// endregion: openai-node

// region: vercel-ai
export async function withVercelAI(url, { prompt, simulate, includeUsage }, onToken, { signal } = {}) {
  const refimpl = createOpenAICompatible({
    name: "refimpl",
    baseURL: `${url}/v1`,
    apiKey: "unused",
    includeUsage, // sends stream_options.include_usage; without it, no usage
  });
  const errors = [];
  const result = streamText({
    model: refimpl(MODEL),
    prompt,
    providerOptions: { refimpl: { simulate } }, // added to the request body
    abortSignal: signal, // the only way to stop it: `break` does not (lesson 04)
    onError: ({ error }) => errors.push(error), // else a failed stream just ends (lesson 07)
  });
  let text = "";
  for await (const piece of result.textStream) {
    text += piece;
    onToken(piece);
  }
  if (errors.length) throw errors[0];
  const usage = await result.usage; // its own names; undefined fields when not sent
  return {
    text,
    usage:
      usage.totalTokens === undefined
        ? null
        : { prompt_tokens: usage.inputTokens, completion_tokens: usage.outputTokens, total_tokens: usage.totalTokens },
  };
}
// endregion: vercel-ai

// Ours and the seed's fetch readers, in the same shape.
export async function withFetchReader(url, ask, onToken, { signal } = {}) {
  let text = "";
  const collect = (piece) => {
    text += piece;
    onToken(piece);
  };
  const { usage } = await fetchReader(url, chatBody(ask), collect, { signal });
  return { text, usage };
}

export async function withSeedReader(url, ask, onToken) {
  let text = "";
  await seedFetchReader(url, chatBody(ask), (piece) => {
    text += piece;
    onToken(piece);
  });
  return { text, usage: null }; // it only hands over content
}

export const CLIENTS = {
  "openai (Node)": withOpenAI,
  "Vercel AI SDK": withVercelAI,
  "fetch + sse.js (ours)": withFetchReader,
  "seed's fetch reader": withSeedReader,
};

// One answer through every client, twice (the first call in a process pays
// for its set-up): when each piece arrived, in seconds since the call.
async function timeline(url, ask) {
  const runs = {};
  for (const [name, client] of Object.entries(CLIENTS)) {
    for (const call of ["first", "second"]) {
      const arrivals = [];
      const start = performance.now();
      const { text, usage } = await client(url, ask, () => arrivals.push((performance.now() - start) / 1000));
      runs[name] ??= {};
      runs[name][call] = { arrivals, text, usage };
    }
  }
  return runs;
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  const [url, ask] = process.argv.slice(2);
  process.stdout.write(JSON.stringify(await timeline(url, JSON.parse(ask))));
}
