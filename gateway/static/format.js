// Shared helpers: the API client, DOM building (textContent only) and human formatting.
"use strict";

export const $ = (id) => document.getElementById(id);

/** An element with text (set as textContent, never parsed as markup) and attributes. */
export function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(name, String(value));
  }
  return node;
}

/** A table cell; `label` is shown before the value when the table is stacked into cards (phones). */
export function cell(text, label, attrs) {
  return el("td", text, { "data-label": label, ...(attrs || {}) });
}

/** Shows `value` formatted by `format` in #id, and keeps the API's raw value in data-value. */
export function show(id, value, format) {
  const node = $(id);
  node.textContent = format ? format(value) : String(value ?? "—");
  node.dataset.value = JSON.stringify(value ?? null);
  return node;
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export async function api(path, options) {
  const key = sessionStorage.getItem("gateway-key");
  const opts = options || {};
  const headers = { Authorization: "Bearer " + key, ...(opts.headers || {}) };
  if (opts.json !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {
    method: opts.method || "GET", headers, cache: "no-store",
    body: opts.json !== undefined ? JSON.stringify(opts.json) : undefined,
  });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const message = (body.error && body.error.message) || ("HTTP " + resp.status);
    throw new ApiError(resp.status, message);
  }
  return body;
}

/** The answer of `path`, or null when the gateway does not have that API (404, e.g. an older version). */
export async function optional(path) {
  try {
    return await api(path);
  } catch (error) {
    if (error.status === 404) return null;
    throw error;
  }
}

/** A random UUID for an Idempotency-Key (crypto.randomUUID needs a secure context: fall back to v4 by hand). */
export function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// ---------------------------------------------------------------- numbers

/** An amount as the APIs give it (a decimal string, or a number before 15.1): a Number, for display only. */
export function num(value) {
  const n = Number(value);
  return Number.isFinite(n) ? n : 0;
}

/** Digits after the point at most: 4 (a balance of 52.3419), and 3 significant ones for small amounts
 *  (0.000018, 0.00282), never more than the 6 a micro-credit has. */
function decimals(n) {
  const a = Math.abs(n);
  if (a === 0 || a >= 1) return 4;
  return Math.min(6, Math.max(4, 2 - Math.floor(Math.log10(a))));
}

function grouped(n, digits, minDigits) {
  return n.toLocaleString("en-US", { minimumFractionDigits: minDigits, maximumFractionDigits: digits });
}

/** Credits for people: thousands separators, 2 to 4 decimals, more (up to 6) only for small amounts. */
export function credits(value) {
  if (value === null || value === undefined || value === "") return "—";
  const n = num(value);
  return grouped(n, decimals(n), 2);
}

/** USD: "$1,234.56" (cents), small amounts with their significant digits ("$0.0012"). */
export function usd(value) {
  if (value === null || value === undefined || value === "") return "—";
  const n = num(value);
  return (n < 0 ? "−$" : "$") + grouped(Math.abs(n), Math.abs(n) >= 1 ? 2 : decimals(n), 2);
}

export function count(value) {
  return num(value).toLocaleString("en-US", { maximumFractionDigits: 0 });
}

/** A compact figure for chart axes: 1.2k, 3.4M. */
export function compact(n) {
  return n.toLocaleString("en-US", { notation: "compact", maximumFractionDigits: 2 });
}

// ---------------------------------------------------------------- dates

/** YYYY-MM-DD of an ISO time, in `timeZone` (the account's billing timezone; UTC by default). */
export function day(iso, timeZone) {
  if (!iso) return "—";
  const parts = new Intl.DateTimeFormat("en-CA", { timeZone: timeZone || "UTC", year: "numeric",
                                                    month: "2-digit", day: "2-digit" }).format(new Date(iso));
  return parts;
}

/** YYYY-MM-DD HH:MM of an ISO time, in `timeZone`. */
export function moment(iso, timeZone) {
  if (!iso) return "never";
  const f = new Intl.DateTimeFormat("en-GB", { timeZone: timeZone || "UTC", hour: "2-digit", minute: "2-digit",
                                               hourCycle: "h23" });
  return `${day(iso, timeZone)} ${f.format(new Date(iso))}`;
}

/** The ISO date `days` after the ISO date `date` (both YYYY-MM-DD, calendar arithmetic in UTC). */
export function addDays(date, days) {
  const d = new Date(date + "T00:00:00Z");
  d.setUTCDate(d.getUTCDate() + days);
  return d.toISOString().slice(0, 10);
}

// ---------------------------------------------------------------- projection

export const PROJECTION = { minDays: 3, minShare: 0.1, minRequests: 20 };

/**
 * Month-end usage at the cycle's pace so far, or why there is none yet. Only once at least 3 days or
 * 10 % of the cycle have passed and 20 requests were made (a burst in the first minutes says nothing
 * about a month), and bounded by what the account can still spend: past that, the date it runs out.
 */
export function projection(used, requests, available, startIso, endIso, nowMs) {
  const start = Date.parse(startIso), end = Date.parse(endIso);
  if (!Number.isFinite(start) || !Number.isFinite(end) || end <= start) return { ready: false, reason: "no cycle" };
  const elapsed = Math.max(0, Math.min(nowMs, end) - start), length = end - start;
  const days = elapsed / 86400000;
  if ((days < PROJECTION.minDays && elapsed < PROJECTION.minShare * length) || requests < PROJECTION.minRequests) {
    return { ready: false, days, requests,
             reason: `A projection appears after ${PROJECTION.minDays} days of the cycle and ` +
                     `${PROJECTION.minRequests} requests (now ${days.toFixed(1)} days, ${count(requests)} requests).` };
  }
  const pace = used / elapsed;  // credits per ms
  const unbounded = used + pace * (end - Math.min(nowMs, end));
  const ceiling = used + Math.max(0, available);
  const runsOut = unbounded > ceiling && pace > 0 ? new Date(Math.min(nowMs, end) + (ceiling - used) / pace) : null;
  return { ready: true, days, requests, perDay: pace * 86400000, value: Math.min(unbounded, ceiling),
           runsOut: runsOut ? runsOut.toISOString() : null };
}
