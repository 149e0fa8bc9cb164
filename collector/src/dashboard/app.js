// The results dashboard. It reads the results API with the read token and draws each task's
// released windows as SVG: quantiles with their 95% bands, rates, alerts on the timeline and
// the budget left. No dependencies and no inline script (the page is served under a strict
// Content-Security-Policy); every value from the API enters the DOM as text or an attribute,
// never as markup.
'use strict';

const SVG_NS = 'http://www.w3.org/2000/svg';
const QUANTILES = ['p50', 'p95', 'p99'];
// Stop paging a task's windows after this many (a month of minute windows is 43,200).
const MAX_WINDOWS = 20000;
// Points are drawn as markers (with their values and a tooltip) up to this many per series.
const MAX_MARKERS = 2000;
const REFRESH_MS = 60000;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  e.append(...kids);
  return e;
}

function sv(tag, attrs, ...kids) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  e.append(...kids);
  return e;
}

function title(text) {
  return sv('title', {}, text);
}

async function api(path, token, signal) {
  const r = await fetch(path, {
    headers: { authorization: 'Bearer ' + token, accept: 'application/json' },
    cache: 'no-store',
    signal,
  });
  let body = null;
  try {
    body = await r.json();
  } catch (_) {
    body = null;
  }
  if (!r.ok) {
    throw new Error((body && body.error) || `${path}: HTTP ${r.status}`);
  }
  return body;
}

// Every page of a list (`key` is "windows" or "alerts"), at most MAX_WINDOWS items: past that,
// the oldest are dropped and `truncated` says so.
async function list(path, key, from, to, token, signal) {
  let out = [];
  let truncated = false;
  let page = '';
  do {
    const q = new URLSearchParams({ from: String(from), limit: '5000' });
    if (to) q.set('to', String(to));
    if (page) q.set('page_token', page);
    const r = await api(`${path}?${q}`, token, signal);
    for (const item of r[key]) out.push(item);
    if (out.length > MAX_WINDOWS) {
      out = out.slice(out.length - MAX_WINDOWS);
      truncated = true;
    }
    page = r.next_page_token || '';
  } while (page);
  return { items: out, truncated };
}

function fmtTime(s) {
  return new Date(s * 1000).toISOString().replace('T', ' ').slice(0, 16) + ' UTC';
}

function fmtClock(s, withDay) {
  const iso = new Date(s * 1000).toISOString();
  return withDay ? `${iso.slice(5, 10)} ${iso.slice(11, 16)}` : iso.slice(11, 16);
}

function fmtNum(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return '—';
  if (!Number.isFinite(v)) return v > 0 ? '∞' : '−∞';
  const a = Math.abs(v);
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

function fmtEst(e, unit) {
  if (!e) return '—';
  // Only the upper end of an interval may be open (null in JSON).
  const high = e.ci_high === null ? '∞' : fmtNum(e.ci_high);
  return `${fmtNum(e.value)} [${fmtNum(e.ci_low)}, ${high}]${unit}`;
}

function maxOf(xs, dflt) {
  let m = -Infinity;
  for (const x of xs) if (Number.isFinite(x) && x > m) m = x;
  return m === -Infinity ? dflt : m;
}

function minOf(xs, dflt) {
  let m = Infinity;
  for (const x of xs) if (Number.isFinite(x) && x < m) m = x;
  return m === Infinity ? dflt : m;
}

// A point of a series: window start t, value v, interval [lo, hi] (hi null: open-ended).
function point(t, e, scale) {
  return {
    t,
    v: e.value * scale,
    lo: e.ci_low * scale,
    hi: e.ci_high === null || e.ci_high === undefined ? null : e.ci_high * scale,
    raw: e,
  };
}

function niceLinearTicks(lo, hi) {
  const span = hi - lo || 1;
  const step0 = Math.pow(10, Math.floor(Math.log10(span / 4)));
  const step = [1, 2, 5, 10].map((m) => m * step0).find((s) => span / s <= 6) || step0 * 10;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) ticks.push(v);
  return ticks;
}

function logTicks(lo, hi) {
  const ticks = [];
  for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
    for (const m of [1, 2, 5]) {
      const v = m * Math.pow(10, e);
      if (v >= lo && v <= hi) ticks.push(v);
    }
  }
  return ticks;
}

// One chart: `series` [{name, points}] over window starts [t0, t1] (each window `step` long),
// on a log scale for latencies. Alerts are dashed markers at their window with the explanation
// as the tooltip. Bands whose upper end is open reach the top of the chart.
function chart({ kind, series, t0, t1, step, log, unit, alerts }) {
  const W = 1000, H = 230, L = 58, R = 30, T = 14, B = 24;
  const values = [];
  const lows = [];
  const highs = [];
  for (const s of series) {
    for (const p of s.points) {
      values.push(p.v);
      lows.push(p.lo);
      if (p.hi !== null) highs.push(p.hi);
    }
  }
  const vmax = maxOf(values, 0);
  const vmin = minOf(values, 0);
  let ymin;
  let ymax;
  if (log) {
    // Wide intervals would flatten the lines: the axis reaches at most 4x the largest value.
    ymin = Math.max(minOf(values.concat(lows).filter((v) => v > 0), 0.1) / 1.3, 0.01);
    ymax = Math.min(maxOf(highs, vmax), 4 * Math.max(vmax, ymin));
    ymax = Math.max(ymax * 1.2, ymin * 10);
  } else {
    // From 0 (or the lowest interval end below it) to the highest interval end, but bands at
    // most one spread of the values beyond them, so one wide interval cannot flatten the rest.
    const spread = Math.max(vmax - Math.min(vmin, 0), Math.abs(vmax), 1e-6);
    ymin = Math.min(0, Math.max(minOf(lows, 0), Math.min(vmin, 0) - spread));
    ymax = Math.max(Math.min(maxOf(highs, vmax), vmax + spread), vmax, ymin + 1e-6) * 1.05;
  }
  const span = t1 - t0 || step || 1;
  const x = (t) => L + ((W - L - R) * (t - t0)) / span;
  const y = (v) => {
    const c = Math.min(Math.max(v, ymin), ymax);
    const f = log
      ? (Math.log(c) - Math.log(ymin)) / (Math.log(ymax) - Math.log(ymin))
      : (c - ymin) / (ymax - ymin);
    return T + (H - T - B) * (1 - f);
  };
  const svg = sv('svg', {
    class: `chart chart-${kind}`,
    'data-chart': kind,
    viewBox: `0 0 ${W} ${H}`,
    role: 'img',
  });
  for (const v of log ? logTicks(ymin, ymax) : niceLinearTicks(ymin, ymax)) {
    svg.append(sv('line', { class: 'grid', x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    svg.append(sv('text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end' }, `${fmtNum(v)}${unit}`));
  }
  // Time labels at window starts, at most 7.
  const every = Math.max(1, Math.ceil((t1 - t0) / (step || 1) / 6)) * (step || 1);
  const withDay = t1 - t0 >= 86400;
  for (let t = t0; t <= t1; t += every) {
    svg.append(sv('text', { x: x(t), y: H - 6, 'text-anchor': 'middle' }, fmtClock(t, withDay)));
  }
  for (const s of series) {
    if (!s.points.length) continue;
    const top = T;
    const upper = s.points.map((p) => `${x(p.t)},${p.hi === null ? top : y(p.hi)}`);
    const lower = s.points.map((p) => `${x(p.t)},${y(p.lo)}`).reverse();
    const open = s.points.some((p) => p.hi === null);
    svg.append(
      sv('polygon', {
        class: `band s-${s.name}${open ? ' open' : ''}`,
        'data-series': s.name,
        points: upper.concat(lower).join(' '),
      }),
    );
    svg.append(
      sv('polyline', {
        class: `line s-${s.name}`,
        'data-series': s.name,
        points: s.points.map((p) => `${x(p.t)},${y(p.v)}`).join(' '),
      }),
    );
    for (const p of s.points.length <= MAX_MARKERS ? s.points : []) {
      svg.append(
        sv(
          'circle',
          {
            class: `point s-${s.name}`,
            r: 2.6,
            cx: x(p.t),
            cy: y(p.v),
            'data-series': s.name,
            'data-start': p.t,
            'data-value': p.raw.value,
            'data-low': p.raw.ci_low,
            'data-high': p.raw.ci_high === null ? '' : p.raw.ci_high,
          },
          title(`${s.label || s.name} ${fmtTime(p.t)}: ${fmtEst(p.raw, s.rawUnit || '')}`),
        ),
      );
    }
  }
  for (const a of alerts || []) {
    const ax = x(a.window_start);
    const g = sv('g', { class: 'alert-mark', 'data-start': a.window_start, 'data-detector': a.detector });
    g.append(sv('line', { class: 'alert-marker', x1: ax, x2: ax, y1: T, y2: H - B }));
    g.append(sv('polygon', { class: 'alert-flag', points: `${ax},${T} ${ax + 9},${T + 5} ${ax},${T + 10}` }));
    g.append(title(`${a.detector} at ${fmtTime(a.window_start)}: ${a.explanation}`));
    svg.append(g);
  }
  return svg;
}

function legend(items) {
  return el(
    'div',
    { class: 'legend' },
    ...items.map(([cls, text]) => el('span', {}, el('i', { class: `s-${cls}` }), text)),
  );
}

function isLatency(ws) {
  return ws.some((w) => w.p50_ms || w.p95_ms || w.p99_ms);
}

// The rate series of a task: requests per second for a latency task; for an error counter
// paired with latency tasks, errors over their requests in percent (the interval from the
// error count's noise); else the noisy total per window.
function rateSeries(task, ws, byName) {
  if (task.error_rate_over.length) {
    const pts = [];
    for (const w of ws) {
      if (!w.total) continue;
      let requests = 0;
      let complete = true;
      for (const name of task.error_rate_over) {
        const other = byName.get(name);
        const o = other && other.windows.items.find((x) => x.start === w.start);
        // A request count whose interval reaches 0 would make the rate meaningless.
        if (o && o.total && o.total.ci_low > 0) requests += o.total.value;
        else complete = false;
      }
      if (!complete || requests <= 0) continue;
      const e = {
        value: (100 * w.total.value) / requests,
        ci_low: (100 * w.total.ci_low) / requests,
        ci_high: w.total.ci_high === null ? null : (100 * w.total.ci_high) / requests,
      };
      pts.push(point(w.start, e, 1));
    }
    return { name: 'rate', label: 'error rate', unit: '%', rawUnit: '%', points: pts, what: 'error rate (errors over the requests of ' + task.error_rate_over.join(', ') + ')' };
  }
  const latency = isLatency(ws);
  const pts = ws
    .filter((w) => w.total)
    .map((w) => {
      const per = latency ? 1 / w.duration : 1;
      const e = {
        value: w.total.value * per,
        ci_low: w.total.ci_low * per,
        ci_high: w.total.ci_high === null ? null : w.total.ci_high * per,
      };
      return point(w.start, e, 1);
    });
  return latency
    ? { name: 'rate', label: 'requests/s', unit: '/s', rawUnit: '/s', points: pts, what: 'requests per second' }
    : { name: 'rate', label: 'total', unit: '', rawUnit: '', points: pts, what: 'noisy total per window' };
}

function budgetView(budget) {
  if (budget instanceof Error) {
    return el('div', { class: 'budget', 'data-budget': 'unavailable' }, `budget: ${budget.message}`);
  }
  const box = el('div', { class: 'budget', 'data-budget': 'ok' });
  for (const p of budget.purposes) {
    box.append(
      el(
        'span',
        {
          'data-purpose': p.purpose,
          'data-left': p.left,
          'data-of': p.budget,
          'data-collections-left': p.collections_left,
        },
        `ε left (${p.purpose}): ${fmtNum(p.left)} of ${fmtNum(p.budget)}, ${p.collections_left} collections`,
      ),
    );
  }
  return box;
}

function renderTask(entry, byName) {
  const { task, budget } = entry;
  const ws = entry.windows.items;
  const alerts = entry.alerts.items;
  const sec = el('section', { class: 'task', 'data-task-id': task.task_id, 'data-kind': task.kind });
  const head = el(
    'div',
    { class: 'task-head' },
    el(
      'div',
      {},
      el('h2', {}, task.name),
      el('div', { class: 'meta' }, `${task.kind}, ${task.window_s}-second windows, ${ws.length} released in range`),
    ),
    budgetView(budget),
  );
  sec.append(head);
  if (entry.error) {
    sec.append(el('p', { class: 'error', 'data-error': 'read' }, `Could not read this task: ${entry.error.message}`));
  }
  if (entry.windows.truncated) {
    sec.append(el('p', { class: 'meta' }, `Showing the newest ${ws.length} windows of the range.`));
  }
  if (!ws.length) {
    sec.append(el('p', { class: 'empty' }, 'No window released in this range.'));
    return sec;
  }
  const t0 = ws[0].start;
  const t1 = ws[ws.length - 1].start;
  const step = task.window_s;
  const latest = ws[ws.length - 1];
  const rate = rateSeries(task, ws, byName);
  const newestRate = rate.points.length ? rate.points[rate.points.length - 1] : null;
  const row = [el('td', {}, fmtTime(latest.start)), el('td', {}, latest.reports ? fmtNum(latest.reports.value) : '—')];
  const headCells = ['window', 'reports'];
  if (isLatency(ws)) {
    for (const q of QUANTILES) {
      headCells.push(`${q} ms [95%]`);
      const e = latest[`${q}_ms`];
      const why = (latest.withheld || []).find((r) => r.startsWith(`${q}:`));
      row.push(
        e || !why
          ? el('td', { 'data-latest': q }, fmtEst(e, ''))
          : el('td', { 'data-latest': q, 'data-withheld': 'true', title: why }, 'too few reports'),
      );
    }
  }
  headCells.push(rate.label);
  row.push(el('td', { 'data-latest': 'rate' }, newestRate ? fmtEst(newestRate.raw, rate.rawUnit) : '—'));
  const reasons = latest.withheld || [];
  sec.append(
    el(
      'table',
      { class: 'latest' },
      el('thead', {}, el('tr', {}, ...headCells.map((h) => el('th', {}, h)))),
      el('tbody', {}, el('tr', {}, ...row)),
    ),
  );
  if (reasons.length) {
    sec.append(el('p', { class: 'meta withheld' }, `Withheld in the newest window: ${reasons.join('; ')}`));
  }
  if (isLatency(ws)) {
    const series = QUANTILES.map((q) => ({
      name: q,
      label: q,
      rawUnit: ' ms',
      points: ws.filter((w) => w[`${q}_ms`]).map((w) => point(w.start, w[`${q}_ms`], 1)),
    }));
    sec.append(el('h3', {}, 'Latency quantiles (ms, log scale) with 95% intervals'));
    sec.append(legend(QUANTILES.map((q) => [q, q]).concat([['alert', 'alert']])));
    sec.append(chart({ kind: 'latency', series, t0, t1, step, log: true, unit: '', alerts }));
  }
  sec.append(el('h3', {}, `${rate.what[0].toUpperCase()}${rate.what.slice(1)} with 95% intervals`));
  sec.append(chart({ kind: 'rate', series: [rate], t0, t1, step, log: false, unit: rate.unit, alerts }));
  sec.append(el('h3', {}, `Alerts (${alerts.length})`));
  if (!alerts.length) {
    sec.append(el('p', { class: 'empty' }, 'None in this range.'));
  } else {
    const ul = el('ul', { class: 'alerts' });
    for (const a of alerts) {
      ul.append(
        el(
          'li',
          { class: 'alert', 'data-start': a.window_start, 'data-detector': a.detector },
          el('span', { class: 'when' }, fmtTime(a.window_start)),
          el('span', { class: 'detector' }, `${a.detector}: `),
          el('span', { class: 'explanation' }, a.explanation),
          el('span', { class: 'meta' }, ` (observed ${fmtNum(a.observed)}, baseline ${fmtNum(a.baseline)}, z ${fmtNum(a.statistic)} > ${fmtNum(a.threshold)})`),
        ),
      );
    }
    sec.append(ul);
  }
  return sec;
}

function setStatus(text, state) {
  const s = document.getElementById('status');
  s.textContent = text;
  s.className = state === 'error' ? 'error' : '';
  document.body.dataset.state = state;
}

let token = '';
// Each load has a number; only the newest may write the page, and a newer one aborts it.
let generation = 0;
let inFlight = null;

async function load() {
  const params = new URLSearchParams(location.hash.slice(1));
  const now = Math.floor(Date.now() / 1000);
  const range = Number(document.getElementById('range').value) || 21600;
  const from = params.has('from') ? Number(params.get('from')) : Math.max(0, now - range);
  const to = params.has('to') ? Number(params.get('to')) : 0;
  if (inFlight) inFlight.abort();
  const mine = ++generation;
  const abort = new AbortController();
  inFlight = abort;
  const current = () => mine === generation;
  if (!token) {
    document.getElementById('tasks').replaceChildren();
    setStatus('Enter the results service\'s read token.', 'error');
    return;
  }
  setStatus('Loading…', 'loading');
  try {
    const tasks = await api('/v1/tasks', token, abort.signal);
    tasks.sort((a, b) => a.name.localeCompare(b.name));
    const byName = new Map();
    // One task's failure (a 404, a shed request) shows in its own section only.
    const loaded = await Promise.all(
      tasks.map(async (t) => {
        const path = `/v1/tasks/${encodeURIComponent(t.task_id)}`;
        const [windows, alerts, budget] = await Promise.allSettled([
          list(`${path}/windows`, 'windows', from, to, token, abort.signal),
          list(`${path}/alerts`, 'alerts', from, to, token, abort.signal),
          api(`${path}/budget`, token, abort.signal),
        ]);
        const entry = {
          task: t,
          windows: windows.status === 'fulfilled' ? windows.value : { items: [], truncated: false },
          alerts: alerts.status === 'fulfilled' ? alerts.value : { items: [], truncated: false },
          budget: budget.status === 'fulfilled' ? budget.value : budget.reason,
          error: [windows, alerts].find((r) => r.status === 'rejected')?.reason,
        };
        byName.set(t.name, entry);
        return entry;
      }),
    );
    if (!current()) return;
    document.getElementById('tasks').replaceChildren(...loaded.map((e) => renderTask(e, byName)));
    const nw = loaded.reduce((n, e) => n + e.windows.items.length, 0);
    const na = loaded.reduce((n, e) => n + e.alerts.items.length, 0);
    const failed = loaded.filter((e) => e.error).length;
    setStatus(
      `${loaded.length} tasks, ${nw} windows, ${na} alerts since ${fmtTime(from)}` +
        `${to ? ` until ${fmtTime(to)}` : ''}; updated ${fmtClock(now)} UTC` +
        `${failed ? `; ${failed} tasks could not be read` : ''}`,
      failed ? 'partial' : 'ready',
    );
  } catch (e) {
    if (!current()) return;
    // Nothing read with an old token or range stays on the page.
    document.getElementById('tasks').replaceChildren();
    setStatus(e.message, 'error');
  } finally {
    if (current()) inFlight = null;
  }
}

function start() {
  const params = new URLSearchParams(location.hash.slice(1));
  token = params.get('token') || sessionStorage.getItem('hush-read-token') || '';
  if (params.has('token')) {
    // Keep the token in this tab's session storage, and take it out of the address bar and
    // this tab's history entry (the browser's global history may still have the link).
    sessionStorage.setItem('hush-read-token', token);
    params.delete('token');
    const rest = params.toString();
    history.replaceState(null, '', location.pathname + (rest ? `#${rest}` : ''));
  }
  const input = document.getElementById('token');
  input.value = token;
  document.getElementById('controls').addEventListener('submit', (ev) => {
    ev.preventDefault();
    token = input.value.trim();
    sessionStorage.setItem('hush-read-token', token);
    load();
  });
  document.getElementById('range').addEventListener('change', () => {
    // The menu replaces a range given in the link.
    const params = new URLSearchParams(location.hash.slice(1));
    params.delete('from');
    params.delete('to');
    const rest = params.toString();
    history.replaceState(null, '', location.pathname + (rest ? `#${rest}` : ''));
    load();
  });
  load();
  // A refresh waits while a load is still running.
  setInterval(() => {
    if (!inFlight) load();
  }, REFRESH_MS);
}

document.addEventListener('DOMContentLoaded', start);
