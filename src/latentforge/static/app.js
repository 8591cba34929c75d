// The latentforge page: a form over POST /sdapi/v1/txt2img, watching GET /sdapi/v1/progress meanwhile.
"use strict";

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const PNG = "data:image/png;base64,";

// One API call; a non-2xx answer becomes an Error with the server's message (422s name the field).
async function api(path, options) {
  const response = await fetch("sdapi/v1/" + path, options);
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = body && body.detail;
    const text = Array.isArray(detail)
      ? detail.map((e) => `${e.loc.slice(1).join(".")}: ${e.msg}`).join("; ")
      : detail || `HTTP ${response.status}`;
    throw new Error(text);
  }
  return body;
}

// The img2img panel as A1111's img2img fields (with a mask, its inpainting ones), or null without an image
async function img2imgFields() {
  const image = $("init_image").files[0];
  if (!image) return null;
  const fields = {
    init_images: [await readAsDataURL(image)],
    denoising_strength: Number($("img2img_strength").value),
    resize_mode: Number($("resize_mode").value),
  };
  const mask = $("mask").files[0];
  if (mask) {
    Object.assign(fields, {
      mask: await readAsDataURL(mask),
      inpainting_fill: Number($("inpainting_fill").value),
      inpaint_full_res: $("inpaint_full_res").value === "true",
      inpaint_full_res_padding: Number($("inpaint_full_res_padding").value),
      mask_blur: Number($("mask_blur").value),
    });
  }
  return fields;
}

// The form as an A1111 request: fields left empty are left out (the model's defaults).
function request() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    seed: $("seed").value === "" ? -1 : Number($("seed").value),
  };
  if ($("sampler").value) body.sampler_name = $("sampler").value;
  for (const id of ["steps", "cfg_scale", "width", "height"]) {
    if ($(id).value !== "") body[id] = Number($(id).value);
  }
  if ($("refiner_checkpoint").value) {
    body.refiner_checkpoint = $("refiner_checkpoint").value;
    body.refiner_switch_at = Number($("refiner_switch_at").value);
  }
  body.override_settings = { randn_source: $("randn_source").value };
  if ($("fast").checked) body.override_settings.speed_preset = "fast";
  if ($("tiling").checked) body.tiling = true;
  if (Number($("subseed_strength").value) > 0) {
    body.subseed = $("subseed").value === "" ? -1 : Number($("subseed").value);
    body.subseed_strength = Number($("subseed_strength").value);
  }
  for (const id of ["seed_resize_from_w", "seed_resize_from_h"]) body[id] = Number($(id).value || 0);
  if ($("enable_hr").checked) {
    body.enable_hr = true;
    body.hr_upscaler = $("hr_upscaler").value;
    for (const id of ["hr_scale", "denoising_strength", "hr_second_pass_steps"]) body[id] = Number($(id).value);
  }
  return body;
}

let lastPreview = null;

async function showProgress() {
  const p = await api("progress");
  $("progress").value = p.progress;
  $("status").textContent = p.textinfo || (p.state.queued ? "waiting in the queue" : "starting");
  if (p.current_image && p.current_image !== lastPreview) {
    lastPreview = p.current_image;
    $("preview").src = PNG + p.current_image;
    const frame = new Image();
    frame.src = PNG + p.current_image;
    frame.title = frame.alt = p.textinfo;
    $("frames").append(frame);
  }
}

function addToGallery(result) {
  const info = JSON.parse(result.info);
  result.images.forEach((data, i) => {
    const figure = document.createElement("figure");
    const image = new Image();
    image.src = PNG + data;
    image.alt = info.prompt;
    const caption = document.createElement("figcaption");
    caption.textContent = info.infotexts[i];
    figure.append(image, caption);
    $("gallery").prepend(figure);
  });
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function generate(event) {
  event.preventDefault();
  showError("");
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("live").hidden = false;
  $("frames").replaceChildren();
  $("preview").removeAttribute("src");
  $("progress").value = 0;
  lastPreview = null;
  let finished = false;
  const job = (async () => {
    const body = request();
    const img2img = await img2imgFields();
    if (img2img) delete body.enable_hr;  // the hires fix is txt2img's
    return api(img2img ? "img2img" : "txt2img", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(img2img ? Object.assign(body, img2img) : body),
    });
  })().finally(() => { finished = true; });
  const watching = (async () => {
    while (!finished) {
      await showProgress().catch(() => {});
      await sleep(250);
    }
  })();
  // the final status is written after the last progress poll has landed, so that none overwrites it
  const settled = job.then((r) => watching.then(() => r), (e) => watching.then(() => { throw e; }));
  try {
    const result = await settled;
    $("progress").value = 1;
    $("status").textContent = result.images.length ? "done" : "interrupted";
    addToGallery(result);
  } catch (error) {
    $("status").textContent = "failed";
    showError(error.message);
  } finally {
    await watching;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
  }
}

function insertIntoPrompt(text) {
  const box = $("prompt");
  const start = box.selectionStart, end = box.selectionEnd;
  const before = box.value.slice(0, start), after = box.value.slice(end);
  const inserted = (before && !/\s$/.test(before) ? " " : "") + text;
  box.value = before + inserted + after;
  box.focus();
  box.selectionStart = box.selectionEnd = before.length + inserted.length;
}

function addChips(id, names, text) {
  for (const name of names) {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "chip";
    chip.textContent = name;
    chip.addEventListener("click", () => insertIntoPrompt(text(name)));
    $(id).append(chip);
  }
}

async function showNetworks() {
  const loras = (await api("loras")).map((lora) => lora.name);
  const embeddings = Object.keys((await api("embeddings")).loaded);
  addChips("loras", loras, (name) => `<lora:${name}:1>`);
  addChips("embeddings", embeddings, (name) => name);
  $("networks").hidden = loras.length + embeddings.length === 0;
}

// latentforge explain's page for the prompt, seed and steps, in a new tab (the server makes it between jobs)
function openExplain() {
  const query = new URLSearchParams({ prompt: $("prompt").value, seed: Math.max(0, Number($("seed").value || 0)) });
  if ($("steps").value !== "") query.set("steps", $("steps").value);
  window.open("explain?" + query.toString(), "_blank", "noopener");
}

// A1111's "PNG Info -> Send to txt2img": the infotext keys (as /png-info parses them) -> the form's fields
const FROM_PNG = {
  "Prompt": "prompt", "Negative prompt": "negative_prompt", "Steps": "steps", "CFG scale": "cfg_scale",
  "Seed": "seed", "Size-1": "width", "Size-2": "height", "Variation seed": "subseed",
  "Variation seed strength": "subseed_strength", "Seed resize from-1": "seed_resize_from_w",
  "Seed resize from-2": "seed_resize_from_h", "Hires upscale": "hr_scale", "Hires steps": "hr_second_pass_steps",
};

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function fromPng() {
  const file = $("png").files[0];
  if (!file) return;
  showError("");
  try {
    const answer = await api("png-info", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image: await readAsDataURL(file) }),
    });
    if (!answer.info) throw new Error(`${file.name}: no generation parameters in it`);
    const p = answer.parameters;
    for (const [key, id] of Object.entries(FROM_PNG)) if (key in p) $(id).value = p[key];
    const schedule = p["Schedule type"];
    const sampler = schedule && schedule !== "Automatic" ? `${p.Sampler} ${schedule}` : p.Sampler;
    if (sampler && ![...$("sampler").options].some((o) => o.value === sampler)) {
      throw new Error(`${file.name}: its sampler ${sampler} is not one latentforge has; the rest was filled in`);
    }
    if (sampler) $("sampler").value = sampler;
    $("tiling").checked = p.Tiling === "True";
    // no RNG written: A1111's default, GPU (latentforge's own images before it wrote one: CPU)
    $("randn_source").value = p.RNG || ((p.Version || "").startsWith("latentforge") ? "CPU" : "GPU");
    $("enable_hr").checked = "Hires upscale" in p || "Hires upscaler" in p;
    if ($("enable_hr").checked) {
      if ("Hires upscaler" in p) $("hr_upscaler").value = p["Hires upscaler"];
      if ("Denoising strength" in p) $("denoising_strength").value = p["Denoising strength"];
    }
  } catch (error) {
    showError(error.message);
  }
}

async function init() {
  $("form").addEventListener("submit", generate);
  $("png").addEventListener("change", fromPng);
  $("explain").addEventListener("click", openExplain);
  $("interrupt").addEventListener("click", () => api("interrupt", { method: "POST" }).catch(() => {}));
  try {
    for (const sampler of await api("samplers")) $("sampler").add(new Option(sampler.name, sampler.name));
    $("model").textContent = (await api("options")).sd_model_checkpoint;
    await showNetworks();
    for (const model of await api("sd-models")) $("refiner_checkpoint").add(new Option(model.title, model.title));
    const modes = (await api("latent-upscale-modes")).map((mode) => mode.name);
    const upscalers = (await api("upscalers")).map((upscaler) => upscaler.name);
    for (const name of [...modes, ...upscalers]) $("hr_upscaler").add(new Option(name, name));
  } catch (error) {
    showError(error.message);
  }
}

init();
