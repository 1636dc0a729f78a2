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
};

const $ = (id) => document.getElementById(id);
let previewUrl = null;

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

function render(answer) {
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

async function classify(init) {
  $("error").hidden = true;
  $("status").textContent = "Classifying…";
  let response;
  try {
    response = await fetch("/predict", { method: "POST", ...init });
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
  if (response.ok && body && Array.isArray(body.predictions)) {
    render(body);
  } else if (body && body.error) {
    const title = TITLES[body.error.code] || "Something went wrong.";
    showError(`${title} ${body.error.message}`);
  } else {
    showError(`Something went wrong (HTTP ${response.status}). Please try again.`);
  }
}

function classifyFile(file) {
  if (!file) return;
  showPreview(URL.createObjectURL(file));
  const form = new FormData();
  form.append("image", file);
  classify({ body: form });
}

$("file").addEventListener("change", (e) => classifyFile(e.target.files[0]));

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  classifyFile(e.dataTransfer.files[0]);
});

$("url-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const url = $("url").value.trim();
  if (!url) {
    showError("Paste the address of an image first.");
    return;
  }
  showPreview(url);
  classify({ headers: { "content-type": "application/json" }, body: JSON.stringify({ url }) });
});
