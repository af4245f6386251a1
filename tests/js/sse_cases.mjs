// Feeds each case to the browser SSEParser three ways (whole, one UTF-16
// unit at a time, and split at every point) and prints what it dispatched.
// Input: JSON [{name, text}] on stdin; output: JSON {name: [[events], ...]}.
import { SSEParser } from "../../refimpl/static/sse.js";

function run(chunks) {
  const p = new SSEParser();
  const events = chunks.flatMap((c) => p.feed(c));
  return { events: events.map((e) => [e.type, e.data, e.lastEventId]), lastEventId: p.lastEventId };
}

let input = "";
for await (const chunk of process.stdin) input += chunk;
const out = {};
for (const { name, text } of JSON.parse(input)) {
  const ways = [run([text]), run([...text].flatMap((ch) => ch.split("")))];
  for (let i = 1; i < text.length; i++) ways.push(run([text.slice(0, i), "", text.slice(i)]));
  out[name] = ways;
}
process.stdout.write(JSON.stringify(out));
