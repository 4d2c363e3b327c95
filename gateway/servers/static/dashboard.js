// The gateway dashboard: polls the admin JSON endpoints (/readyz, /routes, /config, /stats)
// every POLL_MS and redraws. No framework, no build step: the DOM is written with
// textContent only, and the charts are drawn on <canvas>.
"use strict";

const POLL_MS = 2000;
const ALL_METHODS = 7; // a route that lists every method the gateway knows accepts any
const POINTS = 90; // samples kept per chart line: 3 minutes at POLL_MS
const TOKEN_KEY = "gateway-admin-token";
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#be185d", "#4b5563"];
const series = { rate: new Map(), latency: new Map() }; // route name -> [{t, v}]
let routeColors = new Map();

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child == null ? "" : String(child)));
  }
  return node;
}

class Unauthorized extends Error {}

async function getJSON(path) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const resp = await fetch(path, { headers, cache: "no-store" });
  if (resp.status === 401) throw new Unauthorized(path);
  const body = await resp.json();
  return { status: resp.status, body };
}

function fmt(value, digits = 1, unit = "") {
  if (value === null || value === undefined) return "–";
  return `${Number(value).toFixed(digits)}${unit}`;
}

function pct(ratio) {
  return ratio === null || ratio === undefined ? "–" : `${(ratio * 100).toFixed(1)}%`;
}

function badge(text, kind) {
  return el("span", { class: `badge ${kind}` }, text);
}

function showBanner(text) {
  const banner = $("banner");
  banner.textContent = text;
  banner.hidden = !text;
}

async function poll() {
  let ready, routes, config, stats;
  try {
    [ready, routes, config, stats] = await Promise.all(
      ["/readyz", "/routes", "/config", "/stats"].map(getJSON),
    );
  } catch (err) {
    if (err instanceof Unauthorized) {
      $("login").hidden = false;
      $("main").hidden = true;
      showBanner("The admin API needs its token.");
    } else {
      showBanner("The admin listener cannot be reached: the figures below are stale.");
    }
    return;
  }
  $("login").hidden = true;
  $("main").hidden = false;
  if (ready.status !== 200 || !ready.body.ready) {
    const reasons = (ready.body.reasons || []).join("; ");
    showBanner(`Not ready (/readyz ${ready.status})${reasons ? `: ${reasons}` : ""}`);
  } else {
    showBanner("");
  }
  renderConfig(config.body);
  renderRoutes(routes.body.routes || [], stats.body);
  renderCharts(stats.body);
  renderServices(stats.body);
  renderRateLimits(stats.body);
  renderCache(stats.body);
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

function renderConfig(config) {
  const last = config.last_reload || {};
  $("config-file").textContent = config.file || "–";
  $("config-version").textContent = (config.version_hash || "").slice(0, 12) || "–";
  $("config-reload-at").textContent = last.at ? new Date(last.at).toLocaleString() : "–";
  $("config-reload-result").replaceChildren(
    last.ok ? badge("applied", "ok") : badge("rejected", "bad"),
  );
  const box = $("reload-errors");
  const list = $("reload-error-list");
  if (last.ok) {
    box.hidden = true;
    list.replaceChildren();
    return;
  }
  const lines = last.error_lines && last.error_lines.length ? last.error_lines : null;
  const items = lines
    ? lines.map((e) => {
        const gutter = `${e.line} | `;
        const caret = " ".repeat(gutter.length + Math.max(0, e.col - 1)) + "^";
        return el(
          "li", { class: "reload-error" },
          el("span", { class: "where mono" }, `${e.file}:${e.line}:${e.col}: `),
          el("span", { class: "mono" }, `${e.path || "<root>"}: ${e.message}`),
          el("pre", { class: "error-line" }, `${gutter}${e.text}\n${caret}`),
        );
      })
    : (last.errors || []).map((text) => el("li", { class: "reload-error mono" }, text));
  list.replaceChildren(...items);
  box.hidden = false;
}

function renderRoutes(routes, stats) {
  const figures = stats.routes || {};
  const rows = routes.map((route) => {
    const f = figures[route.name] || (stats.window_seconds ? { rate: 0 } : {}); // none yet: 0/s
    const stages = route.stages || [];
    const action = route.action || stages[stages.length - 1] || "forward";
    const row = el(
      "tr", { "data-route": route.name },
      el("td", {}, route.name),
      el("td", { class: "mono" }, route.prefix),
      el("td", {}, (route.methods || []).length >= ALL_METHODS ? "any" : route.methods.join(" ")),
      el("td", {}, action),
      el("td", {}, stages.filter((s) => s !== action).join(" → ") || "–"),
      el("td", { class: "num", "data-field": "rate" }, fmt(f.rate, 2)),
      el("td", { class: "num", "data-field": "errors" }, pct(f.error_ratio)),
      el("td", { class: "num", "data-field": "p50" }, fmt(f.p50_ms, 1, " ms")),
      el("td", { class: "num", "data-field": "p99" }, fmt(f.p99_ms, 1, " ms")),
    );
    return row;
  });
  $("routes").tBodies[0].replaceChildren(...rows);
  routeColors = new Map(routes.map((r, i) => [r.name, COLORS[i % COLORS.length]]));
}

function push(map, name, t, v) {
  if (!map.has(name)) map.set(name, []);
  const points = map.get(name);
  points.push({ t, v });
  while (points.length > POINTS) points.shift();
}

function renderCharts(stats) {
  const t = Date.now();
  for (const [name, f] of Object.entries(stats.routes || {})) {
    if (!routeColors.has(name)) continue; // "none": requests no route matched
    if (f.rate !== null) push(series.rate, name, t, f.rate);
    if (f.p99_ms !== null) push(series.latency, name, t, f.p99_ms);
  }
  $("window").textContent = stats.window_seconds ? `(over ${Math.round(stats.window_seconds)} s)` : "";
  draw($("chart-rate"), series.rate);
  draw($("chart-latency"), series.latency);
  $("legend").replaceChildren(
    ...[...routeColors].map(([name, color]) => {
      const item = el("span", {}, name);
      item.style.setProperty("--swatch", color);
      return item;
    }),
  );
}

function draw(canvas, map) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 44, bottom = 18, top = 8, right = 8;
  ctx.clearRect(0, 0, w, h);
  const now = Date.now(), span = POINTS * POLL_MS;
  let max = 0;
  for (const points of map.values()) for (const p of points) max = Math.max(max, p.v);
  max = max > 0 ? niceCeil(max) : 1;
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7280";
  ctx.strokeStyle = "#e3e6eb";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = top + ((h - top - bottom) * i) / 4;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(w - right, y); ctx.stroke();
    ctx.fillText(formatTick(max * (1 - i / 4)), 4, y + 4);
  }
  ctx.fillText(`-${Math.round(span / 60000)} min`, left, h - 4);
  ctx.fillText("now", w - right - 22, h - 4);
  const x = (t) => left + ((w - left - right) * (t - (now - span))) / span;
  const y = (v) => top + (h - top - bottom) * (1 - v / max);
  ctx.lineWidth = 2;
  for (const [name, points] of map) {
    if (!points.length || !routeColors.has(name)) continue;
    ctx.strokeStyle = routeColors.get(name);
    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(p.v)) : ctx.moveTo(x(p.t), y(p.v))));
    ctx.stroke();
  }
}

function niceCeil(v) {
  const step = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= v) return m * step;
  return 10 * step;
}

function formatTick(v) {
  return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
}

function renderServices(stats) {
  const errors = stats.upstream_errors || {};
  const blocks = Object.entries(stats.services || {}).map(([name, service]) => {
    const recent = (errors[name] && errors[name].recent) || {};
    const total = (errors[name] && errors[name].total) || {};
    const recentText = Object.entries(recent).filter(([, n]) => n > 0).map(([k, n]) => `${k} ${n}`).join(", ");
    const totalText = Object.entries(total).map(([k, n]) => `${k} ${n}`).join(", ");
    const rows = service.targets.map((t) => {
      const health = !service.health_checked ? badge("not checked", "warn")
        : t.healthy ? badge("healthy", "ok") : badge("unhealthy", "bad");
      const circuit = t.circuit === "closed" ? badge("closed", "ok")
        : t.circuit === "open" ? badge("open", "bad") : badge(t.circuit.replace("_", "-"), "warn");
      return el(
        "tr", { "data-target": t.target, "data-health": t.healthy ? "healthy" : "unhealthy", "data-circuit": t.circuit },
        el("td", { class: "mono" }, t.target),
        el("td", {}, health),
        el("td", {}, circuit),
        el("td", { class: "num" }, t.in_flight),
        el("td", { class: "num" }, t.consecutive_failures),
      );
    });
    return el(
      "div", { class: "service", "data-service": name },
      el("h3", {}, name, el("span", { class: "muted" },
        `recent errors: ${recentText || "none"}${totalText ? ` · since start: ${totalText}` : ""}`)),
      el("table", {},
        el("thead", {}, el("tr", {},
          el("th", {}, "Target"), el("th", {}, "Health"), el("th", {}, "Circuit"),
          el("th", { class: "num" }, "In flight"), el("th", { class: "num" }, "Failures in a row"))),
        el("tbody", {}, ...rows)),
    );
  });
  $("services").replaceChildren(...blocks);
}

function renderRateLimits(stats) {
  const panel = $("ratelimit-panel");
  panel.hidden = !(stats.features && stats.features.rate_limit);
  const rows = Object.entries(stats.rate_limited || {}).map(([route, f]) =>
    el("tr", { "data-route": route }, el("td", {}, route),
      el("td", { class: "num" }, fmt(f.rate, 2)), el("td", { class: "num" }, f.total)));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "3", class: "muted" }, "no refusals yet")));
  $("ratelimits").tBodies[0].replaceChildren(...rows);
}

function renderCache(stats) {
  const panel = $("cache-panel");
  const cache = stats.cache || {};
  panel.hidden = !((stats.features && stats.features.cache) || Object.keys(cache).length);
  const rows = Object.entries(cache).map(([route, f]) =>
    el("tr", { "data-route": route }, el("td", {}, route),
      el("td", { class: "num" }, pct(f.recent_hit_ratio)), el("td", { class: "num" }, pct(f.hit_ratio)),
      el("td", { class: "num" }, f.hits), el("td", { class: "num" }, f.misses)));
  $("cache").tBodies[0].replaceChildren(...rows);
}

function start() {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    poll();
  });
  poll();
  setInterval(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
