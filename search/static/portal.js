// Drop a photo anywhere to search with it; choosing a file submits at once.
// While a search runs the page says so; the arrow keys move between results; the next page of
// results is appended as the end of the grid comes into view.
(function () {
  function searching() {
    document.body.classList.add("loading");
    const status = document.getElementById("search-status");
    if (status) status.textContent = "Searching…";
  }
  document.querySelectorAll("form.text-search, form.image-search").forEach((f) => f.addEventListener("submit", searching));
  document.querySelectorAll("nav.pages a[rel=next], nav.pages a[rel=prev]").forEach((a) => a.addEventListener("click", searching));

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

  // Infinite scroll: when the "More results" link of a result grid comes into view, the next
  // page is fetched and its pictures appended (the link itself still works without JavaScript).
  function appendNextPage(link, observer) {
    if (link.dataset.loading) return;
    link.dataset.loading = "1";
    const status = document.getElementById("search-status");
    if (status) status.textContent = "Loading more results…";
    fetch(link.href, { headers: { Accept: "text/html" }, credentials: "same-origin" })
      .then((r) => (r.ok ? r.text() : Promise.reject(new Error(r.status + " " + r.statusText))))
      .then((html) => {
        const page = new DOMParser().parseFromString(html, "text/html");
        const grid = link.closest(".pages").previousElementSibling;
        const more = page.querySelector("p.pages a[rel=next]");
        page.querySelectorAll("ul.grid > li.card").forEach((card) => grid.appendChild(document.importNode(card, true)));
        observer.unobserve(link);
        if (more) { link.href = more.href; delete link.dataset.loading; observer.observe(link); }
        else { link.closest(".pages").textContent = "No more results."; }
        if (status) status.textContent = grid.children.length + " results shown.";
      })
      .catch((err) => { if (status) status.textContent = "Could not load more results (" + err.message + "); use the link."; });
  }
  if ("IntersectionObserver" in window) {
    const observer = new IntersectionObserver((entries) => entries.forEach((e) => {
      if (e.isIntersecting) appendNextPage(e.target, observer);
    }), { rootMargin: "400px" });
    document.querySelectorAll("p.pages.more a[rel=next]").forEach((a) => observer.observe(a));
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
