"use strict";
// crossmodal-rag page: plain JS, no build step, nothing loaded from outside this server.
const $ = (id) => document.getElementById(id);
let chosenFile = null;

function setStatus(el, text, isError = false) {
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function api(url, options = {}) {
  const resp = await fetch(url, options);
  let body = null;
  try { body = await resp.json(); } catch (e) { /* not JSON */ }
  if (!resp.ok) {
    const msg = body && body.error ? body.error.message : `${resp.status} ${resp.statusText}`;
    throw new Error(msg);
  }
  return body;
}

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

// The text read in an image (index --ocr), with the query's words marked (built as DOM nodes,
// never as HTML, so the text cannot inject markup).
function ocrBlock(text, query) {
  const words = (query || "").toLowerCase().split(/[^\p{L}\p{N}]+/u).filter((w) => w.length > 1);
  const box = el("div", { class: "ocr", title: "text in the image" });
  const lower = text.toLowerCase();
  let i = 0;
  while (i < text.length) {
    let best = -1, len = 0;
    for (const w of words) {
      const j = lower.indexOf(w, i);
      if (j >= 0 && (best < 0 || j < best)) { best = j; len = w.length; }
    }
    if (best < 0) { box.append(document.createTextNode(text.slice(i))); break; }
    if (best > i) box.append(document.createTextNode(text.slice(i, best)));
    box.append(el("mark", {}, text.slice(best, best + len)));
    i = best + len;
  }
  return box;
}

function renderResults(data) {
  const list = $("results");
  list.replaceChildren();
  for (const hit of data.results) {
    const li = el("li", { class: "card", "data-id": String(hit.id), "data-kind": hit.kind });
    // a caption a vision-language model wrote (index --caption-model) is shown as generated
    const made = new Set(hit.generated || []);
    const mark = (t) => (made.has(t) ? `(generated) ${t}` : t);
    const caption = hit.text !== null ? mark(hit.text) : hit.captions.map(mark).join(" · ");
    if (hit.thumbnail_url) {
      const a = el("a", { href: hit.image_url, target: "_blank", rel: "noopener" });
      a.append(el("img", { src: hit.thumbnail_url, alt: caption || `item ${hit.id}`, loading: "lazy" }));
      li.append(a);
    }
    const meta = el("div", { class: "meta" });
    meta.append(el("div", { class: "score" }, `#${hit.rank} · ${hit.score.toFixed(3)}`));
    meta.append(el("div", { class: "cap" }, caption || (hit.path || "").split("/").pop()));
    const shot = captureLine(hit.capture);
    if (shot) meta.append(el("div", { class: "capture" }, shot));
    const ocrText = hit.kind === "ocr" ? hit.text : hit.ocr;
    if (ocrText) meta.append(ocrBlock(ocrText, data.query && data.query.text));
    li.append(meta);
    list.append(li);
  }
}

// When, where and with what a photo was taken, in one line: "2023-07-14 18:03 · Paris, FR · Apple iPhone 12".
function captureLine(c) {
  if (!c) return "";
  const when = c.taken && c.taken_source !== "file" ? c.taken.slice(0, 16).replace("T", " ") : "";
  const where = [c.city, c.country].filter(Boolean).join(", ");
  const camera = [c.make, c.model].filter(Boolean).join(" ");
  return [when, where, camera].filter(Boolean).join(" · ");
}

// The date-range and place facets as --where filters.
function facetFilters() {
  const from = $("taken-from").value, to = $("taken-to").value, place = $("place").value;
  const where = [];
  if (from && to) where.push(`taken:${from}..${to}`);
  else if (from) where.push(`taken>=${from}`);
  else if (to) where.push(`taken<=${to}`);
  if (place) where.push(`place=${place}`);
  return where;
}

function showFacets(captures) {
  if (!captures || !(captures.dated || captures.located)) return;
  for (const p of captures.top_places || []) {
    $("place").append(el("option", { value: p.city }, `${p.city} (${p.country}) · ${p.images}`));
  }
  if (captures.taken_from) $("taken-from").min = $("taken-to").min = captures.taken_from.slice(0, 10);
  if (captures.taken_to) $("taken-from").max = $("taken-to").max = captures.taken_to.slice(0, 10);
  $("facets").hidden = false;
}

const SEARCH_MODES = ["auto", "dense", "keyword", "hybrid"];

async function searchText(ev) {
  if (ev) ev.preventDefault();
  const q = $("q").value.trim();
  if (!q) { setStatus($("search-status"), "Type something to search for, or drop an image.", true); return; }
  const mode = $("search-mode").value;
  const params = new URLSearchParams({ q, k: $("k").value, target: $("target").value, mode });
  for (const w of facetFilters()) params.append("where", w);
  // a shareable address: /?q=...&mode=... (target too when it is not the default)
  const shared = new URLSearchParams({ q, mode });
  if ($("target").value !== "images") shared.set("target", $("target").value);
  const url = `${location.pathname}?${shared}`;
  if (`${location.pathname}${location.search}` !== url) history.pushState({ q, mode }, "", url);
  await runSearch(() => api(`/api/search?${params}`), `“${q}”`);
}

// The query in the address (?q=...&mode=...&target=...): the form set from it, and searched.
function searchFromAddress() {
  const params = new URLSearchParams(location.search);
  const q = params.get("q");
  const mode = params.get("mode");
  const target = params.get("target");
  $("search-mode").value = SEARCH_MODES.includes(mode) ? mode : "auto";
  if (target && [...$("target").options].some((o) => o.value === target)) $("target").value = target;
  if (q) { $("q").value = q; searchText(); }
}

async function searchImage(file) {
  chosenFile = file;
  $("use-image").checked = true;
  const drop = $("drop");
  drop.querySelector("img")?.remove();
  const preview = el("img", { alt: "query image", src: URL.createObjectURL(file) });
  drop.prepend(preview);
  const form = new FormData();
  form.append("image", file);
  form.append("k", $("k").value);
  form.append("target", $("target").value);
  for (const w of facetFilters()) form.append("where", w);
  await runSearch(() => api("/api/search/image", { method: "POST", body: form }), file.name);
}

async function runSearch(call, label) {
  const status = $("search-status");
  $("search-btn").disabled = true;
  setStatus(status, `Searching for ${label}…`);
  try {
    const data = await call();
    renderResults(data);
    const how = data.mode_reason ? ` · ${data.mode_reason}` : data.mode ? ` · ${data.mode}` : "";
    setStatus(status, `${data.results.length} results for ${label} in ${(data.seconds * 1000).toFixed(0)} ms${how}`);
  } catch (e) {
    $("results").replaceChildren();
    setStatus(status, `Search failed: ${e.message}`, true);
  } finally {
    $("search-btn").disabled = false;
  }
}

// Server-sent events from a POST (EventSource only GETs): yields {event, data} as they arrive.
async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) yield { event, data: JSON.parse(data) };
    }
  }
}

async function ask(ev) {
  ev.preventDefault();
  const question = $("question").value.trim();
  const useImage = $("use-image").checked && chosenFile;
  const status = $("ask-status");
  if (!question && !useImage) { setStatus(status, "Type a question, or choose an image above.", true); return; }
  $("ask-btn").disabled = true;
  $("answer-panel").hidden = true;
  $("answer").textContent = "";  // the last answer must not stand in for this one
  setStatus(status, "Retrieving… (the first answer also loads the language model)");
  try {
    let resp;
    if (useImage) {
      const form = new FormData();
      form.append("image", chosenFile);
      if (question) form.append("question", question);
      form.append("mode", $("mode").value);
      form.append("stream", "true");
      resp = await fetch("/api/ask/image", { method: "POST", body: form });
    } else {
      resp = await fetch("/api/ask", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ question, mode: $("mode").value, search_mode: $("search-mode").value, stream: true }) });
    }
    if (!resp.ok) {
      let body = null;
      try { body = await resp.json(); } catch (e) { /* not JSON */ }
      throw new Error(body && body.error ? body.error.message : `${resp.status} ${resp.statusText}`);
    }
    let final = null;
    for await (const { event, data } of sseEvents(resp)) {
      if (event === "sources") {
        $("answer").textContent = "";
        $("answer").classList.add("pending");
        renderSources(data.sources, false);
        $("answer-panel").hidden = false;
        setStatus(status, data.abstained ? "Nothing relevant enough was found."
          : data.streaming ? `Generating (${data.mode})…`
          : `Scoring candidates (${data.mode}): the best answer appears once every candidate is scored…`);
      } else if (event === "token") {
        $("answer").textContent += data.text;
      } else if (event === "final") {
        final = data;
        renderAnswer(data);
      } else if (event === "error") {
        throw new Error(data.message);
      }
    }
    if (!final) throw new Error("the answer ended early");
    setStatus(status, `Answered in ${final.timings.total !== undefined ? final.timings.total.toFixed(2)
      : Object.values(final.timings).reduce((a, b) => a + b, 0).toFixed(2)} s (${final.mode})`);
  } catch (e) {
    setStatus(status, `Could not answer: ${e.message}`, true);
  } finally {
    $("answer").classList.remove("pending");
    $("ask-btn").disabled = false;
  }
}

function renderAnswer(data) {
  $("answer").textContent = data.answer || "(the model gave an empty answer)";
  renderSources(data.sources, true);
  $("answer-panel").hidden = false;
}

// Sources with their retrieval prior; once the answer is complete, the posterior weight too.
function renderSources(sources, complete) {
  const list = $("sources");
  list.replaceChildren();
  for (const s of sources) {
    const li = el("li", { "data-id": String(s.id) });
    if (s.thumbnail_url) li.append(el("img", { src: s.thumbnail_url, alt: s.caption || `item ${s.id}` }));
    const body = el("div");
    const weight = complete ? s.posterior : s.prior;
    const bar = el("span", { class: complete ? "bar" : "bar prior", "aria-hidden": "true" });
    bar.style.width = `${Math.max(2, weight * 120)}px`; // CSSOM: allowed by the CSP, a style attribute is not
    const label = complete
      ? ` weight ${(s.posterior * 100).toFixed(1)}% (prior ${(s.prior * 100).toFixed(1)}%, score ${s.score.toFixed(3)})`
      : ` prior ${(s.prior * 100).toFixed(1)}% (score ${s.score.toFixed(3)}; answering…)`;
    body.append(bar, document.createTextNode(label));
    body.append(el("div", { class: "muted" }, s.text));
    li.append(body);
    list.append(li);
  }
}

function setupDrop() {
  const drop = $("drop"), file = $("file");
  drop.addEventListener("click", () => file.click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); } });
  file.addEventListener("change", () => { if (file.files[0]) searchImage(file.files[0]); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    if (e.dataTransfer.files[0]) searchImage(e.dataTransfer.files[0]);
  });
}

async function loadStats() {
  try {
    const [stats, health] = await Promise.all([api("/api/stats"), api("/api/health")]);
    const c = stats.counts;
    setStatus($("stats"), `${c.images} images · ${c.captions} captions · ${c.passages} passages · encoder ${stats.encoder} · generator ${health.generator} (${health.generator_status})`);
    showFacets(stats.captures);
  } catch (e) {
    setStatus($("stats"), `Cannot reach the server: ${e.message}`, true);
  }
}

$("search-form").addEventListener("submit", searchText);
$("ask-form").addEventListener("submit", ask);
window.addEventListener("popstate", searchFromAddress);
setupDrop();
loadStats();
searchFromAddress();
