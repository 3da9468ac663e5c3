// presence-sync console: plain JavaScript, no build step, nothing from the internet.
// The table is one server-side page (search, sort, paging by the service); server-sent events say
// which agents changed, and the page re-reads what it shows.
"use strict";

const state = { q: "", sort: "name", desc: false, offset: 0, limit: 50, total: 0,
  selected: null, view: "agents", csrf: "" };

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
};

function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  const secs = Math.round((Date.now() - d.getTime()) / 1000);
  const span = Math.abs(secs);
  const text = span < 60 ? `${span} s` : span < 3600 ? `${Math.round(span / 60)} min`
    : span < 86400 ? `${Math.round(span / 3600)} h` : null;
  if (text === null) return d.toLocaleString();
  return secs < -1 ? `in ${text}` : `${text} ago`;
}
const timeCell = (iso) => el("td", { title: iso || "" }, when(iso));

function toast(text) {
  const t = $("#toast");
  t.textContent = text; t.hidden = false;
  clearTimeout(toast.timer); toast.timer = setTimeout(() => { t.hidden = true; }, 4000);
}

async function api(path, options = {}) {
  const resp = await fetch(path, { credentials: "same-origin", ...options });
  if (resp.status === 401) { location.href = "/console/signin"; throw new Error("signed out"); }
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status}`);
  return body;
}
const post = (path) => api(path, { method: "POST", headers: { "X-CSRF-Token": state.csrf } });

// ------------------------------------------------------------------------------------------ agents

function syncBadge(row) {
  const cls = { "in sync": "ok", "out of sync": "bad", "dead letter": "bad", "writing": "warn" }[row.sync] || "";
  return el("span", { class: `badge ${cls}` }, row.sync);
}

async function loadAgents() {
  const params = new URLSearchParams({ q: state.q, sort: state.sort, desc: state.desc ? "1" : "",
    offset: state.offset, limit: state.limit });
  const data = await api(`/console/api/agents?${params}`);
  state.total = data.total;
  const body = $("#agents tbody");
  body.replaceChildren(...data.rows.map((r) => {
    const tr = el("tr", { "data-id": r.id },
      el("td", {}, el("strong", {}, r.name || "?"), el("div", { class: "muted" }, r.id)),
      el("td", { title: r.dynamics_at || "" }, el("span", { class: "value" }, r.dynamics || "–"), el("div", { class: "muted" }, r.dynamics_at ? when(r.dynamics_at) : "")),
      el("td", { title: r.teams_at || "" }, el("span", { class: "value" }, r.teams || "–"), el("div", { class: "muted" }, r.teams_at ? `since ${when(r.teams_at)}` : "")),
      el("td", {}, r.session),
      el("td", { title: r.override_why || "" }, r.override ? el("span", { class: "badge warn" }, "override") : "–"),
      el("td", {}, syncBadge(r)),
      timeCell(r.changed_at),
      timeCell(r.propagated_at));
    if (r.id === state.selected) tr.classList.add("selected");
    tr.addEventListener("click", () => select(r.id));
    return tr;
  }));
  const last = Math.min(state.offset + data.rows.length, state.total);
  $("#count").textContent = `${state.total.toLocaleString()} agent(s)`;
  $("#pageinfo").textContent = state.total ? `${state.offset + 1}–${last}` : "";
  $("#prev").disabled = state.offset === 0;
  $("#next").disabled = last >= state.total;
  document.querySelectorAll("th.sortable").forEach((th) => {
    th.classList.toggle("sorted", th.dataset.sort === state.sort);
    th.classList.toggle("desc", th.dataset.sort === state.sort && state.desc);
  });
  $("#agents").dataset.loaded = "1";
}

function dl(pairs) {
  const d = el("dl", { class: "inputs" });
  for (const [k, v] of pairs) d.append(el("dt", {}, k), el("dd", {}, v ?? "–"));
  return d;
}

async function select(id) {
  state.selected = id;
  document.querySelectorAll("#agents tbody tr").forEach((tr) => tr.classList.toggle("selected", tr.dataset.id === id));
  await loadDetail();
}

async function loadDetail() {
  if (!state.selected) return;
  const data = await api(`/console/api/agents/${encodeURIComponent(state.selected)}`);
  const a = data.agent;
  $("#detail").hidden = false;
  $(".split").classList.add("detail-open");
  $("#detail-name").textContent = a.name || a.id;
  $("#detail-ids").textContent = `Dynamics ${a.id} · Entra ${a.entra_id}`;
  const ex = data.explanation;
  const box = $("#explanation");
  if (!ex) {
    box.replaceChildren(el("p", { class: "muted" }, "The bridge has not seen this agent in either system yet."));
  } else {
    const p = ex.p ? `${ex.p} (set by ${ex.p_by || "unknown"}, ${when(ex.p_at)})` : "not known yet";
    const q = ex.q ? `${ex.q} (since ${when(ex.q_since)})` : "nothing that asks for more (unknown or hidden)";
    box.replaceChildren(
      el("div", { class: "rule", id: "rule" }, el("strong", {}, ex.rule), ex.why),
      dl([
        ["P, own Dynamics presence", p],
        ["Agent last chose", when(ex.chose_at)],
        ["Q, own Teams state", q],
        ["Q asks Dynamics for", ex.asked || "nothing"],
        ["Dynamics should show", ex.dynamics],
        ["Dynamics shows", ex.dynamics_shows],
        ["Teams session should be", ex.session],
        ["Teams session is", ex.session_holds],
      ]),
      ex.in_sync === false
        ? el("p", { class: "warn" }, ex.differences.join("; "))
        : el("p", { class: "muted" }, ex.in_sync ? "Both systems show what rule 2 calls for." : ""));
  }
  $("#detail-outbox tbody").replaceChildren(...data.outbox.map((r) => el("tr", {},
    el("td", {}, r.system), el("td", {}, r.value), el("td", {}, r.status),
    el("td", {}, r.error || ""), timeCell(r.updated_at))));
  $("#timeline").replaceChildren(...data.timeline.slice(0, 40).map((t) => el("li", {},
    el("span", { class: "side" }, t.side), el("span", { title: t.at }, `${when(t.at)} · `), t.what)));
}

// ------------------------------------------------------------------------------------- operations

function figure(label, value, cls = "") {
  return el("div", { class: `figure ${cls}` }, el("b", {}, String(value)), label);
}

async function loadOps() {
  const ops = await api("/console/api/ops");
  const c = ops.outbox.counts;
  $("#outbox-counts").replaceChildren(figure("pending", c.pending || 0), figure("in flight", c.in_flight || 0),
    figure("dead letters", c.dead || 0, c.dead ? "warn" : ""), figure("delivered", c.delivered || 0));
  $("#upstreams").replaceChildren(...ops.upstreams.map((u) => el("div", {},
    el("strong", {}, `${u.system}: `),
    el("span", { class: `badge ${u.breaker === "closed" ? "ok" : "bad"}` }, u.breaker),
    u.next_probe_at ? ` next probe ${when(u.next_probe_at)}` : "")));
  const s = ops.spool;
  $("#spool").replaceChildren(s ? el("div", {}, figure("records waiting", s.records),
    el("div", { class: s.problem ? "warn" : "muted" }, s.problem || s.path)) : el("span", { class: "muted" }, "no spool"));
  $("#quarantine-count").replaceChildren(figure("kept", ops.quarantine.count), figure("dropped for room", ops.quarantine.dropped));
  $("#dead tbody").replaceChildren(...ops.outbox.dead.map((r) => {
    const btn = el("button", { type: "button", class: "retry", "data-row": r.id }, "Retry");
    btn.addEventListener("click", async () => {
      btn.disabled = true;
      try { await post(`/console/api/outbox/${r.id}/retry`); toast(`row ${r.id} queued again`); await loadOps(); }
      catch (e) { toast(e.message); btn.disabled = false; }
    });
    return el("tr", { "data-row": r.id }, el("td", {}, String(r.id)), el("td", {}, r.agent_id), el("td", {}, r.system),
      el("td", {}, r.value), el("td", {}, String(r.attempts)), el("td", { class: "error" }, r.error || ""),
      timeCell(r.updated_at), el("td", {}, btn));
  }));
  $("#live-rows tbody").replaceChildren(...[...ops.outbox.in_flight, ...ops.outbox.pending].map((r) => el("tr", {},
    el("td", {}, String(r.id)), el("td", {}, r.agent_id), el("td", {}, r.system), el("td", {}, r.value),
    el("td", {}, r.status), el("td", {}, String(r.attempts)), timeCell(r.next_attempt_at), el("td", {}, r.error || ""))));
  $("#quarantine tbody").replaceChildren(...ops.quarantine.items.map((q) => {
    const show = el("button", { type: "button" }, "Show");
    show.addEventListener("click", async () => {
      const item = await api(`/console/api/quarantine/${q.id}`);
      const pre = $("#quarantine-body"); pre.hidden = false; pre.textContent = item.body;
    });
    const drop = el("button", { type: "button" }, "Drop");
    drop.addEventListener("click", async () => {
      try { await post(`/console/api/quarantine/${q.id}/drop`); toast(`item ${q.id} dropped`); await loadOps(); }
      catch (e) { toast(e.message); }
    });
    return el("tr", {}, el("td", {}, String(q.id)), el("td", {}, q.route), el("td", {}, q.reason), el("td", {}, q.detail),
      timeCell(q.received_at), el("td", {}, String(q.size)), el("td", {}, show, " ", drop));
  }));
  const subs = ops.subscriptions;
  $("#subscriptions tbody").replaceChildren(...subs.rows.map((r) => el("tr", {},
    el("td", {}, r.account), el("td", {}, r.subscription), el("td", {}, String(r.ids)), el("td", {}, r.expires),
    el("td", {}, String(r.minutes_left)), timeCell(r.last_notification_at), timeCell(r.last_report_at),
    el("td", {}, r.health || ""))));
  const problems = Object.entries(subs.problems || {}).map(([a, why]) => `${a}: ${why}`);
  $("#subscription-problems").textContent = !subs.configured ? "Graph subscriptions are not configured on this service."
    : problems.join("; ");
  state.metrics = ops.metrics;
  renderMetrics();
}

function renderMetrics() {
  const f = $("#metric-filter").value.toLowerCase();
  const rows = (state.metrics || []).filter((m) => !f || m.name.includes(f) || m.labels.toLowerCase().includes(f));
  $("#metrics tbody").replaceChildren(...rows.map((m) => el("tr", { title: m.help },
    el("td", {}, m.name), el("td", {}, m.labels), el("td", {}, String(m.value)))));
}

// ------------------------------------------------------------------------------------------- live

function connect() {
  const es = new EventSource("/console/api/events");
  const badge = $("#live");
  es.addEventListener("hello", () => { badge.textContent = "live"; badge.className = "live on"; });
  // Any change may move rows in or out of the page shown (a sort by presence, a search), so the page
  // is read again: one page, whatever the number of agents.
  es.addEventListener("agents", () => { if (state.view === "agents") refresh(); });
  es.addEventListener("ops", () => { if (state.view === "ops") loadOps().catch(() => {}); });
  es.onerror = () => { badge.textContent = "reconnecting"; badge.className = "live off"; };
}

let pending = null;
function refresh() {
  if (pending) return;
  pending = setTimeout(async () => {
    pending = null;
    try { await loadAgents(); if (state.selected) await loadDetail(); } catch (e) { /* shown on next action */ }
  }, 150);
}

function show(view) {
  state.view = view;
  document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b.dataset.view === view));
  $("#view-agents").hidden = view !== "agents";
  $("#view-ops").hidden = view !== "ops";
  (view === "ops" ? loadOps() : loadAgents()).catch((e) => toast(e.message));
}

async function start() {
  const me = await api("/console/api/session");
  state.csrf = me.csrf;
  $("#user").textContent = me.user;
  document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => show(b.dataset.view)));
  let typing = null;
  $("#search").addEventListener("input", (e) => {
    clearTimeout(typing);
    typing = setTimeout(() => { state.q = e.target.value; state.offset = 0; loadAgents(); }, 200);
  });
  document.querySelectorAll("th.sortable").forEach((th) => th.addEventListener("click", () => {
    if (state.sort === th.dataset.sort) state.desc = !state.desc; else { state.sort = th.dataset.sort; state.desc = false; }
    state.offset = 0; loadAgents();
  }));
  $("#prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); loadAgents(); });
  $("#next").addEventListener("click", () => { state.offset += state.limit; loadAgents(); });
  $("#close-detail").addEventListener("click", () => {
    state.selected = null; $("#detail").hidden = true; $(".split").classList.remove("detail-open"); loadAgents();
  });
  $("#metric-filter").addEventListener("input", renderMetrics);
  $("#signout").addEventListener("click", async () => { await post("/console/signout"); location.href = "/console/signin"; });
  await loadAgents();
  connect();
}

document.addEventListener("DOMContentLoaded", () => { start().catch((e) => toast(e.message)); });
