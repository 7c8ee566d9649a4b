// HematoVision history page: search and page through past analyses.
"use strict";

const PAGE_SIZE = 20;
const view = { page: 1, total: 0 };
const $ = (selector) => document.querySelector(selector);

async function load() {
  const params = new URLSearchParams({ page: view.page, page_size: PAGE_SIZE });
  const query = $("#search").value.trim();
  const status = $("#status-filter").value;
  if (query) params.set("q", query);
  if (status) params.set("status", status);
  let body;
  try {
    body = await hv.api(`/api/v1/analyses?${params}`);
  } catch (error) {
    $("#page-info").textContent = error.message;
    return;
  }
  view.total = body.total;
  const rows = body.items.map((item) => {
    const row = document.createElement("tr");
    const link = document.createElement("a");
    link.href = `/?analysis=${item.id}`;
    link.textContent = "Open";
    const badge = document.createElement("span");
    badge.className = `badge ${item.review_status}`;
    badge.textContent = `${item.review_status} (${item.n_reviewed}/${item.n_images})`;
    const signed = item.signed_off_by
      ? `${item.signed_off_by}, ${new Date(item.signed_off_at).toLocaleString()}${item.amended_by ? " (amended)" : ""}`
      : "—";
    const cells = [String(item.id), new Date(item.created_at).toLocaleString(), item.sample || "—",
                   String(item.n_images), String(item.n_needs_review), badge, signed, link];
    for (const content of cells) {
      const cell = document.createElement("td");
      if (typeof content === "string") cell.textContent = content; else cell.appendChild(content);
      row.appendChild(cell);
    }
    return row;
  });
  $("#history tbody").replaceChildren(...rows);
  $("#empty").hidden = rows.length > 0;
  const pages = Math.max(1, Math.ceil(view.total / PAGE_SIZE));
  $("#page-info").textContent = `page ${view.page} of ${pages} · ${view.total} analyses`;
  $("#prev").disabled = view.page <= 1;
  $("#next").disabled = view.page >= pages;
}

$("#search-form").addEventListener("submit", (event) => { event.preventDefault(); view.page = 1; load(); });
$("#status-filter").addEventListener("change", () => { view.page = 1; load(); });
$("#prev").addEventListener("click", () => { view.page -= 1; load(); });
$("#next").addEventListener("click", () => { view.page += 1; load(); });
hv.me().catch(() => { /* hv.api sends the browser to the login page */ });
load();
