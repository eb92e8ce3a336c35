// The gateway's dashboard: renders the JSON APIs for a key holder or an operator. No framework, no build.
"use strict";

const KEY_PREFIX = "gwk_";
const $ = (id) => document.getElementById(id);

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  return node;
}

function row(cells, attrs) {
  const tr = el("tr", null, attrs);
  for (const cell of cells) tr.appendChild(el("td", cell));
  return tr;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "never";
}

async function api(path, options) {
  const key = sessionStorage.getItem("gateway-key");
  const resp = await fetch(path, {
    ...options,
    headers: { Authorization: "Bearer " + key, ...((options || {}).headers || {}) },
    cache: "no-store",
  });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const message = (body.error && body.error.message) || ("HTTP " + resp.status);
    throw new Error(message);
  }
  return body;
}

function show(value, id) {
  const node = $(id);
  node.textContent = String(value);
  node.dataset.value = JSON.stringify(value);
}

function chart(byModel) {
  const svg = $("usage-chart");
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const width = 640, bar = 26, gap = 8, label = 180;
  const height = Math.max(byModel.length, 1) * (bar + gap);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const top = Math.max(...byModel.map((m) => m.credits), 0) || 1;
  byModel.forEach((m, i) => {
    const y = i * (bar + gap);
    const g = document.createElementNS(ns, "g");
    g.setAttribute("class", "usage-bar");
    g.dataset.model = m.model;
    g.dataset.credits = JSON.stringify(m.credits);
    const name = document.createElementNS(ns, "text");
    name.setAttribute("x", 0);
    name.setAttribute("y", y + bar * 0.7);
    name.textContent = m.model;
    const rect = document.createElementNS(ns, "rect");
    rect.setAttribute("x", label);
    rect.setAttribute("y", y);
    rect.setAttribute("height", bar);
    rect.setAttribute("width", Math.max(2, ((width - label - 90) * m.credits) / top));
    const value = document.createElementNS(ns, "text");
    value.setAttribute("x", label + Math.max(2, ((width - label - 90) * m.credits) / top) + 6);
    value.setAttribute("y", y + bar * 0.7);
    value.textContent = String(m.credits);
    g.append(name, rect, value);
    svg.appendChild(g);
  });
  if (!byModel.length) {
    const empty = document.createElementNS(ns, "text");
    empty.setAttribute("x", 0);
    empty.setAttribute("y", 20);
    empty.textContent = "No usage yet this cycle.";
    svg.appendChild(empty);
  }
}

async function holderView() {
  const [credits, summary, alerts, keys] = await Promise.all([
    api("/gateway/credits"), api("/gateway/usage/summary"), api("/gateway/alerts"), api("/gateway/keys"),
  ]);
  show(credits.credits_remaining, "credits-remaining");
  show(credits.credits_limit, "credits-limit");
  show(credits.allowance_remaining, "allowance-remaining");
  show(credits.purchased_remaining, "purchased-remaining");
  const allowance = credits.credits_limit > 0 ? (100 * credits.allowance_remaining) / credits.credits_limit : 100;
  show(Math.round(Math.min(100, Math.max(0, allowance)) * 10) / 10, "allowance-percent");
  show(credits.plan, "plan");
  show(credits.credits_used_this_cycle, "used-cycle");
  show(summary.projected_credits_at_cycle_end, "projected");
  $("credits-bar").style.width = Math.min(100, Math.max(0, allowance)) + "%";
  $("credits-bar").className = allowance < 25 ? "low" : "";
  const reset = $("reset-date");
  reset.dateTime = credits.reset_date || "";
  reset.dataset.value = JSON.stringify(credits.reset_date);
  reset.textContent = credits.reset_date ? new Date(credits.reset_date).toLocaleDateString() : "—";
  $("warnings").replaceChildren(...credits.warnings.map((w) => el("li", w)));
  chart(summary.by_model);
  $("usage-table").tBodies[0].replaceChildren(...summary.by_model.map((m) =>
    row([m.model, m.provider, m.requests, m.input_tokens, m.output_tokens, m.credits], { "data-model": m.model })));
  $("alerts").replaceChildren(...alerts.data.map((a) => {
    const li = el("li", null, { "data-alert": a.id, class: a.read ? "read" : "unread" });
    li.appendChild(el("span", `${new Date(a.created_ms).toLocaleString()} — ${a.message}`));
    if (!a.read) {
      const button = el("button", "Mark read", { type: "button" });
      button.addEventListener("click", async () => {
        await api(`/gateway/alerts/${encodeURIComponent(a.id)}/read`, { method: "POST" });
        await holderView();
      });
      li.appendChild(button);
    }
    return li;
  }));
  if (!alerts.data.length) $("alerts").appendChild(el("li", "No alerts."));
  $("keys").tBodies[0].replaceChildren(...keys.data.map((k) =>
    row([k.prefix + "…", k.label, k.status, k.scopes.join(" ") || "all", when(k.last_used_at),
         k.expires_at ? when(k.expires_at) : "never"], { "data-key": k.id })));
}

let accountsAfter = "";

async function accountsPage(reset) {
  if (reset) {
    accountsAfter = "";
    $("accounts").tBodies[0].replaceChildren();
  }
  const params = new URLSearchParams({ limit: "50", after: accountsAfter, plan: $("filter-plan").value,
                                       name: $("filter-name").value });
  const page = await api("/admin/accounts?" + params);
  for (const a of page.data) {
    $("accounts").tBodies[0].appendChild(row([a.id, a.name, a.plan, a.status, a.credits_remaining,
      a.credits_used_this_cycle, a.requests], { "data-account": a.id }));
  }
  accountsAfter = page.next_after || "";
  $("more").hidden = !page.has_more;
}

async function operatorView() {
  const [stats, plans] = await Promise.all([api("/admin/stats"), api("/admin/plans")]);
  const figures = [
    ["accounts", "Accounts"], ["credits_used_this_cycle", "Credits used this cycle"],
    ["credits_remaining", "Credits remaining"], ["requests_this_cycle", "Requests this cycle"],
    ["tokens_this_cycle", "Tokens this cycle"], ["requests_lifetime", "Requests, lifetime"],
  ];
  $("stats").replaceChildren(...figures.map(([field, label]) => {
    const pair = el("div");
    pair.append(el("dt", label), el("dd", stats[field], { "data-stat": field, "data-value": JSON.stringify(stats[field]) }));
    return pair;
  }));
  $("plans").tBodies[0].replaceChildren(...plans.data.map((p) =>
    row([p.name, p.monthly_credits, stats.accounts_by_plan[p.name] || 0, p.models.join(" "),
         p.limits.map((l) => `${l.id}: ${l.cap}`).join(", ") || "—"], { "data-plan": p.name })));
  const select = $("filter-plan");
  if (select.options.length === 1) {
    for (const p of plans.data) select.appendChild(el("option", p.name, { value: p.name }));
  }
  await accountsPage(true);
}

async function open() {
  const key = sessionStorage.getItem("gateway-key");
  $("holder").hidden = $("operator").hidden = true;
  $("logout").hidden = !key;
  if (!key) return;
  const operator = !key.startsWith(KEY_PREFIX);
  $("status").textContent = "Loading…";
  try {
    await (operator ? operatorView() : holderView());
    $(operator ? "operator" : "holder").hidden = false;
    $("status").textContent = operator ? "Operator view" : "Your account";
    document.body.dataset.ready = operator ? "operator" : "holder";
  } catch (error) {
    $("status").textContent = "Could not load the dashboard: " + error.message;
    document.body.dataset.ready = "error";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("key")) {
    sessionStorage.setItem("gateway-key", fragment.get("key"));
    history.replaceState(null, "", location.pathname);  // the key leaves the address bar at once
  }
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("gateway-key", $("key").value.trim());
    $("key").value = "";
    open();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem("gateway-key");
    open();
    $("status").textContent = "Signed out.";
  });
  $("filter").addEventListener("submit", (event) => {
    event.preventDefault();
    accountsPage(true);
  });
  $("more").addEventListener("click", () => accountsPage(false));
  open();
});
