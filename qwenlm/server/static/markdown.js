// A minimal, safe Markdown-to-HTML renderer for chat replies: code fences, inline code, bold, italics,
// headings, bullet and numbered lists, paragraphs. Everything is HTML-escaped first and only the tags
// produced here are ever emitted, so model output can never inject markup or script.
"use strict";

function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
          .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function renderInline(text) {
  // text is raw; split out inline code first so its contents stay literal
  const parts = text.split(/(`[^`\n]+`)/g);
  return parts.map(function (part) {
    if (part.length > 2 && part[0] === "`" && part[part.length - 1] === "`") {
      return "<code>" + escapeHtml(part.slice(1, -1)) + "</code>";
    }
    let s = escapeHtml(part);
    s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^*])\*([^*\n]+)\*(?!\*)/g, "$1<em>$2</em>");
    return s;
  }).join("");
}

function renderMarkdown(src) {
  const lines = src.replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let para = [];
  let list = null; // {tag: "ul"|"ol", items: []}

  function flushPara() {
    if (para.length) { out.push("<p>" + para.map(renderInline).join("<br>") + "</p>"); para = []; }
  }
  function flushList() {
    if (list) {
      out.push("<" + list.tag + ">" + list.items.map(function (it) { return "<li>" + renderInline(it) + "</li>"; }).join("") +
               "</" + list.tag + ">");
      list = null;
    }
  }

  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+#.-]*)\s*$/);
    if (fence) {
      flushPara(); flushList();
      const code = [];
      i++;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) { code.push(lines[i]); i++; }
      // an unclosed fence (still streaming) renders as code up to the end
      const lang = fence[1] ? ' class="language-' + escapeHtml(fence[1]) + '"' : "";
      out.push("<pre><code" + lang + ">" + escapeHtml(code.join("\n")) + "</code></pre>");
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
    const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
    if (heading) {
      flushPara(); flushList();
      const n = heading[1].length;
      out.push("<h" + n + ">" + renderInline(heading[2]) + "</h" + n + ">");
    } else if (bullet || numbered) {
      flushPara();
      const tag = bullet ? "ul" : "ol";
      if (!list || list.tag !== tag) { flushList(); list = {tag: tag, items: []}; }
      list.items.push((bullet || numbered)[1]);
    } else if (line.trim() === "") {
      flushPara(); flushList();
    } else {
      flushList();
      para.push(line);
    }
  }
  flushPara(); flushList();
  return out.join("\n");
}

if (typeof module !== "undefined") { module.exports = {renderMarkdown: renderMarkdown, escapeHtml: escapeHtml}; }
