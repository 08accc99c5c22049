"""MkDocs hook: render the Sphinx roles left in keras_hoopt's docstrings as plain code.

The docstrings are Google style but use Sphinx cross-reference roles
(``:class:`keras_hoopt.KFAC```, ``:func:`~x.y```) and reST ``::`` literal
markers, which Markdown shows verbatim (":class:keras_hoopt.KFAC"). This
rewrites the rendered HTML: the role prefix goes, ``~a.b.C`` becomes ``C``,
and a paragraph-ending ``::`` becomes ``:``.
"""

import re

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj):(<code>)(~)?([^<]*)(</code>)")
_LITERAL = re.compile(r"::(</p>)")


def _role(match):
    text = match.group(3)
    if match.group(2):  # ~a.b.C shows C
        text = text.rsplit(".", 1)[-1]
    return f"{match.group(1)}{text}{match.group(4)}"


def on_page_content(html, page, config, files):
    return _LITERAL.sub(r":\1", _ROLE.sub(_role, html))
