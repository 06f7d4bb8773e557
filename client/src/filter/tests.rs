use super::*;

fn args(headers: &[&str], path: Option<&str>, method: Option<&str>) -> FilterArgs {
    FilterArgs {
        headers: headers.iter().map(ToString::to_string).collect(),
        path: path.map(ToString::to_string),
        method: method.map(ToString::to_string),
    }
}

fn header(name: &str, value: &str) -> HeaderMatch {
    HeaderMatch {
        name: name.into(),
        value: value.into(),
    }
}

/// A usage error whose message contains every one of `named`.
fn assert_refused(args: &FilterArgs, named: &[&str]) {
    let failure = from_args(args).expect_err("must be refused");
    assert_eq!(failure.status(), Status::Usage, "{}", failure.message());
    for part in named {
        assert!(
            failure.message().contains(part),
            "{part:?} missing from {:?}",
            failure.message()
        );
    }
    assert!(
        !failure.message().contains('\n'),
        "one line: {:?}",
        failure.message()
    );
}

#[test]
fn no_flag_is_a_whole_port_steal() {
    assert_eq!(from_args(&FilterArgs::default()).unwrap(), None);
}

#[test]
fn headers_split_at_the_first_colon_and_are_trimmed() {
    let filter = from_args(&args(
        &["x-dev: alice", " X-Trace :  ^a:b$ ", "x-n:1"],
        None,
        None,
    ))
    .unwrap()
    .unwrap();
    assert_eq!(
        filter.headers,
        [
            header("x-dev", "alice"),
            header("X-Trace", "^a:b$ "),
            header("x-n", "1")
        ]
    );
    assert_eq!((filter.path.as_str(), filter.method.as_str()), ("", ""));
}

#[test]
fn path_and_method_make_a_filter_and_methods_are_upper_cased() {
    let filter = from_args(&args(&["x-dev: bob"], Some("^/api/"), Some("post")))
        .unwrap()
        .unwrap();
    assert_eq!(
        filter,
        HttpFilter {
            headers: vec![header("x-dev", "bob")],
            path: "^/api/".into(),
            method: "POST".into(),
        }
    );
    let filter = from_args(&args(&[], None, Some("PATCH"))).unwrap().unwrap();
    assert!(filter.headers.is_empty() && filter.path.is_empty());
    assert_eq!(filter.method, "PATCH");
}

#[test]
fn malformed_headers_are_usage_errors_naming_the_flag() {
    assert_refused(
        &args(&[": x"], None, None),
        &["--header ': x'", "no header name"],
    );
    assert_refused(&args(&["  : x"], None, None), &["no header name"]);
    assert_refused(
        &args(&["x-dev"], None, None),
        &["--header 'x-dev'", "no ':'", "NAME: REGEX"],
    );
    assert_refused(
        &args(&["x-dev:"], None, None),
        &["--header 'x-dev:'", "no value", "x-dev: .*"],
    );
    assert_refused(&args(&["x-dev:   "], None, None), &["no value"]);
    assert_refused(
        &args(&["x dev: a"], None, None),
        &["--header 'x dev: a'", "'x dev' is not an HTTP header name"],
    );
    assert_refused(
        &args(&["x(dev): a"], None, None),
        &["not an HTTP header name"],
    );
}

#[test]
fn invalid_regexes_are_usage_errors_with_the_regex_reason() {
    assert_refused(
        &args(&["x-dev: (alice"], None, None),
        &[
            "--header 'x-dev: (alice'",
            "not a valid regular expression",
            "unclosed group",
            "at character 1",
        ],
    );
    assert_refused(
        &args(&[], Some("^/api/[a-"), None),
        &[
            "--path '^/api/[a-'",
            "unclosed character class",
            "docs.rs/regex",
        ],
    );
    assert_refused(
        &args(&[], Some("(?<=a)b"), None),
        &["--path", "look-around"],
    );
    assert_refused(
        &args(&[], Some("a\n("), None),
        &["--path $'a\\n('", "unclosed group"],
    );
}

#[test]
fn empty_path_and_method_and_bad_methods_are_usage_errors() {
    assert_refused(
        &args(&[], Some(""), None),
        &["--path ''", "empty", "leave --path out"],
    );
    assert_refused(&args(&[], None, Some("")), &["--method ''", "empty"]);
    assert_refused(
        &args(&[], None, Some("GET /")),
        &["--method 'GET /'", "not an HTTP method"],
    );
    assert_refused(
        &args(&[], None, Some(&"A".repeat(33))),
        &["not an HTTP method"],
    );
}

#[test]
fn the_agents_limits_are_enforced_here() {
    let many: Vec<String> = (0..=MAX_HEADERS).map(|i| format!("x-{i}: a")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_refused(&args(&many, None, None), &["9 --header", "at most 8"]);
    assert!(from_args(&args(&many[..MAX_HEADERS], None, None)).is_ok());

    let long = "a".repeat(MAX_PATTERN + 1);
    assert_refused(
        &args(&[], Some(&long), None),
        &["--path", "1025 bytes", "at most 1024"],
    );
    assert_refused(
        &args(&[&format!("x-dev: {long}")], None, None),
        &["--header", "1025 bytes"],
    );
    assert_refused(
        &args(&[&format!("{long}: a")], None, None),
        &["not an HTTP header name"],
    );
    assert!(from_args(&args(&[], Some(&long[1..]), None)).is_ok());
    // Short, yet compiles beyond the agent's size cap.
    assert_refused(
        &args(&[], Some(r"\w{1000}\w{1000}"), None),
        &["--path", "size limit"],
    );
}

#[test]
fn json_has_null_for_absent_conditions() {
    let filter = HttpFilter {
        headers: vec![header("x-dev", "alice")],
        path: String::new(),
        method: "GET".into(),
    };
    assert_eq!(
        to_json(&filter),
        json!({"headers": [{"name": "x-dev", "value": "alice"}], "path": null, "method": "GET"})
    );
}

#[test]
fn the_agents_filter_refusals_are_usage_errors_and_others_keep_theirs() {
    let invalid = |message: &str| tonic::Status::invalid_argument(message);
    for message in [
        "--path has an invalid regular expression: unclosed group",
        "at most 8 header conditions are allowed",
        "\"GET /\" is not an HTTP method (a token such as GET or POST)",
        "a filter is only for steal sessions",
    ] {
        let failure = refused(&invalid(message)).expect(message);
        assert_eq!(failure.status(), Status::Usage);
        assert!(failure.message().contains(message));
    }
    assert!(refused(&invalid("/proc/1/ns/mnt is not a network namespace")).is_none());
    assert!(refused(&tonic::Status::already_exists("header x-dev: taken")).is_none());
}
