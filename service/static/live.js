// gradserve pages: refresh the live figures in place, and add copy buttons to snippets.
// Progressive enhancement only: every page reads the same without this script.
(() => {
  "use strict";
  const PERIOD_MS = 2000;

  async function refresh() {
    const cells = document.querySelectorAll("[data-live]");
    if (document.hidden || cells.length === 0) return;
    let text;
    try {
      // From the origin: a page opened as http://user:key@host/ has a base URL that fetch refuses.
      const url = new URL("/live.json", window.location.origin);
      const response = await fetch(url, { cache: "no-store", credentials: "same-origin" });
      if (!response.ok) return;
      text = (await response.json()).text;
    } catch (_) {
      return; // the server is restarting or unreachable: keep the last figures
    }
    for (const cell of cells) {
      const value = text[cell.dataset.live];
      if (value !== undefined && cell.textContent !== value) cell.textContent = value;
    }
    const stamp = document.getElementById("live-stamp");
    if (stamp) {
      stamp.textContent = new Date().toLocaleTimeString();
      stamp.parentElement.hidden = false;
    }
  }

  function addCopyButtons() {
    for (const pre of document.querySelectorAll("pre[data-copy]")) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "copy";
      button.textContent = "Copy";
      button.addEventListener("click", async () => {
        try {
          await navigator.clipboard.writeText(pre.innerText);
          button.textContent = "Copied";
        } catch (_) {
          button.textContent = "Select the text to copy";
        }
        setTimeout(() => { button.textContent = "Copy"; }, 1500);
      });
      pre.before(button);
    }
  }

  addCopyButtons();
  setInterval(refresh, PERIOD_MS);
  document.addEventListener("visibilitychange", refresh);
})();
