// How an answer is shown: the one renderer of the clinician page (index.html) and the reader study's aided
// phase (reader.js), so readers see exactly what the page shows. Both pages use the same element ids:
// #top, #bars, #calibration-note, #differential, #diff-coverage, #diff-note (optional), #mel-prob, #mel-thr,
// #mel-flag, #melanoma .marker/.value, #agreement, #members tbody.
"use strict";
const answerPct = (p) => (100 * p).toFixed(1) + "%";

function renderAnswer(r, names) {
  const $ = (id) => document.getElementById(id);
  $("top").textContent = `${names[r.top]} (${r.top}) \u2014 ${answerPct(r.top_probability)}`;
  const bars = $("bars");
  bars.innerHTML = "";
  Object.entries(r.probabilities).sort((a, b) => b[1] - a[1]).forEach(([c, p]) => {
    const row = document.createElement("div");
    row.className = "row bar" + (c === r.top ? " top" : "");
    row.dataset.cls = c;
    row.innerHTML = `<span class="name">${names[c]} (${c})</span><span class="track"><span class="fill" style="display:block;width:${(100 * p).toFixed(1)}%"></span></span><span class="pct">${answerPct(p)}</span>`;
    bars.appendChild(row);
  });
  $("calibration-note").textContent = r.calibrated
    ? "Probabilities are calibrated on validation data (temperature scaling): 70% means right about 70% of the time there."
    : "Probabilities are NOT calibrated (this bundle was made without validation predictions).";
  const diff = $("differential");
  const note = $("diff-note");
  diff.innerHTML = "";
  if (r.differential) {
    const cov = Math.round(100 * r.differential_coverage);
    $("diff-coverage").textContent = `(${cov}% coverage)`;
    r.differential.forEach(c => {
      const chip = document.createElement("span");
      chip.className = "chip" + (c === Object.keys(r.probabilities)[0] ? " mel" : "");  // the flag class leads every label set
      chip.dataset.cls = c;
      chip.textContent = `${names[c]} (${c})`;
      diff.appendChild(chip);
    });
    if (note) note.textContent = r.differential.length === 0
      ? "No diagnosis is likely enough to enter the differential: treat this result with suspicion."
      : `On validation images, a set built this way contained the true diagnosis ${cov}% of the time.`;
  } else {
    $("diff-coverage").textContent = "";
    const msg = "Not available: this bundle was made without validation predictions.";
    if (note) note.textContent = msg; else diff.textContent = msg;
  }
  // the flag class: melanoma under ham7/isic2019, "malignant" under the binary label set
  const flagName = (r.flag_class_name || "Melanoma");
  document.querySelectorAll(".flag-name").forEach(e => { e.textContent = flagName; });
  document.querySelectorAll(".flag-name-lower").forEach(e => { e.textContent = flagName.toLowerCase(); });
  $("mel-prob").textContent = flagName.toLowerCase() + " probability " + answerPct(r.flag_probability);
  $("mel-thr").textContent = answerPct(r.flag_threshold);
  const flag = $("mel-flag");
  flag.textContent = r.flagged ? "ABOVE the threshold" : "below the threshold";
  flag.className = "flag " + (r.flagged ? "high" : "low");
  document.querySelector("#melanoma .marker").style.left = (100 * r.flag_threshold) + "%";
  document.querySelector("#melanoma .value").style.left = (100 * r.flag_probability) + "%";
  $("agreement").textContent = `(${r.agreement} models agree with the ensemble)`;
  const tbody = document.querySelector("#members tbody");
  tbody.innerHTML = "";
  Object.entries(r.members).forEach(([name, m]) => {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td>${name}</td><td>${m.top}</td><td>${answerPct(m.probability)}</td><td>${answerPct(m.flag_probability)}</td>`;
    tbody.appendChild(tr);
  });
}
