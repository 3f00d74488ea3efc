"""``gndpo inspect RUN_DIR [RUN_DIR ...]``: one self-contained HTML page to see a run's outlier tokens.

The page (no network, no external scripts or styles: the data is embedded as JSON, the charts are SVG drawn by
inline JavaScript) shows, for one or more runs side by side:

- a step timeline of the outlier metrics (max |r_t|, clamp fraction, share of sum |A_t| in the top 1 % of tokens,
  kurtosis of r_t) and the pre-clip gradient norm; clicking a point selects the step;
- for the chosen step (of those with saved rollouts): histograms of r_t and A_t (and of the top-k divergence D_t in
  dense runs), and the saved responses with each token coloured by r_t, A_t or D_t on a diverging scale (blue negative, red positive), clamped tokens
  outlined, values on hover;
- a table of each run's most extreme tokens with their context.

Runs without saved rollouts (``logging.rollouts_every=0``) still get their timeline.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from gndpo.errors import GndpoError
from gndpo.report.outliers import load_rollouts

TIMELINE = (("outlier/max_abs_r", "max |r_t|"), ("clamp_frac", "clamp fraction"),
            ("outlier/top1pct_adv_share", "share of Σ|A_t| in the top 1 % of tokens"),
            ("outlier/kurtosis_r", "excess kurtosis of r_t"), ("grad_norm", "gradient norm (pre-clip)"))
MAX_STEPS = 60  # saved steps embedded per run, evenly spread


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def load_run(run_dir: str | Path, label: str | None = None) -> dict:
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise GndpoError(f"{run_dir} holds no metrics.jsonl; pass the trainer.output_dir of a gndpo run")
    keys = [k for k, _ in TIMELINE] + ["loss"]
    timeline = []
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut off by a crash
        timeline.append({"step": row.get("step"), **{k: _clean(row.get(k)) for k in keys}})
    samples = load_rollouts(run_dir)
    if len(samples) > MAX_STEPS:
        pick = sorted({round(i * (len(samples) - 1) / (MAX_STEPS - 1)) for i in range(MAX_STEPS)})
        samples = [samples[i] for i in pick]
    return {"label": label or run_dir.name, "path": str(run_dir), "timeline": timeline, "samples": samples}


def render(runs: list[dict]) -> str:
    data = json.dumps({"runs": runs, "timeline": TIMELINE}, allow_nan=False, separators=(",", ":"))
    data = data.replace("</", "<\\/")  # nothing in the data can close the script element
    return PAGE.replace("__DATA__", data)


def summary(run_dirs: list[str], labels: list[str] | None = None) -> str:
    """``gndpo inspect --summary``: per run, the median over its steps of each timeline metric (steps without a
    finite value skipped), as a Markdown table."""
    import statistics

    if labels and len(labels) != len(run_dirs):
        raise GndpoError(f"--labels gives {len(labels)} names for {len(run_dirs)} run directories")
    lines = ["| run | steps | " + " | ".join(f"median {title}".replace("|", "\\|") for _, title in TIMELINE) + " |",
             "|---|---|" + "---|" * len(TIMELINE)]
    for i, run_dir in enumerate(run_dirs):
        run = load_run(run_dir, labels[i] if labels else None)
        cells = []
        for key, _ in TIMELINE:
            values = [row[key] for row in run["timeline"] if isinstance(row[key], (int, float))]
            cells.append(f"{statistics.median(values):.3g}" if values else "—")
        lines.append(f"| {run['label']} | {len(run['timeline'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[str], out: str | Path, labels: list[str] | None = None) -> Path:
    if labels and len(labels) != len(run_dirs):
        raise GndpoError(f"--labels gives {len(labels)} names for {len(run_dirs)} run directories")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(runs), encoding="utf-8")
    return out


PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gndpo inspect</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;padding:16px 24px;color:#1b1b1b;
 background:#fafafa;max-width:1400px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid #ddd}
.muted{color:#666}.grid{display:grid;gap:16px;grid-template-columns:repeat(auto-fit,minmax(380px,1fr))}
.card{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:10px 12px;min-width:0}
.charts{display:grid;gap:12px;grid-template-columns:repeat(auto-fit,minmax(240px,1fr))}
svg{display:block;width:100%;height:auto}.legend span{margin-right:14px}
.resp{border-top:1px solid #eee;padding:8px 0}.prompt{font-size:12px;color:#555;white-space:pre-wrap}
.tokens{font:13px/1.9 ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word}
.tok{padding:1px 0;border-radius:2px}.tok.clamped{outline:2px solid #111;outline-offset:-1px}
table{border-collapse:collapse;width:100%;font-size:12px}td,th{padding:3px 6px;border-bottom:1px solid #eee;
 text-align:left;vertical-align:top}td.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;
 word-break:break-word}.hit{background:#ffe08a}
.controls{display:flex;gap:16px;align-items:center;flex-wrap:wrap;margin:8px 0}
.scale{display:inline-block;width:160px;height:10px;vertical-align:middle;
 background:linear-gradient(90deg,#2166ac,#f7f7f7,#b2182b)}
</style></head><body>
<h1>gndpo inspect</h1>
<div class="muted" id="runs"></div>
<h2>Timeline</h2>
<div class="legend" id="legend"></div>
<div class="charts" id="charts"></div>
<h2>Step</h2>
<div class="controls">
 <label>step <select id="step"></select></label>
 <label>colour by <select id="colour"><option value="r">r_t = log p_teacher − log p_student</option>
 <option value="adv">A_t (advantage)</option>
 <option value="div">D_t (top-k divergence, dense runs)</option></select></label>
 <span><span class="scale"></span> <span id="scaletext" class="muted"></span></span>
 <span class="muted">outlined: clamped r_t; hover a token for its values</span>
</div>
<div class="grid" id="step-view"></div>
<h2>Most extreme tokens</h2>
<div class="grid" id="extremes"></div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
const SVGNS = "http://www.w3.org/2000/svg";
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function svg(tag, attrs) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}
function num(v) { return typeof v === "number" && isFinite(v) ? v : null; }
function fmt(v) { return v === null || v === undefined ? "–" : (typeof v === "number" ? v.toFixed(3) : String(v)); }
function diverging(v, scale) {
  if (num(v) === null) return "#dddddd";
  const t = Math.max(-1, Math.min(1, v / (scale || 1)));
  const mix = (a, b, f) => Math.round(a + (b - a) * f);
  const [r, g, b] = t < 0 ? [mix(247, 33, -t), mix(247, 102, -t), mix(247, 172, -t)]
                          : [mix(247, 178, t), mix(247, 24, t), mix(247, 43, t)];
  return `rgb(${r},${g},${b})`;
}
const runs = DATA.runs;
document.getElementById("runs").textContent = runs.map(r => `${r.label}: ${r.path} (${r.timeline.length} steps, ` +
  `${r.samples.length} with saved rollouts)`).join(" · ");
const legend = document.getElementById("legend");
runs.forEach((r, i) => { const s = el("span", {}, "■ " + r.label); s.style.color = COLOURS[i % COLOURS.length];
  legend.appendChild(s); });
const savedSteps = [...new Set(runs.flatMap(r => r.samples.map(s => s.step)))].sort((a, b) => a - b);
const stepSelect = document.getElementById("step");
savedSteps.forEach(s => stepSelect.appendChild(el("option", {value: s}, String(s))));

function chart(key, title) {
  const W = 320, H = 150, P = 30;
  const card = el("div", {class: "card"});
  card.appendChild(el("div", {}, title));
  const box = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title});
  const pts = runs.map(r => r.timeline.filter(row => num(row[key]) !== null).map(row => [row.step, row[key]]));
  const all = pts.flat();
  if (!all.length) { card.appendChild(el("div", {class: "muted"}, "not logged")); return card; }
  const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(0, ...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const X = x => P + (x - x0) / (x1 - x0) * (W - P - 6), Y = y => H - 18 - (y - y0) / (y1 - y0) * (H - 28);
  box.appendChild(svg("line", {x1: P, y1: H - 18, x2: W - 6, y2: H - 18, stroke: "#999"}));
  for (const [v, y] of [[y1, Y(y1)], [y0, Y(y0)]]) {
    const t = svg("text", {x: 2, y: y + 4, "font-size": 9, fill: "#666"}); t.textContent = v.toPrecision(3);
    box.appendChild(t);
  }
  const t = svg("text", {x: W - 40, y: H - 4, "font-size": 9, fill: "#666"}); t.textContent = "step " + x1;
  box.appendChild(t);
  pts.forEach((p, i) => {
    if (!p.length) return;
    box.appendChild(svg("polyline", {points: p.map(q => `${X(q[0])},${Y(q[1])}`).join(" "), fill: "none",
      stroke: COLOURS[i % COLOURS.length], "stroke-width": 1.5}));
    p.forEach(q => {
      const c = svg("circle", {cx: X(q[0]), cy: Y(q[1]), r: 2.5, fill: COLOURS[i % COLOURS.length],
        style: "cursor:pointer"});
      const tip = svg("title", {}); tip.textContent = `${runs[i].label} step ${q[0]}: ${fmt(q[1])}`;
      c.appendChild(tip);
      c.addEventListener("click", () => selectStep(q[0]));
      box.appendChild(c);
    });
  });
  card.appendChild(box);
  return card;
}
const charts = document.getElementById("charts");
DATA.timeline.forEach(([key, title]) => charts.appendChild(chart(key, title)));

function histogram(values, title, colour) {
  const W = 320, H = 110, B = 30;
  const v = values.filter(x => num(x) !== null);
  const card = el("div", {});
  card.appendChild(el("div", {class: "muted"}, `${title} (${v.length} tokens)`));
  if (!v.length) return card;
  const lo = Math.min(...v), hi = Math.max(...v, lo + 1e-9), counts = new Array(B).fill(0);
  v.forEach(x => counts[Math.min(B - 1, Math.floor((x - lo) / (hi - lo) * B))]++);
  const top = Math.max(...counts), box = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title});
  counts.forEach((c, i) => {
    const h = Math.sqrt(c / top) * (H - 24);
    const rect = svg("rect", {x: 4 + i * (W - 8) / B, y: H - 16 - h, width: (W - 8) / B - 1, height: h, fill: colour});
    const tip = svg("title", {});
    tip.textContent = `${(lo + i * (hi - lo) / B).toFixed(2)} … ${(lo + (i + 1) * (hi - lo) / B).toFixed(2)}: ${c}`;
    rect.appendChild(tip); box.appendChild(rect);
  });
  for (const [x, s] of [[4, lo], [W - 44, hi]]) {
    const t = svg("text", {x: x, y: H - 3, "font-size": 9, fill: "#666"}); t.textContent = s.toPrecision(3);
    box.appendChild(t);
  }
  card.appendChild(box);
  return card;
}

function responseView(resp, by, scale) {
  const div = el("div", {class: "resp"});
  div.appendChild(el("div", {class: "prompt"}, `prompt ${resp.prompt_id} · outcome ${fmt(resp.outcome)} · ` +
    `answer ${resp.answer}\n${resp.prompt}`));
  const toks = el("div", {class: "tokens"});
  resp.tokens.forEach((tok, j) => {
    const s = el("span", {class: "tok" + (resp.clamped && resp.clamped[j] ? " clamped" : "")}, tok);
    const v = resp[by] ? resp[by][j] : null;
    s.style.background = diverging(num(v), scale);
    s.title = `${JSON.stringify(tok)}  r=${fmt(resp.r ? resp.r[j] : null)}  A=${fmt(resp.adv ? resp.adv[j] : null)}` +
      (resp.div ? `  D=${fmt(resp.div[j])}` : "") +
      `  student=${fmt(resp.student ? resp.student[j] : null)}  teacher=${fmt(resp.teacher ? resp.teacher[j] : null)}` +
      (resp.clamped && resp.clamped[j] ? "  (clamped)" : "");
    toks.appendChild(s);
  });
  div.appendChild(toks);
  return div;
}

function selectStep(step) {
  const target = savedSteps.reduce((best, s) => Math.abs(s - step) < Math.abs(best - step) ? s : best,
                                   savedSteps.length ? savedSteps[0] : step);
  stepSelect.value = String(target);
  renderStep();
}

function renderStep() {
  const view = document.getElementById("step-view");
  view.replaceChildren();
  const step = Number(stepSelect.value), by = document.getElementById("colour").value;
  let scale = 0;
  const chosen = runs.map(r => r.samples.find(s => s.step === step));
  chosen.forEach(s => s && s.responses.forEach(resp => (resp[by] || []).forEach(v => {
    if (num(v) !== null) scale = Math.max(scale, Math.abs(v)); })));
  if (by === "r") { const c = chosen.find(s => s && num(s.clamp) !== null); if (c) scale = Math.min(scale || c.clamp, c.clamp); }
  document.getElementById("scaletext").textContent = `−${fmt(scale)} … 0 … +${fmt(scale)}`;
  runs.forEach((r, i) => {
    const card = el("div", {class: "card"});
    const head = el("div", {}, r.label); head.style.color = COLOURS[i % COLOURS.length]; head.style.fontWeight = "600";
    card.appendChild(head);
    const s = chosen[i];
    if (!s) { card.appendChild(el("div", {class: "muted"}, "no rollouts saved at this step")); view.appendChild(card); return; }
    const m = s.metrics || {};
    card.appendChild(el("div", {class: "muted"}, `max |r| ${fmt(m["outlier/max_abs_r"])} · clamp fraction ` +
      `${fmt(m.clamp_frac)} · top-1 % share of Σ|A| ${fmt(m["outlier/top1pct_adv_share"])} · kurtosis ` +
      `${fmt(m["outlier/kurtosis_r"])} · grad-norm ${fmt(m.grad_norm)}`));
    const all = k => s.responses.flatMap(resp => resp[k] || []);
    card.appendChild(histogram(all("r"), "r_t", "#b2182b"));
    card.appendChild(histogram(all("adv"), "A_t", "#2166ac"));
    if (all("div").length) card.appendChild(histogram(all("div"), "D_t (top-k divergence)", "#762a83"));
    s.responses.forEach(resp => card.appendChild(responseView(resp, by, scale)));
    view.appendChild(card);
  });
}

function renderExtremes() {
  const view = document.getElementById("extremes");
  runs.forEach((r, i) => {
    const card = el("div", {class: "card"});
    const head = el("div", {}, r.label); head.style.color = COLOURS[i % COLOURS.length]; head.style.fontWeight = "600";
    card.appendChild(head);
    const rows = [];
    r.samples.forEach(s => (s.extreme || []).forEach(t => {
      const resp = s.responses.find(x => x.row === t.row);
      rows.push({step: s.step, t: t, resp: resp});
    }));
    const mag = v => typeof v === "number" ? Math.abs(v) : Infinity;
    rows.sort((a, b) => mag(b.t.value) - mag(a.t.value));
    const table = el("table", {});
    const hr = el("tr", {}); ["step", "token", "value", "context"].forEach(h => hr.appendChild(el("th", {}, h)));
    table.appendChild(hr);
    rows.slice(0, 25).forEach(({step, t, resp}) => {
      const tr = el("tr", {});
      tr.appendChild(el("td", {}, String(step)));
      tr.appendChild(el("td", {}, JSON.stringify(t.text)));
      tr.appendChild(el("td", {}, `${t.kind}=${fmt(t.value)}`));
      const ctx = el("td", {class: "ctx"});
      if (resp) {
        const a = Math.max(0, t.pos - 10), b = Math.min(resp.tokens.length, t.pos + 11);
        ctx.appendChild(document.createTextNode(resp.tokens.slice(a, t.pos).join("")));
        ctx.appendChild(el("span", {class: "hit"}, resp.tokens[t.pos]));
        ctx.appendChild(document.createTextNode(resp.tokens.slice(t.pos + 1, b).join("")));
      }
      tr.appendChild(ctx);
      tr.addEventListener("click", () => selectStep(step));
      table.appendChild(tr);
    });
    if (!rows.length) card.appendChild(el("div", {class: "muted"}, "no rollouts saved"));
    else card.appendChild(table);
    view.appendChild(card);
  });
}

stepSelect.addEventListener("change", renderStep);
document.getElementById("colour").addEventListener("change", renderStep);
if (savedSteps.length) selectStep(savedSteps[savedSteps.length - 1]);
renderExtremes();
document.body.dataset.ready = "1";
document.body.dataset.scrollWidth = String(document.documentElement.scrollWidth);
document.body.dataset.tokens = String(document.querySelectorAll("#step-view .tok").length);
</script>
</body></html>
"""
