"""Just enough HTML parsing to check what a served page holds: elements, attributes, text."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list["Element"] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join("".join(self.parts).split())

    def select(self, tag: str, **attrs: str | bool) -> list["Element"]:
        """Descendants named ``tag`` with these attributes (``True``: present, any value;
        ``class_``: one of the classes)."""
        found = []
        for child in self.children:
            if child.tag == tag and all(_matches(child, k, v) for k, v in attrs.items()):
                found.append(child)
            found.extend(child.select(tag, **attrs))
        return found

    def one(self, tag: str, **attrs: str | bool) -> "Element":
        found = self.select(tag, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag} {attrs}> elements, expected one"
        return found[0]


def _matches(element: Element, key: str, wanted: str | bool) -> bool:
    if key == "class_":
        return wanted in element.attrs.get("class", "").split()
    name = key.replace("_", "-")
    if wanted is True:
        return name in element.attrs
    return element.attrs.get(name) == wanted


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Element(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        for element in self.stack:
            element.parts.append(data)


def parse(html: str) -> Element:
    builder = _Builder()
    builder.feed(html)
    builder.close()
    return builder.root
