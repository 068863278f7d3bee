"""
The HTML of the contact sheet tab: the report as written (plus a small script), or, until the
report exists, a live sheet built from the generate tasks' results.

The tab is an ``<iframe>`` the Airflow UI sandboxes (``allow-scripts allow-same-origin
allow-forms allow-downloads``: no top-level navigation, no pop-ups), so links to Airflow pages
cannot leave the frame by themselves. The script makes them navigate the UI around the frame,
and scrolls to and highlights the group named by the UI page's anchor (``#group-3``).
"""

from __future__ import annotations

import html
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from imagecb_provider.batch.report import CONTACT_SHEET_CSS, task_instance_url
from imagecb_provider.ui.lookup import SUCCESS, Group

#: Served with every page: nothing but these scripts, styles and images; framed only by the UI.
CSP = (
    "default-src 'none'; img-src 'self' https: http: data:; style-src 'unsafe-inline'; "
    "script-src 'nonce-{nonce}'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)

_SCRIPT = """
(function () {
  var framed = window.top !== window.self;
  function groupOf(card) {
    if (card.dataset.group) { return card.dataset.group; }
    var link = card.querySelector("a.ti");
    var match = link && /\\/mapped\\/(\\d+)$/.exec(link.getAttribute("href") || "");
    return match ? match[1] : null;
  }
  function wanted() {
    var hash = window.location.hash;
    try { if (framed && window.top.location.hash) { hash = window.top.location.hash; } } catch (e) {}
    var match = /^#group-(\\d+)$/.exec(hash || "");
    return match ? match[1] : null;
  }
  function highlight() {
    var group = wanted();
    var first = null;
    document.querySelectorAll(".card").forEach(function (card) {
      var chosen = group !== null && groupOf(card) === group;
      card.classList.toggle("imagecb-chosen", chosen);
      if (chosen && first === null) { first = card; }
    });
    if (first) { first.scrollIntoView({block: "center"}); }
  }
  function openInUi(url) {
    var top = window.top;
    var target = new URL(url, window.location.href);
    if (target.origin === top.location.origin) {
      top.history.pushState(null, "", target.pathname + target.search + target.hash);
      top.dispatchEvent(new PopStateEvent("popstate", {state: null}));
      return;
    }
    var link = top.document.createElement("a");
    link.href = target.href;
    top.document.body.appendChild(link);
    link.click();
    link.remove();
  }
  document.addEventListener("click", function (event) {
    var link = event.target.closest && event.target.closest("a[target=_top]");
    if (!framed || !link || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey) {
      return;
    }
    event.preventDefault();
    try { openInUi(link.href); } catch (e) { window.location.href = link.href; }
  });
  highlight();
  window.addEventListener("hashchange", highlight);
  try { if (framed) { window.top.addEventListener("hashchange", highlight); } } catch (e) {}
})();
"""
_STYLE = ".card.imagecb-chosen{outline:4px solid #1565c0;outline-offset:2px}"


def new_nonce() -> str:
    """Return a fresh nonce for one page's script."""
    return secrets.token_urlsafe(16)


def content_security_policy(nonce: str) -> str:
    """
    Return the Content-Security-Policy header of a page.

    :param nonce: the nonce its one script carries
    """
    return CSP.format(nonce=nonce)


def with_view_script(page: str, nonce: str) -> str:
    """
    Return a contact sheet with the tab's script and highlight style added before ``</body>``.

    :param page: the report's HTML
    :param nonce: the script's nonce (see :func:`content_security_policy`)
    """
    extra = f'<style>{_STYLE}</style><script nonce="{html.escape(nonce)}">{_SCRIPT}</script>'
    head, found, tail = page.rpartition("</body>")
    return f"{head}{extra}</body>{tail}" if found else page + extra


# The contact sheet's own style, and what only the live page shows.
_LIVE_CSS = (
    CONTACT_SHEET_CSS
    + """
h2{font-size:16px;margin:18px 0 8px} .badge{background:#757575} .badge.success{background:#2e7d32}
.state{font-size:12px;color:#555}
.notice{background:#fff3e0;border:1px solid #ef6c00;border-radius:6px;padding:8px 12px;margin-bottom:16px;
word-break:break-word}
"""
)


def _image(result: Mapping[str, Any]) -> str:
    """Return a result's image tag (http(s) URLs only), or the *no image* box."""
    url = result.get("result_image_url")
    if result.get("outcome") == SUCCESS and isinstance(url, str) and url.startswith(("https://", "http://")):
        alt = html.escape(str(result.get("prompt") or ""))
        return f'<img src="{html.escape(url)}" alt="{alt}" loading="lazy" referrerpolicy="no-referrer">'
    return '<div class="none">no image</div>'


def _live_card(result: Mapping[str, Any], group: Group, ti_url: str) -> str:
    """Return one prompt's card: image, outcome, prompt, the reason when lost, the group's link."""
    outcome = str(result.get("outcome") or "unknown")
    lost = outcome != SUCCESS
    reason = html.escape(str(result.get("message") or "")) if lost else ""
    return (
        f'<div class="card{" lost" if lost else ""}" data-group="{group.map_index}">{_image(result)}'
        f'<div class="body"><span class="badge {html.escape(outcome)}">{html.escape(outcome)}</span>'
        f'<div class="prompt">{html.escape(str(result.get("prompt") or ""))}</div>'
        + (f'<div class="reason">{reason}</div>' if reason else "")
        + f'<a class="ti" href="{html.escape(ti_url)}" target="_top">{html.escape(_label(group))}</a>'
        "</div></div>"
    )


def _label(group: Group) -> str:
    """Return what a group is called in the UI: its rendered map index, else task id and index."""
    if group.label:
        return group.label
    return group.task_id if group.map_index < 0 else f"{group.task_id} [{group.map_index}]"


def _group_section(group: Group, *, ui_url: str, dag_id: str, run_id: str) -> str:
    """Return a group's heading (name, state, task instance link) and its cards."""
    index = None if group.map_index < 0 else group.map_index
    ti_url = task_instance_url(ui_url, dag_id, run_id, group.task_id, index)
    state = html.escape(str(group.state or "not started"))
    head = (
        f'<h2>{html.escape(_label(group))} <span class="state">{state}</span> '
        f'<a class="ti" href="{html.escape(ti_url)}" target="_top">task instance</a></h2>'
    )
    if not group.results:
        return head + '<div class="meta">No result yet.</div>'
    cards = "".join(_live_card(result, group, ti_url) for result in group.results)
    return f'{head}<div class="grid">{cards}</div>'


def live_sheet(
    *, dag_id: str, run_id: str, groups: Iterable[Group], ui_url: str, nonce: str, notice: str = ""
) -> str:
    """
    Return the page shown while a run has no report: each generate task and its results so far.

    Images are the vendor's result URLs (the archived copies are shown once the report exists).

    :param dag_id: the DAG id
    :param run_id: the run id
    :param groups: the run's generate task instances (:func:`~.lookup.generated_groups`)
    :param ui_url: the UI's base URL, for the task instance links
    :param nonce: the script's nonce
    :param notice: why the run's report is not shown, when it has one (shown first)
    """
    groups = list(groups)
    title = html.escape(f"Images of {dag_id} / {run_id}")
    body = "".join(_group_section(g, ui_url=ui_url, dag_id=dag_id, run_id=run_id) for g in groups)
    if notice:
        note = "The results so far:" if groups else "This run has no image generation task."
    elif groups:
        note = (
            "No contact sheet for this run yet: it shows here once the run's report task has returned "
            "its path. The results so far:"
        )
    else:
        note = "This run has no contact sheet and no image generation task."
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{_LIVE_CSS}</style></head><body><h1>{title}</h1>"
        + (f'<div class="notice">{html.escape(notice)}</div>' if notice else "")
        + f'<div class="meta">{html.escape(note)}</div>{body}</body></html>'
    )
    return with_view_script(page, nonce)


def notice_page(title: str, text: str) -> str:
    """
    Return a page that says one thing, such as why a file is not served (it has no script).

    :param title: the page's heading
    :param text: what to say
    """
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_LIVE_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<div class="notice">{html.escape(text)}</div></body></html>'
    )
