"""What the autograded notebook, the formgrader and the feedback show: the student's own
sources and the grader's trusted scores and messages, all of it inert.

nbgrader keeps every output of the kernel that executed a submission, renders markdown
unsanitized, and fails on a duplicated cell or a link to a missing attachment. The
preprocessors here, wired in by :func:`configure_feedback`, change that:

- :class:`CapAttachments` (before grading): only image attachments, at most
  ``max_total_bytes`` per notebook; the others are dropped with a note, and an image
  that refers to an attachment the notebook does not hold no longer breaks rendering.
- :class:`DeduplicateCells` (before nbgrader's ``DeduplicateIds``): of cells sharing a
  ``grade_id`` (Jupyter's copy and paste), the last is graded, the others become plain
  cells with a note; ``nbgrader`` metadata without a ``grade_id`` is removed, since
  ``OverwriteCells.add_missing_cells`` fails on it (nbgrader issue #1083).
- :class:`SanitizeMarkdown`: a markdown or raw cell whose rendering holds anything
  outside a small allowlist (scripts, event handlers, ``javascript:`` links, forms,
  frames, styles) is shown as plain text in a code block instead.
- :class:`DropUntrustedOutputs` (just before ``TrustedScores``) and
  :class:`DropUnscoredOutputs` (just after ``SaveAutoGrades``): every output of the
  student's kernel is replaced by a short note; only the outputs that ``TrustedScores``
  wrote (the score and message of each autograded test cell) are kept.
- :class:`PlainOutputs` (feedback): keeps only plain-text outputs, again.
- The feedback HTML and the formgrader's submission page carry a Content-Security-Policy
  ``<meta>`` (no script at all in the feedback).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import html
import json
import re
import warnings
from html.parser import HTMLParser

from nbformat.v4 import new_markdown_cell, new_output
from nbgrader.preprocessors import NbGraderPreprocessor
from traitlets import Integer, List, Unicode

NOTE = "[grader]"
NOTE_KEY = "cs_helpers_note"
MAX_ATTACHMENT_BYTES = 1_000_000
SAFE_IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
OUTPUT_NOTE = (f"{NOTE} Output not kept: graded notebooks show only the grader's own scores "
               "and messages, never what the submitted code printed or displayed.\n")

# What a rendered markdown cell may contain. Everything else (script, style, iframe,
# object, form, input, svg, event handlers, class/style attributes, javascript: URLs)
# makes the cell shown as plain text.
ALLOWED_TAGS = frozenset({
    "a", "abbr", "b", "blockquote", "br", "code", "dd", "del", "details", "div", "dl", "dt",
    "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "kbd", "li", "ol", "p", "pre",
    "s", "span", "strong", "sub", "summary", "sup", "table", "tbody", "td", "tfoot", "th",
    "thead", "tr", "u", "ul",
})
_ALLOWED_ATTRIBUTES = {
    "a": {"href", "title", "id", "name"},
    "img": {"src", "alt", "title", "width", "height"},
    "th": {"colspan", "rowspan", "align"},
    "td": {"colspan", "rowspan", "align"},
    "ol": {"start"},
    "h1": {"id"}, "h2": {"id"}, "h3": {"id"}, "h4": {"id"}, "h5": {"id"}, "h6": {"id"},
}
_DATA_IMAGE = re.compile(r"^data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=\s]*$", re.IGNORECASE)
_SAFE_URL = re.compile(r"^(https?://|mailto:|#|[A-Za-z0-9_./-][^:]*$)", re.IGNORECASE)

# The Content-Security-Policy of the feedback HTML: no script, no network, no plugins,
# no forms; images only inline. Styles stay (the page's own CSS is inline).
FEEDBACK_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:; "
                "base-uri 'none'; form-action 'none'")
FEEDBACK_TEMPLATE_FILE = "cs_helpers_feedback.html.j2"
FORMGRADE_TEMPLATE_FILE = "cs_helpers_formgrade.html.j2"
# The formgrader's own scripts (nbgrader's static files and MathJax) sit in the page's
# <head> and run before this policy is parsed, which is placed at the end of the head:
# everything after it, the submission included, runs no inline script and loads no script
# but MathJax's. The two inline handlers of nbgrader's navigation bar are allowed by hash.
_FORMGRADE_HANDLERS = ("toggle_name(true);", "toggle_name(false);")
MATHJAX_ORIGIN = "https://cdnjs.cloudflare.com/ajax/libs/mathjax/2.7.7/"


def _hash_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _formgrade_inline_scripts() -> list[str]:
    """The static inline scripts of nbgrader's formgrader templates (the tooltips of the
    navigation bar sit after the policy and are allowed by hash)."""
    import os

    import nbgrader

    path = os.path.join(os.path.dirname(nbgrader.__file__), "server_extensions", "formgrader",
                        "templates", "formgrade", "formgrade_macros.html.j2")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError:
        return []
    scripts = re.findall(r"<script type=\"text/javascript\">(.*?)</script>", text, flags=re.DOTALL)
    return [s for s in scripts if "{{" not in s and "{%" not in s]


def formgrade_csp() -> str:
    allowed = [*_FORMGRADE_HANDLERS, *_formgrade_inline_scripts()]
    return ("script-src 'unsafe-hashes' " + " ".join(map(_hash_source, allowed))
            + f" {MATHJAX_ORIGIN}; object-src 'none'; base-uri 'none'; form-action 'none'; "
              "frame-src 'none'; img-src 'self' data:")


def _meta(policy: str) -> str:
    return f'<meta http-equiv="Content-Security-Policy" content="{html.escape(policy, quote=True)}">'


FEEDBACK_TEMPLATE = (
    "{%- extends 'index.html.j2' -%}\n"
    "{%- block header -%}\n"
    "{{ super() | replace('<head>', '<head>\\n" + _meta(FEEDBACK_CSP) + "', 1) }}\n"
    "{%- endblock header -%}\n"
)


def formgrade_template() -> str:
    return ("{%- extends 'index.html.j2' -%}\n"
            "{%- block header -%}\n"
            "{{ super() | replace('</head>', '" + _meta(formgrade_csp()) + "\\n</head>', 1) }}\n"
            "{%- endblock header -%}\n")


# ---------------------------------------------------------------- helpers


def _grade_id(cell):
    meta = cell.get("metadata", {}).get("nbgrader")
    if isinstance(meta, dict) and isinstance(meta.get("grade_id"), str) and meta["grade_id"]:
        return meta["grade_id"]
    return None


def _is_graded_code(cell) -> bool:
    meta = cell.get("metadata", {}).get("nbgrader") or {}
    return cell.cell_type == "code" and bool(meta.get("grade")) and _grade_id(cell) is not None


def note_cell(text: str):
    """A markdown cell that tells the student (and the instructor) what the grader did."""
    cell = new_markdown_cell(f"**{NOTE}** {text}")
    cell.metadata[NOTE_KEY] = True
    return cell


def _as_text_block(source: str, reason: str) -> str:
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", source)), default=0))
    return f"**{NOTE}** {reason} It is shown as plain text.\n\n{fence}text\n{source}\n{fence}"


def _output_digest(outputs) -> str:
    return hashlib.sha256(json.dumps(outputs, sort_keys=True, default=str).encode()).hexdigest()


def _note_output():
    return new_output("stream", name="stdout", text=OUTPUT_NOTE)


# ---------------------------------------------------------------- attachments


_ATTACHMENT_REF = re.compile(r"attachment:(<[^>\n]*>|[^\s)\"'>\]]+)")


def _decoded_size(value) -> int:
    text = "".join(value) if isinstance(value, list) else str(value)
    try:
        return len(base64.b64decode(text, validate=False))
    except (binascii.Error, ValueError):
        return len(text)


class CapAttachments(NbGraderPreprocessor):
    """Keeps image attachments up to ``max_total_bytes`` per notebook (in cell order) and
    drops the others with a note; references to attachments a cell does not hold are
    neutralized, so that rendering cannot fail on them."""

    max_total_bytes = Integer(MAX_ATTACHMENT_BYTES, help="Total size of the attachments kept per notebook.").tag(config=True)
    allowed_types = List(Unicode(), list(SAFE_IMAGE_TYPES), help="Attachment types kept.").tag(config=True)

    def preprocess(self, nb, resources):
        budget = self.max_total_bytes
        new_cells = []
        for cell in nb.cells:
            notes = []
            attachments = cell.get("attachments")
            if attachments is not None and not isinstance(attachments, dict):
                del cell["attachments"]
                attachments = None
            if attachments:
                kept = {}
                for name, bundle in attachments.items():
                    if not isinstance(bundle, dict):
                        notes.append(f"The attachment `{_safe_name(name)}` was removed: it is not valid.")
                        continue
                    bundle = {k: v for k, v in bundle.items() if k in self.allowed_types}
                    size = sum(_decoded_size(v) for v in bundle.values())
                    if not bundle:
                        notes.append(f"The attachment `{_safe_name(name)}` was removed: only images "
                                     f"({', '.join(self.allowed_types)}) are kept.")
                    elif size > budget:
                        notes.append(f"The attachment `{_safe_name(name)}` ({size / 1e6:.1f} MB) was removed: "
                                     f"attachments may take at most {self.max_total_bytes / 1e6:.1f} MB "
                                     "per notebook. The rest of the notebook was graded.")
                    else:
                        budget -= size
                        kept[name] = bundle
                if kept:
                    cell.attachments = kept
                else:
                    del cell["attachments"]
            if cell.cell_type in ("markdown", "raw") and "attachment:" in cell.source:
                cell.source, missing = _neutralize_missing(cell.source, cell.get("attachments", {}))
                notes.extend(f"An image refers to the attachment `{_safe_name(name)}`, which this "
                             "notebook does not hold; it is not shown." for name in missing
                             if not any(_safe_name(name) in n for n in notes))
            new_cells.append(cell)
            if notes:
                self.log.warning("Attachments: %s", " ".join(notes))
                new_cells.append(note_cell(" ".join(notes)))
        nb.cells = new_cells
        return nb, resources


def _safe_name(name) -> str:
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", str(name))[:80]


def _neutralize_missing(source: str, attachments: dict):
    from urllib.parse import unquote

    missing = []

    def replace(match):
        raw = match.group(1)
        name = raw[1:-1] if raw.startswith("<") else raw
        if name in attachments or unquote(name) in attachments:
            return match.group(0)
        missing.append(name)
        return "missing-attachment"

    return _ATTACHMENT_REF.sub(replace, source), missing


# ---------------------------------------------------------------- duplicated cells


class DeduplicateCells(NbGraderPreprocessor):
    """Of the cells that share a ``grade_id`` the last one is graded (as nbgrader's own
    ``DeduplicateIds`` and Python's last definition); the earlier ones lose their
    ``nbgrader`` metadata and get a note. ``nbgrader`` metadata without a ``grade_id``
    is removed. Runs before ``DeduplicateIds``, which then finds nothing to do."""

    def preprocess(self, nb, resources):
        last = {}
        for index, cell in enumerate(nb.cells):
            meta = cell.get("metadata", {})
            if "nbgrader" in meta and _grade_id(cell) is None:
                del meta["nbgrader"]
            grade_id = _grade_id(cell)
            if grade_id is not None:
                last[grade_id] = index
        new_cells = []
        for index, cell in enumerate(nb.cells):
            grade_id = _grade_id(cell)
            if grade_id is not None and last[grade_id] != index:
                self.log.warning("Cell '%s' appears more than once; grading the last copy", grade_id)
                del cell.metadata["nbgrader"]
                new_cells.append(note_cell(
                    f"The next cell is a copy of the graded cell `{_safe_name(grade_id)}` (it appears more "
                    "than once, e.g. after copy and paste). Only the last copy was graded; this one was "
                    "ignored."))
            new_cells.append(cell)
        nb.cells = new_cells
        return nb, resources


# ---------------------------------------------------------------- markdown


class _TagCollector(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.add(tag)

    def handle_endtag(self, tag):
        self.tags.add(tag)


_SAFE_CLASS = re.compile(r"^(anchor-link|highlight( hl-[a-z0-9]+)?|[a-z]{1,3}( [a-z]{1,3})*)$")
_SAFE_STYLE = re.compile(r"^text-align:\s*(left|right|center);?$")


def _strict_attribute(tag, name, value):
    if name == "class" and tag in ("a", "div", "span", "pre", "code"):
        return bool(_SAFE_CLASS.match(value))
    if name == "style" and tag in ("th", "td"):
        return bool(_SAFE_STYLE.match(value))
    if name not in _ALLOWED_ATTRIBUTES.get(tag, ()):
        return False
    if name in ("href", "src"):
        url = re.sub(r"[\x00-\x20]", "", value)
        if tag == "img" and url.lower().startswith("data:"):
            return bool(_DATA_IMAGE.match(url))
        return bool(_SAFE_URL.match(url))
    return True


def _clean(text: str, strict: bool) -> str:
    import bleach

    if strict:
        tags, attributes = ALLOWED_TAGS, _strict_attribute
    else:
        collector = _TagCollector()
        collector.feed(text)
        collector.close()
        tags, attributes = ALLOWED_TAGS | collector.tags, (lambda tag, name, value: True)
    schemes = set(re.findall(r"([A-Za-z][A-Za-z0-9+.\-]*):", text.lower())) | {"http", "https", "mailto", "data"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bleach.clean(text, tags=tags, attributes=attributes, protocols=schemes,
                            strip=False, strip_comments=True)


def render_markdown(source: str, attachments=None) -> str:
    """The HTML that nbconvert's ``markdown2html`` filter (used by nbgrader's feedback and
    formgrader templates) makes of a markdown cell."""
    from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

    renderer = IPythonRenderer(escape=False, attachments=attachments or {}, embed_images=False)
    return MarkdownWithMath(renderer=renderer).render(source)


def unsafe_markup(rendered_html: str) -> bool:
    """Whether the HTML holds anything outside the allowlist."""
    return _clean(rendered_html, strict=True) != _clean(rendered_html, strict=False)


class SanitizeMarkdown(NbGraderPreprocessor):
    """A markdown cell whose rendering holds markup outside the allowlist, and any raw cell
    with markup, is replaced by its source in a plain-text code block, with a note.
    Locked nbgrader cells (the instructor's, restored from the gradebook) are left alone."""

    def preprocess_cell(self, cell, resources, index):
        meta = cell.get("metadata", {}).get("nbgrader") or {}
        if meta.get("locked") and _grade_id(cell) is not None and not meta.get("solution"):
            return cell, resources
        if cell.cell_type == "markdown":
            try:
                unsafe = unsafe_markup(render_markdown(cell.source, cell.get("attachments")))
                reason = "This cell held HTML or links that could run in a browser."
            except Exception as exc:  # a cell that cannot be rendered is shown as text too
                unsafe, reason = True, f"This cell could not be rendered ({type(exc).__name__})."
            if unsafe:
                self.log.warning("Markdown cell %d shown as plain text: %s", index, reason)
                cell.source = _as_text_block(cell.source, reason)
                cell.pop("attachments", None)
        elif cell.cell_type == "raw":
            if _clean(cell.source, strict=True) != cell.source or "<" in cell.source:
                cell.source = html.escape(cell.source)
            cell.metadata.pop("raw_mimetype", None)
            cell.metadata.pop("format", None)
        return cell, resources


# ---------------------------------------------------------------- outputs

_DIGESTS = "cs_helpers_output_digests"


class DropUntrustedOutputs(NbGraderPreprocessor):
    """Place just before ``TrustedScores``. Replaces the outputs of every code cell that
    is not an autograded cell with a note, and remembers the outputs of the autograded
    cells, so that :class:`DropUnscoredOutputs` can tell which ones ``TrustedScores``
    rewrote."""

    def preprocess(self, nb, resources):
        digests = {}
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            if _is_graded_code(cell):
                digests[index] = _output_digest(cell.outputs)
            elif cell.outputs:
                cell.outputs = [_note_output()]
        resources[_DIGESTS] = digests
        return nb, resources


class DropUnscoredOutputs(NbGraderPreprocessor):
    """Place just after ``SaveAutoGrades`` (the scores are saved by then). The outputs of
    an autograded cell that ``TrustedScores`` did not rewrite came from the student's
    kernel: they are replaced by a note too. What is kept is plain text only."""

    def preprocess(self, nb, resources):
        digests = resources.pop(_DIGESTS, None) or {}
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            rewritten = (_is_graded_code(cell) and index in digests
                         and _output_digest(cell.outputs) != digests[index])
            if not rewritten:
                if cell.outputs:
                    cell.outputs = [_note_output()]
            else:
                cell.outputs = plain_outputs(cell.outputs)
        return nb, resources


def plain_outputs(outputs):
    """Stream text and the ``text/plain`` of results; everything else becomes the note."""
    kept, dropped = [], False
    for out in outputs:
        kind = out.get("output_type")
        if kind == "stream" and out.get("name") in ("stdout", "stderr"):
            kept.append(new_output("stream", name=out["name"], text=str(out.get("text", ""))))
        elif kind == "execute_result" and isinstance(out.get("data", {}).get("text/plain"), (str, list)):
            text = out["data"]["text/plain"]
            kept.append(new_output("execute_result", data={"text/plain": "".join(text) if isinstance(text, list) else text},
                                   execution_count=out.get("execution_count")))
        else:
            dropped = True
    if dropped:
        kept.append(_note_output())
    return kept


class PlainOutputs(NbGraderPreprocessor):
    """Feedback: whatever the autograded notebook holds, only plain-text outputs are shown."""

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "code":
            cell.outputs = plain_outputs(cell.outputs)
        return cell, resources


# ---------------------------------------------------------------- exporters and wiring


_TEMPLATE_DIR: list = []


def template_dir() -> str:
    """A private folder (made once per process, removed at exit) holding the two
    templates; nbconvert finds templates on disk only."""
    import atexit
    import os
    import shutil
    import tempfile

    if not _TEMPLATE_DIR or not os.path.isdir(_TEMPLATE_DIR[0]):
        folder = tempfile.mkdtemp(prefix="cs-helpers-templates-")
        for name, text in ((FEEDBACK_TEMPLATE_FILE, FEEDBACK_TEMPLATE), (FORMGRADE_TEMPLATE_FILE, formgrade_template())):
            with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
                handle.write(text)
        atexit.register(shutil.rmtree, folder, True)
        _TEMPLATE_DIR[:] = [folder]
    return _TEMPLATE_DIR[0]


def _bootstrap_css_dir() -> str:
    """Where nbgrader's feedback template finds ``bootstrap.min.css``."""
    import os

    import nbgrader

    return os.path.join(os.path.dirname(nbgrader.__file__), "server_extensions", "formgrader", "static",
                        "node_modules", "bootstrap", "dist", "css")


def _feedback_exporter_class():
    from nbconvert.exporters import HTMLExporter

    class FeedbackExporter(HTMLExporter):
        """nbgrader's feedback HTML with sanitizing and a Content-Security-Policy."""

    FeedbackExporter.__module__ = __name__
    return FeedbackExporter


FeedbackExporter = _feedback_exporter_class()


def _insert(sequence, new, *, before=None, after=None):
    """Inserts ``new`` before the first ``before`` (or after the first ``after``) found by
    class name in ``sequence``; at the end when neither is there. Idempotent."""
    out = [p for p in sequence if getattr(p, "__name__", p) != new.__name__]
    names = [getattr(p, "__name__", str(p)) for p in out]
    anchor = before or after
    if anchor in names:
        position = names.index(anchor) + (1 if after else 0)
    else:
        position = len(out)
    out.insert(position, new)
    return out


def _current(c, section: str, trait: str):
    if trait in c[section]:
        return list(c[section][trait])
    from nbgrader.converters import Autograde, GenerateFeedback

    cls = {"Autograde": Autograde, "GenerateFeedback": GenerateFeedback}[section]
    return list(cls.class_traits()[trait].default())


def configure_feedback(c) -> None:
    """Adds what this module provides to an nbgrader ``Config`` ``c``; call it after
    everything else has set ``Autograde.autograde_preprocessors`` and
    ``GenerateFeedback.preprocessors``."""
    from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
    from nbgrader.preprocessors import ClearHiddenTests, GetGrades

    sanitize = _current(c, "Autograde", "sanitize_preprocessors")
    sanitize = _insert(sanitize, CapAttachments, before="DeduplicateIds")
    sanitize = _insert(sanitize, DeduplicateCells, before="DeduplicateIds")
    sanitize = _insert(sanitize, SanitizeMarkdown, after="OverwriteCells")
    c.Autograde.sanitize_preprocessors = sanitize

    autograde = _current(c, "Autograde", "autograde_preprocessors")
    anchor = "TrustedScores" if any(getattr(p, "__name__", "") == "TrustedScores" for p in autograde) else "SaveAutoGrades"
    autograde = _insert(autograde, DropUntrustedOutputs, before=anchor)
    autograde = _insert(autograde, DropUnscoredOutputs, after="SaveAutoGrades")
    c.Autograde.autograde_preprocessors = autograde

    feedback = [p for p in _current(c, "GenerateFeedback", "preprocessors")
                if getattr(p, "__name__", "") != "CSSHTMLHeaderPreprocessor"]
    for required in (GetGrades, ClearHiddenTests):
        if required.__name__ not in [getattr(p, "__name__", "") for p in feedback]:
            feedback.append(required)
    for extra in (CapAttachments, SanitizeMarkdown, PlainOutputs):
        feedback = _insert(feedback, extra)
    c.GenerateFeedback.preprocessors = [*feedback, CSSHTMLHeaderPreprocessor]

    # Rendering: nbconvert's own sanitizing of outputs and raw cells, no local files
    # read into the page, and our templates (which add the CSP) on top of nbgrader's.
    folder = template_dir()
    c.HTMLExporter.sanitize_html = True
    c.HTMLExporter.embed_images = False
    c.HTMLExporter.extra_template_paths = [folder]
    c.HTMLExporter.template_file = FORMGRADE_TEMPLATE_FILE  # the formgrader's exporter
    c.GenerateFeedback.exporter_class = FeedbackExporter
    c.FeedbackExporter.extra_template_paths = [folder, _bootstrap_css_dir()]
    c.FeedbackExporter.template_file = FEEDBACK_TEMPLATE_FILE
