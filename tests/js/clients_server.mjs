// What the clients_*.test.mjs files ask of the refimpl server under test
// (tests/test_clients.py starts it and sets REFIMPL_URL): a generation's
// trace, and a way to wait for it.  The server runs in another process, so
// "wait" means asking again until the trace says so (10 s at most).
export { URL } from "./midstream_server.mjs";
import { URL } from "./midstream_server.mjs";

// A million tokens, one every 5 ms: about 80 minutes.  Only a cancel ends it soon.
export const LONG = { ttft_ms: 0, itl_ms: 5, tokens: 1_000_000 };

export const trace = async (id) => (await fetch(`${URL}/v1/debug/generations/${id}`)).json();

export async function traceWhen(id, ok) {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const t = await trace(id);
    if (ok(t)) return t;
    if (Date.now() > deadline) throw new Error(`trace ${id} never got there: ${JSON.stringify(t.events.at(-1))}`);
  }
}

// The trace's last event, once the generation has ended: [name, detail].
export async function ending(id) {
  const last = (await traceWhen(id, (t) => t.finished)).events.at(-1);
  return [last.name, last.detail];
}
