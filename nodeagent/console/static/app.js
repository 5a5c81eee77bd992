// The console page: polls the JSON API every refresh interval and redraws the graph, the
// details of the selected node or edge, config health, rollouts and agents. No framework.
import { rate, renderGraph } from "/graph.js";

const state = { window: 60, selected: null, refresh: 2, graph: null, timer: null };
const $ = (id) => document.getElementById(id);

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function table(head, rows) {
  return h("table", {}, h("tr", {}, head.map((x) => h("th", {}, x))),
    rows.map((r) => h("tr", {}, r.map((x) => h("td", {}, x)))));
}

async function getJson(path) {
  const response = await fetch(path, { credentials: "same-origin" });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(`${path}: ${response.status} ${body.error || ""}`);
  }
  return response.json();
}

const pct = (x) => `${(x * 100).toFixed(2)}%`;
const when = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "-");
const hours = (s) => (s > 0 ? `in ${(s / 3600).toFixed(1)} h` : `expired ${(-s / 3600).toFixed(1)} h ago`);

function select(id) {
  state.selected = state.selected === id ? null : id;
  draw();
  details();
}

function draw() {
  if (state.graph) renderGraph($("graph"), state.graph, state.selected, select);
}

function edgeRows(edges) {
  return table(["edge", "protocol", "rate", "5xx", "p99"], edges.map((e) => [
    `${e.source} → ${e.target}`, `${e.protocol}${e.mtls ? " (mTLS)" : ""}`, rate(e),
    e.protocol === "tcp" ? "-" : pct(e.error_ratio), e.p99_ms === null ? "-" : `${e.p99_ms} ms`,
  ]));
}

function routesBlock(routes) {
  return routes.map((r) => h("div", { class: "route" },
    h("p", {}, h("b", {}, `port ${r.port}`), ` from ${r.source}: `, r.error || r.summary || ""),
    r.route ? h("p", { class: "fix" }, `rule ${r.route.name || r.route.route_name || ""}`) : null,
    r.destinations && r.destinations.length
      ? table(["host", "subset", "weight", "endpoints"],
        r.destinations.map((d) => [d.host, d.subset || "-", d.weight ?? "-", d.endpoints]))
      : null));
}

function renderDetails(doc) {
  const box = $("details");
  if (doc.edge) {
    const e = doc.edge;
    box.replaceChildren(h("h2", {}, `${e.source} → ${e.target}`),
      table(["", ""], [["protocol", e.protocol], ["mTLS", e.mtls ? "mutual TLS" : "no"],
        ["rate", rate(e)], ["5xx", `${e.error_rate.toFixed(2)}/s (${pct(e.error_ratio)})`],
        ["p99", e.p99_ms === null ? "-" : `${e.p99_ms} ms`], ["health", e.health]]),
      doc.routes ? [h("h3", {}, "Routes that apply"), ...routesBlock(doc.routes)] : null);
    return;
  }
  const n = doc.node;
  const parts = [h("h2", {}, `${n.kind} ${n.namespace ? n.namespace + "/" : ""}${n.name}`),
    h("p", {}, `health: ${n.health} · ${(n.request_rate || 0).toFixed(2)} rps · 5xx ${pct(n.error_ratio || 0)}`)];
  if (n.kind === "service") {
    parts.push(h("h3", {}, "Versions and traffic share"),
      table(["version", "workload", "rps", "share"], (doc.versions || []).map((v) => [
        v.version || "-", v.workload.replace(/^wl:[^/]*\//, ""), v.rate.toFixed(2),
        h("span", {}, h("span", { class: "bar", style: `width:${Math.round(v.share * 80)}px` }), ` ${pct(v.share)}`)])));
    parts.push(h("h3", {}, "Routes that apply (meshctl explain)"), ...routesBlock(doc.routes || []));
  } else if (doc.versions) {
    parts.push(h("p", {}, `versions: ${doc.versions.join(", ") || "-"}`));
  }
  if (doc.bound) {
    parts.push(h("h3", {}, "Gateways"), table(["gateway", "bound VirtualServices"],
      Object.entries(doc.bound).map(([g, vs]) => [g, vs.join(", ") || "none"])));
  }
  parts.push(h("h3", {}, "Pods"), table(["pod", "node", "address", "version"],
    (doc.pods || []).map((p) => [p.ref, p.node, p.address || "-", p.version])));
  parts.push(h("h3", {}, "Authorization policies"), (doc.policies || []).length
    ? table(["policy", "action", "selector", "rules"], doc.policies.map((p) => [
      p.ref, p.action, p.selector ? JSON.stringify(p.selector) : "namespace-wide", p.rules]))
    : h("p", { class: "fix" }, "none (all allowed)"));
  parts.push(h("h3", {}, "Certificates"), (doc.certificates || []).length
    ? table(["identity", "node", "expires"], doc.certificates.map((c) => [c.identity, c.node, hours(c.expires_in)]))
    : h("p", { class: "fix" }, "none issued"));
  if ((doc.edges || []).length) parts.push(h("h3", {}, "Traffic"), edgeRows(doc.edges));
  box.replaceChildren(...parts);
}

async function details() {
  if (!state.selected) {
    $("details").replaceChildren(h("p", { class: "hint" }, "Click a node or an edge for its details."));
    return;
  }
  const [kind, ...rest] = state.selected.split(":");
  const id = rest.join(":");
  try {
    renderDetails(await getJson(`/api/${kind}?id=${encodeURIComponent(id)}&window=${state.window}`));
  } catch (err) {
    $("details").replaceChildren(h("p", { class: "hint" }, `${id} is gone: ${err.message}`));
    state.selected = null;
  }
}

function renderHealth(doc) {
  const findings = doc.findings || [];
  $("health-count").textContent = `(${findings.length})`;
  const box = $("tab-health");
  if (doc.store_error) box.replaceChildren(h("p", { class: "sev-error" }, `store: ${doc.store_error}`));
  else box.replaceChildren();
  if (!findings.length) { box.append(h("p", { class: "hint" }, "No problems found.")); return; }
  box.append(h("table", {}, h("tr", {}, ["", "kind", "object", "problem", "fix"].map((x) => h("th", {}, x))),
    findings.map((f) => h("tr", { class: "finding", "data-kind": f.kind, "data-ref": f.ref, "data-check": f.check },
      h("td", { class: `sev-${f.severity}` }, f.severity), h("td", {}, f.kind), h("td", {}, f.ref),
      h("td", {}, f.message), h("td", { class: "fix" }, f.fix)))));
}

function renderRollouts(doc) {
  const rows = doc.rollouts || [];
  $("rollouts-count").textContent = `(${rows.length})`;
  const box = $("tab-rollouts");
  if (!rows.length) { box.replaceChildren(h("p", { class: "hint" }, "No rollouts.")); return; }
  box.replaceChildren(...rows.map((r) => r.error
    ? h("p", { class: "sev-error rollout", "data-ref": r.ref }, `${r.ref}: ${r.error}`)
    : h("div", { class: "rollout", "data-ref": r.ref, "data-phase": r.phase },
      h("p", {}, h("b", {}, r.ref), " ", h("span", { class: "phase" }, r.phase),
        ` · ${r.host} · stable ${r.stable} / canary ${r.canary} · weight `,
        h("b", { class: "weight" }, `${r.weight ?? "-"}%`),
        ` · iteration ${r.iteration ?? "-"} · failed checks ${r.failed_checks ?? 0} · updated ${when(r.updated)}`),
      table(["metric", "last value"], Object.entries(r.analysis).map(([k, v]) => [k, v === null ? "no data" : v])),
      h("h4", {}, "History"),
      table(["time", "weight", "analysis"], r.history.map((x) => [when(x.time), `${x.weight ?? "-"}%`,
        Object.entries(x.analysis).map(([k, v]) => `${k}=${v === null ? "no data" : v}`).join(", ")])),
      h("h4", {}, "Events"),
      table(["time", "message"], r.events.map((e) => [when(e.time), e.message])))));
}

function renderAgents(doc) {
  const rows = doc.agents || [];
  $("agents-count").textContent = `(${rows.length})`;
  $("tab-agents").replaceChildren(rows.length
    ? table(["node", "metrics", "last scrape", "error"], rows.map((a) => [a.node, a.metrics, when(a.last_scrape), a.error || ""]))
    : h("p", { class: "hint" }, "No agent has published its node record yet."));
}

async function refresh() {
  try {
    const [graph, health, rollouts, agents] = await Promise.all([
      getJson(`/api/graph?window=${state.window}`), getJson("/api/health"),
      getJson("/api/rollouts"), getJson("/api/agents")]);
    state.graph = graph;
    if (graph.refresh_seconds !== state.refresh) { state.refresh = graph.refresh_seconds; schedule(); }
    fillWindows(graph.windows);
    draw();
    renderHealth(health);
    renderRollouts(rollouts);
    renderAgents(agents);
    if (state.selected) await details();
    $("status").className = "status";
    $("status").textContent = `revision ${graph.revision} · ${graph.agents} agent(s) · updated ${when(graph.generated)}`;
    document.body.dataset.updated = String(graph.generated);
  } catch (err) {
    $("status").className = "status error";
    $("status").textContent = `update failed: ${err.message}`;
  }
}

function fillWindows(windows) {
  const sel = $("window");
  if (sel.options.length) return;
  for (const w of windows) {
    const label = w < 60 ? `${w} s` : `${w / 60} min`;
    sel.append(h("option", { value: String(w) }, label));
  }
  sel.value = String(state.window);
}

function schedule() {
  clearInterval(state.timer);
  state.timer = setInterval(refresh, state.refresh * 1000);
}

$("window").addEventListener("change", (ev) => { state.window = Number(ev.target.value); refresh(); });
for (const button of document.querySelectorAll(".tabs button")) {
  button.addEventListener("click", () => {
    for (const b of document.querySelectorAll(".tabs button")) b.classList.toggle("active", b === button);
    for (const t of document.querySelectorAll(".tab")) t.hidden = t.id !== `tab-${button.dataset.tab}`;
  });
}
$("graph").addEventListener("click", () => { if (state.selected) select(state.selected); });
refresh();
schedule();
