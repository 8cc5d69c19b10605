//! Splitting a script into lines and lines into tokens, without allocation.

/// One line of a script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    /// 1-based line number.
    pub number: u32,
    /// Byte offset of the line's first byte in the script.
    pub offset: usize,
    /// The line without its terminating newline.
    pub text: &'a [u8],
}

impl<'a> Line<'a> {
    /// The first token of the line (empty for a blank or comment line).
    pub fn keyword(&self) -> &'a [u8] {
        Tokens::new(self.text).next().unwrap_or(b"")
    }
}

/// Iterator over the lines of a script.
#[derive(Debug, Clone)]
pub struct Lines<'a> {
    text: &'a [u8],
    pos: usize,
    number: u32,
}

impl<'a> Lines<'a> {
    pub fn new(text: &'a [u8]) -> Self {
        Self::starting_at(text, 0, 1)
    }

    /// Lines from byte `offset`, numbering the first one `number`.
    pub fn starting_at(text: &'a [u8], offset: usize, number: u32) -> Self {
        Lines { text, pos: offset.min(text.len()), number }
    }
}

impl<'a> Iterator for Lines<'a> {
    type Item = Line<'a>;

    fn next(&mut self) -> Option<Line<'a>> {
        if self.pos >= self.text.len() {
            return None;
        }
        let start = self.pos;
        let mut end = start;
        while end < self.text.len() && self.text[end] != b'\n' {
            end += 1;
        }
        self.pos = end + 1;
        let line = Line { number: self.number, offset: start, text: &self.text[start..end] };
        self.number = self.number.saturating_add(1);
        Some(line)
    }
}

/// Iterator over the whitespace-separated tokens of one line, stopping at `#`.
#[derive(Debug, Clone)]
pub(crate) struct Tokens<'a> {
    text: &'a [u8],
    pos: usize,
}

impl<'a> Tokens<'a> {
    pub(crate) fn new(text: &'a [u8]) -> Self {
        Tokens { text, pos: 0 }
    }

    /// Where the next token's search starts (after the last one returned).
    pub(crate) fn position(&self) -> usize {
        self.pos
    }
}

fn is_space(b: u8) -> bool {
    b == b' ' || b == b'\t' || b == b'\r'
}

impl<'a> Iterator for Tokens<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        while self.pos < self.text.len() && is_space(self.text[self.pos]) {
            self.pos += 1;
        }
        if self.pos >= self.text.len() || self.text[self.pos] == b'#' {
            self.pos = self.text.len();
            return None;
        }
        let start = self.pos;
        while self.pos < self.text.len()
            && !is_space(self.text[self.pos])
            && self.text[self.pos] != b'#'
        {
            self.pos += 1;
        }
        Some(&self.text[start..self.pos])
    }
}
