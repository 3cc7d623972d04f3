// Universal Neuron Atlas: plots from JSON islands, token tooltips, and the live-text form.
// No inline handlers anywhere: everything is attached here with addEventListener, and every value that
// came from data is written with textContent (never innerHTML).
(function () {
  "use strict";

  function renderPlots(root) {
    if (!window.Plotly) return;
    root.querySelectorAll("script.plot-spec").forEach(function (script) {
      var target = document.getElementById(script.dataset.target);
      if (!target || target.dataset.rendered) return;
      var spec = JSON.parse(script.textContent);
      window.Plotly.newPlot(target, spec.data, spec.layout, spec.config).then(function () {
        target.dataset.rendered = "1";
        var template = target.dataset.neuronUrl;
        if (!template) return;
        target.on("plotly_click", function (event) {
          var point = event.points && event.points[0];
          if (!point || !point.customdata) return;
          window.location.href = template.replace("{layer}", point.customdata[0]).replace("{neuron}", point.customdata[1]);
        });
      });
    });
  }

  // One tooltip for every shaded token: the exact activation and the token's text (escaped by textContent).
  var tip = null;
  function showTip(event) {
    var el = event.target.closest ? event.target.closest(".t") : null;
    if (!el) return;
    if (el.title) { el.dataset.v = el.title; el.removeAttribute("title"); }
    if (!tip) { tip = document.createElement("div"); tip.id = "tip"; document.body.appendChild(tip); }
    var row = el.closest("[data-who]");
    if (el.dataset.tip) {  // a token that lists its own details (the top neurons of a text's token)
      tip.textContent = el.dataset.tip;
    } else {
      tip.textContent = (row ? row.dataset.who + "\n" : "") + "activation " + el.dataset.v + "\ntoken " +
        JSON.stringify(el.textContent);
    }
    tip.classList.add("on");
    moveTip(event);
  }
  function moveTip(event) {
    if (!tip || !tip.classList.contains("on")) return;
    tip.style.left = Math.min(event.clientX + 12, window.innerWidth - tip.offsetWidth - 8) + "px";
    tip.style.top = (event.clientY + 16) + "px";
  }
  function hideTip(event) {
    if (tip && event.target.closest && event.target.closest(".t")) tip.classList.remove("on");
  }
  document.addEventListener("mouseover", showTip);
  document.addEventListener("mousemove", moveTip);
  document.addEventListener("mouseout", hideTip);

  // Live text: the text goes into the page URL (?text=) so the result can be shared, and the result loads as a
  // fragment. Without JavaScript the form is a plain GET of the page with ?text=.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.classList || !form.classList.contains("live-form") || !window.htmx) return;
    event.preventDefault();
    var text = form.elements.text.value;
    var page = new URL(window.location.href);
    page.searchParams.set("text", text);
    window.history.pushState({}, "", page.toString());
    var partial = new URL(form.dataset.partial, window.location.origin);
    partial.searchParams.set("text", text);
    window.htmx.ajax("GET", partial.pathname + partial.search, { target: form.dataset.target, swap: "innerHTML" });
  });

  // A live fragment that found the server busy (503 with Retry-After: every live slot taken, e.g. while a shared
  // link loads the twins, the live text and an intervention at once) asks again after the wait, a few times.
  document.addEventListener("htmx:beforeSwap", function (event) {
    var detail = event.detail;
    var config = detail.requestConfig;
    var wait = detail.xhr && detail.xhr.status === 503 ? parseFloat(detail.xhr.getResponseHeader("Retry-After")) : NaN;
    var source = config && config.elt;
    if (!(wait > 0) || !source || !window.htmx) return;
    var tries = Number(source.dataset.busyTries || 0);
    if (tries >= 5) return;
    source.dataset.busyTries = String(tries + 1);
    detail.shouldSwap = false;
    window.setTimeout(function () {
      window.htmx.ajax(config.verb.toUpperCase(), config.path, {
        source: source, target: detail.target, swap: source.getAttribute("hx-swap") || "innerHTML"
      });
    }, wait * 1000);
  });

  // Threshold slider (front page): shown only with JavaScript; it moves the number field (the form's real input,
  // which works without JavaScript) and applies the threshold when released.
  function initSliders(root) {
    root.querySelectorAll("input.threshold-slider").forEach(function (slider) {
      var field = document.getElementById(slider.dataset.for);
      if (!field || slider.dataset.ready) return;
      slider.dataset.ready = "1";
      slider.hidden = false;
      slider.addEventListener("input", function () { field.value = slider.value; });
      slider.addEventListener("change", function () {
        field.value = slider.value;
        if (field.form.requestSubmit) field.form.requestSubmit(); else field.form.submit();
      });
      field.addEventListener("input", function () { slider.value = field.value; });
    });
  }

  function init(root) { renderPlots(root || document); initSliders(root || document); }
  if (window.htmx) {
    window.htmx.onLoad(init);
  } else {
    document.addEventListener("DOMContentLoaded", function () { init(document); });
  }
})();
