// Mouse on the image: left-drag a box, click a positive point, Shift+click a negative one,
// right-drag window/level, middle-drag (or Alt+drag) pan, wheel slices, Ctrl+wheel zoom.
// The handlers get slice coordinates; `performance.mark("mouseup")` starts the latency clock.

const DRAG_PX = 4; // movement (CSS px) below which a press is a click, not a box

export function attachPointer(view, handlers) {
  const canvas = view.canvas;
  let gesture = null;

  canvas.addEventListener("contextmenu", (e) => e.preventDefault());

  canvas.addEventListener("pointerdown", (e) => {
    if (!view.image) return;
    canvas.setPointerCapture(e.pointerId);
    const kind = e.button === 2 ? "window" : (e.button === 1 || (e.button === 0 && e.altKey)) ? "pan" : "prompt";
    gesture = { kind, x: e.clientX, y: e.clientY, lastX: e.clientX, lastY: e.clientY, moved: false,
                start: view.toSlice(e.clientX, e.clientY), shift: e.shiftKey };
    if (kind === "window") handlers.windowStart();
    e.preventDefault();
  });

  canvas.addEventListener("pointermove", (e) => {
    if (!gesture) return;
    const dx = e.clientX - gesture.lastX, dy = e.clientY - gesture.lastY;
    gesture.lastX = e.clientX; gesture.lastY = e.clientY;
    if (Math.hypot(e.clientX - gesture.x, e.clientY - gesture.y) >= DRAG_PX) gesture.moved = true;
    if (gesture.kind === "pan") { view.panBy(dx, dy); handlers.redraw(); }
    else if (gesture.kind === "window") handlers.windowBy(e.clientX - gesture.x, e.clientY - gesture.y);
    else if (gesture.moved) handlers.dragBox(boxOf(gesture.start, view.toSlice(e.clientX, e.clientY)));
  });

  const end = (e) => {
    if (!gesture) return;
    const g = gesture;
    gesture = null;
    if (g.kind !== "prompt") { if (g.kind === "window") handlers.windowEnd(); return; }
    performance.mark("mouseup");
    const at = view.toSlice(e.clientX, e.clientY);
    if (g.moved) handlers.box(boxOf(g.start, at));
    else handlers.click(at, !(g.shift || e.shiftKey));
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", () => { gesture = null; handlers.dragBox(null); });

  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    if (e.ctrlKey || e.metaKey) { view.zoomAt(e.deltaY < 0 ? 1.15 : 1 / 1.15, e.clientX, e.clientY); handlers.redraw(); }
    else handlers.scroll(e.deltaY > 0 ? 1 : -1);
  }, { passive: false });
}

function boxOf(a, b) {
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
}
