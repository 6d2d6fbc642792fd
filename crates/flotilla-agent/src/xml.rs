//! A minimal XML element tree. Every attribute value and text node is escaped on output, and
//! characters XML 1.0 cannot carry are replaced, so no user string can change the structure.

use std::fmt::Write;

pub struct Element {
    name: &'static str,
    attrs: Vec<(&'static str, String)>,
    children: Vec<Child>,
}

enum Child {
    Element(Element),
    Text(String),
}

impl Element {
    pub fn new(name: &'static str) -> Self {
        Element {
            name,
            attrs: Vec::new(),
            children: Vec::new(),
        }
    }

    pub fn attr(mut self, name: &'static str, value: impl ToString) -> Self {
        self.attrs.push((name, value.to_string()));
        self
    }

    pub fn child(mut self, child: Element) -> Self {
        self.children.push(Child::Element(child));
        self
    }

    pub fn children(mut self, children: impl IntoIterator<Item = Element>) -> Self {
        self.children
            .extend(children.into_iter().map(Child::Element));
        self
    }

    pub fn text(mut self, text: impl ToString) -> Self {
        self.children.push(Child::Text(text.to_string()));
        self
    }

    /// `<name>text</name>`
    pub fn leaf(name: &'static str, text: impl ToString) -> Self {
        Element::new(name).text(text)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out
    }

    fn write(&self, out: &mut String, depth: usize) {
        let pad = "  ".repeat(depth);
        let _ = write!(out, "{pad}<{}", self.name);
        for (k, v) in &self.attrs {
            let _ = write!(out, " {k}=\"{}\"", escape(v));
        }
        match self.children.as_slice() {
            [] => out.push_str("/>\n"),
            [Child::Text(t)] => {
                let _ = writeln!(out, ">{}</{}>", escape(t), self.name);
            }
            children => {
                out.push_str(">\n");
                for c in children {
                    match c {
                        Child::Element(e) => e.write(out, depth + 1),
                        Child::Text(t) => {
                            let _ = writeln!(out, "{pad}  {}", escape(t));
                        }
                    }
                }
                let _ = writeln!(out, "{pad}</{}>", self.name);
            }
        }
    }
}

/// Escapes markup characters; replaces characters not allowed in XML 1.0 with U+FFFD.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_attributes_and_text() {
        let e = Element::new("a")
            .attr("x", "\"><b y='1'>&")
            .child(Element::leaf("t", "</t><evil/>\u{1}"));
        assert_eq!(e.render(), "<a x=\"&quot;&gt;&lt;b y=&apos;1&apos;&gt;&amp;\">\n  <t>&lt;/t&gt;&lt;evil/&gt;\u{FFFD}</t>\n</a>\n");
    }
}
