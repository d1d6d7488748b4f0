// The console's only script. An element with data-live="URL" is fetched again every
// data-every milliseconds (default 2000) and its content replaced, until the new content
// holds an element marked data-final (a run or a certification that has ended).
(function () {
  "use strict";
  function schedule(element) {
    setTimeout(function () { refresh(element); }, Number(element.dataset.every || 2000));
  }
  function refresh(element) {
    fetch(element.dataset.live, { credentials: "same-origin", headers: { "X-Live": "1" } })
      .then(function (response) {
        if (!response.ok || response.redirected) { throw new Error(String(response.status)); }
        return response.text();
      })
      .then(function (html) {
        element.innerHTML = html;
        if (!element.querySelector("[data-final]")) { schedule(element); }
      })
      .catch(function () { schedule(element); });
  }
  document.querySelectorAll("[data-live]").forEach(function (element) {
    if (!element.querySelector("[data-final]")) { schedule(element); }
  });
})();
