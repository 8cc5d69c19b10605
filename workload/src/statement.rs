//! Parsing one line into a [`Statement`].

use crate::lex::Tokens;
use crate::{HUGE_PAGE_SIZE, MAX_LABEL_LEN, MAX_NAME_LEN, MIN_ADDR, PAGE_SIZE, SHARED_PAGES, SHARED_VA, USER_TOP};

/// A page range `[addr, addr + pages * 4096)`, validated to lie in the user half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub addr: u64,
    pub pages: u64,
}

impl Range {
    /// Length in bytes (cannot overflow: checked when parsed).
    pub fn len(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// First address after the range.
    pub fn end(&self) -> u64 {
        self.addr + self.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
}

/// Protection named by `protect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    ReadOnly,
    ReadWrite,
}

/// One statement of the workload language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statement<'a> {
    /// With `exec`, the process runs that Linux program instead of statements.
    Proc { name: &'a str, exec: Option<Exec<'a>> },
    Map { range: Range, huge: bool, read_only: bool, shared: bool },
    Unmap { range: Range },
    Protect { range: Range, prot: Protection },
    /// With `timed`, the guest reports the fill's duration in TSC cycles on the console.
    Fill { range: Range, byte: u8, timed: bool },
    Check { range: Range, byte: u8 },
    Touch { range: Range },
    Sync { label: &'a str },
    Loop { count: u64 },
    End,
    Yield,
    Exit { code: u8 },
}

/// `proc NAME exec PATH [ARGS...]`: a static Linux program from the guest's file
/// system (an absolute path) and its arguments, kept as the line's text after `exec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exec<'a> {
    text: &'a [u8],
}

/// Most arguments after the path.
pub const MAX_EXEC_ARGS: usize = 32;

impl<'a> Exec<'a> {
    /// The path, then each argument (split at spaces and tabs).
    pub fn words(&self) -> impl Iterator<Item = &'a [u8]> {
        Tokens::new(self.text)
    }
}

/// What was wrong with a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    UnknownStatement,
    MissingArgument,
    ExtraArgument,
    BadAddress,
    BadCount,
    BadByte,
    BadExitCode,
    UnalignedAddress,
    BelowMinAddress,
    OutsideUserHalf,
    ZeroPages,
    HugeUnaligned,
    SharedOutsideWindow,
    BadOption,
    BadName,
    BadLabel,
    NotAscii,
    StatementBeforeProc,
    EndWithoutLoop,
    LoopNotClosed,
    LoopTooDeep,
    TooManyProcs,
    NoProc,
    ScriptTooLong,
    BadExecPath,
    TooManyExecArgs,
    StatementInExecProc,
}

impl ErrorKind {
    /// A plain-sentence description, usable without `core::fmt`.
    pub fn describe(self) -> &'static str {
        match self {
            ErrorKind::UnknownStatement => "unknown statement",
            ErrorKind::BadExecPath => "the program after exec must be an absolute path",
            ErrorKind::TooManyExecArgs => "more than 32 arguments after exec",
            ErrorKind::StatementInExecProc => "a proc that execs a program has no statements of its own",
            ErrorKind::MissingArgument => "missing argument after",
            ErrorKind::ExtraArgument => "unexpected extra argument",
            ErrorKind::BadAddress => "address is not a hex number",
            ErrorKind::BadCount => "count is not a decimal number",
            ErrorKind::BadByte => "byte is not a number from 0 to 255",
            ErrorKind::BadExitCode => "exit code is not a number from 0 to 255",
            ErrorKind::UnalignedAddress => "address is not page-aligned (4096)",
            ErrorKind::BelowMinAddress => "address is below the lowest mappable address 0x10000",
            ErrorKind::OutsideUserHalf => "range reaches past the user half (0x800000000000)",
            ErrorKind::ZeroPages => "page count must be at least 1",
            ErrorKind::HugeUnaligned => "huge mapping needs a 2 MiB-aligned address and size",
            ErrorKind::SharedOutsideWindow => "shared mapping must lie in the shared window 0x600000000000-0x600000100000",
            ErrorKind::BadOption => "unknown option",
            ErrorKind::BadName => "process name must be 1-15 characters of [A-Za-z0-9_.-]",
            ErrorKind::BadLabel => "sync label must be 1-32 characters of [A-Za-z0-9_.-]",
            ErrorKind::NotAscii => "line contains a non-ASCII byte",
            ErrorKind::StatementBeforeProc => "statement before the first proc",
            ErrorKind::EndWithoutLoop => "end without loop",
            ErrorKind::LoopNotClosed => "loop is not closed by end",
            ErrorKind::LoopTooDeep => "loops nested deeper than 8",
            ErrorKind::TooManyProcs => "more than 16 processes",
            ErrorKind::NoProc => "script has no proc",
            ErrorKind::ScriptTooLong => "script is larger than 256 KiB",
        }
    }
}

/// A parse error: what was wrong and the token it was wrong about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseError<'a> {
    pub kind: ErrorKind,
    /// The offending token (ASCII, possibly empty).
    pub token: &'a [u8],
}

impl<'a> ParseError<'a> {
    pub fn new(kind: ErrorKind, token: &'a [u8]) -> Self {
        ParseError { kind, token }
    }
}

impl core::fmt::Display for ParseError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.kind.describe())?;
        if !self.token.is_empty() {
            f.write_str(" '")?;
            for &b in self.token {
                let c = if b.is_ascii_graphic() { b as char } else { '?' };
                core::fmt::Write::write_char(f, c)?;
            }
            f.write_str("'")?;
        }
        Ok(())
    }
}

type Result<'a, T> = core::result::Result<T, ParseError<'a>>;

/// Parses one line. `Ok(None)` for a blank or comment-only line.
pub fn parse_statement(line: &[u8]) -> Result<'_, Option<Statement<'_>>> {
    if let Some(pos) = line.iter().position(|b| !b.is_ascii()) {
        return Err(ParseError::new(ErrorKind::NotAscii, &line[pos..pos + 1]));
    }
    let mut args = Args { tokens: Tokens::new(line), last: b"" };
    let Some(keyword) = args.tokens.next() else { return Ok(None) };
    args.last = keyword;
    let stmt = match keyword {
        b"proc" => {
            let name = args.ident(ErrorKind::BadName, MAX_NAME_LEN)?;
            let exec = match args.tokens.next() {
                None => None,
                Some(b"exec") => {
                    let start = args.tokens.position();
                    let text = &line[start..];
                    let mut words = Tokens::new(text);
                    match words.next() {
                        Some(path) if path.first() == Some(&b'/') => {}
                        Some(path) => return Err(ParseError::new(ErrorKind::BadExecPath, path)),
                        None => return Err(ParseError::new(ErrorKind::MissingArgument, b"exec")),
                    }
                    if words.count() > MAX_EXEC_ARGS {
                        return Err(ParseError::new(ErrorKind::TooManyExecArgs, b"exec"));
                    }
                    // Everything after `exec` is the program's: nothing is left for the
                    // extra-argument check below.
                    while args.tokens.next().is_some() {}
                    Some(Exec { text })
                }
                Some(other) => return Err(ParseError::new(ErrorKind::ExtraArgument, other)),
            };
            Statement::Proc { name, exec }
        }
        b"map" => {
            let range = args.range()?;
            let (mut huge, mut read_only, mut shared) = (false, false, false);
            for opt in args.tokens.by_ref() {
                match opt {
                    b"huge" if !huge && !shared => huge = true,
                    b"ro" if !read_only => read_only = true,
                    b"shared" if !shared && !huge => shared = true,
                    _ => return Err(ParseError::new(ErrorKind::BadOption, opt)),
                }
            }
            if huge && (range.addr % HUGE_PAGE_SIZE != 0 || range.len() % HUGE_PAGE_SIZE != 0) {
                return Err(ParseError::new(ErrorKind::HugeUnaligned, keyword));
            }
            if shared && (range.addr < SHARED_VA || range.end() > SHARED_VA + SHARED_PAGES * PAGE_SIZE) {
                return Err(ParseError::new(ErrorKind::SharedOutsideWindow, keyword));
            }
            Statement::Map { range, huge, read_only, shared }
        }
        b"unmap" => Statement::Unmap { range: args.range()? },
        b"protect" => {
            let range = args.range()?;
            let prot = match args.next()? {
                b"ro" => Protection::ReadOnly,
                b"rw" => Protection::ReadWrite,
                other => return Err(ParseError::new(ErrorKind::BadOption, other)),
            };
            Statement::Protect { range, prot }
        }
        b"fill" => {
            let (range, byte) = (args.range()?, args.byte()?);
            let timed = match args.tokens.next() {
                None => false,
                Some(b"timed") => true,
                Some(other) => return Err(ParseError::new(ErrorKind::BadOption, other)),
            };
            Statement::Fill { range, byte, timed }
        }
        b"check" => Statement::Check { range: args.range()?, byte: args.byte()? },
        b"touch" => Statement::Touch { range: args.range()? },
        b"sync" => Statement::Sync { label: args.ident(ErrorKind::BadLabel, MAX_LABEL_LEN)? },
        b"loop" => Statement::Loop { count: args.count()? },
        b"end" => Statement::End,
        b"yield" => Statement::Yield,
        b"exit" => {
            let tok = args.next()?;
            let code = parse_decimal(tok)
                .filter(|&c| c <= 255)
                .ok_or(ParseError::new(ErrorKind::BadExitCode, tok))?;
            Statement::Exit { code: code as u8 }
        }
        _ => return Err(ParseError::new(ErrorKind::UnknownStatement, keyword)),
    };
    if let Some(extra) = args.tokens.next() {
        return Err(ParseError::new(ErrorKind::ExtraArgument, extra));
    }
    Ok(Some(stmt))
}

struct Args<'a> {
    tokens: Tokens<'a>,
    /// The token before the next one, to name in "missing argument after ...".
    last: &'a [u8],
}

impl<'a> Args<'a> {
    fn next(&mut self) -> Result<'a, &'a [u8]> {
        let tok = self.tokens.next().ok_or(ParseError::new(ErrorKind::MissingArgument, self.last))?;
        self.last = tok;
        Ok(tok)
    }

    fn count(&mut self) -> Result<'a, u64> {
        let tok = self.next()?;
        parse_decimal(tok).ok_or(ParseError::new(ErrorKind::BadCount, tok))
    }

    fn byte(&mut self) -> Result<'a, u8> {
        let tok = self.next()?;
        let value = match tok.strip_prefix(b"0x") {
            Some(hex) => parse_hex(hex),
            None => parse_decimal(tok),
        };
        value.filter(|&v| v <= 255).map(|v| v as u8).ok_or(ParseError::new(ErrorKind::BadByte, tok))
    }

    fn range(&mut self) -> Result<'a, Range> {
        let addr_tok = self.next()?;
        let addr = parse_hex(addr_tok.strip_prefix(b"0x").unwrap_or(addr_tok))
            .ok_or(ParseError::new(ErrorKind::BadAddress, addr_tok))?;
        if addr % PAGE_SIZE != 0 {
            return Err(ParseError::new(ErrorKind::UnalignedAddress, addr_tok));
        }
        if addr < MIN_ADDR {
            return Err(ParseError::new(ErrorKind::BelowMinAddress, addr_tok));
        }
        let pages_tok = self.next()?;
        let pages = parse_decimal(pages_tok).ok_or(ParseError::new(ErrorKind::BadCount, pages_tok))?;
        if pages == 0 {
            return Err(ParseError::new(ErrorKind::ZeroPages, pages_tok));
        }
        let end = pages.checked_mul(PAGE_SIZE).and_then(|len| len.checked_add(addr));
        match end {
            Some(end) if end <= USER_TOP => Ok(Range { addr, pages }),
            _ => Err(ParseError::new(ErrorKind::OutsideUserHalf, pages_tok)),
        }
    }

    fn ident(&mut self, kind: ErrorKind, max: usize) -> Result<'a, &'a str> {
        let tok = self.next()?;
        let ok = !tok.is_empty()
            && tok.len() <= max
            && tok.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
        if !ok {
            return Err(ParseError::new(kind, tok));
        }
        // SAFETY: every byte was just checked to be ASCII, so the slice is valid UTF-8.
        // (`core::str::from_utf8` is avoided: its precompiled code may use SSE.)
        Ok(unsafe { core::str::from_utf8_unchecked(tok) })
    }
}

/// Parses a decimal number; `None` on empty input, a non-digit or overflow.
pub(crate) fn parse_decimal(tok: &[u8]) -> Option<u64> {
    if tok.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &b in tok {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

/// Parses hex digits (no prefix); `None` on empty input, a non-hex digit or overflow.
pub(crate) fn parse_hex(tok: &[u8]) -> Option<u64> {
    if tok.is_empty() || tok.len() > 16 {
        return None;
    }
    let mut v: u64 = 0;
    for &b in tok {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | u64::from(d);
    }
    Some(v)
}
