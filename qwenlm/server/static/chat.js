// The web chat: multi-turn history kept in the page, replies streamed from /v1/chat/completions (SSE).
"use strict";

const $ = function (id) { return document.getElementById(id); };
const turns = []; // [{role, content}] of finished turns; a failed turn is never added
let controller = null; // AbortController of the reply being streamed
let modelName = null;
let chatEpoch = 0; // bumped by New chat, so a reply stopped by it is not added to the new chat
let apiKey = localStorage.getItem("qwenlm.api_key") || ""; // only a key the server accepted is kept
let pendingText = null; // a message refused for want of a key, sent again once a key works

const SETTINGS = ["system", "temperature", "top_p", "top_k", "repetition_penalty", "max_tokens"];

function loadSettings() {
  SETTINGS.forEach(function (id) {
    const v = localStorage.getItem("qwenlm." + id);
    if (v !== null) $(id).value = v;
  });
  $("api_key").value = apiKey;
}
function saveSettings() {
  SETTINGS.forEach(function (id) { localStorage.setItem("qwenlm." + id, $(id).value); });
}

function headers(key) {
  const h = {"Content-Type": "application/json"};
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(msg) {
  $("error").textContent = msg;
  $("error").hidden = !msg;
}

// Follow a growing reply, unless the reader scrolled up to read something else.
function atBottom() {
  const doc = document.documentElement;
  return window.innerHeight + window.scrollY >= doc.scrollHeight - 40;
}
function scrollToEnd() { window.scrollTo(0, document.documentElement.scrollHeight); }

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.dataset.role = role;
  setContent(div, role, text);
  $("messages").appendChild(div);
  scrollToEnd();
  return div;
}

function setContent(div, role, text) {
  const follow = atBottom();
  if (role === "assistant") div.innerHTML = renderMarkdown(text);  // renderMarkdown escapes everything
  else div.textContent = text;
  if (follow) scrollToEnd();
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// ---- the API key ----
async function keyWorks(key) {
  const r = await fetch("/v1/models", {headers: headers(key)});
  return r.status !== 401;
}

function askForKey(message) {
  $("key-message").textContent = message;
  $("key-prompt").hidden = false;
  $("key-input").focus();
}

// Try a key; keep it only if the server accepts it, so a wrong one never replaces a working one.
async function useKey(key) {
  key = key.trim();
  if (!(await keyWorks(key))) {
    $("api_key").value = apiKey;
    if (apiKey && await keyWorks(apiKey)) showError("That key was refused; the previous key is kept.");
    else askForKey("That key was refused. The server needs an API key: enter it to continue.");
    return false;
  }
  apiKey = key;
  localStorage.setItem("qwenlm.api_key", key);
  $("api_key").value = key;
  $("key-prompt").hidden = true;
  $("key-input").value = "";
  showError("");
  await fetchModel();
  if (pendingText !== null && !controller) {
    const text = pendingText;
    pendingText = null;
    $("input").value = "";
    send(text);
  }
  return true;
}

async function fetchModel() {
  try {
    const r = await fetch("/v1/models", {headers: headers(apiKey)});
    const body = await r.json();
    if (r.ok) { modelName = body.data[0].id; $("model-name").textContent = modelName; }
    else if (r.status === 401) askForKey("This server needs an API key: enter it to continue.");
    else showError(body.error ? body.error.message : "could not list models");
  } catch (e) { showError(String(e)); }
}

function numberOf(id) {
  const v = parseFloat($(id).value);
  return Number.isFinite(v) ? v : undefined;
}

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function send(text) {
  showError("");
  const userDiv = addMessage("user", text);
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  turns.forEach(function (m) { messages.push(m); });
  messages.push({role: "user", content: text});

  const epoch = chatEpoch;
  const div = addMessage("assistant", "");
  div.classList.add("streaming");
  let reply = "";
  let failed = false;
  controller = new AbortController();
  setBusy(true);
  try {
    const body = {model: modelName || undefined, messages: messages, stream: true,
                  temperature: numberOf("temperature"), top_p: numberOf("top_p"),
                  top_k: Math.round(numberOf("top_k") || 0), repetition_penalty: numberOf("repetition_penalty"),
                  max_tokens: Math.round(numberOf("max_tokens") || 512)};
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(apiKey),
                                                   body: JSON.stringify(body), signal: controller.signal});
    if (!r.ok) {
      const err = await r.json().catch(function () { return {}; });
      throw new HttpError(r.status, err.error ? err.error.message : "HTTP " + r.status);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.replace(/^data: ?/, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices.length ? chunk.choices[0].delta : {};
        if (delta.content) { reply += delta.content; setContent(div, "assistant", reply); }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      failed = true;
      if (e.status === 401) { pendingText = text; askForKey("This server needs an API key: enter it to continue."); }
      else showError(String(e.message || e));
    }
  } finally {
    controller = null;
    div.classList.remove("streaming");
    div.dataset.done = "true";
    setBusy(false);
    if (failed) {  // the turn never happened: off the page and out of the history; the text back to retry
      userDiv.remove();
      div.remove();
      if (epoch === chatEpoch && !$("input").value) $("input").value = text;
    } else if (epoch === chatEpoch) {
      turns.push({role: "user", content: text});
      turns.push({role: "assistant", content: reply});
    }
  }
}

$("composer").addEventListener("submit", function (ev) {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  saveSettings();
  send(text);
});
$("input").addEventListener("keydown", function (ev) {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", function () { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", function () {
  chatEpoch++;
  if (controller) controller.abort();
  turns.length = 0;
  $("messages").innerHTML = "";
  showError("");
  $("input").focus();
});
$("toggle-settings").addEventListener("click", function () { $("settings").hidden = !$("settings").hidden; });
SETTINGS.forEach(function (id) { $(id).addEventListener("change", saveSettings); });
$("api_key").addEventListener("change", function () { useKey($("api_key").value); });
$("key-prompt").addEventListener("submit", function (ev) { ev.preventDefault(); useKey($("key-input").value); });

loadSettings();
fetchModel();
