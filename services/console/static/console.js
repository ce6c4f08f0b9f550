// The console's pages: projects, one project (launch dialog, live studies), one study.
// Plain JS, no build step. Every text from the API goes in through textContent.
"use strict";

const API = "/api/v1";
const LIVE = new Set(["STUDY_STATE_QUEUED", "STUDY_STATE_RUNNING"]);
const QUICK_TRIALS = 20;

// ---- helpers ------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function short(state) {
  return String(state || "").replace(/^(STUDY|TRIAL)_STATE_/, "");
}

function num(value, digits = 4) {
  return typeof value === "number" ? value.toFixed(digits) : "-";
}

// Where the console asks for LORATUNE_AUTH_TOKEN: the browser signs in once (a cookie).
function signIn() {
  const here = window.location.pathname + window.location.search;
  window.location.assign(`/sign-in?next=${encodeURIComponent(here)}`);
}

async function getJson(path, options) {
  const response = await fetch(API + path, options);
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    signIn();
    throw new Error("Signing in: this console asks for its access token.");
  }
  if (!response.ok) {
    const message = (body.error && body.error.message) || `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

// A study and all its trials, a page of TRIAL_PAGE trials at a time (ListTrials' paging).
const TRIAL_PAGE = 500;
async function getStudy(path) {
  let token = "";
  let study = null;
  const trials = [];
  do {
    const query = `?page_size=${TRIAL_PAGE}` + (token ? `&page_token=${encodeURIComponent(token)}` : "");
    const body = await getJson(path + query);
    study = body.study;
    trials.push(...(body.trials || []));
    token = body.next_page_token || "";
  } while (token);
  return { study, trials };
}

function showError(where, error) {
  where.replaceChildren(el("p", { class: "error", role: "alert" }, error.message || String(error)));
}

function progress(study) {
  const done = (study.trials_complete || 0) + (study.trials_pruned || 0) + (study.trials_failed || 0);
  return `${done} / ${study.fine_tuning_params.n_trials}`;
}

function best(study) {
  const trial = study.best_trial;
  if (!trial || typeof trial.objective !== "number") return "-";
  return `${trial.objective.toFixed(4)} (#${trial.number})`;
}

function studyLink(study) {
  return el("a", { href: `/studies/${encodeURIComponent(study.study_id)}/live` }, study.study_id);
}

function table(headers, rows, attrs) {
  const head = el("tr", null, ...headers.map((h) => el("th", { scope: "col" }, h)));
  return el("table", attrs, el("thead", null, head), el("tbody", null, ...rows));
}

// ---- the projects page --------------------------------------------------------------------

async function projectsView(main) {
  const [{ projects }, { studies }] = await Promise.all([
    getJson("/projects"),
    getJson("/studies"),
  ]);
  if (!projects.length) {
    main.append(el("p", { class: "muted" }, "No projects: add one to the projects file."));
    return;
  }
  const rows = projects.map((p) => {
    const own = studies.filter((s) => s.project_id === p.project_id);
    const list = el("ul", null, ...own.map((s) =>
      el("li", null, studyLink(s), " ", el("span", { class: short(s.state) }, short(s.state)), ` ${progress(s)}`)));
    return el("tr", null,
      el("td", { class: "n" }, p.project_id),
      el("td", null, el("a", { href: `/projects/${encodeURIComponent(p.project_id)}` }, p.name || "(unnamed)")),
      el("td", null, short(p.dataset.task_type).replace("TASK_TYPE_", "").toLowerCase()),
      el("td", null, p.base_model_name || "-"),
      el("td", null, own.length ? list : el("span", { class: "muted" }, "none yet")));
  });
  main.append(table(["id", "project", "task", "base model", "studies"], rows));
}

// ---- one project: launch and its studies --------------------------------------------------

function post(path, body) {
  return getJson(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

async function launch(body) {
  return post("/fine-tuning", body);
}

async function judgeModels() {
  try {
    const { models } = await getJson("/judge-models");
    return { models: models.filter((m) => m.available), error: null };
  } catch (error) {
    return { models: [], error };
  }
}

function launchDialog(project, judges, classification) {
  const dialog = el("dialog", { id: "configure", "aria-labelledby": "configure-title" });
  const form = el("form", { id: "configure-form" });
  const judgeBox = el("input", { type: "checkbox", id: "use-judge", name: "use_llm_judge" });
  judgeBox.checked = !classification && judges.models.length > 0;
  judgeBox.disabled = judges.models.length === 0;
  const select = el("select", { id: "judge-model", name: "judge_model_id" });
  for (const m of judges.models) {
    const option = el("option", { value: m.id }, m.is_default ? `${m.id} (default)` : m.id);
    option.selected = m.is_default;
    select.append(option);
  }
  const syncSelect = () => { select.disabled = !judgeBox.checked; };
  judgeBox.addEventListener("change", syncSelect);
  syncSelect();
  const base = el("input", { type: "text", id: "base-model", name: "base_model_name", required: true,
    autocomplete: "off", "aria-describedby": "base-model-help" });
  base.value = project.base_model_name || "";
  const trials = el("input", { type: "number", id: "n-trials", name: "n_trials", min: 5, max: 100,
    step: 1, required: true, "aria-describedby": "n-trials-help" });
  trials.value = String(project.n_trials >= 5 && project.n_trials <= 100 ? project.n_trials : QUICK_TRIALS);
  // Minutes in the page, seconds on the wire; empty = no budget (the project's, if it has one).
  const budget = el("input", { type: "number", id: "time-budget", name: "time_budget_minutes", min: 1,
    max: 43200, step: 1, "aria-describedby": "time-budget-help" });
  budget.value = project.time_budget_seconds ? String(Math.round(project.time_budget_seconds / 60)) : "";
  const message = el("div", { id: "configure-error", "aria-live": "assertive" });
  const submit = el("button", { type: "submit" }, "Start");
  const cancel = el("button", { type: "button" }, "Cancel");
  cancel.addEventListener("click", () => dialog.close());
  const judgeNote = judges.error
    ? el("p", { class: "muted" }, `No judge models: ${judges.error.message}`)
    : classification ? el("p", { class: "muted" }, "The LLM judge does not apply to classification projects.") : null;
  form.append(
    el("p", null, judgeBox, " ", el("label", { for: "use-judge", class: "inline" }, "Enable LLM judge")),
    judgeNote,
    el("p", null, el("label", { for: "judge-model" }, "Judge model"), select),
    el("p", null, el("label", { for: "base-model" }, "Base model"), base,
      el("small", { id: "base-model-help", class: "muted" }, "A Hugging Face name or a local path")),
    el("p", null, el("label", { for: "n-trials" }, "Optimisation trials"), trials,
      el("small", { id: "n-trials-help", class: "muted" }, "From 5 to 100")),
    el("p", null, el("label", { for: "time-budget" }, "Time budget (minutes)"), budget,
      el("small", { id: "time-budget-help", class: "muted" },
        "Optional: no trial starts after this; running ones finish")),
    message,
    el("p", { class: "actions" }, cancel, submit));
  // The browser checks the fields (min, max, required) before this runs.
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.replaceChildren();
    submit.disabled = true;
    try {
      const reply = await launch({
        project_id: String(project.project_id),
        fine_tuning_params: {
          use_llm_judge: judgeBox.checked,
          judge_model_id: judgeBox.checked ? select.value : "",
          base_model_name: base.value.trim(),
          n_trials: Number(trials.value),
          time_budget_seconds: budget.value ? Number(budget.value) * 60 : 0,
        },
      });
      window.location.assign(`/studies/${encodeURIComponent(reply.study.study_id)}/live`);
    } catch (error) {
      showError(message, error);
    } finally {
      submit.disabled = false;
    }
  });
  dialog.append(el("h2", { id: "configure-title" }, "Configure fine-tuning"), form);
  return dialog;
}

function studyRow(study) {
  return el("tr", { "data-study": study.study_id },
    el("td", null, studyLink(study)),
    el("td", { class: short(study.state) }, short(study.state)),
    el("td", { class: "n" }, progress(study)),
    el("td", null, study.objective_name || "-"),
    el("td", { class: "n" }, best(study)),
    el("td", null, study.fine_tuning_params.base_model_name));
}

// Keeps a study's row current from its event stream until it ends.
function followRow(study, tbody) {
  if (!LIVE.has(study.state)) return;
  const source = new EventSource(`${API}/studies/${encodeURIComponent(study.study_id)}/events`);
  const refresh = async () => {
    const { study: now } = await getJson(`/studies/${encodeURIComponent(study.study_id)}?page_size=1`);
    const row = tbody.querySelector(`tr[data-study="${CSS.escape(study.study_id)}"]`);
    if (row) row.replaceWith(studyRow(now));
    if (!LIVE.has(now.state)) source.close();
  };
  for (const kind of ["trial_started", "trial_finished", "study_finished"]) {
    source.addEventListener(kind, () => { refresh().catch(() => {}); });
  }
  source.addEventListener("error", () => { if (source.readyState === EventSource.CLOSED) source.close(); });
}

async function projectView(main, projectId) {
  const [{ project }, judges, { studies }] = await Promise.all([
    getJson(`/projects/${encodeURIComponent(projectId)}`),
    judgeModels(),
    getJson(`/studies?project_id=${encodeURIComponent(projectId)}`),
  ]);
  document.title = `${project.name} - loratune`;
  document.getElementById("title").textContent = `Project ${project.name}`;
  const classification = project.dataset.task_type === "TASK_TYPE_CLASSIFICATION";
  const fallback = judges.models.find((m) => m.is_default) || null;
  const dialog = launchDialog(project, judges, classification);
  const status = el("div", { id: "launch-status", "aria-live": "polite" });
  const configure = el("button", { type: "button", id: "open-configure", "aria-haspopup": "dialog" },
    "Configure fine-tuning");
  configure.addEventListener("click", () => dialog.showModal());
  const quick = el("button", { type: "button", id: "quick-launch" }, "Quick launch");
  quick.addEventListener("click", async () => {
    quick.disabled = true;
    status.replaceChildren();
    try {
      const useJudge = !classification && fallback !== null;
      const reply = await launch({
        project_id: String(project.project_id),
        fine_tuning_params: {
          use_llm_judge: useJudge,
          judge_model_id: useJudge ? fallback.id : "",
          base_model_name: project.base_model_name || "",
          n_trials: QUICK_TRIALS,
        },
      });
      window.location.assign(`/studies/${encodeURIComponent(reply.study.study_id)}/live`);
    } catch (error) {
      showError(status, error);
      quick.disabled = false;
    }
  });
  const quickNote = classification
    ? `Quick launch: ${QUICK_TRIALS} trials without the LLM judge (it does not apply to classification).`
    : fallback
      ? `Quick launch: ${QUICK_TRIALS} trials with the LLM judge ${fallback.id}.`
      : `Quick launch: ${QUICK_TRIALS} trials; no judge model has credentials, so without the judge.`;
  main.append(
    table(["", ""], [
      el("tr", null, el("th", { scope: "row" }, "dataset"), el("td", null, project.dataset.uri)),
      el("tr", null, el("th", { scope: "row" }, "task"), el("td", null, classification ? "classification" : "generation")),
      el("tr", null, el("th", { scope: "row" }, "base model"), el("td", null, project.base_model_name || "-")),
    ]),
    el("p", null, configure, " ", quick),
    el("p", { id: "quick-note", class: "muted" }, quickNote),
    status, dialog,
    el("h2", null, "Studies"));
  if (!studies.length) {
    main.append(el("p", { class: "muted" }, "No studies yet."));
    return;
  }
  const tbody = el("tbody", null, ...studies.map(studyRow));
  const head = el("tr", null, ...["study", "state", "trials done", "objective", "best", "base model"]
    .map((h) => el("th", { scope: "col" }, h)));
  main.append(el("table", { id: "studies" }, el("thead", null, head), tbody));
  studies.forEach((s) => followRow(s, tbody));
}

// ---- one study ----------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  node.append(...children);
  return node;
}

// The objective of each finished trial, and the best so far as a line.
function chart(trials, objectiveName) {
  const points = trials.filter((t) => typeof t.objective === "number")
    .sort((a, b) => a.number - b.number);
  const width = 420, height = 140, pad = 24;
  const root = svg("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `${objectiveName || "objective"} over trials` });
  if (!points.length) {
    root.append(svg("text", { x: pad, y: height / 2, fill: "#6b7785" }, "no finished trials yet"));
    return root;
  }
  const values = points.map((t) => t.objective);
  const low = Math.min(...values), high = Math.max(...values);
  const span = high - low || 1;
  const last = Math.max(...points.map((t) => t.number), 1);
  const x = (n) => pad + (n / last) * (width - 2 * pad);
  const y = (v) => height - pad - ((v - low) / span) * (height - 2 * pad);
  let running = -Infinity;
  const line = points.map((t) => { running = Math.max(running, t.objective); return `${x(t.number)},${y(running)}`; });
  root.append(svg("polyline", { points: line.join(" ") }));
  for (const t of points) {
    const dot = svg("circle", { cx: x(t.number), cy: y(t.objective), r: 3 },
      svg("title", {}, `#${t.number}: ${t.objective.toFixed(4)}`));
    root.append(dot);
  }
  root.append(svg("text", { x: 2, y: 12, "font-size": 10, fill: "#6b7785" }, high.toFixed(3)),
    svg("text", { x: 2, y: height - 4, "font-size": 10, fill: "#6b7785" }, low.toFixed(3)));
  return root;
}

// What a completed study bought, on validation: its floor, default trial, selection, the
// noise behind the choice and the trial published (Study.report).
function reportRows(study) {
  const r = study.report;
  if (!r) return [];
  const row = (name, value, attrs) => el("tr", null, el("th", { scope: "row" }, name), el("td", attrs || null, value));
  const rows = [];
  if (typeof r.floor_trial === "number") rows.push(row("floor (probe only)", `#${r.floor_trial}: ${num(r.floor_objective)}`));
  if (typeof r.default_trial === "number") rows.push(row("default trial", `#${r.default_trial}: ${num(r.default_objective)}`));
  let selected = `#${r.selected_trial || 0}: ${num(r.selected_objective)} (best of ${r.trials_compared || 0})`;
  if (typeof r.noise === "number") selected += `, noise ±${num(r.noise)}; the best of ${r.candidates || r.trials_compared || 0} evaluations is ahead by ~${num(r.expected_optimism)} by chance`;
  rows.push(row("selected", selected));
  const members = r.ensemble_trials || [];
  if (members.length) {
    const compared = typeof r.selected_macro_f1 === "number" ? ` against the selected trial's ${num(r.selected_macro_f1)}` : "";
    rows.push(row("ensemble", `each base's best and the floors (${members.map((n) => `#${n}`).join(", ")}): macro-F1 ${num(r.ensemble_objective)}${compared}`));
    if (typeof r.ensemble_cross_validated === "number" && typeof r.single_cross_validated === "number") {
      rows.push(row("cross-validated", `on validation halves: ensemble ${num(r.ensemble_cross_validated)}, single model ${num(r.single_cross_validated)}`));
    }
  }
  const floor = typeof r.floor_trial === "number" && (r.published_trial || 0) === r.floor_trial;
  const published = r.ensemble_published
    ? `the ensemble of ${members.map((n) => `#${n}`).join(", ")}`
    : `#${r.published_trial || 0}${floor ? " (the floor)" : ""}`;
  rows.push(row("published", published, { id: "study-published" }));
  if (r.warning) rows.push(row("warning", r.warning, { class: "error", id: "study-warning" }));
  return rows;
}

function trialsTable(study, trials, onShow) {
  const bestNumber = study.best_trial && typeof study.best_trial.objective === "number"
    ? study.best_trial.number : null;
  // A study of several base models shows each trial's base.
  const several = (study.fine_tuning_params.base_model_names || []).length > 0;
  const rows = [...trials].sort((a, b) => a.number - b.number).map((t) => {
    const h = t.hyperparameters || {};
    const lora = h.lora || {}, training = h.training || {};
    const show = t.evaluation && t.evaluation.task_type !== "TASK_TYPE_UNSPECIFIED"
      ? el("button", { type: "button", "data-trial": t.number }, `Evaluation #${t.number}`) : "";
    if (show) show.addEventListener("click", () => onShow(t));
    // A repeat of a finished point took that trial's result without a job (same_as).
    const reused = typeof t.same_as === "number";
    const classes = [t.number === bestNumber ? "best" : "", reused ? "reused" : ""].join(" ").trim();
    return el("tr", { class: classes || null, "data-trial": t.number },
      el("td", { class: "n" }, t.number),
      el("td", { class: short(t.state), title: reused ? `the result of trial #${t.same_as}, no job` : null },
        reused ? `= #${t.same_as}` : short(t.state)),
      ...(several ? [el("td", { title: t.base_model || "" }, (t.base_model || "-").split("/").pop())] : []),
      el("td", { class: "n" }, lora.rank ?? "-"),
      el("td", { class: "n" }, lora.alpha ?? "-"),
      el("td", { class: "n" }, num(lora.dropout, 2)),
      el("td", { class: "n" }, typeof training.learning_rate === "number" ? training.learning_rate.toExponential(1) : "-"),
      el("td", { class: "n" }, training.num_epochs ?? "-"),
      el("td", { class: "n" }, num(t.objective)),
      el("td", null, show));
  });
  return table(["#", "state", ...(several ? ["base"] : []), "rank", "alpha", "dropout", "lr", "epochs",
    study.objective_name || "objective", ""], rows, { id: "trials" });
}

function evaluationView(trial, study) {
  const e = trial.evaluation;
  const box = el("section", { id: "evaluation", "aria-labelledby": "evaluation-title" },
    el("h2", { id: "evaluation-title" }, `Evaluation of trial #${trial.number}`));
  if (e.task_type === "TASK_TYPE_CLASSIFICATION") {
    const c = e.classification || {};
    box.append(el("p", null, `accuracy ${num(c.accuracy)}, F1 macro ${num(c.f1_macro)}, F1 weighted ${num(c.f1_weighted)}`));
    const rows = (c.per_class || []).map((k) => el("tr", null, el("td", null, k.label),
      el("td", { class: "n" }, num(k.precision, 3)), el("td", { class: "n" }, num(k.recall, 3)),
      el("td", { class: "n" }, num(k.f1, 3)), el("td", { class: "n" }, k.support)));
    box.append(table(["class", "precision", "recall", "F1", "support"], rows, { id: "per-class" }));
    const excluded = (e.excluded_classes && e.excluded_classes.length ? e.excluded_classes : study.excluded_classes) || [];
    if (excluded.length) {
      box.append(el("p", { id: "excluded" }, "Left out of training: ",
        excluded.map((x) => `${x.label} (${x.train_rows} train rows)`).join(", "),
        e.excluded_note || study.excluded_note ? `. ${e.excluded_note || study.excluded_note}` : ""));
    }
    box.append(heatmap(c.confusion_matrix));
  } else {
    const b = e.bertscore || {}, j = e.judge || {};
    box.append(table(["metric", "value"], [
      el("tr", null, el("td", null, "BERTScore F1"), el("td", { class: "n" }, num(b.f1))),
      el("tr", null, el("td", null, `judge ${j.judge_model_id || ""}`.trim()),
        el("td", { class: "n" }, j.requested ? `${num(j.mean_score)} (${j.judged}/${j.requested} judged)` : "not used")),
      el("tr", null, el("td", null, "combined"), el("td", { class: "n" }, num(e.combined_score))),
    ], { id: "generation-scores" }));
  }
  return box;
}

function heatmap(matrix) {
  if (!matrix || !matrix.labels || !matrix.labels.length) return el("p", { class: "muted" }, "No confusion matrix.");
  const labels = matrix.labels, n = labels.length;
  const counts = (matrix.counts || []).map(Number);
  const top = Math.max(1, ...counts);
  const rows = labels.map((label, i) => el("tr", null, el("th", { scope: "row" }, label),
    ...labels.map((_, j) => {
      const count = counts[i * n + j] || 0;
      const alpha = (count / top).toFixed(2);
      const color = i === j ? `rgba(23,128,61,${alpha})` : `rgba(180,35,24,${alpha})`;
      const cell = el("td", { title: `true ${label}, predicted ${labels[j]}: ${count}` }, count);
      cell.style.background = color;
      if (count / top > 0.6) cell.style.color = "#fff";
      return cell;
    })));
  const head = el("tr", null, el("th", { scope: "col" }, "true \\ predicted"),
    ...labels.map((l) => el("th", { scope: "col" }, l)));
  return el("figure", null, el("figcaption", null, "Confusion matrix (rows: true class)"),
    el("table", { class: "heat", id: "confusion" }, el("thead", null, head), el("tbody", null, ...rows)));
}

async function studyView(main, studyId) {
  const path = `/studies/${encodeURIComponent(studyId)}`;
  let { study, trials } = await getStudy(path);
  let shown = null; // the trial whose evaluation is shown; the best one by default
  const running = new Map(); // trial number -> {epoch, loss, objective}
  const summary = el("section", { id: "summary", "aria-live": "polite" });
  const stopper = el("button", { type: "button", id: "cancel-study" }, "Cancel study");
  const stopStatus = el("span", { id: "cancel-status", "aria-live": "polite" });
  const controls = el("p", { id: "study-controls" }, stopper, " ", stopStatus);
  const live = el("section", { id: "running", "aria-live": "polite" });
  const body = el("div");
  main.append(summary, controls, live, body);
  // Cancelling asks first; running trials are stopped and the study ends CANCELLED, which
  // the event stream then shows.
  stopper.addEventListener("click", async () => {
    if (!window.confirm(`Cancel study ${study.study_id}? Its running trials are stopped.`)) return;
    stopper.disabled = true;
    stopStatus.replaceChildren("Cancelling...");
    try {
      ({ study } = await post(`${path}:cancel`, {}));
      stopStatus.replaceChildren();
      render();
    } catch (error) {
      showError(stopStatus, error);
      stopper.disabled = false;
    }
  });
  document.getElementById("title").textContent = `Study ${study.study_id}`;

  function render() {
    controls.hidden = !LIVE.has(study.state);
    summary.replaceChildren(table(["", ""], [
      el("tr", null, el("th", { scope: "row" }, "project"),
        el("td", null, el("a", { href: `/projects/${encodeURIComponent(study.project_id)}` }, study.project_id))),
      el("tr", null, el("th", { scope: "row" }, "state"),
        el("td", { class: short(study.state), id: "study-state" }, short(study.state))),
      el("tr", null, el("th", { scope: "row" }, "trials done"), el("td", { id: "study-progress" }, progress(study))),
      el("tr", null, el("th", { scope: "row" }, `best ${study.objective_name || ""}`.trim()),
        el("td", { id: "study-best" }, best(study))),
      el("tr", null, el("th", { scope: "row" }, "base model"),
        el("td", null, [study.fine_tuning_params.base_model_name, ...(study.fine_tuning_params.base_model_names || [])].join(", "))),
      el("tr", null, el("th", { scope: "row" }, "LLM judge"),
        el("td", null, study.fine_tuning_params.use_llm_judge ? study.fine_tuning_params.judge_model_id || "default" : "off")),
      study.fine_tuning_params.time_budget_seconds
        ? el("tr", null, el("th", { scope: "row" }, "time budget"),
          el("td", { id: "study-budget" }, `${Math.round(study.fine_tuning_params.time_budget_seconds / 60)} min`)) : null,
      study.trials_reused
        ? el("tr", null, el("th", { scope: "row" }, "repeats"),
          el("td", null, `${study.trials_reused} repeated a finished point: its result, no job`)) : null,
      study.end_note ? el("tr", null, el("th", { scope: "row" }, "ended early"), el("td", { id: "study-end-note" }, study.end_note)) : null,
      study.waiting_reason && LIVE.has(study.state)
        ? el("tr", null, el("th", { scope: "row" }, "waiting"),
          el("td", { id: "study-waiting" }, `${study.waiting_reason} (since ${new Date(study.waiting_since).toLocaleTimeString()})`)) : null,
      study.failure_reason ? el("tr", null, el("th", { scope: "row" }, "failure"), el("td", { class: "error" }, study.failure_reason)) : null,
      ...reportRows(study),
    ]));
    renderRunning();
    const chosen = shown ?? (study.best_trial && typeof study.best_trial.objective === "number" ? study.best_trial.number : null);
    const trial = trials.find((t) => t.number === chosen);
    // A live update rebuilds the table: the keyboard's place in it is kept.
    const focused = body.contains(document.activeElement) ? document.activeElement.dataset.trial : undefined;
    body.replaceChildren(
      el("h2", null, "Objective over trials"), chart(trials, study.objective_name),
      el("h2", null, "Trials"), trialsTable(study, trials, (t) => { shown = t.number; render(); document.getElementById("evaluation").focus(); }),
      trial && trial.evaluation ? evaluationView(trial, study) : el("p", { class: "muted" }, "No evaluated trial yet."));
    const section = document.getElementById("evaluation");
    if (section) section.tabIndex = -1;
    if (focused !== undefined) {
      const again = body.querySelector(`button[data-trial="${CSS.escape(focused)}"]`);
      if (again) again.focus();
    }
  }

  function renderRunning() {
    const rows = trials.filter((t) => t.state === "TRIAL_STATE_RUNNING").map((t) => {
      const p = running.get(t.number) || {};
      return el("tr", null, el("td", { class: "n" }, t.number), el("td", { class: "n" }, p.epoch ?? "-"),
        el("td", { class: "n" }, num(p.loss)), el("td", { class: "n" }, num(p.objective)));
    });
    live.replaceChildren(rows.length
      ? table(["running trial", "epoch", "loss", "last objective"], rows, { id: "running-trials" })
      : el("p", { class: "muted" }, LIVE.has(study.state) ? "Waiting for a trial to start." : ""));
  }

  function upsert(trial) {
    const i = trials.findIndex((t) => t.number === trial.number);
    if (i >= 0) trials[i] = trial; else trials.push(trial);
  }

  render();
  if (!LIVE.has(study.state)) return;
  const source = new EventSource(`${API}${path}/events`);
  const data = (event) => JSON.parse(event.data);
  const reload = async () => { ({ study, trials } = await getStudy(path)); render(); };
  source.addEventListener("trial_started", (event) => {
    upsert(data(event).trial_started.trial);
    study.waiting_reason = "";
    render();
  });
  source.addEventListener("study_waiting", (event) => {
    const w = data(event).study_waiting;
    study.waiting_reason = w.reason;
    study.waiting_since = w.since;
    render();
  });
  source.addEventListener("trial_progress", (event) => {
    const p = data(event).trial_progress;
    running.set(p.number, { ...(running.get(p.number) || {}), epoch: p.epoch, loss: p.loss });
    renderRunning();
  });
  source.addEventListener("trial_evaluated", (event) => {
    const e = data(event).trial_evaluated;
    running.set(e.number, { ...(running.get(e.number) || {}), objective: e.evaluation.objective });
    renderRunning();
  });
  source.addEventListener("trial_finished", (event) => {
    upsert(data(event).trial_finished.trial);
    reload().catch(() => render());
  });
  source.addEventListener("study_finished", (event) => {
    source.close();
    study = data(event).study_finished.study;
    reload().catch(() => render());
  });
  source.addEventListener("error", (event) => {
    if (event.data) {
      source.close();
      showError(live, new Error(JSON.parse(event.data).error.message));
    }
  });
}

// ---- start --------------------------------------------------------------------------------

async function start() {
  const main = document.getElementById("main");
  const { view, id } = document.body.dataset;
  try {
    if (view === "projects") await projectsView(main);
    else if (view === "project") await projectView(main, id);
    else if (view === "study") await studyView(main, id);
  } catch (error) {
    showError(main, error);
  }
}

start();
