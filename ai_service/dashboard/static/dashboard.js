// The dashboard page: a snapshot and then every change from /v1/dashboard/events.
// The stream is read with fetch (an EventSource cannot send the HTTP_TOKEN bearer token).
"use strict";

const API = "/v1/dashboard";
const CHARTS = {
  loss: ["train_loss", "box_loss", "cls_loss", "dfl_loss", "val_box_loss", "val_cls_loss", "val_dfl_loss"],
  map: ["mAP50", "mAP50_95"],
  pr: ["precision", "recall"],
};
const COLORS = ["#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f", "#5d4037"];

const view = {
  workers: new Map(), jobs: new Map(), queues: [], connected: false, clockOffset: 0,
  selected: new URLSearchParams(location.search).get("job"), pinned: false,
  history: [], charts: {}, drawQueued: false,
};

// --- helpers ---------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
  '"': "&quot;", "'": "&#39;"}[c]));
const key = (job) => `${job.op}/${job.job_id}`;
const now = () => Date.now() / 1000 + view.clockOffset;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function headers() {
  const token = sessionStorage.getItem("aiToken");
  return token ? {Authorization: `Bearer ${token}`} : {};
}

function toast(text) {
  $("toast").textContent = text;
}

function duration(seconds) {
  if (seconds == null) return "";
  const s = Math.max(0, Math.round(seconds));
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.floor(s % 3600 / 60)} min`
    : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

function bar(progress) {
  if (progress == null) return "";
  return `<span class="bar"><i style="width:${Math.min(100, progress)}%"></i></span> ${progress.toFixed(1)}%`;
}

async function api(path, options = {}) {
  const response = await fetch(API + path, {...options, headers: {...headers(), ...(options.headers || {})}});
  if (response.status === 401) { askToken(); throw new Error("HTTP_TOKEN needed"); }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || `HTTP ${response.status}`);
  return body;
}

function askToken() {
  $("token-form").hidden = false;
  toast("this dashboard needs HTTP_TOKEN");
}

// --- the event stream ------------------------------------------------------------------

async function stream() {
  for (;;) {
    try {
      const response = await fetch(API + "/events", {headers: headers()});
      if (response.status === 401) { askToken(); await sleep(2000); continue; }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          handle(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (error) {
      console.warn("event stream:", error);
    }
    setBroker(false, "dashboard unreachable");
    await sleep(2000);
  }
}

function handle(block) {
  let event = "message", data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  if (!data) return;
  const body = JSON.parse(data);
  if (event === "snapshot") snapshot(body);
  else if (event === "worker") view.workers.set(body.worker.name, body.worker);
  else if (event === "job") jobChanged(body.job, body.point);
  else if (event === "queues") view.queues = body.queues;
  else if (event === "broker") setBroker(body.connected);
  redraw();
}

function snapshot(body) {
  view.clockOffset = body.now - Date.now() / 1000;
  view.workers = new Map(body.workers.map((w) => [w.name, w]));
  view.jobs = new Map(body.jobs.map((j) => [key(j), j]));
  view.queues = body.queues;
  setBroker(body.connected);
  if (!view.selected) {
    const jobs = [...view.jobs.values()].filter((j) => j.op === "train");
    const first = jobs.find((j) => j.state === "running") || jobs[0];
    if (first) view.selected = key(first);
  }
  if (view.selected && view.jobs.has(view.selected)) select(view.selected, view.pinned);
}

function jobChanged(job, point) {
  view.jobs.delete(key(job));
  view.jobs = new Map([[key(job), job], ...view.jobs]);  // the latest first
  const current = view.jobs.get(view.selected);
  if (!view.pinned && job.op === "train" && job.state === "running" && view.selected !== key(job)
      && !(current && current.state === "running")) {
    select(key(job), false);  // follow the running training job until one is picked
    return;
  }
  if (key(job) !== view.selected) return;
  if (point) addPoint(point);
  showJob(job);
}

function setBroker(connected, text) {
  view.connected = connected;
  const pill = $("broker");
  pill.className = `pill ${connected ? "on" : "off"}`;
  pill.textContent = text || (connected ? "RabbitMQ connected" : "RabbitMQ offline");
}

// --- tables ----------------------------------------------------------------------------

function redraw() {
  if (view.drawQueued) return;
  view.drawQueued = true;
  requestAnimationFrame(() => {
    view.drawQueued = false;
    drawWorkers();
    drawJobs();
    drawQueues();
  });
}

function workerState(w) {
  const every = w.interval_seconds || 5;
  return w.state !== "stopped" && now() - w.last_seen > 3 * every ? "lost" : w.state;
}

function drawWorkers() {
  const rows = [...view.workers.values()].sort((a, b) => a.name.localeCompare(b.name)).map((w) => {
    const state = workerState(w);
    return `<tr data-worker="${esc(w.name)}"><td>${esc(w.worker)}</td><td>${esc(w.operation)}</td>
      <td>${esc(w.device)}${w.gpu ? ` (${esc(w.gpu)})` : ""}</td><td><span class="state ${esc(state)}">${esc(state)}</span></td>
      <td>${esc(w.job_id || "")}</td><td>${w.progress != null ? w.progress.toFixed(1) + "%" : ""}</td>
      <td>${duration(now() - w.last_seen)} ago</td></tr>`;
  });
  $("workers").tBodies[0].innerHTML = rows.join("") || '<tr class="empty"><td colspan="7">no heartbeat yet</td></tr>';
}

function drawJobs() {
  const rows = [...view.jobs.values()].map((j) => {
    const k = key(j);
    const running = !j.terminal && j.op !== "infer";
    const epoch = j.current_epoch != null ? `${j.current_epoch}${j.total_epochs ? "/" + j.total_epochs : ""}` : "";
    const map = j.metrics && j.metrics.mAP50 != null ? j.metrics.mAP50.toFixed(3) : "";
    return `<tr data-job="${esc(k)}" data-state="${esc(j.state)}" class="${k === view.selected ? "selected" : ""}">
      <td>${esc(j.op)}</td><td>${esc(j.job_id)}</td><td><span class="state ${esc(j.state)}">${esc(j.state)}</span></td>
      <td>${bar(j.progress)}</td><td>${epoch}</td><td>${duration(j.eta_seconds)}</td><td>${map}</td>
      <td>${esc(j.worker || "")}</td><td title="${esc(j.error_message || "")}">${esc(j.error_code || "")}</td>
      <td>${running ? `<button class="danger" data-cancel="${esc(k)}">cancel</button>` : ""}</td></tr>`;
  });
  $("jobs").tBodies[0].innerHTML = rows.join("") || '<tr class="empty"><td colspan="10">no job yet</td></tr>';
}

function drawQueues() {
  $("queues").tBodies[0].innerHTML = view.queues.map((q) => {
    const missing = q.messages == null;
    const show = q.role === "dlq" && q.messages > 0 ? `<button data-dlq="${esc(q.op)}">show</button>` : "";
    return `<tr data-queue="${esc(q.queue)}"><td>${esc(q.op)}</td><td>${esc(q.queue)}</td>
      <td>${missing ? '<span class="muted">not declared</span>' : q.messages}</td>
      <td>${missing ? "" : q.consumers}</td><td>${show}</td></tr>`;
  }).join("");
}

// --- the job panel and its charts ------------------------------------------------------

async function select(k, pinned) {
  view.selected = k;
  view.pinned = pinned;
  view.history = [];
  resetCharts();
  redraw();
  const [op, ...rest] = k.split("/");
  try {
    const job = await api(`/jobs/${encodeURIComponent(op)}/${encodeURIComponent(rest.join("/"))}`);
    if (view.selected !== k) return;
    showJob(view.jobs.get(k) || job);  // first: the charts size themselves to the visible panel
    for (const point of job.history) addPoint(point);
  } catch (error) {
    toast(`job ${k}: ${error.message}`);
  }
}

function showJob(job) {
  $("job-panel").hidden = false;
  $("job-title").textContent = key(job);
  const state = $("job-state");
  state.textContent = job.state;
  state.className = `state ${job.state}`;
  const parts = [job.worker && `on ${job.worker}`, job.current_epoch != null && `epoch ${job.current_epoch}` +
    (job.total_epochs ? ` of ${job.total_epochs}` : ""), job.eta_seconds != null && `ETA ${duration(job.eta_seconds)}`,
    job.error_code && `${job.error_code}: ${job.error_message || ""}`];
  $("job-line").textContent = parts.filter(Boolean).join(" · ");
  $("job-artifacts").innerHTML = job.artifacts && job.artifacts.length ? "<h3>artifacts</h3><ul>" +
    job.artifacts.map((a) => `<li>${esc(a.format)}: ${esc(a.path)} (${a.size_bytes} bytes${a.verified ? ", verified" : ""})</li>`)
      .join("") + "</ul>" : "";
  $("job-terminal-box").hidden = !job.terminal;
  $("job-terminal").textContent = job.terminal ? JSON.stringify(job.terminal, null, 2) : "";
}

function addPoint(point) {
  while (view.history.length && view.history[view.history.length - 1].epoch >= point.epoch) view.history.pop();
  view.history.push(point);
  $("charts").dataset.points = String(view.history.length);
  drawCharts();
}

function resetCharts() {
  for (const chart of Object.values(view.charts)) chart.destroy();
  view.charts = {};
  $("charts").dataset.points = "0";
}

function drawCharts() {
  for (const [name, keys] of Object.entries(CHARTS)) {
    const width = Math.max(280, $(`chart-${name}`).clientWidth || 320);
    const shown = keys.filter((k) => view.history.some((p) => p[k] != null));
    if (!shown.length) continue;
    const data = [view.history.map((p) => p.epoch), ...shown.map((k) => view.history.map((p) => p[k] ?? null))];
    let chart = view.charts[name];
    if (chart && chart.series.length !== shown.length + 1) { chart.destroy(); chart = null; }
    if (!chart) {
      chart = new uPlot({
        width, height: 220, legend: {live: false},
        scales: {x: {time: false}, y: name === "loss" ? {} : {range: [0, 1]}},
        axes: [{label: "epoch", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]}, {}],
        series: [{label: "epoch"}, ...shown.map((k, i) => ({label: k, stroke: COLORS[i % COLORS.length], width: 2,
          points: {show: true, size: 5}}))],
      }, data, $(`chart-${name}`));
      view.charts[name] = chart;
    } else {
      chart.setData(data);
    }
  }
}

// --- buttons ---------------------------------------------------------------------------

async function cancel(k) {
  const [op, ...rest] = k.split("/");
  try {
    const answer = await api(`/jobs/${encodeURIComponent(op)}/${encodeURIComponent(rest.join("/"))}/cancel`,
      {method: "POST"});
    toast(`cancel sent for ${k}${answer.worker_listening ? "" : " (no worker listening: recorded for later)"}`);
  } catch (error) {
    toast(`cancel ${k}: ${error.message}`);
  }
}

async function showDeadLetters(op) {
  try {
    const dlq = await api(`/dlq/${encodeURIComponent(op)}`);
    $("dlq").innerHTML = `<h3>${esc(dlq.queue)} (${dlq.count})</h3><table><thead><tr><th>job</th><th>reason</th>
      <th>died at</th><th>size</th><th></th></tr></thead><tbody>` + dlq.letters.map((d) =>
      `<tr><td>${esc(d.job_id || "?")}</td><td>${esc(d.reason || "")}</td><td>${esc(d.dead_lettered_at || "")}</td>
       <td>${d.size_bytes}</td><td><button data-replay="${esc(op)}" data-message="${esc(d.message_id || "")}"
         data-index="${d.index}">replay</button></td></tr>`)
      .join("") + "</tbody></table>";
  } catch (error) {
    toast(`dead letters of ${op}: ${error.message}`);
  }
}

async function replay(op, messageId, index) {
  const which = messageId ? {message_id: messageId} : {index: Number(index)};
  try {
    await api(`/dlq/${encodeURIComponent(op)}/replay`, {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify(which)});
    toast(`replayed ${messageId || "#" + index} to the ${op} request queue`);
    showDeadLetters(op);
  } catch (error) {
    toast(`replay ${messageId || "#" + index}: ${error.message}`);
  }
}

document.addEventListener("click", (event) => {
  const target = event.target.closest("button, tr[data-job]");
  if (!target) return;
  if (target.dataset.cancel) cancel(target.dataset.cancel);
  else if (target.dataset.dlq) showDeadLetters(target.dataset.dlq);
  else if (target.dataset.replay) replay(target.dataset.replay, target.dataset.message, target.dataset.index);
  else if (target.dataset.job) select(target.dataset.job, true);
});

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("aiToken", $("token").value);
  $("token-form").hidden = true;
  toast("");
});

window.addEventListener("resize", () => { resetCharts(); $("charts").dataset.points = String(view.history.length);
  drawCharts(); });
setInterval(redraw, 1000);  // "last seen" and lost workers move on without messages
if (view.selected) view.pinned = true;
stream();
