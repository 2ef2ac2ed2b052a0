// The admin UI in the browser: actions call the API behind the session cookie (/ui/api),
// live parts refresh when the server says the log moved, and "Expand all" opens every event.
(() => {
  "use strict";

  const FLASH_KEY = "refract-flash";

  function flash(message, failed) {
    const box = document.getElementById("flash");
    if (!box) return;
    box.textContent = message;
    box.className = failed ? "failure" : "success";
  }

  // A message that survives the reload an action ends with.
  function flashAfterReload(message, failed) {
    sessionStorage.setItem(FLASH_KEY, JSON.stringify({message, failed}));
  }

  async function call(method, path, body, contentType) {
    const headers = {"X-Refract-UI": "1"};
    if (contentType) headers["Content-Type"] = contentType;
    const response = await fetch("/ui/api" + path, {method, headers, body, credentials: "same-origin"});
    const text = await response.text();
    let json = null;
    try { json = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
    return {ok: response.ok, status: response.status, json, text};
  }

  function describe(answer) {
    if (answer.ok) return "done";
    const message = answer.json && answer.json.message ? answer.json.message : answer.text;
    return `${answer.status} ${message}`;
  }

  function refreshLive() {
    if (!window.htmx) return;
    for (const part of document.querySelectorAll("[data-live]")) htmx.trigger(part, "live");
  }

  // "Expand all": every event's JSON. Across live refreshes, that, each event opened by hand
  // and the focus stay where they were (rows are found again by their `data-key`).
  let expanded = false;
  let openKeys = new Set();
  let refocus = null;
  function applyExpanded(root) {
    for (const details of root.querySelectorAll("details")) {
      const row = details.closest("[data-key]");
      details.open = expanded || (row !== null && openKeys.has(row.dataset.key));
    }
  }
  function focusSelector(active) {
    const row = active.closest("[data-key]");
    const scope = row ? `[data-key="${CSS.escape(row.dataset.key)}"] ` : "";
    if (active.id) return "#" + CSS.escape(active.id);
    if (active.matches("summary")) return scope + "summary";
    if (active.matches("a[href]")) return `${scope}a[href="${CSS.escape(active.getAttribute("href"))}"]`;
    return null;
  }
  document.addEventListener("htmx:beforeSwap", (event) => {
    const target = event.detail.target;
    openKeys = new Set(
      [...target.querySelectorAll("[data-key]")]
        .filter((row) => row.querySelector("details[open]"))
        .map((row) => row.dataset.key));
    const active = document.activeElement;
    refocus = active && target.contains(active) ? focusSelector(active) : null;
  });
  document.addEventListener("htmx:afterSwap", () => {
    if (!refocus) return;
    const again = document.querySelector(refocus);
    refocus = null;
    if (again) again.focus({preventScroll: true});
  });

  document.addEventListener("click", async (event) => {
    const toggle = event.target.closest("button[data-expand-all]");
    if (toggle) {
      expanded = !expanded;
      toggle.setAttribute("aria-pressed", String(expanded));
      if (!expanded) openKeys.clear();
      applyExpanded(document);
      return;
    }
    const button = event.target.closest("button[data-path]");
    if (!button) return;
    const {method, path, confirm: question, then} = button.dataset;
    if (question && !window.confirm(question)) return;
    button.disabled = true;
    try {
      const answer = await call(method, path);
      const message = `${button.textContent.trim()}: ${describe(answer)}`;
      if (answer.ok) {
        flashAfterReload(message, false);
        if (then) location.href = then;
        else location.reload();
      } else {
        flash(message, true);
      }
    } catch (error) {
      flash(`${button.textContent.trim()}: ${error}`, true);
    } finally {
      button.disabled = false;
    }
  });

  function convert(value, type) {
    if (type === "number") return Number(value);
    if (type === "bool") return value === "true";
    if (type === "position") return /^\d+$/.test(value) ? Number(value) : value;
    return value;
  }

  function strategyOf(form) {
    const kind = form.elements.strategy.value;
    const sharder = form.elements.sharder.value.trim();
    if (kind === "sharded") return {sharded: sharder};
    if (kind === "partitioned") {
      return {partitioned: {sharder, partitions: Number(form.elements.partitions.value)}};
    }
    return kind;
  }

  // Forms that call the API: `data-path` with {field} from `data-in="path"` fields, query
  // fields, a JSON body of `data-in="json"` fields, or a raw body (a file or a text).
  document.addEventListener("submit", async (event) => {
    const form = event.target.closest("form[data-api]");
    if (!form) return;
    event.preventDefault();
    const output = form.querySelector("output");
    let path = form.dataset.path;
    let then = form.dataset.then || "";
    const query = new URLSearchParams();
    const json = {};
    let jsonBody = form.dataset.kind === "group";
    let body = null;
    let contentType = null;
    for (const field of form.elements) {
      if (!field.name || !field.dataset.in) continue;
      const value = field.type === "checkbox" ? String(field.checked) : field.value.trim();
      switch (field.dataset.in) {
        case "path":
          path = path.replaceAll(`{${field.name}}`, encodeURIComponent(value));
          then = then.replaceAll(`{${field.name}}`, encodeURIComponent(value));
          break;
        case "query":
          if (value !== "") query.set(field.name, value);
          break;
        case "json":
          jsonBody = true;
          if (value !== "") json[field.name] = convert(value, field.dataset.type);
          break;
        case "body":
          if (field.type === "file") {
            body = field.files[0];
            contentType = "application/wasm";
          } else {
            body = field.value;
            contentType = "application/json";
          }
          break;
      }
    }
    if (form.dataset.kind === "group") json.strategy = strategyOf(form);
    if (jsonBody) {
      body = JSON.stringify(json);
      contentType = "application/json";
    }
    const search = query.toString();
    if (search) path += (path.includes("?") ? "&" : "?") + search;
    const method = form.getAttribute("method").toUpperCase();
    const submit = form.querySelector("button[type=submit]");
    if (submit) submit.disabled = true;
    if (output) output.textContent = "Working…";
    try {
      const answer = await call(method, path, body, contentType);
      if (!answer.ok) {
        if (output) output.textContent = describe(answer);
        if (output) output.className = "failure";
        return;
      }
      if (then === "show") {
        output.className = "success";
        output.textContent = answer.text;
      } else if (then) {
        flashAfterReload(`${submit ? submit.textContent.trim() : "Saved"}: done`, false);
        location.href = then;
      } else {
        flashAfterReload(`${submit ? submit.textContent.trim() : "Saved"}: done`, false);
        location.reload();
      }
    } catch (error) {
      if (output) {
        output.textContent = String(error);
        output.className = "failure";
      }
    } finally {
      if (submit) submit.disabled = false;
    }
  });

  // Live parts: one connection to the server's notices while the page has any.
  let source = null;
  let pending = false;
  function connect() {
    if (source || !document.querySelector("[data-live]")) return;
    source = new EventSource("/ui/live");
    source.addEventListener("head", () => {
      if (pending) return;
      pending = true;
      setTimeout(() => { pending = false; refreshLive(); }, 0);
    });
  }

  // A browser gives a site few connections at a time (six over HTTP/1.1): only a page in view
  // holds one, and a page kept for "back" lets its go.
  function disconnect() {
    if (source) source.close();
    source = null;
  }
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      disconnect();
    } else {
      connect();
      refreshLive();
    }
  });
  window.addEventListener("pagehide", disconnect);
  window.addEventListener("pageshow", (event) => {
    if (event.persisted) {
      connect();
      refreshLive();
    }
  });

  document.addEventListener("htmx:afterSwap", (event) => applyExpanded(event.target));
  document.addEventListener("DOMContentLoaded", () => {
    const saved = sessionStorage.getItem(FLASH_KEY);
    if (saved) {
      sessionStorage.removeItem(FLASH_KEY);
      const {message, failed} = JSON.parse(saved);
      flash(message, failed);
    }
    connect();
  });
})();
