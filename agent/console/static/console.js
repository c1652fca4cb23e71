// Live updates: the server says "change" over server-sent events; the page fetches its fragment again.
// A new real alert rings (a sound made by the console itself); a test alert never does.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var linkState = document.getElementById("link-state");
  var toggle = document.getElementById("sound-toggle");
  var sound = new Audio("/static/alert.wav");
  var known = new Set();
  var busy = false, again = false;
  document.body.dataset.rang = "0";
  document.body.dataset.refreshes = "0";

  function rows() { return live ? live.querySelectorAll("[data-alert]") : []; }
  rows().forEach(function (row) { known.add(row.dataset.alert); });

  function ring() {
    document.body.dataset.rang = String(Number(document.body.dataset.rang) + 1);
    sound.currentTime = 0;
    sound.play().catch(function () { if (toggle) { toggle.hidden = false; } });
  }
  if (toggle) {
    toggle.addEventListener("click", function () {  // browsers let a page play sound after a click
      sound.play().then(function () { sound.pause(); toggle.hidden = true; }).catch(function () {});
    });
  }

  function refresh() {
    if (!live) { return; }
    if (busy) { again = true; return; }
    busy = true;
    fetch(live.dataset.fragment, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (response.status === 401) { window.location.assign("/login"); return null; }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html === null) { return; }
        live.innerHTML = html;
        var rings = false;
        rows().forEach(function (row) {
          if (!known.has(row.dataset.alert)) {
            known.add(row.dataset.alert);
            row.classList.add("new");
            if (row.dataset.sound === "yes") { rings = true; }
          }
        });
        if (rings) { ring(); }
        document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes) + 1);
      })
      .catch(function () {})
      .finally(function () {
        busy = false;
        if (again) { again = false; refresh(); }
      });
  }

  if (!linkState) { return; }  // not logged in
  var events = new EventSource("/events");
  events.addEventListener("hello", function () { linkState.className = "link-state up"; refresh(); });
  // The queue and alert pages follow "queue" (alerts and their handling); fleet and map every "change".
  events.addEventListener((live && live.dataset.events) || "change", refresh);
  events.onerror = function () { linkState.className = "link-state down"; };
})();
