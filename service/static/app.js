// streamlearn status page: polls the service's own JSON API and draws it with the vendored uPlot.
// Every chart container records what it drew in data-* attributes (data-points, data-series,
// data-drift-markers), which is what the headless-browser test reads back from the DOM.
"use strict";

(function () {
  const POLL_MS = 2000;
  const MAX_POINTS = 3600; // as many as the service keeps (runtime.HISTORY_POINTS)
  const DRIFT_COLORS = { concept: "#d62728", data: "#ff7f0e", prediction: "#9467bd" };
  const params = new URLSearchParams(window.location.search);
  // history: the points drawn so far for state.model; each poll asks only for newer ones
  const state = { model: params.get("model"), history: null, points: [], charts: {} };

  const $ = (id) => document.getElementById(id);
  const fmtInt = (v) => (v === null || v === undefined ? "–" : Math.round(v).toLocaleString("en-US"));
  const fmtNum = (v, digits) => (v === null || v === undefined || !isFinite(v) ? "–" : Number(v).toPrecision(digits || 3));

  function ago(ts) {
    if (!ts) return "never";
    const s = Math.max(0, Date.now() / 1000 - ts);
    return s < 120 ? Math.round(s) + " s ago" : Math.round(s / 60) + " min ago";
  }

  async function getJSON(path) {
    const res = await fetch(path, { cache: "no-store" });
    if (!res.ok) throw new Error(path + ": HTTP " + res.status);
    return res.json();
  }

  // Vertical dashed lines at each drift detection, coloured by kind.
  function driftMarkers() {
    return {
      hooks: {
        draw: [(u) => {
          const events = (state.history && state.history.drift_events) || [];
          const { left, top, width, height } = u.bbox;
          let drawn = 0;
          u.ctx.save();
          u.ctx.setLineDash([6, 4]);
          u.ctx.lineWidth = 2;
          for (const ev of events) {
            if (ev.ts < u.scales.x.min || ev.ts > u.scales.x.max) continue;
            const x = Math.round(u.valToPos(ev.ts, "x", true));
            if (x < left || x > left + width) continue;
            u.ctx.strokeStyle = DRIFT_COLORS[ev.kind] || "#555";
            u.ctx.beginPath();
            u.ctx.moveTo(x, top);
            u.ctx.lineTo(x, top + height);
            u.ctx.stroke();
            drawn += 1;
          }
          u.ctx.restore();
          u.root.parentElement.dataset.driftMarkers = String(drawn);
        }],
      },
    };
  }

  // Chart definitions: which history fields each chart plots. Rebuilt when the set changes
  // (a regression model plots MAE instead of accuracy).
  function chartSpecs(task) {
    const regression = task === "regression";
    const quality = regression
      ? { title: "Prequential MAE", series: [{ field: "prequential_mae", label: "prequential MAE", stroke: "#1f77b4" }] }
      : {
        title: "Accuracy: prequential vs estimated vs realized",
        range: [0, 1],
        series: [
          { field: "prequential_accuracy", label: "prequential", stroke: "#1f77b4" },
          { field: "estimated_accuracy_cbpe", label: "estimated (CBPE)", stroke: "#2ca02c", dash: [4, 3] },
          { field: "estimated_accuracy_mcbpe", label: "estimated (M-CBPE)", stroke: "#17becf", width: 2 },
          { field: "realized_accuracy", label: "realized", stroke: "#000000", width: 2, points: true },
        ],
      };
    return {
      "chart-quality": { ...quality, height: 280, markers: true },
      "chart-learner": {
        height: 200,
        series: [
          { field: "learning_rate", label: "learning rate", stroke: "#e377c2", scale: "lr" },
          { field: "kalman_gamma", label: "Kalman γ", stroke: "#8c564b", scale: "gamma" },
        ],
        axes: [{ scale: "lr", label: "learning rate" }, { scale: "gamma", label: "γ", side: 1 }],
        // γ ≤ 1; a constant γ = 1 (a stationary stream) stays readable instead of spanning 0..2
        scales: { gamma: { range: (u, min, max) => [Math.min(min, 0.99) - 0.001, Math.max(max, 1) + 0.001] } },
      },
      "chart-throughput": { height: 200, series: [{ field: "events_per_s", label: "events/s", stroke: "#ff7f0e", fill: "rgba(255,127,14,0.12)" }] },
      "chart-pending": { height: 200, series: [{ field: "pending_labels", label: "pending labels", stroke: "#7f7f7f", fill: "rgba(127,127,127,0.12)" }] },
    };
  }

  // As many decimals as the tick spacing needs, so close values (a learning rate of 0.000998
  // vs 0.001) get distinct labels.
  function tickLabels(u, splits) {
    const step = splits.length > 1 ? Math.abs(splits[1] - splits[0]) : 0;
    const decimals = step > 0 && step < 1 ? Math.min(10, Math.ceil(-Math.log10(step))) : 0;
    return splits.map((v) => (Math.abs(v) >= 1e5 ? v.toExponential(1) : v.toFixed(decimals)));
  }

  function buildChart(el, spec) {
    const width = Math.max(300, el.clientWidth - 16);
    const series = [{}].concat(spec.series.map((s) => ({
      label: s.label,
      stroke: s.stroke,
      width: s.width || 1.5,
      dash: s.dash,
      fill: s.fill,
      scale: s.scale || "y",
      spanGaps: true,
      points: { show: !!s.points, size: 5 },
      value: (u, v) => fmtNum(v, 4),
    })));
    const axes = [{}].concat((spec.axes || [{ scale: "y" }]).map((a) => ({
      scale: a.scale, label: a.label, side: a.side === undefined ? 3 : a.side, grid: { show: a.side !== 1 },
      size: 70, values: tickLabels,
    })));
    const scales = { x: { time: true } };
    if (spec.range) scales.y = { range: spec.range };
    Object.assign(scales, spec.scales || {});
    const opts = { width, height: spec.height, series, axes, scales, legend: { live: true }, plugins: spec.markers ? [driftMarkers()] : [] };
    el.querySelectorAll(".uplot").forEach((n) => n.remove());
    return new uPlot(opts, [[]].concat(spec.series.map(() => [])), el);
  }

  function renderCharts(history, task) {
    const points = history.points || [];
    const specs = chartSpecs(task);
    const xs = points.map((p) => p.ts);
    for (const [id, spec] of Object.entries(specs)) {
      const el = $(id);
      const signature = spec.series.map((s) => s.field).join(",");
      let entry = state.charts[id];
      if (!entry || entry.signature !== signature) {
        if (entry) entry.chart.destroy();
        entry = { chart: buildChart(el, spec), signature };
        state.charts[id] = entry;
      }
      const columns = spec.series.map((s) => points.map((p) => (p[s.field] === undefined || p[s.field] === null ? null : Number(p[s.field]))));
      entry.chart.setData([xs].concat(columns));
      const counts = spec.series.map((s, i) => s.field + ":" + columns[i].filter((v) => v !== null).length);
      el.dataset.points = String(xs.filter((_, i) => columns.some((c) => c[i] !== null)).length);
      el.dataset.series = counts.join(",");
    }
    if (specs["chart-quality"].title) $("quality-title").firstChild.textContent = specs["chart-quality"].title + " ";
  }

  function renderDriftLog(events) {
    const rows = events.slice(-50).reverse().map((ev) => {
      const tr = document.createElement("tr");
      const when = new Date(ev.ts * 1000).toLocaleTimeString();
      for (const text of [when, ev.kind, fmtNum(ev.magnitude, 3)]) {
        const td = document.createElement("td");
        td.textContent = text;
        tr.appendChild(td);
      }
      tr.style.color = DRIFT_COLORS[ev.kind] || "";
      return tr;
    });
    $("drift-rows").replaceChildren(...rows);
  }

  function renderStatus(status, history) {
    const ev = status.events || {};
    $("c-version").textContent = fmtInt(status.model_version);
    $("c-predicted").textContent = fmtInt(ev.predicted);
    $("c-learned").textContent = fmtInt(ev.learned);
    $("c-pending").textContent = fmtInt(ev.pending_labels);
    $("c-dead").textContent = fmtInt(ev.dead_letters);
    const lag = status.consumer_lag;
    const lagTotal = lag && typeof lag === "object" ? Object.values(lag).reduce((a, b) => a + (Number(b) || 0), 0) : lag;
    $("c-lag").textContent = fmtInt(lagTotal);
    const ck = status.checkpoint || {};
    $("c-checkpoint").textContent = ck.seq === undefined || ck.seq === null ? "none" : "#" + ck.seq + " · " + ago(ck.ts);
    const last = (history.points || []).slice(-1)[0];
    $("c-rate").textContent = last ? fmtInt(last.events_per_s) : "–";
    const drift = status.drift || {};
    const badges = Object.entries(drift).filter(([, d]) => d && typeof d === "object").map(([kind, d]) => {
      const span = document.createElement("span");
      span.className = "badge" + (d.active ? " on" : "");
      span.textContent = kind + (d.detected_total ? " " + d.detected_total : "");
      span.title = d.active ? kind + " drift active" : "no active " + kind + " drift";
      return span;
    });
    $("c-drift").replaceChildren(...badges);
  }

  function setModels(models) {
    const select = $("model");
    const names = models.map((m) => m.name);
    if (!state.model || !names.includes(state.model)) state.model = names[0] || null;
    if (select.options.length !== names.length || names.some((n, i) => select.options[i].value !== n)) {
      select.replaceChildren(...names.map((n) => new Option(n, n)));
    }
    select.value = state.model || "";
  }

  async function poll() {
    let asked = state.model;
    try {
      const list = await getJSON("v1/models");
      const models = Array.isArray(list) ? list : list.models || [];
      setModels(models);
      asked = state.model;
      if (asked) {
        const name = encodeURIComponent(asked);
        const last = state.points.length ? state.points[state.points.length - 1].ts : null;
        const [status, recent] = await Promise.all([
          getJSON("v1/models/" + name),
          getJSON("v1/models/" + name + "/history" + (last === null ? "" : "?since=" + last)),
        ]);
        if (state.model !== asked) return; // another model was chosen meanwhile: its poll is next
        state.points = state.points.concat(recent.points || []).slice(-MAX_POINTS);
        const history = { points: state.points, drift_events: recent.drift_events || [] };
        state.history = history;
        renderStatus(status, history);
        renderCharts(history, status.task);
        renderDriftLog(history.drift_events);
      }
      $("error").hidden = true;
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
      document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
    } catch (err) {
      $("error").textContent = "cannot reach the service: " + err.message;
      $("error").hidden = false;
    } finally {
      // a model chosen while this poll ran gets its own poll at once (schedule(0) was replaced)
      schedule(state.model === asked ? POLL_MS : 0);
    }
  }

  // One timer at a time: a poll started early (model change) replaces the pending one.
  let timer = null;
  function schedule(delay) {
    clearTimeout(timer);
    timer = setTimeout(poll, delay);
  }

  $("model").addEventListener("change", (e) => {
    state.model = e.target.value;
    state.points = [];
    for (const entry of Object.values(state.charts)) entry.chart.destroy();
    state.charts = {};
    schedule(0);
  });
  window.addEventListener("resize", () => {
    for (const [id, entry] of Object.entries(state.charts)) {
      entry.chart.setSize({ width: Math.max(300, $(id).clientWidth - 16), height: entry.chart.height });
    }
  });
  poll();
})();
