//! Exit statuses: each failure a script may want to tell apart has its own.
use std::process::ExitCode;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    Unexpected = 1,
    Usage = 2,
    AgentUnreachable = 3,
    TargetNotFound = 4,
    Conflict = 5,
    PermissionDenied = 6,
    SessionLost = 7,
    Rejected = 8,
}

/// Why remocal stops, as one line for stderr and a status for the shell.
#[derive(Debug)]
pub struct Failure {
    status: Status,
    message: String,
    /// The exit code, when it is not the status's: that of a local
    /// command remocal ran and exits as.
    code: Option<u8>,
}

impl Failure {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            code: None,
        }
    }

    /// Exits with `code` (a local command's), saying `message` when it is
    /// not empty.
    pub fn with_code(code: u8, message: impl Into<String>) -> Self {
        Self {
            code: Some(code),
            ..Self::new(Status::Unexpected, message)
        }
    }

    pub fn unexpected(message: impl Into<String>) -> Self {
        Self::new(Status::Unexpected, message)
    }

    pub fn session_lost(message: impl Into<String>) -> Self {
        Self::new(Status::SessionLost, message)
    }

    /// A status the agent answered when opening a session.
    pub fn from_status(status: &tonic::Status, agent: &impl std::fmt::Display) -> Self {
        use tonic::Code;
        let message = status.message().to_string();
        match status.code() {
            Code::NotFound => Self::new(Status::TargetNotFound, message),
            Code::AlreadyExists => Self::new(Status::Conflict, message),
            Code::PermissionDenied | Code::Unauthenticated => {
                Self::new(Status::PermissionDenied, message)
            }
            Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::ResourceExhausted => Self::new(Status::Rejected, message),
            Code::Unavailable => Self::new(
                Status::AgentUnreachable,
                format!("{agent} is unavailable: {message}"),
            ),
            code => Self::new(
                Status::Unexpected,
                format!("{agent} failed ({code:?}): {message}"),
            ),
        }
    }

    pub fn status(&self) -> Status {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn report(self) -> ExitCode {
        if !self.message.is_empty() {
            eprintln!("error: {}", self.message);
        }
        ExitCode::from(self.code.unwrap_or(self.status as u8))
    }
}

/// The innermost reason of an error chain: what a user can act on.
pub fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_statuses_map_to_distinct_exit_codes() {
        let agent = "http://127.0.0.1:7420";
        let cases = [
            (tonic::Code::NotFound, Status::TargetNotFound),
            (tonic::Code::AlreadyExists, Status::Conflict),
            (tonic::Code::PermissionDenied, Status::PermissionDenied),
            (tonic::Code::InvalidArgument, Status::Rejected),
            (tonic::Code::FailedPrecondition, Status::Rejected),
            (tonic::Code::ResourceExhausted, Status::Rejected),
            (tonic::Code::Unavailable, Status::AgentUnreachable),
            (tonic::Code::Internal, Status::Unexpected),
        ];
        for (code, expected) in cases {
            let failure = Failure::from_status(&tonic::Status::new(code, "why"), &agent);
            assert_eq!(failure.status, expected, "{code:?}");
            assert!(
                failure.message.contains("why"),
                "{code:?}: {}",
                failure.message
            );
        }
    }
}
