// Small SVG line charts for the Psyche dashboard (no library, no network).
//
//   const chart = PsycheCharts.line(containerElement, {yFormat, xLabel});
//   chart.update([{name, color, points: [[x, y], ...], dash}]);
//
// The chart re-renders on update and on resize, thins long series to about one
// point per two pixels, and shows the nearest values under the pointer. The SVG
// carries data-points (points of the first series) and data-last-x, which the
// browser test reads to see the chart advance.
"use strict";

(function () {
  const NS = "http://www.w3.org/2000/svg";

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }

  // "Nice" tick values covering [lo, hi] (1, 2, 2.5, 5 × 10^k steps).
  function ticks(lo, hi, count) {
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / Math.max(1, count);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw * 0.75) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  // Keep at most `max` points: the first, the last, and per bucket the min and max.
  function thin(points, max) {
    if (points.length <= max) return points;
    const out = [points[0]];
    const per = (points.length - 2) / Math.floor((max - 2) / 2);
    for (let i = 1; i < points.length - 1; i += per) {
      const bucket = points.slice(Math.floor(i), Math.min(points.length - 1, Math.floor(i + per)));
      if (!bucket.length) continue;
      let lo = bucket[0], hi = bucket[0];
      for (const p of bucket) { if (p[1] < lo[1]) lo = p; if (p[1] > hi[1]) hi = p; }
      if (lo === hi) out.push(lo); else if (lo[0] < hi[0]) out.push(lo, hi); else out.push(hi, lo);
    }
    out.push(points[points.length - 1]);
    return out;
  }

  function line(container, opts) {
    opts = opts || {};
    const fmt = opts.yFormat || ((v) => String(+v.toPrecision(4)));
    const fmtX = opts.xFormat || ((v) => String(v));
    const svg = el("svg", { role: "img", "aria-label": opts.label || "chart" }, container);
    const tip = document.createElement("div");
    tip.className = "tip";
    container.appendChild(tip);
    let series = [];
    let layout = null;

    function render() {
      while (svg.firstChild) svg.removeChild(svg.firstChild);
      const W = Math.max(120, container.clientWidth), H = Math.max(80, container.clientHeight);
      svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
      const first = series[0] ? series[0].points : [];
      svg.dataset.points = String(first.length);
      svg.dataset.lastX = first.length ? String(first[first.length - 1][0]) : "";
      const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
      if (!all.length) {
        layout = null;
        el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, svg).textContent =
          opts.empty || "waiting for data…";
        return;
      }
      let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
      let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
      if (opts.zero) y0 = Math.min(0, y0);
      if (x1 === x0) { x0 -= 1; x1 += 1; }
      if (y1 === y0) { const d = Math.abs(y0) * 0.05 || 1; y0 -= d; y1 += d; }
      const pad = (y1 - y0) * 0.08;
      if (!(opts.zero && y0 === 0)) y0 -= pad;
      y1 += pad;
      const yt = ticks(y0, y1, H < 180 ? 3 : 4);
      const labelW = Math.max(...yt.map((t) => fmt(t).length)) * 6.3 + 10;
      const m = { l: Math.ceil(labelW), r: 10, t: 8, b: 22 };
      const sx = (x) => m.l + ((x - x0) / (x1 - x0)) * (W - m.l - m.r);
      const sy = (y) => m.t + (1 - (y - y0) / (y1 - y0)) * (H - m.t - m.b);
      const grid = el("g", { class: "grid" }, svg);
      const axis = el("g", { class: "axis" }, svg);
      for (const t of yt) {
        if (t < y0 || t > y1) continue;
        el("line", { x1: m.l, x2: W - m.r, y1: sy(t), y2: sy(t) }, grid);
        el("text", { x: m.l - 6, y: sy(t) + 3.5, "text-anchor": "end" }, axis).textContent = fmt(t);
      }
      const xt = ticks(x0, x1, Math.max(2, Math.floor((W - m.l) / 90))).filter((t) => !opts.integerX || Number.isInteger(t));
      for (const t of xt) {
        if (t < x0 || t > x1) continue;
        el("text", { x: sx(t), y: H - 6, "text-anchor": "middle" }, axis).textContent = fmtX(t);
      }
      el("line", { class: "baseline", x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }, svg);
      const maxPts = Math.max(16, Math.floor((W - m.l - m.r) / 2));
      for (const s of series) {
        const pts = thin(s.points.filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1])), maxPts);
        if (!pts.length) continue;
        const d = pts.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join("");
        if (s.area) {
          const base = sy(Math.max(y0, Math.min(y1, 0)));
          el("path", { class: "area", d: `${d}L${sx(pts[pts.length - 1][0]).toFixed(1)} ${base}L${sx(pts[0][0]).toFixed(1)} ${base}Z`, fill: s.color }, svg);
        }
        el("path", { class: "line", d, stroke: s.color, "stroke-dasharray": s.dash ? "5 4" : "none" }, svg);
        if (pts.length <= 40 || s.dots) {
          for (const p of pts) el("circle", { class: "dot", cx: sx(p[0]), cy: sy(p[1]), r: pts.length <= 40 ? 2.8 : 2, fill: s.color }, svg);
        } else {
          const p = pts[pts.length - 1];
          el("circle", { class: "dot", cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: s.color }, svg);
        }
      }
      const hover = el("g", { class: "hover", visibility: "hidden" }, svg);
      const hl = el("line", { y1: m.t, y2: H - m.b }, hover);
      layout = { sx, m, W, H, x0, x1, hover, hl };
    }

    function nearest(s, x) {
      let best = null;
      for (const p of s.points) if (Number.isFinite(p[1]) && (best === null || Math.abs(p[0] - x) < Math.abs(best[0] - x))) best = p;
      return best;
    }

    function onMove(ev) {
      if (!layout) return;
      const rect = svg.getBoundingClientRect();
      const px = ((ev.clientX - rect.left) / rect.width) * layout.W;
      const { m, W, x0, x1 } = layout;
      if (px < m.l || px > W - m.r) return onLeave();
      const x = x0 + ((px - m.l) / (W - m.l - m.r)) * (x1 - x0);
      const rows = series.map((s) => [s, nearest(s, x)]).filter((r) => r[1]);
      if (!rows.length) return onLeave();
      const at = rows[0][1][0];
      layout.hl.setAttribute("x1", layout.sx(at));
      layout.hl.setAttribute("x2", layout.sx(at));
      layout.hover.setAttribute("visibility", "visible");
      tip.textContent = "";
      const head = document.createElement("div");
      head.textContent = (opts.xLabel || "x") + " " + fmtX(at);
      head.style.color = "var(--muted)";
      tip.appendChild(head);
      for (const [s, p] of rows) {
        const row = document.createElement("div");
        const sw = document.createElement("span");
        sw.className = "swatch";
        sw.style.background = s.color;
        row.appendChild(sw);
        row.appendChild(document.createTextNode(`${s.name}: ${fmt(p[1])}`));
        tip.appendChild(row);
      }
      tip.style.display = "block";
      const left = (layout.sx(at) / layout.W) * rect.width;
      tip.style.left = Math.min(rect.width - tip.offsetWidth, Math.max(0, left + 10)) + "px";
    }

    function onLeave() {
      tip.style.display = "none";
      if (layout) layout.hover.setAttribute("visibility", "hidden");
    }

    svg.addEventListener("pointermove", onMove);
    svg.addEventListener("pointerleave", onLeave);
    if (window.ResizeObserver) {
      let lastW = 0;
      new ResizeObserver(() => {
        if (container.clientWidth !== lastW) { lastW = container.clientWidth; render(); }
      }).observe(container);
    }
    render();
    return {
      update(next) { series = next; render(); },
      element: svg,
    };
  }

  window.PsycheCharts = { line, ticks, thin };
})();
