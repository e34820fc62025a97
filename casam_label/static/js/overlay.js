// The masks the server answered, per label and slice on the session's axis, and the mask
// layer: a canvas of exactly the slice's pixels, opaque in the label's colour where the
// label's mask is set (the view draws it translucent). Tests read it with getImageData.

import { decodeMask } from "./rle.js";

export class Masks {
  constructor() { this.byLabel = new Map(); }   // label → Map(slice → Uint8Array)

  clear(label) {
    if (label === undefined) this.byLabel.clear(); else this.byLabel.delete(label);
  }

  // Store an interaction reply's masks; returns the slices it changed.
  take(reply, height, width) {
    const changed = [];
    for (const wire of reply.masks || []) {
      const name = wire.label ?? reply.label;      // a reset of every label names each mask's label
      if (!this.byLabel.has(name)) this.byLabel.set(name, new Map());
      const slices = this.byLabel.get(name);
      const mask = decodeMask(wire, height, width);
      if (mask) slices.set(wire.slice, mask); else slices.delete(wire.slice);
      changed.push(wire.slice);
    }
    return changed;
  }

  get(label, slice) {
    const slices = this.byLabel.get(label);
    return slices ? slices.get(slice) || null : null;
  }

  slicesOf(label) {
    const slices = this.byLabel.get(label);
    return slices ? [...slices.keys()].sort((a, b) => a - b) : [];
  }
}

function rgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

function layerPixels(canvas, width, height) {
  if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  return [ctx, ctx.createImageData(width, height)];
}

// Paint the session-axis masks of `slice` (lower label index wins where labels overlap,
// as in the label map casam writes).
export function paintMasks(canvas, masks, labels, slice, width, height) {
  const [ctx, img] = layerPixels(canvas, width, height);
  const ordered = [...labels].sort((a, b) => a.index - b.index);
  for (const label of ordered) {
    const mask = masks.get(label.name, slice);
    if (!mask || !label.visible) continue;
    const [r, g, b] = rgb(label.colour);
    for (let i = 0; i < mask.length; i++) {
      if (mask[i] && img.data[4 * i + 3] === 0) {
        img.data.set([r, g, b, 255], 4 * i);
      }
    }
  }
  ctx.putImageData(img, 0, 0);
}

// Paint a label-index slice (the PNG of /labels/view, on any axis) in the labels' colours.
export function paintIndexMap(canvas, bitmap, labels) {
  const { width, height } = bitmap;
  const [ctx, img] = layerPixels(canvas, width, height);
  ctx.clearRect(0, 0, width, height);
  ctx.drawImage(bitmap, 0, 0);
  const src = ctx.getImageData(0, 0, width, height).data;
  const colours = new Map(labels.filter((l) => l.visible).map((l) => [l.index, rgb(l.colour)]));
  for (let i = 0; i < width * height; i++) {
    const c = colours.get(src[4 * i]);
    if (c) img.data.set([c[0], c[1], c[2], 255], 4 * i);
  }
  ctx.putImageData(img, 0, 0);
}
