// The server's trace of one generation, drawn as an SVG timeline.
//
// GET /v1/debug/generations/{id} returns the trace (refimpl/trace.py):
//   { id, protocol, finished, completion_tokens, finish_reason,
//     events: [{ name, at, tokens, detail }, ...] }
// `at` is the server's monotonic clock in seconds; only differences mean
// anything, so the axis starts at the first event (accepted).  `tokens` is
// how many tokens the model had produced at that moment.
//
// Three lanes, one per kind of event:
//   generation    accepted, queued, admitted, first_token, and the one event
//                 that ends it: done(finish_reason), error(code) or
//                 cancelled(reason).  Dashed until the first token (TTFT),
//                 solid while tokens flow.
//   backpressure  paused ... resumed: the client read slower than the model
//                 wrote, so the model waited (lesson 10).
//   heartbeats    an SSE `: ping` or a WebSocket ping frame (lesson 08).
// Every event is a <g data-event="name"> with a <title> (the tooltip), so
// tests and curious readers can find them in the DOM.  Plain SVG built with
// DOM calls: no library, no build step.

const NS = "http://www.w3.org/2000/svg";
const WIDTH = 800;
const LEFT = 110; // room for the lane names
const RIGHT = 30;
const LANE_Y = { generation: 74, backpressure: 114, heartbeat: 144 };
const AXIS_Y = 170;
const HEIGHT = 200;
const LABEL_ROWS = 3; // generation labels stack in up to three rows above their lane
const CHAR_WIDTH = 6.2; // rough width of one 11px character, to keep labels apart
// A resumable stream's readers coming and going (lesson 11): marks with a
// tooltip but no label, or a reconnecting page would bury the lane in text.
const UNLABELLED = new Set(["attached", "detached"]);

function el(name, attrs = {}, text = null) {
  const node = document.createElementNS(NS, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

function laneOf(name) {
  if (name === "heartbeat") return "heartbeat";
  if (name === "paused" || name === "resumed") return "backpressure";
  return "generation";
}

export function describe(event) {
  return event.detail ? `${event.name}(${event.detail})` : event.name;
}

// 1, 2 or 5 times a power of ten: an axis step a reader can add up.
function niceStep(rough) {
  const power = 10 ** Math.floor(Math.log10(rough));
  return [1, 2, 5, 10].map((m) => m * power).find((step) => step >= rough);
}

function formatMs(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(ms % 1000 === 0 ? 0 : 1)} s` : `${ms.toFixed(0)} ms`;
}

export function drawTimeline(svg, trace) {
  const events = trace.events;
  const t0 = events[0].at;
  const msOf = (event) => (event.at - t0) * 1000;
  const spanMs = Math.max(msOf(events.at(-1)), 1);
  const x = (ms) => LEFT + (ms / spanMs) * (WIDTH - LEFT - RIGHT);

  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
  const summary = events.map((e) => `${describe(e)} at ${formatMs(msOf(e))}`).join(", ");
  svg.append(el("title", {}, `Trace of ${trace.id} (${trace.protocol}): ${summary}`));

  // The time axis, with a tick every 1, 2 or 5 x 10^k ms.
  const step = niceStep(spanMs / 6);
  svg.append(el("line", { class: "axis", x1: x(0), x2: x(spanMs), y1: AXIS_Y, y2: AXIS_Y }));
  for (let ms = 0; ms <= spanMs + step / 1000; ms += step) {
    svg.append(el("line", { class: "tick", x1: x(ms), x2: x(ms), y1: 22, y2: AXIS_Y + 4 }));
    svg.append(el("text", { class: "tick-label", x: x(ms), y: AXIS_Y + 18 }, formatMs(ms)));
  }

  // The lanes and their names.
  const beats = events.filter((e) => e.name === "heartbeat").length;
  const laneNames = { generation: "generation", backpressure: "backpressure", heartbeat: `heartbeats (${beats})` };
  for (const [lane, y] of Object.entries(LANE_Y)) {
    svg.append(el("text", { class: "lane-label", x: 8, y: y + 4 }, laneNames[lane]));
    svg.append(el("line", { class: "lane", x1: x(0), x2: x(spanMs), y1: y, y2: y }));
  }

  // The generation's life: waiting (dashed) until first_token, then streaming.
  const first = events.find((e) => e.name === "first_token");
  const end = msOf(events.at(-1));
  const y = LANE_Y.generation;
  svg.append(el("line", { class: "life waiting", x1: x(0), x2: x(first ? msOf(first) : end), y1: y, y2: y }));
  if (first) svg.append(el("line", { class: "life streaming", x1: x(msOf(first)), x2: x(end), y1: y, y2: y }));

  // Backpressure: a band from each paused to the next resumed (or the end),
  // named by why the model paused when the band is wide enough for it.
  let paused = null;
  for (const e of events) {
    if (e.name === "paused") paused ??= e;
    if (e.name === "resumed" || (paused !== null && e === events.at(-1))) {
      if (paused !== null) {
        const [x1, x2] = [x(msOf(paused)), x(msOf(e))];
        const band = { class: "paused-band", x: x1, width: Math.max(x2 - x1, 1) };
        svg.append(el("rect", { ...band, y: LANE_Y.backpressure - 6, height: 12 }));
        const why = paused.detail ?? "paused";
        if (why.length * CHAR_WIDTH < x2 - x1 - 16) {
          svg.append(el("text", { class: "band-label", x: (x1 + x2) / 2, y: LANE_Y.backpressure + 4 }, why));
        }
      }
      paused = null;
    }
  }

  // The events themselves.  Generation labels go in the first row where they
  // do not overlap the previous label of that row.
  const rowEnds = new Array(LABEL_ROWS).fill(-Infinity);
  for (const e of events) {
    const ms = msOf(e);
    const lane = laneOf(e.name);
    const g = el("g", {
      class: `event event-${e.name}`,
      "data-event": e.name,
      "data-detail": e.detail ?? "",
      "data-tokens": e.tokens,
      "data-at-ms": ms.toFixed(1),
    });
    const tokens = `${e.tokens} token${e.tokens === 1 ? "" : "s"}`;
    g.append(el("title", {}, `${describe(e)} at ${ms.toFixed(1)} ms, ${tokens}`));
    const cx = x(ms);
    if (lane === "heartbeat") {
      g.append(el("line", { class: "mark", x1: cx, x2: cx, y1: LANE_Y.heartbeat - 8, y2: LANE_Y.heartbeat + 8 }));
    } else {
      g.append(el("circle", { class: "mark", cx, cy: LANE_Y[lane], r: 5 }));
    }
    if (lane === "generation" && !UNLABELLED.has(e.name)) {
      const label = `${describe(e)} · ${tokens}`;
      const width = label.length * CHAR_WIDTH;
      const anchorEnd = cx + width > WIDTH - 4; // near the right edge: grow leftwards
      const left = anchorEnd ? cx - width : cx;
      let row = rowEnds.findIndex((rowEnd) => rowEnd < left - 8);
      if (row === -1) row = rowEnds.indexOf(Math.min(...rowEnds));
      rowEnds[row] = left + width;
      const ly = y - 14 - row * 15;
      g.append(el("line", { class: "leader", x1: cx, x2: cx, y1: ly + 3, y2: y - 5 }));
      g.append(el("text", { class: "label", x: cx, y: ly, "text-anchor": anchorEnd ? "end" : "start" }, label));
    }
    svg.append(g);
  }
}

// The same trace as text, one event a line, for readers who prefer it
// (and for screen readers: the SVG's <title> is only a summary).
export function traceAsText(trace) {
  const t0 = trace.events[0].at;
  return trace.events
    .map((e) => `${((e.at - t0) * 1000).toFixed(1).padStart(9)} ms  ${describe(e)}  tokens=${e.tokens}`)
    .join("\n");
}
