// segrec reference page: plain JavaScript, no build step, no external files.
// Talks only to the frontend's JSON API (/api/...); every error the API
// returns is shown to the person with its HTTP status, code and message.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { mode: "existing", liked: [], lastItems: [], lastSearch: "", queried: false, busy: false };

// --- the API ---------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, source, code, message) {
    super(message);
    this.status = status; this.source = source; this.code = code;
  }
}

async function api(path, body) {
  const options = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new ApiError(0, "page", "NETWORK", `the frontend did not answer (${err.message})`);
  }
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON: reported below */ }
  if (!response.ok) {
    const e = (data && data.error) || {};
    throw new ApiError(response.status, e.source || "frontend", e.code || response.statusText,
                       e.message || text || "no message");
  }
  return data;
}

// --- errors ------------------------------------------------------------------------------------
const ERROR_SOURCES = { server: "from the model server", client: "from the gRPC client",
                        frontend: "from the frontend", page: "on this page" };

function showError(err, what) {
  const box = $("error");
  box.replaceChildren();
  const head = document.createElement("b");
  const where = ERROR_SOURCES[err.source] || err.source;
  head.textContent = `${what} failed: ` + (err.status ? `HTTP ${err.status} · ` : "") + `${err.code || "ERROR"} (${where})`;
  const msg = document.createElement("div");
  msg.className = "message";
  msg.textContent = err.message;
  box.append(head, msg);
  box.hidden = false;
}

function clearError() { $("error").hidden = true; }

// --- health --------------------------------------------------------------------------------------
async function loadHealth() {
  const pill = $("health");
  try {
    const h = await api("/api/health");
    const live = h.versions.filter((v) => v.state === "AVAILABLE").map((v) => v.version);
    pill.textContent = `${h.model_name} v${live.join(", v") || "–"} · ${h.target}`;
    pill.className = "pill ok";
    if (h.default_beta !== null && h.default_beta !== undefined) setBeta(h.default_beta);
    if (h.k_max) $("k").max = h.k_max;
  } catch (err) {
    pill.textContent = `model server: ${err.code}`;
    pill.className = "pill bad";
    showError(err, "Health check");
  }
}

// --- who: existing users or a typed profile ------------------------------------------------------
function switchMode(mode) {
  state.mode = mode;
  $("existing").hidden = mode !== "existing";
  $("typed").hidden = mode !== "typed";
  $("tab-existing").setAttribute("aria-selected", String(mode === "existing"));
  $("tab-typed").setAttribute("aria-selected", String(mode === "typed"));
}

async function loadUsers(q) {
  try {
    const data = await api(`/api/users?q=${encodeURIComponent(q)}`);
    const select = $("user-select");
    const keep = select.value;
    select.replaceChildren(...data.users.map((u) => {
      const opt = document.createElement("option");
      opt.value = u.user_id;
      opt.textContent = `${u.user_id} — ${u.profile || "no profile"} (${u.history_length} items)`;
      return opt;
    }));
    if (keep) select.value = keep;
    $("user-count").textContent = `${data.users.length} of ${data.total} users` +
      (data.total ? "" : " (start the frontend with --dataset-dir to list users)");
    if (data.total === 0) switchMode("typed");
  } catch (err) { showError(err, "Listing users"); }
}

async function searchItems(q) {
  if (!q.trim()) { state.lastItems = []; state.lastSearch = ""; return; }
  try {
    const data = await api(`/api/items?q=${encodeURIComponent(q)}`);
    state.lastSearch = q.trim();
    state.lastItems = data.items;
    $("item-options").replaceChildren(...data.items.map((it) => {
      const opt = document.createElement("option");
      opt.value = it.item_id;
      opt.label = it.title;
      return opt;
    }));
  } catch (err) { showError(err, "Item search"); }
}

async function addLiked() {
  const text = $("item-search").value.trim();
  if (!text) return;
  if (state.lastSearch !== text) await searchItems(text);  // typed faster than the search ran
  const lower = text.toLowerCase();
  let item = state.lastItems.find((it) => it.item_id === text)
    || state.lastItems.find((it) => it.title.toLowerCase() === lower)
    || (state.lastItems.length === 1 ? state.lastItems[0] : null);
  if (!item && state.lastItems.length > 1) {
    showError(new ApiError(0, "page", "AMBIGUOUS", `${state.lastItems.length} items match "${text}": pick one from the list`),
              "Adding a liked item");
    return;
  }
  // No match at all: the raw text as an item id (a frontend without --dataset-dir has no catalog
  // to search; with one, the frontend answers UNKNOWN_ITEM).
  item = item || { item_id: text, title: "" };
  clearError();
  state.liked = [item, ...state.liked.filter((it) => it.item_id !== item.item_id)];
  $("item-search").value = "";
  renderLiked();
}

function renderLiked() {
  $("liked").replaceChildren(...state.liked.map((it) => {
    const li = document.createElement("li");
    li.textContent = it.title ? `${it.title} ` : `${it.item_id} `;
    li.title = it.item_id;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `remove ${it.item_id}`);
    remove.onclick = () => { state.liked = state.liked.filter((x) => x !== it); renderLiked(); };
    li.append(remove);
    return li;
  }));
}

function parseProfile(text) {
  // "age: 31, occupation: engineer" or one attribute a line -> {age: "31", occupation: "engineer"}
  const profile = {};
  for (const part of text.split(/[\n,]/)) {
    if (!part.trim()) continue;
    const at = part.indexOf(":");
    if (at < 1) throw new ApiError(0, "page", "BAD_PROFILE", `profile: write "${part.trim().slice(0, 60)}" as name: value`);
    profile[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  return profile;
}

// --- recommend ---------------------------------------------------------------------------------------
function buildRequest() {
  const k = $("k").value.trim() === "" ? null : Number($("k").value);
  const body = { k, beta: Number($("beta").value) };
  if (state.mode === "existing") {
    const userId = $("user-select").value;
    if (!userId) throw new ApiError(0, "page", "NO_USER", "pick a user from the list first");
    body.user_id = userId;
  } else {
    body.profile = parseProfile($("profile").value);
    body.liked = state.liked.map((it) => it.item_id);
  }
  return body;
}

async function recommend() {
  if (state.busy) return;
  state.busy = true;
  $("submit").disabled = true;
  try {
    const result = await api("/api/recommend", buildRequest());
    clearError();
    render(result);
    state.queried = true;
  } catch (err) {
    showError(err, "Recommend");
  } finally {
    state.busy = false;
    $("submit").disabled = false;
  }
}

function setBeta(value) {
  $("beta").value = value;
  $("beta-value").textContent = Number(value).toFixed(2);
}

// --- results --------------------------------------------------------------------------------------------
function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function render(r) {
  $("placeholder").hidden = true;
  $("results").hidden = false;
  renderSegment(r.segment);
  $("results-meta").textContent = `model version ${r.model_version} · beta ${r.beta === null ? "default" : r.beta.toFixed(2)}` +
    ` · ${r.items.length} items`;
  const top = r.items.length ? Math.max(...r.items.map((it) => Math.abs(it.score))) || 1 : 1;
  $("items").tBodies[0].replaceChildren(...r.items.map((it, i) => {
    const row = el("tr", undefined, it.held_out ? "hit" : "");
    const title = el("td", it.title || "(no title)", "title");
    if (it.held_out) title.append(el("span", "held-out next item", "badge"));
    const score = el("td", undefined, "num");
    const bar = el("span", undefined, "bar");
    bar.style.width = `${Math.max(2, (60 * Math.abs(it.score)) / top)}px`;
    score.append(bar, el("span", it.score.toFixed(4)));
    row.append(el("td", String(i + 1), "rank"), title, el("td", it.item_id, "id"),
               el("td", it.categories.join(", "), "cats"), score);
    return row;
  }));
  if (!r.items.length) {
    const empty = el("tr");
    empty.append(el("td", "(no items)"));
    $("items").tBodies[0].append(empty);
  }
  $("user-text").textContent = r.query.user_text;
  $("history").replaceChildren(...r.query.history.map((it) => el("li", `${it.title || "(no title)"} · ${it.item_id}`)));
  if (!r.query.history.length) $("history").append(el("li", "(none: a cold user, served by the segment centroid)"));
}

function renderSegment(s) {
  const box = $("segment");
  box.replaceChildren();
  const head = el("div", undefined, "segment-head");
  head.append(el("span", `segment ${s.id}`, "segment-id"), el("span", s.label, "segment-label"));
  if (s.confidence !== null) head.append(el("span", `p = ${s.confidence.toFixed(2)}`, "hint"));
  box.append(head, el("div", "segment probabilities", "hint probs-caption"));
  const probs = el("div", undefined, "probs");
  s.probs.forEach((p, i) => {
    const col = el("div", undefined, i === s.id ? "prob current" : "prob");
    col.title = `segment ${i}: ${p.toFixed(3)}`;
    const fill = el("div", undefined, "fill");
    fill.style.height = `${Math.round(100 * p)}%`;
    col.append(fill, el("span", String(i)));
    probs.append(col);
  });
  box.append(probs);
  const profile = s.profile;
  if (!profile) {
    box.append(el("p", "no segment profile (start the frontend with --segments or --model-base-path)", "hint"));
    return;
  }
  const facts = el("dl", undefined, "profile");
  const add = (name, value) => { if (value) facts.append(el("dt", name), el("dd", value)); };
  add("members", `${profile.size} user${profile.size === 1 ? "" : "s"} (${(100 * profile.share).toFixed(1)}%)`);
  add("top categories", (profile.top_categories || []).map((c) => `${c.category} ×${c.lift.toFixed(1)}`).join(", "));
  add("top items", (profile.top_items || []).map((it) => it.title || it.item_id).join("; "));
  for (const [name, summary] of Object.entries(profile.attributes || {})) {
    add(name, "mean" in summary ? `mean ${summary.mean} (${summary.min}–${summary.max})`
      : Object.entries(summary).map(([v, share]) => `${v} ${Math.round(100 * share)}%`).join(", "));
  }
  box.append(facts);
}

// --- wiring -------------------------------------------------------------------------------------------------
function debounce(fn, ms) {
  let timer;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

document.addEventListener("DOMContentLoaded", () => {
  $("tab-existing").onclick = () => switchMode("existing");
  $("tab-typed").onclick = () => switchMode("typed");
  $("user-search").addEventListener("input", debounce((e) => loadUsers(e.target.value), 200));
  $("user-select").addEventListener("dblclick", recommend);
  $("item-search").addEventListener("input", debounce((e) => searchItems(e.target.value), 200));
  $("item-search").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); addLiked(); } });
  $("item-add").onclick = addLiked;
  $("beta").addEventListener("input", (e) => setBeta(e.target.value));
  // Re-query when the slider is released, once there is something to re-query.
  $("beta").addEventListener("change", () => { if (state.queried) recommend(); });
  $("query-form").addEventListener("submit", (e) => { e.preventDefault(); recommend(); });
  loadHealth();
  loadUsers("");
});
