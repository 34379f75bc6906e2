// The unlearnd admin console: calls the admin API with the key typed in, which lives in this closure only
// (never in the address, a cookie or storage). Every value from the server is shown as text, never as HTML.
"use strict";
(() => {
  let adminKey = null;
  let currentId = null;
  let timer = null;
  let plotShown = null; // the evidence run whose plot is on the page
  const $ = (id) => document.getElementById(id);

  async function call(method, path, body) {
    const headers = { Authorization: `Bearer ${adminKey}` };
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (response.status === 401) {
      logout("The admin key was refused.");
      throw new Error("the admin key was refused");
    }
    return response;
  }

  async function callJson(method, path, body) {
    const response = await call(method, path, body);
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error((data.error && data.error.message) || `HTTP ${response.status}`);
    return data;
  }

  function row(tbody, values) {
    const tr = document.createElement("tr");
    for (const value of values) {
      const td = document.createElement("td");
      if (value instanceof Node) td.appendChild(value);
      else td.textContent = value === null || value === undefined ? "" : String(value);
      tr.appendChild(td);
    }
    tbody.appendChild(tr);
    return tr;
  }

  function fields(dl, pairs) {
    dl.replaceChildren();
    for (const [name, value] of pairs) {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = value === null || value === undefined ? "-" : String(value);
      dl.append(dt, dd);
    }
  }

  function verdictText(verdict) {
    const span = document.createElement("span");
    span.textContent = verdict || "none yet";
    if (verdict) span.className = `verdict-${verdict}`;
    return span;
  }

  // -- log in / out ------------------------------------------------------------------------------
  async function login(event) {
    event.preventDefault();
    const input = $("admin-key");
    adminKey = input.value;
    input.value = "";
    $("login-error").hidden = true;
    try {
      await refreshList();
    } catch (error) {
      if (adminKey) logout(`Could not log in: ${error.message}.`); // a 401 has logged out already
      return;
    }
    callJson("GET", "/v1/models").then((models) => {
      $("model-name").textContent = models.data.map((m) => m.id).join(", ");
      $("model-line").hidden = false;
    }).catch(() => {});
    $("login-view").hidden = true;
    $("app").hidden = false;
    $("logout").hidden = false;
    showList();
    refreshLive();
    timer = setInterval(tick, 3000);
  }

  function logout(message) {
    adminKey = null;
    currentId = null;
    clearInterval(timer);
    for (const tbody of document.querySelectorAll("tbody")) tbody.replaceChildren();
    for (const id of ["detail-fields", "live-numbers", "model-name", "detail-title", "detail-message",
      "register-message", "evidence-status", "evidence-controls", "evidence-error", "login-error"]) {
      $(id).replaceChildren();
    }
    $("model-line").hidden = true;
    $("register-form").reset();
    const img = $("evidence-plot");
    if (img.src) URL.revokeObjectURL(img.src);
    img.hidden = true;
    img.removeAttribute("src");
    plotShown = null;
    showList();
    $("app").hidden = true;
    $("logout").hidden = true;
    $("login-view").hidden = false;
    $("login-error").hidden = !message;
    if (message) $("login-error").textContent = message + " Nothing is shown without the right key.";
    $("admin-key").focus();
  }

  async function tick() {
    if (!adminKey) return;
    try {
      await refreshLive();
      if (currentId) await refreshDetail(currentId, false);
      else await refreshList();
    } catch (error) {
      /* shown by the next successful refresh */
    }
  }

  // -- the list ----------------------------------------------------------------------------------
  async function refreshList() {
    const data = await callJson("GET", "/v1/unlearning/requests");
    const tbody = $("requests").querySelector("tbody");
    tbody.replaceChildren();
    for (const request of data.data) {
      const link = document.createElement("a");
      link.href = "#";
      link.className = "request-link";
      link.textContent = request.name;
      link.addEventListener("click", (event) => {
        event.preventDefault();
        openDetail(request.id);
      });
      const served = request.served || {};
      row(tbody, [link, request.method, request.status, served.routed, served.output_blocked,
        verdictText(request.evidence), request.id]).dataset.id = request.id;
    }
    $("no-requests").hidden = data.data.length > 0;
  }

  function showList() {
    currentId = null;
    $("detail-view").hidden = true;
    $("list-view").hidden = false;
    $("register-view").hidden = false;
  }

  // -- registering -------------------------------------------------------------------------------
  async function examples() {
    const file = $("reg-file").files[0];
    const items = [];
    if (file) {
      for (const line of (await file.text()).split("\n")) {
        if (line.trim()) items.push(JSON.parse(line));
      }
    }
    for (const line of $("reg-qa").value.split("\n")) {
      if (!line.trim()) continue;
      const [question, ...answer] = line.split("|");
      items.push({ question: question.trim(), answer: answer.join("|").trim() });
    }
    return items;
  }

  async function register(event) {
    event.preventDefault();
    const message = $("register-message");
    try {
      const forget = await examples();
      if (!forget.length) throw new Error("give at least one question and answer");
      const body = { name: $("reg-name").value.trim(), method: $("reg-method").value, forget };
      const created = await callJson("POST", "/v1/unlearning/requests", body);
      message.textContent = `Registered ${created.id} (${created.status}).`;
      $("register-form").reset();
      await refreshList();
    } catch (error) {
      message.textContent = `Not registered: ${error.message}`;
    }
  }

  // -- one request -------------------------------------------------------------------------------
  async function openDetail(id) {
    currentId = id;
    $("list-view").hidden = true;
    $("register-view").hidden = true;
    $("detail-view").hidden = false;
    $("detail-message").textContent = "";
    $("evidence-plot").hidden = true;
    await refreshDetail(id, true);
    $("detail-title").focus();
  }

  async function refreshDetail(id, withPlot) {
    const request = await callJson("GET", `/v1/unlearning/requests/${encodeURIComponent(id)}`);
    $("detail-title").textContent = `Request: ${request.name}`;
    const served = request.served || {};
    fields($("detail-fields"), [["Id", request.id], ["Method", request.method], ["Status", request.status],
      ["Error", request.error], ["Forget examples", (request.spec && request.spec.forget.length)],
      ["Routed here", served.routed], ["Output blocked here", served.output_blocked],
      ["Evidence", request.evidence]]);
    await refreshEvidence(id, withPlot);
    await refreshHistory(id);
  }

  async function refreshEvidence(id, withPlot) {
    const path = `/v1/unlearning/requests/${encodeURIComponent(id)}/evidence`;
    const response = await call("GET", path);
    const table = $("evidence-table");
    const tbody = table.querySelector("tbody");
    if (response.status === 404) {
      $("evidence-status").textContent = "No evidence yet: it is collected once the request is active.";
      $("evidence-controls").textContent = "";
      $("evidence-error").hidden = true;
      table.hidden = true;
      return;
    }
    const evidence = await response.json();
    const status = $("evidence-status");
    status.replaceChildren();
    status.append("Verdict: ", verdictText(evidence.verdict), ` (run ${evidence.status})`);
    const summary = evidence.summary;
    $("evidence-error").textContent = evidence.error ? `The battery failed: ${evidence.error}` : "";
    $("evidence-error").hidden = !evidence.error;
    tbody.replaceChildren();
    table.hidden = !summary;
    $("evidence-controls").textContent = "";
    if (!summary) return;
    const share = (rate) => (rate.n ? `${rate.hits}/${rate.n}` : "n/a");
    for (const [form, counts] of Object.entries(summary.families)) {
      row(tbody, [form, counts.probes, counts.named, share(counts.leaks), share(counts.unprotected)]);
    }
    $("evidence-controls").textContent = `Controls untouched (answered by the unchanged model): ${share(summary.controls_untouched)}. ` +
      `Leaks in all: ${share(summary.leaks)}; reached the model unprotected: ${share(summary.unprotected)}.`;
    if (evidence.verdict && (withPlot || plotShown !== evidence.finished_at)) {
      plotShown = evidence.finished_at;
      const png = await call("GET", `${path}?format=png`);
      if (png.ok) {
        const img = $("evidence-plot");
        if (img.src) URL.revokeObjectURL(img.src);
        img.src = URL.createObjectURL(await png.blob());
        img.hidden = false;
      }
    }
  }

  async function refreshHistory(id) {
    const log = await callJson("GET", `/v1/unlearning/audit?request_id=${encodeURIComponent(id)}`);
    const tbody = $("history").querySelector("tbody");
    tbody.replaceChildren();
    for (const entry of log.data) {
      const when = new Date(entry.at * 1000).toISOString().replace("T", " ").slice(0, 19);
      row(tbody, [entry.seq, when, entry.actor, entry.action, JSON.stringify(entry.details)]);
    }
  }

  function confirmed(text) {
    const dialog = $("confirm");
    $("confirm-text").textContent = text;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.returnValue = "cancel";
      dialog.showModal();
      $("confirm-cancel").focus();
    });
  }

  async function act(question, method, suffix, done) {
    const id = currentId;
    if (!id || !(await confirmed(question))) return;
    try {
      await callJson(method, `/v1/unlearning/requests/${encodeURIComponent(id)}${suffix}`);
      $("detail-message").textContent = done;
      if (suffix.includes("purge")) {
        showList();
        await refreshList();
        $("register-message").textContent = `${id} purged.`;
      } else {
        await refreshDetail(id, true);
      }
    } catch (error) {
      $("detail-message").textContent = `Failed: ${error.message}`;
    }
  }

  // -- live numbers from /metrics ------------------------------------------------------------------
  function metricSums(text) {
    const sums = {};
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const match = line.match(/^([a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$/);
      if (!match) continue;
      const key = match[1] + (match[1] === "unlearnd_requests_total" ? (match[2] || "").replace(/,?endpoint="[^"]*"/, "") : "");
      sums[key] = (sums[key] || 0) + Number(match[3]);
    }
    return sums;
  }

  async function refreshLive() {
    const response = await call("GET", "/metrics");
    if (!response.ok) return;
    const sums = metricSums(await response.text());
    const routes = Object.keys(sums).filter((k) => k.startsWith("unlearnd_requests_total{"));
    const count = sums.unlearnd_classifier_latency_seconds_count || 0;
    const pairs = routes.map((k) => [`Requests, route ${k.match(/route="([^"]*)"/)[1]}`, sums[k]]);
    pairs.push(["Detector latency, mean", count ? `${((sums.unlearnd_classifier_latency_seconds_sum / count) * 1000).toFixed(2)} ms` : "n/a"]);
    pairs.push(["Outputs blocked", sums.unlearnd_output_blocked_total || 0]);
    pairs.push(["Active forget requests", sums.unlearnd_active_forget_requests || 0]);
    fields($("live-numbers"), pairs);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", () => logout(""));
    $("register-form").addEventListener("submit", register);
    $("back").addEventListener("click", async () => {
      showList();
      await refreshList();
    });
    $("detail-title").tabIndex = -1;
    $("act-evidence").addEventListener("click", () =>
      act("Run the evidence probes for this request again?", "POST", "/evidence", "Evidence queued."));
    $("act-retrain").addEventListener("click", () =>
      act("Send this request back to training?", "POST", "/retrain", "Sent back to training."));
    $("act-deactivate").addEventListener("click", () =>
      act("Deactivate this request? The model will answer about it again.", "DELETE", "", "Deactivated."));
    $("act-purge").addEventListener("click", () =>
      act("Purge this request? Its data, artifacts and evidence are deleted; the audit entries stay.",
        "DELETE", "?purge=true", "Purged."));
    $("admin-key").focus();
  });
})();
