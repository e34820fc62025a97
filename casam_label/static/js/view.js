// The image canvas: one slice bitmap, the mask layer over it, the prompt marks on top,
// drawn under a zoom-and-pan transform. Slice pixel (x, y) is column x, row y of the PNG
// that /view returns, which is the coordinate system of the interaction API.

export class SliceView {
  constructor(canvas, maskCanvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.mask = maskCanvas;
    this.image = null;           // ImageBitmap of the slice
    this.zoom = 1; this.panX = 0; this.panY = 0;
    this.maskAlpha = 0.4;
  }

  get width() { return this.image ? this.image.width : 0; }
  get height() { return this.image ? this.image.height : 0; }

  // Resize the canvas to its box on screen (device pixels), keeping the view's centre.
  resize() {
    const box = this.canvas.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(box.width * dpr)), h = Math.max(1, Math.round(box.height * dpr));
    if (this.canvas.width !== w || this.canvas.height !== h) {
      this.canvas.width = w; this.canvas.height = h;
    }
  }

  setImage(bitmap, fit) {
    const sameSize = this.image && this.image.width === bitmap.width && this.image.height === bitmap.height;
    if (this.image && this.image !== bitmap && this.image.close) this.image.close();
    this.image = bitmap;
    if (fit || !sameSize) this.fit();
  }

  fit() {
    if (!this.image) return;
    this.resize();
    const s = Math.min(this.canvas.width / this.width, this.canvas.height / this.height) * 0.96;
    this.zoom = s;
    this.panX = (this.canvas.width - this.width * s) / 2;
    this.panY = (this.canvas.height - this.height * s) / 2;
  }

  // Zoom by `factor` keeping the slice point under client (cx, cy) in place.
  zoomAt(factor, cx, cy) {
    const [x, y] = this.toSlice(cx, cy);
    this.zoom = Math.min(64, Math.max(0.05, this.zoom * factor));
    const [dx, dy] = this.deviceOf(cx, cy);
    this.panX = dx - x * this.zoom;
    this.panY = dy - y * this.zoom;
  }

  panBy(dxCss, dyCss) {
    const dpr = window.devicePixelRatio || 1;
    this.panX += dxCss * dpr; this.panY += dyCss * dpr;
  }

  deviceOf(cx, cy) {
    const box = this.canvas.getBoundingClientRect();
    const sx = this.canvas.width / box.width, sy = this.canvas.height / box.height;
    return [(cx - box.left) * sx, (cy - box.top) * sy];
  }

  // Client (CSS pixel) coordinates → continuous slice coordinates.
  toSlice(cx, cy) {
    const [dx, dy] = this.deviceOf(cx, cy);
    return [(dx - this.panX) / this.zoom, (dy - this.panY) / this.zoom];
  }

  // Continuous slice coordinates → client coordinates (tests and marks use it).
  toClient(x, y) {
    const box = this.canvas.getBoundingClientRect();
    const sx = box.width / this.canvas.width, sy = box.height / this.canvas.height;
    return [box.left + (x * this.zoom + this.panX) * sx, box.top + (y * this.zoom + this.panY) * sy];
  }

  // Draw the slice, the mask layer and the marks ({box, points, drag}).
  draw(marks) {
    const { ctx } = this;
    this.resize();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#111";
    ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    if (!this.image) return;
    ctx.setTransform(this.zoom, 0, 0, this.zoom, this.panX, this.panY);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(this.image, 0, 0);
    if (this.mask.width === this.width && this.mask.height === this.height) {
      ctx.globalAlpha = this.maskAlpha;
      ctx.drawImage(this.mask, 0, 0);
      ctx.globalAlpha = 1;
      // Outlines help where a mask pixel is small on screen; zoomed in, the fill reads alone.
      if (this.mask.edges && this.zoom < 4) ctx.drawImage(this.mask.edges, 0, 0);
    }
    this.drawMarks(marks || {});
  }

  drawMarks({ box, points, drag }) {
    const { ctx } = this;
    const line = 2 / this.zoom;
    ctx.lineWidth = line;
    const rect = (b, dash) => {
      ctx.setLineDash(dash ? [4 / this.zoom, 3 / this.zoom] : []);
      ctx.strokeStyle = "#ffd400";  // yellow: apart from every label colour and grey
      ctx.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
      ctx.setLineDash([]);
    };
    if (box) rect(box, false);
    if (drag) rect(drag, true);
    for (const p of points || []) {
      ctx.beginPath();
      ctx.arc(p.x + 0.5, p.y + 0.5, 6 / this.zoom, 0, 2 * Math.PI);
      ctx.fillStyle = p.positive ? "#2ecc40" : "#ff4136";
      ctx.fill();
      ctx.lineWidth = 2.5 / this.zoom;
      ctx.strokeStyle = "#fff";
      ctx.stroke();
      ctx.lineWidth = line;
    }
  }
}
