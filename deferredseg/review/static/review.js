"use strict";
// The review page of one expert: loads the next task of the queue, shows the crop
// with window/level and the model's proposal, and sends accept / edit / reject.
(function () {
  const parts = location.pathname.split("/").filter(Boolean);
  const expert = decodeURIComponent(parts[1] || "");
  const token = new URLSearchParams(location.search).get("token") || "";
  const headers = token ? { "X-Review-Token": token } : {};
  const api = (p) => "/api/experts/" + encodeURIComponent(expert) + p;
  const $ = (id) => document.getElementById(id);
  const COLORS = [null, [255, 64, 64], [64, 160, 255], [64, 220, 96], [255, 160, 32],
                  [200, 80, 255], [32, 224, 224], [255, 96, 192], [160, 160, 64], [128, 128, 255]];
  const canvas = $("canvas"), ctx = canvas.getContext("2d");
  const state = { task: null, img: null, prop: null, region: null, edit: null, dims: [1, 1, 1],
                  slice: 0, tool: "brush", undo: [], painting: false, scale: 1, busy: false };

  $("expert").textContent = expert;

  function message(text, isError) {
    $("message").textContent = text || "";
    $("message").className = isError ? "error" : "";
  }

  async function request(url, options) {
    const r = await fetch(url, Object.assign({ headers: headers }, options || {}));
    if (!r.ok) {
      let why = r.statusText, body = null;
      try { body = await r.json(); why = body.error || why; } catch (e) { /* not JSON */ }
      const err = new Error(why + " (" + r.status + ")");
      err.status = r.status;
      err.body = body;
      throw err;
    }
    return r;
  }

  // a request that changes state: JSON (the server refuses anything else, so that a page of
  // another site cannot send one without the browser asking the server first)
  function post(url, body) {
    return request(url, {
      method: "POST", headers: Object.assign({ "Content-Type": "application/json" }, headers),
      body: JSON.stringify(body) });
  }

  function showCounts(c) {
    $("counts").textContent = c.left + " left of " + c.total + " (" + c.done + " done)";
  }

  async function next(after) {
    document.body.dataset.state = "loading";
    const q = await (await request(api("/queue?after=" + (after || 0)))).json();
    showCounts(q.counts);
    if (q.next === null) {
      $("main").hidden = true;
      $("empty").textContent = q.counts.total ? "No tasks left in your queue. Thank you!"
        : "There are no tasks for you in this folder.";
      $("empty").hidden = false;
      document.body.dataset.state = "empty";
      document.body.dataset.task = "";
      return;
    }
    await load(q.next);
  }

  async function load(id) {
    const t = await (await request(api("/tasks/" + id))).json();
    const buf = await (await request(api("/tasks/" + id + "/data"))).arrayBuffer();
    const s = t.crop_shape;
    const n = s.reduce((a, b) => a * b, 1);
    state.task = t;
    state.img = new Float32Array(buf.slice(0, 4 * n));
    state.prop = new Uint8Array(buf, 4 * n, n);
    state.region = new Uint8Array(buf, 5 * n, n);
    state.edit = Uint8Array.from(state.prop);
    state.dims = [s[0], s.length > 1 ? s[1] : 1, s.length > 2 ? s[2] : 1];
    state.undo = [];
    // start on the slice where the region is largest
    let best = 0, bestCount = -1;
    for (let k = 0; k < state.dims[2]; k++) {
      let c = 0;
      for (let i = 0; i < state.dims[0] * state.dims[1]; i++) c += state.region[i * state.dims[2] + k];
      if (c > bestCount) { bestCount = c; best = k; }
    }
    state.slice = best;
    $("slicebar").hidden = state.dims[2] <= 1;
    $("slice").max = state.dims[2] - 1;
    $("slice").value = best;
    const it = t.intensity;
    for (const el of [$("level"), $("width")]) { el.min = 0; }
    const span = Math.max(it.max - it.min, 1e-6);
    $("level").min = it.min; $("level").max = it.max; $("level").value = (it.lo + it.hi) / 2;
    $("width").min = span / 100; $("width").max = 2 * span; $("width").value = Math.max(it.hi - it.lo, span / 100);
    const sel = $("label");
    sel.innerHTML = "";
    for (let l = 1; l < t.num_labels; l++) {
      const o = document.createElement("option");
      o.value = l; o.textContent = String(l);
      sel.appendChild(o);
    }
    $("taskinfo").innerHTML = "";
    const axes = ["rows", "columns", "slices"];
    const info = [["task", t.id], ["image", t.image], ["area", t.area + " px"],
                  ["box", t.bbox.map((b, k) => (axes[k] || "axis " + k) + " " + b[0] + "-" + (b[1] - 1))
                    .join(", ")]];
    for (const [k, v] of info) {
      const d = document.createElement("div");
      const b = document.createElement("b");
      b.textContent = k + ": ";
      d.appendChild(b);
      d.appendChild(document.createTextNode(String(v)));
      $("taskinfo").appendChild(d);
    }
    state.scale = Math.max(1, Math.floor(512 / Math.max(state.dims[0], state.dims[1])));
    canvas.width = state.dims[1] * state.scale;
    canvas.height = state.dims[0] * state.scale;
    draw();
    message(t.answer ? "Already answered (" + t.answer + "); a new answer replaces it." : "");
    // the answer's time counts from this opening (a GET records nothing)
    await post(api("/tasks/" + id + "/open"), {});
    document.body.dataset.task = String(t.id);
    document.body.dataset.state = "ready";
  }

  const idx = (i, j) => (i * state.dims[1] + j) * state.dims[2] + state.slice;

  function draw() {
    const [H, W] = state.dims;
    const level = parseFloat($("level").value), width = parseFloat($("width").value);
    const lo = level - width / 2;
    const im = ctx.createImageData(W, H);
    for (let i = 0; i < H; i++) {
      for (let j = 0; j < W; j++) {
        const p = idx(i, j), o = 4 * (i * W + j);
        let g = Math.round(255 * Math.min(1, Math.max(0, (state.img[p] - lo) / width)));
        let rgb = [g, g, g];
        const l = state.edit[p];
        if (l > 0) {
          const c = COLORS[l % COLORS.length] || COLORS[1];
          rgb = rgb.map((v, k) => Math.round(0.55 * v + 0.45 * c[k]));
        }
        im.data[o] = rgb[0]; im.data[o + 1] = rgb[1]; im.data[o + 2] = rgb[2]; im.data[o + 3] = 255;
      }
    }
    const off = document.createElement("canvas");
    off.width = W; off.height = H;
    off.getContext("2d").putImageData(im, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, 0, 0, W * state.scale, H * state.scale);
    // the region's outline, on the pixel borders
    const sc = state.scale, inside = (i, j) => i >= 0 && i < H && j >= 0 && j < W && state.region[idx(i, j)];
    ctx.strokeStyle = "#ffe600";
    ctx.lineWidth = Math.max(1, Math.round(sc / 8));
    ctx.beginPath();
    for (let i = 0; i < H; i++) {
      for (let j = 0; j < W; j++) {
        if (!inside(i, j)) continue;
        if (!inside(i - 1, j)) { ctx.moveTo(j * sc, i * sc); ctx.lineTo((j + 1) * sc, i * sc); }
        if (!inside(i + 1, j)) { ctx.moveTo(j * sc, (i + 1) * sc); ctx.lineTo((j + 1) * sc, (i + 1) * sc); }
        if (!inside(i, j - 1)) { ctx.moveTo(j * sc, i * sc); ctx.lineTo(j * sc, (i + 1) * sc); }
        if (!inside(i, j + 1)) { ctx.moveTo((j + 1) * sc, i * sc); ctx.lineTo((j + 1) * sc, (i + 1) * sc); }
      }
    }
    ctx.stroke();
    $("sliceval").textContent = (state.slice + 1) + " / " + state.dims[2];
  }

  function setTool(tool) {
    state.tool = tool;
    $("brush").classList.toggle("active", tool === "brush");
    $("eraser").classList.toggle("active", tool === "eraser");
  }

  function paintAt(ev) {
    const r = canvas.getBoundingClientRect();
    const x = (ev.clientX - r.left) * (canvas.width / r.width) / state.scale;
    const y = (ev.clientY - r.top) * (canvas.height / r.height) / state.scale;
    const rad = parseInt($("size").value, 10) / 2;
    const value = state.tool === "brush" ? parseInt($("label").value || "1", 10) : 0;
    const [H, W] = state.dims;
    for (let i = Math.max(0, Math.floor(y - rad)); i <= Math.min(H - 1, Math.floor(y + rad)); i++) {
      for (let j = Math.max(0, Math.floor(x - rad)); j <= Math.min(W - 1, Math.floor(x + rad)); j++) {
        const dy = i + 0.5 - y, dx = j + 0.5 - x;
        const p = idx(i, j);
        if (dx * dx + dy * dy <= rad * rad + 0.25 && state.region[p]) state.edit[p] = value;
      }
    }
    draw();
  }

  canvas.addEventListener("mousedown", (ev) => {
    if (!state.task) return;
    state.undo.push(Uint8Array.from(state.edit));
    state.painting = true;
    paintAt(ev);
  });
  canvas.addEventListener("mousemove", (ev) => { if (state.painting) paintAt(ev); });
  window.addEventListener("mouseup", () => { state.painting = false; });
  canvas.addEventListener("wheel", (ev) => {
    if (state.dims[2] <= 1) return;
    ev.preventDefault();
    setSlice(state.slice + (ev.deltaY > 0 ? 1 : -1));
  }, { passive: false });

  function setSlice(k) {
    state.slice = Math.min(state.dims[2] - 1, Math.max(0, k));
    $("slice").value = state.slice;
    draw();
  }

  function undo() {
    if (state.undo.length) { state.edit = state.undo.pop(); draw(); }
  }

  function toBase64(bytes) {
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return btoa(s);
  }

  async function answer(action) {
    if (!state.task || state.busy) return;
    state.busy = true;
    document.body.dataset.state = "sending";
    try {
      // the version this answer was made on: if the task was answered meanwhile (another tab,
      // another person), the server refuses it with 409 and the current answer
      const body = { action: action, base: state.task.version };
      if (action === "edited") { body.mask = toBase64(state.edit); body.shape = state.task.crop_shape; }
      const res = await (await post(api("/tasks/" + state.task.id + "/answer"), body)).json();
      showCounts(res.counts);
      await next(res.task);
    } catch (err) {
      if (err.status === 409 && err.body) {
        const cur = err.body.current;
        // the next send is made knowingly on the current version
        state.task.version = cur ? cur.answer : null;
        message("This task was answered meanwhile" + (cur ? " (" + cur.action + ")" : "") +
                ", in another tab or by someone else. Press again to replace that answer " +
                "with yours.", true);
        document.body.dataset.state = "conflict";
      } else {
        message(err.message, true);
        document.body.dataset.state = "ready";
      }
    } finally {
      state.busy = false;
    }
  }

  $("brush").addEventListener("click", () => setTool("brush"));
  $("eraser").addEventListener("click", () => setTool("eraser"));
  $("undo").addEventListener("click", undo);
  $("accept").addEventListener("click", () => answer("accepted"));
  $("save").addEventListener("click", () => answer("edited"));
  $("reject").addEventListener("click", () => answer("rejected"));
  $("slice").addEventListener("input", () => setSlice(parseInt($("slice").value, 10)));
  $("level").addEventListener("input", draw);
  $("width").addEventListener("input", draw);

  document.addEventListener("keydown", (ev) => {
    if (ev.target && ev.target.tagName === "SELECT") return;
    const k = ev.key.toLowerCase();
    if ((ev.ctrlKey || ev.metaKey) && k === "z") { ev.preventDefault(); undo(); return; }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (k === "a") answer("accepted");
    else if (k === "s") answer("edited");
    else if (k === "r") answer("rejected");
    else if (k === "b") setTool("brush");
    else if (k === "e") setTool("eraser");
    else if (k === "u") undo();
    else if (k === "[") $("size").value = Math.max(1, parseInt($("size").value, 10) - 1);
    else if (k === "]") $("size").value = Math.min(20, parseInt($("size").value, 10) + 1);
    else if (k === "arrowup" || k === "arrowright") setSlice(state.slice + 1);
    else if (k === "arrowdown" || k === "arrowleft") setSlice(state.slice - 1);
    else if (/^[1-9]$/.test(k) && state.task && parseInt(k, 10) < state.task.num_labels) $("label").value = k;
  });

  next(0).catch((err) => { message(err.message, true); document.body.dataset.state = "error"; });
})();
