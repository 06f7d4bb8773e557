//! `--header`, `--path` and `--method` of a filtered steal: turned into the
//! agent's `HttpFilter` and checked here, with the agent's own rules, so a
//! typo is a usage error before anything in the cluster is touched, and
//! rendered back as the flags that would give the same filter.
use regex::RegexBuilder;
use remocal_proto::filter::{is_token, quote};
use remocal_proto::v1::{HeaderMatch, HttpFilter};
use serde_json::{Value, json};

use crate::{
    cli::FilterArgs,
    exit::{Failure, Status},
};

/// The agent refuses more header conditions than this.
pub const MAX_HEADERS: usize = 8;
/// The agent refuses longer patterns (and header names) than this, in bytes.
pub const MAX_PATTERN: usize = 1024;
/// The agent refuses longer methods than this, in bytes.
const MAX_METHOD: usize = 32;
/// The compiled-size cap the agent compiles with: a pattern it would find
/// too big must be refused here too.
const COMPILED_LIMIT: usize = 128 * 1024;
/// Where to read the syntax the patterns use.
const REGEX_SYNTAX: &str = "https://docs.rs/regex/latest/regex/#syntax";

/// The filter the flags ask for, or `None` for a whole-port steal.
pub fn from_args(args: &FilterArgs) -> Result<Option<HttpFilter>, Failure> {
    if args.headers.is_empty() && args.path.is_none() && args.method.is_none() {
        return Ok(None);
    }
    if args.headers.len() > MAX_HEADERS {
        return Err(usage(format!(
            "{} --header conditions given; the agent takes at most {MAX_HEADERS}: drop some",
            args.headers.len()
        )));
    }
    let headers = args
        .headers
        .iter()
        .map(|header| parse_header(header))
        .collect::<Result<_, _>>()?;
    let path = match &args.path {
        Some(path) if path.is_empty() => {
            return Err(usage(
                "--path '' is empty: give a regular expression such as '^/api/', or leave --path out",
            ));
        }
        Some(path) => {
            check_pattern(&shown("--path", path), path)?;
            path.clone()
        }
        None => String::new(),
    };
    let method = match &args.method {
        Some(method) => parse_method(method)?,
        None => String::new(),
    };
    Ok(Some(HttpFilter {
        headers,
        path,
        method,
    }))
}

/// `NAME: REGEX`, split at the first ':' (a value may hold more).
fn parse_header(flag: &str) -> Result<HeaderMatch, Failure> {
    let shown = shown("--header", flag);
    let Some((name, value)) = flag.split_once(':') else {
        return Err(usage(format!(
            "{shown} has no ':': write it as --header 'NAME: REGEX', e.g. --header 'x-dev: alice'"
        )));
    };
    let name = name.trim();
    let value = value.trim_start();
    if name.is_empty() {
        return Err(usage(format!(
            "{shown} has no header name before ':': write it as --header 'NAME: REGEX'"
        )));
    }
    if name.len() > MAX_PATTERN || !name.bytes().all(is_token) {
        return Err(usage(format!(
            "{shown}: {} is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only, at most {MAX_PATTERN} bytes)",
            quote(&truncated(name))
        )));
    }
    if value.is_empty() {
        return Err(usage(format!(
            "{shown} has no value to match: put a regular expression after ':' (any value: --header '{name}: .*')"
        )));
    }
    check_pattern(&shown, value)?;
    Ok(HeaderMatch {
        name: name.to_string(),
        value: value.to_string(),
    })
}

/// Upper case, as HTTP sends methods and the agent compares them.
fn parse_method(method: &str) -> Result<String, Failure> {
    if method.is_empty() {
        return Err(usage(
            "--method '' is empty: give a method such as GET or POST, or leave --method out",
        ));
    }
    if method.len() > MAX_METHOD || !method.bytes().all(is_token) {
        return Err(usage(format!(
            "{} is not an HTTP method: give a single word such as GET or POST",
            shown("--method", method)
        )));
    }
    Ok(method.to_ascii_uppercase())
}

/// Compiles `pattern` as the agent will, so the agent never refuses it.
fn check_pattern(shown: &str, pattern: &str) -> Result<(), Failure> {
    if pattern.len() > MAX_PATTERN {
        return Err(usage(format!(
            "{shown} is {} bytes long; the agent takes patterns of at most {MAX_PATTERN} bytes: shorten it",
            pattern.len()
        )));
    }
    RegexBuilder::new(pattern)
        .size_limit(COMPILED_LIMIT)
        .dfa_size_limit(COMPILED_LIMIT)
        .build()
        .map(drop)
        .map_err(|err| {
            usage(format!(
                "{shown} is not a valid regular expression: {}; fix it (syntax: {REGEX_SYNTAX})",
                regex_reason(&err)
            ))
        })
}

/// The regex crate explains a syntax error over several lines, with carets
/// under the pattern; errors here are one line, so keep the reason and
/// where it is.
fn regex_reason(err: &regex::Error) -> String {
    let text = err.to_string();
    let lines: Vec<&str> = text.lines().collect();
    let Some(reason) = lines.last().and_then(|line| line.strip_prefix("error: ")) else {
        // Not a syntax error (a pattern too big once compiled): one sentence.
        return lines.join(" ").trim_end_matches('.').to_string();
    };
    // A one-line pattern: "regex parse error:", the pattern, carets, reason;
    // both indented by four spaces.
    if let [_, _, carets, _] = lines.as_slice()
        && let Some(column) = carets.chars().position(|c| c == '^')
        && column >= 4
    {
        return format!("{reason} (at character {})", column - 3);
    }
    reason.to_string()
}

/// The agent refusing the filter itself (INVALID_ARGUMENT naming a filter
/// part): a usage error, exit 2, as when this client finds the same fault.
/// Other invalid arguments (a path that is not a network namespace...) keep
/// their own exit status.
pub fn refused(status: &tonic::Status) -> Option<Failure> {
    const FILTER_WORDS: [&str; 6] = [
        "filter",
        "header",
        "--path",
        "--method",
        "regular expression",
        "http method",
    ];
    let message = status.message();
    let lower = message.to_ascii_lowercase();
    (status.code() == tonic::Code::InvalidArgument
        && FILTER_WORDS.iter().any(|word| lower.contains(word)))
    .then(|| usage(format!("the agent refused the filter: {message}")))
}

fn usage(message: impl Into<String>) -> Failure {
    Failure::new(Status::Usage, message)
}

/// The filter for `--output json`: absent conditions are null.
pub fn to_json(filter: &HttpFilter) -> Value {
    let headers: Vec<Value> = filter
        .headers
        .iter()
        .map(|header| json!({"name": header.name, "value": header.value}))
        .collect();
    let given = |text: &String| (!text.is_empty()).then(|| text.clone());
    json!({"headers": headers, "path": given(&filter.path), "method": given(&filter.method)})
}

/// A flag and its value for a message; a long value is cut, since the
/// user has it in front of them anyway.
fn shown(flag: &str, value: &str) -> String {
    format!("{flag} {}", quote(&truncated(value)))
}

fn truncated(text: &str) -> String {
    const SHOWN: usize = 64;
    if text.chars().count() <= SHOWN {
        return text.to_string();
    }
    format!("{}...", text.chars().take(SHOWN).collect::<String>())
}

#[cfg(test)]
mod tests;
