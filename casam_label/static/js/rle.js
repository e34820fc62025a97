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
    for (let i = pos; value && i < pos + run;) {      // a run may span rows of the region
      const row = Math.floor(i / w), col = i % w, n = Math.min(w - col, pos + run - i);
      const at = (y0 + row) * width + x0 + col;
      out.fill(1, at, at + n);
      i += n;
    }
    pos += run;
    value ^= 1;
  }
  if (pos !== w * h) throw new Error(`mask runs cover ${pos} pixels, the region has ${w * h}`);
  return out;
}
