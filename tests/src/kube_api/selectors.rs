//! `labelSelector` and `fieldSelector` as apimachinery parses them. remocal finds
//! agents and pods by selectors, so the fake must both filter the same way and
//! refuse what a real apiserver refuses (a typo in a selector is a 400, never an
//! empty list).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;

/// What an object offers to selectors.
pub(super) trait Selectable {
    /// The field labels the apiserver accepts for this kind; others are a 400.
    const FIELDS: &'static [&'static str];
    fn labels(&self) -> Option<&BTreeMap<String, String>>;
    /// The value of one of `FIELDS` (absent fields read as "", as in the apiserver).
    fn field(&self, name: &str) -> String;
}

impl Selectable for Pod {
    const FIELDS: &'static [&'static str] = &[
        "metadata.name",
        "metadata.namespace",
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    ];

    fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata.labels.as_ref()
    }

    fn field(&self, name: &str) -> String {
        let spec = self.spec.as_ref();
        let status = self.status.as_ref();
        let text = |value: Option<&String>| value.cloned().unwrap_or_default();
        match name {
            "metadata.name" => text(self.metadata.name.as_ref()),
            "metadata.namespace" => text(self.metadata.namespace.as_ref()),
            "spec.nodeName" => text(spec.and_then(|s| s.node_name.as_ref())),
            "spec.restartPolicy" => text(spec.and_then(|s| s.restart_policy.as_ref())),
            "spec.schedulerName" => text(spec.and_then(|s| s.scheduler_name.as_ref())),
            "spec.serviceAccountName" => text(spec.and_then(|s| s.service_account_name.as_ref())),
            "spec.hostNetwork" => spec
                .and_then(|s| s.host_network)
                .unwrap_or(false)
                .to_string(),
            "status.phase" => text(status.and_then(|s| s.phase.as_ref())),
            "status.podIP" => text(status.and_then(|s| s.pod_ip.as_ref())),
            "status.nominatedNodeName" => text(status.and_then(|s| s.nominated_node_name.as_ref())),
            _ => String::new(),
        }
    }
}

impl Selectable for Deployment {
    const FIELDS: &'static [&'static str] = &["metadata.name", "metadata.namespace"];

    fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata.labels.as_ref()
    }

    fn field(&self, name: &str) -> String {
        match name {
            "metadata.name" => self.metadata.name.clone().unwrap_or_default(),
            "metadata.namespace" => self.metadata.namespace.clone().unwrap_or_default(),
            _ => String::new(),
        }
    }
}

/// Both selectors of a list request, checked against the kind being listed.
pub(super) struct Selector {
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

impl Selector {
    /// `Err` is the message of the 400 the apiserver would answer.
    pub fn parse<T: Selectable>(labels: &str, fields: &str) -> Result<Selector, String> {
        let labels = parse_labels(labels)?;
        let fields = parse_fields(fields)?;
        if let Some(unknown) = fields
            .iter()
            .find(|f| !T::FIELDS.contains(&f.field.as_str()))
        {
            return Err(format!("field label not supported: {}", unknown.field));
        }
        Ok(Selector { labels, fields })
    }

    pub fn matches<T: Selectable>(&self, object: &T) -> bool {
        let empty = BTreeMap::new();
        let labels = object.labels().unwrap_or(&empty);
        self.labels.iter().all(|r| r.matches(labels))
            && self
                .fields
                .iter()
                .all(|f| (object.field(&f.field) == f.value) != f.negated)
    }
}

#[derive(Debug, PartialEq)]
enum LabelRequirement {
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

impl LabelRequirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let number = |key: &str| labels.get(key).and_then(|v| v.parse::<i64>().ok());
        match self {
            Self::Exists(key) => labels.contains_key(key),
            Self::NotExists(key) => !labels.contains_key(key),
            Self::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Self::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Self::GreaterThan(key, n) => number(key).is_some_and(|v| v > *n),
            Self::LessThan(key, n) => number(key).is_some_and(|v| v < *n),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Not,
    Equals,
    DoubleEquals,
    NotEquals,
    Greater,
    Less,
    In,
    NotIn,
    Open,
    Close,
    Comma,
    End,
}

impl Token {
    fn text(&self) -> String {
        match self {
            Self::Ident(s) => s.clone(),
            Self::Not => "!".into(),
            Self::Equals => "=".into(),
            Self::DoubleEquals => "==".into(),
            Self::NotEquals => "!=".into(),
            Self::Greater => "gt".into(),
            Self::Less => "lt".into(),
            Self::In => "in".into(),
            Self::NotIn => "notin".into(),
            Self::Open => "(".into(),
            Self::Close => ")".into(),
            Self::Comma => ",".into(),
            Self::End => "".into(),
        }
    }
}

fn lex(selector: &str) -> Vec<Token> {
    let special = |c: char| c.is_whitespace() || "!=<>(),".contains(c);
    let mut tokens = Vec::new();
    let mut chars = selector.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        if special(c) {
            chars.next();
            let next_is_eq = chars.peek() == Some(&'=');
            tokens.push(match c {
                '!' if next_is_eq => {
                    chars.next();
                    Token::NotEquals
                }
                '!' => Token::Not,
                '=' if next_is_eq => {
                    chars.next();
                    Token::DoubleEquals
                }
                '=' => Token::Equals,
                '>' => Token::Greater,
                '<' => Token::Less,
                '(' => Token::Open,
                ')' => Token::Close,
                _ => Token::Comma,
            });
            continue;
        }
        let mut ident = String::new();
        while let Some(&c) = chars.peek().filter(|c| !special(**c)) {
            ident.push(c);
            chars.next();
        }
        tokens.push(match ident.as_str() {
            "in" => Token::In,
            "notin" => Token::NotIn,
            _ => Token::Ident(ident),
        });
    }
    tokens.push(Token::End);
    tokens
}

fn found(token: &Token, expected: &str) -> String {
    format!("found '{}', expected: {expected}", token.text())
}

type Tokens = std::iter::Peekable<std::vec::IntoIter<Token>>;

fn next(tokens: &mut Tokens) -> Token {
    tokens.next().unwrap_or(Token::End)
}

fn at_end_of_requirement(tokens: &mut Tokens) -> bool {
    matches!(tokens.peek(), Some(Token::Comma | Token::End) | None)
}

/// apimachinery's `labels.Parse`: requirements separated by commas.
fn parse_labels(selector: &str) -> Result<Vec<LabelRequirement>, String> {
    let mut tokens = lex(selector).into_iter().peekable();
    let mut requirements = Vec::new();
    if tokens.peek() == Some(&Token::End) {
        return Ok(requirements);
    }
    loop {
        requirements.push(parse_requirement(&mut tokens)?);
        match next(&mut tokens) {
            Token::End => return Ok(requirements),
            Token::Comma => match tokens.peek() {
                Some(Token::Ident(_) | Token::Not) => {}
                other => {
                    return Err(found(other.unwrap_or(&Token::End), "identifier after ','"));
                }
            },
            other => return Err(found(&other, "',' or 'end of string'")),
        }
    }
}

fn parse_requirement(tokens: &mut Tokens) -> Result<LabelRequirement, String> {
    let key = match next(tokens) {
        Token::Not => {
            return match next(tokens) {
                Token::Ident(key) => Ok(LabelRequirement::NotExists(valid_key(key)?)),
                other => Err(found(&other, "identifier after '!'")),
            };
        }
        Token::Ident(key) => valid_key(key)?,
        other => return Err(found(&other, "!, identifier, or 'end of string'")),
    };
    if at_end_of_requirement(tokens) {
        return Ok(LabelRequirement::Exists(key));
    }
    match next(tokens) {
        op @ (Token::Equals | Token::DoubleEquals | Token::NotEquals) => {
            // `a=` selects the empty value.
            let value = if at_end_of_requirement(tokens) {
                String::new()
            } else {
                match next(tokens) {
                    Token::Ident(value) => valid_value(&key, value)?,
                    other => return Err(found(&other, "identifier")),
                }
            };
            Ok(if op == Token::NotEquals {
                LabelRequirement::NotIn(key, vec![value])
            } else {
                LabelRequirement::In(key, vec![value])
            })
        }
        op @ (Token::In | Token::NotIn) => {
            let values = parse_set(&key, tokens)?;
            Ok(if op == Token::In {
                LabelRequirement::In(key, values)
            } else {
                LabelRequirement::NotIn(key, values)
            })
        }
        op @ (Token::Greater | Token::Less) => {
            let Token::Ident(value) = next(tokens) else {
                return Err("unable to parse requirement: for 'Gt', 'Lt' operators, exactly one value is required".into());
            };
            let Ok(n) = value.parse::<i64>() else {
                return Err(format!(
                    "unable to parse requirement: for 'Gt', 'Lt' operators, the value must be an integer: {value}"
                ));
            };
            Ok(if op == Token::Greater {
                LabelRequirement::GreaterThan(key, n)
            } else {
                LabelRequirement::LessThan(key, n)
            })
        }
        other => Err(found(
            &other,
            "in, notin, =, ==, !=, gt, lt, ',' or 'end of string'",
        )),
    }
}

fn parse_set(key: &str, tokens: &mut Tokens) -> Result<Vec<String>, String> {
    match next(tokens) {
        Token::Open => {}
        other => return Err(found(&other, "'('")),
    }
    let mut values = Vec::new();
    loop {
        match next(tokens) {
            Token::Ident(value) => {
                values.push(valid_value(key, value)?);
                match next(tokens) {
                    Token::Comma => continue,
                    Token::Close => break,
                    other => return Err(found(&other, "',' or ')'")),
                }
            }
            Token::Comma => values.push(String::new()),
            Token::Close if !values.is_empty() => break,
            Token::Close => {
                return Err("unable to parse requirement: for 'in', 'notin' operators, values set can't be empty".into());
            }
            other => return Err(found(&other, "identifier, ',' or ')'")),
        }
    }
    Ok(values)
}

/// A label name: `[prefix/]name`, name as for values but never empty.
fn valid_key(key: String) -> Result<String, String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key.as_str()),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    if prefix_ok && !name.is_empty() && label_text_ok(name) {
        Ok(key)
    } else {
        Err(format!(
            "unable to parse requirement: <nil>: Invalid value: \"{key}\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
        ))
    }
}

fn valid_value(key: &str, value: String) -> Result<String, String> {
    if value.is_empty() || label_text_ok(&value) {
        Ok(value)
    } else {
        Err(format!(
            "unable to parse requirement: values[0][{key}]: Invalid value: \"{value}\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
        ))
    }
}

fn label_text_ok(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() <= 63
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[derive(Debug, PartialEq)]
struct FieldRequirement {
    field: String,
    value: String,
    negated: bool,
}

/// apimachinery's `fields.ParseSelector`: terms split at unescaped commas, each
/// `field=value`, `field==value` or `field!=value`, values escaped with `\`.
fn parse_fields(selector: &str) -> Result<Vec<FieldRequirement>, String> {
    if selector.is_empty() {
        return Ok(Vec::new());
    }
    let mut terms = vec![String::new()];
    let mut escaped = false;
    for c in selector.chars() {
        let term = terms.last_mut().expect("terms starts non-empty");
        if escaped {
            term.push(c);
            escaped = false;
        } else if c == '\\' {
            term.push(c);
            escaped = true;
        } else if c == ',' {
            terms.push(String::new());
        } else {
            term.push(c);
        }
    }
    terms
        .iter()
        .map(|term| {
            let not_understood =
                || format!("invalid selector: '{selector}'; can't understand '{term}'");
            let (field, negated, raw) = if let Some((f, v)) = term.split_once("!=") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, false, v)
            } else {
                return Err(not_understood());
            };
            if field.is_empty() {
                return Err(not_understood());
            }
            Ok(FieldRequirement {
                field: field.to_string(),
                value: unescape(raw)?,
                negated,
            })
        })
        .collect()
}

fn unescape(value: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ ('\\' | ',' | '=')) => out.push(e),
                _ => {
                    return Err(format!(
                        "invalid field selector: invalid escape sequence in {value}"
                    ));
                }
            },
            '=' | ',' => {
                return Err(format!("invalid field selector: unescaped {c} in {value}"));
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn selects(selector: &str, pairs: &[(&str, &str)]) -> bool {
        let requirements = parse_labels(selector).unwrap_or_else(|e| panic!("{selector}: {e}"));
        let labels = labels(pairs);
        requirements.iter().all(|r| r.matches(&labels))
    }

    #[test]
    fn label_equality_existence_and_sets() {
        let web = [
            ("app", "web"),
            ("app.kubernetes.io/name", "remocal-agent"),
            ("tier", "3"),
        ];
        for selector in [
            "",
            "app=web",
            "app==web",
            "app!=db",
            "app",
            "!db",
            "app=web,tier",
            " app = web , !db ",
            "app.kubernetes.io/name=remocal-agent",
            "app in (web,db)",
            "app notin (db)",
            "tier>2",
            "tier<4",
            "missing!=",
        ] {
            assert!(selects(selector, &web), "{selector}");
        }
        // As in apimachinery, `=` needs the label present even for an empty value.
        for selector in [
            "app=db",
            "app!=web",
            "!app",
            "db",
            "app in (db)",
            "tier>3",
            "missing=",
        ] {
            assert!(!selects(selector, &web), "{selector}");
        }
    }

    #[test]
    fn bad_label_syntax_is_refused() {
        for selector in [
            "=web",
            "app=web=x",
            "a b",
            "app in web",
            "app in ()",
            "b@d=x",
            "app=b@d",
            "app,",
            "tier>x",
        ] {
            assert!(parse_labels(selector).is_err(), "{selector}");
        }
    }

    #[test]
    fn field_selectors() {
        let parsed =
            parse_fields("spec.nodeName=node-a,status.phase!=Failed,metadata.name==a\\,b").unwrap();
        assert_eq!(
            parsed,
            vec![
                FieldRequirement {
                    field: "spec.nodeName".into(),
                    value: "node-a".into(),
                    negated: false
                },
                FieldRequirement {
                    field: "status.phase".into(),
                    value: "Failed".into(),
                    negated: true
                },
                FieldRequirement {
                    field: "metadata.name".into(),
                    value: "a,b".into(),
                    negated: false
                },
            ]
        );
        assert!(parse_fields("spec.nodeName").is_err());
        assert!(parse_fields("a=b,").is_err());
        assert!(parse_fields("a=b=c").is_err());
        assert_eq!(
            Selector::parse::<Pod>("", "spec.foo=x").err().unwrap(),
            "field label not supported: spec.foo"
        );
    }
}
