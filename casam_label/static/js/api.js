// The native JSON API of casam-label (docs/INTERACTIVE.md), and its one error shape.
// Every failure becomes an ApiError whose message is one readable line for the page.

export class ApiError extends Error {
  constructor(message, status = 0) { super(message); this.status = status; }
}

// A server started with --api-key wants it on every API call; the page asks for it once
// (after a 401) and keeps it for the browser tab only.
let KEY = sessionStorage.getItem("casam-api-key") || "";
export function setKey(key) { KEY = key; sessionStorage.setItem("casam-api-key", key); }

const TIMING = { last: null };
export function lastRoundTrip() { return TIMING.last; }

function oneLine(text) {
  return String(text).replace(/\s+/g, " ").trim().slice(0, 400);
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) message = body.error;
  } catch (_) { /* not JSON: keep the status line */ }
  return new ApiError(oneLine(message), response.status);
}

// fetch with the error shape applied; network failures are one line too.
async function call(path, init = {}) {
  let response;
  try {
    const headers = KEY ? { ...(init.headers || {}), Authorization: `Bearer ${KEY}` } : init.headers;
    response = await fetch(path, { ...init, headers });
  } catch (exc) {
    throw new ApiError(oneLine(`cannot reach the server (${exc.message})`));
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function json(path, init) {
  return (await call(path, init)).json();
}

const JSON_HEADERS = { "Content-Type": "application/json" };

export const api = {
  info: () => json("api/info"),
  datastore: () => json("api/datastore"),

  openFiles(files, axis) {
    const form = new FormData();
    for (const f of files) form.append("file", f, f.webkitRelativePath || f.name);
    form.append("axis", String(axis));
    return json("api/sessions", { method: "POST", body: form });
  },
  openDatastore(id, axis) {
    return json("api/sessions", { method: "POST", headers: JSON_HEADERS,
      body: JSON.stringify({ datastore_id: id, axis: Number(axis) }) });
  },
  describe: (sid) => json(`api/sessions/${sid}`),
  close: (sid) => call(`api/sessions/${sid}`, { method: "DELETE" }),

  // One slice as a decoded bitmap; the window is the session's own unless given.
  async view(sid, axis, slice, win) {
    const q = new URLSearchParams({ slice: String(slice) });
    if (axis !== null && axis !== undefined) q.set("axis", String(axis));
    if (win) { q.set("center", String(win.center)); q.set("width", String(win.width)); }
    const response = await call(`api/sessions/${sid}/view?${q}`);
    return createImageBitmap(await response.blob());
  },
  async labelsView(sid, axis, slice) {
    const q = new URLSearchParams({ slice: String(slice) });
    if (axis !== null && axis !== undefined) q.set("axis", String(axis));
    const response = await call(`api/sessions/${sid}/labels/view?${q}`);
    return createImageBitmap(await response.blob(), { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  },

  // One interaction; the round trip (request sent → reply parsed) is kept and marked.
  async interact(sid, body) {
    performance.mark("request");
    const t0 = performance.now();
    const reply = await json(`api/sessions/${sid}/interact`,
      { method: "POST", headers: JSON_HEADERS, body: JSON.stringify(body) });
    TIMING.last = performance.now() - t0;
    performance.mark("reply");
    performance.measure("roundtrip", "request", "reply");
    return reply;
  },

  // Propagation with NDJSON progress: onProgress({slice, done}) per line, the reply at the end.
  async propagate(sid, body, onProgress) {
    const response = await call(`api/sessions/${sid}/propagate`, { method: "POST",
      headers: { ...JSON_HEADERS, Accept: "application/x-ndjson" }, body: JSON.stringify(body) });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "", result = null;
    const handle = (line) => {
      if (!line.trim()) return;
      const msg = JSON.parse(line);
      if (msg.error) throw new ApiError(oneLine(msg.error));
      if (msg.progress) onProgress(msg.progress);
      if (msg.result) result = msg.result;
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffered.indexOf("\n")) >= 0) {
        handle(buffered.slice(0, cut));
        buffered = buffered.slice(cut + 1);
      }
    }
    handle(buffered);
    if (!result) throw new ApiError("propagation ended without a result");
    return result;
  },

  // The label map as the server writes it: a Blob of exactly the API's bytes, and its name.
  async result(sid, format) {
    const response = await call(`api/sessions/${sid}/result?format=${encodeURIComponent(format)}`);
    const disposition = response.headers.get("Content-Disposition") || "";
    const m = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(disposition);
    return { blob: await response.blob(), name: m ? decodeURIComponent(m[1]) : null };
  },
};
