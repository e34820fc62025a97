// What the page knows about the open session: its description, the slice shown on each
// axis, and each label's prompts per slice (to draw the box and the points the server has).

export const AXIS_NAMES = { 0: "sagittal", 1: "coronal", 2: "axial" };

export class PageSession {
  constructor(description) {
    this.d = description;
    this.id = description.session_id;
    this.volume = Boolean(description.volume);
    this.axis = this.volume ? description.axis : null;   // the prompting axis
    this.viewAxis = this.axis;
    this.slice = new Map();                             // axis → slice shown
    if (this.volume) for (const a of [0, 1, 2]) this.slice.set(a, Math.floor(description.shape[a] / 2));
    else this.slice.set(null, 0);
    this.prompts = new Map();                           // "label|slice" → stack of {box, points}
  }

  depth(axis = this.viewAxis) { return this.volume ? this.d.shape[axis] : 1; }
  current() { return this.slice.get(this.viewAxis); }
  onPromptAxis() { return this.viewAxis === this.axis; }

  // Slice (height, width) of the prompting axis: the shape without the axis.
  sliceHW() {
    if (Array.isArray(this.d.slice_shape)) return [this.d.slice_shape[0], this.d.slice_shape[1]];
    if (!this.volume) return [this.d.shape[0], this.d.shape[1]];
    const hw = this.d.shape.filter((_, i) => i !== this.axis);
    return [hw[0], hw[1]];
  }

  go(delta) {
    const k = Math.min(this.depth() - 1, Math.max(0, this.current() + delta));
    const changed = k !== this.current();
    this.slice.set(this.viewAxis, k);
    return changed;
  }

  goTo(k) { this.slice.set(this.viewAxis, Math.min(this.depth() - 1, Math.max(0, k))); }

  // The prompts a label's current mask on a slice came from (mirrors the server's steps).
  stack(label, slice) {
    const key = `${label}|${slice}`;
    if (!this.prompts.has(key)) this.prompts.set(key, []);
    return this.prompts.get(key);
  }
  top(label, slice) { const s = this.stack(label, slice); return s.length ? s[s.length - 1] : null; }
  pushBox(label, slice, box) { this.stack(label, slice).push({ box, points: [] }); }
  pushClick(label, slice, point) {
    const prev = this.top(label, slice);
    this.stack(label, slice).push({ box: prev ? prev.box : null, points: [...(prev ? prev.points : []), point] });
  }
  pop(label, slice) { this.stack(label, slice).pop(); }
  forget(label) {
    for (const key of [...this.prompts.keys()]) if (label === undefined || key.startsWith(`${label}|`)) this.prompts.delete(key);
  }

  // The download formats the server can write for this source, from the session
  // description (NIfTI where it has geometry, DICOM SEG only for a DICOM volume, PNG for a
  // picture), so the page offers SEG exactly where the server makes one.
  formats() {
    return Array.isArray(this.d.formats) ? this.d.formats : [];
  }
}
