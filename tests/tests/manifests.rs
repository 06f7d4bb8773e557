//! The Kubernetes install in `manifests/`: valid against the Kubernetes API schemas
//! (offline, with kubernetes-validate) and as narrow in privilege as the agent allows.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize as _;
use serde_yaml::Value;

fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

fn documents(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(manifests().join(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).unwrap())
        .collect()
}

fn resource_files() -> Vec<String> {
    let kustomization = &documents("kustomization.yaml")[0];
    kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|file| file.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_resource_is_listed_and_valid_for_kubernetes() {
    let listed = resource_files();
    let mut present: Vec<String> = std::fs::read_dir(manifests())
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    present.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(
        sorted, present,
        "kustomization.yaml lists exactly the manifests"
    );
    for file in listed {
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "--quiet"])
            .arg(manifests().join(&file))
            .output()
            .expect("run kubernetes-validate (cargo xtask setup installs it)");
        assert!(
            out.status.success(),
            "{file} is not valid Kubernetes: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_agent_runs_on_every_node_with_only_the_privileges_it_needs() {
    let daemonset = &documents("daemonset.yaml")[0];
    let spec = &daemonset["spec"]["template"]["spec"];
    assert_eq!(
        daemonset["metadata"]["labels"]["app.kubernetes.io/name"],
        "remocal-agent"
    );
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["hostPID"], true);
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(
        spec["tolerations"][0]["operator"], "Exists",
        "tolerates every taint"
    );
    assert_eq!(daemonset["spec"]["updateStrategy"]["type"], "RollingUpdate");
    let container = &spec["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["privileged"], false, "no privileged container");
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    let added: Vec<&str> = security["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|capability| capability.as_str().unwrap())
        .collect();
    assert_eq!(
        added,
        [
            "BPF",
            "NET_ADMIN",
            "SYS_ADMIN",
            "SYS_PTRACE",
            "SYS_RESOURCE",
            "PERFMON"
        ]
    );
    for mount in container["volumeMounts"].as_sequence().unwrap() {
        assert_eq!(
            mount["readOnly"], true,
            "host mounts are read-only: {mount:?}"
        );
    }
    let node_name = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|env| env["name"] == "NODE_NAME")
        .expect("NODE_NAME is set");
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        assert!(container[probe]["httpGet"]["path"].is_string(), "{probe}");
    }
    for kind in ["requests", "limits"] {
        assert!(
            container["resources"][kind]["memory"].is_string(),
            "memory {kind}"
        );
    }
    assert_eq!(
        container["image"], "remocal-agent",
        "the image is named in kustomization.yaml only"
    );
    let images = &documents("kustomization.yaml")[0]["images"][0];
    assert_eq!(images["name"], "remocal-agent");
}

/// The agent reads pods, reviews its callers and records events; nothing
/// else, and never writes what it reads.
#[test]
fn the_agent_may_read_pods_review_callers_and_record_events_only() {
    let role = documents("rbac.yaml")
        .into_iter()
        .find(|document| document["kind"] == "ClusterRole")
        .unwrap();
    let granted: Vec<(String, String, String)> = role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|rule| {
            let group = rule["apiGroups"][0].as_str().unwrap().to_string();
            let verbs: Vec<String> = rule["verbs"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|verb| verb.as_str().unwrap().to_string())
                .collect();
            let resources: Vec<String> = rule["resources"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|resource| resource.as_str().unwrap().to_string())
                .collect();
            resources.into_iter().flat_map(move |resource| {
                let group = group.clone();
                verbs
                    .clone()
                    .into_iter()
                    .map(move |verb| (group.clone(), resource.clone(), verb))
            })
        })
        .collect();
    let expected = [
        ("", "pods", "get"),
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("authorization.k8s.io", "subjectaccessreviews", "create"),
        ("", "configmaps", "get"),
        ("", "events", "create"),
    ]
    .map(|(group, resource, verb)| (group.to_string(), resource.to_string(), verb.to_string()));
    assert_eq!(granted, expected);
    let configmaps = role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|rule| rule["resources"][0] == "configmaps")
        .unwrap();
    assert_eq!(
        configmaps["resourceNames"][0], "extension-apiserver-authentication",
        "only the cluster's client CA, not every configmap"
    );
}

/// The agent runs with authentication on and the runtime's seccomp filter.
#[test]
fn the_agent_authenticates_callers_and_runs_under_seccomp() {
    let spec = &documents("daemonset.yaml")[0]["spec"]["template"]["spec"];
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let args = spec["containers"][0]["args"].as_sequence().unwrap();
    assert!(
        args.iter().any(|arg| arg == "--auth=kubernetes"),
        "{args:?}"
    );
}

/// What platform teams bind: steal (whole and filtered) and mirror, mirror
/// only, and node-level targets for node admins.
#[test]
fn user_roles_grant_remocal_permissions_by_kind() {
    let roles = documents("user-roles.yaml");
    let remocal_resources = |name: &str| -> Vec<String> {
        let role = roles
            .iter()
            .find(|role| role["kind"] == "ClusterRole" && role["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("ClusterRole {name}"));
        role["rules"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter(|rule| rule["apiGroups"][0] == "remocal.dev")
            .flat_map(|rule| {
                assert_eq!(rule["verbs"].as_sequence().unwrap(), &["create"]);
                rule["resources"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|resource| resource.as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    assert_eq!(
        remocal_resources("remocal-user"),
        [
            "pods/steal",
            "pods/steal-filtered",
            "pods/reset-connections",
            "pods/mirror"
        ]
    );
    assert_eq!(remocal_resources("remocal-mirror-only"), ["pods/mirror"]);
    assert_eq!(remocal_resources("remocal-node-admin"), ["nodes/targets"]);
}

/// Clients find the agent's gRPC port in a pod annotation; it must be the
/// port the agent listens on, and on the node's loopback only.
#[test]
fn clients_learn_the_grpc_port_the_agent_listens_on() {
    let template = &documents("daemonset.yaml")[0]["spec"]["template"];
    let annotated = template["metadata"]["annotations"]["remocal.dev/grpc-port"]
        .as_str()
        .expect("the remocal.dev/grpc-port annotation");
    let listen = template["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .find_map(|arg| arg.as_str()?.strip_prefix("--grpc-listen="))
        .expect("--grpc-listen=ADDR");
    assert_eq!(listen, format!("127.0.0.1:{annotated}"));
}

/// Developers get what remocal needs to find pods and agents, and may
/// port-forward only in the agents' namespace.
#[test]
fn developers_may_port_forward_to_the_agents_only() {
    let roles = documents("user-roles.yaml");
    let grants_port_forward = |role: &Value| {
        role["rules"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|rule| rule["resources"][0] == "pods/portforward")
    };
    for cluster_role in roles.iter().filter(|role| role["kind"] == "ClusterRole") {
        assert!(
            !grants_port_forward(cluster_role),
            "no port-forward cluster-wide"
        );
    }
    let role = roles.iter().find(|role| role["kind"] == "Role").unwrap();
    assert_eq!(role["metadata"]["namespace"], "remocal");
    assert!(grants_port_forward(role));
}

#[test]
fn prometheus_finds_the_metrics_port() {
    let service = &documents("service.yaml")[0];
    assert_eq!(
        service["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    assert_eq!(service["spec"]["ports"][0]["port"], 9420);
    let monitor =
        std::fs::read_to_string(manifests().join("monitoring/servicemonitor.yaml")).unwrap();
    let monitor: Value = serde_yaml::from_str(&monitor).unwrap();
    assert_eq!(monitor["kind"], "ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        service["spec"]["selector"]["app.kubernetes.io/name"]
    );
}
