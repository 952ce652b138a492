// te-scheduler status page: relative times that count, and a reload every so often.
// The page is complete without this script; it only keeps the numbers fresh.
"use strict";
(function () {
  var body = document.body;
  var serverNow = Date.parse(body.getAttribute("data-now"));
  // The server's clock is the one that matters: measure how far ours is from it.
  var skew = isNaN(serverNow) ? 0 : serverNow - Date.now();
  var units = [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]];

  function span(seconds) {
    var parts = [];
    for (var i = 0; i < units.length; i++) {
      var size = units[i][1];
      if (seconds >= size || (units[i][0] === "s" && parts.length === 0)) {
        parts.push(Math.floor(seconds / size) + units[i][0]);
        seconds %= size;
      }
      if (parts.length === 2 || (parts.length && units[i][0] === "h" && seconds === 0)) break;
    }
    return parts.slice(0, 2).join(" ");
  }

  function relative(at, now) {
    var seconds = Math.round((at - now) / 1000);
    if (seconds === 0) return "now";
    var words = span(Math.abs(seconds));
    return seconds > 0 ? "in " + words : words + " ago";
  }

  function tick() {
    var now = Date.now() + skew;
    var times = document.querySelectorAll("time[data-relative]");
    for (var i = 0; i < times.length; i++) {
      var at = Date.parse(times[i].getAttribute("datetime"));
      if (isNaN(at)) continue;
      // A countdown that has run out says "now" until the reload brings the next one.
      var countdown = times[i].hasAttribute("data-countdown");
      times[i].textContent = countdown && at <= now ? "now" : relative(at, now);
    }
  }

  tick();
  setInterval(tick, 1000);
  var refresh = parseInt(body.getAttribute("data-refresh"), 10);
  if (refresh > 0) {
    setInterval(function () {
      // Reload only while someone can see it, and never over a filter being typed.
      var typing = document.activeElement && document.activeElement.tagName === "INPUT";
      if (!document.hidden && !typing) window.location.reload();
    }, refresh * 1000);
  }
})();
