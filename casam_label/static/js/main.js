// casam-label's viewer: wires the API, the slice view, the masks and the panels together.
// Test and bench hooks live on window.casamViewer (the view's transform, the last request,
// the latency of each prompt); performance marks "mouseup" and "painted" bracket a prompt.

import { api, ApiError, lastRoundTrip, setKey } from "./api.js";
import { SliceView } from "./view.js";
import { Masks, paintMasks, paintIndexMap } from "./overlay.js";
import { LabelList } from "./labels.js";
import { renderDecision } from "./panel.js";
import { attachPointer } from "./input.js";
import { attachOpeners, fillDatastore } from "./open.js";
import { PageSession, AXIS_NAMES } from "./session.js";
import { attachKeys } from "./keys.js";
import { WindowControl } from "./window.js";

const $ = (sel) => document.querySelector(sel);

class App {
  constructor() {
    this.view = new SliceView($("#view"), document.createElement("canvas"));
    this.view.mask.id = "mask-layer";
    this.masks = new Masks();
    this.labels = new LabelList($("#labels"), () => this.refreshOverlay());
    this.session = null;
    this.drag = null;
    this.busy = false;
    this.viewToken = 0;
    this.latencies = [];
    this.lastRequest = null;
    this.drawn = null;      // "axis:slice" once a slice and its overlay are on screen (tests wait on it)
    this.shown = 0;         // replies shown so far
    this.window = new WindowControl($("#window-preset"), () => this.loadSlice());
  }

  async start() {
    attachPointer(this.view, {
      box: (b) => this.prompt({ action: "box", box: b.map(Math.round) }),
      click: (p, positive) => this.prompt({ action: "click", point: p.map(Math.floor), positive }),
      dragBox: (b) => { this.drag = b; this.redraw(); },
      scroll: (d) => this.scroll(d),
      redraw: () => this.redraw(),
      windowStart: () => this.window.dragStart(),
      windowBy: (dx, dy) => this.window.dragBy(dx, dy),
      windowEnd: () => this.window.dragEnd(),
    });
    attachOpeners({ stage: $("#stage"), fileInput: $("#file-input"), folderInput: $("#folder-input"),
      datastore: $("#datastore") }, (f) => this.open(() => api.openFiles(f, $("#open-axis").value)),
      (id) => this.open(() => api.openDatastore(id, $("#open-axis").value)), (e) => this.fail(e));
    attachKeys(this);
    $("#undo").onclick = () => this.undo();
    $("#reset").onclick = () => this.reset();
    $("#propagate").onclick = () => this.propagate();
    $("#save").onclick = () => this.save();
    $("#view-axis").onchange = (e) => this.setViewAxis(Number(e.target.value));
    $("#slice-strip").onclick = (e) => this.stripClick(e);
    $("#add-label").onsubmit = (e) => { e.preventDefault(); this.addLabel($("#new-label").value.trim()); };
    $("#api-key").onchange = (e) => { setKey(e.target.value.trim()); this.clearError(); this.loadInfo(); };
    new ResizeObserver(() => this.redraw()).observe($("#stage"));
    await this.loadInfo();
  }

  async loadInfo() {
    try {
      this.info = await api.info();
      this.window.setPresets(this.info.window_presets);
      fillDatastore($("#datastore"), await api.datastore());
    } catch (exc) { this.fail(exc); }
  }

  // ----- errors and status -------------------------------------------------------------------
  fail(exc) {
    const line = exc instanceof ApiError ? exc.message : `error: ${exc && exc.message ? exc.message : exc}`;
    const box = $("#error");
    box.textContent = line.replace(/\s+/g, " ");
    box.hidden = false;
    if (exc instanceof ApiError && exc.status === 401) $("#api-key").hidden = false;
    if (!(exc instanceof ApiError)) console.error(exc);
  }
  clearError() { $("#error").hidden = true; $("#error").textContent = ""; }

  status() {
    const s = this.session;
    if (!s) { $("#status-line").textContent = ""; return; }
    const where = s.volume ? `${AXIS_NAMES[s.viewAxis]} slice ${s.current()} (0–${s.depth() - 1})` : "2-D image";
    const win = this.window.current;
    $("#status-line").textContent = `${where} · zoom ${(this.view.zoom * 100).toFixed(0)}%` +
      (win ? ` · W ${win.width.toFixed(0)} L ${win.center.toFixed(0)}` : "") +
      (s.volume && !s.onPromptAxis() ? ` · prompts on the ${AXIS_NAMES[s.axis]} axis` : "");
  }

  // ----- sessions -------------------------------------------------------------------------------
  async open(request) {
    if (this.busy) return;
    this.busy = true;
    this.clearError();
    $("#stage").classList.add("loading");
    try {
      const description = await request();
      if (this.session) api.close(this.session.id).catch(() => {});
      this.setSession(description);
      await this.loadSlice(true);
    } catch (exc) { this.fail(exc); } finally {
      this.busy = false;
      $("#stage").classList.remove("loading");
    }
  }

  setSession(description) {
    const s = this.session = new PageSession(description);
    this.masks.clear();
    this.labels.reset(description.labels);
    this.window.reset(s.volume);
    $("#drop-hint").hidden = true;
    const axes = $("#view-axis");
    axes.replaceChildren(...(s.volume ? [0, 1, 2] : []).map((a) => {
      const o = document.createElement("option");
      o.value = a; o.textContent = `${AXIS_NAMES[a]}${a === s.axis ? " (prompts)" : ""}`;
      return o;
    }));
    axes.value = s.axis; axes.disabled = !s.volume;
    const formats = $("#save-format");
    formats.replaceChildren(...s.formats().map((f) => { const o = document.createElement("option"); o.value = o.textContent = f; return o; }));
    for (const id of ["#undo", "#reset", "#save", "#save-format"]) $(id).disabled = false;
    $("#propagate").disabled = !s.volume;
    renderDecision($("#decision"), description.route, null);
    this.sessionInfo();
  }

  sessionInfo() {
    const s = this.session, rows = [["shape", s.d.shape.join(" × ")], ["slices", s.d.slices],
      ["axis", s.volume ? `${s.axis} (${AXIS_NAMES[s.axis]})` : "—"], ...(s.d.warnings || []).map((w) => ["warning", w])];
    $("#session-info").replaceChildren(...rows.flatMap(([k, v]) => {
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = k; dd.textContent = v;
      return [dt, dd];
    }));
  }

  setViewAxis(axis) {
    if (!this.session || !this.session.volume) return;
    this.session.viewAxis = axis;
    $("#view-axis").value = axis;
    this.loadSlice(true).catch((e) => this.fail(e));
  }

  scroll(delta) {
    if (this.session && this.session.go(delta)) this.loadSlice().catch((e) => this.fail(e));
  }

  // Fetch the shown slice (the latest request wins), then its overlay, then draw.
  async loadSlice(fit = false) {
    const s = this.session;
    if (!s) return;
    const token = ++this.viewToken, axis = s.viewAxis, k = s.current();
    this.drawn = null;
    const bitmap = await api.view(s.id, s.volume ? axis : null, k, this.window.current);
    if (token !== this.viewToken) return;
    this.view.setImage(bitmap, fit);
    await this.refreshOverlay(token);
  }

  async refreshOverlay(token = this.viewToken) {
    const s = this.session;
    if (!s || !this.view.image) return;
    if (s.onPromptAxis()) {
      paintMasks(this.view.mask, this.masks, this.labels.labels, s.current(), this.view.width, this.view.height);
    } else {
      const bitmap = await api.labelsView(s.id, s.viewAxis, s.current());
      if (token !== this.viewToken) return;
      paintIndexMap(this.view.mask, bitmap, this.labels.labels);
    }
    this.redraw();
    this.drawn = `${s.viewAxis}:${s.current()}`;
  }

  redraw() {
    const s = this.session, label = this.labels.active();
    const top = s && label && s.onPromptAxis() ? s.top(label.name, s.current()) : null;
    this.view.draw({ box: top && top.box, points: top ? top.points : [], drag: this.drag, colour: label && label.colour });
    this.status();
    this.strip();
  }

  // The slices where the active label has a mask, as ticks under the image.
  strip() {
    const canvas = $("#slice-strip"), s = this.session, label = this.labels.active();
    const box = canvas.getBoundingClientRect();
    canvas.width = Math.max(1, Math.round(box.width)); canvas.height = Math.max(1, Math.round(box.height));
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!s || !s.volume) return;
    const n = s.depth(), w = canvas.width / n;
    if (s.onPromptAxis() && label) {
      ctx.fillStyle = label.colour;
      for (const k of this.masks.slicesOf(label.name)) ctx.fillRect(k * w, 0, Math.max(1, w - 1), canvas.height);
    }
    ctx.strokeStyle = "#fff";
    ctx.strokeRect(s.current() * w + 0.5, 0.5, Math.max(1, w - 1), canvas.height - 1);
  }

  stripClick(e) {
    const s = this.session;
    if (!s || !s.volume) return;
    const box = e.currentTarget.getBoundingClientRect();
    s.goTo(Math.floor(((e.clientX - box.left) / box.width) * s.depth()));
    this.loadSlice().catch((exc) => this.fail(exc));
  }

  // ----- prompts --------------------------------------------------------------------------------
  needPromptAxis() {
    const s = this.session;
    if (!s) throw new Error("open an image first");
    if (!s.onPromptAxis()) throw new Error(`prompts go on the ${AXIS_NAMES[s.axis]} axis (the session's); switch the view back`);
    return s;
  }

  async prompt(body) {
    this.drag = null;
    const s = this.session, label = this.labels.active();
    try {
      this.needPromptAxis();
      const k = s.current();
      const request = { ...body, label: label.name, slice: k };
      this.lastRequest = request;
      this.clearError();
      const reply = await api.interact(s.id, request);
      if (body.action === "box") s.pushBox(label.name, k, request.box);
      else s.pushClick(label.name, k, { x: request.point[0], y: request.point[1], positive: request.positive });
      await this.show(reply);
    } catch (exc) { this.fail(exc); this.redraw(); }
  }

  // An interaction reply on screen: masks into the layer, then (next frame) the canvas; the
  // "painted" mark and the latency record follow the frame that shows the overlay.
  async show(reply, { roundtrip = lastRoundTrip(), record = true } = {}) {
    const s = this.session, [h, w] = s.sliceHW();
    this.masks.take(reply, h, w);
    if (this.labels.find(reply.label) && !this.labels.find(reply.label).index) {
      this.labels.setIndex(reply.label, Math.max(0, ...this.labels.labels.map((l) => l.index || 0)) + 1);
    }
    if (s.onPromptAxis()) paintMasks(this.view.mask, this.masks, this.labels.labels, s.current(), this.view.width, this.view.height);
    await new Promise((done) => requestAnimationFrame(() => {
      this.redraw();
      if (!record) return done();
      performance.mark("painted");
      const up = performance.getEntriesByName("mouseup").pop();
      const painted = performance.getEntriesByName("painted").pop();
      this.latencies.push({ roundtrip_ms: roundtrip, mouseup_to_painted_ms: up ? painted.startTime - up.startTime : null,
        server_ms: reply.timings_ms ? reply.timings_ms.server ?? reply.timings_ms.total : null });
      done();
    }));
    renderDecision($("#decision"), reply.route, { ...(reply.timings_ms || {}), "round trip": roundtrip });
    this.shown += 1;
    (reply.warnings || []).forEach((w) => this.fail(new ApiError(`warning: ${w}`)));
  }

  async undo() {
    const s = this.session, label = this.labels.active();
    try {
      this.needPromptAxis();
      this.clearError();
      const reply = await api.interact(s.id, { action: "undo", label: label.name, slice: s.current() });
      s.pop(label.name, s.current());
      await this.show(reply, { record: false });
    } catch (exc) { this.fail(exc); }
  }

  async reset() {
    const s = this.session, label = this.labels.active();
    if (!s) return;
    try {
      this.clearError();
      await api.interact(s.id, { action: "reset", label: label.name });
      this.masks.clear(label.name);
      s.forget(label.name);
      await this.refreshOverlay();
    } catch (exc) { this.fail(exc); }
  }

  async propagate() {
    const s = this.session, label = this.labels.active();
    const bar = $("#progress"), fill = $("#progress-bar"), text = $("#progress-text");
    try {
      this.needPromptAxis();
      this.clearError();
      bar.hidden = false; fill.style.width = "0%"; text.textContent = "propagating…";
      const total = Math.max(1, s.depth() - 1), t0 = performance.now();
      const reply = await api.propagate(s.id, { label: label.name, slice: s.current() }, (p) => {
        fill.style.width = `${Math.min(100, (100 * p.done) / total)}%`;
        text.textContent = `propagating: slice ${p.slice + 1} (${p.done} done)`;
        const strip = $("#slice-strip").getContext("2d"), w = $("#slice-strip").width / s.depth();
        strip.fillStyle = label.colour;
        strip.fillRect(p.slice * w, 0, Math.max(1, w - 1), $("#slice-strip").height);
      });
      fill.style.width = "100%";
      await this.show(reply, { roundtrip: performance.now() - t0, record: false });
      text.textContent = `propagated to ${reply.masks.filter((m) => m.bbox).length} slices`;
    } catch (exc) { this.fail(exc); } finally {
      setTimeout(() => { bar.hidden = true; }, 1500);
    }
  }

  async save() {
    const s = this.session;
    if (!s) return;
    try {
      this.clearError();
      const format = $("#save-format").value;
      const { blob, name } = await api.result(s.id, format);
      const ext = { nifti: "nii.gz", seg: "dcm", png: "png" }[format] || format;
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = name || `casam-labels.${ext}`;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 10000);
    } catch (exc) { this.fail(exc); }
  }

  addLabel(name) {
    try {
      this.labels.add(name);
      $("#new-label").value = "";
      this.refreshOverlay();
    } catch (exc) { this.fail(exc); }
  }
}

const app = new App();
window.casamViewer = app;
app.start();
