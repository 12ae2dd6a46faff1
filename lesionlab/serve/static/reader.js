// The reading page: token from the invitation link's fragment, one case at a time, answers saved case by case.
"use strict";
const $ = (id) => document.getElementById(id);
const pct = (p) => (100 * p).toFixed(1) + "%";
const KEY = "lesionlab-reader-token";
const MGMT_KEYS = {z: "excise", x: "follow-up", c: "reassure"};
const MGMT_NAMES = {"excise": "Excise / biopsy", "follow-up": "Follow-up", "reassure": "Reassure"};
const RATING_KEYS = ["q", "w", "e", "r", "t", "y"];
let state = null, current = null, busy = false, imageUrl = null;

function takeToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    localStorage.setItem(KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);  // the token leaves the address bar
  }
}
takeToken();
// a link opened in a tab already on this page only changes the fragment: take its token and start over
window.addEventListener("hashchange", () => { takeToken(); showError(""); start(); });
const token = () => localStorage.getItem(KEY);

async function api(path, opts = {}) {
  const res = await fetch(path, {...opts, headers: {...(opts.headers || {}), "Authorization": "Bearer " + token(),
                                                     ...(opts.body ? {"Content-Type": "application/json"} : {})}});
  let body = null;
  try { body = await res.json(); } catch (e) { body = {}; }
  return {res, body};
}

function showError(msg) { $("error").textContent = msg || ""; }
function show(id) {
  ["needs-token", "profile", "waiting", "reading"].forEach(x => $(x).classList.toggle("hidden", x !== id));
}

async function start() {
  if (!token()) { show("needs-token"); return; }
  const {res, body} = await api("api/reader/state");
  if (res.status === 401 || res.status === 403) { showError(body.error); show("needs-token"); return; }
  if (!res.ok) { showError(body.error || ("Error " + res.status)); return; }
  state = body;
  $("study-name").textContent = "study " + state.study.name;
  $("reader-name").textContent = "reader " + state.reader;
  if (state.needs_profile) { showProfile(); return; }
  await next();
}

function showProfile() {
  const sel = $("level");
  sel.innerHTML = "";
  state.study.levels.forEach(l => { const o = document.createElement("option"); o.value = l; o.textContent = l; sel.appendChild(o); });
  show("profile");
}

$("save-profile").addEventListener("click", async () => {
  const years = $("years").value;
  if (years === "") { showError("Enter your years of experience."); return; }
  const {res, body} = await api("api/reader/profile", {method: "POST", body: JSON.stringify({level: $("level").value, years: Number(years)})});
  if (!res.ok) { showError(body.error); return; }
  showError("");
  await next();
});

function buildForm() {
  const st = state.study;
  const dx = $("dx");
  dx.innerHTML = "";
  st.classes.forEach((c, k) => {
    const l = document.createElement("label");
    l.className = "choice";
    l.innerHTML = `<input type="radio" name="dx" value="${c.code}"><kbd>${k + 1}</kbd>${c.name} (${c.code})`;
    dx.appendChild(l);
  });
  const box = $("rating-box");
  box.innerHTML = "";
  if (st.scale.integer) {
    for (let v = st.scale.min; v <= st.scale.max; v++) {
      const l = document.createElement("label");
      l.className = "choice";
      l.innerHTML = `<input type="radio" name="rating" value="${v}"><kbd>${RATING_KEYS[v - st.scale.min] || ""}</kbd>${v}`;
      box.appendChild(l);
    }
    $("rating-keys").textContent = `keys ${RATING_KEYS.slice(0, st.scale.max - st.scale.min + 1).join(" ").toUpperCase()}` +
      ` (${st.scale.min} = certainly benign, ${st.scale.max} = certainly malignant)`;
    $("rating-help").textContent = "Q\u2013Y malignancy confidence";
  } else {
    box.innerHTML = `<input type="range" id="rating-range" min="${st.scale.min}" max="${st.scale.max}" step="1" value="50">` +
      ` <output id="rating-value">not set</output>`;
    $("rating-range").addEventListener("input", () => { $("rating-range").dataset.set = "1"; $("rating-value").textContent = $("rating-range").value; updateSubmit(); });
    $("rating-keys").textContent = `${st.scale.min} = certainly benign, ${st.scale.max} = certainly malignant; keys [ ] move by 5`;
    $("rating-help").textContent = "[ ] malignancy confidence";
  }
  const mg = $("management");
  mg.innerHTML = "";
  const mk = Object.fromEntries(Object.entries(MGMT_KEYS).map(([k, v]) => [v, k]));
  st.management.forEach(m => {
    const l = document.createElement("label");
    l.className = "choice";
    l.innerHTML = `<input type="radio" name="management" value="${m}"><kbd>${(mk[m] || "").toUpperCase()}</kbd>${MGMT_NAMES[m] || m}`;
    mg.appendChild(l);
  });
  document.querySelectorAll("#answer input").forEach(i => i.addEventListener("change", updateSubmit));
}

function answer() {
  const dx = document.querySelector("input[name=dx]:checked");
  const mg = document.querySelector("input[name=management]:checked");
  let rating = null;
  if (state.study.scale.integer) {
    const r = document.querySelector("input[name=rating]:checked");
    rating = r ? Number(r.value) : null;
  } else if ($("rating-range").dataset.set) {
    rating = Number($("rating-range").value);
  }
  return {diagnosis: dx ? dx.value : null, rating, management: mg ? mg.value : null};
}

function updateSubmit() {
  const a = answer();
  $("submit").disabled = busy || !(a.diagnosis && a.rating !== null && a.management);
}

async function next() {
  const {res, body} = await api("api/reader/open", {method: "POST"});
  if (!res.ok) { showError(body.error || ("Error " + res.status)); if (res.status === 409) showProfile(); return; }
  state = body;
  if (state.finished) {
    show("waiting");
    $("waiting-title").textContent = "Finished: thank you";
    $("waiting-text").textContent = `You answered all ${state.total} readings. You can close this page.`;
    return;
  }
  if (!state.case) {
    show("waiting");
    $("waiting-title").textContent = "Phase 1 complete";
    $("waiting-text").textContent = `Phase 2 opens on ${new Date(state.washout_until).toLocaleString()} ` +
      `(a washout of ${state.study.washout_days} days between the phases). Open your link again then.`;
    return;
  }
  current = state.case;
  show("reading");
  if (!$("dx").children.length) buildForm();
  document.querySelectorAll("#answer input[type=radio]").forEach(i => { i.checked = false; });
  if ($("rating-range")) { $("rating-range").value = 50; delete $("rating-range").dataset.set; $("rating-value").textContent = "not set"; }
  const ph = state.phases[state.phase - 1];
  $("progress").textContent = `Phase ${state.phase} of ${state.phases.length} (${state.modality}) \u00b7 case ` +
    `${ph.done + 1} of ${ph.total} \u00b7 overall ${state.done} of ${state.total} answered`;
  $("progress-fill").style.width = (100 * state.done / state.total) + "%";
  const banner = $("phase-banner");
  banner.textContent = state.modality === "aided" ? "Phase " + state.phase + ": with AI assistance" : "Phase " + state.phase + ": without AI";
  banner.className = state.modality;
  $("case-key").textContent = current.key;
  const img = await fetch(current.image, {headers: {"Authorization": "Bearer " + token()}});
  if (imageUrl) URL.revokeObjectURL(imageUrl);
  imageUrl = URL.createObjectURL(await img.blob());
  $("case-image").src = imageUrl;
  if (current.ai) renderAI(current.ai); else $("ai").classList.add("hidden");
  busy = false;
  updateSubmit();
}

// The AI's answer drawn as the clinician page draws it (serve/static/index.html, render()).
function renderAI(r) {
  const names = Object.fromEntries(state.study.classes.map(c => [c.code, c.name]));
  $("ai").classList.remove("hidden");
  $("toggle-heatmap").checked = false;
  $("heatmap").classList.remove("on");
  if (r.status !== "ok") {
    $("ai-out").classList.add("hidden");
    $("refusal").classList.remove("hidden");
    const ul = $("refusal-reasons");
    ul.innerHTML = "";
    (r.reasons || []).forEach(t => { const li = document.createElement("li"); li.textContent = t; ul.appendChild(li); });
    return;
  }
  $("refusal").classList.add("hidden");
  $("ai-out").classList.remove("hidden");
  renderAnswer(r, names);  // answer.js: the clinician page's own renderer
  const hasMap = Boolean(r.heatmap);
  $("heatbox").classList.toggle("hidden", !hasMap);
  $("toggle-wrap").classList.toggle("hidden", !hasMap);
  if (hasMap) {
    $("heat-crop").src = r.heatmap_crop;
    $("heatmap").src = r.heatmap;
    $("heatmap-class").textContent = r.heatmap_class;
  }
}

async function submit() {
  const a = answer();
  if (busy || !current || !(a.diagnosis && a.rating !== null && a.management)) return;
  busy = true;
  updateSubmit();
  const {res, body} = await api(`api/reader/cases/${encodeURIComponent(current.key)}/read`, {
    method: "POST", body: JSON.stringify({modality: state.modality, ...a})});
  if (!res.ok) { showError(body.error || ("Error " + res.status)); busy = false; updateSubmit(); return; }
  showError("");
  await next();
}

$("submit").addEventListener("click", submit);
$("stop").addEventListener("click", () => {
  show("waiting");
  $("waiting-title").textContent = "Stopped";
  $("waiting-text").textContent = "Every answer you submitted is saved. The current case was not answered; it comes " +
    "back first when you open your invitation link again.";
});
$("toggle-heatmap").addEventListener("change", (e) => $("heatmap").classList.toggle("on", e.target.checked));

document.addEventListener("keydown", (e) => {
  if ($("reading").classList.contains("hidden") || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.target.tagName === "INPUT" && e.target.type === "number") return;
  const k = e.key.toLowerCase();
  const pick = (name, value) => {
    const el = document.querySelector(`input[name=${name}][value="${value}"]`);
    if (el) { el.checked = true; updateSubmit(); e.preventDefault(); }
  };
  if (/^[1-9]$/.test(k) && Number(k) <= state.study.classes.length) pick("dx", state.study.classes[Number(k) - 1].code);
  else if (RATING_KEYS.includes(k) && state.study.scale.integer) pick("rating", state.study.scale.min + RATING_KEYS.indexOf(k));
  else if (MGMT_KEYS[k]) pick("management", MGMT_KEYS[k]);
  else if ((k === "[" || k === "]") && $("rating-range")) {
    const r = $("rating-range");
    r.value = Math.max(Number(r.min), Math.min(Number(r.max), Number(r.value) + (k === "]" ? 5 : -5)));
    r.dataset.set = "1";
    $("rating-value").textContent = r.value;
    updateSubmit();
  } else if (k === "h" && !$("toggle-wrap").classList.contains("hidden")) {
    $("toggle-heatmap").click();
  } else if (k === "enter") { e.preventDefault(); submit(); }
});

start();
