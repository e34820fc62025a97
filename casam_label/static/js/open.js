// Ways in: drag and drop (files, a folder of DICOM files, a zip), the file and folder
// pickers, and the server's datastore list. Each calls open(files) or openStored(id).

// Every file under a dropped folder (webkitGetAsEntry), with its relative path.
async function filesOfEntry(entry, prefix = "") {
  if (entry.isFile) {
    const file = await new Promise((ok, fail) => entry.file(ok, fail));
    return [new File([file], prefix + file.name, { type: file.type })];
  }
  const reader = entry.createReader(), out = [];
  for (;;) {
    const batch = await new Promise((ok, fail) => reader.readEntries(ok, fail));
    if (!batch.length) break;
    for (const child of batch) out.push(...(await filesOfEntry(child, `${prefix}${entry.name}/`)));
  }
  return out;
}

export function attachOpeners({ stage, fileInput, folderInput, datastore }, open, openStored, fail) {
  const pick = (input) => input.addEventListener("change", () => {
    if (input.files.length) open([...input.files]);
    input.value = "";
  });
  pick(fileInput);
  pick(folderInput);

  stage.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("dropping"); });
  stage.addEventListener("dragleave", () => stage.classList.remove("dropping"));
  stage.addEventListener("drop", async (e) => {
    e.preventDefault();
    stage.classList.remove("dropping");
    try {
      const entries = [...e.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
      const files = entries.some((en) => en.isDirectory)
        ? (await Promise.all(entries.map((en) => filesOfEntry(en)))).flat()
        : [...e.dataTransfer.files];
      if (files.length) open(files);
    } catch (exc) { fail(exc); }
  });

  datastore.addEventListener("change", () => {
    if (datastore.value) openStored(datastore.value);
    datastore.value = "";
  });
}

export function fillDatastore(select, listing) {
  const images = (listing && listing.images) || [];
  const options = images.map((img) => {
    const o = document.createElement("option");
    o.value = img.id; o.textContent = `${img.name || img.id} (${img.kind || "image"})`;
    return o;
  });
  const head = document.createElement("option");
  head.value = ""; head.textContent = images.length ? `datastore (${images.length})…` : "datastore: empty";
  select.replaceChildren(head, ...options);
  select.disabled = !images.length;
}
