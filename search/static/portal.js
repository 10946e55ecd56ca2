// Drop a photo anywhere to search with it; choosing a file submits at once.
(function () {
  const form = document.getElementById("image-search");
  if (!form) return;
  const input = form.querySelector("input[type=file]");
  input.addEventListener("change", () => { if (input.files.length) form.submit(); });
  ["dragenter", "dragover"].forEach((t) => document.addEventListener(t, (e) => {
    e.preventDefault(); document.body.classList.add("dragging");
  }));
  ["dragleave", "drop"].forEach((t) => document.addEventListener(t, (e) => {
    e.preventDefault(); document.body.classList.remove("dragging");
  }));
  document.addEventListener("drop", (e) => {
    if (!e.dataTransfer.files.length) return;
    input.files = e.dataTransfer.files;
    form.submit();
  });
})();
