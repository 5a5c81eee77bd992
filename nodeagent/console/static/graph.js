// The service graph as SVG, laid out in columns: callers on the left, then services, then
// the workloads (versions) behind them. Written by hand: no library, no network access.
const NS = "http://www.w3.org/2000/svg";
const COLUMN = 300;
const ROW = 90;
const MARGIN = 70;

function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (parent) parent.appendChild(node);
  return node;
}

// Longest path from a node without callers; cycles are cut at the first revisit.
function layers(nodes, edges) {
  const inbound = new Map(nodes.map((n) => [n.id, []]));
  for (const e of edges) if (inbound.has(e.target)) inbound.get(e.target).push(e.source);
  const depth = new Map();
  const visit = (id, stack) => {
    if (depth.has(id)) return depth.get(id);
    if (stack.has(id)) return 0;
    stack.add(id);
    let d = 0;
    for (const src of inbound.get(id) || []) d = Math.max(d, visit(src, stack) + 1);
    stack.delete(id);
    depth.set(id, d);
    return d;
  };
  for (const n of nodes) {
    // Services without traffic still sit left of their workloads.
    visit(n.id, new Set());
    if (n.kind === "service" && depth.get(n.id) === 0) depth.set(n.id, 1);
  }
  for (const n of nodes) {
    if (n.kind === "workload" && depth.get(n.id) === 0) {
      const behind = nodes.some((s) => s.kind === "service" && (s.workloads || []).includes(n.id));
      if (behind) depth.set(n.id, 2);
    }
  }
  return depth;
}

export function layout(doc) {
  const depth = layers(doc.nodes, doc.edges);
  const columns = new Map();
  for (const n of doc.nodes) {
    const d = depth.get(n.id) || 0;
    if (!columns.has(d)) columns.set(d, []);
    columns.get(d).push(n);
  }
  const pos = new Map();
  let rows = 1;
  for (const [d, list] of columns) {
    list.sort((a, b) => (a.app || a.id).localeCompare(b.app || b.id) || a.id.localeCompare(b.id));
    list.forEach((n, i) => pos.set(n.id, { x: MARGIN + d * COLUMN, y: MARGIN + i * ROW }));
    rows = Math.max(rows, list.length);
  }
  const width = MARGIN * 2 + Math.max(0, ...columns.keys()) * COLUMN + 120;
  return { pos, width, height: MARGIN * 2 + (rows - 1) * ROW + 20 };
}

export function rate(edge) {
  if (edge.protocol === "tcp") return `${edge.connection_rate.toFixed(2)} conn/s`;
  return `${edge.request_rate.toFixed(2)} rps`;
}

function edgeLabel(e) {
  const parts = [rate(e)];
  if (e.protocol !== "tcp") {
    parts.push(`${(e.error_ratio * 100).toFixed(1)}% 5xx`);
    if (e.p99_ms !== null) parts.push(`p99 ${e.p99_ms.toFixed(0)} ms`);
  }
  if (e.protocol === "grpc") parts.unshift("gRPC");
  return parts.join(" · ");
}

// A padlock, drawn (no emoji font needed): shackle and body, centred on (x, y).
export function lock(parent, x, y) {
  const g = el("g", { class: "lock", transform: `translate(${x},${y})` }, parent);
  el("path", { d: "M -3 -1 V -4 A 3 3 0 0 1 3 -4 V -1", fill: "none", stroke: "#333", "stroke-width": 1.4 }, g);
  el("rect", { x: -4.5, y: -1, width: 9, height: 7, rx: 1, fill: "#333" }, g);
  return g;
}

function shape(g, node) {
  const r = 16;
  if (node.kind === "service") {
    el("polygon", { class: "shape", points: `0,${-r} ${r},${r * 0.8} ${-r},${r * 0.8}` }, g);
  } else if (node.kind === "gateway") {
    el("rect", { class: "shape", x: -r, y: -r, width: 2 * r, height: 2 * r, rx: 3 }, g);
  } else if (node.kind === "outside") {
    el("rect", { class: "shape", x: -r * 1.4, y: -r * 0.8, width: 2.8 * r, height: 1.6 * r, rx: 10 }, g);
  } else {
    el("circle", { class: "shape", r }, g);
  }
}

function nodeLabel(node) {
  if (node.kind === "service") return [node.name, (node.versions || []).join(", ")];
  if (node.kind === "workload") {
    return [node.app && node.app !== "unknown" ? node.app : node.name,
      node.version && node.version !== "unknown" ? node.version : ""];
  }
  if (node.kind === "gateway") return ["ingress gateway", ""];
  return [node.name || node.id, ""];
}

export function renderGraph(svg, doc, selected, onSelect) {
  const { pos, width, height } = layout(doc);
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${Math.max(width, 600)} ${Math.max(height, 300)}`);
  const defs = el("defs", {}, svg);
  for (const h of ["healthy", "degraded", "failing", "idle", "tcp"]) {
    const m = el("marker", { id: `arrow-${h}`, viewBox: "0 0 10 10", refX: 10, refY: 5,
      markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, defs);
    el("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: `var(--${h})` }, m);
  }
  const edges = el("g", { class: "edges" }, svg);
  for (const e of doc.edges) {
    const a = pos.get(e.source);
    const b = pos.get(e.target);
    if (!a || !b) continue;
    const g = el("g", {
      class: `edge ${e.health} ${e.protocol}${selected === `edge:${e.id}` ? " selected" : ""}`,
      "data-id": e.id, "data-source": e.source, "data-target": e.target,
      "data-protocol": e.protocol, "data-rate": e.protocol === "tcp" ? e.connection_rate : e.request_rate,
      "data-mtls": e.mtls,
    }, edges);
    const dx = (b.x - a.x) / 2;
    const d = `M ${a.x + 20} ${a.y} C ${a.x + dx} ${a.y}, ${b.x - dx} ${b.y}, ${b.x - 22} ${b.y}`;
    el("path", { class: "hit", d }, g);
    const marker = e.protocol === "tcp" ? "tcp" : e.health;
    el("path", { class: "line", d, "marker-end": `url(#arrow-${marker})` }, g);
    // The label sits on the curve past its middle, so labels of a fan of edges from one
    // source spread apart and stay next to their own line.
    const t = 0.62;
    const bez = (p0, p1, p2, p3) =>
      (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2 + t ** 3 * p3;
    const mx = bez(a.x + 20, a.x + dx, b.x - dx, b.x - 22);
    const my = bez(a.y, a.y, b.y, b.y) - 7;
    const label = el("text", { x: mx + (e.mtls ? 6 : 0), y: my, "text-anchor": "middle" }, g);
    label.textContent = edgeLabel(e);
    if (e.mtls) lock(g, mx - label.getComputedTextLength() / 2 - 6, my - 4);
    g.addEventListener("click", (ev) => { ev.stopPropagation(); onSelect(`edge:${e.id}`); });
  }
  const nodes = el("g", { class: "nodes" }, svg);
  for (const n of doc.nodes) {
    const p = pos.get(n.id);
    const g = el("g", {
      class: `node ${n.kind} ${n.health}${selected === `node:${n.id}` ? " selected" : ""}`,
      transform: `translate(${p.x},${p.y})`, "data-id": n.id, "data-kind": n.kind,
      "data-health": n.health, "data-version": n.version || "",
    }, nodes);
    shape(g, n);
    const [first, second] = nodeLabel(n);
    const t1 = el("text", { y: 32, "text-anchor": "middle" }, g);
    t1.textContent = first;
    if (second) {
      const t2 = el("text", { y: 45, "text-anchor": "middle", class: "version" }, g);
      t2.textContent = second;
    }
    const title = el("title", {}, g);
    title.textContent = `${n.id} (${n.health})`;
    g.addEventListener("click", (ev) => { ev.stopPropagation(); onSelect(`node:${n.id}`); });
  }
}
