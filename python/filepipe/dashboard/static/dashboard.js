/* Polls /api/status and updates the page in place (no reload). Text is always set
   with textContent: file names and errors are data, never markup. */
(function () {
  "use strict";
  var main = document.getElementById("dash");
  var interval = parseInt(main.dataset.interval, 10) || 1000;
  var chart = new window.FilepipeChart(document.getElementById("chart"));
  var live = document.getElementById("live");
  var timer = null, failures = 0, inFlight = false;

  function $(id) { return document.getElementById(id); }

  function num(v) {
    return v === null || v === undefined ? "—" : Number(v).toLocaleString("en-US");
  }

  function bytes(n) {
    if (n === null || n === undefined) return "—";
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0, v = n;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(1) : String(v)) + " " + units[i];
  }

  /* The same words as `filepipe status` (observe/text.py: duration, clock). */
  function duration(seconds) {
    var s = Math.max(0, seconds);
    function pad(n) { return (n < 10 ? "0" : "") + n; }
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 60) return Math.round(s) + " s";
    if (s < 3600) return Math.floor(s / 60) + "m " + pad(Math.floor(s % 60)) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + pad(Math.floor(s % 3600 / 60)) + "m";
    return Math.floor(s / 86400) + "d " + Math.floor(s % 86400 / 3600) + "h";
  }

  function ago(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    return duration(seconds) + " ago";
  }

  function clock(at) {
    return new Date(at * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }

  function setFigure(id, value, text) {
    var e = $(id);
    e.dataset.value = value === null || value === undefined ? "" : String(value);
    e.textContent = text !== undefined ? text : num(value);
  }

  function cell(tr, text, cls, sub) {
    var td = document.createElement("td");
    if (cls) td.className = cls;
    td.textContent = text;
    if (sub) {
      var s = document.createElement("span");
      s.className = "sub";
      s.textContent = sub;
      td.appendChild(s);
    }
    tr.appendChild(td);
    return td;
  }

  function fillTable(id, rows, build) {
    var body = $(id).tBodies[0];
    var fresh = document.createElement("tbody");
    rows.forEach(function (r) { var tr = document.createElement("tr"); build(tr, r); fresh.appendChild(tr); });
    body.parentNode.replaceChild(fresh, body);
    $(id).hidden = rows.length === 0;
    $(id + "-empty").hidden = rows.length !== 0;
  }

  function rateText(v) { return v === null || v === undefined ? "—" : v.toFixed(2); }

  function render(s) {
    var t = s.totals || {};
    var w = s.windows || {};
    setFigure("rate", s.rate, rateText(s.rate));
    $("rate-window").textContent = w.rate || "";
    $("dead-rate").textContent = s.dead_rate ? "· " + s.dead_rate.toFixed(2) + " dead/s" : "";
    $("rate-minute").textContent = (w.rate_minute || "") + ": " + rateText(s.rate_minute) + " files/sec";
    $("consumer-rate-window").textContent = w.consumer_rate || "";
    setFigure("rows", t.rows, t.rows === undefined || t.rows === null ? "—" : (t.rows_exact === false ? "≈ " : "") + num(t.rows));
    setFigure("pending", s.pending);
    setFigure("lag", s.lag);
    setFigure("dead", t.dead_letters);

    var sum = s.consumers_summary || {};
    var running = (sum.live || 0) + (sum.waiting || 0);
    setFigure("consumer-count", running);
    var parts = [(sum.live || 0) + " live"];
    if (sum.waiting) parts.push(sum.waiting + " waiting");
    if (sum.stale) parts.push(sum.stale + " stale");
    if (sum.dead) parts.push(sum.dead + " dead");
    if (s.consumers_departed) parts.push(s.consumers_departed + " departed");
    $("consumer-health").textContent = parts.join(" · ");

    chart.update(s.series, s.updated, 300);

    var k = s.retention;
    if (k) {
      var m = k.memory || {};
      var share = m.share === null || m.share === undefined ? null : m.share;
      setFigure("memory", m.used_bytes, m.max_bytes
        ? bytes(m.used_bytes) + " of " + bytes(m.max_bytes) + " maxmemory (" + Math.round(share * 100) + "%)"
        : bytes(m.used_bytes) + " (no maxmemory)");
      var fill = $("memory-fill");
      fill.style.width = share === null ? "0" : Math.min(100, Math.max(1, share * 100)) + "%";
      fill.classList.toggle("warn", share !== null && share >= 0.8);
      $("stream-size").textContent = "stream: " + num(k.length) + (k.length === 1 ? " entry · " : " entries · ") + bytes(k.memory_bytes);
      $("kept").textContent = "Kept: " + k.reason;
    }

    fillTable("consumers", s.consumers || [], function (tr, c) {
      cell(tr, c.name, "name", c.host ? c.host + (c.pid ? " · pid " + c.pid : "") : "");
      var td = document.createElement("td");
      var pill = document.createElement("span");
      pill.className = "pill " + c.health;
      pill.textContent = c.health;
      td.appendChild(pill);
      if (c.last_error) {
        var err = document.createElement("span");
        err.className = "sub";
        err.textContent = "last error: " + c.last_error;
        td.appendChild(err);
      }
      tr.appendChild(td);
      tr.dataset.health = c.health;
      cell(tr, c.health === "stale" ? "—" : rateText(c.rate), "num");
      cell(tr, num(c.inserted), "num hide-sm");
      cell(tr, num(c.pending), "num");
      var beat = c.heartbeat ? ago(c.heartbeat_age_s) : "none";
      if (c.health === "stale") beat = s.redis_seen ? "seen " + ago((s.updated || 0) - s.redis_seen) : "unknown";
      cell(tr, beat, "num hide-sm");
    });

    var reasons = s.dead_by_reason || [];
    var top = reasons.length ? reasons[0].count : 1;
    var list = $("reasons");
    while (list.firstChild) list.removeChild(list.firstChild);
    reasons.forEach(function (r) {
      var li = document.createElement("li");
      var label = document.createElement("div");
      label.className = "label";
      var a = document.createElement("span"); a.textContent = r.reason;
      var b = document.createElement("span"); b.textContent = num(r.count);
      label.appendChild(a); label.appendChild(b);
      var track = document.createElement("div"); track.className = "track";
      var fill = document.createElement("div"); fill.className = "fill";
      fill.style.width = Math.max(2, (100 * r.count) / top) + "%";
      track.appendChild(fill);
      li.appendChild(label); li.appendChild(track);
      li.dataset.reason = r.reason;
      li.dataset.count = r.count;
      list.appendChild(li);
    });
    $("reasons-empty").hidden = reasons.length !== 0;
    $("reasons-empty").textContent = s.dead_counting ? "Counting…" : "No dead letters.";

    var tf = s.table_figures;
    if (tf) {
      var lines = tf.lines || [];
      $("table-kind").textContent = lines.length ? lines[0][1] : "—";
      $("table-chunks").textContent = lines.slice(1).map(function (l) {
        return l[0] + ": " + l[1] + (l[2] ? " (" + l[2] + ")" : "");
      }).join(" · ");
      $("table-history").textContent = "Last hour: " + tf.history.summary;
    }

    var now = s.updated || Date.now() / 1000;
    fillTable("latest", s.latest || [], function (tr, e) {
      cell(tr, e.filename, "name", e.stream_id);
      cell(tr, bytes(e.size_bytes), "num");
      cell(tr, e.content_type || "—", "hide-sm");
      cell(tr, e.consumer, "hide-sm");
      cell(tr, e.processed_at ? ago(now - Date.parse(e.processed_at) / 1000) : "—", "num");
    });

    var errors = [], down = [];
    if (s.errors && s.errors.redis) { errors.push("Redis unreachable: " + s.errors.redis); down.push("Redis"); }
    if (s.errors && s.errors.postgresql) { errors.push("PostgreSQL: " + s.errors.postgresql); down.push("PostgreSQL"); }
    var banner = $("banner");
    banner.textContent = errors.join(" — ") + (errors.length ? " (showing the last known figures)" : "");
    banner.hidden = errors.length === 0;
    $("updated").textContent = s.updated ? clock(s.updated) : "—";
    return down;
  }

  /* "live" only while the page gets snapshots and the dashboard reaches both services. */
  function setLive(state, detail) {
    live.dataset.state = state;
    live.textContent = state === "live" ? "live" : state === "stale" ? detail + " unreachable" : "reconnecting…";
    live.title = state === "live" ? "Live updates every " + interval / 1000 + " s" : String(detail || "");
  }

  function schedule() {
    clearTimeout(timer);
    if (document.hidden) return;
    var delay = failures ? Math.min(15000, interval * Math.pow(2, failures)) : interval;
    timer = setTimeout(poll, delay);
  }

  function poll() {
    if (inFlight) return;
    inFlight = true;
    fetch("/api/status", { cache: "no-store", headers: { accept: "application/json" } })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (s) {
        var down = render(s);
        failures = 0;
        setLive(down.length ? "stale" : "live", down.join(" and "));
      })
      .catch(function (e) { failures++; setLive("down", e); })
      .then(function () { inFlight = false; schedule(); });
  }

  document.addEventListener("visibilitychange", function () { if (!document.hidden) poll(); });
  poll();
})();
