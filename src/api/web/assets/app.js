// perfbox's page script: the token (kept in this tab's sessionStorage), live refresh of the
// parts marked data-live, local times, log streaming, submit and cancel through the JSON API.
// Plain JavaScript, no dependencies; served from the binary.
"use strict";

(function () {
  const KEY = "perfbox-token";
  const body = document.body;
  const tokensOn = body.dataset.tokens === "on";
  const token = () => sessionStorage.getItem(KEY);
  const authHeaders = () => {
    const t = token();
    return tokensOn && t ? { Authorization: "Bearer " + t } : {};
  };
  const lastHtml = new Map(); // id of a live part -> the HTML it was last given
  let timer = null;
  let logStarted = false;

  // Times: the server writes UTC; show the viewer's local time (UTC stays in the title).
  function localTimes(root) {
    for (const el of root.querySelectorAll("time[datetime]")) {
      const d = new Date(el.getAttribute("datetime"));
      if (isNaN(d)) continue;
      el.title = el.textContent;
      el.textContent = d.toLocaleString();
    }
  }

  function showTokenForm(message) {
    const form = document.getElementById("token-form");
    if (!form) return;
    form.hidden = false;
    document.getElementById("token-error").textContent = message || "";
    document.getElementById("forget").hidden = true;
    document.getElementById("token").focus();
  }

  function remember(root) {
    for (const part of root.querySelectorAll("[data-live][id]")) lastHtml.set(part.id, part.outerHTML);
  }

  function pollDelay(root) {
    const el = root.querySelector("[data-poll]");
    return el ? Number(el.dataset.poll) || 0 : 0;
  }

  // Fetch this page again (with the token) and put in what changed. The first time after a
  // page came without data (body[data-shell]), the whole main part is replaced.
  async function refresh() {
    clearTimeout(timer);
    let resp;
    try {
      resp = await fetch(location.pathname + location.search, {
        headers: Object.assign({ Accept: "text/html" }, authHeaders()),
        cache: "no-store",
      });
    } catch (e) {
      timer = setTimeout(refresh, 5000); // the server is away: try again later
      return;
    }
    const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
    if (resp.status === 401) {
      sessionStorage.removeItem(KEY);
      const err = doc.querySelector("#content .error");
      showTokenForm(err ? err.textContent : "The token was refused.");
      return;
    }
    const fresh = doc.getElementById("main");
    if (!fresh) return;
    if (body.dataset.shell && !doc.body.dataset.shell) {
      delete body.dataset.shell;
      remember(fresh);
      const main = document.getElementById("main");
      main.replaceChildren(...Array.from(fresh.childNodes, (n) => document.importNode(n, true)));
      localTimes(main);
    }
    for (const part of doc.querySelectorAll("[data-live][id]")) {
      const here = document.getElementById(part.id);
      if (!here) continue;
      if (lastHtml.get(part.id) === part.outerHTML) continue;
      lastHtml.set(part.id, part.outerHTML);
      const copy = document.importNode(part, true);
      here.replaceWith(copy);
      localTimes(copy);
    }
    const title = doc.querySelector("title");
    if (title) document.title = title.textContent;
    const forget = document.getElementById("forget");
    if (forget && token()) forget.hidden = false;
    startLog();
    const delay = pollDelay(fresh);
    if (delay > 0) timer = setTimeout(refresh, document.hidden ? delay * 5 : delay);
  }

  // The job's logs, streamed from GET /job/{id}/logs?follow=1 as they are written.
  async function startLog() {
    const pre = document.getElementById("log");
    if (!pre || logStarted || body.dataset.shell) return;
    logStarted = true;
    const MAX = 2 * 1024 * 1024; // characters kept on the page
    try {
      const resp = await fetch(pre.dataset.src, { headers: authHeaders(), cache: "no-store" });
      if (!resp.ok) {
        pre.textContent = "(no logs: " + resp.status + " " + (await resp.text()) + ")";
        return;
      }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        pre.append(decoder.decode(value, { stream: true }));
        if (pre.textContent.length > MAX) {
          pre.textContent = "[earlier lines cut: the full log is at " + pre.dataset.src.replace("?follow=1", "") + "]\n" +
            pre.textContent.slice(-MAX / 2);
        }
        if (atEnd) pre.scrollTop = pre.scrollHeight;
      }
      pre.dataset.complete = "1";
    } catch (e) {
      pre.append("\n(log stream ended: " + e + ")");
    }
  }

  // The submit form: POST /job/build with the token, then the job's page.
  async function submit(ev) {
    ev.preventDefault();
    const form = ev.target;
    const out = document.getElementById("submit-error");
    out.textContent = "";
    const data = new FormData();
    const file = form.elements.file.files[0];
    const context = form.elements.context.files[0];
    if (!file && !context) {
      out.textContent = "Choose a Dockerfile, or a build context holding one.";
      return;
    }
    if (file) data.append("file", file, file.name);
    if (context) data.append("context", context, context.name);
    for (const line of document.getElementById("build-args").value.split("\n")) {
      if (line.trim()) data.append("build_arg", line.trim());
    }
    for (const name of ["dataset", "target", "callback_url"]) {
      const el = form.elements[name];
      if (el && el.value.trim()) data.append(name, el.value.trim());
    }
    const button = document.getElementById("submit");
    button.disabled = true;
    try {
      const resp = await fetch("/job/build", { method: "POST", headers: authHeaders(), body: data });
      const answer = await resp.json().catch(() => ({}));
      if (resp.status === 401) {
        sessionStorage.removeItem(KEY);
        showTokenForm(answer.error);
      }
      if (!resp.ok) {
        out.textContent = (answer.error || "the server answered " + resp.status);
        return;
      }
      location.assign("/job/" + answer.id + "/view");
    } catch (e) {
      out.textContent = "Could not reach the server: " + e;
    } finally {
      button.disabled = false;
    }
  }

  // Cancel: DELETE /job/{id}, then show the new state.
  async function cancel(button) {
    button.disabled = true;
    const resp = await fetch("/job/" + button.dataset.job, { method: "DELETE", headers: authHeaders() });
    if (!resp.ok) {
      const answer = await resp.json().catch(() => ({}));
      button.insertAdjacentText("afterend", " " + (answer.error || resp.status));
    }
    refresh();
  }

  document.addEventListener("click", (ev) => {
    const t = ev.target;
    if (t.id === "cancel") cancel(t);
    if (t.id === "forget") {
      sessionStorage.removeItem(KEY);
      location.reload();
    }
  });
  document.addEventListener("submit", (ev) => {
    if (ev.target.id === "submit-form") submit(ev);
    if (ev.target.id === "token-form") {
      ev.preventDefault();
      sessionStorage.setItem(KEY, document.getElementById("token").value.trim());
      document.getElementById("token").value = "";
      ev.target.hidden = true;
      refresh();
    }
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && !body.dataset.shell && pollDelay(document) > 0) refresh();
  });

  remember(document);
  localTimes(document);
  if (tokensOn && !token()) {
    showTokenForm();
  } else if (tokensOn) {
    // The page came without data: fetch it with the token (and say so meanwhile).
    const content = document.getElementById("content");
    if (content && body.dataset.shell) {
      const note = document.createElement("p");
      note.textContent = "Loading with your token…";
      content.replaceChildren(note);
    }
    refresh();
  } else {
    startLog();
    const delay = pollDelay(document);
    if (delay > 0) timer = setTimeout(refresh, delay);
  }
})();
