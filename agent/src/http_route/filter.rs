//! A filtered session's conditions on requests, compiled once when the
//! session starts. Patterns use the syntax of Rust's `regex` and are
//! compiled ahead into a complete DFA of capped size: matching is one table
//! lookup per byte whatever the pattern, so a caller's pattern costs
//! neither unbounded memory nor much CPU per request. (A lazily built DFA
//! with a small cache falls back to a matcher whose cost grows with the
//! pattern: a hostile pattern took 200 ms per 64 KiB header that way.)
use regex_automata::{
    Input,
    dfa::{Automaton as _, StartKind, dense},
};
use remocal_proto::{
    filter::{describe, is_token},
    v1::{HeaderMatch, HttpFilter},
};

use super::Request;

/// At most this many header conditions per filter.
pub const MAX_HEADERS: usize = 8;
/// Longest pattern accepted, in bytes.
pub const MAX_PATTERN: usize = 1024;
/// Memory one compiled pattern may keep (Unicode `\w+` takes 330 KB): with
/// 9 patterns a filter holds at most about 3.4 MiB however hostile its
/// patterns; realistic ones (`^alice$`, `^/api/v[0-9]+/`) take a few KiB.
const COMPILED_LIMIT: usize = 384 * 1024;
/// What building it may use on the way.
const BUILD_LIMIT: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("the filter has no condition: give --header, --path or --method")]
    Empty,
    #[error("a header condition has an empty name: write it as 'NAME: REGEX'")]
    EmptyHeaderName,
    #[error("{0:?} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only)")]
    InvalidHeaderName(String),
    #[error("{what} has an invalid regular expression: {detail}")]
    InvalidRegex { what: String, detail: String },
    #[error("{0} is longer than {MAX_PATTERN} bytes")]
    TooLong(String),
    #[error("at most {MAX_HEADERS} header conditions are allowed")]
    TooManyHeaders,
    #[error("{0:?} is not an HTTP method (a token such as GET or POST)")]
    InvalidMethod(String),
}

/// Conditions that must all hold for a request to be the session's.
#[derive(Debug)]
pub struct Filter {
    headers: Vec<(String, Pattern)>,
    path: Option<Pattern>,
    method: Option<String>,
    /// As the client sent it, for conflicts and for the ready event.
    spec: HttpFilter,
}

impl Filter {
    pub fn compile(spec: &HttpFilter) -> Result<Self, FilterError> {
        if spec.headers.is_empty() && spec.path.is_empty() && spec.method.is_empty() {
            return Err(FilterError::Empty);
        }
        if spec.headers.len() > MAX_HEADERS {
            return Err(FilterError::TooManyHeaders);
        }
        let headers = spec
            .headers
            .iter()
            .map(|HeaderMatch { name, value }| {
                if name.is_empty() {
                    return Err(FilterError::EmptyHeaderName);
                }
                if name.len() > MAX_PATTERN || !name.bytes().all(is_token) {
                    return Err(FilterError::InvalidHeaderName(truncated(name)));
                }
                let regex = compile(&format!("header {name}"), value)?;
                Ok((name.to_ascii_lowercase(), regex))
            })
            .collect::<Result<_, _>>()?;
        let path = (!spec.path.is_empty())
            .then(|| compile("--path", &spec.path))
            .transpose()?;
        let method = (!spec.method.is_empty())
            .then(|| {
                if spec.method.len() <= 32 && spec.method.bytes().all(is_token) {
                    Ok(spec.method.clone())
                } else {
                    Err(FilterError::InvalidMethod(truncated(&spec.method)))
                }
            })
            .transpose()?;
        Ok(Self {
            headers,
            path,
            method,
            spec: spec.clone(),
        })
    }

    pub fn matches(&self, request: &Request<'_>) -> bool {
        self.method
            .as_ref()
            .is_none_or(|method| method == request.method)
            && self
                .path
                .as_ref()
                .is_none_or(|path| path.is_match(request.path.as_bytes()))
            && self.headers.iter().all(|(name, value)| {
                request.headers.iter().any(|(header, sent)| {
                    header.eq_ignore_ascii_case(name)
                        && std::str::from_utf8(sent).is_ok()
                        && value.is_match(sent)
                })
            })
    }

    pub fn spec(&self) -> &HttpFilter {
        &self.spec
    }

    /// The same conditions as `other`, however they were written (header
    /// names in another case or order).
    pub fn same_as(&self, other: &Filter) -> bool {
        let key = |filter: &Filter| {
            let mut headers: Vec<(String, String)> = filter
                .headers
                .iter()
                .map(|(name, pattern)| (name.clone(), pattern.source.clone()))
                .collect();
            headers.sort();
            (
                headers,
                filter.path.as_ref().map(|path| path.source.clone()),
                filter.method.clone(),
            )
        };
        key(self) == key(other)
    }
}

impl std::fmt::Display for Filter {
    /// The way the CLI takes it: `--header 'x-dev: alice' --path '^/api'`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        describe(&self.spec).fmt(f)
    }
}

/// A pattern, compiled.
#[derive(Debug)]
struct Pattern {
    source: String,
    dfa: dense::DFA<Vec<u32>>,
}

impl Pattern {
    fn is_match(&self, haystack: &[u8]) -> bool {
        // Only a quit byte could fail a search, and the DFA has none.
        self.dfa
            .try_search_fwd(&Input::new(haystack).earliest(true))
            .is_ok_and(|found| found.is_some())
    }
}

fn compile(what: &str, pattern: &str) -> Result<Pattern, FilterError> {
    if pattern.len() > MAX_PATTERN {
        return Err(FilterError::TooLong(what.to_string()));
    }
    let config = dense::Config::new()
        .start_kind(StartKind::Unanchored)
        .dfa_size_limit(Some(COMPILED_LIMIT))
        .determinize_size_limit(Some(BUILD_LIMIT));
    let dfa = dense::Builder::new()
        .configure(config)
        .build(pattern)
        .map_err(|err| FilterError::InvalidRegex {
            what: what.to_string(),
            detail: if err.to_string().contains("size limit") {
                format!(
                    "it is too complex for a filter (its automaton would exceed {} KiB): simplify it, e.g. [a-z0-9_] instead of \\w",
                    COMPILED_LIMIT / 1024
                )
            } else {
                err.to_string()
            },
        })?;
    Ok(Pattern {
        source: pattern.to_string(),
        dfa,
    })
}

fn truncated(text: &str) -> String {
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(headers: &[(&str, &str)], path: &str, method: &str) -> Result<Filter, FilterError> {
        Filter::compile(&HttpFilter {
            headers: headers
                .iter()
                .map(|(name, value)| HeaderMatch {
                    name: name.to_string(),
                    value: value.to_string(),
                })
                .collect(),
            path: path.to_string(),
            method: method.to_string(),
        })
    }

    fn request<'a>(
        method: &'a str,
        path: &'a str,
        headers: &'a [(&'a str, &'a [u8])],
    ) -> Request<'a> {
        Request {
            method,
            path,
            headers,
        }
    }

    #[test]
    fn all_conditions_must_match() {
        let alice = filter(&[("X-Dev", "^alice$")], "^/api/", "POST").unwrap();
        let headers: &[(&str, &[u8])] = &[("host", b"web"), ("x-dev", b"alice")];
        assert!(alice.matches(&request("POST", "/api/orders?x=1", headers)));
        assert!(!alice.matches(&request("GET", "/api/orders", headers)));
        assert!(!alice.matches(&request("POST", "/web", headers)));
        assert!(!alice.matches(&request("POST", "/api/", &[("x-dev", b"alicex")])));
        assert!(!alice.matches(&request("POST", "/api/", &[])));
    }

    #[test]
    fn header_names_ignore_case_and_one_of_several_values_is_enough() {
        let bob = filter(&[("x-dev", "bob")], "", "").unwrap();
        let headers: &[(&str, &[u8])] = &[("X-DEV", b"carol"), ("X-Dev", b"bob")];
        assert!(bob.matches(&request("GET", "/", headers)));
        assert!(!bob.matches(&request("GET", "/", &[("x-dev", b"\xffbob")])));
    }

    #[test]
    fn bad_filters_are_named() {
        assert_eq!(filter(&[], "", "").unwrap_err(), FilterError::Empty);
        assert_eq!(
            filter(&[("", "x")], "", "").unwrap_err(),
            FilterError::EmptyHeaderName
        );
        assert!(matches!(
            filter(&[("x dev", "x")], "", "").unwrap_err(),
            FilterError::InvalidHeaderName(_)
        ));
        assert!(matches!(
            filter(&[], "(", "").unwrap_err(),
            FilterError::InvalidRegex { what, .. } if what == "--path"
        ));
        assert!(matches!(
            filter(&[], "", "GET /").unwrap_err(),
            FilterError::InvalidMethod(_)
        ));
        assert!(matches!(
            filter(&[], &"a".repeat(MAX_PATTERN + 1), "").unwrap_err(),
            FilterError::TooLong(_)
        ));
        // A pattern whose automaton would be huge is refused, not built.
        assert!(matches!(
            filter(&[], r"\w{1000}\w{1000}\w{1000}", "").unwrap_err(),
            FilterError::InvalidRegex { .. }
        ));
    }

    #[test]
    fn realistic_patterns_fit_the_compiled_limit() {
        for pattern in [
            r"^alice$",
            r"(?i)^(alice|bob|carol)-[0-9]+$",
            r"^/api/v[0-9]+/orders/[a-f0-9-]{36}(\?.*)?$",
            r"\w+",
            r".*",
            r"[[:alnum:]]{64}",
        ] {
            filter(&[("x-dev", pattern)], pattern, "").unwrap();
        }
    }

    #[test]
    fn a_pattern_too_complex_is_refused_and_anchors_hold() {
        let refused = filter(&[], r"(?i)[a-zQ]{1,200}[^Q]{9}Z", "").unwrap_err();
        assert!(
            matches!(&refused, FilterError::InvalidRegex { detail, .. } if detail.contains("too complex")),
            "{refused:?}"
        );
        let anchored = filter(&[("x", "^ab$")], "", "").unwrap();
        for (value, expected) in [("ab", true), ("xab", false), ("abx", false)] {
            let headers: &[(&str, &[u8])] = &[("x", value.as_bytes())];
            assert_eq!(
                anchored.matches(&request("GET", "/", headers)),
                expected,
                "{value}"
            );
        }
    }

    #[test]
    fn the_same_conditions_written_differently_are_the_same_filter() {
        let one = filter(&[("X-Dev", "a"), ("x-team", "b")], "^/", "GET").unwrap();
        let two = filter(&[("x-team", "b"), ("x-dev", "a")], "^/", "GET").unwrap();
        let three = filter(&[("x-dev", "a")], "^/", "GET").unwrap();
        assert!(one.same_as(&two));
        assert!(!one.same_as(&three));
    }
}
