// miaotui chat page: plain JS, no build step. Talks to /v1/chat/completions with SSE streaming.
// The conversation lives in this page only; Stop aborts the fetch, which the server sees as a
// disconnect and answers by aborting the request (its KV blocks are freed at once).
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), statusLine = $("status");
const messages = [];            // {role, content} of the conversation so far
let controller = null;          // AbortController of the reply being streamed

const apiKeyInput = $("api-key");
apiKeyInput.value = localStorage.getItem("miaotui-api-key") || "";
apiKeyInput.addEventListener("change", () => {
  localStorage.setItem("miaotui-api-key", apiKeyInput.value);
  loadModel();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKeyInput.value) h["Authorization"] = "Bearer " + apiKeyInput.value;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.dataset.role = role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.appendChild(body);
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  input.disabled = false;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || resp.statusText;
  } catch (e) {
    return resp.status + " " + resp.statusText;
  }
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (resp.status === 401) {
      $("model").textContent = "this server needs an API key (Settings)";
      $("settings").hidden = false;
      $("settings-toggle").setAttribute("aria-expanded", "true");
      apiKeyInput.focus();
      return;
    }
    if (!resp.ok) { $("model").textContent = await errorText(resp); setTimeout(loadModel, 2000); return; }
    const body = await resp.json();
    const m = body.data[0];
    $("model").textContent = m.id + " · context " + m.max_model_len + " tokens";
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

// The fold above a reply's answer that holds its thinking (delta.reasoning_content, from servers
// that split <think> ... </think> out of the reply), made when the first thinking arrives. Folded
// by default; its summary says whether the model is still thinking.
function thinkingFold(bubble) {
  let fold = bubble.querySelector("details.thinking");
  if (!fold) {
    fold = document.createElement("details");
    fold.className = "thinking";
    const summary = document.createElement("summary");
    summary.textContent = "Thinking…";
    const text = document.createElement("div");
    text.className = "reasoning";
    fold.append(summary, text);
    bubble.insertBefore(fold, bubble.querySelector(".content"));
  }
  return fold;
}

// Yields the JSON payload of each `data:` event of an SSE body.
async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  messages.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  const content = bubble.querySelector(".content");
  const system = $("system").value.trim();
  const body = {
    messages: (system ? [{ role: "system", content: system }] : []).concat(messages),
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  controller = new AbortController();
  setBusy(true);
  statusLine.textContent = "thinking…";
  const start = performance.now();
  let first = null, reply = "", thought = "", usage = null, stopped = false;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const chunk of sseEvents(resp)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = (choice.delta && choice.delta.content) || "";
        const thinking = (choice.delta && choice.delta.reasoning_content) || "";
        if ((delta || thinking) && first === null) first = performance.now();
        if (thinking) {
          thought += thinking;
          thinkingFold(bubble).querySelector(".reasoning").textContent = thought;
        }
        if (delta) {
          reply += delta;
          content.textContent = reply;
          if (thought) thinkingFold(bubble).querySelector("summary").textContent = "Thought";
        }
        if (delta || thinking) log.scrollTop = log.scrollHeight;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      stopped = true;
    } else {
      bubble.remove();
      messages.pop();
      addMessage("error", "Error: " + e.message);
      statusLine.textContent = "";
      controller = null;
      setBusy(false);
      return;
    }
  }
  const end = performance.now();
  messages.push({ role: "assistant", content: reply });  // the answer only: templates drop past thinking
  if (thought) thinkingFold(bubble).querySelector("summary").textContent = "Thought";
  const meta = document.createElement("span");
  meta.className = "meta";
  const tokens = usage ? usage.completion_tokens : null;
  const secs = first === null ? 0 : (end - first) / 1000;
  const parts = [];
  if (stopped) parts.push("stopped");
  if (tokens !== null && secs > 0) parts.push(tokens + " tokens · " + (tokens / secs).toFixed(1) + " tokens/s");
  if (first !== null) parts.push("first token " + ((first - start) / 1000).toFixed(2) + " s");
  meta.textContent = parts.join(" · ");
  bubble.appendChild(meta);
  bubble.dataset.done = stopped ? "stopped" : "complete";
  statusLine.textContent = "";
  controller = null;
  setBusy(false);
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  messages.length = 0;
  log.replaceChildren();
});
$("settings-toggle").addEventListener("click", () => {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
});

loadModel();
