// Filters the documents list by status and error type. Reads only the list's data- attributes.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const status = document.getElementById("filter-status");
  const error = document.getElementById("filter-error");
  const shown = document.getElementById("shown-count");
  const rows = Array.from(document.querySelectorAll("#document-list tbody tr"));
  function apply() {
    let n = 0;
    for (const row of rows) {
      const keep = (!status.value || row.dataset.status === status.value) &&
                   (!error.value || row.dataset.error === error.value);
      row.hidden = !keep;
      if (keep) n += 1;
    }
    shown.textContent = n + " of " + rows.length + " shown";
  }
  status.addEventListener("change", apply);
  error.addEventListener("change", apply);
  apply();
});
