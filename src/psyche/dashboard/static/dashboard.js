// Psyche dashboard: the runs list ("/") and a page per run ("/runs/<id>").
//
// Both views follow a WebSocket that pushes JSON: a snapshot, then deltas
// (see psyche/dashboard/feed.py), and reconnect on their own with backoff when
// the server goes away, so a restarted server needs no reload.
"use strict";

(function () {
  // -- small helpers ---------------------------------------------------------

  const $ = (sel, root) => (root || document).querySelector(sel);

  function esc(v) {
    return String(v == null ? "" : v).replace(/[&<>"']/g, (c) =>
      ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const dash = "–";

  function fmtInt(v) { return isNum(v) ? Math.round(v).toLocaleString("en-US") : dash; }

  function fmtCompact(v) {
    if (!isNum(v)) return dash;
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(a >= 1e10 ? 0 : 1) + "G";
    if (a >= 1e6) return (v / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(a >= 1e5 ? 0 : 1) + "k";
    if (a >= 100) return v.toFixed(0);
    if (a >= 1) return v.toFixed(1);
    return +v.toPrecision(2) + "";
  }

  function fmtBytes(v) {
    if (!isNum(v)) return dash;
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    return (i === 0 ? v.toFixed(0) : v.toFixed(Math.abs(v) >= 100 ? 0 : 1)) + " " + units[i];
  }

  function fmtLoss(v) { return isNum(v) ? v.toFixed(3) : dash; }

  function fmtDur(s) {
    if (!isNum(s)) return dash;
    s = Math.max(0, Math.round(s));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " m " + String(s % 60).padStart(2, "0") + " s";
    return Math.floor(s / 3600) + " h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + " m";
  }

  function shortId(id) { return id ? id.slice(0, 8) : dash; }

  // A stable colour per client, so a client looks the same in every table: by its place
  // among the run's accounts (golden-angle hues stay apart), else by a hash of its id.
  const clientOrder = new Map();

  function noteClients(ids) {
    for (const id of ids) if (!clientOrder.has(id)) clientOrder.set(id, clientOrder.size);
  }

  function idColor(id) {
    let h;
    if (clientOrder.has(id)) h = Math.round(210 + clientOrder.get(id) * 137.508) % 360;
    else {
      h = 2166136261; // FNV-1a over the hex id
      for (let i = 0; i < id.length; i++) h = Math.imul(h ^ id.charCodeAt(i), 16777619) >>> 0;
      h %= 360;
    }
    return `hsl(${h} 62% 52%)`;
  }

  function swatch(id) { return `<span class="swatch" style="background:${idColor(id)}"></span>`; }

  function cssVar(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }

  const PHASES = {
    Uninitialized: "Not started",
    WaitingForMembers: "Waiting for members",
    Warmup: "Warmup",
    RoundTrain: "Training",
    RoundWitness: "Witnessing",
    Cooldown: "Cooldown",
    Finished: "Finished",
    Paused: "Paused",
  };

  function badge(state) {
    return `<span class="badge s-${esc(state)}">${esc(PHASES[state] || state)}</span>`;
  }

  // The one step number a person reads: optimizer steps completed (step k is the k-th
  // update), 0 before training and total_steps once Finished (the API's steps_completed).
  function stepsDone(r) {
    return isNum(r.steps_completed) ? r.steps_completed : null;
  }

  const STEPS_TITLE = "Optimizer steps completed, of the run's total (step k is the k-th update)";

  // The witness rules, as the coordinator applies them (psyche/coordinator/machine.py, queries.py).
  const WITNESS_HELP = {
    reports: "Reports received from the witnesses selected for this round (its first trainers in the round's " +
      "shuffle), of how many were selected, and the quorum needed: 2/3 of them rounded down (1 of 1, 2 of 2, " +
      "2 of 3). A selected witness that does not report in time is dropped.",
    seen: "One dot per trainer with a batch in this round, always in the same place for the same client: filled " +
      "if at least a quorum of the witness reports list it as a trainer whose result they received, hollow if not.",
    outcome: "What the witness reports settled for this round; the key below the table explains each value.",
  };
  const WITNESS_KEY = [
    [`<span class="pill-ok">all seen</span>`, "a quorum of witnesses reported, and every trainer's result reached a quorum of them"],
    [`<span class="pill-bad">N not seen</span>`, "a quorum reported, but N trainers' results reached fewer than a quorum of witnesses: " +
      "a member's health check can then drop those trainers from the epoch, without points"],
    [`<span class="pill-bad">no quorum</span>`, "fewer reports than the quorum: nobody can be judged, and the epoch ends after this round"],
    [`<span class="pill-bad">N condemned</span>`, "verification found N results that do not match their trainers' assigned data: " +
      "nobody applied them, and their trainers were dropped from the epoch without points"],
    [`<span class="faint">waiting for witnesses</span>`, "the round still takes reports"],
    [`<span class="faint">details not kept</span>`, "an older round: only its counts are kept (the coordinator stores who was seen " +
      "for the last 4 rounds of an epoch, and this page keeps those it saw live)"],
  ];
  // Speed-aware shares (psyche/coordinator/shares.py).
  const SHARE_HELP = "Samples of this round's batch the client trains, and their part of the batch. " +
    "With shares = speed the batch is cut in proportion to each client's estimated speed; with shares = even, equally.";
  const SPEED_HELP = "The coordinator's estimate of the client's speed, in tokens per second of round time: learnt " +
    "from when witnesses received its results, never from what the client says about itself (– until measured).";
  // Verified results (psyche/coordinator/verification.py).
  const CONDEMNED_HELP = "Verification condemned this client's result of that step: it did not match the client's " +
    "assigned data (a majority of its verifiers scored it low, round after round). Nobody applied it, and the client " +
    "was dropped from the epoch without points.";
  const CKPT_SHA_HELP = "sha256 of the checkpoint's weights (its .safetensors files, in name order): check a copy against it";

  // -- the live connection ---------------------------------------------------

  // Same rules as psyche.dashboard.feed.apply_delta: keyed lists of rows, sorted by key.
  const ROW_LISTS = { history: ["step"], witness_rounds: ["epoch", "step"], witness_outcomes: ["epoch", "step"] };

  function compareKeys(a, b) {
    for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return a[i] < b[i] ? -1 : 1;
    return 0;
  }

  function applyDelta(prev, delta) {
    const out = {};
    const unset = new Set(delta.unset || []);
    for (const k in prev) if (!unset.has(k)) out[k] = prev[k];
    Object.assign(out, delta.set || {});
    const rows = delta.rows || {}, drop = delta.drop || {};
    for (const name of new Set([...Object.keys(rows), ...Object.keys(drop)])) {
      const fields = ROW_LISTS[name];
      const keyOf = (r) => fields.map((f) => r[f]);
      const merged = new Map((prev[name] || []).map((r) => [JSON.stringify(keyOf(r)), r]));
      for (const key of drop[name] || []) merged.delete(JSON.stringify(key));
      for (const r of rows[name] || []) merged.set(JSON.stringify(keyOf(r)), r);
      out[name] = [...merged.values()].sort((a, b) => compareKeys(keyOf(a), keyOf(b)));
    }
    return out;
  }

  const conn = { el: null, set(state, text) { if (this.el) { this.el.dataset.state = state; this.el.textContent = text; } } };

  function follow(path, onDoc, onError) {
    let ws = null, doc = null, version = null, attempt = 0, timer = null;
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;

    function open() {
      timer = null;
      ws = new WebSocket(url);
      ws.onopen = () => { attempt = 0; conn.set("live", "live"); };
      ws.onmessage = (ev) => {
        let msg;
        try { msg = JSON.parse(ev.data); } catch (e) { return; }
        if (msg.type === "snapshot") {
          doc = msg.data; version = msg.v; onDoc(doc);
        } else if (msg.type === "delta") {
          if (doc === null || msg.base !== version) { ws.close(); return; } // out of step: start over
          doc = applyDelta(doc, msg); version = msg.v; onDoc(doc);
        } else if (msg.type === "error") {
          onError(msg.message);
        }
      };
      ws.onclose = () => {
        doc = null; version = null; attempt++;
        const wait = Math.min(10000, 500 * Math.pow(1.7, attempt - 1));
        conn.set(attempt > 3 ? "offline" : "reconnecting",
          attempt > 3 ? `server unreachable, retrying in ${Math.round(wait / 1000)} s` : "reconnecting…");
        if (!timer) timer = setTimeout(open, wait);
      };
    }
    // A tab woken from sleep reconnects at once instead of waiting out the backoff.
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && timer) { clearTimeout(timer); open(); }
    });
    open();
  }

  // Seconds between the server's clock and ours, from the last document received.
  let clockOffset = 0;
  const serverNow = () => Date.now() / 1000 + clockOffset;

  function ago(ts) {
    if (!isNum(ts)) return dash;
    const s = serverNow() - ts;
    if (s < 2) return "just now";
    return fmtDur(s) + " ago";
  }

  // -- runs list ---------------------------------------------------------------

  function runsView(root) {
    document.title = "Runs · Psyche";
    $("#crumbs").innerHTML = "runs";
    root.innerHTML = `
      <section class="panel" id="runs">
        <h2>Runs <span class="note" id="runs-note"></span></h2>
        <div class="table-wrap"><table>
          <thead><tr><th>Run</th><th>State</th><th title="${STEPS_TITLE}">Steps done</th><th class="num">Tokens trained</th>
            <th class="num">Tokens/s</th><th class="num">Clients</th></tr></thead>
          <tbody id="runs-body"><tr><td colspan="6" class="muted">connecting…</td></tr></tbody>
        </table></div>
      </section>`;
    follow("/api/live", (runs) => {
      if (!Array.isArray(runs)) {
        $("#runs-body").innerHTML = `<tr><td colspan="6" class="muted">${esc(runs.error || "no data")}</td></tr>`;
        return;
      }
      $("#runs-note").textContent = runs.length === 1 ? "1 run" : `${runs.length} runs`;
      const body = $("#runs-body");
      if (!runs.length) { body.innerHTML = `<tr><td colspan="6" class="muted">This server hosts no runs yet.</td></tr>`; return; }
      body.innerHTML = runs.map((r) => {
        const done = stepsDone(r);
        const pct = r.total_steps ? Math.min(100, (100 * (done || 0)) / r.total_steps) : 0;
        return `<tr class="link" data-href="/runs/${encodeURIComponent(r.run_id)}">
          <td><a href="/runs/${encodeURIComponent(r.run_id)}">${esc(r.name || r.run_id)}</a>
            ${r.name && r.name !== r.run_id ? `<div class="faint mono">${esc(r.run_id)}</div>` : ""}</td>
          <td>${badge(r.state)}</td>
          <td><span class="mono">${fmtInt(done)} / ${fmtInt(r.total_steps)}</span>
            <div class="progress" style="width:110px"><span style="width:${pct}%"></span></div></td>
          <td class="num">${fmtCompact(r.tokens_trained)}</td>
          <td class="num">${fmtCompact(r.tokens_per_sec)}</td>
          <td class="num">${fmtInt(r.clients)}</td></tr>`;
      }).join("");
    }, () => {});
    root.addEventListener("click", (ev) => {
      const tr = ev.target.closest("tr.link");
      if (tr && !ev.target.closest("a")) location.href = tr.dataset.href;
    });
  }

  // -- one run -------------------------------------------------------------------

  function runView(root, runId) {
    $("#crumbs").innerHTML = `<a href="/">runs</a> / <span class="mono">${esc(runId)}</span>`;
    document.title = `${runId} · Psyche`;
    root.innerHTML = `
      <div class="stack">
        <section class="panel run-head">
          <div class="title"><h1 id="run-name">${esc(runId)}</h1><p class="desc" id="run-desc"></p>
            <div class="ids mono" id="run-ids"></div></div>
          <div id="run-badge"></div>
        </section>
        <section class="stats" id="stats"></section>
        <section class="charts">
          <div class="panel"><h2>Loss</h2>
            <div class="legend"><span><i style="background:var(--series-1)"></i>train</span>
              <span style="color:var(--series-2)"><i class="dash" style="background:var(--series-2)"></i><span style="color:var(--muted)">validation</span></span></div>
            <div class="chart" id="chart-loss"></div></div>
          <div class="panel"><h2>Tokens per second <span class="note">whole network</span></h2><div class="chart" id="chart-tps"></div></div>
          <div class="panel"><h2>Bytes sent per step <span class="note">compressed results, all clients</span></h2><div class="chart" id="chart-bytes"></div></div>
          <div class="panel"><h2>Compression <span class="note">× fewer bytes than an fp32 all-reduce</span></h2><div class="chart" id="chart-ratio"></div></div>
        </section>
        <section class="panel try" id="try" hidden><h2>Try it <span class="note" id="try-where"></span></h2>
          <form id="try-form">
            <textarea id="try-prompt" rows="2" required maxlength="4000" aria-label="Prompt"
              placeholder="The start of a text; the model goes on from there (Ctrl+Enter sends it)"></textarea>
            <div class="try-row">
              <label>Max tokens <input id="try-max" type="number" min="1" max="1024" value="64" required></label>
              <label>Temperature <input id="try-temp" type="number" min="0" max="2" step="0.1" value="0.8" required></label>
              <button type="submit" id="try-go">Complete</button>
            </div>
          </form>
          <div class="try-out" id="try-out" hidden><span class="faint" id="try-prompt-out"></span><span id="try-text"></span></div>
          <div class="try-meta" id="try-meta" aria-live="polite"></div></section>
        <section class="panel"><h2>Clients <span class="note" id="clients-note"></span></h2>
          <div class="table-wrap"><table>
            <thead><tr><th>Client</th><th>Health</th><th>Role this round</th><th class="num">Points</th>
              <th class="num" title="${esc(SHARE_HELP)}">Share</th>
              <th class="num" title="${esc(SPEED_HELP)}">Speed</th>
              <th class="num" title="Share of its last finished round the client spent in forward/backward">Busy</th>
              <th class="num">Sent</th><th class="num">Received</th><th class="num">Last seen</th></tr></thead>
            <tbody id="clients-body"></tbody></table></div></section>
        <div class="two">
          <section class="panel"><h2>Witness outcomes <span class="note">did each trainer's result reach enough witnesses?</span></h2>
            <div class="table-wrap" style="max-height:420px;overflow-y:auto"><table>
              <thead><tr><th>Step</th>
                <th class="num" title="${esc(WITNESS_HELP.reports)}">Witness reports</th>
                <th title="${esc(WITNESS_HELP.seen)}">Trainers seen by a quorum</th>
                <th title="${esc(WITNESS_HELP.outcome)}">Outcome</th></tr></thead>
              <tbody id="witness-body"></tbody></table></div>
            <dl class="key" id="witness-key">${WITNESS_KEY.map(([term, text]) => `<dt>${term}</dt><dd>${esc(text)}</dd>`).join("")}</dl></section>
          <section class="panel"><h2>Checkpoints <span class="note">written by a client at the end of an epoch</span></h2>
            <div class="table-wrap"><table>
              <thead><tr><th>After step</th><th>Written by</th><th class="hide-narrow" title="${esc(CKPT_SHA_HELP)}">sha256</th>
                <th title="Where the writing client saved it: a folder on that client's machine, not on this server">Folder, on that client's machine</th></tr></thead>
              <tbody id="ckpt-body"></tbody></table></div>
            <div id="ckpt-load"></div></section>
        </div>
        <section class="panel"><details class="config" id="config"><summary>Run config</summary>
          <div class="config-grid" id="config-grid"></div></details></section>
      </div>`;

    const C = window.PsycheCharts;
    const compact = (v) => fmtCompact(v);
    const charts = {
      loss: C.line($("#chart-loss"), { label: "loss by step", xLabel: "step", integerX: true, yFormat: (v) => +v.toPrecision(4) + "" }),
      tps: C.line($("#chart-tps"), { label: "tokens per second by step", xLabel: "step", integerX: true, zero: true, yFormat: compact }),
      bytes: C.line($("#chart-bytes"), { label: "bytes per step", xLabel: "step", integerX: true, zero: true, yFormat: fmtBytes }),
      ratio: C.line($("#chart-ratio"), { label: "compression ratio", xLabel: "step", integerX: true, zero: true, yFormat: (v) => "×" + fmtCompact(v) }),
    };
    let last = null, configJson = "";

    function render(doc) {
      last = doc;
      if (doc.error) return renderError(doc.error);
      if (isNum(doc.server_time)) clockOffset = doc.server_time - Date.now() / 1000;
      document.title = `${doc.name || doc.run_id} · step ${stepsDone(doc)}/${doc.total_steps} · Psyche`;
      $("#run-name").textContent = doc.name || doc.run_id;
      $("#run-desc").textContent = doc.description || "";
      $("#run-ids").textContent = `run ${doc.run_id}` + (doc.digest ? ` · state ${doc.digest.slice(0, 12)}` : "") +
        (isNum(doc.seq) ? ` · log #${doc.seq}` : "");
      $("#run-badge").innerHTML = badge(doc.state);
      noteClients([...(doc.accounts || []).map((a) => a.id), ...(doc.clients || []).map((c) => c.id), ...(doc.pending || [])]);
      renderStats(doc);
      renderCharts(doc.history || []);
      renderClients(doc);
      renderWitness(doc);
      renderCheckpoints(doc.checkpoints || []);
      renderTry(doc);
      const cj = JSON.stringify(doc.config || {});
      if (cj !== configJson) { configJson = cj; renderConfig(doc.config || {}); }
    }

    function renderError(message) {
      $("#stats").innerHTML = `<div class="panel error-card" style="grid-column:1/-1">${esc(message)} · <a href="/">all runs</a></div>`;
    }

    function phaseLine(doc) {
      if (doc.state === "WaitingForMembers") {
        const need = doc.config && doc.config.coordinator ? doc.config.coordinator.init_min_clients : null;
        const have = (doc.pending || []).length + (doc.clients || []).length;
        return isNum(need) && have < need ? `${have} of ${need} clients joined` : "starting soon";
      }
      if (isNum(doc.phase_deadline)) return `<span data-deadline="${doc.phase_deadline}"></span> left`;
      if (isNum(doc.phase_time_left)) return fmtDur(doc.phase_time_left) + " left";
      return doc.state === "Finished" ? "all steps trained" : "";
    }

    // What the run does with its steps right now, under the count of those done.
    function stepNow(doc, done) {
      const round = doc.round;
      if (doc.state === "Finished") return `all ${fmtInt(doc.total_steps)} steps done`;
      if (round && doc.state === "RoundTrain") return `now training step ${fmtInt(round.step)}`;
      if (round && doc.state === "RoundWitness") return `now witnessing step ${fmtInt(round.step)}`;
      return done ? `next: step ${fmtInt(done + 1)}` : "no step trained yet";
    }

    function stat(label, value, sub, extra) {
      return `<div class="panel stat"><div class="label">${label}</div><div class="value">${value}</div>` +
        (sub ? `<div class="sub">${sub}</div>` : "") + (extra || "") + "</div>";
    }

    function renderStats(doc) {
      const hist = doc.history || [];
      const lastRow = hist.length ? hist[hist.length - 1] : {};
      const vals = hist.filter((h) => isNum(h.val_loss));
      const lastVal = vals.length ? vals[vals.length - 1] : null;
      const done = stepsDone(doc);
      const pct = doc.total_steps ? Math.min(100, (100 * done) / doc.total_steps) : 0;
      const clients = doc.clients || [];
      const healthy = clients.filter((c) => c.state === "Healthy").length;
      const unhealthy = clients.length - healthy;
      const pending = (doc.pending || []).length;
      const ratio = [...hist].reverse().find((h) => isNum(h.compression_ratio));
      $("#stats").innerHTML = [
        stat("Phase", `<span class="phase">${esc(PHASES[doc.state] || doc.state)}</span>`, phaseLine(doc)),
        stat(`<span title="${STEPS_TITLE}">Step</span>`,
          `<span id="step-value">${fmtInt(done)}</span> <span class="faint" style="font-size:15px">/ ${fmtInt(doc.total_steps)}</span>`,
          `<span id="step-now">${esc(stepNow(doc, done))}</span> · epoch ${fmtInt(doc.epoch)}`,
          `<div class="progress"><span style="width:${pct}%"></span></div>`),
        stat("Loss", fmtLoss(lastRow.loss), lastVal ? `validation ${fmtLoss(lastVal.val_loss)} at step ${lastVal.step}` : "validation not measured yet"),
        stat("Tokens / s", fmtCompact(isNum(lastRow.tokens_per_sec) ? lastRow.tokens_per_sec : doc.tokens_per_sec),
          `${fmtCompact(doc.tokens_trained)} tokens trained`),
        stat("Clients", `${healthy}` + (clients.length !== healthy ? ` <span class="faint" style="font-size:15px">/ ${clients.length}</span>` : ""),
          [unhealthy ? `${unhealthy} left this epoch` : clients.length ? "healthy" : "none in this epoch",
           pending ? `${pending} joining next epoch` : ""].filter(Boolean).join(" · ")),
        stat("Sent per step", fmtBytes(lastRow.bytes_per_step),
          (ratio ? `<b>×${fmtCompact(ratio.compression_ratio)}</b> fewer bytes than ` : "vs ") +
          (isNum(doc.fp32_bytes_per_step) ? `an fp32 all-reduce (${fmtBytes(doc.fp32_bytes_per_step)} per client)` : "an fp32 all-reduce")),
      ].join("");
      tick();
    }

    function renderCharts(hist) {
      const pts = (key) => hist.filter((h) => isNum(h[key])).map((h) => [h.step, h[key]]);
      const s1 = cssVar("--series-1"), s2 = cssVar("--series-2"), s3 = cssVar("--series-3"), s4 = cssVar("--series-4");
      charts.loss.update([{ name: "train", color: s1, points: pts("loss") },
                          { name: "validation", color: s2, points: pts("val_loss"), dash: true, dots: true }]);
      charts.tps.update([{ name: "tokens/s", color: s3, points: pts("tokens_per_sec"), area: true }]);
      charts.bytes.update([{ name: "bytes", color: s4, points: pts("bytes_per_step"), area: true }]);
      charts.ratio.update([{ name: "compression", color: s1, points: pts("compression_ratio") }]);
    }

    // A node's own bandwidth cap (psyche client --max-upload-rate / --max-download-rate).
    function capNote(limit) {
      return isNum(limit) ? `<div class="faint cap" title="capped by the node's owner">≤ ${fmtBytes(limit)}/s</div>` : "";
    }

    // A client's part of this round's batch, e.g. "12 (43%)".
    function fmtShare(c) {
      return isNum(c.share) ? `${fmtInt(c.share)} <span class="faint">(${Math.round(100 * c.share_fraction)}%)</span>` : dash;
    }

    function renderClients(doc) {
      const clients = doc.clients || [];
      const pending = doc.pending || [];
      $("#clients-note").textContent = `${clients.length} this epoch` + (pending.length ? `, ${pending.length} waiting for the next` : "") +
        (doc.shares ? ` · batch cut ${doc.shares === "even" ? "evenly" : "by speed"}` : "") +
        (doc.requeued_samples ? ` · ${fmtInt(doc.requeued_samples)} missed samples re-queued` : "") +
        (isNum(doc.verifiers) ? (doc.verifiers ? ` · each result checked by ${doc.verifiers} verifiers` : " · results not checked") : "") +
        (doc.access === "gated" ? ` · gated: ${fmtInt((doc.grants || []).length)} keys may join` +
          ((doc.authorizers || []).length ? `, ${fmtInt(doc.authorizers.length)} authorizers` : "") : "");
      const rows = clients.map((c) => `<tr>
          <td class="mono" title="${esc(c.id)}">${swatch(c.id)}${esc(shortId(c.id))}</td>
          <td><span class="health ${esc(c.state)}">${esc(c.state)}</span>${isNum(c.condemned_step) ?
            ` <span class="pill-bad" title="${esc(CONDEMNED_HELP)}">condemned at step ${fmtInt(c.condemned_step)}</span>` : ""}</td>
          <td>${c.role ? `<span class="role ${esc(c.role)}">${esc(c.role)}</span>` : `<span class="faint">${dash}</span>`}</td>
          <td class="num" title="${fmtInt(c.accepted_tokens)} tokens accepted this epoch">${fmtInt(c.points)}</td>
          <td class="num">${fmtShare(c)}</td>
          <td class="num">${isNum(c.throughput) ? fmtInt(c.throughput) + " tok/s" : dash}${isNum(c.ranks) && c.ranks > 1 ?
            `<div class="faint cap" title="one node training on several devices (psyche client --nproc-per-node)">${fmtInt(c.ranks)} ranks</div>` : ""}</td>
          <td class="num">${isNum(c.utilization) ? Math.round(100 * c.utilization) + "%" : dash}</td>
          <td class="num">${fmtBytes(c.bytes_sent)}${capNote(c.upload_limit)}</td>
          <td class="num">${fmtBytes(c.bytes_received)}${capNote(c.download_limit)}</td>
          <td class="num" data-seen="${isNum(c.last_seen) ? c.last_seen : ""}">${ago(c.last_seen)}</td></tr>`);
      for (const id of pending) {
        rows.push(`<tr><td class="mono" title="${esc(id)}">${swatch(id)}${esc(shortId(id))}</td>
          <td><span class="health">joining</span></td><td class="faint">next epoch</td>
          <td class="num">${fmtInt(((doc.accounts || []).find((a) => a.id === id) || {}).points)}</td>
          ${`<td class="num">${dash}</td>`.repeat(6)}</tr>`);
      }
      $("#clients-body").innerHTML = rows.length ? rows.join("") :
        `<tr><td colspan="10" class="muted">No clients yet. Start one with <code>psyche client --server ${esc(location.origin)}</code></td></tr>`;
    }

    function renderWitness(doc) {
      const rows = new Map();
      for (const r of doc.witness_rounds || []) rows.set(`${r.epoch}:${r.step}`, { stats: r });
      for (const r of doc.witness_outcomes || doc.rounds || []) {
        const key = `${r.epoch}:${r.step}`;
        rows.set(key, Object.assign(rows.get(key) || {}, { detail: r }));
      }
      const ordered = [...rows.values()].sort((a, b) => {
        const ra = a.detail || a.stats, rb = b.detail || b.stats;
        return rb.epoch - ra.epoch || rb.step - ra.step;
      }).slice(0, 64);
      $("#witness-body").innerHTML = ordered.length ? ordered.map(({ stats, detail }) => {
        const r = detail || stats;
        let seen = "", outcome = "", reports;
        if (detail) {
          const seenSet = new Set(detail.seen);
          // Same client, same place in every row (trainers come in each round's shuffle order).
          const byClient = [...detail.trainers].sort((a, b) => (clientOrder.get(a) ?? 1e9) - (clientOrder.get(b) ?? 1e9));
          seen = `<span class="seen">` + byClient.map((id) => {
            const c = idColor(id);
            return `<i class="${seenSet.has(id) ? "" : "no"}" title="${esc(shortId(id))}${seenSet.has(id) ? " seen" : " not seen"}" style="border-color:${c};background:${c}"></i>`;
          }).join("") + "</span>";
          const missing = detail.trainers.length - detail.seen.length;
          reports = `${detail.reports} of ${detail.witnesses.length} <span class="faint">(need ${fmtInt(detail.quorum)})</span>`;
          if (!detail.closed && detail.reports < detail.quorum) outcome = `<span class="faint">waiting for witnesses</span>`;
          else if (detail.reports < detail.quorum) outcome = `<span class="pill-bad">no quorum</span>`;
          else outcome = missing ? `<span class="pill-bad">${missing} not seen</span>` : `<span class="pill-ok">all seen</span>`;
        } else {
          // An older round: the coordinator keeps only its counts (see WITNESS_KEY).
          reports = `${stats.reports} of ${stats.witnesses}`;
          seen = `<span class="faint">${fmtInt(stats.trainers)} trainers</span>`;
          outcome = stats.reports > 0 ? `<span class="faint">details not kept</span>` : `<span class="pill-bad">no reports</span>`;
        }
        if (stats && stats.condemned) outcome += ` <span class="pill-bad">${fmtInt(stats.condemned)} condemned</span>`;
        return `<tr><td class="mono">${fmtInt(r.step)}${r.epoch ? ` <span class="faint">e${r.epoch}</span>` : ""}</td>
          <td class="num">${reports}</td><td>${seen}</td><td>${outcome}</td></tr>`;
      }).join("") : `<tr><td colspan="4" class="muted">No rounds witnessed yet.</td></tr>`;
    }

    // A checkpoint's location is what its client reported: a folder on that client's own
    // machine (often relative to where it runs), or a URL. Neither is served from here.
    const isUrl = (loc) => /^[a-z][a-z0-9+.-]*:\/\//i.test(loc || "");

    function renderCheckpoints(ckpts) {
      const list = [...ckpts].reverse();
      $("#ckpt-body").innerHTML = list.length ? list.map((c) => `<tr>
          <td class="mono">${fmtInt(c.step)} <span class="faint">epoch ${fmtInt(c.epoch)}</span></td>
          <td class="mono" title="client ${esc(c.client)}">${c.client ? swatch(c.client) + esc(shortId(c.client)) : dash}</td>
          <td class="mono faint hide-narrow" title="${esc(c.sha256)}">${esc((c.sha256 || "").slice(0, 12))}</td>
          <td class="path" title="${esc(isUrl(c.location) ? "a URL the client reported" : `a folder on the machine of client ${shortId(c.client)}, not on this server`)}"><code>${esc(c.location)}</code><button class="copy" data-copy="${esc(c.location)}">copy</button></td></tr>`).join("")
        : `<tr><td colspan="4" class="muted">No checkpoint yet: one is written at the end of each epoch.</td></tr>`;
      const latest = list[0];
      const where = latest && !isUrl(latest.location) ? `# on client ${shortId(latest.client)}'s machine, which wrote it (sha256 ${(latest.sha256 || "").slice(0, 12)}…)\n` : "";
      $("#ckpt-load").innerHTML = latest ? `<pre class="snippet">${esc(where)}from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(${esc(JSON.stringify(latest.location))})</pre>` : "";
    }

    function renderConfig(cfg) {
      const sections = [], top = [];
      for (const [k, v] of Object.entries(cfg)) {
        if (v && typeof v === "object" && !Array.isArray(v)) sections.push([k, v]); else top.push([k, v]);
      }
      if (top.length) sections.unshift(["run", Object.fromEntries(top)]);
      const val = (v) => (v === null ? "null" : typeof v === "object" ? JSON.stringify(v) : String(v));
      $("#config-grid").innerHTML = sections.map(([name, obj]) => `<div><h3>${esc(name)}</h3><dl>` +
        Object.entries(obj).map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(val(v))}</dd>`).join("") + "</dl></div>").join("");
    }

    // -- Try it: a completion streamed from the run's inference server (psyche serve) --------
    // It answers OpenAI's POST /v1/completions with server-sent events (data: {chunk} ... data: [DONE]);
    // each chunk says which step's checkpoint answered (chunk.psyche.step). Model output only ever
    // reaches the page as text nodes.

    const tryIt = { url: null, busy: false };

    function renderTry(doc) {
      const url = typeof doc.inference_url === "string" && doc.inference_url ? doc.inference_url : null;
      if (url === tryIt.url) return;
      tryIt.url = url;
      $("#try").hidden = !url;
      $("#try-where").textContent = url ? `the run's model, served at ${url}` : "";
    }

    // The step a chunk says answered: psyche's own field, else its system_fingerprint "psyche-step-N".
    function chunkStep(chunk) {
      if (chunk.psyche && isNum(chunk.psyche.step)) return chunk.psyche.step;
      const m = /^psyche-step-(\d+)$/.exec(chunk.system_fingerprint || "");
      return m ? +m[1] : null;
    }

    // What an error response says: OpenAI's {"error": {"message"}}, ours {"message"}, else its status.
    async function errorMessage(resp) {
      try {
        const body = await resp.json();
        if (body && body.error && typeof body.error.message === "string") return body.error.message;
        if (body && typeof body.message === "string") return body.message;
      } catch (e) { /* not JSON: the status says it */ }
      return `the inference server answered HTTP ${resp.status}` + (resp.statusText ? ` ${resp.statusText}` : "");
    }

    function tryMeta(answer, problem) {
      const bits = [];
      if (answer.step !== null) bits.push(tryIt.busy ? `step ${fmtInt(answer.step)} answering…` : `answered by step ${fmtInt(answer.step)}`);
      if (answer.model) bits.push(`model ${answer.model}`);
      const FINISH = { length: "stopped at max tokens", stop: "ended by the model" };
      if (answer.finish) bits.push(FINISH[answer.finish] || `finished (${answer.finish})`);
      const meta = $("#try-meta");
      meta.classList.toggle("bad", !!problem);
      meta.textContent = problem ? [problem, ...bits].join(" · ") : bits.join(" · ") || (tryIt.busy ? "waiting for the model…" : "");
    }

    // POST the completion and show its chunks as they come. Every failure ends up in the box.
    async function complete() {
      const url = tryIt.url;
      if (!url || tryIt.busy) return;
      const prompt = $("#try-prompt").value;
      const answer = { step: null, model: null, finish: null, done: false };
      const text = $("#try-text");
      tryIt.busy = true;
      $("#try-go").disabled = true;
      $("#try-out").hidden = false;
      $("#try-prompt-out").textContent = prompt;
      text.textContent = "";
      tryMeta(answer, null);
      try {
        let resp;
        try {
          resp = await fetch(url + "/v1/completions", {
            method: "POST", headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ prompt, max_tokens: +$("#try-max").value, temperature: +$("#try-temp").value, stream: true }),
          });
        } catch (e) {
          throw new Error(`cannot reach the inference server at ${url}`);
        }
        if (!resp.ok) throw new Error(await errorMessage(resp));
        if (!resp.body) throw new Error("the inference server sent no stream");
        const reader = resp.body.getReader(), decoder = new TextDecoder();
        let buf = "", data = [];
        // One event's data lines are complete: a chunk, or the end.
        const dispatch = () => {
          const payload = data.join("\n");
          data = [];
          if (!payload) return;
          if (payload === "[DONE]") { answer.done = true; return; }
          let chunk;
          try { chunk = JSON.parse(payload); } catch (e) { throw new Error("the inference server sent a chunk that is not JSON"); }
          if (chunk.error) throw new Error(chunk.error.message || "the inference server failed mid-answer");
          const choice = (chunk.choices || [])[0] || {};
          if (typeof choice.text === "string" && choice.text) text.append(choice.text);
          if (choice.finish_reason) answer.finish = choice.finish_reason;
          const step = chunkStep(chunk);
          if (step !== null) answer.step = step;
          if (typeof chunk.model === "string") answer.model = chunk.model;
          tryMeta(answer, null);
        };
        while (!answer.done) {
          let part;
          try { part = await reader.read(); } catch (e) { throw new Error("the connection to the inference server broke off"); }
          if (part.done) break;
          buf += decoder.decode(part.value, { stream: true });
          // Server-sent events, line by line (a line ends in \n, \r\n or \r; a blank one ends an event).
          for (let m; !answer.done && (m = /\r\n|\r|\n/.exec(buf));) {
            if (m[0] === "\r" && m.index === buf.length - 1) break; // maybe half of a \r\n: wait for the rest
            const line = buf.slice(0, m.index);
            buf = buf.slice(m.index + m[0].length);
            if (line === "") dispatch();
            else if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
          }
        }
        if (answer.done) reader.cancel().catch(() => {});
        else if (!answer.finish) throw new Error("the answer stopped before its end");
        tryIt.busy = false;
        tryMeta(answer, answer.step === null && !text.textContent ? "no answer" : null);
      } catch (e) {
        tryIt.busy = false;
        tryMeta(answer, e instanceof Error ? e.message : String(e));
      } finally {
        tryIt.busy = false;
        $("#try-go").disabled = false;
      }
    }

    $("#try-form").addEventListener("submit", (ev) => { ev.preventDefault(); complete(); });
    $("#try-prompt").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); $("#try-form").requestSubmit(); }
    });

    // Countdowns and ages move every second between pushes.
    function tick() {
      for (const node of document.querySelectorAll("[data-deadline]")) node.textContent = fmtDur(+node.dataset.deadline - serverNow());
      for (const node of document.querySelectorAll("[data-seen]")) if (node.dataset.seen) node.textContent = ago(+node.dataset.seen);
    }
    setInterval(tick, 1000);

    root.addEventListener("click", (ev) => {
      const btn = ev.target.closest("button.copy");
      if (!btn) return;
      const text = btn.dataset.copy;
      const done = () => { btn.textContent = "copied"; setTimeout(() => (btn.textContent = "copy"), 1200); };
      if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).then(done, () => {});
      else {
        const ta = document.createElement("textarea");
        ta.value = text; document.body.appendChild(ta); ta.select();
        try { document.execCommand("copy"); done(); } catch (e) { /* nothing to do */ }
        ta.remove();
      }
    });
    // Colours come from CSS variables: redraw when the system switches light/dark.
    if (window.matchMedia) {
      window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => { if (last && !last.error) renderCharts(last.history || []); });
    }

    follow(`/api/runs/${encodeURIComponent(runId)}/live`, render, renderError);
  }

  // -- routing ------------------------------------------------------------------

  function start() {
    conn.el = $("#conn");
    const root = $("#app");
    const m = location.pathname.match(/^\/runs\/([^/]+)\/?$/);
    if (m) runView(root, decodeURIComponent(m[1]));
    else runsView(root);
  }

  window.PsycheDashboard = { applyDelta }; // for the browser test

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
