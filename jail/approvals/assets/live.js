// The live page of `jail --ui`. Every value from the run is put into the page as text (textContent),
// never as markup. The token comes from the page's own address and goes only to this page's server.
(function () {
  "use strict";
  var token = new URLSearchParams(location.search).get("token") || "";
  var MAX_ROWS = 1000;
  var LABELS = {allow: "allow", deny: "deny", would_deny: "would-deny"};
  var ANSWERS = [
    ["allow", "once", "Allow once"],
    ["allow", "run", "Allow for this run"],
    ["allow", "always", "Allow always"],
    ["deny", "once", "Deny once"],
    ["deny", "always", "Deny always"]
  ];
  var body = document.querySelector("#requests tbody");
  var questionList = document.getElementById("question-list");
  var verdictFilter = document.getElementById("verdict-filter");
  var textFilter = document.getElementById("text-filter");
  var status = document.getElementById("status");
  var deadlines = {};

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined) { node.textContent = String(text); }
    return node;
  }

  function formatBytes(count) {
    if (count < 1024) { return count + " B"; }
    var units = ["KiB", "MiB", "GiB", "TiB"], value = count, i = -1;
    do { value /= 1024; i += 1; } while (value >= 1024 && i < units.length - 1);
    return value.toFixed(1) + " " + units[i];
  }

  function setStatus(text, className) {
    status.textContent = text;
    status.className = "status " + className;
  }

  function setTotals(totals) {
    Object.keys(totals).forEach(function (name) {
      var node = document.querySelector('[data-total="' + name + '"]');
      if (node) { node.textContent = name === "bytes" ? formatBytes(totals[name]) : String(totals[name]); }
    });
  }

  function matches(row) {
    var verdict = verdictFilter.value, text = textFilter.value.trim().toLowerCase();
    if (verdict === "asked" ? !row.dataset.asked : verdict && row.dataset.verdict !== verdict) { return false; }
    return !text || row.textContent.toLowerCase().indexOf(text) >= 0;
  }

  function applyFilters() {
    var shown = 0;
    Array.prototype.forEach.call(body.rows, function (row) {
      row.hidden = !matches(row);
      shown += row.hidden ? 0 : 1;
    });
    document.getElementById("empty").hidden = body.rows.length > 0;
    document.getElementById("shown").textContent = body.rows.length
      ? shown + " of " + body.rows.length + " shown" : "";
  }

  function cell(tr, text, className) {
    tr.appendChild(element("td", className, text));
  }

  function addRow(record, fresh) {
    var tr = element("tr", fresh ? "fresh" : "");
    var reason = record.reason || "";
    if (record.answered_by) { reason = (record.asked ? "asked (" : "approved (") + record.answered_by + ") " + reason; }
    tr.dataset.verdict = record.decision;
    if (record.answered_by) { tr.dataset.asked = "1"; }
    cell(tr, String(record.time || "").replace("T", " ").replace("Z", ""), "time");
    var verdict = element("td");
    verdict.appendChild(element("span", "tag " + record.decision, LABELS[record.decision] || record.decision));
    tr.appendChild(verdict);
    cell(tr, record.method);
    cell(tr, record.url, "url");
    cell(tr, record.status || "", "n");
    cell(tr, formatBytes(record.bytes || 0), "n");
    cell(tr, (record.duration_ms || 0).toFixed(0) + " ms", "n");
    cell(tr, record.decision === "allow" && !record.answered_by ? "" : reason, "reason");
    tr.hidden = !matches(tr);
    body.insertBefore(tr, body.firstChild);
    while (body.rows.length > MAX_ROWS) { body.deleteRow(body.rows.length - 1); }
  }

  function showQuestionCount() {
    var count = questionList.children.length;
    document.querySelector('[data-total="questions"]').textContent = String(count);
    document.getElementById("questions").hidden = count === 0;
  }

  function answer(id, verdict, scope, box) {
    box.querySelectorAll("button").forEach(function (button) { button.disabled = true; });
    fetch("/api/answer", {
      method: "POST",
      headers: {"Content-Type": "application/json", "X-Jail-Token": token},
      body: JSON.stringify({id: id, verdict: verdict, scope: scope}),
      credentials: "omit",
      cache: "no-store"
    }).then(function (reply) {
      return reply.json().then(function (payload) {
        if (!reply.ok) { throw new Error(payload.error || reply.statusText); }
        removeQuestion(id);
      });
    }).catch(function (problem) {
      box.querySelector(".error").textContent = String(problem.message || problem);
      box.querySelectorAll("button").forEach(function (button) { button.disabled = false; });
    });
  }

  function addQuestion(question) {
    if (document.getElementById("q-" + question.id)) { return; }
    var box = element("div", "question");
    box.id = "q-" + question.id;
    var what = element("p", "what");
    what.appendChild(element("span", "tag ask", "ask"));
    what.appendChild(document.createTextNode(" " + question.method + " " + question.url));
    box.appendChild(what);
    var why = element("p", "why");
    why.appendChild(document.createTextNode(question.reason + " \u00b7 "));
    var left = element("span", "left");
    why.appendChild(left);
    box.appendChild(why);
    var buttons = element("div", "buttons");
    ANSWERS.forEach(function (choice) {
      var button = element("button", choice[0] + " " + choice[1], choice[2]);
      button.type = "button";
      button.dataset.verdict = choice[0];
      button.dataset.scope = choice[1];
      button.addEventListener("click", function () { answer(question.id, choice[0], choice[1], box); });
      buttons.appendChild(button);
    });
    box.appendChild(buttons);
    box.appendChild(element("p", "error"));
    deadlines[question.id] = Date.now() + question.expires_in * 1000;
    questionList.appendChild(box);
    tick();
    showQuestionCount();
  }

  function removeQuestion(id) {
    var box = document.getElementById("q-" + id);
    if (box) { box.remove(); }
    delete deadlines[id];
    showQuestionCount();
  }

  function tick() {
    Object.keys(deadlines).forEach(function (id) {
      var box = document.getElementById("q-" + id);
      var seconds = Math.max(0, Math.round((deadlines[id] - Date.now()) / 1000));
      if (box) { box.querySelector(".left").textContent = "denied in " + seconds + " s without an answer"; }
    });
  }

  verdictFilter.addEventListener("change", applyFilters);
  textFilter.addEventListener("input", applyFilters);
  setInterval(tick, 1000);

  var events = new EventSource("/api/events?token=" + encodeURIComponent(token));
  events.addEventListener("state", function (event) {
    var state = JSON.parse(event.data);
    while (body.rows.length) { body.deleteRow(0); }
    state.rows.forEach(function (row) { addRow(row, false); });
    questionList.textContent = "";
    deadlines = {};
    state.questions.forEach(addQuestion);
    setTotals(state.totals);
    showQuestionCount();
    applyFilters();
    setStatus("live", "live");
  });
  events.addEventListener("record", function (event) {
    var update = JSON.parse(event.data);
    addRow(update.row, true);
    setTotals(update.totals);
    applyFilters();
  });
  events.addEventListener("question", function (event) { addQuestion(JSON.parse(event.data).question); });
  events.addEventListener("answered", function (event) { removeQuestion(JSON.parse(event.data).id); });
  events.addEventListener("ended", function () {
    events.close();
    setStatus("run ended", "ended");
  });
  events.onerror = function () {
    if (events.readyState !== EventSource.CLOSED) { setStatus("reconnecting", "lost"); }
  };
}());
