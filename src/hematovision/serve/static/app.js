// HematoVision analyse page: upload, show predictions with heat maps, review, differential count.
"use strict";

const state = { classes: [], analysis: null, files: [], user: null };
const $ = (selector) => document.querySelector(selector);

function setStatus(text, isError = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

const api = hv.api;  // session.js: CSRF header, login redirect, one-line errors

function can(role) {
  const order = ["technologist", "reviewer", "admin"];
  return state.user !== null && order.indexOf(state.user.role) >= order.indexOf(role);
}

function percent(value) { return `${(100 * value).toFixed(1)}%`; }

function chooseFiles(fileList) {
  state.files = Array.from(fileList);
  const count = state.files.length;
  $("#chosen").textContent = count ? `${count} file${count > 1 ? "s" : ""} chosen` : "";
  $("#analyse").disabled = count === 0;
  if (count) setStatus("");
}

async function analyse() {
  if (!state.files.length) return;
  const form = new FormData();
  for (const file of state.files) form.append("files", file, file.name);
  const sample = $("#sample").value.trim();
  if (sample) form.append("sample", sample);
  $("#analyse").disabled = true;
  setStatus(`Analysing ${state.files.length} file(s)…`);
  try {
    const result = await api("/api/v1/predict", { method: "POST", body: form });
    await loadAnalysis(result.analysis_id);
    setStatus(`Done: ${result.results.length} image(s) analysed.`);
    chooseFiles([]);
    $("#file-input").value = "";
  } catch (error) {
    setStatus(`Error: ${error.message}`, true);
    $("#analyse").disabled = false;
  }
}

async function loadAnalysis(id) {
  const analysis = await api(`/api/v1/analyses/${encodeURIComponent(id)}`);
  state.analysis = analysis;
  history.replaceState(null, "", `/?analysis=${analysis.id}`);
  render(analysis);
}

function render(analysis) {
  $("#summary").hidden = false;
  $("#summary-title").textContent =
    `Analysis #${analysis.id}${analysis.sample ? " — " + analysis.sample : ""}`;
  const date = new Date(analysis.created_at).toLocaleString();
  $("#summary-line").textContent =
    `${date} · ${analysis.n_images} image(s) · ${analysis.n_needs_review} flagged for review · ` +
    `${analysis.n_reviewed}/${analysis.n_images} reviewed (${analysis.review_status}) · model ${analysis.model}`;
  $("#csv-images").href = `/api/v1/analyses/${analysis.id}/export.csv`;
  $("#csv-diff").href = `/api/v1/analyses/${analysis.id}/export.csv?kind=differential`;
  renderSignOff(analysis);
  renderDifferential(analysis.differential);
  const grid = $("#results");
  grid.replaceChildren(...analysis.predictions.map(renderCard));
  loadAudit(analysis.id);
}

function renderSignOff(analysis) {
  const text = $("#signoff-state");
  const button = $("#signoff-button");
  if (analysis.signed_off_by) {
    text.className = "signed";
    text.textContent = `Signed off by ${analysis.signed_off_by} on ${new Date(analysis.signed_off_at).toLocaleString()}` +
      " · read-only";
    if (analysis.amended_by) {
      const amended = document.createElement("span");
      amended.className = "amended";
      amended.textContent = ` · amended by ${analysis.amended_by} on ${new Date(analysis.amended_at).toLocaleString()}`;
      text.appendChild(amended);
    }
    button.hidden = true;
  } else {
    text.className = "muted";
    text.textContent = "Not signed off yet" + (can("reviewer") ? "" : " (a reviewer signs off)");
    button.hidden = !can("reviewer");
    button.disabled = false;
  }
}

async function signOff() {
  const button = $("#signoff-button");
  button.disabled = true;
  try {
    const analysis = await api(`/api/v1/analyses/${state.analysis.id}/signoff`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ expected_version: state.analysis.version }),
    });
    state.analysis = analysis;
    render(analysis);
    setStatus(`Signed off analysis #${analysis.id}.`);
  } catch (error) {
    setStatus(`Not signed off: ${error.message}`, true);
    button.disabled = false;
  }
}

async function loadAudit(id) {
  try {
    const rows = await api(`/api/v1/analyses/${encodeURIComponent(id)}/audit`);
    const body = $("#audit-table tbody");
    body.replaceChildren(...rows.map((row) => {
      const tr = document.createElement("tr");
      for (const text of [row.at.replace("T", " ").slice(0, 19), row.user, row.action, row.detail, row.client || ""]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        tr.appendChild(cell);
      }
      return tr;
    }));
    $("#audit").hidden = false;
  } catch (error) {
    setStatus(`Audit trail not loaded: ${error.message}`, true);
  }
}

function renderDifferential(diff) {
  const body = $("#differential tbody");
  const rows = Object.entries(diff.counts).map(([label, count]) => {
    const row = document.createElement("tr");
    const share = diff.percent[label] || 0;
    const cells = [label, String(count), share.toFixed(1)];
    cells.forEach((text, i) => {
      const cell = document.createElement("td");
      cell.textContent = text;
      if (i > 0) cell.className = "num";
      row.appendChild(cell);
    });
    const barCell = document.createElement("td");
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${share}%`;
    barCell.appendChild(bar);
    row.appendChild(barCell);
    return row;
  });
  const total = document.createElement("tr");
  total.innerHTML = "<th>Total</th><th class='num'></th><th class='num'></th><th></th>";
  total.children[1].textContent = String(diff.total);
  total.children[3].textContent = diff.excluded ? `${diff.excluded} excluded (not a white blood cell)` : "";
  body.replaceChildren(...rows, total);
}

function renderCard(prediction) {
  const card = $("#card-template").content.firstElementChild.cloneNode(true);
  card.dataset.predictionId = prediction.id;
  card.classList.toggle("flagged", prediction.needs_review && !prediction.reviewed_label);
  const image = card.querySelector("img.cell");
  const toggle = card.querySelector(".show-heatmap");
  const showImage = () => {
    image.src = toggle.checked && prediction.heatmap_url ? prediction.heatmap_url : prediction.image_url;
    image.alt = `${prediction.filename}${toggle.checked ? " with Grad-CAM heat map" : ""}`;
  };
  if (!prediction.heatmap_url) { toggle.checked = false; toggle.disabled = true; }
  toggle.addEventListener("change", showImage);
  showImage();
  card.querySelector(".filename").textContent = prediction.filename;
  card.querySelector(".label").textContent = prediction.label;
  card.querySelector(".confidence").textContent = percent(prediction.confidence);
  const flag = card.querySelector(".flag");
  if (prediction.needs_review) {
    flag.hidden = false;
    flag.textContent = "Needs review";
    flag.title = prediction.review_reasons.join("; ");
    const why = document.createElement("span");
    why.className = "muted";
    why.textContent = ` ${prediction.review_reasons.join("; ")}`;
    flag.after(why);
  }
  const probs = card.querySelector(".probs");
  Object.entries(prediction.probabilities).sort((a, b) => b[1] - a[1]).forEach(([label, p]) => {
    const row = document.createElement("div");
    row.className = "prob" + (label === prediction.label ? " best" : "");
    const name = document.createElement("span");
    name.textContent = label;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = percent(p);
    track.appendChild(fill);
    const value = document.createElement("span");
    value.className = "p";
    value.textContent = percent(p);
    row.append(name, track, value);
    probs.appendChild(row);
  });
  const select = card.querySelector(".review-label");
  for (const label of [...state.classes, "excluded"]) {
    const option = document.createElement("option");
    option.value = label;
    option.textContent = label === "excluded" ? "excluded (not a WBC)" : label;
    select.appendChild(option);
  }
  select.value = prediction.final_label;
  const button = card.querySelector(".confirm");
  // Signed off: read-only, except that an admin may amend (with a reason, audited).
  const signed = Boolean(state.analysis && state.analysis.signed_off_by);
  const amend = signed && can("admin");
  const updateButton = () => {
    button.textContent = amend ? "Amend" : select.value === prediction.label ? "Confirm" : "Correct";
  };
  select.addEventListener("change", updateButton);
  updateButton();
  select.disabled = button.disabled = signed && !amend;
  button.addEventListener("click", () => review(prediction.id, select.value, button, amend));
  const reviewed = card.querySelector(".reviewed");
  if (prediction.reviewed_label) {
    reviewed.textContent = `Reviewed as ${prediction.reviewed_label} by ${prediction.reviewer}`;
    reviewed.classList.add("done");
  }
  return card;
}

async function review(predictionId, label, button, amend = false) {
  const change = { labels: [{ prediction_id: predictionId, label }], expected_version: state.analysis.version };
  if (amend) {
    const reason = prompt("Reason for amending the signed-off result (recorded in the audit trail):");
    if (!reason || reason.trim().length < 3) { setStatus("Not amended: a reason is needed.", true); return; }
    change.reason = reason.trim();
  }
  button.disabled = true;
  try {
    const analysis = await api(`/api/v1/analyses/${state.analysis.id}/${amend ? "amend" : "review"}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(change),
    });
    state.analysis = analysis;
    render(analysis);
    setStatus(`Saved: image ${predictionId} ${amend ? "amended to" : "reviewed as"} ${label}.`);
  } catch (error) {
    if (error.status === 409) {  // changed by someone else meanwhile, or signed off: show what is there now
      await loadAnalysis(state.analysis.id);
    }
    setStatus(`Review not saved: ${error.message}`, true);
    button.disabled = false;
  }
}

async function init() {
  const dropzone = $("#dropzone");
  const input = $("#file-input");
  dropzone.addEventListener("click", () => input.click());
  dropzone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
  });
  input.addEventListener("change", () => chooseFiles(input.files));
  for (const type of ["dragenter", "dragover"]) {
    dropzone.addEventListener(type, (event) => { event.preventDefault(); dropzone.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    dropzone.addEventListener(type, () => dropzone.classList.remove("over"));
  }
  dropzone.addEventListener("drop", (event) => { event.preventDefault(); chooseFiles(event.dataTransfer.files); });
  $("#analyse").addEventListener("click", analyse);
  $("#signoff-button").addEventListener("click", signOff);
  try {
    state.user = await hv.me();
  } catch (error) {
    return;  // hv.api sends the browser to the login page
  }
  try {
    const model = await api("/api/v1/model");
    state.classes = model.class_names;
    const policy = model.review_policy || {};
    $("#model-info").textContent =
      `${model.card.backbone || "model"} · ${model.class_names.length} classes · ${model.backend} · ` +
      `review below ${percent(policy.confidence_threshold)} confidence` +
      (policy.ood_threshold != null ? " or unlike training images" : "");
  } catch (error) {
    setStatus(`Cannot reach the model: ${error.message}`, true);
  }
  const id = new URLSearchParams(location.search).get("analysis");
  if (id) {
    try { await loadAnalysis(id); } catch (error) { setStatus(`Error: ${error.message}`, true); }
  }
}

init();
