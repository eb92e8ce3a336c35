// The key holder's view: balance, current statement, usage per day and model, projection, keys, alerts.
"use strict";

import { drawDaily, modelOrder, COLOURS } from "./chart.js";
import { $, api, cell, count, credits, day, el, moment, num, optional, projection, show, usd } from "./format.js";

const state = { days: 30, metric: "credits", series: null, timezone: "UTC" };

/** The rows of a usage-by-model table from the daily series (summed over its days). */
export function modelTotals(rows) {
  const totals = new Map();
  for (const r of rows) {
    const t = totals.get(r.model) || { model: r.model, requests: 0, input_tokens: 0, output_tokens: 0,
                                       credits_micro: 0, usd_micro: 0 };
    t.requests += r.requests;
    t.input_tokens += r.input_tokens;
    t.output_tokens += r.output_tokens;
    t.credits_micro += num(r.credits_micro);
    t.usd_micro += num(r.usd_micro);
    totals.set(r.model, t);
  }
  return modelOrder(rows).map((m) => totals.get(m));
}

/** Fills the usage-by-model table `table` (and its total row) from the daily series. */
export function modelTable(table, rows) {
  const order = modelOrder(rows);
  const body = modelTotals(rows).map((t) => {
    const tr = el("tr", null, { "data-model": t.model, "data-credits-micro": t.credits_micro,
                                "data-usd-micro": t.usd_micro });
    const name = cell(null, "Model", { class: "model" });
    const swatch = el("span", null, { class: "swatch" });
    swatch.style.background = COLOURS[order.indexOf(t.model) % COLOURS.length];
    const label = el("span", null, { class: "model-name" });
    label.append(swatch, el("span", t.model));
    name.appendChild(label);
    tr.append(name, cell(count(t.requests), "Requests", { class: "num" }),
              cell(count(t.input_tokens), "Tokens in", { class: "num" }),
              cell(count(t.output_tokens), "Tokens out", { class: "num" }),
              cell(credits(t.credits_micro / 1e6), "Credits", { class: "num" }),
              cell(usd(t.usd_micro / 1e6), "USD", { class: "num" }));
    return tr;
  });
  if (!body.length) body.push(el("tr", null, {}));
  if (!rows.length) body[0].appendChild(el("td", "No usage in this period.", { colspan: 6, class: "empty" }));
  table.tBodies[0].replaceChildren(...body);
  const sum = (f) => modelTotals(rows).reduce((s, t) => s + t[f], 0);
  const foot = el("tr");
  foot.append(cell("Total", "Model"), cell(count(sum("requests")), "Requests", { class: "num" }),
              cell(count(sum("input_tokens")), "Tokens in", { class: "num" }),
              cell(count(sum("output_tokens")), "Tokens out", { class: "num" }),
              cell(credits(sum("credits_micro") / 1e6), "Credits", { class: "num", "data-total": "credits" }),
              cell(usd(sum("usd_micro") / 1e6), "USD", { class: "num" }));
  table.tFoot.replaceChildren(foot);
}

/** A statement's four figures into the tiles under `prefix` (opening, credited, used, closing). */
export function statementTiles(prefix, statement, timezone) {
  for (const f of ["opening", "credited", "used", "closing"]) show(`${prefix}-${f}`, statement[f], credits);
  $(`${prefix}-period`).textContent = `${statement.cycle} · ${day(statement.start, timezone)} to ` +
    `${day(statement.end, timezone)} · ${statement.status === "open" ? "open" : "closed"}`;
}

/** The keys table: usage this cycle and budgets where the gateway has them. */
export function keysTable(table, keys, spentBy, spentLabel, timezone) {
  table.tHead.rows[0].cells[4].textContent = spentLabel;
  table.tBodies[0].replaceChildren(...keys.map((k) => {
    const tr = el("tr", null, { "data-key": k.id });
    const name = cell(null, "Key");
    name.append(el("code", k.prefix + "…"), el("span", k.label || "", { class: "sub" }));
    const budget = k.budget_credits_per_cycle ?? k.budget_credits_lifetime;
    const used = k.spent_this_cycle ?? spentBy.get(k.id);  // null without a budget: the statement says
    const remaining = cell(k.budget_remaining === null || k.budget_remaining === undefined ? "—"
                           : credits(k.budget_remaining), "Budget left", { class: "num" });
    remaining.dataset.value = JSON.stringify(k.budget_remaining ?? null);
    const spent = cell(used === undefined ? "—" : credits(used), spentLabel, { class: "num" });
    spent.dataset.value = JSON.stringify(used ?? null);
    tr.append(name, cell(k.status, "Status", { class: "status-" + k.status }),
              cell(k.scopes && k.scopes.length ? k.scopes.join(" ") : "all", "Scopes"),
              cell(moment(k.last_used_at, timezone), "Last used"), spent,
              cell(budget === null || budget === undefined ? "none"
                   : credits(budget) + (k.budget_credits_per_cycle != null ? " / cycle" : " lifetime"), "Budget",
                   { class: "num" }),
              remaining);
    return tr;
  }));
}

function renderProjection(c) {
  const p = projection(num(c.credits_used_this_cycle), c.requests_this_cycle, num(c.credits_remaining),
                       c.cycle_start, c.reset_date, Date.now());
  const node = $("projection");
  node.dataset.ready = String(p.ready);
  if (!p.ready) {
    node.textContent = p.reason;
    return;
  }
  node.dataset.value = JSON.stringify(p.value);
  const basis = `based on ${credits(c.credits_used_this_cycle)} credits over ${p.days.toFixed(1)} days ` +
                `(${count(p.requests)} requests, ${credits(p.perDay)} a day)`;
  node.textContent = p.runsOut
    ? `At this pace your credits run out around ${day(p.runsOut, state.timezone)}, ${basis}.`
    : `At this pace: about ${credits(p.value)} credits by ${day(c.reset_date, state.timezone)}, ${basis}.`;
}

async function drawUsage() {
  const s = state.series;
  drawDaily($("daily-chart"), $("daily-legend"), s.data, s.from, s.to, state.metric);
  modelTable($("usage-table"), s.data);
  $("usage-period").textContent = `${s.from} to ${s.to} (${s.timezone})` +
    (s.truncated ? ` · complete from ${s.complete_from}` : "");
}

async function loadSeries() {
  state.series = await api(`/gateway/usage/daily?days=${state.days}`);
  await drawUsage();
}

export async function holderView() {
  const [c, alerts, keys, statement] = await Promise.all([
    api("/gateway/credits"), api("/gateway/alerts"), api("/gateway/keys"), optional("/gateway/statements/current"),
  ]);
  state.timezone = c.timezone || "UTC";
  show("credits-remaining", c.credits_remaining, credits);
  show("allowance-remaining", c.allowance_remaining, credits);
  show("credits-limit", c.credits_limit, credits);
  show("purchased-remaining", c.purchased_remaining, credits);
  show("used-cycle", c.credits_used_this_cycle, credits);
  show("requests-cycle", c.requests_this_cycle, count);
  const share = num(c.credits_limit) > 0 ? (100 * num(c.allowance_remaining)) / num(c.credits_limit) : 100;
  const bounded = Math.min(100, Math.max(0, share));
  show("allowance-percent", Math.round(bounded * 10) / 10, (v) => v.toFixed(1) + " %");
  $("credits-bar").style.width = bounded + "%";
  $("credits-bar").classList.toggle("low", bounded < 25);
  show("plan", c.plan);
  show("cycle-start", c.cycle_start, (v) => day(v, state.timezone));
  show("reset-date", c.reset_date, (v) => day(v, state.timezone));
  $("days-left").textContent = `${c.days_until_reset} day${c.days_until_reset === 1 ? "" : "s"} left`;
  $("warnings").replaceChildren(...c.warnings.map((w) => el("li", w)));
  renderProjection(c);

  $("holder-statement").hidden = !statement;
  if (statement) statementTiles("statement", statement, state.timezone);

  await loadSeries();
  const byKey = new Map();
  let label = "Used this cycle";
  if (statement && statement.by_key) for (const k of statement.by_key) byKey.set(k.key_id, k.used);
  else if (!keys.data.some((k) => k.spent_this_cycle !== undefined)) {
    for (const k of state.series.by_key) byKey.set(k.key_id, k.credits);
    label = `Used, last ${state.days} days`;
  }
  keysTable($("keys"), keys.data, byKey, label, state.timezone);

  $("alerts").replaceChildren(...alerts.data.map((a) => {
    const li = el("li", null, { "data-alert": a.id, class: a.read ? "read" : "unread" });
    li.append(el("time", moment(new Date(a.created_ms).toISOString(), state.timezone)), el("span", a.message));
    if (!a.read) {
      const button = el("button", "Mark read", { type: "button", class: "link" });
      button.addEventListener("click", async () => {
        await api(`/gateway/alerts/${encodeURIComponent(a.id)}/read`, { method: "POST" });
        await holderView();
      });
      li.appendChild(button);
    }
    return li;
  }));
  if (!alerts.data.length) $("alerts").appendChild(el("li", "No alerts.", { class: "empty" }));
}

export function wireHolder() {
  $("usage-days").addEventListener("change", async (event) => {
    state.days = Number(event.target.value);
    await loadSeries();
  });
  for (const button of document.querySelectorAll("#usage-metric button")) {
    button.addEventListener("click", () => {
      state.metric = button.value;
      for (const b of document.querySelectorAll("#usage-metric button")) b.setAttribute("aria-pressed", String(b === button));
      if (state.series) drawUsage();
    });
  }
  window.addEventListener("resize", () => { if (state.series && !$("holder").hidden) drawUsage(); });
}
