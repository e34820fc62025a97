// Several labels per session, each with a name and a colour. The server numbers labels by
// first use (1, 2, …); the list keeps that index once a label's first prompt returns.

const PALETTE = ["#ff4136", "#2ecc40", "#0074d9", "#a3e635", "#b10dc9", "#ff851b", "#39cccc", "#f012be"];
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export class LabelList {
  constructor(listEl, onChange) {
    this.el = listEl;
    this.onChange = onChange;
    this.labels = [];
    this.current = null;
  }

  // Labels named by a session description (their server indices), plus a default one.
  reset(described) {
    this.labels = [];
    for (const [name, info] of Object.entries(described || {})) this.add(name, info.index);
    if (!this.labels.length) this.add("label-1");
    this.current = this.labels[0].name;
    this.render();
  }

  add(name, index = null) {
    if (!NAME.test(name)) throw new Error(`label name ${JSON.stringify(name)}: use letters, digits, '.', '_' or '-'`);
    if (this.find(name)) throw new Error(`label ${name} exists already`);
    const colour = PALETTE[this.labels.length % PALETTE.length];
    this.labels.push({ name, colour, index, visible: true });
    this.current = name;
    this.render();
  }

  find(name) { return this.labels.find((l) => l.name === name) || null; }
  active() { return this.find(this.current); }

  setIndex(name, index) {
    const label = this.find(name);
    if (label && label.index !== index) { label.index = index; this.render(); }
  }

  next() {
    const i = this.labels.findIndex((l) => l.name === this.current);
    this.current = this.labels[(i + 1) % this.labels.length].name;
    this.render();
    this.onChange();
  }

  render() {
    this.el.replaceChildren(...this.labels.map((label) => this.row(label)));
  }

  row(label) {
    const li = document.createElement("li");
    li.className = label.name === this.current ? "active" : "";
    li.dataset.label = label.name;
    const colour = document.createElement("input");
    colour.type = "color"; colour.value = label.colour; colour.title = "colour";
    colour.addEventListener("input", () => { label.colour = colour.value; this.onChange(); });
    const eye = document.createElement("input");
    eye.type = "checkbox"; eye.checked = label.visible; eye.title = "show";
    eye.addEventListener("change", () => { label.visible = eye.checked; this.onChange(); });
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = label.name + (label.index ? ` (${label.index})` : "");
    li.addEventListener("click", (e) => {
      if (e.target !== colour && e.target !== eye) { this.current = label.name; this.render(); this.onChange(); }
    });
    li.append(colour, eye, name);
    return li;
  }
}
