// Masks on the wire (docs/INTERACTIVE.md): the bounding region only, run-length coded in
// row-major order starting with a run of zeros. Decoded into a full slice-sized bitmap.

// → Uint8Array of height*width (1 inside the mask), or null for an empty mask.
export function decodeMask(wire, height, width) {
  if (!wire.bbox) return null;
  const [x0, y0, x1, y1] = wire.bbox;
  const w = x1 - x0, h = y1 - y0;
  if (w <= 0 || h <= 0 || x0 < 0 || y0 < 0 || x1 > width || y1 > height) {
    throw new Error(`mask region ${wire.bbox} lies outside the ${width}×${height} slice`);
  }
  const out = new Uint8Array(width * height);
  let pos = 0, value = 0;
  for (const run of wire.rle) {
    if (value) {
      for (let i = pos; i < pos + run; i++) out[(y0 + Math.floor(i / w)) * width + x0 + (i % w)] = 1;
    }
    pos += run;
    value ^= 1;
  }
  if (pos !== w * h) throw new Error(`mask runs cover ${pos} pixels, the region has ${w * h}`);
  return out;
}
