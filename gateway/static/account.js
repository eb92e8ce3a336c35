// The operator's page for one account (#account=ID): balance, statements, usage, keys, events and actions.
"use strict";

import { drawDaily } from "./chart.js";
import { $, api, cell, count, credits, day, el, moment, optional, show, usd, uuid } from "./format.js";
import { keysTable, modelTable, statementTiles } from "./holder.js";

const state = { id: "", account: null, series: null, statements: [] };

function base() {
  return "/admin/accounts/" + encodeURIComponent(state.id);
}

function statementDetail(s) {
  statementTiles("acct-statement", s, state.account.timezone);
  $("acct-statement-card").dataset.cycle = s.cycle;
  const rows = (s.by_model || []).map((m) => {
    const tr = el("tr", null, { "data-model": m.model });
    tr.append(cell(m.model, "Model"), cell(count(m.requests), "Requests", { class: "num" }),
              cell(credits(m.used), "Credits", { class: "num" }), cell(usd(m.usd), "USD", { class: "num" }));
    return tr;
  });
  $("acct-statement-models").tBodies[0].replaceChildren(...rows);
  $("acct-statement-models").hidden = !rows.length;
}

function statementsList(list) {
  $("acct-statements").tBodies[0].replaceChildren(...list.map((s) => {
    const tr = el("tr", null, { "data-cycle": s.cycle });
    const link = el("button", s.cycle, { type: "button", class: "link" });
    link.addEventListener("click", async () => {
      statementDetail(await api(`${base()}/statements/${encodeURIComponent(s.cycle)}`));
    });
    const first = cell(null, "Cycle");
    first.appendChild(link);
    tr.append(first, cell(s.status, "Status"), cell(credits(s.opening), "Opening", { class: "num" }),
              cell(credits(s.credited), "Credited", { class: "num" }),
              cell(credits(s.used), "Used", { class: "num" }), cell(credits(s.closing), "Closing", { class: "num" }));
    return tr;
  }));
}

function eventText(e) {
  const parts = [];
  if (e.type === "usage") parts.push(`${e.model} · ${count(e.input_tokens)} in / ${count(e.output_tokens)} out`);
  for (const f of ["from", "to", "plan", "note", "reason", "key_id", "pack"]) {
    if (e[f] !== undefined && e[f] !== "" && !(e.type === "usage" && f === "key_id")) parts.push(`${f} ${e[f]}`);
  }
  return parts.join(" · ");
}

function eventsTable(events) {
  $("acct-events").tBodies[0].replaceChildren(...events.map((e) => {
    const tr = el("tr", null, { "data-event": e.id, "data-type": e.type });
    tr.append(cell(moment(e.time, state.account.timezone), "Time", { class: "date" }),
              cell(null, "Event"), cell(eventText(e), "Details", { class: "details" }),
              cell(e.credits === undefined ? "" : credits(e.credits), "Credits", { class: "num" }));
    tr.cells[1].appendChild(el("span", e.type.replace(/_/g, " "), { class: "badge type-" + e.type }));
    return tr;
  }));
}

function accountHeader(a) {
  show("acct-name", a.name || a.id);
  $("acct-id").textContent = a.id + (a.external_id ? ` · external id ${a.external_id}` : "");
  const status = show("acct-status", a.status);
  status.className = "badge status-" + a.status;
  show("acct-available", a.credits_remaining, credits);
  show("acct-allowance", a.allowance_remaining, credits);
  show("acct-limit", a.credits_limit, credits);
  show("acct-purchased", a.purchased_remaining, credits);
  show("acct-used", a.credits_used_this_cycle, credits);
  show("acct-plan", a.plan);
  $("acct-cycle").textContent = `${day(a.cycle_start, a.timezone)} to ${day(a.reset_date, a.timezone)} (${a.timezone})`;
  $("suspend").hidden = a.status !== "active";
  $("reactivate").hidden = a.status !== "suspended";
}

export async function accountView(id) {
  state.id = id;
  const [a, keys, events, plans, statements, current, series] = await Promise.all([
    api(base()), api(`${base()}/keys`), api(`${base()}/events?limit=25`), api("/admin/plans"),
    optional(`${base()}/statements`), optional(`${base()}/statements/current`),
    api(`${base()}/usage/daily?days=30`),
  ]);
  state.account = a;
  state.series = series;
  accountHeader(a);
  $("plan-select").replaceChildren(...plans.data.map((p) => el("option", p.name, { value: p.name })));
  $("plan-select").value = a.plan;
  $("acct-statement-card").hidden = !current;
  if (current) statementDetail(current);
  $("acct-statements-card").hidden = !statements;
  if (statements) statementsList(statements.data);
  drawDaily($("acct-chart"), $("acct-legend"), series.data, series.from, series.to, "credits");
  modelTable($("acct-usage"), series.data);
  const byKey = new Map();
  if (current && current.by_key) for (const k of current.by_key) byKey.set(k.key_id, k.used);
  else for (const k of series.by_key) byKey.set(k.key_id, k.credits);
  keysTable($("acct-keys"), keys.data, byKey, current ? "Used this cycle" : "Used, last 30 days", a.timezone);
  eventsTable(events.data);
  for (const form of document.querySelectorAll("form.action")) form.dataset.idempotencyKey = uuid();
}

/** Runs an action form: POST/PUT its body, report, then show the account again. A form keeps its
 *  Idempotency-Key until the action succeeded, so pressing again after a network error cannot credit twice. */
async function act(form, run) {
  const message = $("action-message");
  const button = form.querySelector("button[type=submit]") || form.querySelector("button");
  button.disabled = true;
  message.className = "message";
  try {
    const done = await run(form.dataset.idempotencyKey);
    form.reset();
    form.dataset.idempotencyKey = uuid();
    await accountView(state.id);
    message.textContent = done;
    message.className = "message ok";
  } catch (error) {
    message.textContent = error.message;
    message.className = "message error";
  } finally {
    button.disabled = false;
    document.body.dataset.action = message.className.includes("ok") ? "ok" : "error";
  }
}

export function wireAccount() {
  window.addEventListener("resize", () => {
    if (state.series && !$("account").hidden) {
      drawDaily($("acct-chart"), $("acct-legend"), state.series.data, state.series.from, state.series.to, "credits");
    }
  });
  $("grant-form").addEventListener("submit", (event) => {
    event.preventDefault();
    act(event.target, async (key) => {
      const amount = $("grant-credits").value.trim();
      const r = await api(`${base()}/credits`, { method: "POST", headers: { "Idempotency-Key": key },
                                                 json: { credits: amount, note: $("grant-note").value } });
      return `Granted ${r.granted ?? amount} credits; available now ${credits(r.credits_remaining)}.`;
    });
  });
  $("adjust-form").addEventListener("submit", (event) => {
    event.preventDefault();
    act(event.target, async (key) => {
      const amount = $("adjust-credits").value.trim();
      const r = await api(`${base()}/adjustments`, { method: "POST", headers: { "Idempotency-Key": key },
                                                     json: { credits: amount, reason: $("adjust-reason").value } });
      return `Adjusted by ${r.credits ?? amount} credits; available now ${credits(r.credits_remaining)}.`;
    });
  });
  $("plan-form").addEventListener("submit", (event) => {
    event.preventDefault();
    act(event.target, async () => {
      const r = await api(`${base()}/plan`, { method: "PUT", json: { plan: $("plan-select").value } });
      return `Plan is now ${r.plan}.`;
    });
  });
  $("status-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const verb = event.submitter && event.submitter.id === "reactivate" ? "reactivate" : "suspend";
    act(event.target, async () => {
      const r = await api(`${base()}/${verb}`, { method: "POST", json: { reason: $("status-reason").value } });
      return `Account ${r.status}.`;
    });
  });
}
