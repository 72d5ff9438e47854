"""A mkdocs hook: every member an API page lists under `options: members:` must be
rendered, or the (strict) build fails. mkdocstrings itself skips a listed member it
cannot find without a word (an inherited method, without `inherited_members`)."""

import logging
import re


log = logging.getLogger("mkdocs.hooks.members")

_BLOCK = re.compile(r"^::: *(?P<ident>[\w.]+)\n(?P<body>(?:[ \t]+.*\n?)*)", re.MULTILINE)
_LISTED = re.compile(r"^[ \t]+members:[ \t]*\n(?P<items>(?:[ \t]+- .*\n?)+)", re.MULTILINE)
_listed: dict[str, list[str]] = {}


def on_page_markdown(markdown, page, **kwargs):
    listed = []
    for block in _BLOCK.finditer(markdown):
        members = _LISTED.search(block["body"])
        if members:
            names = re.findall(r"- *([\w.]+)", members["items"])
            listed += [f"{block['ident']}.{name}" for name in names]
    _listed[page.file.src_uri] = listed
    return markdown


def on_page_content(html, page, **kwargs):
    for ident in _listed.get(page.file.src_uri, []):
        if f'id="{ident}"' not in html:
            log.warning(f"{page.file.src_uri}: the listed member `{ident}` was not rendered.")
    return html
