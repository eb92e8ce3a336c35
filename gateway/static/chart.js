// The usage chart: one stacked bar per day (a colour per model), drawn as SVG by this code (no library).
"use strict";

import { addDays, compact, credits, el, num, usd } from "./format.js";

const NS = "http://www.w3.org/2000/svg";
export const COLOURS = ["#3b5bdb", "#12b886", "#f59f00", "#e8590c", "#ae3ec9", "#1098ad", "#868e96", "#d6336c"];

function svg(tag, attrs, text) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

/** Models by total spend, biggest first: the colour order, shared by the chart, its legend and the table. */
export function modelOrder(rows) {
  const totals = new Map();
  for (const r of rows) totals.set(r.model, (totals.get(r.model) || 0) + num(r.credits_micro ?? num(r.credits) * 1e6));
  return [...totals.entries()].sort((a, b) => b[1] - a[1]).map(([model]) => model);
}

/** A "nice" axis maximum and step for values up to `top`. */
function axis(top) {
  if (top <= 0) return { max: 1, step: 0.25 };
  const raw = top / 4, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  return { max: step * Math.ceil(top / step), step };
}

/**
 * Draws `rows` ({date, model, credits, usd, credits_micro, usd_micro}) for every day from `from` to `to`
 * into the <svg> `target`, in `metric` ("credits" or "usd"); each day's group carries its sums in
 * data attributes (micro units, exact) for tests and assistive text.
 */
export function drawDaily(target, legend, rows, from, to, metric) {
  const width = Math.max(280, Math.floor(target.parentNode.clientWidth || 640));
  const height = width < 500 ? 200 : 240;
  const pad = { left: 52, right: 8, top: 12, bottom: 26 };
  const days = [];
  for (let d = from; d <= to; d = addDays(d, 1)) days.push(d);
  const models = modelOrder(rows);
  const colour = (m) => COLOURS[models.indexOf(m) % COLOURS.length];
  const value = (r) => num(metric === "usd" ? r.usd : r.credits);
  const byDay = new Map(days.map((d) => [d, []]));
  for (const r of rows) if (byDay.has(r.date)) byDay.get(r.date).push(r);
  const totals = days.map((d) => byDay.get(d).reduce((s, r) => s + value(r), 0));
  const { max, step } = axis(Math.max(0, ...totals));
  const plotW = width - pad.left - pad.right, plotH = height - pad.top - pad.bottom;
  const y = (v) => pad.top + plotH - (plotH * v) / max;
  target.replaceChildren();
  target.setAttribute("viewBox", `0 0 ${width} ${height}`);
  target.setAttribute("width", width);
  target.setAttribute("height", height);
  const fmt = metric === "usd" ? usd : credits;
  const lead = Math.ceil(-Math.log10(step) - 1e-9), scaled = step * 10 ** lead;  // 0.0025 -> 3, 2.5
  const digits = Math.max(0, lead + (Math.abs(scaled - Math.round(scaled)) > 1e-6 ? 1 : 0));
  const tick = (v) => (metric === "usd" ? "$" : "") + (v >= 1000 ? compact(v) : v.toFixed(Math.min(digits, 6)));
  for (let i = 0; i * step <= max + step / 2; i++) {
    const v = i * step;
    target.appendChild(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(v), y2: y(v), class: "grid" }));
    target.appendChild(svg("text", { x: pad.left - 6, y: y(v) + 4, class: "axis", "text-anchor": "end" }, tick(v)));
  }
  const slot = plotW / days.length, bar = Math.max(2, Math.min(28, slot * 0.7));
  const every = Math.ceil(days.length / Math.max(1, Math.floor(plotW / 64)));
  days.forEach((d, i) => {
    const x = pad.left + i * slot + (slot - bar) / 2;
    const dayRows = byDay.get(d);
    const group = svg("g", { class: "chart-day", "data-date": d,
                             "data-credits-micro": dayRows.reduce((s, r) => s + num(r.credits_micro), 0),
                             "data-usd-micro": dayRows.reduce((s, r) => s + num(r.usd_micro), 0) });
    group.appendChild(svg("title", {}, `${d}: ${fmt(totals[i])}` +
                          dayRows.map((r) => `\n${r.model}: ${fmt(value(r))}`).join("")));
    let base = 0;
    for (const m of models) {
      const r = dayRows.find((row) => row.model === m);
      if (!r || value(r) <= 0) continue;
      const h = Math.max(1, y(base) - y(base + value(r)));
      group.appendChild(svg("rect", { x, y: y(base) - h, width: bar, height: h, fill: colour(m), rx: 2,
                                      "data-model": m }));
      base += value(r);
    }
    target.appendChild(group);
    if (i % every === 0 || i === days.length - 1 && days.length < 8) {
      target.appendChild(svg("text", { x: x + bar / 2, y: height - 8, class: "axis", "text-anchor": "middle" },
                             d.slice(5)));
    }
  });
  target.appendChild(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(0), y2: y(0), class: "baseline" }));
  legend.replaceChildren(...models.map((m) => {
    const item = el("li");
    item.append(el("span", null, { class: "swatch", "data-colour": COLOURS[models.indexOf(m) % COLOURS.length] }),
                el("span", m));
    return item;
  }));
  // colours come from the palette, set as a property (no inline style attribute: the CSP forbids them)
  for (const swatch of legend.querySelectorAll(".swatch")) swatch.style.background = swatch.dataset.colour;
  if (!rows.length) {
    target.appendChild(svg("text", { x: pad.left + plotW / 2, y: pad.top + plotH / 2, class: "empty",
                                     "text-anchor": "middle" }, "No usage in this period."));
  }
}
