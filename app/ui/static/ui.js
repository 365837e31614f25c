// The /ui page: reads the public REST API only, and draws what it gets. A missing field or
// endpoint (e.g. no `because`, no /interests) leaves its part out instead of breaking the page.
"use strict";

const $ = (sel) => document.querySelector(sel);
const esc = encodeURIComponent;

async function api(path) {
  // {ok, status, data}; never throws, so one failing endpoint does not take the page down.
  try {
    const response = await fetch(path, {headers: {Accept: "application/json"}});
    const data = await response.json().catch(() => null);
    return {ok: response.ok, status: response.status, data};
  } catch (err) {
    return {ok: false, status: 0, data: {error: {message: String(err)}}};
  }
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value; else if (key in node) node[key] = value; else node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function say(id, text) {
  const box = $(id);
  box.hidden = !text;
  box.textContent = text || "";
}

const fmt = (x, digits = 3) => (typeof x === "number" ? x.toFixed(digits) : "–");
const name = (row) => row.title || row.item_id;

function ago(ms) {
  if (!ms) return "–";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  return s < 90 ? `${s.toFixed(0)} s ago` : s < 5400 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}

function itemLink(id, label) {
  return el("a", {href: `?item=${esc(id)}`, onclick: (e) => { e.preventDefault(); lookupItem(id); }}, label);
}

function userLink(id) {
  return el("a", {href: `?user=${esc(id)}`, onclick: (e) => { e.preventDefault(); lookupUser(id); }}, id);
}

// --- a shopper -------------------------------------------------------------
// How many recommendations to list and draw: `?k=` in the page's address, 10 by default.
const pageK = Math.min(50, Math.max(1, parseInt(new URLSearchParams(location.search).get("k"), 10) || 10));

async function lookupUser(userId) {
  history.replaceState(null, "", `?user=${esc(userId)}${pageK === 10 ? "" : `&k=${pageK}`}`);
  $("#user-input").value = userId;
  $("#user-panel").hidden = false;
  $("#user-title").textContent = userId;
  const [recs, interests] = await Promise.all([
    api(`/v1/users/${esc(userId)}/recommendations?k=${pageK}&explain=true`),
    api(`/v1/users/${esc(userId)}/interests?k=8`),
  ]);
  if (!recs.ok) {
    say("#user-message", recs.data?.error?.message || `recommendations failed (HTTP ${recs.status})`);
    $("#recs").replaceChildren();
  } else {
    say("#user-message", "");
  }
  const results = recs.ok ? recs.data.results || [] : [];
  const meta = recs.ok ? [recs.data.source, recs.data.version && `model ${recs.data.version}`,
    recs.data.refreshed_at && `refreshed ${recs.data.refreshed_at}`].filter(Boolean).join(" · ") : "";
  $("#user-meta").textContent = meta;
  renderRecs(results);
  const known = interests.ok ? interests.data : null;
  drawGraph(userId, known ? known.items || [] : [], results);
  renderDrift(known ? known.history : null);
  renderCategories(known ? known.categories : null);
}

function renderRecs(results) {
  $("#recs").replaceChildren(...results.map((r) => {
    const meta = [r.category, typeof r.price === "number" ? `£${r.price.toFixed(2)}` : null].filter(Boolean).join(" · ");
    const because = Array.isArray(r.because) && r.because.length
      ? el("div", {class: "because"}, "because of " + r.because.slice(0, 3).map((b) => name(b)).join(", "))
      : null;
    return el("li", {"data-item": r.item_id}, el("span", {class: "score"}, fmt(r.score)),
      el("span", {class: "name"}, itemLink(r.item_id, name(r))), " ", el("span", {class: "meta"}, meta), because);
  }));
}

// Labels stay readable at any size: the shopper in the middle, their strongest items in a column on
// the left with labels to the left, the recommendations in a column on the right with labels to the
// right, one row per item; the box grows with the rows instead of the picture shrinking to fit.
const LABEL_PX = 12, ROW_PX = 24;

// A long title cut in the middle keeps both ends: "reading lamp with a…no. 12 in blue".
function middle(text, chars) {
  const s = String(text);
  if (s.length <= chars) return s;
  const tail = Math.floor(chars * 0.45);
  return `${s.slice(0, chars - tail - 1).trimEnd()}…${s.slice(-tail).trimStart()}`;
}

function columns(box, nodes) {
  const left = nodes.filter((n) => n.kind === "strong"), right = nodes.filter((n) => n.kind === "rec");
  const rows = Math.max(left.length, right.length, 1);
  box.style.height = `${Math.max(320, rows * ROW_PX + 48)}px`;
  const width = box.clientWidth || 600, height = box.clientHeight;
  const labelWidth = Math.max(80, Math.min(220, width * 0.3));
  const at = {}, xLeft = labelWidth + 16, xRight = width - labelWidth - 16;
  const place = (column, x, side) => column.forEach((n, i) => {
    n.side = side;
    at[n.id] = {x, y: height / 2 + (i - (column.length - 1) / 2) * ROW_PX};
  });
  const chars = Math.floor(labelWidth / (LABEL_PX * 0.55));
  for (const n of nodes) if (n.kind !== "user") n.label = middle(n.label, chars);
  place(left, xLeft, "left");
  place(right, xRight, "right");
  for (const n of nodes) if (n.kind === "user") at[n.id] = {x: (xLeft + xRight) / 2, y: height / 2};
  return {at, labelWidth};
}

let graph = null;
function drawGraph(userId, strongest, recs) {
  const box = $("#graph");
  if (typeof cytoscape !== "function") {
    box.textContent = "The graph library is not installed (run `make install`).";
    return;
  }
  const nodes = new Map([[`u:${userId}`, {id: `u:${userId}`, label: userId, kind: "user"}]]);
  const edges = [];
  const maxOf = (xs) => Math.max(1e-9, ...xs.map(Math.abs));
  // Strongest items: from /interests when served, else the items named in the explanations.
  let strong = strongest.map((s) => ({item_id: s.item_id, title: s.title, weight: s.weight}));
  if (!strong.length) {
    const seen = new Map();
    for (const r of recs) for (const b of r.because || []) seen.set(b.item_id, {item_id: b.item_id, title: b.title, weight: b.weight});
    strong = [...seen.values()].sort((a, b) => b.weight - a.weight).slice(0, 8);
  }
  const wMax = maxOf(strong.map((s) => s.weight || 0));
  for (const s of strong) {
    nodes.set(`i:${s.item_id}`, {id: `i:${s.item_id}`, label: name(s), kind: "strong"});
    edges.push({source: `u:${userId}`, target: `i:${s.item_id}`, width: 1 + 7 * Math.abs(s.weight || 0) / wMax, kind: "has"});
  }
  const recsShown = recs;
  const cMax = maxOf(recsShown.flatMap((r) => (r.because || []).map((b) => b.contribution || 0)).concat([0]));
  const sMax = maxOf(recsShown.map((r) => r.score || 0));
  for (const r of recsShown) {
    const id = `i:${r.item_id}`;
    if (!nodes.has(id)) nodes.set(id, {id, label: name(r), kind: "rec"});
    const because = (r.because || []).filter((b) => nodes.has(`i:${b.item_id}`) && `i:${b.item_id}` !== id);
    if (because.length) {
      for (const b of because.slice(0, 2)) {  // the two main reasons keep the picture readable
        edges.push({source: `i:${b.item_id}`, target: id, width: 1 + 5 * Math.abs(b.contribution || 0) / cMax, kind: "why"});
      }
    } else {
      edges.push({source: `u:${userId}`, target: id, width: 1 + 5 * Math.abs(r.score || 0) / sMax, kind: "why"});
    }
  }
  const elements = [...[...nodes.values()].map((data) => ({data})),
    ...edges.map((data, n) => ({data: {id: `e${n}`, ...data}}))];
  const layout = columns(box, [...nodes.values()]);
  if (graph) graph.destroy();
  graph = cytoscape({
    container: box, elements, wheelSensitivity: 0.3, minZoom: 0.5, maxZoom: 3,
    style: [
      {selector: "node", style: {label: "data(label)", "font-size": LABEL_PX, "text-valign": "center",
        "text-wrap": "ellipsis", "text-max-width": layout.labelWidth, width: 14, height: 14, color: "#1d2733",
        "text-background-color": "#fbfcfd", "text-background-opacity": 0.85, "text-background-padding": 1}},
      {selector: "node[side = 'left']", style: {"text-halign": "left", "text-margin-x": -6}},
      {selector: "node[side = 'right']", style: {"text-halign": "right", "text-margin-x": 6}},
      {selector: "node[kind = 'user']", style: {"background-color": "#2d5be3", width: 26, height: 26, "font-weight": 700,
        "text-valign": "bottom", "text-halign": "center", "text-margin-y": 4}},
      {selector: "node[kind = 'strong']", style: {"background-color": "#1f9d74"}},
      {selector: "node[kind = 'rec']", style: {"background-color": "#e0801f", shape: "round-rectangle"}},
      {selector: "edge", style: {width: "data(width)", "curve-style": "bezier", opacity: 0.55}},
      {selector: "edge[kind = 'has']", style: {"line-color": "#1f9d74"}},
      {selector: "edge[kind = 'why']", style: {"line-color": "#e0801f", "line-style": "dashed",
        "target-arrow-shape": "triangle", "target-arrow-color": "#e0801f"}},
    ],
    layout: {name: "preset", positions: (n) => layout.at[n.id()], fit: false, zoom: 1, pan: {x: 0, y: 0}},
  });
  graph.on("tap", "node[kind != 'user']", (evt) => lookupItem(evt.target.id().slice(2)));
  window.igGraph = graph;  // for tests and the curious
}

function lineChart(box, values, labels = {}, w = 600) {
  // A small SVG line chart: values newest last.
  const h = 120, pad = 24;
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const top = Math.max(1e-9, ...values);
  const x = (i) => pad + (values.length < 2 ? 0 : i * (w - 2 * pad) / (values.length - 1));
  const y = (v) => h - pad - (v / top) * (h - 2 * pad);
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(svgNS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
  };
  add("line", {class: "axis", x1: pad, y1: h - pad, x2: w - pad, y2: h - pad});
  if (values.length) {
    const points = values.map((v, i) => `${x(i)},${y(v)}`).join(" ");
    add("polygon", {class: "area", points: `${x(0)},${h - pad} ${points} ${x(values.length - 1)},${h - pad}`});
    add("polyline", {class: "line", points});
  }
  add("text", {x: 2, y: pad - 8}, labels.top || fmt(top));
  add("text", {x: pad, y: h - 6}, labels.left || "");
  add("text", {x: w - pad, y: h - 6, "text-anchor": "end"}, labels.right || "");
  box.replaceChildren(svg);
}

const when = (iso) => (Number.isNaN(Date.parse(iso)) ? String(iso) : new Date(iso).toLocaleString());

function renderDrift(historyRows) {
  const box = $("#drift");
  if (!Array.isArray(historyRows) || !historyRows.length) {
    box.replaceChildren(el("p", {class: "muted"}, "No refresh history for this shopper yet."));
    return;
  }
  lineChart(box, historyRows.map((h) => h.drift || 0),
    {top: `drift ${fmt(Math.max(...historyRows.map((h) => h.drift || 0)))}`,
     left: when(historyRows[0].at), right: when(historyRows[historyRows.length - 1].at)});
}

function renderCategories(categories) {
  const rows = Array.isArray(categories) ? categories.slice(0, 6) : [];
  const top = Math.max(1e-9, ...rows.map((c) => Math.abs(c.weight)));
  $("#categories").replaceChildren(...rows.map((c) => el("li", {}, el("span", {}, c.category || "–"),
    el("span", {class: "bar", style: `width:${(100 * Math.abs(c.weight) / top).toFixed(1)}%`}),
    el("span", {class: "muted"}, fmt(c.weight, 2)))));
}

// --- an item ---------------------------------------------------------------
async function lookupItem(itemId) {
  history.replaceState(null, "", `?item=${esc(itemId)}`);
  $("#item-input").value = itemId;
  $("#item-panel").hidden = false;
  $("#item-title").textContent = itemId;
  const [audience, similar] = await Promise.all([
    api(`/v1/items/${esc(itemId)}/audience?k=15`), api(`/v1/items/${esc(itemId)}/similar?k=10`)]);
  const failed = [audience, similar].find((r) => !r.ok);
  say("#item-message", failed ? failed.data?.error?.message || `HTTP ${failed.status}` : "");
  $("#audience").replaceChildren(...(audience.ok ? audience.data.results : []).map((r) =>
    el("li", {}, el("span", {class: "score"}, fmt(r.score)), userLink(r.user_id))));
  $("#similar").replaceChildren(...(similar.ok ? similar.data.results : []).map((r) =>
    el("li", {}, el("span", {class: "score"}, fmt(r.score)), el("span", {class: "name"}, itemLink(r.item_id, name(r))),
      " ", el("span", {class: "meta"}, r.category || ""))));
  $("#item-panel").scrollIntoView({behavior: "smooth", block: "start"});
}

// --- the system ------------------------------------------------------------
const percent = (v) => `${(100 * v).toFixed(1)} %`;
const duration = (v) => (v < 90 ? `${v.toFixed(1)} s` : `${(v / 60).toFixed(1)} min`);
// A model's metrics as (:Model).metrics names them, in words and units; unknown names are shown
// readable rather than dropped.
const METRICS = [
  [/^recall@(\d+)$/, (m, v) => `Recall@${m[1]} (share of held-out items in the top ${m[1]}) ${percent(v)}`],
  [/^ndcg@(\d+)$/, (m, v) => `NDCG@${m[1]} (ranking quality, 0 to 1) ${v.toFixed(3)}`],
  [/^hit(?:_rate)?@(\d+)$/, (m, v) => `hit rate@${m[1]} ${percent(v)}`],
  [/^mrr@?(\d*)$/, (m, v) => `mean reciprocal rank ${v.toFixed(3)}`],
  [/^tune_recall$/, (m, v) => `Recall on the tuning shoppers ${percent(v)}`],
  [/^step$/, (m, v) => `last search step ${v.toPrecision(2)}`],
  [/^seconds$/, (m, v) => `training time ${duration(v)}`],
  [/^(epoch|epochs)$/, (m, v) => `epochs ${v}`],
  [/^(trial|trials)$/, (m, v) => `settings tried ${v}`],
  [/^(users|n_users)$/, (m, v) => `shoppers evaluated ${v.toLocaleString()}`],
];

function metricRank(key) {  // the held-out quality first, in the table's order; unknown names last
  const n = METRICS.findIndex(([pattern]) => pattern.test(key));
  return n < 0 ? METRICS.length : n;
}

function metricText(key, value) {
  for (const [pattern, text] of METRICS) {
    const m = key.match(pattern);
    if (m) return text(m, value);
  }
  return `${key.replace(/_/g, " ")} ${Number.isInteger(value) ? value.toLocaleString() : value.toPrecision(4)}`;
}

const rates = [];
let last = null;
async function pollSystem() {
  const stats = await api("/v1/stats");
  if (!stats.ok) {
    say("#system-message", stats.data?.error?.message || `stats unavailable (HTTP ${stats.status})`);
    return;
  }
  say("#system-message", "");
  const now = performance.now();
  const accepted = stats.data.accepted || 0;
  if (last) rates.push(Math.max(0, (accepted - last.accepted) / ((now - last.t) / 1000)));
  if (rates.length > 90) rates.shift();
  last = {t: now, accepted};
  $("#accepted").textContent = accepted.toLocaleString();
  $("#rate").textContent = rates.length ? rates[rates.length - 1].toFixed(1) : "–";
  const log = stats.data.log;  // under IG_INGEST=kafka: the consumers' lag behind the event log
  $("#log-tile").hidden = !log;
  if (log) $("#log-lag").textContent = log.messages === null ? "broker away" : log.messages.toLocaleString();
  lineChart($("#rate-chart"), rates, {left: "3 min ago", right: "now", top: `${fmt(Math.max(0, ...rates), 1)} events/s`}, 1200);
  const p = stats.data.pipeline;
  if (!p) return;  // an older API: counts only
  $("#lag").textContent = `${fmt(p.lag_seconds, 1)} s`;
  $("#freshness").textContent = ago(p.last_refresh_at);
  $("#model").textContent = p.model ? p.model.version : "none yet";
  const metrics = p.model && p.model.metrics ? Object.entries(p.model.metrics)
    .filter(([, v]) => typeof v === "number").sort(([a], [b]) => metricRank(a) - metricRank(b))
    .map(([k, v]) => metricText(k, v)) : [];
  $("#model-metrics").textContent = metrics.length ? `Model, measured on held-out shoppers when trained: ${metrics.join(" · ")}` : "";
  $("#runs tbody").replaceChildren(...(p.recent_runs || []).slice(0, 8).map((r) => el("tr", {},
    el("td", {}, r.finished_at ? new Date(r.finished_at).toLocaleTimeString() : "–"), el("td", {}, r.mode || "–"),
    el("td", {}, String(r.changed_edges ?? r.edges ?? "–")), el("td", {}, String(r.users ?? "–")),
    el("td", {}, String(r.items ?? "–")), el("td", {}, fmt(r.seconds, 3)))));
}

$("#user-form").addEventListener("submit", (e) => { e.preventDefault(); const v = $("#user-input").value.trim(); if (v) lookupUser(v); });
$("#item-form").addEventListener("submit", (e) => { e.preventDefault(); const v = $("#item-input").value.trim(); if (v) lookupItem(v); });
const params = new URLSearchParams(location.search);
if (params.get("user")) lookupUser(params.get("user"));
if (params.get("item")) lookupItem(params.get("item"));
pollSystem();
setInterval(pollSystem, 2000);
