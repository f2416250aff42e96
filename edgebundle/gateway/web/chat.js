// The web chat of an edgebundle gateway: one synced thread at a time (shared/API.md).
//
// The page keeps a local copy of the thread by the rules of edgebundle/sync/replica.py:
// a full sync object replaces everything, otherwise the copy with the higher version
// wins; message.delta text is keyed by (message_id, seq) so a replayed delta is never
// shown twice, and streamed text shows only while the stored message is in_progress.
// It learns of changes by watching the thread (an SSE stream of sync diffs) and follows
// the active run's events, whichever device generates it; after a reload it replays
// them from the start. fetch() reads the streams (EventSource cannot send the API key).
// A turn is named by its input id: a POST whose answer was lost is sent again with the
// same id, and the gateway answers with the run it already started, never a second one.
// A device with a local store keeps chatting while its central Redis is away: the page
// then shows "offline, N pending" (asked of /healthz), and the thread comes under another
// epoch each time the device switches stores (a full sync replaces the copy).
"use strict";

const KEY_STORE = "edgebundle.apiKey";
const THREADS_STORE = "edgebundle.threads";
const RETRY_MS = 1000;
const SEND_TRIES = 8; // then the message stays in the box, and Send tries the same turn
const SEND_BACKOFF_MS = [500, 4000]; // the first wait between tries and the longest
const RETRY_STATUSES = new Set([502, 503, 504]); // a gateway or its Redis restarting
const RUN_RANK = { queued: 0, in_progress: 1 }; // any other status: ended (2)
const LINK_POLL_MS = 3000; // how often a visible page asks /healthz about the device's link

const $ = (id) => document.getElementById(id);
let current = null; // the open thread (see newThreadState)

// -- HTTP and SSE ---------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body, signal) {
  const headers = {};
  const key = localStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.ok) return response;
  let detail = {};
  try { detail = await response.json(); } catch { /* not JSON: the status says enough */ }
  // Sync errors are {"error": code, "message"}; OpenAI-shaped ones nest them.
  const nested = typeof detail.error === "object" && detail.error !== null;
  const code = nested ? detail.error.code : detail.error;
  const message = (nested ? detail.error.message : detail.message) || `HTTP ${response.status}`;
  if (response.status === 401) showKeyForm(message);
  throw new HttpError(response.status, code, message);
}

// The events of an SSE response: {id, type, data} with data parsed as JSON.
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { id: null, type: "message", data: [] };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const lines = buffer.split("\n");
      buffer = lines.pop(); // an unfinished line waits for the next chunk
      for (const raw of lines) {
        const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
        if (line === "") {
          if (event.data.length) {
            yield { id: event.id, type: event.type, data: JSON.parse(event.data.join("\n")) };
          }
          event = { id: null, type: "message", data: [] };
          continue;
        }
        if (line.startsWith(":")) continue; // a keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") event.data.push(value);
        else if (field === "event") event.type = value;
        else if (field === "id") event.id = value;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done);
  });
}

function randomId(prefix) {
  // crypto.randomUUID needs a secure context; a device on the LAN is plain http.
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// -- the local copy of the thread -----------------------------------------------------

class EpochChanged extends Error {}
class StreamEnded extends Error {} // a run's stream closed before its "done"

function newThreadState(id) {
  return {
    id,
    path: `/v1/threads/${encodeURIComponent(id)}`,
    epoch: null,
    version: 0,
    messages: new Map(), // id -> message as stored
    streamed: new Map(), // message id -> {seq, text}: deltas applied so far
    frozen: new Map(), // message id -> text shown when Stop was pressed
    runs: new Map(), // id -> run, latest known state
    activeRunId: null,
    following: new Set(), // run ids whose events a stream of this page reads
    ownInputs: new Set(), // input ids of runs this page started (their POST streams follow)
    cursors: new Map(), // run id -> last event id seen
    lookups: new Set(), // run ids asked for (to show the device of old replies)
    rendered: new Map(), // message id -> the text on the screen now
    // The typed message until the gateway has it, {text, inputId, sending}: sent again,
    // it keeps its input id, so a turn that did land is not started a second time.
    unsent: null,
    abort: new AbortController(),
  };
}

const rank = (run) => RUN_RANK[run.status] ?? 2;

function mergeMessage(t, message) {
  const known = t.messages.get(message.id);
  if (!known || message.version > known.version) t.messages.set(message.id, message);
  if (t.messages.get(message.id).status !== "in_progress") {
    t.streamed.delete(message.id);
    t.frozen.delete(message.id);
  }
}

function mergeRun(t, run) {
  const known = t.runs.get(run.id);
  if (!known || rank(run) >= rank(known)) t.runs.set(run.id, run);
  return t.runs.get(run.id);
}

function applySync(t, state) {
  if (state.full) {
    if (state.epoch !== t.epoch) { // another history: its streamed text means nothing here
      t.streamed.clear();
      t.runs.clear();
      t.cursors.clear();
      // Ask again who wrote each reply: a device that switched between the central and
      // its local store answers for runs the other store had (and refused meanwhile).
      t.lookups.clear();
    }
    t.messages = new Map();
    for (const message of state.messages) mergeMessage(t, message);
    t.epoch = state.epoch;
    t.version = state.version;
  } else {
    if (state.epoch !== t.epoch) throw new EpochChanged(`thread ${t.id} was reset`);
    for (const message of state.messages) mergeMessage(t, message);
    t.version = Math.max(t.version, state.version); // a late answer must not move it back
  }
  for (const run of [state.active_run, ...state.queued_runs]) if (run) mergeRun(t, run);
  const active = state.active_run && t.runs.get(state.active_run.id);
  t.activeRunId = active && rank(active) < 2 ? active.id : null; // queued: about to start
}

function applyDelta(t, { message_id: id, seq, text }) {
  const stored = t.messages.get(id);
  if (stored && stored.status !== "in_progress") return; // the final copy is here
  if (t.frozen.has(id)) return; // stopped: keep showing what the user saw
  const so_far = t.streamed.get(id) ?? { seq: 0, text: "" };
  if (seq <= so_far.seq) return; // replayed
  t.streamed.set(id, { seq, text: so_far.text + text });
}

// Apply one event (of a run, or a sync); true when it is the run's last ("done").
function applyEvent(t, type, data) {
  if (type === "sync") applySync(t, data);
  else if (type === "message.created" || type === "message.completed") {
    mergeMessage(t, data.message);
  } else if (type === "message.delta") applyDelta(t, data);
  else if (type.startsWith("run.")) {
    const run = mergeRun(t, data.run);
    if (rank(run) === 1) t.activeRunId = run.id; // queued ones wait: the active one stays
    else if (rank(run) === 2 && t.activeRunId === run.id) t.activeRunId = null;
    if (type === "run.failed") setStatus(`The reply failed: ${data.error || "unknown error"}`);
  } else if (type === "error") setStatus(`Sync error: ${data.message}`);
  scheduleRender();
  return type === "done";
}

function shownText(t, message) {
  if (message.status !== "in_progress") return message.content;
  if (t.frozen.has(message.id)) return t.frozen.get(message.id);
  const streamed = t.streamed.get(message.id);
  if (!streamed) return message.content;
  // The stored copy may hold text saved so far; the stream starts from the beginning.
  return streamed.text.length >= message.content.length ? streamed.text : message.content;
}

// -- following the thread and its runs ------------------------------------------------

// Read a run's SSE stream into the thread; the run id and whether "done" came.
async function consume(t, response, runId) {
  for await (const event of sseEvents(response)) {
    if (!runId && event.data && event.data.run) {
      runId = event.data.run.id;
      t.following.add(runId);
    }
    if (runId && event.id) t.cursors.set(runId, event.id);
    if (applyEvent(t, event.type, event.data)) return { runId, done: true };
  }
  return { runId, done: false };
}

function ensureFollowing(t) {
  const run = t.activeRunId && t.runs.get(t.activeRunId);
  if (!run || t.following.has(run.id) || t.ownInputs.has(run.input_message_id)) return;
  followRun(t, run.id);
}

async function followRun(t, runId) {
  t.following.add(runId);
  try {
    while (!t.abort.signal.aborted) {
      const after = t.cursors.get(runId);
      const query = after ? `?after=${encodeURIComponent(after)}` : "";
      try {
        const path = `${t.path}/runs/${encodeURIComponent(runId)}/events${query}`;
        const response = await api("GET", path, undefined, t.abort.signal);
        if ((await consume(t, response, runId)).done) return;
      } catch (error) {
        if (t.abort.signal.aborted || error.status === 401 || error.status === 404) return;
        setStatus(`Lost the reply's stream (${error.message}); retrying…`);
      }
      await sleep(RETRY_MS, t.abort.signal);
    }
  } finally {
    t.following.delete(runId);
  }
}

async function watchThread(t) {
  while (!t.abort.signal.aborted) {
    try {
      const query = new URLSearchParams({ since: String(t.version) });
      if (t.epoch) query.set("epoch", t.epoch);
      const response = await api("GET", `${t.path}/watch?${query}`, undefined, t.abort.signal);
      setStatus("");
      for await (const event of sseEvents(response)) {
        applyEvent(t, event.type, event.data);
        ensureFollowing(t);
      }
    } catch (error) {
      if (t.abort.signal.aborted) return;
      if (error instanceof EpochChanged) { // ask for everything again
        t.epoch = null;
        t.version = 0;
        continue;
      }
      if (error.status === 401) return; // the key form is shown; saving it reopens
      if (error.status === 404) {
        setStatus(`Thread ${t.id} is gone (it expired): start a new one or join it again.`);
        return;
      }
      setStatus(`Lost the connection to the gateway (${error.message}); retrying…`);
    }
    await sleep(RETRY_MS, t.abort.signal);
  }
}

async function openThread(id) {
  if (current) current.abort.abort();
  const t = newThreadState(id);
  current = t;
  scheduleRender();
  try {
    // Joins the thread, or starts it under this id (an id is a shared session name).
    const response = await api("POST", "/v1/threads", { id }, t.abort.signal);
    applySync(t, await response.json());
    rememberThread(id);
    scheduleRender();
    ensureFollowing(t);
  } catch (error) {
    if (!t.abort.signal.aborted) setStatus(`Cannot open thread ${id}: ${error.message}`);
    return;
  }
  watchThread(t);
}

// -- actions ----------------------------------------------------------------------------

// An error after which the POST of a turn may be sent again (with the same input id):
// the network (fetch throws a TypeError), a stream cut short, a gateway restarting.
function worthRetrying(error) {
  return error instanceof TypeError || error instanceof StreamEnded ||
    RETRY_STATUSES.has(error.status);
}

function sendBackoff(attempt) {
  const [first, longest] = SEND_BACKOFF_MS;
  return Math.min(longest, first * 2 ** (attempt - 1)) * (0.5 + Math.random() / 2);
}

const runOfInput = (t, inputId) =>
  [...t.runs.values()].find((run) => run.input_message_id === inputId);

async function send(text) {
  const t = current;
  if (t.unsent && t.unsent.sending) return; // one typed message is one turn
  const inputId = t.unsent && t.unsent.text === text ? t.unsent.inputId : randomId("msg-");
  const unsent = t.unsent = { text, inputId, sending: true };
  scheduleRender(); // the box is read-only until the turn lands
  const body = { input: { id: inputId, content: text }, stream: true };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.params = { max_tokens: maxTokens };
  t.ownInputs.add(inputId);
  let retrying = false;
  const landed = () => { // the gateway has the turn: the box is free for the next one
    if (t.unsent === unsent) {
      t.unsent = null;
      $("input").value = "";
    }
    if (retrying) setStatus("");
    retrying = false;
  };
  try {
    for (let attempt = 1; ; attempt++) {
      body.epoch = t.epoch; // the opening sync brings what this page does not have yet
      body.since = t.version;
      try {
        const response = await api("POST", `${t.path}/runs`, body, t.abort.signal);
        landed();
        if ((await consume(t, response, null)).done) return;
        throw new StreamEnded("the reply's stream ended early");
      } catch (error) {
        if (t.abort.signal.aborted) return;
        if (runOfInput(t, inputId)) { // it landed: ensureFollowing (below) reads the rest
          landed();
          return;
        }
        if (error.code === "epoch_mismatch" && attempt < SEND_TRIES) {
          // The gateway has the thread under another epoch (its device switched between
          // the central and its local store, or the thread was re-seeded): take the
          // whole thread, then send the same turn again (its input id: it runs once).
          await syncInFull(t);
          continue;
        }
        if (!worthRetrying(error) || attempt >= SEND_TRIES) throw error;
        retrying = true;
        setStatus("Connection lost; retrying…");
        await sleep(sendBackoff(attempt), t.abort.signal);
        if (t.abort.signal.aborted) return;
      }
    }
  } catch (error) {
    if (error instanceof EpochChanged || error.code === "epoch_mismatch") {
      setStatus("The thread was reset elsewhere: here it is again; send your message again.");
      openThread(t.id);
      return;
    }
    setStatus(t.unsent === unsent
      ? `Not sent: ${error.message} (press Send to try again)`
      : `Lost the reply's stream (${error.message}); it shows here when it lands.`);
  } finally {
    unsent.sending = false;
    scheduleRender();
    t.ownInputs.delete(inputId);
    const run = runOfInput(t, inputId);
    if (run) t.following.delete(run.id);
    ensureFollowing(t); // the stream broke before the end: follow the run's events
  }
}

// The thread as the gateway has it now (no epoch asked: a full sync), in place of ours.
async function syncInFull(t) {
  try {
    const response = await api("GET", t.path, undefined, t.abort.signal);
    applySync(t, await response.json());
    scheduleRender();
  } catch (error) {
    // Left the thread, or a gateway restarting (the turn's next try meets it again).
    if (t.abort.signal.aborted || worthRetrying(error)) return;
    throw error;
  }
}

async function stop() {
  const t = current;
  const run = t && t.activeRunId && t.runs.get(t.activeRunId);
  if (!run) return;
  const body = {};
  if (run.message_id) { // the reply keeps exactly what is on the screen (nothing yet: "")
    body.content_seen = t.rendered.get(run.message_id) ?? "";
    t.frozen.set(run.message_id, body.content_seen);
  }
  try {
    const path = `${t.path}/runs/${encodeURIComponent(run.id)}/cancel`;
    const response = await api("POST", path, body, t.abort.signal);
    mergeRun(t, await response.json());
  } catch (error) {
    t.frozen.delete(run.message_id); // it goes on: keep showing it
    if (!t.abort.signal.aborted) setStatus(`Could not stop the reply: ${error.message}`);
  }
  scheduleRender();
}

async function newThread() {
  try {
    const response = await api("POST", "/v1/threads", {});
    location.hash = `thread=${encodeURIComponent((await response.json()).id)}`;
  } catch (error) {
    setStatus(`Cannot start a thread: ${error.message}`);
  }
}

// -- the device's link to the central store ----------------------------------------------

// /healthz of a device with a local store carries "sync": {link, pending, …}; without
// it (no central Redis, or an older gateway) there is nothing to say.
function linkState(health) {
  const sync = health && typeof health.sync === "object" ? health.sync : null;
  const pending = sync ? Number(sync.pending) || 0 : 0;
  if (sync && sync.link === "offline") {
    return { kind: "offline", text: `offline, ${pending} pending`,
             hint: "This device cannot reach the central store: it answers from its own " +
                   "copy of the thread and sends what changed once the link is back." };
  }
  if (pending > 0) {
    return { kind: "sending", text: `sending ${pending} change${pending === 1 ? "" : "s"}…`,
             hint: "The link is back: this device is sending what changed while it was offline." };
  }
  return null;
}

function showLink(state) {
  const badge = $("link-state");
  badge.hidden = !state;
  badge.textContent = state ? state.text : "";
  badge.title = state ? state.hint : "";
  badge.dataset.link = state ? state.kind : "";
}

let linkTimer = 0;
let linkAsking = false;

// Ask /healthz (open without a key) now and every LINK_POLL_MS while the page is seen.
async function checkLink() {
  clearTimeout(linkTimer);
  linkTimer = 0;
  if (linkAsking || document.visibilityState !== "visible") return; // the next ask comes
  linkAsking = true;
  try {
    const response = await fetch("/healthz", { cache: "no-store" });
    showLink(linkState(await response.json()));
  } catch {
    // The gateway itself is away: the status line says so; the badge keeps its last word.
  } finally {
    linkAsking = false;
  }
  if (document.visibilityState === "visible") linkTimer = setTimeout(checkLink, LINK_POLL_MS);
}

// -- what the page shows ----------------------------------------------------------------

function setStatus(text) {
  $("status").textContent = text;
}

function knownThreads() {
  try {
    const ids = JSON.parse(localStorage.getItem(THREADS_STORE) || "[]");
    return Array.isArray(ids) ? ids.filter((id) => typeof id === "string") : [];
  } catch {
    return [];
  }
}

function rememberThread(id) {
  const ids = [id, ...knownThreads().filter((known) => known !== id)].slice(0, 50);
  localStorage.setItem(THREADS_STORE, JSON.stringify(ids));
  showThreads(id);
}

function showThreads(selected) {
  const options = knownThreads().map((id) => new Option(id, id, false, id === selected));
  if (!selected) options.unshift(new Option("(choose a thread)", "", true, true));
  $("thread-select").replaceChildren(...options);
  $("share-link").href = selected ? `#thread=${encodeURIComponent(selected)}` : "#";
}

function deviceOf(t, message) {
  if (!message.run_id) return null;
  const run = t.runs.get(message.run_id);
  if (run) return run.device_id;
  if (!t.lookups.has(message.run_id)) { // a reply from before this page opened
    t.lookups.add(message.run_id);
    api("GET", `${t.path}/runs/${encodeURIComponent(message.run_id)}`, undefined, t.abort.signal)
      .then((response) => response.json())
      .then((found) => { mergeRun(t, found); scheduleRender(); })
      .catch(() => {}); // only a label: the reply itself is shown anyway
  }
  return null;
}

const ROLE_NAMES = { user: "You", assistant: "Assistant", system: "System" };
const STATUS_NAMES = { in_progress: "writing…", incomplete: "stopped", completed: "" };

// Paint at most once a frame: a replay after a reload applies hundreds of events at once.
let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    render();
  });
}

function render() {
  const t = current;
  const list = $("messages");
  if (!t) {
    list.replaceChildren();
    $("activity").textContent = "";
    return;
  }
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const visible = [...t.messages.values()].filter((m) => !m.deleted)
    .sort((a, b) => a.position - b.position || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  const items = new Map([...list.children].map((li) => [li.dataset.messageId, li]));
  const ordered = visible.map((message) => {
    const li = items.get(message.id) ?? messageItem(message.id);
    const device = deviceOf(t, message);
    li.className = `message ${message.role}`;
    li.dataset.status = message.status;
    li.querySelector(".role").textContent = ROLE_NAMES[message.role] ?? message.role;
    li.querySelector(".device").textContent = device ? `from ${device}` : "";
    li.querySelector(".state").textContent = STATUS_NAMES[message.status] ?? message.status;
    showText(t, li.querySelector(".content"), message.id, shownText(t, message));
    return li;
  });
  if (ordered.length !== list.children.length || ordered.some((li, i) => list.children[i] !== li)) {
    list.replaceChildren(...ordered);
  }
  if (nearBottom) list.scrollTop = list.scrollHeight;

  const active = t.activeRunId && t.runs.get(t.activeRunId);
  $("stop").disabled = !active;
  const sending = Boolean(t.unsent && t.unsent.sending);
  $("input").readOnly = sending;
  $("send").disabled = sending;
  $("activity").textContent = active ? `${active.device_id} is replying…` : "";
}

function showText(t, content, id, text) {
  const before = t.rendered.get(id);
  if (before === text) return;
  // Streaming only adds text: append the new part instead of laying out all of it again.
  if (before !== undefined && text.startsWith(before)) content.append(text.slice(before.length));
  else content.textContent = text;
  t.rendered.set(id, text);
}

function messageItem(id) {
  const li = document.createElement("li");
  li.dataset.messageId = id;
  const meta = document.createElement("div");
  meta.className = "meta";
  for (const part of ["role", "device", "state"]) {
    const span = document.createElement("span");
    span.className = part;
    meta.append(span);
  }
  const content = document.createElement("div");
  content.className = "content";
  li.append(meta, content);
  return li;
}

function showKeyForm(reason) {
  $("key-reason").textContent = `${reason} Enter the gateway's API key.`;
  $("key-form").hidden = false;
  $("key-input").focus();
}

// -- wiring -------------------------------------------------------------------------------

function threadFromHash() {
  const match = /^#thread=(.+)$/.exec(location.hash);
  return match ? decodeURIComponent(match[1]) : null;
}

function openFromHash() {
  const id = threadFromHash();
  if (id && (!current || current.id !== id)) openThread(id);
}

function start() {
  const maxTokens = new URLSearchParams(location.search).get("max_tokens");
  if (maxTokens) $("max-tokens").value = maxTokens;

  window.addEventListener("hashchange", openFromHash);
  $("thread-select").addEventListener("change", (event) => {
    if (event.target.value) location.hash = `thread=${encodeURIComponent(event.target.value)}`;
  });
  $("new-thread").addEventListener("click", newThread);
  $("join-form").addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = `thread=${encodeURIComponent($("join-id").value.trim())}`;
    $("join-id").value = "";
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value;
    if (!current) setStatus("Open a thread first: start a new one, or join one by its id.");
    else if (text.trim()) send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(KEY_STORE, $("key-input").value);
    $("key-input").value = "";
    $("key-form").hidden = true;
    const id = current ? current.id : threadFromHash();
    if (id) openThread(id); // again, now with the key
  });
  $("forget-key").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORE);
    $("key-input").value = "";
  });

  document.addEventListener("visibilitychange", checkLink);
  checkLink();

  showThreads(threadFromHash());
  const [last] = knownThreads();
  if (threadFromHash()) openFromHash();
  else if (last) location.hash = `thread=${encodeURIComponent(last)}`;
  else setStatus("Start a new thread, or join one by its id.");
}

start();
