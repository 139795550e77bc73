// The playground: one form per model, built from GET /models (each model's input schema and example), calling
// the ordinary prediction routes. Plain JavaScript, no framework, nothing loaded from elsewhere.
"use strict";

(() => {
  const KEY_STORE = "playground.apiKey";
  // The house fields that move the price most, shown first; the other 70-odd wait in a <details>.
  const HOUSE_FIRST = ["OverallQual", "GrLivArea", "YearBuilt", "Neighborhood", "GarageCars", "TotalBsmtSF",
    "KitchenQual", "FullBath"];
  const SIDE = 28; // Fashion-MNIST's images: 28x28, light garment on a dark background
  const dollars = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD", maximumFractionDigits: 0 });
  const percent = (p) => `${(100 * p).toFixed(1)} %`;
  const $ = (selector) => document.querySelector(selector);

  /** An element with attributes and children (strings become text, never HTML). */
  function h(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined && child !== false) node.append(child);
    }
    return node;
  }

  // ---- calling the API ------------------------------------------------------------------------------------

  function apiKey() {
    try {
      return sessionStorage.getItem(KEY_STORE) || "";
    } catch {
      return ""; // storage switched off: the key field still works for this page's life
    }
  }

  let typedKey = "";
  function api(path, init = {}) {
    const headers = new Headers(init.headers || {});
    const key = apiKey() || typedKey;
    if (key) headers.set("X-API-Key", key);
    return fetch(path, { ...init, headers });
  }

  /** An answer that is not a 2xx, or an error event in a stream: the API's own words are in body.detail. */
  class ApiError extends Error {
    constructor(status, body, heading) {
      super(`HTTP ${status}`);
      this.status = status;
      this.body = body;
      this.heading = heading || `The API answered ${status}:`;
    }
  }

  async function bodyOf(response) {
    const text = await response.text();
    try {
      return JSON.parse(text);
    } catch {
      return { detail: text || response.statusText };
    }
  }

  async function send(path, init) {
    const response = await api(path, { method: "POST", ...init });
    const body = await bodyOf(response);
    if (!response.ok) throw new ApiError(response.status, body);
    return body;
  }

  const postJSON = (path, payload) =>
    send(path, { headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload) });

  /** The error body's detail as lines: a sentence, or pydantic's list of {loc, msg} (loc without "body"). */
  function problems(error) {
    if (!(error instanceof ApiError)) return [{ field: null, text: `The request did not complete: ${error.message}` }];
    const detail = error.body && error.body.detail;
    if (Array.isArray(detail)) {
      return detail.map((item) => {
        const loc = (item.loc || []).filter((part, i) => !(i === 0 && part === "body"));
        return { field: loc.length ? String(loc[0]) : null, text: loc.length ? `${loc.join(" → ")}: ${item.msg}` : item.msg };
      });
    }
    if (typeof detail === "string") return [{ field: null, text: detail }];
    return [{ field: null, text: JSON.stringify(error.body) }];
  }

  function showError(result, error, form) {
    const lines = problems(error);
    if (form) {
      for (const line of lines) {
        const input = line.field && form.querySelector(`[name="${CSS.escape(line.field)}"]`);
        if (input) input.setAttribute("aria-invalid", "true");
      }
    }
    const heading = error instanceof ApiError ? error.heading : "No answer:";
    const hint = error instanceof ApiError && error.status === 401 ? h("p", {}, "Type the key in the API key field at the top.") : null;
    show(result, h("div", { class: "error", role: "alert" }, h("p", {}, h("strong", {}, heading)),
      h("ul", {}, lines.map((line) => h("li", {}, line.text))), hint));
  }

  function clearInvalid(form) {
    for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  }

  /** Server-Sent Events from a fetch body: {event, data} for each block of `event:` and `data:` lines. */
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        let event = "message";
        const data = [];
        for (const line of block.split(/\r?\n/)) {
          const colon = line.indexOf(":");
          if (colon <= 0) continue; // a comment (":...") or a line without a field
          const field = line.slice(0, colon);
          const value = line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") event = value;
          else if (field === "data") data.push(value);
        }
        if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
      }
      if (done) return;
    }
  }

  // ---- forms from the JSON schemas --------------------------------------------------------------------------

  /** The non-null branch of an optional field's anyOf. */
  const variant = (prop) => (prop.anyOf ? prop.anyOf.find((branch) => branch.type !== "null") || {} : prop);
  // House descriptions go on about codes no training house had; the label keeps the first sentence.
  const shortDescription = (text) => (text || "").split(/ (?:Documented, but|Also accepted)/)[0].trim();
  const isSwitch = (spec) => spec.type === "integer" && spec.minimum === 0 && spec.maximum === 1;

  function range(spec) {
    if (spec.minimum === undefined && spec.maximum === undefined) return "";
    const whole = spec.type === "integer" ? ", whole number" : "";
    return `${spec.minimum ?? "…"} to ${spec.maximum ?? "…"}${whole}`;
  }

  /** One labelled input for a schema property: a checkbox (0/1), a select (codes) or a number. */
  function field(prefix, name, prop, value) {
    const spec = variant(prop);
    const id = `${prefix}-${name}`;
    const hintId = `${id}-hint`;
    let text = shortDescription(prop.description) || name;
    let input;
    let hint;
    if (isSwitch(spec)) {
      // "1 if the phone has Bluetooth, else 0." reads as "Has Bluetooth"
      text = text.replace(/^1 if the \w+ (.*), else 0\.?$/, (_, what) => what[0].toUpperCase() + what.slice(1));
      input = h("input", { id, name, type: "checkbox", "data-field": "switch", "aria-describedby": hintId });
      input.checked = Number(value) === 1;
      hint = "sent as 1 (ticked) or 0";
    } else if (spec.enum) {
      input = h("select", { id, name, "data-field": spec.type, "aria-describedby": hintId },
        h("option", { value: "" }, "not given (imputed)"), spec.enum.map((code) => h("option", { value: code }, String(code))));
      input.value = value === undefined || value === null ? "" : String(value);
      hint = `${spec.enum.length} codes`;
    } else {
      input = h("input", {
        id, name, type: "number", "data-field": spec.type, "aria-describedby": hintId,
        min: spec.minimum, max: spec.maximum, step: spec.type === "integer" ? 1 : "any",
        inputmode: spec.type === "integer" ? "numeric" : "decimal",
      });
      input.value = value === undefined || value === null ? "" : String(value);
      hint = range(spec);
    }
    const label = h("label", { for: id }, h("span", {}, text), " ", h("code", {}, name));
    const small = h("small", { id: hintId }, hint);
    return isSwitch(spec)
      ? h("div", { class: "field switch" }, input, label, small)
      : h("div", { class: "field" }, label, input, small);
  }

  /** The payload a form's fields make: numbers as numbers, empty fields left out (the API says if they may be). */
  function readFields(form) {
    const payload = {};
    for (const input of form.querySelectorAll("[data-field]")) {
      if (input.dataset.field === "switch") {
        payload[input.name] = input.checked ? 1 : 0;
        continue;
      }
      const raw = input.value.trim();
      if (raw === "") continue;
      payload[input.name] = input.dataset.field === "string" ? raw : Number(raw);
    }
    return payload;
  }

  const example = (schema) => (schema.examples && schema.examples[0]) || {};
  const coverage = (schema) => `${Math.round(100 * (1 - ((schema.properties.alpha || {}).default ?? 0.1)))} %`;

  function predictionSet(set, level, what) {
    if (set === null || set === undefined) return null; // trained before prediction sets
    return h("p", { class: "set" }, `Prediction set (${level}): `,
      set.length ? h("strong", {}, set.join(", ")) : `empty: no ${what} reaches that level`,
      set.length > 1 ? ` (the model cannot choose between these ${what}s)` : null);
  }

  /** Horizontal bars, one per item: {label, value (0-1), best}. */
  function bars(caption, items) {
    return h("figure", { class: "bars" }, h("figcaption", {}, caption), h("ul", {}, items.map((item) => {
      const fill = h("span", { class: "fill" });
      fill.style.width = `${(100 * Math.max(0, Math.min(1, item.value))).toFixed(1)}%`;
      return h("li", { class: item.best ? "best" : null }, h("span", { class: "label" }, item.label),
        h("span", { class: "track", "aria-hidden": "true" }, fill), h("span", { class: "value" }, percent(item.value)));
    })));
  }

  /** Replaces a region's content with the nodes given (null, undefined and false: nothing). */
  function show(target, ...nodes) {
    target.replaceChildren(...nodes.flat().filter((node) => node !== null && node !== undefined && node !== false));
  }

  /** Runs a form's submit: clears the old answer and errors, disables the button while it waits. */
  function onSubmit(form, result, work) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = form.querySelector("button[type=submit]");
      clearInvalid(form);
      button.disabled = true;
      show(result, h("p", { class: "wait" }, "Asking the model…"));
      try {
        await work();
      } catch (error) {
        showError(result, error, form);
      } finally {
        button.disabled = false;
      }
    });
  }

  // ---- phone ------------------------------------------------------------------------------------------------

  function setUpPhone(model) {
    const schema = model.input_schema;
    const form = $("#phone-form");
    const fields = $("#phone-fields");
    const result = $("#phone-result");
    const fill = () => {
      const values = example(schema);
      fields.replaceChildren(...(schema.required || []).map((name) => field("phone", name, schema.properties[name], values[name])));
    };
    fill();
    form.querySelector("[data-reset]").addEventListener("click", fill);
    onSubmit(form, result, async () => {
      const answer = await postJSON("/phone-price", readFields(form));
      show(result, 
        h("p", { class: "answer" }, "Price band ", h("strong", {}, `${answer.price_range}: ${answer.label}`)),
        bars("Probability of each band (0 cheapest, 3 dearest)", answer.probabilities.map((p, band) => ({
          label: band === answer.price_range ? `${band}: ${answer.label}` : `band ${band}`, value: p, best: band === answer.price_range,
        }))),
        predictionSet(answer.prediction_set, coverage(schema), "band"),
      );
    });
  }

  // ---- house ------------------------------------------------------------------------------------------------

  function setUpHouse(model) {
    const schema = model.input_schema;
    const form = $("#house-form");
    const result = $("#house-result");
    const names = Object.keys(schema.properties).filter((name) => name !== "Id");
    const first = HOUSE_FIRST.filter((name) => names.includes(name));
    const fill = () => {
      const values = example(schema);
      const make = (name) => field("house", name, schema.properties[name], values[name]);
      $("#house-main-fields").replaceChildren(...first.map(make));
      $("#house-more-fields").replaceChildren(...names.filter((name) => !first.includes(name)).map(make));
    };
    fill();
    form.querySelector("[data-reset]").addEventListener("click", fill);
    onSubmit(form, result, async () => {
      const answer = await postJSON("/house-price", readFields(form));
      show(result, ...houseAnswer(answer));
    });
  }

  function houseAnswer(answer) {
    const [low, high] = answer.interval_90;
    const price = answer.sale_price;
    // The scale reaches half the interval's width beyond each end, so the interval is always half the bar.
    const margin = (high - low) / 2 || price * 0.1;
    const from = Math.max(0, low - margin);
    const to = high + margin;
    const at = (value) => `${((100 * (value - from)) / (to - from)).toFixed(2)}%`;
    const interval = h("span", { class: "interval" });
    interval.style.left = at(low);
    interval.style.width = `${((100 * (high - low)) / (to - from)).toFixed(2)}%`;
    const mark = h("span", { class: "mark" });
    mark.style.left = at(price);
    const tick = (value, cls) => {
      const label = h("span", { class: cls }, dollars.format(value));
      label.style.left = at(value);
      return label;
    };
    const warnings = answer.warnings || [];
    return [
      h("p", { class: "answer" }, "Sale price ", h("strong", {}, dollars.format(price)),
        `; 90 % interval ${dollars.format(low)} to ${dollars.format(high)}`),
      h("figure", { class: "range" }, h("figcaption", {}, "The 90 % interval (shaded) and the price (line)"),
        h("div", { class: "range-track", "aria-hidden": "true" }, interval, mark),
        h("div", { class: "range-ticks", "aria-hidden": "true" }, tick(low, "low"), tick(high, "high"))),
      warnings.length
        ? h("div", { class: "warnings" }, h("p", {}, h("strong", {}, "Warnings")), h("ul", {}, warnings.map((w) => h("li", {}, w))))
        : null,
    ];
  }

  // ---- fashion ----------------------------------------------------------------------------------------------

  function setUpFashion(model) {
    const schema = model.input_schema;
    const canvas = $("#fashion-canvas");
    const ctx = canvas.getContext("2d");
    const seen = $("#fashion-seen");
    const photo = $("#fashion-photo");
    const caption = $("#fashion-seen-caption");
    const result = $("#fashion-result");
    const brush = $("#fashion-brush");
    const form = $("#fashion-form");
    const photoForm = $("#fashion-photo-form");
    let last = null;
    let photoUrl = null;

    const clear = () => {
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      showSeen(downscale());
    };

    /** The drawing shrunk to 28x28 grey levels (0 = background), row by row: exactly what is sent. */
    function downscale() {
      const small = document.createElement("canvas");
      small.width = small.height = SIDE;
      const sctx = small.getContext("2d", { willReadFrequently: true });
      sctx.imageSmoothingEnabled = true;
      sctx.imageSmoothingQuality = "high";
      sctx.drawImage(canvas, 0, 0, SIDE, SIDE);
      const rgba = sctx.getImageData(0, 0, SIDE, SIDE).data;
      const rows = [];
      for (let y = 0; y < SIDE; y++) {
        const row = [];
        for (let x = 0; x < SIDE; x++) {
          const i = 4 * (SIDE * y + x);
          row.push(Math.round(0.299 * rgba[i] + 0.587 * rgba[i + 1] + 0.114 * rgba[i + 2]));
        }
        rows.push(row);
      }
      return rows;
    }

    function showSeen(rows) {
      const image = seen.getContext("2d").createImageData(SIDE, SIDE);
      rows.flat().forEach((grey, i) => image.data.set([grey, grey, grey, 255], 4 * i));
      seen.getContext("2d").putImageData(image, 0, 0);
      seen.hidden = false;
      photo.hidden = true;
      caption.textContent = "What the model sees: 28×28, as sent";
    }

    function drawPixels(rows) {
      const small = document.createElement("canvas");
      small.width = small.height = SIDE;
      const image = small.getContext("2d").createImageData(SIDE, SIDE);
      rows.flat().forEach((grey, i) => image.data.set([grey, grey, grey, 255], 4 * i));
      small.getContext("2d").putImageData(image, 0, 0);
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
      showSeen(downscale());
    }

    const point = (event) => {
      const box = canvas.getBoundingClientRect();
      return [((event.clientX - box.left) * canvas.width) / box.width, ((event.clientY - box.top) * canvas.height) / box.height];
    };
    const line = (from, to) => {
      ctx.strokeStyle = "#fff";
      ctx.lineWidth = Number(brush.value);
      ctx.lineCap = "round";
      ctx.lineJoin = "round";
      ctx.beginPath();
      ctx.moveTo(...from);
      ctx.lineTo(...to);
      ctx.stroke();
    };
    canvas.addEventListener("pointerdown", (event) => {
      event.preventDefault();
      canvas.setPointerCapture(event.pointerId);
      last = point(event);
      line(last, last);
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!last) return;
      const moves = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
      for (const move of moves.length ? moves : [event]) {
        const next = point(move);
        line(last, next);
        last = next;
      }
    });
    const end = () => {
      if (last) showSeen(downscale());
      last = null;
    };
    for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) canvas.addEventListener(type, end);

    $("#fashion-clear").addEventListener("click", clear);
    const served = example(schema).pixels;
    const exampleButton = $("#fashion-example");
    if (served) exampleButton.addEventListener("click", () => drawPixels(served));
    else exampleButton.hidden = true;
    clear();

    const render = (answer) => {
      show(result, 
        h("p", { class: "answer" }, "Most likely ", h("strong", {}, answer.name), " ", h("span", { lang: "zh" }, `(${answer.name_zh})`)),
        answer.blank
          ? h("p", { class: "warning" }, "Nothing stands out from the background: there is no garment to classify, and the classes below are a guess for an empty image.")
          : null,
        bars("Top classes", answer.top.map((top) => ({ label: top.name, value: top.probability, best: top.label === answer.label }))),
        predictionSet(answer.prediction_set, coverage(schema), "class"),
      );
    };

    onSubmit(form, result, async () => {
      const pixels = downscale();
      showSeen(pixels);
      render(await postJSON("/fashion", { pixels, top_k: 5 }));
    });

    async function classifyPhoto(file) {
      if (photoUrl) URL.revokeObjectURL(photoUrl);
      photoUrl = URL.createObjectURL(file);
      photo.src = photoUrl;
      photo.hidden = false;
      seen.hidden = true;
      caption.textContent = `Your photo (${file.name}): the server inverts a light background, crops the garment and fits it into 28×28`;
      show(result, h("p", { class: "wait" }, "Asking the model…"));
      const body = new FormData();
      body.append("file", file);
      try {
        render(await send("/fashion/image?top_k=5", { body }));
      } catch (error) {
        showError(result, error, null);
      }
    }
    const input = $("#fashion-file");
    input.addEventListener("change", () => input.files[0] && classifyPhoto(input.files[0]));
    const drop = $("#fashion-drop");
    for (const type of ["dragenter", "dragover"]) {
      drop.addEventListener(type, (event) => {
        event.preventDefault();
        drop.classList.add("over");
      });
    }
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      const file = event.dataTransfer.files[0];
      if (file) classifyPhoto(file);
    });
    photoForm.addEventListener("submit", (event) => event.preventDefault());
  }

  // ---- poem -------------------------------------------------------------------------------------------------

  function setUpPoem() {
    const form = $("#poem-form");
    const text = $("#poem-text");
    const result = $("#poem-result");
    onSubmit(form, result, async () => {
      const fields = form.elements;
      const [lineLength, rows] = fields.form.value.split("x").map(Number);
      const payload = { line_length: lineLength, meter: fields.meter.value };
      const start = fields.start.value.trim();
      const acrostic = fields.acrostic.value.trim();
      if (start) payload.start = start;
      if (acrostic) payload.acrostic = acrostic; // its length sets the number of rows
      else payload.line_num = rows;
      if (fields.temperature.value.trim()) payload.temperature = Number(fields.temperature.value);
      if (fields.seed.value.trim()) payload.seed = Number(fields.seed.value);

      text.replaceChildren();
      text.setAttribute("aria-busy", "true");
      try {
        const response = await api("/poem/stream", {
          method: "POST",
          headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
          body: JSON.stringify(payload),
        });
        if (!response.ok) throw new ApiError(response.status, await bodyOf(response));
        let poem = null;
        for await (const { event, data } of events(response)) {
          if (event === "char") {
            text.append(h("span", { class: "ch" }, data.char));
            if (data.char === "。") text.append(h("br"));
          } else if (event === "poem") {
            poem = data;
          } else if (event === "error") {
            throw new ApiError(response.status, data, "The stream stopped:");
          }
        }
        if (!poem) throw new Error("the stream ended before the whole poem came");
        show(result, ...poemAnswer(poem, fields.seed));
      } finally {
        text.setAttribute("aria-busy", "false");
      }
    });
  }

  function poemAnswer(poem, seedField) {
    const keep = h("button", { type: "button", class: "secondary small" }, "Use this seed");
    keep.addEventListener("click", () => {
      seedField.value = String(poem.seed);
      seedField.focus();
    });
    return [
      h("p", { class: "visually-hidden" }, `The poem: ${poem.poem}`),
      h("p", {}, `Seed ${poem.seed}: the same seed and settings write this poem again. `, keep),
      poem.pattern ? tones(poem) : null,
    ];
  }

  /** Regulated verse: each character's tone as placed against the pattern's, and the rhyme group. */
  function tones(poem) {
    const pattern = poem.pattern;
    const clauses = poem.lines.join("").split(/[，。]/).filter(Boolean);
    const width = Math.max(...pattern.clauses.map((clause) => clause.standard.length));
    const head = h("tr", {}, h("th", { scope: "col" }, "Clause"),
      Array.from({ length: width }, (_, i) => h("th", { scope: "col" }, String(i + 1))));
    const rows = pattern.clauses.map((clause, k) => h("tr", {}, h("th", { scope: "row" }, String(k + 1)),
      Array.from(clause.standard, (standard, i) => {
        const tone = clause.tones[i] || "?";
        const off = tone !== standard && tone !== "?";
        return h("td", { class: off ? "off" : tone === "?" ? "unknown" : null },
          h("span", { class: "ch", lang: "zh" }, (clauses[k] || "")[i] || ""),
          h("span", { class: `tone ${tone === "平" ? "ping" : tone === "仄" ? "ze" : ""}` }, tone),
          h("span", { class: "std" }, standard),
          off ? h("span", { class: "visually-hidden" }, " (departs from the pattern)") : null);
      })));
    return h("div", { class: "meter" },
      h("p", {}, "Regulated verse: ", h("strong", { lang: "zh" }, pattern.name), " · rhyme group ",
        h("strong", { lang: "zh" }, pattern.rhyme_group), ` · ${pattern.strictness}`),
      h("p", { id: "poem-tones-note", class: "note" }, "Each character, its tone as placed (平 level, 仄 oblique) and, ",
        "below it, the pattern's; an outlined cell departs from the pattern where the rule allows it."),
      h("div", { class: "table-scroll" }, h("table", { class: "tones", "aria-describedby": "poem-tones-note" },
        h("caption", { class: "visually-hidden" }, "Tones against the pattern"), h("thead", {}, head), h("tbody", {}, rows))));
  }

  // ---- the models listing -----------------------------------------------------------------------------------

  const builders = { "phone-price": setUpPhone, "house-price": setUpHouse, fashion: setUpFashion, poem: setUpPoem };
  const built = new Set();

  async function loadModels() {
    const status = $("#models-status");
    status.textContent = "Loading the models…";
    let listing;
    try {
      const response = await api("/models");
      listing = await bodyOf(response);
      if (!response.ok) throw new ApiError(response.status, listing, `The models could not be listed (${response.status}):`);
    } catch (error) {
      status.textContent = `${error.heading || "The models could not be listed:"} ${problems(error).map((p) => p.text).join("; ")}` +
        (error.status === 401 ? " Type the key in the API key field above." : "");
      return;
    }
    const byName = new Map(listing.map((model) => [model.name, model]));
    const ready = [];
    for (const section of document.querySelectorAll("section[data-model]")) {
      const name = section.dataset.model;
      const model = byName.get(name);
      const meta = section.querySelector(".meta");
      const usable = model && model.state === "ready";
      if (usable) ready.push(name);
      show(meta, 
        h("code", {}, name),
        model ? ` · version ${model.version}` : " · not served by this server",
        model && !usable ? ` · ${model.state}${model.reason ? `: ${model.reason}` : ""}` : null,
        model && model.report ? [" · ", h("a", { href: model.report }, "training report")] : null,
      );
      for (const button of section.querySelectorAll("button")) button.disabled = !usable;
      if (usable && !built.has(name)) {
        builders[name](model);
        built.add(name);
      }
    }
    status.textContent = ready.length
      ? `Serving ${ready.join(", ")}.`
      : "No model is ready on this server yet.";
  }

  // ---- the key ----------------------------------------------------------------------------------------------

  const keyInput = $("#api-key");
  keyInput.value = apiKey();
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    typedKey = keyInput.value.trim();
    try {
      if (typedKey) sessionStorage.setItem(KEY_STORE, typedKey);
      else sessionStorage.removeItem(KEY_STORE);
    } catch {
      // storage switched off: the key lives in typedKey for this page's life
    }
    loadModels();
  });

  loadModels();
})();
