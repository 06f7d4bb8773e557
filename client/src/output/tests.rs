use remocal_proto::v1::{HeaderMatch, HttpFilter, ResetProgress};
use serde_json::Value;

use super::*;

fn ready(filter: Option<HttpFilter>) -> Ready {
    Ready {
        target: "pod shop/web".into(),
        port: 80,
        user: "alice".into(),
        filter,
        ..Ready::default()
    }
}

fn filter() -> HttpFilter {
    HttpFilter {
        headers: vec![HeaderMatch {
            name: "x-dev".into(),
            value: "alice".into(),
        }],
        path: "^/api/".into(),
        method: String::new(),
    }
}

const TEXT: Printer = Printer {
    format: OutputFormat::Text,
    verbose: false,
};
const JSON: Printer = Printer {
    format: OutputFormat::Json,
    verbose: false,
};

#[test]
fn a_whole_port_steal_keeps_its_ready_line() {
    assert_eq!(
        TEXT.ready_line("steal", &ready(None), "127.0.0.1:8080"),
        "ready steal pod shop/web port=80 -> 127.0.0.1:8080 as alice"
    );
    let json: Value =
        serde_json::from_str(&JSON.ready_line("mirror", &ready(None), "127.0.0.1:8080")).unwrap();
    assert_eq!(json["event"], "ready");
    assert_eq!(json["mode"], "mirror");
    assert_eq!(json["filter"], Value::Null);
}

#[test]
fn a_filtered_steal_names_its_filter_as_the_agent_echoes_it() {
    assert_eq!(
        TEXT.ready_line("steal", &ready(Some(filter())), "127.0.0.1:8080"),
        "ready steal pod shop/web port=80 requests matching --header 'x-dev: alice' --path '^/api/' -> 127.0.0.1:8080 as alice"
    );
    let json: Value =
        serde_json::from_str(&JSON.ready_line("steal", &ready(Some(filter())), "127.0.0.1:8080"))
            .unwrap();
    assert_eq!(
        json["filter"],
        serde_json::json!({"headers": [{"name": "x-dev", "value": "alice"}],
                           "path": "^/api/", "method": null})
    );
    assert_eq!(json["target"], "pod shop/web");
    assert_eq!(json["user"], "alice");
}

#[test]
fn an_anonymous_caller_is_named_so() {
    let mut anonymous = ready(Some(filter()));
    anonymous.user.clear();
    assert!(
        TEXT.ready_line("steal", &anonymous, "127.0.0.1:80")
            .ends_with("-> 127.0.0.1:80 as anonymous")
    );
}

#[test]
fn a_reset_says_what_it_ended_and_what_waits() {
    let mut resetting = ready(Some(filter()));
    resetting.reset = Some(ResetProgress {
        ended: 2,
        waiting: 1,
        done: false,
    });
    assert_eq!(
        TEXT.ready_line("steal", &resetting, "127.0.0.1:8080"),
        "ready steal pod shop/web port=80 requests matching --header 'x-dev: alice' --path '^/api/' reset: ended=2 waiting=1 -> 127.0.0.1:8080 as alice"
    );
    let json: Value =
        serde_json::from_str(&JSON.ready_line("steal", &resetting, "127.0.0.1:8080")).unwrap();
    assert_eq!(
        json["reset"],
        serde_json::json!({"ended": 2, "waiting": 1, "done": false})
    );
    let json: Value =
        serde_json::from_str(&JSON.ready_line("steal", &ready(None), "127.0.0.1:8080")).unwrap();
    assert_eq!(json["reset"], Value::Null, "no reset asked");
}
