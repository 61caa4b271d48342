//! Where each value of a JSON document starts, by JSON pointer, so that validation errors can
//! name a line and column. `serde_json::Value` forgets positions; this scanner runs once over a
//! document that `serde_json` has already accepted and records them.

use std::collections::HashMap;

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    /// Line, from 1.
    pub line: u32,
    /// Column (in characters), from 1.
    pub column: u32,
}

/// Positions of the values (and object keys) of one document.
#[derive(Debug, Default, Clone)]
pub struct Spans {
    values: HashMap<String, Pos>,
    keys: HashMap<String, Pos>,
    duplicates: Vec<(String, Pos, Pos)>,
}

impl Spans {
    /// Indexes `text`, which must be valid JSON (on invalid input the index is partial).
    pub fn index(text: &str) -> Spans {
        let mut s = Scanner {
            src: text.as_bytes(),
            text,
            i: 0,
            line: 1,
            col: 1,
            spans: Spans::default(),
        };
        let mut path = String::new();
        s.value(&mut path);
        s.spans
    }

    /// Where the value at `pointer` starts (e.g. `/nodes/2/qos`).
    pub fn value(&self, pointer: &str) -> Option<Pos> {
        self.values.get(pointer).copied()
    }

    /// Keys that appear twice in one object: (pointer, first position, second position).
    pub fn duplicates(&self) -> &[(String, Pos, Pos)] {
        &self.duplicates
    }

    /// Where the key of the member at `pointer` starts, falling back to its value, then to the
    /// nearest enclosing value.
    pub fn key_or_value(&self, pointer: &str) -> Option<Pos> {
        if let Some(p) = self.keys.get(pointer).or_else(|| self.values.get(pointer)) {
            return Some(*p);
        }
        let mut p = pointer;
        while let Some(cut) = p.rfind('/') {
            p = &p[..cut];
            if let Some(pos) = self.values.get(p) {
                return Some(*pos);
            }
        }
        None
    }
}

struct Scanner<'a> {
    src: &'a [u8],
    text: &'a str,
    i: usize,
    line: u32,
    col: u32,
    spans: Spans,
}

impl Scanner<'_> {
    fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            column: self.col,
        }
    }

    fn bump(&mut self) {
        if let Some(&b) = self.src.get(self.i) {
            self.i += 1;
            if b == b'\n' {
                self.line += 1;
                self.col = 1;
            } else if b & 0xC0 != 0x80 {
                // Count characters, not bytes: continuation bytes do not move the column.
                self.col += 1;
            }
        }
    }

    fn ws(&mut self) {
        while matches!(self.src.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.bump();
        }
    }

    fn value(&mut self, path: &mut String) {
        self.ws();
        self.spans.values.insert(path.clone(), self.pos());
        match self.src.get(self.i) {
            Some(b'{') => self.object(path),
            Some(b'[') => self.array(path),
            Some(b'"') => {
                self.string();
            }
            Some(_) => {
                while matches!(self.src.get(self.i), Some(b) if !matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                {
                    self.bump();
                }
            }
            None => {}
        }
    }

    /// Scans a string and returns its decoded text.
    fn string(&mut self) -> String {
        let start = self.i;
        self.bump(); // opening quote
        while let Some(&b) = self.src.get(self.i) {
            match b {
                b'\\' => {
                    self.bump();
                    self.bump();
                }
                b'"' => {
                    self.bump();
                    break;
                }
                _ => self.bump(),
            }
        }
        let raw = self.text.get(start..self.i).unwrap_or("\"\"");
        serde_json::from_str(raw).unwrap_or_default()
    }

    fn object(&mut self, path: &mut String) {
        self.bump(); // {
        loop {
            self.ws();
            match self.src.get(self.i) {
                Some(b'"') => {
                    let key_pos = self.pos();
                    let key = self.string();
                    let len = path.len();
                    path.push('/');
                    path.push_str(&escape(&key));
                    if let Some(first) = self.spans.keys.insert(path.clone(), key_pos) {
                        // Keep the first position for messages about the member.
                        self.spans.keys.insert(path.clone(), first);
                        self.spans.duplicates.push((path.clone(), first, key_pos));
                    }
                    self.ws();
                    if self.src.get(self.i) == Some(&b':') {
                        self.bump();
                    }
                    self.value(path);
                    path.truncate(len);
                    self.ws();
                    if self.src.get(self.i) == Some(&b',') {
                        self.bump();
                    }
                }
                Some(b'}') => {
                    self.bump();
                    return;
                }
                _ => return,
            }
        }
    }

    fn array(&mut self, path: &mut String) {
        self.bump(); // [
        let mut n = 0usize;
        loop {
            self.ws();
            match self.src.get(self.i) {
                Some(b']') => {
                    self.bump();
                    return;
                }
                None => return,
                _ => {
                    let len = path.len();
                    path.push('/');
                    path.push_str(&n.to_string());
                    self.value(path);
                    path.truncate(len);
                    n += 1;
                    self.ws();
                    if self.src.get(self.i) == Some(&b',') {
                        self.bump();
                    }
                }
            }
        }
    }
}

/// JSON-pointer escaping of one reference token.
pub fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_values_and_keys() {
        let text =
            "{\n  \"nodes\": [\n    {\"id\": \"a\", \"qos\": 3},\n    {\"id\": \"b/c\"}\n  ]\n}";
        let s = Spans::index(text);
        assert_eq!(s.value(""), Some(Pos { line: 1, column: 1 }));
        assert_eq!(s.value("/nodes/0"), Some(Pos { line: 3, column: 5 }));
        assert_eq!(
            s.key_or_value("/nodes/0/qos"),
            Some(Pos {
                line: 3,
                column: 17
            })
        );
        assert_eq!(
            s.value("/nodes/0/qos"),
            Some(Pos {
                line: 3,
                column: 24
            })
        );
        assert_eq!(
            s.value("/nodes/1/id"),
            Some(Pos {
                line: 4,
                column: 12
            })
        );
        // Missing members fall back to their parent.
        assert_eq!(
            s.key_or_value("/nodes/1/nope"),
            Some(Pos { line: 4, column: 5 })
        );
    }

    #[test]
    fn records_duplicate_keys() {
        let s = Spans::index("{\"a\": 1,\n \"a\": 2}");
        assert_eq!(
            s.duplicates(),
            &[(
                "/a".to_string(),
                Pos { line: 1, column: 2 },
                Pos { line: 2, column: 2 }
            )]
        );
    }

    #[test]
    fn counts_characters_not_bytes() {
        let s = Spans::index("{\"é\": 1, \"x\": 2}");
        assert_eq!(
            s.key_or_value("/x"),
            Some(Pos {
                line: 1,
                column: 10
            })
        );
    }
}
