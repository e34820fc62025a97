// The CA-SAM decision: which task's alignment layer took the image or volume (or plain
// SAM), every task's score against its threshold τ as a bar chart, and where the time went.

const SVG = "http://www.w3.org/2000/svg";

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// The chart's x scale: linear, or logarithmic over whole decades when the values span more
// than a factor of 20 (an untrained export's τ can sit orders of magnitude above its scores).
function scale(values) {
  const pos = values.filter((v) => Number.isFinite(v));
  const lo = Math.min(...pos), hi = Math.max(...pos, 1e-9);
  if (pos.length && lo > 0 && hi / lo > 20) {
    const a = Math.floor(Math.log10(lo)), b = Math.ceil(Math.log10(hi));
    return { log: true, x: (v) => (v > 0 ? (Math.log10(v) - a) / Math.max(1, b - a) : 0) };
  }
  return { log: false, x: (v) => Math.max(0, v) / hi };
}

// One row per task: the bar is the score, the red tick τ; the bar is green under τ (the
// task would take the image), grey above; the routed task is bold.
export function scoreChart(route) {
  const names = Object.keys(route.scores || {});
  const rowH = 22, left = 70, width = 170, right = 110;
  const sc = scale([...names.map((n) => route.scores[n]), ...names.map((n) => route.thresholds[n])]);
  const svg = el("svg", { width: left + width + right, height: rowH * names.length + 18, role: "img",
    "aria-label": "task scores against their thresholds" });
  names.forEach((name, i) => {
    const y = i * rowH + 2, score = route.scores[name], tau = route.thresholds[name];
    const under = tau !== undefined && score < tau;
    const g = el("g", { "data-task": name, "data-score": score, "data-tau": tau ?? "" });
    g.append(el("text", { x: left - 6, y: y + 14, "text-anchor": "end",
      "font-weight": name === route.task ? "bold" : "normal" }, name));
    g.append(el("rect", { x: left, y: y + 3, width: Math.max(1, sc.x(score) * width), height: rowH - 8,
      fill: under ? "#2ecc40" : "#888" }));
    if (tau !== undefined) {
      const tx = left + sc.x(tau) * width;
      g.append(el("line", { x1: tx, x2: tx, y1: y, y2: y + rowH - 2, stroke: "#ff4136", "stroke-width": 2 }));
    }
    g.append(el("text", { x: left + width + 6, y: y + 14 }, `${fmt(score)} / τ ${fmt(tau)}`));
    g.append(el("title", {}, `${name}: score ${fmt(score)}, τ ${fmt(tau)}${under ? " (under τ)" : ""}`));
    svg.append(g);
  });
  svg.append(el("text", { x: left, y: rowH * names.length + 14, fill: "#6b7280" },
    sc.log ? "log scale" : "linear scale"));
  return svg;
}

function fmt(v) {
  if (v === undefined || v === null) return "—";
  const a = Math.abs(v);
  return a >= 1e4 || (a > 0 && a < 1e-2) ? v.toExponential(1) : v.toFixed(a >= 100 ? 0 : 2);
}

export function routeText(route) {
  if (!route) return "no prompt yet";
  return route.plain_sam ? "plain SAM (no task matched)" : `task ${route.task}`;
}

export function renderDecision(root, route, timings) {
  root.querySelector("#route-task").textContent = routeText(route);
  root.querySelector("#route-task").className = route ? (route.plain_sam ? "plain" : "task") : "muted";
  const slices = route && route.mode === "volume" && route.slices && route.slices.length ? `, decided on slices ${route.slices.join(", ")}` : "";
  root.querySelector("#route-mode").textContent = route ? `${route.mode}${slices}; bar: score, red tick: τ` : "";
  root.querySelector("#scores").replaceChildren(...(route ? [scoreChart(route)] : []));
  const rows = Object.entries(timings || {}).map(([stage, ms]) => {
    const tr = document.createElement("tr");
    const a = document.createElement("td"), b = document.createElement("td");
    a.textContent = stage; b.textContent = typeof ms === "number" ? ms.toFixed(1) : String(ms);
    tr.append(a, b);
    return tr;
  });
  root.querySelector("#timings tbody").replaceChildren(...rows);
}
