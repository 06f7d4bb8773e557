use super::*;

fn parse_args(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("remocal").chain(args.iter().copied()))
}

#[test]
fn ports_outside_1_to_65535_are_refused() {
    for port in ["0", "65536", "-1", "http"] {
        let err = parse_args(&["steal", "--netns", "/var/run/netns/x", "--port", port]).err();
        assert!(err.is_some(), "--port {port} must be refused");
    }
    assert!(parse_args(&["steal", "--pid", "1", "--port", "65535"]).is_ok());
}

#[test]
fn exactly_one_target_is_required() {
    assert!(parse_args(&["steal", "--port", "80"]).is_err());
    assert!(parse_args(&["steal", "--pid", "1", "--netns", "/x", "--port", "80"]).is_err());
    assert!(parse_args(&["steal", "--pid", "0", "--port", "80"]).is_err());
}

#[test]
fn local_port_defaults_to_the_stolen_port() {
    for mode in ["steal", "mirror"] {
        let args = match parse_args(&[mode, "--pid", "7", "--port", "8080"])
            .unwrap()
            .command
        {
            Command::Steal(StealArgs { session, .. }) | Command::Mirror(session) => session,
            Command::Agents(_) | Command::Sessions(_) | Command::Completions { .. } => {
                panic!("{mode} is a session command")
            }
        };
        assert_eq!(args.local.local_port, None);
        assert_eq!(args.local.local_host, "127.0.0.1");
        assert_eq!(args.link.agent, None);
    }
}

#[test]
fn pods_and_deployments_are_named_like_kubectl() {
    let Command::Steal(StealArgs { session: args, .. }) =
        parse_args(&["steal", "deploy/web", "-n", "shop", "--port", "80"])
            .unwrap()
            .command
    else {
        panic!("steal");
    };
    assert_eq!(args.target.resource.as_deref(), Some("deploy/web"));
    assert_eq!(args.cluster.namespace.as_deref(), Some("shop"));
    assert_eq!(args.cluster.agent_namespace, "remocal");
    assert!(parse_args(&["mirror", "--pod", "web", "--context", "dev", "--port", "80"]).is_ok());
    assert!(
        parse_args(&["steal", "pod/web", "--pod", "web", "--port", "80"]).is_err(),
        "one target only"
    );
}

#[test]
fn filter_flags_belong_to_steal_on_any_target() {
    for target in [
        &["pod/web"][..],
        &["deploy/web"],
        &["--netns", "/x"],
        &["--pid", "7"],
    ] {
        let mut args = vec!["steal"];
        args.extend_from_slice(target);
        args.extend([
            "--port",
            "80",
            "--header",
            "x-dev: alice",
            "--header",
            "x-b: 1",
            "--path",
            "^/api/",
            "--method",
            "post",
        ]);
        let Command::Steal(StealArgs { filter, .. }) = parse_args(&args).unwrap().command else {
            panic!("steal");
        };
        assert_eq!(filter.headers, ["x-dev: alice", "x-b: 1"]);
        assert_eq!(filter.path.as_deref(), Some("^/api/"));
        assert_eq!(filter.method.as_deref(), Some("post"));
    }
    let Command::Steal(StealArgs { filter, .. }) =
        parse_args(&["steal", "--pid", "7", "--port", "80"])
            .unwrap()
            .command
    else {
        panic!("steal");
    };
    assert!(filter.headers.is_empty() && filter.path.is_none() && filter.method.is_none());
}

#[test]
fn a_mirror_refuses_filter_flags_as_a_usage_error() {
    for flag in [
        &["--header", "x-dev: alice"][..],
        &["--header=x-dev: alice"],
        &["--path", "^/api"],
        &["--method", "GET"],
    ] {
        let mut args = vec!["remocal", "mirror", "pod/web", "--port", "80"];
        args.extend_from_slice(flag);
        let failure = parse_from(args).err().expect("refused");
        assert_eq!(failure.status(), Status::Usage, "{flag:?}");
        let name = flag[0].split('=').next().unwrap_or_default();
        assert!(
            failure
                .message()
                .starts_with(&format!("{name} is for `remocal steal` only")),
            "{flag:?}: {}",
            failure.message()
        );
    }
    let other = parse_from(["remocal", "mirror", "pod/web", "--port", "80", "--bogus"]);
    assert!(other.err().unwrap().message().contains("--bogus"));
}

#[test]
fn a_mirror_refuses_to_reset_connections_as_a_usage_error() {
    for flag in [&["--reset-existing"][..], &["--reset-deadline", "5"]] {
        let mut args = vec!["remocal", "mirror", "pod/web", "--port", "80"];
        args.extend_from_slice(flag);
        let failure = parse_from(args).err().expect("refused");
        assert_eq!(failure.status(), Status::Usage, "{flag:?}");
        assert!(
            failure.message().contains("a mirror is read-only"),
            "{flag:?}: {}",
            failure.message()
        );
    }
}

#[test]
fn a_reset_deadline_must_be_a_sane_number_of_seconds() {
    for bad in ["0", "121", "soon"] {
        let args = [
            "remocal",
            "steal",
            "pod/web",
            "--port",
            "80",
            "--reset-existing",
            "--reset-deadline",
            bad,
        ];
        let failure = parse_from(args).err().expect("refused");
        assert_eq!(failure.status(), Status::Usage, "{bad}");
        assert!(
            failure.message().contains("--reset-deadline"),
            "{bad}: {}",
            failure.message()
        );
    }
    let Command::Steal(steal) = parse_from([
        "remocal",
        "steal",
        "pod/web",
        "--port",
        "80",
        "--reset-existing",
    ])
    .ok()
    .unwrap()
    .command
    else {
        panic!("steal");
    };
    assert!(steal.reset.reset_existing);
    assert_eq!(steal.reset.reset_deadline, None, "the agent's default");
}

#[test]
fn a_kubectl_plugin_is_named_as_kubectl_runs_it() {
    assert_eq!(program_for("remocal"), "remocal");
    assert_eq!(program_for("kubectl-remocal"), "kubectl remocal");
    assert_eq!(program_for("kubectl-remocal-dev"), "kubectl remocal dev");
    assert_eq!(program_for("kubectl-re_mocal"), "kubectl re-mocal");
}

#[test]
fn a_command_after_the_double_dash_is_kept_whole() {
    let Command::Steal(steal) = parse_from([
        "remocal",
        "steal",
        "pod/web",
        "--port",
        "80",
        "--",
        "python3",
        "-m",
        "http.server",
        "--bind",
        "127.0.0.1",
    ])
    .ok()
    .unwrap()
    .command
    else {
        panic!("steal");
    };
    assert_eq!(
        steal.session.command,
        ["python3", "-m", "http.server", "--bind", "127.0.0.1"]
    );
    assert_eq!(steal.session.listen_timeout, 30);
}
