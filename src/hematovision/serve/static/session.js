// HematoVision pages: who is logged in, the CSRF token on state-changing requests, logging out.
"use strict";

const hv = (() => {
  function cookie(name) {
    const found = document.cookie.split("; ").find((c) => c.startsWith(`${name}=`));
    return found ? decodeURIComponent(found.slice(name.length + 1)) : "";
  }

  function toLogin() {
    location.assign(`/login?next=${encodeURIComponent(location.pathname + location.search)}`);
  }

  // fetch for the JSON API: sends the session's CSRF token with every change (the server refuses a
  // cookie-authenticated POST without it), sends the browser to the login page when the session ended,
  // and turns an error answer into an Error with the server's one-line detail.
  async function api(path, options = {}) {
    const method = (options.method || "GET").toUpperCase();
    const headers = new Headers(options.headers || {});
    if (method !== "GET" && method !== "HEAD") headers.set("X-CSRF-Token", cookie("hv_csrf"));
    const response = await fetch(path, { ...options, headers, credentials: "same-origin" });
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    if (response.status === 401) {
      toLogin();
      throw new Error("the session has ended; log in again");
    }
    if (!response.ok) {
      const detail = body && body.detail ? body.detail : `${response.status} ${response.statusText}`;
      const error = new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
      error.status = response.status;
      throw error;
    }
    return body;
  }

  // Shows who is logged in, with the logout button, in the page header.
  async function me() {
    const user = await api("/api/v1/auth/me");
    const box = document.querySelector("#user-box");
    if (box) {
      document.querySelector("#user-name").textContent =
        user.auth ? `${user.name} (${user.role})` : "local user (no login: --no-auth)";
      const form = document.querySelector("#logout-form");
      form.hidden = !user.auth;
      form.addEventListener("submit", () => {
        form.querySelector("input[name=csrf_token]").value = cookie("hv_csrf");
      });
      box.hidden = false;
    }
    return user;
  }

  return { api, cookie, me };
})();
