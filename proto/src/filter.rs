//! An HTTP filter as people read it, for the agent (its log, the pod's
//! events, conflicts) and the CLI (its `ready` line) alike.
use crate::v1::HttpFilter;

/// RFC 9110's `tchar`: what header names and methods are made of.
pub fn is_token(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// The filter as the flags that give it, quoted for a shell, so a ready line
/// can be read as a command: `--header 'x-dev: alice' --method POST --path '^/api/'`.
pub fn describe(filter: &HttpFilter) -> String {
    let mut flags: Vec<String> = filter
        .headers
        .iter()
        .map(|header| {
            format!(
                "--header {}",
                quote(&format!("{}: {}", header.name, header.value))
            )
        })
        .collect();
    if !filter.method.is_empty() {
        let method = &filter.method;
        if method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            flags.push(format!("--method {method}"));
        } else {
            flags.push(format!("--method {}", quote(method)));
        }
    }
    if !filter.path.is_empty() {
        flags.push(format!("--path {}", quote(&filter.path)));
    }
    flags.join(" ")
}

/// Single quotes for a shell (a quote inside becomes `'\''`); text with
/// control characters (a newline) gets `$'...'` escapes instead, so output
/// stays one line per event.
pub fn quote(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return format!("'{}'", text.replace('\'', r"'\''"));
    }
    let mut quoted = String::from("$'");
    for c in text.chars() {
        match c {
            '\\' | '\'' => {
                quoted.push('\\');
                quoted.push(c);
            }
            '\n' => quoted.push_str(r"\n"),
            '\t' => quoted.push_str(r"\t"),
            '\r' => quoted.push_str(r"\r"),
            c if c.is_control() => {
                let mut bytes = [0; 4];
                for byte in c.encode_utf8(&mut bytes).bytes() {
                    quoted.push_str(&format!("\\x{byte:02x}"));
                }
            }
            c => quoted.push(c),
        }
    }
    quoted.push('\'');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::HeaderMatch;

    fn header(name: &str, value: &str) -> HeaderMatch {
        HeaderMatch {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn describe_gives_back_the_flags_quoted_for_a_shell() {
        let filter = HttpFilter {
            headers: vec![header("x-dev", "alice"), header("x-q", "it's")],
            path: "^/api/".into(),
            method: "POST".into(),
        };
        assert_eq!(
            describe(&filter),
            r"--header 'x-dev: alice' --header 'x-q: it'\''s' --method POST --path '^/api/'"
        );
        let method_only = HttpFilter {
            method: "M!".into(),
            ..HttpFilter::default()
        };
        assert_eq!(describe(&method_only), "--method 'M!'");
        let multi_line = HttpFilter {
            path: "a\n'b".into(),
            ..HttpFilter::default()
        };
        assert_eq!(describe(&multi_line), r"--path $'a\n\'b'");
    }
}
