// Inferstream live dashboard: polls this worker's /dashboard/api/* with the key kept in sessionStorage.
// Every value reaches the page through textContent, never innerHTML: the data (user ids, error
// messages) is not trusted markup. The page's Content-Security-Policy allows this script only.
"use strict";

(function () {
  const KEY = "inferstream.dashboard.key";
  const POLL_MS = 2000;
  let timer = null;

  const $ = (id) => document.getElementById(id);

  function fmt(value, digits) {
    if (value === null || value === undefined) return "-";
    if (typeof value !== "number") return String(value);
    if (digits === undefined) return Number.isInteger(value) ? String(value) : value.toFixed(2);
    return value.toFixed(digits);
  }

  function seconds(value) {
    if (value === null || value === undefined) return "-";
    return value < 0.01 ? value.toFixed(4) : value.toFixed(3);
  }

  // Replace a table's rows: cells are [text, className?] pairs or plain values.
  function fill(tableId, rows, rowId) {
    const body = $(tableId).tBodies[0];
    const fresh = document.createElement("tbody");
    for (const cells of rows) {
      const tr = document.createElement("tr");
      if (rowId) tr.id = rowId(cells);
      for (const cell of cells.cells) {
        const td = document.createElement("td");
        const [text, cls] = Array.isArray(cell) ? cell : [cell, undefined];
        td.textContent = text;
        if (cls) td.className = cls;
        tr.appendChild(td);
      }
      fresh.appendChild(tr);
    }
    body.replaceWith(fresh);
  }

  const slug = (text) => String(text).replace(/[^a-z0-9]+/gi, "-").toLowerCase();

  function renderStats(s) {
    $("worker").textContent = s.worker + " (" + s.roles.join(", ") + ")";
    $("whoami").textContent = "Signed in as " + s.user_id + (s.admin ? " (admin)" : "");
    $("window").textContent = s.window_s > 0 ? "over the last " + Math.round(s.window_s) + " s" : "";
    fill("throughput", s.throughput.map((r) => ({
      name: r.name, cells: [r.name, [fmt(r.total), "num total"], [fmt(r.per_s, 2), "num rate"]],
    })), (r) => "rate-" + slug(r.name));
    fill("latency", s.latency.map((r) => ({
      name: r.stage,
      cells: [r.stage, [fmt(r.count), "num count"], [seconds(r.p50), "num p50"],
              [seconds(r.p90), "num p90"], [seconds(r.p99), "num p99"]],
    })), (r) => "latency-" + slug(r.name));
    fill("queues", s.queues.map((q) => ({ cells: [q.task, q.model, q.priority, [fmt(q.depth), "num"]] })));
    fill("lag", s.lag.map((l) => ({ cells: [l.topic, l.partition, [fmt(l.lag), "num"]] })));
    fill("breakers", s.breakers.map((b) => ({
      cells: [b.task, b.model, b.backend, [b.state, "state-" + b.state]],
    })));
    fill("dead", s.dead_letters.map((d) => ({ cells: [d.task, d.model, [fmt(d.total), "num"]] })));
    $("dead-total").textContent = s.dead_letters_total === null ? "" : "(" + fmt(s.dead_letters_total) + ")";
    $("sse").textContent = fmt(s.sse_clients);
    fill("failures", s.recent_failures.map((f) => ({
      cells: [f.at || "", f.request_id, f.user_id, f.task + "/" + f.model, f.type, f.message],
    })));
  }

  function renderQuota(q) {
    $("quota-scope").textContent = q.scope === "all" ? "(every user this worker holds)" : "(yours)";
    fill("quota", q.users.map((u) => ({
      user: u.user_id,
      cells: [u.user_id, u.plan, [fmt(u.requests.used), "num requests-used"], [fmt(u.requests.limit), "num"],
              [fmt(u.tokens.used), "num"], [fmt(u.tokens.reserved), "num"], [fmt(u.tokens.limit), "num"]],
    })), (u) => "quota-" + slug(u.user));
  }

  async function getJson(path, key) {
    const response = await fetch(path, { headers: { Authorization: "Bearer " + key }, cache: "no-store" });
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      const message = body && body.error ? body.error.message : "HTTP " + response.status;
      const err = new Error(message);
      err.status = response.status;
      throw err;
    }
    return body;
  }

  function setStatus(text, cls) {
    const pill = $("status");
    pill.textContent = text;
    pill.className = "pill " + (cls || "");
  }

  async function poll() {
    const key = sessionStorage.getItem(KEY);
    if (!key) return signOut("");
    try {
      const [stats, quota] = await Promise.all([
        getJson("/dashboard/api/stats", key), getJson("/dashboard/api/quota", key),
      ]);
      renderStats(stats);
      renderQuota(quota);
      $("error").textContent = "";
      setStatus("live", "live");
      $("status").dataset.updated = String(Date.now());
    } catch (err) {
      if (err.status === 401) return signOut(err.message);
      $("error").textContent = err.message;
      setStatus("stale", "stale");
    }
    timer = setTimeout(poll, POLL_MS);
  }

  function signIn() {
    $("login").hidden = true;
    $("board").hidden = false;
    $("forget").hidden = false;
    clearTimeout(timer);
    poll();
  }

  function signOut(message) {
    clearTimeout(timer);
    sessionStorage.removeItem(KEY);
    $("board").hidden = true;
    $("forget").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    setStatus("signed out", "");
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("key").value.trim();
      $("key").value = "";
      if (!key) return;
      sessionStorage.setItem(KEY, key);
      signIn();
    });
    $("forget").addEventListener("click", () => signOut(""));
    if (sessionStorage.getItem(KEY)) signIn();
  });
})();
