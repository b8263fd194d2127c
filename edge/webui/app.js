// edge-inspect station page. Plain JavaScript, no build step, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
let csrf = null;
let tab = "live";
const LIVE_PERIOD_MS = 250;

// --- talking to the station ---

class LoggedOut extends Error {}

async function api(path, options = {}, retried = false) {
  const headers = Object.assign({}, options.headers || {});
  if (options.method === "POST") headers["X-CSRF-Token"] = csrf || "";
  const response = await fetch(path, Object.assign({}, options, { headers, credentials: "same-origin" }));
  if (response.status === 401) {
    csrf = null; // stops the loops until the next login
    showLogin();
    throw new LoggedOut("the session has ended: log in again");
  }
  const type = response.headers.get("Content-Type") || "";
  const doc = type.startsWith("application/json") ? await response.json() : null;
  // A restarted station has a new CSRF token: take it and try once more.
  if (response.status === 403 && !retried && doc && /CSRF token/.test(doc.error || "")) {
    const session = await api("/api/session");
    if (session.logged_in && session.csrf) {
      csrf = session.csrf;
      return api(path, options, true);
    }
  }
  if (!response.ok) throw new Error((doc && doc.error) || `the station answered ${response.status}`);
  return doc;
}

function post(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {}) });
}

function upload(path, file) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": file.type || "application/octet-stream", "X-File-Name": encodeURIComponent(file.name) },
    body: file,
  });
}

let sayTimer = null;

// Errors stay until the next action or tab; other messages go after 10 s, before they can
// contradict what the page shows (a "paused" note after another tab resumed, say).
function say(text, isError) {
  const box = $("message");
  box.textContent = text;
  box.className = isError ? "error" : "";
  box.hidden = !text;
  clearTimeout(sayTimer);
  if (text && !isError) sayTimer = setTimeout(() => say(""), 10000);
}

// Run an action from a button: show what it did or why it failed.
function act(button, work) {
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const text = await work();
      if (text) say(text);
    } catch (err) {
      say(err.message, true);
    } finally {
      button.disabled = false;
    }
  });
}

// A DOM element with attributes and children; text is always set as text, never as HTML.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const fmt = (x, digits = 3) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(digits));
const when = (wall) => new Date(wall * 1000).toLocaleString();
const labelName = (label) => (label === "normal" ? "good" : "defect");
const defects = (n) => `${n} defect${n === 1 ? "" : "s"}`;

// --- login ---

function showLogin() {
  $("login").hidden = false;
  $("app").hidden = true;
  $("logout").hidden = true;
  clearStrip();
}

async function startSession() {
  const session = await api("/api/session");
  $("station").textContent = `edge-inspect · ${session.station}`;
  document.title = `edge-inspect · ${session.station}`;
  $("username").value = session.station;
  $("logout").hidden = !session.login_required || !session.logged_in;
  if (!session.logged_in) return showLogin();
  csrf = session.csrf;
  $("login").hidden = true;
  $("app").hidden = false;
  openTab(location.hash.slice(1) || "live");
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const doc = await post("/api/login", { password: $("password").value });
    csrf = doc.csrf;
    $("password").value = "";
    say("");
    await startSession();
  } catch (err) {
    say(err.message, true);
  }
});

act($("logout"), async () => {
  await post("/api/logout");
  csrf = null;
  showLogin();
});

// --- tabs ---

function openTab(name) {
  if (!$(`tab-${name}`)) name = "live";
  if (name !== tab) say("");
  tab = name;
  for (const section of document.querySelectorAll(".tab")) section.hidden = section.id !== `tab-${name}`;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.tab === name);
  if (name === "history") loadHistory(true);
  if (name === "dataset") loadDataset();
  if (name === "train") loadTraining();
}

window.addEventListener("hashchange", () => openTab(location.hash.slice(1)));

// --- status strip, every second ---

async function statusLoop() {
  for (;;) {
    if (csrf !== null && !document.hidden) {
      try {
        showStatus(await api("/api/status"));
      } catch (err) {
        if (!(err instanceof LoggedOut)) {
          clearStrip();
          $("st-state").textContent = "no answer";
          $("st-state").className = "pill degraded";
          showLiveState({ status: "no answer", reason: "the station does not answer" });
        }
      }
    }
    await sleep(1000);
  }
}

// Figures that are not known now are not shown: a strip that stays "online, 5 fps, broker
// connected" while nobody answers would look live.
function clearStrip() {
  for (const id of ["st-model", "st-fps", "st-p95", "st-over", "st-backlog"]) $(id).textContent = "–";
  $("st-reason").textContent = "";
  $("st-state").textContent = "–";
  $("st-state").className = "pill";
  $("st-broker").textContent = "–";
  $("st-broker").className = "pill";
}

let lastStatus = null;

function showStatus(s) {
  lastStatus = s;
  showLiveState(s);
  $("st-state").textContent = s.status;
  $("st-state").className = `pill ${s.status}`;
  $("st-reason").textContent = s.reason || "";
  $("st-model").textContent = s.model.id;
  $("st-fps").textContent = fmt(s.fps, 1);
  $("st-p95").textContent = fmt(s.latency_ms_p95, 1);
  $("st-over").textContent = s.overruns;
  const broker = s.broker.enabled ? (s.broker.connected ? "connected" : "offline") : "off";
  $("st-broker").textContent = broker;
  $("st-broker").className = `pill ${broker}`;
  $("st-broker").title = s.broker.address;
  // Undelivered verdicts the journal's limit deleted during a long outage: lost to the line.
  const lost = s.backlog_deleted ? ` (${s.backlog_deleted} deleted)` : "";
  $("st-backlog").textContent = s.backlog === null ? "–" : `${s.backlog}${lost}`;
  $("rollback").hidden = !s.previous_model;
  // Named: after a roll-back the "previous" model is the one just left, so the button would
  // otherwise read the same and do the opposite.
  $("rollback").textContent = s.previous_model ? `Go back to model ${s.previous_model}` : "";
  $("pause").hidden = s.paused;
  $("resume").hidden = !s.paused;
  $("trigger").hidden = s.mode !== "triggered" || s.paused;
  const event = s.model_event;
  $("model-event").textContent = event ? `${when(event.wall)}: ${event.text}` : "";
  $("model-event").className = event && !event.taken ? "verdict-ng" : "";
  // "Try" offers the new model only while there is one.
  const trialNew = document.querySelector('#trial-model option[value="candidate"]');
  trialNew.disabled = !s.candidate;
  if (!s.candidate && $("trial-model").value === "candidate") $("trial-model").value = "running";
  if (tab === "train") showTrainingState(s.training, s.model.id);
}

// --- live view: newest picture, a few a second, only while it is on screen ---

async function liveLoop() {
  const img = $("live-img");
  for (;;) {
    if (csrf !== null && tab === "live" && !document.hidden) {
      try {
        const response = await fetch("/api/live.jpg", { credentials: "same-origin" });
        if (response.status === 200) {
          const frame = response.headers.get("X-Frame");
          if (frame !== img.dataset.frame) {
            const url = URL.createObjectURL(await response.blob());
            // Decode first, then change picture and caption together, so they never disagree.
            const next = new Image();
            next.src = url;
            await next.decode();
            const old = img.dataset.url;
            img.src = url;
            img.dataset.url = url;
            img.dataset.frame = frame;
            const verdict = response.headers.get("X-Verdict");
            const caption = $("live-caption");
            const captured = Number(response.headers.get("X-Captured"));
            img.dataset.captured = captured;
            img.dataset.arrived = Date.now(); // the browser's clock: the station's may differ
            caption.textContent = `${verdict.toUpperCase()} · score ${response.headers.get("X-Score")} (threshold ${response.headers.get("X-Threshold")}) · frame ${frame} · ${when(captured)}`;
            caption.className = `verdict-${verdict}`;
            if (old) URL.revokeObjectURL(old);
          }
          if (lastStatus) showLiveState(lastStatus);
        } else if (response.status === 401) {
          csrf = null;
          showLogin();
        }
      } catch (err) {
        showLiveState({ status: "no answer", reason: "the station does not answer" });
      }
    }
    await sleep(LIVE_PERIOD_MS);
  }
}

// The picture stays, but says when it is not the station's present: the station is paused
// or does not answer, or (running free) no new frame has come for 5 s or three frame times,
// whichever is longer, with the station's reason if it gives one (a camera fault, say). Ages
// are taken on the browser's clock, when pictures arrived: the station's may be set apart.
const STALE_AFTER_S = 5;

function showLiveState(s) {
  const img = $("live-img");
  const captured = Number(img.dataset.captured);
  if (!img.dataset.frame) return;
  const limit = Math.max(STALE_AFTER_S, s.fps > 0 ? 3 / s.fps : 0);
  const quiet = (Date.now() - Number(img.dataset.arrived)) / 1000 > limit;
  let why = "";
  if (s.status === "no answer") why = s.reason;
  else if (s.status === "paused") why = "inspection paused";
  else if (s.mode === "free" && quiet) why = s.status === "degraded" && s.reason ? s.reason : "no new frame";
  $("live").classList.toggle("stale", Boolean(why));
  $("live-stale").hidden = !why;
  $("live-stale").textContent = why ? `${why}: this picture is from ${when(captured)}, not now` : "";
}

for (const label of ["normal", "anomaly"]) {
  act($(`capture-${label}`), async () => {
    const frame = Number($("live-img").dataset.frame);
    const item = await post("/api/dataset/capture", { label, frame: Number.isNaN(frame) ? null : frame });
    return `frame ${frame} added as ${labelName(label)} (${item.split} set)`;
  });
}

// Pause while labelling by hand; in triggered mode, take and inspect a fresh frame.
act($("pause"), async () => {
  await post("/api/station/pause");
  return "inspection paused: no verdicts go to the line until you resume";
});
act($("resume"), async () => {
  await post("/api/station/resume");
  return "inspection resumed";
});
act($("trigger"), async () => {
  await post("/api/station/trigger");
  return "inspecting a fresh frame; its verdict appears above";
});

// --- history ---

let oldest = null;
let chosen = null;

async function loadHistory(fresh) {
  const body = document.querySelector("#history-table tbody");
  if (fresh) {
    body.replaceChildren();
    oldest = null;
  }
  const query = new URLSearchParams({ limit: "50" });
  if ($("history-ng").checked) query.set("ng", "1");
  if (oldest !== null) query.set("before", oldest);
  try {
    const doc = await api(`/api/records?${query}`);
    for (const r of doc.records) {
      const row = el(
        "tr",
        {
          "data-seq": r.seq,
          tabindex: "0",
          onclick: () => openRecord(r, row),
          onkeydown: (e) => (e.key === "Enter" || e.key === " ") && (e.preventDefault(), openRecord(r, row)),
        },
        el("td", { class: "n", text: r.seq }),
        el("td", { text: when(r.wall) }),
        el("td", { text: r.part_id || "" }),
        el("td", { class: `verdict-${r.verdict}`, text: r.verdict.toUpperCase() }),
        el("td", { class: "n", text: fmt(r.score) }),
      );
      body.append(row);
      oldest = r.seq;
    }
    $("history-more").hidden = doc.records.length < 50;
  } catch (err) {
    say(err.message, true);
  }
}

function openRecord(r, row) {
  chosen = r;
  for (const other of document.querySelectorAll("#history-table tr.chosen")) other.classList.remove("chosen");
  row.classList.add("chosen");
  $("record").hidden = false;
  $("record-title").textContent = `Inspection ${r.seq}: ${r.verdict.toUpperCase()}`;
  $("record-facts").textContent = `${when(r.wall)} · part ${r.part_id || "–"} · score ${fmt(r.score)} (threshold ${fmt(r.threshold)}) · ${fmt(r.capture_to_decision_ms, 1)} ms · model ${r.model_id}`;
  for (const which of ["overlay", "frame"]) {
    const img = $(`record-${which}`);
    if (r[`has_${which}`]) img.src = `/api/records/${r.seq}/${which}.jpg`;
    else img.removeAttribute("src");
  }
  $("record-overlay").parentElement.hidden = !r.has_overlay;
  $("record-frame").parentElement.hidden = !r.has_frame;
  $("record-none").hidden = r.has_frame;
  $("record-actions").hidden = !r.has_frame;
  // On a phone the record opens below all the rows: bring it into view.
  $("record").scrollIntoView({ block: "nearest", behavior: "smooth" });
}

$("history-ng").addEventListener("change", () => loadHistory(true));
act($("history-refresh"), () => loadHistory(true));
act($("history-more"), () => loadHistory(false));
for (const label of ["normal", "anomaly"]) {
  act($(`record-${label}`), async () => {
    const item = await post("/api/dataset/record", { seq: chosen.seq, label });
    return `inspection ${chosen.seq} added as ${labelName(label)} (${item.split} set)`;
  });
}

// --- dataset ---

async function loadDataset() {
  let doc;
  try {
    doc = await api("/api/dataset");
  } catch (err) {
    return say(err.message, true);
  }
  const c = doc.counts;
  $("dataset-counts").textContent =
    `Training: ${c["train/normal"]} good, ${defects(c["train/anomaly"])} · held back for testing: ${c["test/normal"]} good, ${defects(c["test/anomaly"])}. ` +
    (c["train/normal"] < doc.min_normal ? `Training needs at least ${doc.min_normal} good images.` : "");
  $("dataset-grid").replaceChildren(...doc.items.map(datasetCard));
}

function datasetCard(item) {
  const label = el("select", { "aria-label": `label of ${item.name}` },
    el("option", { value: "normal", text: "good" }), el("option", { value: "anomaly", text: "defect" }));
  label.value = item.label;
  label.addEventListener("change", () => change(() => post("/api/dataset/move", { id: item.id, label: label.value })));
  const other = item.split === "train" ? "test" : "train";
  return el("div", { class: `card ${item.label}`, "data-id": item.id },
    el("img", { src: `/api/dataset/image/${item.id}?thumb=1`, alt: item.name, loading: "lazy" }),
    el("div", { class: "body" },
      el("span", { class: "name", text: item.name }),
      el("div", { class: "row" },
        label,
        el("span", { class: `tag ${item.split}`, text: item.split === "test" ? "test set" : "training set" })),
      el("div", { class: "row" },
        el("button", { type: "button", class: "small", text: `move to ${other}`,
          onclick: () => change(() => post("/api/dataset/move", { id: item.id, split: other })) }),
        el("button", { type: "button", class: "small ng", text: "delete",
          onclick: () => confirm(`Delete ${item.name}?`) && change(() => post("/api/dataset/delete", { id: item.id })) }))));
}

async function change(work) {
  try {
    await work();
  } catch (err) {
    say(err.message, true);
  }
  await loadDataset(); // what the dataset holds now, whether the change was made or not
}

$("upload-files").addEventListener("change", async (event) => {
  const files = [...event.target.files];
  const label = $("upload-label").value;
  let added = 0;
  const failed = [];
  for (const file of files) {
    try {
      await upload(`/api/dataset/upload?label=${label}`, file);
      added += 1;
    } catch (err) {
      failed.push(err.message);
    }
  }
  event.target.value = "";
  const refused = failed.length ? ` ${failed.length} refused: ${failed.join("; ")}` : "";
  say(`${added} image(s) added as ${labelName(label)}.${refused}`, failed.length > 0);
  loadDataset();
});

// --- training ---

const METRICS = [
  ["auroc", "AUROC"], ["average_precision", "average precision"], ["accuracy", "accuracy"],
  ["precision", "precision"], ["recall", "recall"], ["f1", "F1"], ["threshold", "threshold"],
  ["tp", "defects caught"], ["fn", "defects missed"], ["fp", "good parts rejected"], ["tn", "good parts passed"],
];
const LOWER_IS_BETTER = new Set(["fn", "fp"]);
// The result shown is for this training state and running model; it is fetched again when
// either changes (a training ended, a model was swapped in or discarded).
let resultKey = null;
const keyOf = (t, runningId) => `${t.state}|${t.ended}|${runningId}`;
let trainedId = null; // the candidate the result on screen is of

async function loadTraining() {
  try {
    const doc = await api("/api/training");
    resultKey = keyOf(doc, doc.running_id);
    showTrainingState(doc, doc.running_id);
    showResult(doc);
  } catch (err) {
    say(err.message, true);
  }
}

function showTrainingState(t, runningId) {
  const running = t.state === "running";
  $("train-start").disabled = running;
  $("train-cancel").hidden = !running;
  $("train-progress").hidden = !running;
  $("train-state").dataset.state = t.state;
  $("train-state").className = t.state === "failed" ? "verdict-ng" : "";
  // A result on screen during a run is an earlier one: not to be taken for this run's.
  if (running) $("result").hidden = true;
  if (running) {
    $("train-progress").max = Math.max(t.total, 1);
    $("train-progress").value = t.done;
    const left = t.seconds_left === null ? "" : `, about ${Math.ceil(t.seconds_left)} s left`;
    $("train-state").textContent = `training: ${t.stage} ${t.done}/${t.total}${left}`;
  } else if (t.state === "failed") {
    $("train-state").textContent = `training failed: ${t.error}`;
  } else if (t.state === "done") {
    $("train-state").textContent = `trained and evaluated in ${fmt(t.ended - t.started, 1)} s`;
  } else {
    $("train-state").textContent = t.error || "no training running";
  }
  if (!running && keyOf(t, runningId) !== resultKey) {
    resultKey = keyOf(t, runningId);
    loadTrainingResult();
  }
}

async function loadTrainingResult() {
  try {
    showResult(await api("/api/training"));
  } catch (err) {
    say(err.message, true);
  }
}

function showResult(doc) {
  const s = doc.summary;
  $("result").hidden = !s || doc.state === "running";
  if (!s) return;
  trainedId = doc.candidate_id;
  const cand = s.evaluation.candidate;
  const run = s.evaluation.running;
  const inUse = doc.candidate_id === doc.running_id;
  $("cand-id").textContent = doc.candidate_id;
  $("cmp-cand-id").textContent = doc.candidate_id;
  const compared = run && run.model_id ? run.model_id : doc.running_id;
  $("cmp-running-id").textContent = compared;
  // After a swap the comparison still shows the model that ran when the new one was trained.
  $("cmp-running-label").textContent = compared === doc.running_id ? "running" : "replaced";
  $("activate").disabled = !doc.candidate || inUse;
  $("activate").textContent = inUse ? "The new model is in use" : "Use the new model";
  $("discard").disabled = !doc.candidate;
  const m = s.meta;
  $("result-facts").textContent =
    `Trained on ${m.train_normal_count} good images` +
    (m.train_anomaly_count ? ` and ${m.train_anomaly_count} defects` : "") +
    ` in ${fmt(s.seconds, 1)} s on ${when(Date.parse(m.created) / 1000)}` +
    (doc.state === "failed" ? " (an earlier training: the last one failed)" : "") +
    `; threshold ${fmt(m.threshold)} (${m.calibration}). ` +
    (cand ? `Tested on ${s.test_images} held-back images.` : "No images are held back for testing, so there is no comparison: add more images to the dataset.");
  const body = document.querySelector("#compare tbody");
  body.replaceChildren();
  $("compare").hidden = !cand;
  $("report-cand").hidden = !cand;
  $("report-running").hidden = !(run && run.metrics);
  if (!cand) return $("compare-grid").replaceChildren();
  $("report-cand").href = "/api/training/files/candidate/report.html";
  $("report-running").href = "/api/training/files/running/report.html";
  for (const [key, name] of METRICS) {
    const a = run && run.metrics ? run.metrics[key] : null;
    const b = cand.metrics[key];
    let mark = "";
    if (a !== null && b !== null && key !== "threshold" && a !== b) {
      const better = LOWER_IS_BETTER.has(key) ? b < a : b > a;
      mark = better ? "better" : "worse";
    }
    const digits = ["tp", "fn", "fp", "tn"].includes(key) ? 0 : 3;
    body.append(el("tr", {},
      el("th", { text: name }),
      el("td", { class: "n", text: run && run.error ? "–" : fmt(a, digits) }),
      el("td", { class: `n ${mark}`, text: fmt(b, digits) })));
  }
  if (run && run.error) say(`The running model cannot be evaluated on the test set: ${run.error}`, true);
  const cards = Object.entries(cand.images).map(([name, c]) => {
    const r = run && run.images ? run.images[name] : null;
    const truth = name.startsWith("ok/") ? "ok" : "ng";
    const side = (who, x) => x && el("figure", { class: x.verdict !== truth ? "card wrong" : "card" },
      el("img", { src: `/api/training/files/${x.overlay}`, alt: `${who} ${name}`, loading: "lazy" }),
      el("figcaption", { class: "body", text: `${who}: ${x.verdict.toUpperCase()} ${fmt(x.score, 2)}` }));
    return el("div", { class: "card" },
      el("div", { class: "body" }, el("span", { class: "name", text: `${truth === "ok" ? "good" : "defect"}: ${name.slice(3)}` })),
      el("div", { class: "pair" }, side("running", r), side("new", c)));
  });
  $("compare-grid").replaceChildren(...cards);
}

act($("train-start"), async () => {
  await post("/api/training/start");
  $("train-start").disabled = true;
  return "training started; the station keeps inspecting meanwhile";
});
act($("train-cancel"), async () => {
  await post("/api/training/cancel");
  return "training cancelled";
});
act($("activate"), async () => {
  // The id shown: if another tab trained or discarded meanwhile, the station refuses.
  await post("/api/training/activate", { id: trainedId });
  return "checking the new model on the newest frame; it is swapped in between two frames";
});
act($("discard"), async () => {
  await post("/api/training/discard");
  await loadTrainingResult();
  return "new model discarded";
});
act($("rollback"), async () => {
  await post("/api/model/rollback");
  return "going back to the previous model";
});

// --- trial detection ---

$("trial-files").addEventListener("change", async (event) => {
  const grid = $("trial-grid");
  grid.replaceChildren();
  const model = $("trial-model").value;
  for (const file of [...event.target.files]) {
    try {
      const r = await upload(`/api/trial?model=${model}`, file);
      const add = (label) => el("button", { type: "button", class: `small ${label === "normal" ? "ok" : "ng"}`, text: `add as ${labelName(label)}`,
        onclick: async (e) => {
          try {
            const item = await upload(`/api/dataset/upload?label=${label}`, file);
            e.target.disabled = true;
            say(`${file.name} added as ${labelName(label)} (${item.split} set)`);
          } catch (err) {
            say(err.message, true);
          }
        } });
      grid.append(el("div", { class: `card trial ${r.verdict}` },
        el("img", { src: r.overlay, alt: `overlay of ${file.name}` }),
        el("div", { class: "body" },
          el("span", { class: "name", text: file.name }),
          el("span", { class: `verdict-${r.verdict}`, text: `${r.verdict.toUpperCase()} · score ${fmt(r.score, 2)} / ${fmt(r.threshold, 2)} · area ${fmt(100 * r.area, 1)} % · ${r.boxes.length} region(s)` }),
          el("div", { class: "row" }, add("normal"), add("anomaly")))));
    } catch (err) {
      grid.append(el("div", { class: "card trial error" }, el("div", { class: "body" },
        el("span", { class: "name", text: file.name }), el("span", { class: "verdict-ng", text: err.message }))));
    }
  }
  event.target.value = "";
});

// --- start ---

startSession().catch((err) => say(err.message, true));
statusLoop();
liveLoop();
