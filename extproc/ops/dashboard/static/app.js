// The dashboard page: polls the JSON API every 2 s and draws it with plain DOM and inline SVG.
// Everything on screen is also kept in window.extproc (the last API answers) and, for tables and
// charts, in data-* attributes holding the raw numbers, so a test or a script reads exactly what
// the page shows. Texts from Redis (prompts, answers, reasons) are only ever set as text nodes.
"use strict";

const POLL_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";
const TOKEN_KEY = "extproc-dashboard-token";
const VERBS = {
  pause: ["Pause", "Hold the current stage; the weights stay as they are."],
  resume: ["Resume", "Continue the paused rollout from its current stage."],
  promote: ["Promote", "Move to the next stage now, without waiting for the guardrails."],
  rollback: ["Roll back", "Send all traffic to the stable variant; every sidecar follows within a second."],
  abort: ["Abort", "End the rollout: all traffic to the stable variant; it cannot be resumed (Restart starts over)."],
  restart: ["Restart", "Start a new attempt from the first stage with fresh evidence; the ended one stays in the decisions."],
};
// Charts in this order first; any other figure the API sends (quality scores, judge win rates)
// gets a chart of its own when it has data. Token totals are drawn per request instead. Names
// and units come from the API (extproc/ops/figures.py), as do the table's texts: the page shows
// figures exactly as `extproc status` prints them, and never rounds one itself.
const CHARTS = [
  "window_requests", "latency_ms.p50", "latency_ms.p95", "latency_ms.p99", "ttft_ms.p50",
  "error_rate", "client_error_rate", "timeout_rate", "tokens_per_request", "output_tokens_per_s",
  "answer_chars_mean", "refusal_rate", "tool_call_rate", "empty_answer_rate", "json_invalid_rate",
  "cost_per_request", "cached_prompt_tokens",
];
const NOT_CHARTED = new Set(["errors", "client_errors", "prompt_tokens", "completion_tokens"]);
const COLOURS = ["#3b6ea5", "#d9822b", "#4c9a2a", "#a23b72", "#6b5b95", "#c0392b"];

const state = { overview: null, experiment: null, series: null, pairs: null, updated: null, error: null };
window.extproc = state;
const drawn = {};
let selected = new URLSearchParams(location.search).get("experiment");
// The charts' range in seconds ("" : every event `extproc status` summarises); the server sizes
// the buckets to it (about 60 per range), so a 2% canary's line is not one request per point.
let span = "";
let timer = null;

// --- small helpers ------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  return fill(node, attrs, children);
}

function svg(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

function fill(node, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function $(id) {
  return document.getElementById(id);
}

function label(key) {
  const labels = (state.series && state.series.labels) || {};
  return labels[key] || key.replaceAll("_", " ").replaceAll(".", " ");
}

function isRate(key) {
  return /rate$/.test(key);
}

// Axis ticks: short, the unit is in the chart's caption (scale marks, not figures: a figure's
// text always comes from the API).
function tick(key, v) {
  if (isRate(key)) return `${+(100 * v).toPrecision(3)}%`;
  if (v !== 0 && Math.abs(v) < 0.01) return v.toExponential(1);
  return String(+v.toPrecision(3));
}

function clock(t, seconds = true) {
  return new Date(t * 1000).toLocaleTimeString("en-GB").slice(0, seconds ? 8 : 5);
}

function duration(s) {
  return s < 120 ? `${s} s` : s < 7200 ? `${+(s / 60).toFixed(1)} min` : `${+(s / 3600).toFixed(1)} h`;
}

// Stable first, so it keeps the first colour whatever order the experiment file lists.
function variantOrder(exp) {
  const names = Object.keys(exp.variants);
  return [exp.stable, ...names.filter((v) => v !== exp.stable)];
}

function colour(variant, variants) {
  const i = variants.indexOf(variant);
  return COLOURS[(i < 0 ? variants.length : i) % COLOURS.length];
}

function badge(text, kind) {
  return el("span", { class: `badge ${kind || text}` }, text);
}

function weightsText(weights) {
  return Object.entries(weights || {}).map(([v, w]) => `${v} ${w}%`).join(", ");
}

// Redraw a part only when its data changed: polling then costs no DOM work while nothing moves,
// and a reader's scroll position or text selection survives the refresh.
function draw(id, data, render) {
  const key = JSON.stringify(data);
  if (drawn[id] === key) return;
  drawn[id] = key;
  $(id).replaceChildren(...[render(data)].flat(Infinity).filter((n) => n !== null && n !== undefined));
}

// --- token --------------------------------------------------------------------------------------

// Taken on load and on every hash change: a `#token=` link opened in a tab already on the page
// changes only the fragment, and the page must not need a reload to use it.
function takeTokenFromUrl() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("token")) {
    sessionStorage.setItem(TOKEN_KEY, params.get("token"));
    history.replaceState(null, "", location.pathname + location.search);
    return true;
  }
  return false;
}

// --- API ----------------------------------------------------------------------------------------

async function bodyOf(resp) {
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error || `${resp.status} ${resp.statusText}`);
  return body;
}

async function getJson(path) {
  return bodyOf(await fetch(path, { headers: { Accept: "application/json" } }));
}

// Captured prompts and answers are users' texts: the server gives them only with the token.
async function getPairs(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return { locked: true };
  const resp = await fetch(path, { headers: { Accept: "application/json", Authorization: `Bearer ${token}` } });
  return resp.status === 401 ? { locked: true } : bodyOf(resp);
}

// One poll loop however often refresh() is called (after an action, on a click): each run
// replaces the pending timer.
async function refresh() {
  clearTimeout(timer);
  try {
    const overview = await getJson("/api/status");
    const names = overview.experiments.map((e) => e.name);
    if (!names.includes(selected)) selected = names[0] || null;
    let experiment = null;
    let series = null;
    let pairs = null;
    if (selected) {
      const base = `/api/experiments/${encodeURIComponent(selected)}`;
      [experiment, series, pairs] = await Promise.all([
        getJson(base), getJson(`${base}/series${span ? `?span=${span}` : ""}`), getPairs(`${base}/pairs`),
      ]);
    }
    clockOffset = overview.time - Date.now() / 1000;
    Object.assign(state, { overview, experiment, series, pairs, updated: Date.now() / 1000, error: null });
    render();
  } catch (err) {
    state.error = String(err.message || err);
    $("problem").textContent = `Cannot refresh: ${state.error}`;
    $("problem").hidden = false;
  } finally {
    clearTimeout(timer);
    timer = setTimeout(refresh, POLL_MS);
  }
}

// --- rendering ----------------------------------------------------------------------------------

function render() {
  $("problem").hidden = true;
  $("updated").textContent = `updated ${clock(state.updated)}`;
  draw("experiments", [state.overview.experiments, selected], renderNav);
  if (!state.experiment) {
    $("summary").replaceChildren(el("p", {}, "No experiment in Redis yet: start one with `extproc up`."));
    $("actions").replaceChildren();
    delete drawn.summary;
    delete drawn.actions;
    return;
  }
  const exp = state.experiment;
  const processes = [state.overview.sidecars.map((s) => s.routing_version), state.overview.evaluators.map((e) => [e.instance, e.active])];
  // The rollout's clock fields move on every evaluator tick; the summary shows none of them.
  const ro = exp.rollout && { status: exp.rollout.status, stage: exp.rollout.stage, stage_started: exp.rollout.stage_started };
  draw("summary", [exp.experiment, ro, exp.routing, exp.ladder && exp.ladder.phase, exp.traffic, exp.srm, processes], renderSummary);
  // The ladder's clock moves between polls on its own (tickLadder): its moving texts are no
  // reason to redraw it.
  const still = exp.ladder && { ...exp.ladder, progress: exp.ladder.progress && { ...exp.ladder.progress, now: null, seconds: null, text: { ...exp.ladder.progress.text, time: null, left: null } } };
  draw("ladder", still, renderLadder);
  tickLadder();
  draw("actions", [exp.experiment, exp.actions], renderActions);
  $("decision-card").hidden = !exp.decision.length;
  draw("decision", exp.decision, renderDecision);
  draw("comparison", exp.comparison, renderComparison);
  draw("checks", exp.comparison.checks, renderChecks);
  draw("timeline", exp.timeline, renderTimeline);
  draw("charts", [state.series, exp.timeline, variantOrder(exp), exp.limits], renderCharts);
  draw("pairs", state.pairs, renderPairs);
}

// An A/B run's stated decision: the evaluator's text, line by line (the first states it).
function renderDecision(lines) {
  return lines.map((line, i) => el(i ? "p" : "h3", { class: i ? "decision-metric" : "decision-verdict" }, line.trim()));
}

function renderNav([experiments]) {
  return experiments.map((e) => {
    const link = el("a", {
      href: `?experiment=${encodeURIComponent(e.name)}`,
      class: e.name === selected ? "current" : null,
      "data-experiment": e.name,
    }, e.name, " ", badge(e.status || "no evaluator", e.status || "unknown"));
    link.addEventListener("click", (ev) => {
      ev.preventDefault();
      selected = e.name;
      history.replaceState(null, "", `?experiment=${encodeURIComponent(e.name)}`);
      refresh();
    });
    return link;
  });
}

function renderSummary() {
  const exp = state.experiment;
  const ro = exp.rollout;
  const routing = exp.routing || {};
  const variants = variantOrder(exp);
  const stage = exp.ladder
    ? `${exp.ladder.phase}${exp.ladder.attempt ? ` · attempt ${exp.ladder.attempt}` : ""} · since ${clock(ro.stage_started)}`
    : ro ? `${ro.status}${(exp.phases || []).length ? ` · phase ${ro.phase + 1} of ${exp.phases.length} (${exp.phases[ro.phase].name}, ${ro.strategy})` : ""} since ${clock(ro.stage_started)}` : "no rollout state yet";
  const bar = el("div", { class: "weights", "data-weights": JSON.stringify(routing.weights || {}) },
    variants.map((v) => [v, (routing.weights || {})[v] || 0]).filter(([, w]) => w > 0).map(([v, w]) => {
      const seg = el("span", { class: "segment", title: `${v} ${w}%` }, `${v} ${w}%`);
      seg.style.flexGrow = w;
      seg.style.background = colour(v, variants);
      return seg;
    }));
  // A fleet sidecar (experiment "*") serves every experiment, each at its own routing version.
  const fleetVersion = (s) => {
    try { return JSON.parse(s.versions || "{}")[exp.experiment]; } catch (e) { return undefined; }
  };
  const versionOf = (s) => (s.experiment === "*" ? fleetVersion(s) : s.routing_version);
  const sidecars = state.overview.sidecars.filter((s) => !s.experiment || s.experiment === exp.experiment
    || (s.experiment === "*" && fleetVersion(s) !== undefined));
  const versions = [...new Set(sidecars.map(versionOf))].join(", ");
  const active = state.overview.evaluators.filter((e) => e.experiment === exp.experiment && e.active);
  const srm = exp.srm && exp.srm.mismatch
    ? el("p", { id: "srm", class: "banner fail", role: "alert" },
      el("strong", {}, "Sample ratio mismatch: "),
      `assignment is not following the weights (${exp.srm.text}); the evaluator holds the rollout. Check routing before trusting any figure.`)
    : null;
  return [
    srm,
    el("div", { class: "title" },
      el("h2", {}, exp.experiment),
      badge(ro ? ro.status : "no evaluator", ro ? ro.status : "unknown"),
      el("span", { class: "muted" }, `${exp.strategy} · stable: ${exp.stable}`)),
    el("p", { id: "stage" }, stage),
    bar,
    renderTraffic(exp.traffic, variants),
    el("p", {}, `routing version ${routing.version ?? "–"}, set by ${routing.actor || "–"}`
      + `${routing.updated_at ? ` at ${clock(routing.updated_at)}` : ""}: `, el("span", { class: "muted" }, routing.reason || "–")),
    el("p", { class: "muted" },
      `sidecars alive: ${sidecars.length} (on routing version ${versions || "–"}) · `
      + `evaluator: ${active.length ? active.map((e) => e.instance).join(", ") : "none active"}`),
  ];
}

// Every stage with its share and schedule, the current one highlighted; under it the progress
// toward the stage's minimum time (a countdown ticking between polls) and samples.
function renderLadder(ladder) {
  if (!ladder) return [];
  const steps = el("ol", { class: "ladder", "aria-label": "rollout stages" }, ladder.stages.map((s, i) =>
    el("li", { class: `step ${s.state.replace(" ", "-")}`, "data-stage": i, "data-state": s.state },
      el("strong", {}, s.text.share), el("span", { class: "muted" }, s.text.schedule),
      s.gate === "manual" ? el("span", { class: "gate" }, "manual gate") : null,
      i === ladder.stage && s.state !== "done" && s.state !== "next" ? el("span", { class: "here" }, s.state) : null)));
  const p = ladder.progress;
  if (!p) return steps;
  const samples = el("span", { class: "progress" }, el("span", {}));
  samples.firstChild.style.width = `${Math.round(100 * Math.min(p.min_samples ? p.samples / p.min_samples : 1, 1))}%`;
  return [steps, el("div", { class: "stage-progress" },
    el("p", {}, el("span", { id: "time-bar", class: "progress" }, el("span", {})),
      `minimum time ${p.text.min_time}: `,
      el("strong", { id: "countdown", "data-ends-at": p.ends_at }, p.text.left), " left"),
    el("p", { id: "samples", "data-samples": p.samples, "data-min-samples": p.min_samples }, samples, p.text.samples),
    el("p", { class: "muted" }, p.text.gate))];
}

// The countdown by the CLI's rule (figures.countdown_text): whole seconds rounded up, "m:ss".
function countdown(seconds) {
  const left = Math.max(Math.ceil(seconds), 0);
  return `${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")}`;
}

// Server time minus this browser's, from the newest answer: the countdown runs on the server's
// clock, whatever this machine's says.
let clockOffset = 0;

function tickLadder() {
  const p = state.experiment && state.experiment.ladder && state.experiment.ladder.progress;
  const node = $("countdown");
  if (!p || !node) return;
  const now = Date.now() / 1000 + clockOffset;
  node.textContent = countdown(p.ends_at - now);
  $("time-bar").firstChild.style.width = `${Math.round(100 * Math.min(p.min_seconds ? (now - p.started) / p.min_seconds : 1, 1))}%`;
}

// Per variant: its model, and its requests in the window apart by kind (the guardrails compare
// assigned requests only; testers' forced ones are counted, never compared).
function renderTraffic(traffic, variants) {
  const cols = ["variant", "model", "price", "assigned requests", "forced (testers)"];
  return el("div", { class: "scroll" }, el("table", { id: "traffic-table" },
    el("thead", {}, el("tr", {}, cols.map((c) => el("th", {}, c)))),
    el("tbody", {}, variants.filter((v) => traffic[v]).map((v) => {
      const t = traffic[v];
      const key = el("span", { class: "swatch" });
      key.style.background = colour(v, variants);
      return el("tr", { "data-variant": v },
        el("td", {}, key, v), el("td", { "data-field": "model" }, t.model || "–"),
        el("td", { "data-field": "price" }, t.text.price),
        el("td", { "data-field": "assigned", "data-value": t.assigned }, t.text.assigned),
        el("td", { "data-field": "forced", "data-value": t.forced }, t.text.forced));
    }))));
}

// Only the intents the evaluator would apply now are enabled (the API asks its transition
// function); the buttons are redrawn only when that set changes, so a click never lands on a
// button replaced by a poll.
function renderActions([, actions]) {
  return Object.entries(VERBS).map(([verb, [text, explanation]]) => {
    const valid = actions.includes(verb);
    const b = el("button", {
      type: "button", "data-action": verb, class: ["rollback", "abort"].includes(verb) ? "danger" : null,
      disabled: !valid, title: valid ? explanation : `Not possible while the rollout is ${(state.experiment.rollout || {}).status}.`,
    }, text);
    b.addEventListener("click", () => openConfirm(verb));
    return b;
  });
}

function renderComparison(cmp) {
  $("comparison-note").textContent = `(assigned requests of the last ${duration(state.experiment.window_s)}, as \`extproc status\`; forced ones are not compared)`;
  const head = el("tr", {}, el("th", {}, "figure"), el("th", {}, cmp.stable || "stable"),
    cmp.candidates.map((c) => [el("th", {}, c), el("th", {}, `Δ ${c}`), el("th", {}, `Δ% ${c}`)]));
  const cell = (variant, metric, field, value, text) => el("td", {
    "data-variant": variant, "data-metric": metric, "data-field": field, "data-value": JSON.stringify(value),
  }, text);
  const rows = cmp.rows.map((row) => el("tr", {},
    el("th", { scope: "row" }, row.label),
    cell(cmp.stable, row.metric, "value", row.stable, row.stable_text),
    cmp.candidates.map((c) => {
      const e = row.candidates[c];
      const judged = (row.states || {})[c];
      return ["value", "diff", "rel"].map((f) => {
        const td = cell(c, row.metric, f, e[f], e.text[f]);
        if (judged) td.classList.add(`judged-${judged}`);
        return td;
      });
    })));
  return el("div", { class: "scroll" }, el("table", { id: "comparison-table" }, el("thead", {}, head), el("tbody", {}, rows)));
}

// One row per guardrail and candidate: its verdict coloured by state, the harm the evaluator
// estimated with its own lower bound, drawn against the margin, and the evidence toward failing
// (or what a waiting check still needs). Texts and numbers come from the API (figures.verdict).
function renderChecks(checks) {
  $("checks-note").textContent = checks
    ? `(evaluator's look at ${clock(checks.time)}, stage ${checks.stage + 1}, decision: ${checks.action})`
    : "";
  if (!checks) return el("p", { class: "muted" }, "No guardrail verdict recorded yet in this rollout.");
  const cols = ["variant", "guardrail", "verdict", "worse by", "interval", "limit", "evidence", "action", "detail"];
  return el("div", { class: "scroll" }, el("table", { id: "checks-table" },
    el("thead", {}, el("tr", {}, cols.map((c) => el("th", {}, c)))),
    el("tbody", {}, checks.items.map((c) => {
      const v = c.verdict;
      const field = (k, text) => el("td", { "data-field": k, "data-value": JSON.stringify(v[k] ?? null) }, text);
      return el("tr", { class: `verdict ${v.state}`, "data-variant": c.variant, "data-metric": c.metric, "data-state": v.state },
        el("td", {}, c.variant), el("td", { "data-field": "label" }, v.label),
        el("td", {}, badge(v.state)),
        field("estimate", [el("span", { class: "estimate" }, v.text.estimate), intervalBar(v)]),
        field("bound", v.text.bound), field("margin", v.text.margin),
        el("td", { "data-field": "evidence", "data-progress": JSON.stringify(v.progress) },
          v.text.needs ? el("span", { class: "needs" }, v.text.needs) : evidenceBar(v)),
        el("td", {}, c.action),
        el("td", { class: "detail" }, c.detail));
    }))));
}

// The interval as a bar: from the lower bound on, the estimate a dot, the margin a tick; the
// scale spans zero, the margin and the interval's start (drawn, not read: the texts say it).
function intervalBar(v) {
  const known = (x) => x !== null && x !== undefined;
  if (!known(v.estimate) && !known(v.bound)) return null;
  const ends = [0, v.estimate, v.bound, v.margin].filter(known);
  const lo = Math.min(...ends), hi = Math.max(...ends);
  const pad = (hi - lo || 1) * 0.1;
  const W = 90, H = 10;
  const x = (t) => ((t - lo + pad) / (hi - lo + 2 * pad)) * W;
  return svg("svg", { class: "interval", viewBox: `0 0 ${W} ${H}`, width: W, height: H, "aria-hidden": "true" },
    known(v.bound) ? svg("rect", { class: "range", x: x(v.bound), y: 3, width: Math.max(W - x(v.bound), 1), height: 4 }) : null,
    svg("line", { class: "zero", x1: x(0), x2: x(0), y1: 0, y2: H }),
    known(v.margin) ? svg("line", { class: "limit", x1: x(v.margin), x2: x(v.margin), y1: 0, y2: H }) : null,
    known(v.estimate) ? svg("circle", { class: "point", cx: x(v.estimate), cy: H / 2, r: 2.5 }) : null);
}

function evidenceBar(v) {
  if (v.progress === null || v.progress === undefined) return v.text.evidence;
  const bar = el("span", { class: "progress", title: "evidence toward failing (log scale)" }, el("span", {}));
  bar.firstChild.style.width = `${Math.round(100 * v.progress)}%`;
  return [bar, v.text.evidence];
}

function renderTimeline(records) {
  return [...records].reverse().map((rec) => el("li", { "data-action": rec.action, "data-id": rec.id },
    el("time", {}, clock(rec.time)), " ", badge(rec.action, `action-${rec.action}`),
    el("span", { class: "muted" }, ` stage ${rec.stage + 1} · ${weightsText(rec.weights)} · by ${rec.actor}`),
    el("ul", {}, (rec.reasons || []).map((r) => el("li", {}, r)))));
}

function chartValues(columns, key) {
  if (key !== "tokens_per_request") return columns[key];
  const n = columns.window_requests || [];
  return (columns.completion_tokens || []).map((t, i) => (n[i] ? t / n[i] : null));
}

function renderCharts([series, timeline, variants, limits]) {
  $("series-note").textContent = `(${duration(series.step_s)} buckets over the last `
    + `${duration(Math.round(series.span_s))}: ${series.window_events} assigned requests)`;
  const lines = [];
  const live = Object.keys(series.variants);
  for (const v of [...variants.filter((n) => live.includes(n)), ...live.filter((n) => !variants.includes(n))]) {
    lines.push({ name: v, variant: v, cols: series.variants[v], shadow: false });
  }
  for (const [v, cols] of Object.entries(series.shadow)) lines.push({ name: `${v} (shadow)`, variant: v, cols, shadow: true });
  const t0 = series.t[0] || 0;
  const shownDecisions = timeline.filter((rec) => rec.time >= t0);
  const kinds = [...new Set(shownDecisions.map((rec) => rec.action))];
  const sample = (cls, attrs) => svg("svg", { width: 22, height: 10 }, svg("line", { x1: 0, y1: 5, x2: 22, y2: 5, class: cls, ...attrs }));
  $("legend").replaceChildren(
    ...lines.map((l) => el("span", { class: "key" },
      sample("line", { stroke: colour(l.variant, variants), "stroke-width": 3, "stroke-dasharray": l.shadow ? "4 3" : null }), l.name)),
    el("span", { class: "key" }, sample("limit margin", {}), "guardrail limit (stable + margin)"),
    el("span", { class: "key" }, sample("limit ceiling", {}), "ceiling (max_absolute)"),
    ...kinds.map((k) => el("span", { class: "key", "data-decision": k }, sample(`marker action-${k}`, {}), `decision: ${k}`)));
  const keys = new Set(lines.flatMap((l) => Object.keys(l.cols)));
  const extra = [...keys].filter((k) => !CHARTS.includes(k) && !NOT_CHARTED.has(k)).sort();
  const figures = [];
  for (const key of [...CHARTS, ...extra]) {
    const data = lines.map((l) => ({ ...l, values: chartValues(l.cols, key) || [] }));
    const hasData = data.some((d) => d.values.some((x) => x !== null));
    if (!hasData && !CHARTS.includes(key)) continue;
    const caption = key === "window_requests" ? `requests per ${duration(series.step_s)}` : label(key);
    figures.push(chart(key, caption, series, data, timeline, variants, (limits || {})[key] || []));
  }
  return figures;
}

function niceMax(x) {
  if (!(x > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(x));
  return [1, 2, 2.5, 5, 10].map((m) => m * p).find((m) => m >= x);
}

// One figure over time: the y axis titled with its unit, the x axis with the time of day, the
// guardrails' limit lines (in the scale, so a line is never off the chart), and each decision
// a labelled vertical line.
function chart(key, caption, series, data, timeline, variants, limits) {
  const W = 320, H = 168, L = 46, R = 8, T = 14, B = 34;
  const t0 = series.t[0] || 0;
  const t1 = (series.t[series.t.length - 1] || 0) + series.step_s;
  const all = data.flatMap((d) => d.values).filter((x) => x !== null);
  const top = niceMax(Math.max(...all, ...limits.map((l) => l.value), isRate(key) ? 0.01 : 0) * 1.05);
  const x = (t) => L + ((t - t0) / (t1 - t0 || 1)) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  const parts = [];
  for (const f of [0, 0.5, 1]) {
    parts.push(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(top * f), y2: y(top * f) }));
    parts.push(svg("text", { class: "tick", x: L - 4, y: y(top * f) + 3, "text-anchor": "end" }, tick(key, top * f)));
  }
  const units = (state.series && state.series.units) || {};
  const yTitle = key === "window_requests" ? `requests / ${duration(series.step_s)}` : units[key] || "count";
  parts.push(svg("text", { class: "axis-title", x: 0, y: 0, transform: `translate(9 ${T + (H - T - B) / 2}) rotate(-90)`, "text-anchor": "middle" }, yTitle));
  parts.push(svg("text", { class: "axis-title", x: L + (W - L - R) / 2, y: H - 2, "text-anchor": "middle" }, `time of day (${duration(series.step_s)} buckets)`));
  const seconds = t1 - t0 < 600;
  for (const [t, anchor] of [[t0, "start"], [(t0 + t1) / 2, "middle"], [t1, "end"]]) {
    parts.push(svg("text", { class: "tick", x: x(t), y: H - 14, "text-anchor": anchor }, clock(t, seconds)));
  }
  for (const limit of limits) {
    parts.push(svg("line", { class: `limit ${limit.kind}`, x1: L, x2: W - R, y1: y(limit.value), y2: y(limit.value), "data-value": JSON.stringify(limit.value) },
      svg("title", {}, limit.text)));
    parts.push(svg("text", { class: `limit-label ${limit.kind}`, x: W - R - 2, y: y(limit.value) - 2, "text-anchor": "end" }, limit.kind === "ceiling" ? "ceiling" : "limit"));
  }
  for (const rec of timeline) {
    if (rec.time < t0 || rec.time > t1) continue;
    const why = `${clock(rec.time)} ${rec.action}: ${(rec.reasons || []).join("; ")}`;
    parts.push(svg("line", { class: `marker action-${rec.action}`, x1: x(rec.time), x2: x(rec.time), y1: T, y2: H - B },
      svg("title", {}, why)));
    const late = x(rec.time) > W - R - 40;  // near the right edge: the label reads leftwards
    parts.push(svg("text", { class: `marker-label action-${rec.action}`, x: x(rec.time) + (late ? -2 : 2), y: T - 3, "text-anchor": late ? "end" : "start", "data-id": rec.id }, rec.action, svg("title", {}, why)));
  }
  for (const d of data) {
    let path = "";
    let pen = "M";
    const dots = [];
    d.values.forEach((v, i) => {
      if (v === null || v === undefined) { pen = "M"; return; }
      const px = x(series.t[i] + series.step_s / 2).toFixed(1);
      const py = y(v).toFixed(1);
      path += `${pen}${px} ${py} `;
      pen = "L";
      dots.push(svg("circle", { cx: px, cy: py, r: 1.6, fill: colour(d.variant, variants) }));
    });
    parts.push(svg("path", {
      class: "line", d: path.trim() || "M0 0", stroke: colour(d.variant, variants),
      "stroke-dasharray": d.shadow ? "4 3" : null, "data-variant": d.name, "data-values": JSON.stringify(d.values),
    }, svg("title", {}, d.name)), ...dots);
  }
  const body = all.length ? parts : [...parts, svg("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data in this span")];
  return el("figure", { class: "chart", "data-metric": key },
    el("figcaption", {}, caption),
    svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": caption }, body));
}

function renderSide(role, side) {
  if (!side) return el("div", { class: "side missing" }, el("h4", {}, role === "primary" ? "Primary" : "Shadow"), el("p", { class: "muted" }, "not captured"));
  const facts = [`${side.variant}`, `HTTP ${side.status}`];
  if (side.duration_ms !== null && side.duration_ms !== undefined) facts.push(`${side.duration_ms} ms`);
  if (side.completion_tokens !== null && side.completion_tokens !== undefined) facts.push(`${side.completion_tokens} tokens`);
  if (side.refusal) facts.push("refusal");
  return el("div", { class: `side ${role}` },
    el("h4", {}, `${role === "primary" ? "Primary" : "Shadow"} `, el("span", { class: "muted" }, facts.join(" · "))),
    el("pre", { class: "answer" }, side.answer ?? "(no text)"));
}

// The verdict's own fields (winner, scores, consistent, ...), whatever the judge writes; the
// request id and time repeat the pair's.
const JUDGE_SKIP = new Set(["kind", "time_ms", "request_id"]);

function renderJudge(judge, error) {
  if (judge === undefined || judge === null) {
    return error ? el("p", { class: "judge muted" }, `judge failed: ${typeof error === "object" ? JSON.stringify(error) : error}`) : null;
  }
  const text = typeof judge === "object"
    ? Object.entries(judge).filter(([k]) => !JUDGE_SKIP.has(k))
      .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(" · ")
    : String(judge);
  return el("p", { class: "judge", "data-judge": JSON.stringify(judge) }, el("strong", {}, "judge: "), text);
}

function renderPairs(pairs) {
  if (pairs.locked) {
    return el("p", { class: "muted" }, "Captured prompts and answers need the dashboard's token: open the link `extproc up` or `extproc status` prints (it ends in #token=...).");
  }
  if (!pairs.length) {
    return el("p", { class: "muted" }, "No captured pairs: set capture.sample (and shadow) in the experiment file.");
  }
  return pairs.map((p) => {
    const first = p.primary || p.shadow || {};
    return el("article", { class: "pair", "data-request-id": p.request_id },
      el("header", {}, el("code", {}, p.request_id), first.time ? ` · ${clock(first.time)}` : ""),
      el("pre", { class: "prompt" }, first.prompt ?? "(prompt not captured)"),
      el("div", { class: "sides" }, renderSide("primary", p.primary), renderSide("shadow", p.shadow)),
      renderJudge(p.judge, p.judge_error));
  });
}

// --- actions ------------------------------------------------------------------------------------

let pending = null;

function openConfirm(verb) {
  pending = verb;
  const [text, explanation] = VERBS[verb];
  $("confirm-title").textContent = `${text} ${selected}?`;
  $("confirm-text").textContent = `${explanation} The evaluator applies it on its next tick and records it in the audit log.`;
  $("confirm-token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("confirm-reason").value = "";
  $("confirm-error").hidden = true;
  $("confirm-ok").textContent = text;
  $("confirm").showModal();
}

async function submitAction(ev) {
  ev.preventDefault();
  const token = $("confirm-token").value.trim();
  let resp;
  let body;
  try {
    resp = await fetch(`/api/experiments/${encodeURIComponent(selected)}/actions/${pending}`, {
      method: "POST",
      headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
      body: JSON.stringify({ reason: $("confirm-reason").value }),
    });
    body = await resp.json();
  } catch (err) {
    resp = { ok: false, status: "no answer" };
    body = { error: String(err.message || err) };
  }
  if (!resp.ok) {
    $("confirm-error").textContent = `${resp.status}: ${body.error}`;
    $("confirm-error").hidden = false;
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("confirm").close();
  const toast = $("toast");
  toast.textContent = `${body.command} recorded (${body.id}); the evaluator applies it on its next tick.`;
  toast.hidden = false;
  setTimeout(() => { toast.hidden = true; }, 8000);
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  takeTokenFromUrl();
  setInterval(tickLadder, 1000);
  $("range").addEventListener("change", (ev) => { span = ev.target.value; refresh(); });
  window.addEventListener("hashchange", () => { if (takeTokenFromUrl()) refresh(); });
  $("confirm-form").addEventListener("submit", submitAction);
  $("confirm-cancel").addEventListener("click", () => $("confirm").close());
  refresh();
});
