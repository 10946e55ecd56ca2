// Drop a photo anywhere to search with it; choosing a file submits at once.
// While a search runs the page says so; the arrow keys move between results.
(function () {
  function searching() {
    document.body.classList.add("loading");
    const status = document.getElementById("search-status");
    if (status) status.textContent = "Searching…";
  }
  document.querySelectorAll("form.text-search, form.image-search").forEach((f) => f.addEventListener("submit", searching));
  document.querySelectorAll("a[rel=next]").forEach((a) => a.addEventListener("click", searching));

  const form = document.getElementById("image-search");
  if (form) {
    const input = form.querySelector("input[type=file]");
    input.addEventListener("change", () => { if (input.files.length) { searching(); form.submit(); } });
    ["dragenter", "dragover"].forEach((t) => document.addEventListener(t, (e) => {
      e.preventDefault(); document.body.classList.add("dragging");
    }));
    ["dragleave", "drop"].forEach((t) => document.addEventListener(t, (e) => {
      e.preventDefault(); document.body.classList.remove("dragging");
    }));
    document.addEventListener("drop", (e) => {
      if (!e.dataTransfer.files.length) return;
      input.files = e.dataTransfer.files;
      searching();
      form.submit();
    });
  }

  // Arrow keys between the pictures of a grid (left/right one, up/down one row).
  document.addEventListener("keydown", (e) => {
    const link = document.activeElement;
    const grid = link && link.closest ? link.closest(".grid") : null;
    if (!grid || !["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown"].includes(e.key)) return;
    const links = Array.from(grid.querySelectorAll(".card > a"));
    const here = links.indexOf(link);
    if (here < 0) return;
    const top = links[0].getBoundingClientRect().top;
    const perRow = Math.max(1, links.filter((a) => a.getBoundingClientRect().top === top).length);
    const step = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -perRow, ArrowDown: perRow }[e.key];
    const next = links[here + step];
    if (next) { e.preventDefault(); next.focus(); }
  });
})();
