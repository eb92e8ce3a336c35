// The operator's overview: platform figures, plans (in plans.yaml's units) and a sortable, filterable account list.
"use strict";

import { $, api, cell, count, credits, day, el, num, show, usd } from "./format.js";

const PAGE = 500, MAX_ACCOUNTS = 2000;  // the list loads up to 2,000 accounts, then "Load more"
const state = { accounts: [], after: "", more: false, sort: "name", dir: 1, plans: [] };

/** A limit of plans.yaml as plans.yaml says it: "$100 / cycle", "10 credits / 5h", "600 requests / minute". */
export function limitText(l) {
  const windows = { 0: "cycle", "-1": "at once", 60000: "minute", 86400000: "day" };
  const amount = l.unit === "USD" ? usd(l.cap) : l.unit === "credits" ? `${credits(l.cap)} credits`
    : `${count(l.cap)} ${l.unit}`;
  let per = windows[l.window_ms];
  if (per === undefined) per = l.id.startsWith("spend_") ? l.id.slice(6) : `${l.window_ms / 1000} s`;
  return `${l.provider ? l.provider + " " : ""}${amount} ${per === "at once" ? "at once" : "/ " + per}`;
}

function plansTable(plans, byPlan) {
  $("plans").tBodies[0].replaceChildren(...plans.map((p) => {
    const tr = el("tr", null, { "data-plan": p.name });
    const name = cell(null, "Plan");
    name.append(el("b", p.name));
    if (p.default) name.append(el("span", "default", { class: "badge" }));
    const limits = cell(null, "Limits", { class: "limits" });
    for (const l of p.limits) limits.appendChild(el("span", limitText(l), { class: "chip", "data-limit": l.id }));
    if (!p.limits.length) limits.textContent = "—";
    tr.append(name, cell(credits(p.monthly_credits), "Credits / cycle", { class: "num", "data-value":
                JSON.stringify(p.monthly_credits) }),
              cell(usd(p.credit_usd), "1 credit", { class: "num" }),
              cell(p.markup === undefined ? "—" : "× " + p.markup, "Markup", { class: "num" }),
              cell(count(byPlan[p.name] || 0), "Accounts", { class: "num" }),
              cell(p.models.join(", "), "Models", { class: "models" }), limits);
    return tr;
  }));
}

const SORTS = {
  name: (a) => (a.name || "").toLowerCase(), plan: (a) => a.plan, status: (a) => a.status,
  remaining: (a) => num(a.credits_remaining), used: (a) => num(a.credits_used_this_cycle),
  requests: (a) => a.requests_this_cycle, created: (a) => a.created_at,
};

/** The loaded accounts that pass the filters, in the chosen order. */
function visible() {
  const text = $("filter-text").value.trim().toLowerCase();
  const plan = $("filter-plan").value, status = $("filter-status").value;
  const min = $("filter-min").value === "" ? -Infinity : Number($("filter-min").value);
  const max = $("filter-max").value === "" ? Infinity : Number($("filter-max").value);
  const key = SORTS[state.sort];
  return state.accounts.filter((a) =>
    (!text || [a.name, a.id, a.external_id].some((v) => v && String(v).toLowerCase().includes(text)))
    && (!plan || a.plan === plan) && (!status || a.status === status)
    && num(a.credits_remaining) >= min && num(a.credits_remaining) <= max)
    .sort((a, b) => {
      const x = key(a), y = key(b);
      return (x < y ? -1 : x > y ? 1 : a.id < b.id ? -1 : 1) * state.dir;
    });
}

export function renderAccounts() {
  const rows = visible();
  $("accounts").tBodies[0].replaceChildren(...rows.map((a) => {
    const tr = el("tr", null, { "data-account": a.id });
    const name = cell(null, "Account", { class: "account" });
    name.append(el("a", a.name || a.id, { href: "#account=" + encodeURIComponent(a.id) }),
                el("span", a.id + (a.external_id ? " · " + a.external_id : ""), { class: "sub" }));
    tr.append(name, cell(a.plan, "Plan"), cell(null, "Status"),
              cell(credits(a.credits_remaining), "Available", { class: "num", "data-value":
                JSON.stringify(a.credits_remaining) }),
              cell(credits(a.credits_used_this_cycle), "Used this cycle", { class: "num" }),
              cell(count(a.requests_this_cycle), "Requests", { class: "num" }),
              cell(day(a.created_at, a.timezone), "Created", { class: "date" }));
    tr.cells[2].appendChild(el("span", a.status, { class: "badge status-" + a.status }));
    return tr;
  }));
  if (!rows.length) {
    $("accounts").tBodies[0].appendChild(el("tr")).appendChild(el("td", "No account matches.", { colspan: 7,
                                                                                              class: "empty" }));
  }
  $("accounts-count").textContent = `${count(rows.length)} of ${count(state.accounts.length)} loaded` +
    (state.more ? " (more on the server)" : "");
  for (const th of $("accounts").tHead.querySelectorAll("th[data-sort]")) {
    th.setAttribute("aria-sort", th.dataset.sort === state.sort ? (state.dir > 0 ? "ascending" : "descending")
                    : "none");
  }
  $("more").hidden = !state.more;
}

async function loadAccounts(reset) {
  if (reset) {
    state.accounts = [];
    state.after = "";
  }
  let loaded = 0;
  do {
    const page = await api("/admin/accounts?" + new URLSearchParams({ limit: String(PAGE), after: state.after }));
    state.accounts.push(...page.data);
    loaded += page.data.length;
    state.after = page.next_after || "";
    state.more = page.has_more;
  } while (state.more && loaded < MAX_ACCOUNTS);
  renderAccounts();
}

export async function operatorView() {
  const [stats, plans] = await Promise.all([api("/admin/stats"), api("/admin/plans")]);
  state.plans = plans.data;
  const figures = [
    ["accounts", "Accounts", count], ["credits_used_this_cycle", "Credits used this cycle", credits],
    ["credits_remaining", "Credits available", credits], ["requests_this_cycle", "Requests this cycle", count],
    ["tokens_this_cycle", "Tokens this cycle", count], ["requests_lifetime", "Requests, lifetime", count],
  ];
  $("stats").replaceChildren(...figures.map(([field, label, format]) => {
    const tile = el("div", null, { class: "tile" });
    tile.append(el("dt", label), el("dd", format(stats[field]), { "data-stat": field,
                                                                  "data-value": JSON.stringify(stats[field]) }));
    return tile;
  }));
  plansTable(plans.data, stats.accounts_by_plan || {});
  const select = $("filter-plan");
  select.replaceChildren(el("option", "All plans", { value: "" }),
                         ...plans.data.map((p) => el("option", p.name, { value: p.name })));
  await loadAccounts(true);
}

export function wireOperator() {
  for (const id of ["filter-text", "filter-plan", "filter-status", "filter-min", "filter-max"]) {
    $(id).addEventListener("input", renderAccounts);
  }
  $("filter").addEventListener("submit", (event) => event.preventDefault());
  for (const th of $("accounts").tHead.querySelectorAll("th[data-sort]")) {
    const button = th.querySelector("button");
    button.addEventListener("click", () => {
      state.dir = state.sort === th.dataset.sort ? -state.dir : (["name", "plan", "status"].includes(th.dataset.sort)
                                                                 ? 1 : -1);
      state.sort = th.dataset.sort;
      renderAccounts();
    });
  }
  $("more").addEventListener("click", () => loadAccounts(false));
}

export function plansKnown() {
  return state.plans;
}
