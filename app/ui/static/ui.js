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
async function lookupUser(userId) {
  history.replaceState(null, "", `?user=${esc(userId)}`);
  $("#user-input").value = userId;
  $("#user-panel").hidden = false;
  $("#user-title").textContent = userId;
  const [recs, interests] = await Promise.all([
    api(`/v1/users/${esc(userId)}/recommendations?k=10&explain=true`),
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
  const recsShown = recs.slice(0, 8);
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
  if (graph) graph.destroy();
  graph = cytoscape({
    container: box, elements, wheelSensitivity: 0.3,
    style: [
      {selector: "node", style: {label: "data(label)", "font-size": 10, "text-valign": "bottom", "text-margin-y": 4,
        "text-wrap": "ellipsis", "text-max-width": 110, width: 18, height: 18, color: "#1d2733"}},
      {selector: "node[kind = 'user']", style: {"background-color": "#2d5be3", width: 30, height: 30, "font-weight": 700}},
      {selector: "node[kind = 'strong']", style: {"background-color": "#1f9d74"}},
      {selector: "node[kind = 'rec']", style: {"background-color": "#e0801f", shape: "round-rectangle"}},
      {selector: "edge", style: {width: "data(width)", "curve-style": "bezier", opacity: 0.7}},
      {selector: "edge[kind = 'has']", style: {"line-color": "#1f9d74"}},
      {selector: "edge[kind = 'why']", style: {"line-color": "#e0801f", "line-style": "dashed",
        "target-arrow-shape": "triangle", "target-arrow-color": "#e0801f"}},
    ],
    layout: {name: "concentric", concentric: (n) => ({user: 3, strong: 2, rec: 1}[n.data("kind")]),
      levelWidth: () => 1, minNodeSpacing: 28, animate: false},
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
  lineChart($("#rate-chart"), rates, {left: "3 min ago", right: "now", top: `${fmt(Math.max(0, ...rates), 1)} events/s`}, 1200);
  const p = stats.data.pipeline;
  if (!p) return;  // an older API: counts only
  $("#lag").textContent = `${fmt(p.lag_seconds, 1)} s`;
  $("#freshness").textContent = ago(p.last_refresh_at);
  $("#model").textContent = p.model ? p.model.version : "none yet";
  const metrics = p.model && p.model.metrics ? Object.entries(p.model.metrics)
    .filter(([, v]) => typeof v === "number").map(([k, v]) => `${k} ${Number.isInteger(v) ? v : v.toFixed(4)}`) : [];
  $("#model-metrics").textContent = metrics.length ? `Model metrics: ${metrics.join(" · ")}` : "";
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
