"use strict";

// Plain words for the error codes of the API; the server's message says what to fix.
const TITLES = {
  bad_json: "The request was malformed.",
  bad_request: "The request was incomplete.",
  invalid_url: "That is not a usable web address.",
  url_refused: "That address cannot be fetched.",
  fetch_failed: "The image could not be downloaded.",
  fetch_timeout: "The image took too long to download.",
  image_too_large: "The image is too large.",
  invalid_image: "That file is not an image we can read.",
  model_not_found: "The model is not available.",
  model_overloaded: "The service is busy. Please try again in a moment.",
  overloaded: "The service is busy. Please try again in a moment.",
  model_unavailable: "The model is not ready yet. Please try again shortly.",
  model_timeout: "The model took too long to answer.",
  unauthorized: "This gateway needs an API key: enter yours under “API key” above.",
  rate_limited: "Too many requests with this API key. Please wait a moment.",
};

// The key lives in sessionStorage: it survives reloads of this tab and goes when the tab closes.
const KEY_STORE = "api-key";
const storedKey = () => sessionStorage.getItem(KEY_STORE) || "";

function showKeyState() {
  $("key-state").textContent = storedKey() ? "(in use)" : "";
}

function withKey(init) {
  const key = storedKey();
  if (!key) return init;
  return { ...init, headers: { ...(init.headers || {}), authorization: `Bearer ${key}` } };
}

const $ = (id) => document.getElementById(id);
let previewUrl = null;

// Each mode: its route, what the page says while waiting, and how it shows an answer.
const MODES = {
  classify: { route: "/predict", waiting: "Classifying…", title: "Top predictions", ok: (b) => Array.isArray(b.predictions) },
  detect: { route: "/detect", waiting: "Looking for objects…", title: "Objects found", ok: (b) => Array.isArray(b.detections) },
};
const mode = () => ($("mode-detect").checked ? "detect" : "classify");

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
  // Results of an earlier image next to this one's error would be misread as its answer.
  $("result").hidden = true;
  $("status").textContent = "";
}

function showPreview(src) {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = src.startsWith("blob:") ? src : null;
  $("preview").src = src;
}

// Boxes over the photo, placed in percent of its size so they follow the displayed size, and a list beside it.
function renderDetections(answer) {
  const boxes = $("boxes");
  const list = $("detections");
  boxes.replaceChildren();
  list.replaceChildren();
  const { width, height } = answer.image;
  answer.detections.forEach((d, i) => {
    const hue = (i * 67) % 360;
    const box = document.createElement("div");
    box.className = "box";
    box.style.left = (d.box.x1 / width) * 100 + "%";
    box.style.top = (d.box.y1 / height) * 100 + "%";
    box.style.width = ((d.box.x2 - d.box.x1) / width) * 100 + "%";
    box.style.height = ((d.box.y2 - d.box.y1) / height) * 100 + "%";
    box.style.setProperty("--hue", hue);
    const tag = document.createElement("span");
    tag.className = "tag";
    tag.textContent = `${d.label} ${(d.score * 100).toFixed(0)} %`;
    box.append(tag);
    boxes.append(box);
    const item = document.createElement("li");
    item.style.setProperty("--hue", hue);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = d.label;
    const score = document.createElement("span");
    score.textContent = (d.score * 100).toFixed(1) + " %";
    item.append(label, score);
    list.append(item);
  });
  if (answer.detections.length === 0) {
    const item = document.createElement("li");
    item.textContent = "No objects found.";
    list.append(item);
  }
}

function renderPredictions(answer) {
  const list = $("predictions");
  list.replaceChildren();
  for (const p of answer.predictions) {
    const item = document.createElement("li");
    const row = document.createElement("div");
    row.className = "row";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    const percent = document.createElement("span");
    percent.textContent = (p.probability * 100).toFixed(1) + " %";
    row.append(label, percent);
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = Math.max(0, Math.min(100, p.probability * 100)) + "%";
    item.append(row, bar);
    list.append(item);
  }
}

function render(answer, asked) {
  const detecting = asked === "detect";
  $("answer-title").textContent = MODES[asked].title;
  $("predictions").hidden = detecting;
  $("detections").hidden = !detecting;
  $("boxes").replaceChildren();
  if (detecting) renderDetections(answer);
  else renderPredictions(answer);
  const timings = $("timings");
  timings.replaceChildren();
  for (const [phase, ms] of Object.entries(answer.timings_ms)) {
    const name = document.createElement("dt");
    name.textContent = phase;
    const value = document.createElement("dd");
    value.textContent = ms.toFixed(1) + " ms";
    timings.append(name, value);
  }
  $("model").textContent = `${answer.model.name} v${answer.model.version} · request ${answer.request_id}`;
  $("result").hidden = false;
  $("status").textContent = "Done.";
}

async function send(init) {
  const asked = mode();
  $("error").hidden = true;
  $("status").textContent = MODES[asked].waiting;
  let response;
  try {
    response = await fetch(MODES[asked].route, { method: "POST", ...withKey(init) });
  } catch (e) {
    showError("Could not reach the server. Check your connection and try again.");
    return;
  }
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    // Fall through to the generic message below.
  }
  if (response.ok && body && MODES[asked].ok(body)) {
    render(body, asked);
  } else if (body && body.error) {
    if (response.status === 401) {
      $("key-panel").open = true;
      $("api-key").focus();
    }
    const title = TITLES[body.error.code] || "Something went wrong.";
    showError(`${title} ${body.error.message}`);
  } else {
    showError(`Something went wrong (HTTP ${response.status}). Please try again.`);
  }
}

function sendFile(file) {
  if (!file) return;
  showPreview(URL.createObjectURL(file));
  const form = new FormData();
  form.append("image", file);
  send({ body: form });
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  $("error").hidden = true;
  $("status").textContent = key ? "The API key will be sent with every request." : "No API key is sent.";
  $("key-panel").open = false;
  showKeyState();
});
$("api-key").value = storedKey();
showKeyState();

$("file").addEventListener("change", (e) => sendFile(e.target.files[0]));

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  sendFile(e.dataTransfer.files[0]);
});

$("url-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const url = $("url").value.trim();
  if (!url) {
    showError("Paste the address of an image first.");
    return;
  }
  showPreview(url);
  send({ headers: { "content-type": "application/json" }, body: JSON.stringify({ url }) });
});
