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

#[test]
fn the_agent_may_only_read_pods() {
    let role = documents("rbac.yaml")
        .into_iter()
        .find(|document| document["kind"] == "ClusterRole")
        .unwrap();
    let rules = role["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["resources"][0], "pods");
    assert_eq!(rules[0]["verbs"].as_sequence().unwrap().len(), 1);
    assert_eq!(rules[0]["verbs"][0], "get");
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
    let cluster_role = roles
        .iter()
        .find(|role| role["kind"] == "ClusterRole")
        .unwrap();
    assert!(
        !grants_port_forward(cluster_role),
        "no port-forward cluster-wide"
    );
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
