// Feeds each case to the browser SSEParser three ways (whole, one UTF-16
// unit at a time, and split at every point) and prints what it dispatched.
// Input: JSON [{name, text}] on stdin; output: JSON {name: [[events], ...]}.
// The comments the parser reports (onComment, how the demo page sees
// `: ping`) must not depend on the chunking either: this script exits
// non-zero when two ways of feeding a case report different comments.
import { SSEParser } from "../../refimpl/static/sse.js";

function run(chunks) {
  const comments = [];
  const p = new SSEParser({ onComment: (text) => comments.push(text) });
  const events = chunks.flatMap((c) => p.feed(c));
  return { events: events.map((e) => [e.type, e.data, e.lastEventId]), lastEventId: p.lastEventId, comments };
}

let input = "";
for await (const chunk of process.stdin) input += chunk;
const out = {};
for (const { name, text } of JSON.parse(input)) {
  const ways = [run([text]), run([...text].flatMap((ch) => ch.split("")))];
  for (let i = 1; i < text.length; i++) ways.push(run([text.slice(0, i), "", text.slice(i)]));
  const whole = JSON.stringify(ways[0].comments);
  const differs = ways.findIndex((way) => JSON.stringify(way.comments) !== whole);
  if (differs !== -1) {
    console.error(`${name}: way ${differs} reported comments ${JSON.stringify(ways[differs].comments)}, whole: ${whole}`);
    process.exit(1);
  }
  out[name] = ways.map(({ events, lastEventId }) => ({ events, lastEventId }));
}
process.stdout.write(JSON.stringify(out));
