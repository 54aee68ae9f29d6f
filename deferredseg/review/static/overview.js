"use strict";
// The overview: every expert's workload and progress, and the complete images; refreshed live.
(function () {
  const token = new URLSearchParams(location.search).get("token") || "";
  const headers = token ? { "X-Review-Token": token } : {};
  const $ = (id) => document.getElementById(id);

  function cell(tr, content) {
    const td = document.createElement("td");
    if (content instanceof Node) td.appendChild(content); else td.textContent = String(content);
    tr.appendChild(td);
  }

  async function refresh() {
    try {
      const r = await fetch("/api/overview", { headers: headers });
      const data = await r.json();
      if (!r.ok) throw new Error(data.error || r.statusText);
      const body = $("experts").querySelector("tbody");
      body.innerHTML = "";
      for (const e of data.experts) {
        const tr = document.createElement("tr");
        let name = document.createTextNode(e.name);
        if (data.links && data.links[e.name]) {
          name = document.createElement("a");
          name.href = data.links[e.name];
          name.textContent = e.name;
        }
        cell(tr, name);
        cell(tr, e.total); cell(tr, e.done); cell(tr, e.left);
        const bar = document.createElement("progress");
        bar.max = Math.max(e.total, 1); bar.value = e.done;
        const pct = document.createElement("span");
        pct.textContent = " " + (e.total ? Math.round(100 * e.done / e.total) + " %" : "no tasks");
        const both = document.createElement("span");
        both.appendChild(bar); both.appendChild(pct);
        cell(tr, both);
        cell(tr, e.pixels);
        body.appendChild(tr);
      }
      const done = data.complete_images;
      $("summary").textContent = done.length + " of " + data.images + " images complete";
      $("complete").textContent = done.length ? done.join(", ") : "none yet";
      $("message").textContent = "";
      document.body.dataset.state = "ready";
    } catch (err) {
      $("message").textContent = err.message;
      $("message").className = "error";
    }
  }

  refresh();
  setInterval(refresh, 2000);
})();
