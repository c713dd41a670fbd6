/* A small time-series chart in SVG: one filled line (processed per second) and one
   dashed line (dead-lettered per second), a nice y scale, time ticks, a hover readout.
   Usage: const c = new FilepipeChart(div); c.update({t: [...], processed: [...], dead: [...]}, now, 300); */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";

  function el(name, attrs, parent) {
    var e = document.createElementNS(NS, name);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }

  function niceCeil(v) {
    if (!(v > 0)) return 1;
    var exp = Math.pow(10, Math.floor(Math.log10(v)));
    var f = v / exp;
    var n = f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10;
    return n * exp;
  }

  function fmt(v) {
    if (v >= 10000) return (v / 1000).toFixed(0) + "k";
    if (v >= 1000) return (v / 1000).toFixed(1).replace(/\.0$/, "") + "k";
    if (v >= 10) return v.toFixed(0);
    return String(Math.round(v * 100) / 100);
  }

  function clock(t, seconds) {
    var d = new Date(t * 1000);
    var p = function (n) { return (n < 10 ? "0" : "") + n; };
    return p(d.getHours()) + ":" + p(d.getMinutes()) + (seconds ? ":" + p(d.getSeconds()) : "");
  }

  function FilepipeChart(container) {
    this.container = container;
    this.svg = el("svg", { role: "img", "aria-label": "Processing rate over time" }, container);
    this.tip = document.createElement("div");
    this.tip.className = "tip";
    this.tip.hidden = true;
    container.appendChild(this.tip);
    this.series = { t: [], processed: [], dead: [] };
    this.now = Date.now() / 1000;
    this.windowS = 300;
    var self = this;
    var pending = false;
    window.addEventListener("resize", function () {
      if (pending) return;
      pending = true;
      window.requestAnimationFrame(function () { pending = false; self.draw(); });
    });
    var move = function (ev) {
      var touch = ev.touches && ev.touches[0];
      self.hover((touch || ev).clientX);
    };
    this.svg.addEventListener("mousemove", move);
    this.svg.addEventListener("touchstart", move, { passive: true });
    this.svg.addEventListener("touchmove", move, { passive: true });
    this.svg.addEventListener("mouseleave", function () { self.hoverIndex = null; self.draw(); });
  }

  FilepipeChart.prototype.update = function (series, now, windowS) {
    this.series = series || this.series;
    this.now = now || Date.now() / 1000;
    this.windowS = windowS || this.windowS;
    this.draw();
  };

  FilepipeChart.prototype.hover = function (clientX) {
    var s = this.series, g = this.geom;
    if (!g || !s.t.length) return;
    var rect = this.svg.getBoundingClientRect();
    var x = clientX - rect.left;
    var best = null, bestDist = Infinity;
    for (var i = 0; i < s.t.length; i++) {
      var d = Math.abs(g.x(s.t[i]) - x);
      if (d < bestDist) { bestDist = d; best = i; }
    }
    this.hoverIndex = best;
    this.draw();
  };

  FilepipeChart.prototype.draw = function () {
    var svg = this.svg, s = this.series;
    var w = Math.max(this.container.clientWidth || 600, 240);
    var h = w < 520 ? 180 : 240;
    var m = { l: 44, r: 10, t: 10, b: 24 };
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    svg.setAttribute("width", w);
    svg.setAttribute("height", h);
    while (svg.firstChild) svg.removeChild(svg.firstChild);

    // The window, or less while the history is shorter (at least a minute).
    var t1 = this.now, t0 = t1 - this.windowS;
    if (s.t.length) t0 = Math.max(t0, Math.min(s.t[0], t1 - 60));
    var span = t1 - t0;
    var max = 0;
    for (var i = 0; i < s.t.length; i++) {
      max = Math.max(max, s.processed[i] || 0, s.dead[i] || 0);
    }
    var yMax = niceCeil(max * 1.1);
    var pw = w - m.l - m.r, ph = h - m.t - m.b;
    var x = function (t) { return m.l + ((t - t0) / (t1 - t0)) * pw; };
    var y = function (v) { return m.t + ph - (v / yMax) * ph; };
    this.geom = { x: x, y: y };

    // y grid and labels
    for (var k = 0; k <= 4; k++) {
      var v = (yMax * k) / 4, yy = Math.round(y(v)) + 0.5;
      el("line", { x1: m.l, x2: w - m.r, y1: yy, y2: yy, class: "grid" }, svg);
      el("text", { x: m.l - 6, y: yy + 4, "text-anchor": "end", class: "axis" }, svg).textContent = fmt(v);
    }
    // time ticks: as many as fit, on round times
    var steps = [10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600];
    var fit = Math.max(2, Math.floor(pw / 70));
    var step = steps[steps.length - 1];
    for (var j = 0; j < steps.length; j++) {
      if (span / steps[j] <= fit) { step = steps[j]; break; }
    }
    for (var tt = Math.ceil(t0 / step) * step; tt <= t1; tt += step) {
      var xx = x(tt);
      if (xx < m.l + 14 || xx > w - m.r - 14) continue;
      el("text", { x: xx, y: h - 6, "text-anchor": "middle", class: "axis" }, svg).textContent = clock(tt, step < 60);
    }

    if (!s.t.length) {
      el("text", { x: m.l + pw / 2, y: m.t + ph / 2, "text-anchor": "middle", class: "nodata" }, svg)
        .textContent = "Collecting samples…";
      return;
    }

    // lines, broken where a sample is missing (a service was unreachable)
    var paths = function (values) {
      var line = "", area = "", first = null, last = null;
      var close = function () {
        if (first !== null) area += "L" + last + "," + y(0) + "L" + first + "," + y(0) + "Z";
        first = null;
      };
      for (var i = 0; i < s.t.length; i++) {
        var v = values[i];
        if (v === null || v === undefined || s.t[i] < t0) { close(); continue; }
        var px = x(s.t[i]).toFixed(1), py = y(v).toFixed(1);
        if (first === null) { line += "M" + px + "," + py; area += "M" + px + "," + y(0) + "L" + px + "," + py; first = px; }
        else { line += "L" + px + "," + py; area += "L" + px + "," + py; }
        last = px;
      }
      close();
      return { line: line, area: area };
    };
    var p = paths(s.processed);
    if (p.area) el("path", { d: p.area, class: "area" }, svg);
    if (p.line) el("path", { d: p.line, class: "line" }, svg);
    var anyDead = s.dead.some(function (v) { return v > 0; });
    if (anyDead) el("path", { d: paths(s.dead).line, class: "dead" }, svg);

    var hi = this.hoverIndex;
    if (hi !== null && hi !== undefined && hi < s.t.length && s.processed[hi] !== null) {
      var hx = x(s.t[hi]);
      el("line", { x1: hx, x2: hx, y1: m.t, y2: m.t + ph, class: "cursor" }, svg);
      el("circle", { cx: hx, cy: y(s.processed[hi]), r: 4, class: "dot" }, svg);
      this.tip.hidden = false;
      this.tip.style.left = Math.min(Math.max(hx, 70), w - 70) + "px";
      this.tip.style.top = y(s.processed[hi]) + "px";
      var text = clock(s.t[hi], true) + " · " + fmt(s.processed[hi]) + " files/s";
      if (s.dead[hi]) text += " · " + fmt(s.dead[hi]) + " dead/s";
      this.tip.textContent = text;
    } else {
      this.tip.hidden = true;
    }
  };

  window.FilepipeChart = FilepipeChart;
})();
