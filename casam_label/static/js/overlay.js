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

// A colour as one RGBA pixel word (ImageData is little-endian RGBA on every browser).
function rgba(hex) {
  const n = parseInt(hex.slice(1), 16);
  return ((255 << 24) | ((n & 255) << 16) | (n & 0xff00) | ((n >> 16) & 255)) >>> 0;
}

// The outline of the layer: its set pixels with an unset (or missing) 4-neighbour, drawn
// opaque over the translucent fill so a mask reads on any image. Kept on canvas.edges.
function paintEdges(canvas, img) {
  const { width, height } = img;
  const src = new Uint32Array(img.data.buffer);
  const edges = canvas.edges || (canvas.edges = document.createElement("canvas"));
  edges.width = width; edges.height = height;
  const out = new ImageData(width, height), dst = new Uint32Array(out.data.buffer);
  for (let y = 0, i = 0; y < height; y++) {
    for (let x = 0; x < width; x++, i++) {
      const v = src[i];
      if (v && (x === 0 || y === 0 || x === width - 1 || y === height - 1 ||
                !src[i - 1] || !src[i + 1] || !src[i - width] || !src[i + width])) dst[i] = v;
    }
  }
  edges.getContext("2d").putImageData(out, 0, 0);
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
  const px = new Uint32Array(img.data.buffer);
  const ordered = [...labels].sort((a, b) => a.index - b.index);
  for (const label of ordered) {
    const mask = masks.get(label.name, slice);
    if (!mask || !label.visible) continue;
    const c = rgba(label.colour);
    for (let i = 0; i < mask.length; i++) if (mask[i] && !px[i]) px[i] = c;
  }
  ctx.putImageData(img, 0, 0);
  paintEdges(canvas, img);
}

// Paint a label-index slice (the PNG of /labels/view, on any axis) in the labels' colours.
export function paintIndexMap(canvas, bitmap, labels) {
  const { width, height } = bitmap;
  const [ctx, img] = layerPixels(canvas, width, height);
  ctx.clearRect(0, 0, width, height);
  ctx.drawImage(bitmap, 0, 0);
  const src = ctx.getImageData(0, 0, width, height).data;
  const colours = new Map(labels.filter((l) => l.visible).map((l) => [l.index, rgba(l.colour)]));
  const px = new Uint32Array(img.data.buffer);
  for (let i = 0; i < width * height; i++) {
    if (src[4 * i]) px[i] = colours.get(src[4 * i]) || 0;
  }
  ctx.putImageData(img, 0, 0);
  paintEdges(canvas, img);
}
