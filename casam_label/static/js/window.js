// CT window presets (served by /api/info from casam's --window-preset table) and
// window/level by right-drag: horizontal changes the width, vertical the level.

export class WindowControl {
  constructor(select, onChange) {
    this.select = select;
    this.onChange = onChange;
    this.presets = {};
    this.current = null;   // {center, width}; null: the session's own window
    this.base = null;
    this.pending = false;
    select.addEventListener("change", () => {
      const p = this.presets[select.value];
      this.current = p ? { ...p } : null;
      this.onChange();
    });
  }

  // Accepts {"name": [center, width]} or {"name": {"center", "width"}} or a list of those.
  setPresets(table) {
    const entries = Array.isArray(table) ? table.map((p) => [p.name, p]) : Object.entries(table || {});
    this.presets = Object.fromEntries(entries.map(([name, p]) => [name,
      Array.isArray(p) ? { center: Number(p[0]), width: Number(p[1]) } : { center: Number(p.center), width: Number(p.width) }]));
    const head = document.createElement("option");
    head.value = ""; head.textContent = "session window";
    const options = Object.entries(this.presets).map(([name, p]) => {
      const o = document.createElement("option");
      o.value = name; o.textContent = `${name} (L ${p.center}, W ${p.width})`;
      return o;
    });
    this.select.replaceChildren(head, ...options);
  }

  reset(enabled) {
    this.current = null;
    this.select.value = "";
    this.select.disabled = !enabled;
    this.enabled = enabled;
  }

  dragStart() {
    if (!this.enabled) return;
    this.base = this.current || this.presets["soft-tissue"] || { center: 40, width: 400 };
  }

  dragBy(dx, dy) {
    if (!this.base) return;
    const step = this.base.width / 256;
    this.current = { center: this.base.center - dy * step, width: Math.max(1, this.base.width + dx * step) };
    this.select.value = "";
    if (this.pending) return;            // one view request in flight at a time; the latest window wins
    this.pending = true;
    Promise.resolve(this.onChange()).finally(() => { this.pending = false; });
  }

  dragEnd() {
    if (this.base) this.onChange();
    this.base = null;
  }
}
