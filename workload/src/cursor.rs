//! Running one process's block of a script: loops are unrolled here so that an
//! executor (the guest runtime, the Linux oracle) only sees actions.

use crate::lex::{Line, Lines};
use crate::statement::{parse_statement, ErrorKind, ParseError, Statement};
use crate::{ScriptError, MAX_LOOP_DEPTH};

#[derive(Debug, Clone, Copy, Default)]
struct Frame {
    body_pos: usize,
    body_line: u32,
    remaining: u64,
}

/// Walks the statements of one `proc` block, expanding `loop`/`end`.
#[derive(Debug, Clone)]
pub struct BlockCursor<'a> {
    script: &'a [u8],
    pos: usize,
    line: u32,
    stack: [Frame; MAX_LOOP_DEPTH],
    depth: usize,
}

/// The `proc NAME exec ...` lines: (process index, the program and its arguments).
pub fn execs(script: &[u8]) -> impl Iterator<Item = (usize, crate::Exec<'_>)> {
    Lines::new(script)
        .filter(|line| line.keyword() == b"proc")
        .enumerate()
        .filter_map(|(index, line)| match parse_statement(line.text) {
            Ok(Some(Statement::Proc { exec: Some(exec), .. })) => Some((index, exec)),
            _ => None,
        })
}

/// The names of the script's processes, in pid order (pid = index + 1), with their lines.
/// Lines that do not parse are skipped: run [`crate::validate`] first.
pub fn proc_names(script: &[u8]) -> impl Iterator<Item = (u32, &str)> {
    Lines::new(script).filter_map(|line| {
        if line.keyword() != b"proc" {
            return None;
        }
        match parse_statement(line.text) {
            Ok(Some(Statement::Proc { name, .. })) => Some((line.number, name)),
            _ => None,
        }
    })
}

impl<'a> BlockCursor<'a> {
    /// A cursor at the first statement after the `index`-th (0-based) `proc` line.
    pub fn for_proc(script: &'a [u8], index: usize) -> Option<Self> {
        let mut seen = 0;
        for line in Lines::new(script) {
            if line.keyword() == b"proc" {
                if seen == index {
                    return Some(BlockCursor {
                        script,
                        pos: line.offset + line.text.len() + 1,
                        line: line.number + 1,
                        stack: [Frame::default(); MAX_LOOP_DEPTH],
                        depth: 0,
                    });
                }
                seen += 1;
            }
        }
        None
    }

    fn next_line(&mut self) -> Option<Line<'a>> {
        let line = Lines::starting_at(self.script, self.pos, self.line).next()?;
        self.pos = line.offset + line.text.len() + 1;
        self.line = line.number + 1;
        Some(line)
    }

    /// The next action (any statement but `proc`, `loop` and `end`) with its line number;
    /// `None` at the end of the block.
    pub fn next_action(&mut self) -> Option<Result<(u32, Statement<'a>), ScriptError<'a>>> {
        loop {
            let Some(line) = self.next_line() else {
                return self.end_of_block(self.line.saturating_sub(1));
            };
            let err = |kind, token| Some(Err(ScriptError { line: line.number, error: ParseError::new(kind, token) }));
            let stmt = match parse_statement(line.text) {
                Ok(Some(stmt)) => stmt,
                Ok(None) => continue,
                Err(error) => return Some(Err(ScriptError { line: line.number, error })),
            };
            match stmt {
                Statement::Proc { .. } => return self.end_of_block(line.number),
                Statement::Loop { count: 0 } => {
                    if let Err(e) = self.skip_loop_body(line.number) {
                        return Some(Err(e));
                    }
                }
                Statement::Loop { count } => {
                    if self.depth == MAX_LOOP_DEPTH {
                        return err(ErrorKind::LoopTooDeep, b"loop");
                    }
                    self.stack[self.depth] = Frame { body_pos: self.pos, body_line: self.line, remaining: count };
                    self.depth += 1;
                }
                Statement::End => {
                    if self.depth == 0 {
                        return err(ErrorKind::EndWithoutLoop, b"end");
                    }
                    let frame = &mut self.stack[self.depth - 1];
                    frame.remaining -= 1;
                    if frame.remaining > 0 {
                        self.pos = frame.body_pos;
                        self.line = frame.body_line;
                    } else {
                        self.depth -= 1;
                    }
                }
                action => return Some(Ok((line.number, action))),
            }
        }
    }

    fn end_of_block(&mut self, line: u32) -> Option<Result<(u32, Statement<'a>), ScriptError<'a>>> {
        if self.depth > 0 {
            self.depth = 0;
            return Some(Err(ScriptError { line, error: ParseError::new(ErrorKind::LoopNotClosed, b"loop") }));
        }
        self.pos = self.script.len();
        None
    }

    /// Skips past the `end` matching a `loop 0` on line `loop_line`.
    fn skip_loop_body(&mut self, loop_line: u32) -> Result<(), ScriptError<'a>> {
        let mut nested = 1usize;
        while let Some(line) = self.next_line() {
            match line.keyword() {
                b"loop" => nested += 1,
                b"end" => {
                    nested -= 1;
                    if nested == 0 {
                        return Ok(());
                    }
                }
                b"proc" => break,
                _ => {}
            }
        }
        Err(ScriptError { line: loop_line, error: ParseError::new(ErrorKind::LoopNotClosed, b"loop") })
    }
}
