//! The `vmm` process's exit status, one enum for every command.

/// How `vmm` ends. Guest statuses pass through unchanged, so scripts that want to be
/// told apart from VMM failures use exit codes below 64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// The guest ran to the end and every process exited 0 (or a client command succeeded).
    Success,
    /// The guest's own status: the first failing process's exit code.
    Guest(u8),
    /// Bad input: command line, image, workload script, API request arguments.
    BadInput,
    /// The VMM refused a request (unknown pid, VM not paused, ...).
    Refused,
    /// KVM or the control socket cannot be reached.
    Unavailable,
    /// A VMM or KVM failure.
    Internal,
    /// Writing the output failed (disk full, I/O error); nothing was half-written.
    IoError,
    /// The guest crashed: triple fault, emulation failure, kernel panic.
    GuestCrashed,
    /// The guest did not finish within `--timeout`.
    Timeout,
    /// The VM migrated to another VMM, which runs it now (`vmm run` on the source).
    MigratedAway,
    /// `vmm run --incoming` in post-copy: the source failed before every frame arrived,
    /// and the guest is lost.
    PostcopyFailed,
}

impl ExitCode {
    pub fn code(self) -> u8 {
        match self {
            ExitCode::Success => 0,
            ExitCode::Guest(c) => c,
            ExitCode::BadInput => 64,
            ExitCode::Refused => 65,
            ExitCode::Unavailable => 69,
            ExitCode::Internal => 70,
            ExitCode::IoError => 74,
            ExitCode::GuestCrashed => 71,
            ExitCode::Timeout => 124,
            ExitCode::MigratedAway => 80,
            ExitCode::PostcopyFailed => 81,
        }
    }
}
