// Keyboard shortcuts (listed in the page's "?" dialog).

export function attachKeys(app) {
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    if (t instanceof HTMLInputElement || t instanceof HTMLSelectElement || t instanceof HTMLTextAreaElement) return;
    const key = e.key, v = app.view;
    const centre = () => { const b = v.canvas.getBoundingClientRect(); return [b.left + b.width / 2, b.top + b.height / 2]; };
    const actions = {
      ArrowUp: () => app.scroll(-1), ArrowLeft: () => app.scroll(-1),
      ArrowDown: () => app.scroll(1), ArrowRight: () => app.scroll(1),
      PageUp: () => app.scroll(-10), PageDown: () => app.scroll(10),
      "+": () => { v.zoomAt(1.25, ...centre()); app.redraw(); }, "=": () => { v.zoomAt(1.25, ...centre()); app.redraw(); },
      "-": () => { v.zoomAt(0.8, ...centre()); app.redraw(); },
      f: () => { v.fit(); app.redraw(); },
      a: () => app.setViewAxis(2), c: () => app.setViewAxis(1), g: () => app.setViewAxis(0),
      u: () => app.undo(), r: () => app.reset(), p: () => app.propagate(), s: () => app.save(),
      l: () => app.labels.next(),
      "?": () => document.querySelector("#help").showModal(),
    };
    let act = actions[key] || actions[key.toLowerCase()];
    if ((e.ctrlKey || e.metaKey) && key.toLowerCase() === "z") act = () => app.undo();
    else if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (act) { e.preventDefault(); act(); }
  });
  document.querySelector("#help-button").onclick = () => document.querySelector("#help").showModal();
}
