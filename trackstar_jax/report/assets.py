"""The report page's stylesheet and script, inlined into the HTML by `page.render_page`.

Kept as Python strings (not package data files) so that the page builds from
any install of the package. The script reads the JSON payload (`payload.py`)
from `<script id="report-data" type="application/json">`, renders one page of
queries at a time, and builds every passage with `textContent` and `<mark>`
elements: passage text never goes through `innerHTML`.

URL hash parameters set the view, so a filtered state is a link:
`#relation=P20&q=Paris&model=correct&top=incorrect&freq=2-3&page=2&method=NAME&compare=NAME&tab=metrics`.
"""

CSS = r"""
:root { --ink: #1d2330; --muted: #667085; --line: #e3e6eb; --bg: #f6f7f9; --card: #fff; --accent: #3b6fd4;
  --target: #ffe08a; --subject: #cfe1ff; --good: #1f9d55; --bad: #c2413b; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
  background: var(--bg); }
header { background: #1d2330; color: #fff; padding: 12px 24px; display: flex; align-items: baseline; gap: 18px; }
header h1 { font-size: 17px; margin: 0; font-weight: 600; white-space: nowrap; }
header .sub { color: #aab3c5; font-size: 12.5px; min-width: 0; overflow: hidden; text-overflow: ellipsis;
  white-space: nowrap; }
nav.tabs { display: flex; gap: 4px; margin-left: auto; }
nav.tabs button { background: none; border: 0; color: #cfd6e4; font: inherit; padding: 4px 12px; border-radius: 6px;
  cursor: pointer; }
nav.tabs button.on { background: #3a4459; color: #fff; }
main { max-width: 1320px; margin: 0 auto; padding: 14px 24px 40px; }
.controls { display: flex; flex-wrap: wrap; gap: 8px 14px; align-items: center; background: var(--card);
  border: 1px solid var(--line); border-radius: 10px; padding: 10px 14px; position: sticky; top: 0; z-index: 2; }
.controls label { font-size: 12px; color: var(--muted); display: flex; align-items: center; gap: 5px; }
.controls select, .controls input[type=search] { font: inherit; font-size: 13px; padding: 3px 6px;
  border: 1px solid #ccd2dc; border-radius: 6px; background: #fff; color: var(--ink); }
.controls input[type=search] { width: 220px; }
.controls .compare { border-left: 1px solid var(--line); padding-left: 14px; }
.status { display: flex; align-items: center; gap: 10px; margin: 12px 2px 8px; color: var(--muted); font-size: 13px; }
.status .count b { color: var(--ink); }
.pager { margin-left: auto; display: flex; align-items: center; gap: 6px; }
.pager button, .reset { font: inherit; font-size: 12.5px; padding: 3px 10px; border: 1px solid #ccd2dc;
  border-radius: 6px; background: #fff; cursor: pointer; }
.pager button:disabled { opacity: .4; cursor: default; }
.query { background: var(--card); border: 1px solid var(--line); border-radius: 10px; margin: 10px 0;
  padding: 12px 16px; }
.qhead { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; font-size: 12px; color: var(--muted); }
.chip { border: 1px solid var(--line); border-radius: 999px; padding: 0 8px; background: #fafbfc; }
.chip.good { color: var(--good); border-color: #b7e2c8; background: #f0faf4; }
.chip.bad { color: var(--bad); border-color: #f0c4c1; background: #fdf3f2; }
.prompt { font-size: 16px; margin: 6px 0 10px; }
.prompt .target { font-weight: 600; }
mark { border-radius: 3px; padding: 0 1px; color: inherit; }
mark.hl-target { background: var(--target); }
mark.hl-subject { background: var(--subject); }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.col h4 { margin: 0 0 4px; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted);
  display: flex; gap: 8px; }
.col h4 .rr, .col h4 .method { text-transform: none; letter-spacing: 0; font-weight: 400; }
.col h4 .method { color: var(--ink); font-weight: 600; }
ol.passages { list-style: none; margin: 0; padding: 0; }
ol.passages li { display: grid; grid-template-columns: 22px 18px 64px 1fr; gap: 6px; padding: 3px 0;
  border-top: 1px solid #f0f1f4; font-size: 13px; }
ol.passages li:first-child { border-top: 0; }
.rank { color: var(--muted); text-align: right; font-variant-numeric: tabular-nums; }
.mark-ok { color: var(--good); font-weight: 700; }
.mark-no { color: #b9bec8; }
.score { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; color: #475467; text-align: right; }
.pid { color: var(--muted); font-size: 11px; margin-left: 4px; }
.missing { color: var(--muted); font-style: italic; }
.empty { padding: 30px; text-align: center; color: var(--muted); }
section { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 12px 18px;
  margin: 12px 0; }
section h2 { font-size: 15px; margin: 2px 0 8px; }
section h3 { font-size: 13px; margin: 14px 0 6px; }
table.metrics { border-collapse: collapse; font-size: 12.5px; margin: 4px 0; }
table.metrics th, table.metrics td { padding: 3px 10px; border-bottom: 1px solid var(--line); }
table.metrics th { text-align: left; color: var(--muted); font-weight: 600; }
table.metrics td.num { text-align: right; font-variant-numeric: tabular-nums; }
.charts { display: flex; flex-wrap: wrap; gap: 18px; }
.chart-box { flex: 1 1 520px; max-width: 680px; }
.chart-box svg { width: 100%; height: auto; }
.facts { color: #344054; }
.legend { font-size: 12px; color: var(--muted); margin: 0 2px 6px; }
[hidden] { display: none !important; }
@media (max-width: 900px) { .cols { grid-template-columns: 1fr; } }
"""

JS = r"""
(function () {
  "use strict";
  var t0 = performance.now();
  var DATA = JSON.parse(document.getElementById("report-data").textContent);
  var parseMs = performance.now() - t0;
  var PAGE_SIZE = Number(document.body.getAttribute("data-page-size")) || 50;
  var Q = DATA.queries, P = DATA.passages, M = DATA.methods, HAS = DATA.has;
  var KIND = ["hl-target", "hl-subject"];
  var state = {relation: "", model: "", top: "", freq: "", q: "", page: 1, method: 0, compare: -1, tab: "queries"};
  var lower = null, filtered = null, filterKey = null;

  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmtScore(s) {
    if (s === null || s === undefined) return "\u2013";
    var a = Math.abs(s);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return s.toExponential(2);
    return a < 10 ? s.toFixed(4) : a < 1000 ? s.toFixed(2) : s.toFixed(0);
  }
  // Text with <mark> spans [start, end, kind, ...] (UTF-16 offsets, sorted, disjoint): text nodes only.
  function marked(text, spans) {
    var f = document.createDocumentFragment(), at = 0;
    for (var i = 0; spans && i + 2 < spans.length; i += 3) {
      var a = spans[i], b = spans[i + 1];
      if (a < at || b > text.length) continue;
      if (a > at) f.appendChild(document.createTextNode(text.slice(at, a)));
      f.appendChild(el("mark", KIND[spans[i + 2]] || "hl-target", text.slice(a, b)));
      at = b;
    }
    if (at < text.length) f.appendChild(document.createTextNode(text.slice(at)));
    return f;
  }
  function promptSpans(q) {
    if (!q.subj) return null;
    var i = q.prompt.toLowerCase().indexOf(q.subj.toLowerCase());
    return i < 0 ? null : [i, i + q.subj.length, 1];
  }

  // ---- filters -----------------------------------------------------------------------------------------------
  function topCorrect(q) {
    var r = q.r[state.method];
    return r && r.p.length ? r.p[0][2] : -1;
  }
  function textHit(q, needle) {
    if ((q.prompt + "\u0000" + q.target + "\u0000" + (q.subj || "") + "\u0000" + (q.ans || "") + "\u0000" +
         String(q.id) + "\u0000" + (q.fact || "")).toLowerCase().indexOf(needle) >= 0) return true;
    if (lower === null) lower = P.map(function (p) { return p[1] ? p[1].toLowerCase() : ""; });
    for (var j = 0; j < q.r.length; j++) {
      var r = q.r[j];
      if (!r) continue;
      for (var s = 0; s < 2; s++) {
        var refs = s ? r.o : r.p;
        for (var k = 0; k < refs.length; k++) if (lower[refs[k][0]].indexOf(needle) >= 0) return true;
      }
    }
    return false;
  }
  function matches(q, needle, bucket) {
    if (state.relation && q.rel !== state.relation) return false;
    if (state.model && q.mc !== (state.model === "correct")) return false;
    if (state.top && topCorrect(q) !== (state.top === "correct" ? 1 : 0)) return false;
    if (bucket >= 0 && q.b !== bucket) return false;
    if (needle && !textHit(q, needle)) return false;
    return true;
  }
  function currentList() {
    var key = [state.relation, state.model, state.top, state.freq, state.q, state.method].join("\u0001");
    if (key !== filterKey) {
      var needle = state.q.trim().toLowerCase(), bucket = DATA.buckets.indexOf(state.freq), out = [];
      for (var i = 0; i < Q.length; i++) if (matches(Q[i], needle, bucket)) out.push(i);
      filtered = out;
      filterKey = key;
    }
    return filtered;
  }

  // ---- rendering ---------------------------------------------------------------------------------------------
  function passageList(refs, opponents) {
    var ol = el("ol", "passages");
    refs.forEach(function (ref, i) {
      var li = el("li"), p = P[ref[0]];
      li.appendChild(el("span", "rank", i + 1));
      var c = ref[2];
      li.appendChild(el("span", c === 1 ? "mark-ok" : c === 0 ? "mark-no" : "",
                        c === 1 ? "\u2713" : c === 0 ? "\u2717" : ""));
      if (c !== -1) li.lastChild.title = c === 1 ? "states the query's fact" : "does not state the fact";
      li.appendChild(el("span", "score", fmtScore(ref[1])));
      var t = el("span", "text");
      if (p[1] === null) t.appendChild(el("span", "missing", "(text not in the results file)"));
      else t.appendChild(marked(p[1], ref[3]));
      t.appendChild(el("span", "pid", "#" + p[0]));
      li.appendChild(t);
      ol.appendChild(li);
    });
    if (!refs.length) ol.appendChild(el("li", "missing", opponents ? "(no opponents)" : "(no proponents)"));
    return ol;
  }
  function column(title, method, r, side) {
    var col = el("div", "col"), h = el("h4", null, title);
    if (method) h.appendChild(el("span", "method", method));
    if (!r) {
      col.appendChild(h);
      col.appendChild(el("div", "missing", "(this query is not in this method's results)"));
      return col;
    }
    if (side === "p" && r.rr !== undefined)
      h.appendChild(el("span", "rr", r.rr ? "first correct at rank " + r.rr : "no correct proponent retrieved"));
    col.appendChild(h);
    col.appendChild(passageList(r[side], side === "o"));
    return col;
  }
  function card(q) {
    var div = el("div", "query");
    div.setAttribute("data-id", String(q.id));
    var head = el("div", "qhead");
    head.appendChild(el("span", "chip", "#" + q.id));
    if (q.rel !== undefined) head.appendChild(el("span", "chip rel", q.rel));
    if (q.fact !== undefined && q.fact !== q.rel) head.appendChild(el("span", "chip", "fact " + q.fact));
    if (q.freq !== undefined) head.appendChild(el("span", "chip", "frequency " + q.freq));
    if (q.mc !== undefined)
      head.appendChild(el("span", "chip " + (q.mc ? "good" : "bad"), q.mc ? "model correct" : "model incorrect"));
    if (q.ans !== undefined) head.appendChild(el("span", "chip", "model answer: " + q.ans.trim()));
    div.appendChild(head);
    var pr = el("div", "prompt");
    pr.appendChild(marked(q.prompt, promptSpans(q)));
    var lead = q.target.match(/^\s*/)[0];  // the target's leading space stays outside its mark
    pr.appendChild(document.createTextNode(lead));
    pr.appendChild(el("mark", "hl-target target", q.target.slice(lead.length)));
    div.appendChild(pr);
    var cols = el("div", "cols"), r = q.r[state.method];
    if (state.compare >= 0) {
      cols.appendChild(column("Proponents", M[state.method].name, r, "p"));
      cols.appendChild(column("Proponents", M[state.compare].name, q.r[state.compare], "p"));
    } else {
      cols.appendChild(column("Proponents", M.length > 1 ? M[state.method].name : "", r, "p"));
      cols.appendChild(column("Opponents", "", r, "o"));
    }
    div.appendChild(cols);
    return div;
  }
  function render() {
    var list = currentList(), pages = Math.max(1, Math.ceil(list.length / PAGE_SIZE));
    state.page = Math.min(Math.max(1, state.page), pages);
    var box = $("query-list");
    box.textContent = "";
    var start = (state.page - 1) * PAGE_SIZE;
    list.slice(start, start + PAGE_SIZE).forEach(function (i) { box.appendChild(card(Q[i])); });
    if (!list.length) box.appendChild(el("div", "empty", "No query matches these filters."));
    var count = $("count");
    count.textContent = "";
    count.appendChild(el("b", null, list.length.toLocaleString("en-US")));
    count.appendChild(document.createTextNode(" of " + Q.length.toLocaleString("en-US") + " queries" +
        (list.length ? " \u00b7 showing " + (start + 1) + "\u2013" + Math.min(start + PAGE_SIZE, list.length) : "")));
    $("page-info").textContent = "page " + state.page + " of " + pages;
    $("prev").disabled = state.page <= 1;
    $("next").disabled = state.page >= pages;
    showTab();
    writeHash();
  }
  function showTab() {
    var tabs = document.querySelectorAll("nav.tabs button");
    for (var i = 0; i < tabs.length; i++) {
      var name = tabs[i].getAttribute("data-tab"), on = name === state.tab;
      tabs[i].className = on ? "on" : "";
      $("tab-" + name).hidden = !on;
    }
  }

  // ---- URL hash <-> state ------------------------------------------------------------------------------------
  function methodIndex(v) {
    if (v === null || v === "") return -1;
    for (var i = 0; i < M.length; i++) if (M[i].name === v) return i;
    return /^\d+$/.test(v) && Number(v) < M.length ? Number(v) : -1;
  }
  function readHash() {
    var h = new URLSearchParams(location.hash.replace(/^#/, ""));
    state.relation = h.get("relation") || "";
    state.model = h.get("model") || "";
    state.top = h.get("top") || "";
    state.freq = h.get("freq") || "";
    state.q = h.get("q") || "";
    state.page = Number(h.get("page")) || 1;
    state.method = Math.max(0, methodIndex(h.get("method")));
    // compare=NAME (or an index, or 1 / true: the next method); unknown names compare with another method.
    var c = h.get("compare");
    state.compare = -1;
    if (c && c !== "0" && c !== "false" && M.length > 1) {
      var i = methodIndex(c);
      state.compare = i < 0 || i === state.method ? (state.method ? 0 : 1) : i;
    }
    state.tab = h.get("tab") === "metrics" && $("tab-metrics") ? "metrics" : "queries";
    syncControls();
  }
  var lastHash = null;
  function writeHash() {
    var h = new URLSearchParams();
    ["relation", "model", "top", "freq", "q"].forEach(function (k) { if (state[k]) h.set(k, state[k]); });
    if (state.page > 1) h.set("page", state.page);
    if (state.method) h.set("method", M[state.method].name);
    if (state.compare >= 0) h.set("compare", M[state.compare].name);
    if (state.tab !== "queries") h.set("tab", state.tab);
    var s = h.toString();
    lastHash = s;
    if (location.hash.replace(/^#/, "") !== s) history.replaceState(null, "", s ? "#" + s : location.pathname);
  }
  function syncControls() {
    ["relation", "model", "top", "freq"].forEach(function (k) { if ($("f-" + k)) $("f-" + k).value = state[k]; });
    $("f-q").value = state.q;
    if ($("f-method")) $("f-method").value = String(state.method);
    if ($("f-compare-on")) {
      $("f-compare-on").checked = state.compare >= 0;
      $("f-compare").value = String(state.compare >= 0 ? state.compare : (state.method ? 0 : 1));
    }
  }

  // ---- controls ----------------------------------------------------------------------------------------------
  function makeSelect(id, options) {
    var s = el("select");
    s.id = id;
    options.forEach(function (o) { var opt = el("option", null, o[1]); opt.value = o[0]; s.appendChild(opt); });
    return s;
  }
  function select(id, label, options, hidden) {
    var lab = el("label", null, label);
    lab.appendChild(makeSelect(id, options));
    if (hidden) lab.hidden = true;
    return lab;
  }
  function buildControls() {
    var c = $("controls"), all = [["", "all"]];
    c.appendChild(select("f-relation", "Relation", all.concat(DATA.relations.map(function (r) {
      return [r[0], r[0] + " (" + r[1].toLocaleString("en-US") + ")"];
    })), !HAS.relation));
    c.appendChild(select("f-model", "Model", all.concat([["correct", "answers correctly"],
                                                         ["incorrect", "answers incorrectly"]]), !HAS.mc));
    c.appendChild(select("f-top", "Top proponent", all.concat([["correct", "correct"], ["incorrect", "incorrect"]]),
                         !HAS.correct));
    c.appendChild(select("f-freq", "Fact frequency", all.concat(DATA.buckets.map(function (b) { return [b, b]; })),
                         !HAS.freq));
    var lab = el("label", null, "Search"), inp = el("input");
    inp.type = "search";
    inp.id = "f-q";
    inp.placeholder = "prompt, target or passage text";
    lab.appendChild(inp);
    c.appendChild(lab);
    var names = M.map(function (m, i) { return [String(i), m.name]; });
    if (M.length > 1) {
      c.appendChild(select("f-method", "Method", names));
      var cmp = el("label", "compare"), box = el("input");
      box.type = "checkbox";
      box.id = "f-compare-on";
      cmp.appendChild(box);
      cmp.appendChild(document.createTextNode("Compare with"));
      cmp.appendChild(makeSelect("f-compare", names));
      c.appendChild(cmp);
    }
    var reset = el("button", "reset", "Reset");
    reset.type = "button";
    c.appendChild(reset);
    reset.addEventListener("click", function () {
      state.relation = state.model = state.top = state.freq = state.q = "";
      state.page = 1;
      state.compare = -1;
      syncControls();
      render();
    });
    ["relation", "model", "top", "freq"].forEach(function (k) {
      $("f-" + k).addEventListener("change", function (e) { state[k] = e.target.value; state.page = 1; render(); });
    });
    var timer = null;
    inp.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () { state.q = inp.value; state.page = 1; render(); }, 200);
    });
    if (M.length > 1) {
      var onCompare = function () {
        var want = Number($("f-compare").value);
        state.compare = $("f-compare-on").checked && want !== state.method ? want : -1;
        if ($("f-compare-on").checked && state.compare < 0) $("f-compare-on").checked = false;
        render();
      };
      $("f-method").addEventListener("change", function (e) {
        state.method = Number(e.target.value);
        if (state.compare === state.method) state.compare = -1;
        state.page = 1;
        syncControls();
        render();
      });
      $("f-compare-on").addEventListener("change", onCompare);
      $("f-compare").addEventListener("change", function () { $("f-compare-on").checked = true; onCompare(); });
    }
    $("prev").addEventListener("click", function () { state.page--; render(); window.scrollTo(0, 0); });
    $("next").addEventListener("click", function () { state.page++; render(); window.scrollTo(0, 0); });
    var tabs = document.querySelectorAll("nav.tabs button");
    for (var i = 0; i < tabs.length; i++) tabs[i].addEventListener("click", function (e) {
      state.tab = e.target.getAttribute("data-tab");
      render();
    });
    window.addEventListener("hashchange", function () {
      if (location.hash.replace(/^#/, "") === lastHash) return;
      readHash();
      render();
    });
  }

  buildControls();
  readHash();
  var t1 = performance.now();
  render();
  // for tests and the curious: how long the JSON parse and the first (filtered) render took
  document.body.setAttribute("data-parse-ms", parseMs.toFixed(0));
  document.body.setAttribute("data-render-ms", (performance.now() - t1).toFixed(0));
})();
"""
